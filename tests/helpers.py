"""Shared test helpers: build the reference and ours on the same weights, compare, locate divergence."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from cases import SEQ_LEN, Case

import hf_archs


def needs(architecture: str) -> None:
    """Every architecture is registered and importable here: a failure to build one fails the test, naming why."""
    from hf_archs.presets import unavailable_reason

    reason = unavailable_reason(architecture)
    assert reason is None, reason


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that logits are peaked (greedy decoding is then a meaningful check), norms not 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:  # norms and biases: perturb around the initial value
                p.add_(0.1 * noise.to(p.dtype))
            else:
                p.copy_(0.08 * noise.to(p.dtype))
    return model


def reference(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(case.reference(case.official_config()))


def ours_from(case: Case, ref: torch.nn.Module, attn: str = "eager") -> torch.nn.Module:
    """Our model with the reference's weights, loaded strictly."""
    config = hf_archs.config_from_official(case.official_config())
    model = hf_archs.ARCHITECTURES[case.name].causal_lm_class(config)
    state = ref.state_dict()
    model.load_state_dict(case.to_ours(state) if case.to_ours else state, strict=True)
    model.set_attn_implementation(attn)
    return model.eval()


def tokens(case: Case, batch: int = 1, length: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    vocab = case.official["vocab_size"] if "vocab_size" in case.official else case.official["text_config"]["vocab_size"]
    return torch.randint(3, vocab, (batch, length), generator=gen)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def first_divergence(ours: torch.nn.Module, ref: torch.nn.Module, ids: torch.Tensor, tol: float = 1e-5) -> str:
    """Name the first decoder layer whose output differs (the layer-diff tool), for failure messages."""
    a = ours(ids, output_hidden_states=True).hidden_states
    b = ref(ids, output_hidden_states=True).hidden_states
    for i, (x, y) in enumerate(zip(a, b)):
        if max_rel_diff(x, y) > tol:
            return f"first diverging hidden state: index {i} (0 = embeddings), rel diff {max_rel_diff(x, y):.2e}"
    return "hidden states agree; the difference is in the head"


def matformer_cut_state(state: dict[str, torch.Tensor], kept: list[int], widths: list[int],
                        per_layer: int) -> dict[str, torch.Tensor]:
    """A MatFormer cut's weights written out from the rule, independently of hf_archs.matformer: the kept layers
    renumbered, the first w FFN units, the kept layers' per-layer-embedding columns and projection rows
    (`per_layer` = hidden_size_per_layer_input)."""
    out = {}
    for key, v in state.items():
        parts = key.split(".")
        if key.startswith("model.layers."):
            i = int(parts[2])
            if i not in kept:
                continue
            j, rest = kept.index(i), ".".join(parts[3:])
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                v = v[: widths[j], :]
            elif rest == "mlp.down_proj.weight":
                v = v[:, : widths[j]]
            out[f"model.layers.{j}.{rest}"] = v.clone()
        elif key == "model.embed_tokens_per_layer.weight":
            out[key] = torch.cat([v[:, i * per_layer:(i + 1) * per_layer] for i in kept], dim=1)
        elif key == "model.per_layer_model_projection.weight":
            out[key] = torch.cat([v[i * per_layer:(i + 1) * per_layer, :] for i in kept], dim=0)
        else:
            out[key] = v.clone()
    return out


def assert_bias_updates_balance(model: torch.nn.Module, bias_owners: list, forward, steps: int = 40,
                                rate: float = 0.02) -> None:
    """Skew every correction bias toward the first experts, run aux-loss-free balancing steps
    (`hf_archs.balancing`), and check the load moved toward balance with only the biases changed.
    `bias_owners`: the modules holding `e_score_correction_bias` (routers or MoE blocks); `forward()` runs the
    model once on fixed inputs."""
    from hf_archs.balancing import ExpertLoadTracker, update_correction_bias

    with torch.no_grad():
        for owner in bias_owners:
            owner.e_score_correction_bias.copy_(torch.linspace(0.6, 0.0, owner.e_score_correction_bias.numel()))
    weights_before = {k: v.clone() for k, v in model.named_parameters()}
    tracker = ExpertLoadTracker(model)
    assert len(tracker.routers) == len(bias_owners)

    def imbalance() -> float:
        tracker.reset()
        with torch.no_grad():
            forward()
        return max(tracker.imbalance().values())

    first = imbalance()
    loads = update_correction_bias(tracker, rate=rate, reset=False)
    assert all(int(v.sum()) > 0 for v in loads.values())
    for _ in range(steps):
        imbalance()
        update_correction_bias(tracker, rate=rate)
    last = imbalance()
    assert first > 2.0 and last < 0.6 * first, (first, last)
    # only the biases moved; the overloaded expert 0 had its bias lowered
    assert all(torch.equal(v, weights_before[k]) for k, v in model.named_parameters())
    assert all(owner.e_score_correction_bias[0] < 0.6 for owner in bias_owners)
    tracker.remove()
    tracker.reset()
    with torch.no_grad():
        forward()
    assert all(int(c.sum()) == 0 for c in tracker.counts.values())  # hooks removed

