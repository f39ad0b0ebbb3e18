"""LoRA targets for every registered architecture, routed experts included, and their registration with PEFT.

`lora_targets(model, attention=None, mlp=None, shared_experts=None, experts=False, router=False)` returns the
keyword arguments of `peft.LoraConfig` that adapt exactly the chosen groups of tensors, and logs them:

- attention:      the linear projections of every token mixer (softmax attention, MLA, linear attention)
- mlp:            dense feed-forward blocks
- shared_experts: the always-on experts of an MoE block (and their gates)
- experts:        the routed experts (fused 3-D `Experts`: adapted by `ExpertsLoraLayer`, per expert, without
                  building the experts x in x out delta; other fused layouts: PEFT's `target_parameters`)
- router:         the router's weight

Each group is True (required: ValueError naming the group when the model has none), None (wherever the model
has it) or False (left out). Groups are found from the module tree (the shared `Experts` / `TopKRouter` /
`Attention` classes and the published module names), so a newly registered architecture is covered with no table.

Importing this module registers, with PEFT:
- `ExpertsLoraLayer` as the LoRA layer of `Experts` (PEFT's custom-module mapping, installed on every
  `LoraConfig`, so `get_peft_model`, `PeftModel.from_pretrained`, `merge_and_unload` work unchanged);
- each `hfa_*` model type's default targets (attention + dense MLP + shared experts), so `LoraConfig()` with no
  targets works.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers.lora_experts import ExpertsLoraLayer, experts_lora_supported
from .layers.moe import Experts, TopKRouter

logger = logging.getLogger(__name__)

GROUPS = ("attention", "mlp", "shared_experts", "experts", "router")
# Path segments that name a token mixer or a feed-forward block in the releases' checkpoints.
ATTENTION_SEGMENTS = {"self_attn", "attn", "attention", "self_attention", "linear_attn", "mixer", "token_mixer",
                      "cross_attn"}
MLP_SEGMENTS = {"mlp", "feed_forward", "ffn", "ffw", "block_sparse_moe", "moe"}
ROUTER_NAMES = {"gate", "router", "gating"}
SHARED_SEGMENT = re.compile(r"shared_(expert|experts|mlp)(_gate)?")
HEAD_NAMES = {"lm_head", "head", "shared_head"}
EXPERTS_METHODS = ("grouped", "peft")


@dataclass
class TargetPlan:
    """What `lora_targets` selected: per group, the tensors that get adapters; and the PEFT arguments."""

    tensors: dict[str, list[str]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    modules: set[str] = field(default_factory=set)
    parameters: set[str] = field(default_factory=set)


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


def _is_fused_experts(name: str, module: nn.Module) -> bool:
    """The shared `Experts`, or another module named `experts` holding 3-D tensors (a release's own fused
    layout). Convolutions (3-D weights too) are not experts."""
    if isinstance(module, Experts):
        return True
    return (name.rpartition(".")[2] == "experts" and not isinstance(module, nn.modules.conv._ConvNd)
            and any(p.dim() == 3 for p in module.parameters(recurse=False)))


def _segments(name: str) -> list[str]:
    return name.split(".") if name else []


def classify(model: nn.Module, experts_method: str = "grouped") -> dict[str, list[tuple[str, str, list[str]]]]:
    """Every adaptable tensor of `model` by group: (kind, name, tensors) with kind "module" (a `target_modules`
    entry) or "parameter" (a `target_parameters` entry). Modules outside the five groups (embeddings, head,
    convolutions of linear-attention layers, norms) are not listed."""
    if experts_method not in EXPERTS_METHODS:
        raise ValueError(f"experts_method must be one of {EXPERTS_METHODS}, got {experts_method!r}")
    model = _base(model)
    modules = dict(model.named_modules())
    fused = {n for n, m in modules.items() if n and _is_fused_experts(n, m)}
    expert_lists = {n for n, m in modules.items() if n.rpartition(".")[2] == "experts" and isinstance(m, nn.ModuleList)}
    moe_blocks = {n.rpartition(".")[0] for n in fused | expert_lists}
    attention_modules = {n for n, m in modules.items()
                         if n and ("Attention" in type(m).__name__ or n.rpartition(".")[2] in ATTENTION_SEGMENTS)}
    # Multi-token-prediction layers serve only their own objective / speculative decoding: never adapted here.
    mtp = {n for n, m in modules.items() if n and ("MTP" in type(m).__name__ or n.rpartition(".")[2] == "mtp")}
    skipped = {n for n in modules if any(n == p or n.startswith(p + ".") for p in mtp)}
    fused -= skipped
    out: dict[str, list[tuple[str, str, list[str]]]] = {g: [] for g in GROUPS}

    for name in sorted(fused):
        module = modules[name]
        params = [p for p, t in module.named_parameters(recurse=False) if t.dim() == 3]
        if experts_method == "grouped" and experts_lora_supported(module):
            out["experts"].append(("module", name, [f"{name}.{p}" for p in ("gate_up_proj", "down_proj")]))
        else:
            out["experts"].extend(("parameter", f"{name}.{p}", [f"{name}.{p}"]) for p in params)

    for name, module in modules.items():
        if not name or name in fused or name in skipped:
            continue
        parent = name.rpartition(".")[0]
        segs = _segments(name)
        if isinstance(module, TopKRouter) or (parent in moe_blocks and segs[-1] in ROUTER_NAMES
                                              and not isinstance(module, nn.Linear)
                                              and getattr(module, "weight", None) is not None):
            out["router"].append(("parameter", f"{name}.weight", [f"{name}.weight"]))
            continue
        if not isinstance(module, nn.Linear) or any(s in HEAD_NAMES for s in segs):
            continue  # output heads (lm_head, MTP heads) are never in a group
        entry = ("module", name, [f"{name}.weight"])
        ancestors = [".".join(segs[:i]) for i in range(1, len(segs))]
        if any(a in expert_lists for a in ancestors):
            out["experts"].append(entry)
        elif any(SHARED_SEGMENT.fullmatch(s) for s in segs):
            out["shared_experts"].append(entry)
        elif parent in moe_blocks:
            # A linear layer directly in an MoE block: the router when it scores the experts.
            n_experts = next((getattr(modules[f], "num_experts", None) for f in fused if f.startswith(parent + ".")),
                             None)
            if segs[-1] in ROUTER_NAMES or (n_experts and module.out_features == n_experts):
                out["router"].append(entry)
        elif any(a in attention_modules for a in ancestors):
            out["attention"].append(entry)
        elif any(s in MLP_SEGMENTS for s in segs[:-1]):
            out["mlp"].append(entry)
    return out


def _generalize(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _suffix_list(selected: set[str], universe: list[str]) -> list[str] | None:
    """Shortest dotted suffixes (PEFT's list matching: `key == t or key.endswith("." + t)`) that match exactly
    `selected` among `universe`, or None."""
    suffixes = set()
    for pattern in sorted({_generalize(n) for n in selected}):
        parts = pattern.split(".")
        for i in range(len(parts) - 1, -1, -1):
            candidate = ".".join(parts[i:])
            if "*" in candidate:
                break
            hits = {n for n in universe if n == candidate or n.endswith("." + candidate)}
            if hits <= selected and hits:
                suffixes.add(candidate)
                break
        else:
            return None
    hits = {n for n in universe for s in suffixes if n == s or n.endswith("." + s)}
    return sorted(suffixes) if hits == selected else None


def _pattern_regex(selected: set[str]) -> str:
    """One regex for the names with every layer index generalised to \\d+."""
    return "(?:" + "|".join(sorted({re.escape(_generalize(n)).replace(r"\*", r"\d+") for n in selected})) + ")"


def _regex(selected: set[str], universe: list[str]) -> str | None:
    regex = _pattern_regex(selected)
    return regex if {n for n in universe if re.fullmatch(regex, n)} == selected else None


def compact_names(names: list[str]) -> list[str]:
    """`model.layers.{0..3}.self_attn.q_proj.weight`-style lines that list exactly `names`."""
    by_pattern: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for n in names:
        nums = tuple(int(x) for x in re.findall(r"(?<=\.)\d+(?=\.|$)", n))
        by_pattern[_generalize(n)].append(nums)
    lines = []
    for pattern, nums in sorted(by_pattern.items()):
        if nums and len(nums[0]) == 1:
            idx = sorted(n[0] for n in nums)
            spans, start = [], idx[0]
            for a, b in zip(idx, idx[1:] + [None]):
                if b != a + 1:
                    spans.append(str(start) if start == a else f"{start}..{a}")
                    start = b
            joined = ",".join(spans)
            lines.append(pattern.replace("*", joined if len(idx) == 1 else "{" + joined + "}", 1))
        else:
            lines.extend(sorted(n for n in names if _generalize(n) == pattern))
    return lines


def plan_targets(model: nn.Module, attention: bool | None = None, mlp: bool | None = None,
                 shared_experts: bool | None = None, experts: bool | None = False, router: bool | None = False,
                 experts_method: str = "grouped") -> TargetPlan:
    """The selection behind `lora_targets`, without logging (see there)."""
    choice = {"attention": attention, "mlp": mlp, "shared_experts": shared_experts, "experts": experts,
              "router": router}
    for group, value in choice.items():
        if value not in (True, False, None):
            raise TypeError(f"lora_targets: {group} must be True, None or False, got {value!r}")
    found = classify(model, experts_method)
    plan = TargetPlan()
    for group, value in choice.items():
        if value is True and not found[group]:
            raise ValueError(f"lora_targets: {group}=True but {type(_base(model)).__name__} has no {group} "
                             f"tensors to adapt (found: {', '.join(g for g in GROUPS if found[g]) or 'none'})")
        if value is False:
            continue
        for kind, name, tensors in found[group]:
            (plan.modules if kind == "module" else plan.parameters).add(name)
            plan.tensors[group].extend(tensors)
    if not plan.modules and not plan.parameters:
        raise ValueError("lora_targets: the chosen groups select no tensor of this model "
                         f"(available: {', '.join(g for g in GROUPS if found[g]) or 'none'})")
    return plan


def lora_targets(model: nn.Module, attention: bool | None = None, mlp: bool | None = None,
                 shared_experts: bool | None = None, experts: bool | None = False, router: bool | None = False,
                 *, experts_method: str = "grouped") -> dict[str, list[str] | str]:
    """Keyword arguments for `peft.LoraConfig` (`target_modules`, and `target_parameters` for fused tensors
    adapted PEFT's way) that adapt exactly the chosen groups; logs every tensor that gets an adapter.

    Each group: True = required (ValueError naming the group if the model has none), None = where present,
    False = left out. `experts_method="grouped"` adapts the shared fused `Experts` with `ExpertsLoraLayer`
    (x A_e B_e per expert); `"peft"` with PEFT's `target_parameters` (the full delta on every forward).
    """
    plan = plan_targets(model, attention, mlp, shared_experts, experts, router, experts_method)
    base = _base(model)
    kwargs: dict[str, list[str] | str] = {}
    if plan.modules:
        universe = [n for n, _ in base.named_modules()]
        kwargs["target_modules"] = (_suffix_list(plan.modules, universe) or _regex(plan.modules, universe)
                                    or sorted(plan.modules))
    else:
        kwargs["target_modules"] = []  # PEFT would otherwise fall back to its default targets
    if plan.parameters:
        universe = [n for n, _ in base.named_parameters()]
        kwargs["target_parameters"] = _suffix_list(plan.parameters, universe) or sorted(plan.parameters)
    total = sum(len(v) for v in plan.tensors.values())
    lines = [f"LoRA adapters on {total} tensors of {type(base).__name__}:"]
    for group in GROUPS:
        names = plan.tensors[group]
        how = " (per-expert low rank, no full delta)" if group == "experts" and any(
            n.rpartition(".")[0] in plan.modules for n in names) else ""
        lines.append(f"  {group}: {len(names)}{how}")
        lines.extend(f"    {line}" for line in compact_names(names))
    logger.info("\n".join(lines))
    return kwargs


def adapted_tensors(peft_model: nn.Module) -> list[str]:
    """Names (in the base model) of the tensors a PEFT model actually adapts, for checks and model cards."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    base = _base(peft_model)
    names = []
    for name, module in base.named_modules():
        if isinstance(module, ExpertsLoraLayer):
            names += [f"{name}.{p}" for p in ("gate_up_proj", "down_proj")]
        elif isinstance(module, ParamWrapper):
            clean = name.replace(".base_layer", "")
            names.append(f"{clean}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            names.append(f"{name}.weight")
    return sorted(set(names))


# ----------------------------------------------------------------------------------------------------------------
# Registration with PEFT
# ----------------------------------------------------------------------------------------------------------------
def _experts_lora_factory(target: nn.Module, adapter_name: str, config, parameter_name: str | None = None,
                          **kwargs) -> nn.Module | None:
    """PEFT custom-module entry for `Experts`: the whole module (targeted through `target_modules`) gets
    `ExpertsLoraLayer`; a single fused tensor (targeted through `target_parameters`) is left to PEFT's
    `ParamWrapper` (returning None passes it to PEFT's next dispatcher)."""
    if parameter_name is not None:
        return None
    return ExpertsLoraLayer(target, adapter_name, config=config, **kwargs)


def _default_target_regex(arch) -> str | None:
    from transformers.utils import logging as hf_logging

    from .tour import tiny_config

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a flagship's own config warnings (Llama 4's RoPE) are not news at import
    try:
        return _targets_of(arch, tiny_config)
    finally:
        hf_logging.set_verbosity(level)


def _targets_of(arch, tiny_config) -> str | None:
    try:
        with torch.device("meta"):  # names only: no memory, no initialisation
            model = arch.causal_lm_class(tiny_config(arch))
    except Exception:  # noqa: BLE001 - some constructors compute on their tensors; tiny is cheap on the CPU
        model = arch.causal_lm_class(tiny_config(arch))
    plan = plan_targets(model)
    # Name patterns, so any depth matches; they also reach MTP layers, which `lora_targets` leaves out.
    return _pattern_regex(plan.modules) if plan.modules else None


def register_with_peft() -> None:
    """Install `ExpertsLoraLayer` as PEFT's LoRA layer for `Experts` on every `LoraConfig`, and each `hfa_*`
    model type's default targets (attention, dense MLP, shared experts). Idempotent."""
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    from .registry import ARCHITECTURES

    if not getattr(LoraConfig.__post_init__, "_hf_archs", False):
        original = LoraConfig.__post_init__

        def __post_init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self._register_custom_module({Experts: _experts_lora_factory})

        __post_init__._hf_archs = True
        LoraConfig.__post_init__ = __post_init__
    for arch in ARCHITECTURES.values():
        if arch.model_type in defaults:
            continue
        try:
            regex = _default_target_regex(arch)
        except Exception as err:  # noqa: BLE001 - one architecture must not break the others
            logger.warning("hf_archs: no default LoRA targets for %s: %s", arch.name, err)
            continue
        if regex:
            defaults[arch.model_type] = regex


# ----------------------------------------------------------------------------------------------------------------
# Adapters trained PEFT's way (`target_parameters`) -> per-expert factors
# ----------------------------------------------------------------------------------------------------------------
def param_wrapper_factors(wrapper: nn.Module, adapter: str = "default", lora_a: torch.Tensor | None = None,
                          lora_b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-expert factors (A [E, r, in], B [E, out, r], nn.Linear orientation of the expert) equal to one
    PEFT `ParamWrapper` adapter on a fused `Experts` tensor: the delta PEFT adds is rebuilt exactly from them.
    `lora_a` / `lora_b` map other tensors laid out like the wrapper's weights (their gradients, say)."""
    experts = wrapper.get_base_layer()
    e = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight if lora_a is None else lora_a
    b = wrapper.lora_B[adapter].weight if lora_b is None else lora_b
    a = a.reshape(e, -1, a.shape[-1])  # [E, r, a_in]
    b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # [E, b_out, r]
    # PEFT's delta[e] is b_e @ a_e laid out as the tensor when it assumed [E, out, in] (no `is_transposed`),
    # else its transpose. Ours is B_e A_e in [out, in], transposed when the tensor is stored [E, in, out].
    if bool(getattr(experts, "transposed", False)) == bool(getattr(experts, "is_transposed", False)):
        return a.contiguous(), b.contiguous()
    return b.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous()


def copy_param_wrapper_adapter(source: nn.Module, target: nn.Module, adapter: str = "default") -> int:
    """Copy a PEFT-`target_parameters` experts adapter (on `source`) into the `ExpertsLoraLayer`s of `target`
    (same base model, adapted with `experts_method="grouped"`). Returns the number of tensors copied."""
    from peft.tuners.lora.layer import ParamWrapper

    layers = {n: m for n, m in _base(target).named_modules() if isinstance(m, ExpertsLoraLayer)}
    copied = 0
    for name, module in _base(source).named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        owner = name
        while owner.endswith(".base_layer"):
            owner = owner[: -len(".base_layer")]
        if owner not in layers:
            continue
        a, b = param_wrapper_factors(module, adapter)
        layer = layers[owner]
        with torch.no_grad():
            getattr(layer.lora_A[adapter], module.parameter_name).copy_(a)
            getattr(layer.lora_B[adapter], module.parameter_name).copy_(b)
        if layer.scaling[adapter] != module.scaling[adapter]:
            raise ValueError(f"{owner}: scaling differs ({layer.scaling[adapter]} vs {module.scaling[adapter]})")
        copied += 1
    return copied


try:
    register_with_peft()
except ImportError:  # pragma: no cover - peft not installed
    pass

__all__ = ["GROUPS", "TargetPlan", "adapted_tensors", "classify", "compact_names", "copy_param_wrapper_adapter",
           "lora_targets", "param_wrapper_factors", "plan_targets", "register_with_peft"]
