"""Grok 2.5 against an independent, deliberately naive reference forward, and the contract's checks for it.

transformers has no Grok, so Grok cannot be a contract `Case` (those need a transformers reference). The reference
here is written from the official runtime's semantics (SGLang's `models/grok.py`, its MoE router
`layers/moe/router.py` and the `xai_temperature_len` code of its attention kernels; see
../shared/docs/official-releases.md §11), with plain loops over tokens, heads and experts, in float64, reading the
release's tensor names (per-expert w1 / w2 / w3). It imports nothing from hf_archs.

The tiny release is written in the converted layout (the release's tensor names and config.json fields;
model_type "hfa_grok2", what conversion/ writes from the TP-8 files) and loaded with `from_official`, which fuses
the per-expert tensors. The soft-caps and the temperature bite: the tiny caps (attention 4, router 2, logits 5) sit
inside the logits' range, and `attn_temperature_len` (8) is shorter than the sequences. (Caps of 30 / 50 would need
logits of that size, which turn fp32 rounding into errors above the contract's 1e-5 tolerance.)
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_archs

SEQ = 24
RELEASE = dict(  # xai-org/grok-2 config.json fields, tiny sizes (the release: 8192 hidden, 64 layers, ...)
    architectures=["Grok1ForCausalLM"], model_type="hfa_grok2", vocab_size=128, hidden_size=64,
    intermediate_size=48, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_local_experts=8, num_experts_per_tok=2, residual_moe=True, rms_norm_eps=1e-5,
    max_position_embeddings=256, rope_theta=10000.0, rope_type="original", original_max_position_embeddings=64,
    scaling_factor=16.0, extrapolation_factor=1.0, attn_factor=1.0, beta_fast=8, beta_slow=1,
    attn_logit_softcapping=4.0, router_logit_softcapping=2.0, final_logit_softcapping=5.0, attn_temperature_len=8,
    embedding_multiplier_scale=8.0, output_multiplier_scale=0.5, sliding_window_size=-1, global_attn_every_n=1,
    torch_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=0)
# xai-org/grok-2 config.json as recorded (official-releases.md §11; [3P]); model_type there is "git".
HUB_GROK2 = dict(
    architectures=["Grok1ForCausalLM"], model_type="git", embedding_multiplier_scale=90.50966799187809,
    output_multiplier_scale=0.5, vocab_size=131072, hidden_size=8192, intermediate_size=32768,
    moe_intermediate_size=16384, max_position_embeddings=131072, num_experts_per_tok=2, num_local_experts=8,
    residual_moe=True, num_attention_heads=64, num_key_value_heads=8, num_hidden_layers=64, head_dim=128,
    rms_norm_eps=1e-05, final_logit_softcapping=50, attn_logit_softcapping=30.0, router_logit_softcapping=30.0,
    rope_theta=208533496, attn_temperature_len=1024, sliding_window_size=-1, global_attn_every_n=1,
    torch_dtype="bfloat16", rope_type="original", original_max_position_embeddings=8192, scaling_factor=16.0,
    extrapolation_factor=1.0, attn_factor=1.0, beta_fast=8, beta_slow=1)


def release_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's names and shapes (scaled so that every cap and the temperature bite)."""
    gen = torch.Generator().manual_seed(seed)
    h, hd, nh, nkv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    moe_i, mlp_i, e, v = cfg["moe_intermediate_size"], cfg["intermediate_size"], cfg["num_local_experts"], cfg["vocab_size"]

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=gen) * std

    def norm():
        return 1 + 0.1 * torch.randn(h, generator=gen)

    t = {"model.embed_tokens.weight": w(v, h, std=0.15), "model.norm.weight": norm(),
         "lm_head.weight": w(v, h, std=1.0)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t |= {p + "self_attn.q_proj.weight": w(nh * hd, h, std=0.25), p + "self_attn.k_proj.weight": w(nkv * hd, h, std=0.25),
              p + "self_attn.v_proj.weight": w(nkv * hd, h), p + "self_attn.o_proj.weight": w(h, nh * hd),
              p + "block_sparse_moe.gate.weight": w(e, h, std=0.5)}
        t |= {p + f"{name}.weight": norm() for name in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")}
        for x in range(e):
            q = p + f"block_sparse_moe.experts.{x}."
            t |= {q + "w1.weight": w(moe_i, h), q + "w3.weight": w(moe_i, h), q + "w2.weight": w(h, moe_i)}
        if cfg["residual_moe"]:
            t |= {p + "mlp.gate_proj.weight": w(mlp_i, h), p + "mlp.up_proj.weight": w(mlp_i, h),
                  p + "mlp.down_proj.weight": w(h, mlp_i)}
    return t


# ----------------------------------------------------------------------------------------------------------------
# The naive reference: one sequence, float64, loops. Nothing from hf_archs.
# ----------------------------------------------------------------------------------------------------------------
def _rmsnorm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _rope(x, pos, theta):
    """NeoX (half-split) rotation of one head vector at position `pos`."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = pos * theta ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + d // 2] * s
        out[i + d // 2] = x[i + d // 2] * c + x[i] * s
    return out


def naive_forward(t: dict[str, torch.Tensor], cfg: dict, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of one unpadded sequence at positions 0..len-1."""
    t = {k: v.double() for k, v in t.items()}
    eps, nh, nkv, hd = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    n_tok, group = len(ids), nh // nkv
    cap, rcap, fcap = cfg["attn_logit_softcapping"], cfg["router_logit_softcapping"], cfg["final_logit_softcapping"]
    temp_len = cfg["attn_temperature_len"]
    x = t["model.embed_tokens.weight"][ids] * cfg["embedding_multiplier_scale"]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        a = _rmsnorm(x, t[p + "pre_attn_norm.weight"], eps)
        q = (a @ t[p + "self_attn.q_proj.weight"].T).view(n_tok, nh, hd)
        k = (a @ t[p + "self_attn.k_proj.weight"].T).view(n_tok, nkv, hd)
        v = (a @ t[p + "self_attn.v_proj.weight"].T).view(n_tok, nkv, hd)
        q = torch.stack([torch.stack([_rope(q[i, h], i, cfg["rope_theta"]) for h in range(nh)]) for i in range(n_tok)])
        k = torch.stack([torch.stack([_rope(k[i, h], i, cfg["rope_theta"]) for h in range(nkv)]) for i in range(n_tok)])
        attn = torch.zeros(n_tok, nh, hd, dtype=torch.float64)
        for h in range(nh):
            for i in range(n_tok):
                s = torch.stack([q[i, h] @ k[j, h // group] for j in range(i + 1)]) / math.sqrt(hd)
                s = cap * torch.tanh(s / cap)  # soft-cap first ...
                if 0 < temp_len < i:
                    s = s * (math.log2(i) / math.log2(temp_len))  # ... then the temperature
                prob = torch.softmax(s, 0)
                attn[i, h] = sum(prob[j] * v[j, h // group] for j in range(i + 1))
        o = attn.reshape(n_tok, nh * hd) @ t[p + "self_attn.o_proj.weight"].T
        x = x + _rmsnorm(o, t[p + "post_attn_norm.weight"], eps)
        m = _rmsnorm(x, t[p + "pre_moe_norm.weight"], eps)
        moe = torch.zeros_like(m)
        for i in range(n_tok):
            logits = m[i] @ t[p + "block_sparse_moe.gate.weight"].T
            probs = torch.softmax(rcap * torch.tanh(logits / rcap), 0)  # all experts; no renormalisation below
            for e in sorted(range(len(probs)), key=lambda e: -probs[e])[:cfg["num_experts_per_tok"]]:
                ex = p + f"block_sparse_moe.experts.{e}."
                hid = _gelu_tanh(t[ex + "w1.weight"] @ m[i]) * (t[ex + "w3.weight"] @ m[i])
                moe[i] += probs[e] * (t[ex + "w2.weight"] @ hid)
        ffn = moe
        if cfg["residual_moe"]:
            dense = (_gelu_tanh(m @ t[p + "mlp.gate_proj.weight"].T) * (m @ t[p + "mlp.up_proj.weight"].T)
                     ) @ t[p + "mlp.down_proj.weight"].T
            ffn = (dense + moe) / math.sqrt(2)
        x = x + _rmsnorm(ffn, t[p + "post_moe_norm.weight"], eps)
    logits = _rmsnorm(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T * cfg["output_multiplier_scale"]
    return fcap * torch.tanh(logits / fcap)


def naive_greedy(t, cfg, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(naive_forward(t, cfg, ids)[-1].argmax()))
    return ids


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------
VARIANTS = {
    "release": {},
    # Grok-1's shape: no dense residual MLP; and no temperature.
    "no_residual_no_temperature": dict(residual_moe=False, attn_temperature_len=-1),
}


def write_release(root: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def grok(request, tmp_path_factory):
    cfg = dict(RELEASE, **VARIANTS[request.param])
    tensors = release_tensors(cfg)
    root = write_release(tmp_path_factory.mktemp("grok") / request.param, cfg, tensors)
    model = hf_archs.from_official(root)
    return cfg, tensors, model, root


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    cfg = copy.deepcopy(RELEASE)
    tensors = release_tensors(cfg)
    root = write_release(tmp_path_factory.mktemp("grok_release"), cfg, tensors)
    return cfg, tensors, root


def _ids(length: int, seed: int, vocab: int = RELEASE["vocab_size"]) -> torch.Tensor:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# Against the naive reference
# ----------------------------------------------------------------------------------------------------------------
def test_logits_match_the_naive_reference_at_every_position(grok):
    cfg, tensors, model, _ = grok
    assert type(model) is hf_archs.ARCHITECTURES["grok2"].causal_lm_class
    assert model.config._attn_implementation == "eager"
    ids = torch.stack([_ids(SEQ, 1), _ids(SEQ, 2)])
    with torch.no_grad():
        logits = model(ids).logits
    for row in range(2):
        ref = naive_forward(tensors, cfg, ids[row].tolist())
        # Semantic slips are far above 1e-5: the temperature before the cap gives ~1, positions off by one ~0.1.
        assert _rel(logits[row], ref) <= 1e-5
    # The final cap is really exercised by these weights.
    assert ref.abs().max() > 0.9 * cfg["final_logit_softcapping"]


def test_cached_decoding_equals_the_full_forward(grok):
    _, _, model, _ = grok
    ids = _ids(SEQ, 3)[None]
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps, cache = [out.logits], out.cache
        for i in range(5, SEQ):  # the temperature starts at position 9, past the prefill
            out = model(ids[:, i:i + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    assert _rel(torch.cat(steps, 1), full) <= 1e-5


def test_greedy_generation_matches_the_naive_reference(grok):
    cfg, tensors, model, _ = grok
    prompt = _ids(6, 4)
    with torch.no_grad():
        out = model.generate(prompt[None], max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out[0].tolist() == naive_greedy(tensors, cfg, prompt.tolist(), 12)


def test_left_padded_batch_equals_each_alone(grok):
    # Positions count each row's own tokens, so the temperature (absolute positions) matches the unpadded run.
    _, _, model, _ = grok
    long, short = _ids(SEQ, 5), _ids(SEQ - 9, 6)
    pad = SEQ - short.numel()
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        assert _rel(batch[0], model(long[None]).logits[0]) <= 1e-5
        assert _rel(batch[1, pad:], model(short[None]).logits[0]) <= 1e-5
        # generate() with left padding continues each row as it would alone.
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        both = model.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(both[1, pad:], model.generate(short[None], **kw)[0])


# ----------------------------------------------------------------------------------------------------------------
# The contract's other checks, for Grok
# ----------------------------------------------------------------------------------------------------------------
def test_sdpa_is_refused_clearly(release):
    _, _, root = release
    with pytest.raises(ValueError, match="HfaGrok2ForCausalLM does not support an attention implementation through "
                                         "torch.nn.functional.scaled_dot_product_attention"):
        hf_archs.from_official(root, attn_implementation="sdpa")
    model = hf_archs.from_official(root)
    with pytest.raises(ValueError, match="does not support an attention implementation"):
        model.set_attn_implementation("sdpa")
    model.config._attn_implementation = "sdpa"  # forced past the check: the layer still refuses
    with pytest.raises(NotImplementedError, match="runs eagerly only, not through 'sdpa_attention_forward'"):
        model(_ids(5, 0)[None])


def test_save_and_auto_load_round_trip_is_bit_exact(release, tmp_path):
    _, tensors, root = release
    model = hf_archs.from_official(root)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hfa_grok2"
    saved = load_file(next(tmp_path.glob("*.safetensors")))
    assert set(saved) == set(tensors)  # written back in the release layout: per-expert w1 / w2 / w3
    assert all(torch.equal(saved[k], tensors[k]) for k in tensors)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(model) and back.config._attn_implementation == "eager"
    sd_a, sd_b = model.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    ids = _ids(SEQ, 7)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_changes_weights(release, checkpointing):
    _, _, root = release
    model = hf_archs.from_official(root).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.stack([_ids(SEQ, 8), _ids(SEQ, 9)])
    out = model(ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert len(out.router_logits) == RELEASE["num_hidden_layers"]
    out.loss.backward()
    no_grad = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    opt.step()
    assert all(not torch.equal(p, before[k]) for k, p in model.named_parameters())


def test_bf16_model_routes_in_fp32(release):
    _, _, root = release
    model = hf_archs.from_official(root, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(_ids(SEQ, 10)[None], output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert all(r.dtype == torch.float32 for r in out.router_logits)  # the runtime keeps the gate in fp32


def test_bad_inputs_are_refused(release):
    _, _, root = release
    model = hf_archs.from_official(root)
    with pytest.raises(hf_archs.InputError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(hf_archs.InputError, match="token id 128, outside the vocabulary"):
        model(torch.tensor([[1, 2, 128]]))


def test_missing_expert_and_extra_tensors_are_refused_by_name(tmp_path):
    cfg = copy.deepcopy(RELEASE)
    tensors = release_tensors(cfg)
    tensors.pop("model.layers.1.block_sparse_moe.experts.5.w3.weight")
    tensors["model.layers.0.surprise.weight"] = torch.zeros(3)
    root = write_release(tmp_path, cfg, tensors)
    with pytest.raises(hf_archs.CheckpointError, match=r"missing tensors: .*model\.layers\.1\.block_sparse_moe\."
                                                       r"experts\.5\.w3\.weight.*unexpected tensors: .*surprise"):
        hf_archs.from_official(root)


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def _fields(cfg: dict) -> dict:
    return {k: v for k, v in copy.deepcopy(cfg).items() if k not in ("model_type", "architectures", "torch_dtype")}


def test_defaults_are_the_release_config():
    ours, hub = hf_archs.ARCHITECTURES["grok2"].config_class(), hf_archs.ARCHITECTURES["grok2"].config_class(
        **_fields(HUB_GROK2))
    for name, value in _fields(HUB_GROK2).items():
        assert getattr(ours, name) == value == getattr(hub, name), name
    assert ours.layer_types == ["full_attention"] * 64
    assert ours.rope_variants() == {"default": {"rope_type": "default", "rope_theta": 208533496.0}}
    assert not ours.tie_word_embeddings


def test_bad_configs_are_refused():
    cls = hf_archs.ARCHITECTURES["grok2"].config_class
    base = _fields(RELEASE)
    cases = [
        (dict(num_attention_heads=4, num_key_value_heads=3),
         r"num_attention_heads \(4\) is not divisible by num_key_value_heads \(3\)"),
        (dict(layer_types=["full_attention"] * 2), "layer_types has 2 entries but num_hidden_layers is 3"),
        (dict(layer_types=["full_attention"] * 2 + ["banana"]), r"layer_types has unknown entries \['banana'\]"),
        (dict(layer_types=["full_attention"] * 2 + ["sliding_attention"]),
         r"layer_types has unknown entries \['sliding_attention'\]"),
        (dict(rope_type="yarn"), "rope_type 'yarn' is not supported"),
        (dict(sliding_window_size=4096), "sliding_window_size=4096 is not supported"),
        (dict(attn_temperature_len=1), "attn_temperature_len must be an integer > 1"),
        (dict(attn_logit_softcapping=-1.0), "attn_logit_softcapping must be positive"),
        (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) must be in \[1, num_local_experts \(8\)\]"),
    ]
    for change, message in cases:
        with pytest.raises(hf_archs.ConfigError, match=message):
            cls(**dict(base, **change))
