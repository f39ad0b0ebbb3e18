"""LoRA targets for every registered architecture, LoRA on fused experts without the full delta (against PEFT's
`target_parameters` way), merging, and adapters saved and reloaded with PEFT's own API."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hf_archs
from hf_archs.layers import GatedMLP
from hf_archs.layers.lora_experts import ExpertsLoraLayer
from hf_archs.layers.moe import Experts, TopKRouter, act_glu, clamped_swiglu, softmax_topk
from hf_archs.lora import adapted_tensors, copy_param_wrapper_adapter, lora_targets, param_wrapper_factors, plan_targets
from hf_archs.tour import tiny_config

ARCHS = sorted(hf_archs.ARCHITECTURES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a loaded 2-core machine OpenMP's spinning threads
    make every op 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    """fp32 agreement up to summation order: relative, with an absolute floor scaled to the tensor."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=msg)


def tiny_or_reason(name: str, seed: int = 0, **overrides) -> nn.Module | str:
    arch = hf_archs.ARCHITECTURES[name]
    try:
        config = tiny_config(arch, **overrides)
    except Exception as err:  # noqa: BLE001 - an architecture still being written; its own tests report it
        return f"tiny_config({name}) does not build: {err}"
    torch.manual_seed(seed)
    return arch.causal_lm_class(config).eval()


def tiny(name: str, seed: int = 0, **overrides) -> nn.Module:
    model = tiny_or_reason(name, seed, **overrides)
    assert not isinstance(model, str), model  # every registered architecture builds a tiny model
    return model


def has_experts(model: nn.Module | str) -> bool:
    return not isinstance(model, str) and any(isinstance(m, Experts) for m in model.modules())


MOE_ARCHS = [n for n in ARCHS if has_experts(tiny_or_reason(n))]
needs_moe_arch = pytest.mark.skipif(not MOE_ARCHS, reason="no MoE architecture with the shared Experts is "
                                                          "registered yet; the hand-built MoE block covers it")


class MoEBlock(nn.Module):
    """A routed-experts block built from the shared blocks (router, fused experts, shared expert)."""

    def __init__(self, hidden: int, inter: int, experts: int = 8, k: int = 2, transposed: bool = False,
                 interleaved: bool = False, bias: bool = False) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden, experts, functools.partial(softmax_topk, top_k=k, norm_topk_prob=True))
        self.experts = Experts(experts, hidden, inter, glu=clamped_swiglu() if interleaved else act_glu("silu"),
                               transposed=transposed, interleaved=interleaved, bias=bias)
        if bias:
            nn.init.normal_(self.experts.gate_up_proj_bias, std=0.1)
            nn.init.normal_(self.experts.down_proj_bias, std=0.1)
        self.shared_expert = GatedMLP(hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        _, weights, indices = self.gate(flat)
        return (self.experts(flat, indices, weights) + self.shared_expert(flat)).reshape(x.shape)


def hand_built_moe(seed: int = 0, **block) -> nn.Module:
    """Tiny Qwen3 whose layers 1.. carry an MoE block: dense, shared and routed experts, router, all present."""
    model = tiny("qwen3", seed=seed, num_hidden_layers=3)  # qwen3's config takes any depth
    torch.manual_seed(seed + 1)
    for layer in model.model.layers[1:]:
        layer.mlp = MoEBlock(64, 48, **block)
    return model.eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def perturb_adapters(model: nn.Module, seed: int = 3) -> None:
    """Non-zero B so an adapter changes the logits (PEFT initialises B to zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


# ----------------------------------------------------------------------------------------------------------------
# lora_targets
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_targets_adapt_exactly_the_planned_tensors(name, caplog):
    model = tiny(name)
    groups = dict(attention=True, mlp=None, shared_experts=None, experts=None, router=None)
    plan = plan_targets(model, **groups)
    with caplog.at_level(logging.INFO, logger="hf_archs.lora"):
        kwargs = lora_targets(model, **groups)
    planned = sorted(t for ts in plan.tensors.values() for t in ts)
    peft_model = get_peft_model(model, LoraConfig(r=2, **kwargs))
    assert adapted_tensors(peft_model) == planned
    # The log names every one of them (layer indices compacted as {a..b}).
    log = caplog.text
    assert f"LoRA adapters on {len(planned)} tensors" in log
    for t in planned:
        layer_free = t.split(".layers.")[-1].split(".", 1)[-1]
        assert layer_free in log, t
    assert plan.tensors["attention"]
    assert not any(".lm_head" in t or "embed" in t for t in planned)


@pytest.mark.parametrize("name", ARCHS)
def test_groups_true_none_false(name):
    model = tiny(name)
    plan = plan_targets(model)
    moe = has_experts(model)
    assert bool(plan.tensors["attention"])
    assert not plan.tensors["experts"] and not plan.tensors["router"]  # experts=False, router=False by default
    for group in ("experts", "router"):
        if not moe:
            with pytest.raises(ValueError, match=group):
                lora_targets(model, **{group: True})
        else:
            assert plan_targets(model, **{group: True}).tensors[group]
    none_mlp = plan_targets(model, mlp=None).tensors["mlp"]
    if not none_mlp:  # every layer is MoE: mlp=True must fail, naming the group
        with pytest.raises(ValueError, match="mlp"):
            lora_targets(model, mlp=True)
    assert not plan_targets(model, mlp=False).tensors["mlp"]
    with pytest.raises(TypeError, match="attention"):
        lora_targets(model, attention="yes")
    with pytest.raises(ValueError, match="no tensor"):
        lora_targets(model, attention=False, mlp=False, shared_experts=False, experts=False, router=False)


def test_every_group_found_on_a_full_moe_model():
    model = hand_built_moe()
    plan = plan_targets(model, True, True, True, True, True)
    t = plan.tensors
    assert sorted(t["mlp"]) == [f"model.layers.0.mlp.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj")]
    assert sorted(t["shared_experts"]) == sorted(f"model.layers.{i}.mlp.shared_expert.{p}.weight"
                                                 for i in (1, 2) for p in ("gate_proj", "up_proj", "down_proj"))
    assert sorted(t["experts"]) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in (1, 2)
                                          for p in ("gate_up_proj", "down_proj"))
    assert sorted(t["router"]) == ["model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight"]
    assert len(t["attention"]) == 12
    kwargs = lora_targets(model, True, True, True, True, True)
    peft_model = get_peft_model(model, LoraConfig(r=2, **kwargs))
    assert adapted_tensors(peft_model) == sorted(x for v in t.values() for x in v)
    experts = peft_model.base_model.model.model.layers[1].mlp.experts
    assert isinstance(experts, ExpertsLoraLayer)
    # PEFT's own `all-linear` would have skipped the routed experts: the reason this helper exists.
    plain = get_peft_model(hand_built_moe(), LoraConfig(r=2, target_modules="all-linear"))
    assert not any(".experts." in n and "lora_" in n for n, _ in plain.named_parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_peft_default_targets_registered(name):
    model = tiny(name)
    peft_model = get_peft_model(model, LoraConfig(r=2))  # no targets: PEFT's mapping for hfa_* model types
    expected = sorted(x for v in plan_targets(tiny(name)).tensors.values() for x in v)
    # PEFT's defaults are name patterns (any depth): they also reach multi-token-prediction layers, which
    # lora_targets leaves out (they serve only their own objective).
    mtp = tuple(f"{n}." for n, m in tiny(name).named_modules() if "MTP" in type(m).__name__)
    assert [t for t in adapted_tensors(peft_model) if not t.startswith(mtp)] == expected


# ----------------------------------------------------------------------------------------------------------------
# Experts LoRA vs PEFT's target_parameters
# ----------------------------------------------------------------------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (views excluded), forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:  # not a view
                self.largest = max(self.largest, t.numel())
        return out


def _two_ways(block_kwargs: dict, r: int = 4):
    """The same MoE model adapted on attention + experts PEFT's way and ours, with equal adapter weights."""
    peft_way = hand_built_moe(**block_kwargs)
    ours = hand_built_moe(**block_kwargs)
    ours.load_state_dict(peft_way.state_dict())
    cfg = dict(r=r, lora_alpha=8, init_lora_weights=False)
    peft_way = get_peft_model(peft_way, LoraConfig(**cfg, **lora_targets(peft_way, experts=True,
                                                                         experts_method="peft")))
    ours = get_peft_model(ours, LoraConfig(**cfg, **lora_targets(ours, experts=True)))
    # Same dense adapters, and the experts' factors mapped from PEFT's layout.
    dense = {k: v for k, v in peft_way.state_dict().items() if "lora_" in k and ".experts." not in k}
    missing = ours.load_state_dict(dense, strict=False)
    assert not missing.unexpected_keys
    assert copy_param_wrapper_adapter(peft_way, ours) == 4  # 2 layers x (gate_up_proj, down_proj)
    return peft_way, ours


@pytest.mark.parametrize("block_kwargs", [{}, {"transposed": True}, {"transposed": True, "interleaved": True,
                                                                      "bias": True}],
                         ids=["rows-out", "transposed", "gpt-oss-layout"])
def test_experts_lora_equals_peft_target_parameters_outputs_and_gradients(block_kwargs):
    peft_way, ours = _two_ways(block_kwargs)
    x = ids()
    out_p = peft_way(x).logits
    out_o = ours(x).logits
    torch.testing.assert_close(out_o, out_p, rtol=1e-5, atol=1e-5)
    assert (out_p - tiny_base_logits(block_kwargs, x)).abs().max() > 1e-3  # the adapters do change the output
    out_p.square().mean().backward()
    out_o.square().mean().backward()
    grads_p = dict(peft_way.named_parameters())
    grads_o = dict(ours.named_parameters())
    for name, p in grads_o.items():
        if "lora_" in name and ".experts." not in name:
            close(p.grad, grads_p[name].grad, msg=name)
    from peft.tuners.lora.layer import ParamWrapper

    checked = 0
    for name, module in peft_way.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name.replace(".base_layer", "")
            layer = ours.base_model.model.get_submodule(owner)
            ga, gb = param_wrapper_factors(module, lora_a=module.lora_A["default"].weight.grad,
                                           lora_b=module.lora_B["default"].weight.grad)
            close(getattr(layer.lora_A["default"], module.parameter_name).grad, ga, f"{owner}.{module.parameter_name} A")
            close(getattr(layer.lora_B["default"], module.parameter_name).grad, gb, f"{owner}.{module.parameter_name} B")
            checked += 1
    assert checked == 4


def tiny_base_logits(block_kwargs, x):
    with torch.no_grad():
        return hand_built_moe(**block_kwargs)(x).logits


def test_experts_lora_never_builds_the_full_delta():
    peft_way, ours = _two_ways({})
    experts = ours.base_model.model.model.layers[1].mlp.experts.get_base_layer()
    full = experts.gate_up_proj.numel()  # E x 2I x H = 8 x 96 x 64
    assert full > 512 * 64  # larger than the embedding / head gradients, the next largest tensors
    x = ids(batch=1, length=8)
    sizes = {}
    for name, model in (("peft", peft_way), ("ours", ours)):
        with LargestTensor() as rec:
            model(x).logits.sum().backward()
        sizes[name] = rec.largest
    assert sizes["peft"] >= full  # PEFT's parametrization materialises W + delta for every expert
    assert sizes["ours"] < full, sizes


# ----------------------------------------------------------------------------------------------------------------
# Merge, save, reload
# ----------------------------------------------------------------------------------------------------------------
def _roundtrip(make_base, kwargs_fn, tmp_path):
    base = make_base()
    x = ids()
    with torch.no_grad():
        plain = base(x).logits
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kwargs_fn(base)))
    perturb_adapters(peft_model)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(x).logits
    assert (adapted - plain).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model.unload()(x).logits, plain, rtol=1e-6, atol=1e-6)
    # A freshly built base (same weights), the adapter loaded with PEFT's own API.
    reloaded = PeftModel.from_pretrained(make_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, adapted, rtol=1e-5, atol=1e-5)
        with reloaded.disable_adapter():
            torch.testing.assert_close(reloaded(x).logits, plain, rtol=1e-6, atol=1e-6)
        merged = reloaded.merge_and_unload()
        assert not any("lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_merge_save_reload_every_architecture(name, tmp_path):
    moe = has_experts(tiny(name))
    _roundtrip(lambda: tiny(name), lambda m: lora_targets(m, experts=True if moe else False), tmp_path)


@pytest.mark.parametrize("block_kwargs", [{}, {"transposed": True, "interleaved": True, "bias": True}])
def test_merge_save_reload_hand_built_moe(block_kwargs, tmp_path):
    _roundtrip(lambda: hand_built_moe(**block_kwargs),
               lambda m: lora_targets(m, True, True, True, True, True), tmp_path)
    saved = __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.1.mlp.experts.lora_A.gate_up_proj"].shape == (8, 4, 64)
    assert saved["base_model.model.model.layers.1.mlp.experts.lora_B.down_proj"].shape == (8, 64, 4)


@needs_moe_arch
@pytest.mark.parametrize("name", MOE_ARCHS or ["none"])
def test_registered_moe_experts_lora_equals_peft_way(name):
    peft_way = tiny(name)
    ours = tiny(name)
    cfg = dict(r=4, lora_alpha=8, init_lora_weights=False)
    peft_way = get_peft_model(peft_way, LoraConfig(**cfg, **lora_targets(peft_way, attention=False, experts=True,
                                                                         experts_method="peft")))
    ours = get_peft_model(ours, LoraConfig(**cfg, **lora_targets(ours, attention=False, experts=True)))
    dense = {k: v for k, v in peft_way.state_dict().items() if "lora_" in k and ".experts." not in k}
    ours.load_state_dict(dense, strict=False)
    assert copy_param_wrapper_adapter(peft_way, ours) > 0
    x = ids()
    out_p, out_o = peft_way(x).logits, ours(x).logits
    torch.testing.assert_close(out_o, out_p, rtol=1e-5, atol=1e-5)
    out_p.sum().backward()
    out_o.sum().backward()
    from peft.tuners.lora.layer import ParamWrapper

    for mname, module in peft_way.base_model.model.named_modules():
        if isinstance(module, ParamWrapper):
            layer = ours.base_model.model.get_submodule(mname.replace(".base_layer", ""))
            ga, gb = param_wrapper_factors(module, lora_a=module.lora_A["default"].weight.grad,
                                           lora_b=module.lora_B["default"].weight.grad)
            close(getattr(layer.lora_A["default"], module.parameter_name).grad, ga, f"{mname} A")
            close(getattr(layer.lora_B["default"], module.parameter_name).grad, gb, f"{mname} B")
