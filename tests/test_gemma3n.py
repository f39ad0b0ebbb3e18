"""Gemma 3n checks the contract suite does not make: the Hub configs convert as transformers converts them, KV-shared
layers hold no cache and no k/v weights, the Hub files' redundant k/v tensors of KV-shared layers are skipped,
Gaussian top-k sparsity against its definition, per-layer inputs of multimodal ids, the inputs_embeds path, a prefill
longer than the window, and bad configs refused by name."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import Gemma3nTextConfig
from transformers.cache_utils import DummyLayer

import hf_archs
from cases import BY_NAME, SEQ_LEN
from helpers import max_rel_diff, ours_from, reference, tokens
from hf_archs.models.gemma3n.modeling_gemma3n import SparseGatedMLP

CASE = BY_NAME["gemma3n"]
ARCH = hf_archs.ARCHITECTURES["gemma3n"]

# google/gemma-3n-E4B config.json, text_config (legacy RoPE names, two keys transformers ignores).
LAYER_TYPES_35 = (["sliding_attention"] * 4 + ["full_attention"]) * 7
HUB_E4B_TEXT = dict(
    model_type="gemma3n_text", activation_sparsity_pattern=[0.95] * 10 + [0.0] * 25, altup_active_idx=0,
    altup_coef_clip=120.0, altup_correct_scale=True, altup_lr_multiplier=1.0, altup_num_inputs=4,
    attention_bias=False, attention_dropout=0.0, final_logit_softcapping=30.0, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", hidden_size=2048, hidden_size_per_layer_input=256,
    initializer_range=0.02, intermediate_size=[16384] * 35, laurel_rank=64, layer_types=LAYER_TYPES_35,
    max_position_embeddings=32768, num_attention_heads=8, num_hidden_layers=35, num_key_value_heads=2,
    num_kv_shared_layers=15, query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_local_base_freq=10000.0,
    rope_scaling=None, rope_theta=1000000.0, sliding_window=512, vocab_size=262400,
    vocab_size_per_layer_input=262144)
# google/gemma-3n-E2B: the converter's E2B variant (official-releases.md, section 4).
HUB_E2B_TEXT = dict(HUB_E4B_TEXT, intermediate_size=[8192] * 30, num_hidden_layers=30,
                    activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20, num_kv_shared_layers=10,
                    layer_types=LAYER_TYPES_35[:30])


def _cfg(text: dict) -> dict:
    return {k: v for k, v in copy.deepcopy(text).items() if k != "model_type"}


@pytest.mark.parametrize("text", [HUB_E4B_TEXT, HUB_E2B_TEXT, CASE.official["text_config"]],
                         ids=["e4b", "e2b", "tiny"])
def test_hub_configs_convert_as_transformers_does(text):
    ours, theirs = ARCH.config_class(**_cfg(text)), Gemma3nTextConfig(**_cfg(text))
    for name in ("layer_types", "rope_parameters", "intermediate_size", "activation_sparsity_pattern",
                 "kv_sharing_modes", "num_kv_shared_layers", "sliding_window", "head_dim", "hidden_activation",
                 "rms_norm_eps", "final_logit_softcapping", "tie_word_embeddings", "vocab_size_per_layer_input",
                 "hidden_size_per_layer_input", "altup_num_inputs", "altup_active_idx", "altup_coef_clip",
                 "altup_correct_scale", "laurel_rank"):
        assert getattr(ours, name) == getattr(theirs, name), name
    again = ARCH.config_class(**{k: v for k, v in json.loads(ours.to_json_string()).items() if k != "model_type"})
    for name in ("layer_types", "rope_parameters", "intermediate_size", "activation_sparsity_pattern"):
        assert getattr(again, name) == getattr(ours, name), name


def test_defaults_are_gemma_3n_e4b():
    ours, hub = ARCH.config_class(), ARCH.config_class(**_cfg(HUB_E4B_TEXT))
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "sliding_window", "vocab_size", "vocab_size_per_layer_input",
                 "hidden_size_per_layer_input", "num_kv_shared_layers", "laurel_rank", "altup_num_inputs", "activation_sparsity_pattern",
                 "layer_types", "rope_parameters", "final_logit_softcapping", "max_position_embeddings"):
        assert getattr(ours, name) == getattr(hub, name), name
    assert [i for i, t in enumerate(ours.layer_types) if t == "full_attention"] == list(range(4, 35, 5))
    assert ours.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    # Layers 20-34 reuse layer 18's (sliding) or 19's (full) keys and values.
    assert ours.kv_sources() == {i: 19 if i % 5 == 4 else 18 for i in range(20, 35)}


def test_kv_shared_layers_have_no_kv_weights_and_no_cache():
    ours = ours_from(CASE, reference(CASE))
    cfg = ours.config
    shared = sorted(cfg.kv_sources())
    assert shared == [5, 6, 7, 8, 9] and cfg.kv_sources() == {5: 3, 6: 3, 7: 3, 8: 3, 9: 4}
    keys = ours.state_dict().keys()
    for i in range(cfg.num_hidden_layers):
        has = {n for n in ("k_proj", "v_proj", "k_norm") if f"model.layers.{i}.self_attn.{n}.weight" in keys}
        assert has == (set() if i in shared else {"k_proj", "v_proj", "k_norm"}), i
    with torch.no_grad():
        cache = ours(tokens(CASE), use_cache=True).cache
    for i, layer in enumerate(cache.layers):
        if i in shared:
            assert isinstance(layer, DummyLayer) and layer.keys is None, i
        else:
            assert layer.keys.shape[-2] == (SEQ_LEN if cfg.layer_types[i] == "full_attention"
                                            else cfg.sliding_window - 1), i


def test_prefill_longer_than_the_window_then_decode():
    # The shared sliding layers read the source's keys as its cache update returns them: the whole prefill, then
    # the window; both must agree with a full forward and with transformers step by step.
    ref = reference(CASE)
    ours = ours_from(CASE, ref)
    ids = tokens(CASE)
    prefill = 2 * ours.config.sliding_window - 3
    with torch.no_grad():
        full = ours(ids).logits
        steps = {}
        for name, m in (("ours", ours), ("ref", ref)):
            out = m(ids[:, :prefill], use_cache=True)
            logits = [out.logits]
            for t in range(prefill, SEQ_LEN):
                out = m(ids[:, t:t + 1], cache=out.cache, use_cache=True)
                logits.append(out.logits)
            steps[name] = torch.cat(logits, dim=1)
    assert torch.equal(steps["ours"], steps["ref"])
    assert max_rel_diff(steps["ours"], full) <= 1e-5


def _keys(root) -> list[str]:
    with safe_open(str(next(root.glob("*.safetensors"))), framework="pt") as f:
        return list(f.keys())


def test_release_towers_and_redundant_kv_tensors_are_skipped(tmp_path):
    # 25 layers, the last 5 KV-shared: layers 20-24 are shared, as in E2B (20-29) and E4B (20-34), whose Hub files
    # still carry k_proj / v_proj / k_norm for them (written before transformers stopped building them).
    official = CASE.official_config()
    text = official["text_config"]
    text.update(num_hidden_layers=25, intermediate_size=64, activation_sparsity_pattern=[0.95] + [0.0] * 24,
                num_kv_shared_layers=5)
    text.pop("layer_types")
    case = copy.deepcopy(CASE)
    case.official = official
    ref = reference(case)
    c = ref.config
    kv, hd, h = c.num_key_value_heads, c.head_dim, c.hidden_size
    gen = torch.Generator().manual_seed(3)
    stale = {}
    for i in range(20, 25):
        p = f"model.language_model.layers.{i}.self_attn."
        stale |= {p + "k_proj.weight": torch.randn(kv * hd, h, generator=gen),
                  p + "v_proj.weight": torch.randn(kv * hd, h, generator=gen), p + "k_norm.weight": torch.ones(hd)}
    root = tmp_path / "hub"
    root.mkdir()
    case.write_release(ref, official, root, extra=stale)
    keys = _keys(root)
    for prefix in ("model.audio_tower.", "model.vision_tower.timm_model.", "model.embed_audio.", "model.embed_vision.",
                   "model.language_model.layers.24.self_attn.k_proj."):
        assert any(k.startswith(prefix) for k in keys), prefix
    model = hf_archs.from_official(root, attn_implementation="eager")
    ids = tokens(case, batch=2)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5

    # The rule names the official layers only: a k/v tensor for a KV-shared layer elsewhere is still refused.
    root = tmp_path / "tiny"
    root.mkdir()
    ref = reference(CASE)
    CASE.write_release(ref, CASE.official_config(), root,
                       extra={"model.language_model.layers.7.self_attn.k_proj.weight": torch.zeros(32, 64)})
    with pytest.raises(hf_archs.CheckpointError,
                       match=r"unexpected tensors: .*model\.language_model\.layers\.7\.self_attn\.k_proj\.weight"):
        hf_archs.from_official(root)


def test_gaussian_topk_sparsity_matches_its_definition():
    torch.manual_seed(0)
    mlp = SparseGatedMLP(32, 4096, "gelu_pytorch_tanh", activation_sparsity=0.95)
    x = torch.randn(3, 5, 32)
    gate = x @ mlp.gate_proj.weight.T
    # Phi^-1(0.95) = 1.6448536...; the std is the population one.
    cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * 1.6448536269514722
    kept = (gate - cutoff).clamp(min=0)
    gelu = torch.nn.functional.gelu
    expected = (gelu(kept, approximate="tanh") * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    with torch.no_grad():
        assert max_rel_diff(mlp(x), expected) <= 1e-5
        active = (mlp.gaussian_topk(gate) > 0).float().mean()
    assert 0.03 < active < 0.07, active  # about 5% of 4096 Gaussian units survive
    dense = SparseGatedMLP(32, 64, "gelu_pytorch_tanh", activation_sparsity=0.0)
    with torch.no_grad():
        g = x @ dense.gate_proj.weight.T
        plain = (gelu(g, approximate="tanh") * (x @ dense.up_proj.weight.T)) @ dense.down_proj.weight.T
        assert max_rel_diff(dense(x), plain) <= 1e-6


def test_ids_past_the_per_layer_table_read_row_0():
    ours = ours_from(CASE, reference(CASE))
    v = ours.config.vocab_size_per_layer_input
    assert v < ours.config.vocab_size
    ids = torch.tensor([[v, v + 5, ours.config.vocab_size - 1, 0, 7]])
    with torch.no_grad():
        per_layer = ours.model.get_per_layer_inputs(ids)
    assert per_layer.shape == (1, 5, ours.config.num_hidden_layers, ours.config.hidden_size_per_layer_input)
    for t in range(3):
        assert torch.equal(per_layer[0, t], per_layer[0, 3])
    assert not torch.equal(per_layer[0, 4], per_layer[0, 3])


def test_inputs_embeds_path_matches_transformers():
    ref = reference(CASE)
    ours = ours_from(CASE, ref)
    ids = tokens(CASE, batch=2)
    with torch.no_grad():
        embeds = ours.model.embed_tokens(ids)
        a, b = ours(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits
        assert torch.equal(a, b)
        assert not torch.equal(a, ours(ids).logits)  # without per-layer table inputs: a different model input


def _base_text() -> dict:
    return _cfg(CASE.official["text_config"])


@pytest.mark.parametrize("change, match", [
    (dict(intermediate_size=[64] * 9), r"intermediate_size has 9 entries but num_hidden_layers is 10"),
    (dict(intermediate_size=[64] * 9 + [0]), r"intermediate_size\[9\] must be a positive integer, got 0"),
    (dict(activation_sparsity_pattern=[0.95] * 3), r"activation_sparsity_pattern has 3 entries but num_hidden_layers"),
    (dict(activation_sparsity_pattern=[1.0] + [0.0] * 9), r"activation_sparsity_pattern\[0\] must be in \[0, 1\)"),
    (dict(num_kv_shared_layers=10), r"num_kv_shared_layers must be in \[0, num_hidden_layers = 10\), got 10"),
    (dict(num_kv_shared_layers=6, layer_types=["sliding_attention"] * 4 + ["full_attention"] * 6),
     r"num_kv_shared_layers \(6\): the KV-shared layers 4-9 include \['full_attention'\] layers, but no earlier"),
    (dict(altup_active_idx=4), r"altup_active_idx \(4\) must be in \[0, altup_num_inputs = 4\)"),
    (dict(laurel_rank=0), r"laurel_rank must be a positive integer, got 0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), r"rope_parameters must be keyed by layer"),
])
def test_bad_gemma3n_configs_are_refused(change, match):
    with pytest.raises(hf_archs.ConfigError, match=match):
        ARCH.config_class(**dict(_base_text(), **change))


def test_tiny_case_has_every_layer_feature():
    cfg = hf_archs.config_from_official(CASE.official_config())
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert cfg.sliding_window < SEQ_LEN
    assert {cfg.layer_types[i] for i in cfg.kv_sources()} == {"sliding_attention", "full_attention"}
    assert 0 < sum(s > 0 for s in cfg.activation_sparsity_pattern) < cfg.num_hidden_layers
    assert len(set(cfg.intermediate_size)) > 1
    assert cfg.vocab_size_per_layer_input < cfg.vocab_size
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] != cfg.rope_parameters["full_attention"]["rope_theta"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_give_the_reference_runtime_bits(dtype):
    """Gemma 3n's norms (torch's fused kernel on the CPU) equal the written-out `x * pow(ms + eps, -0.5)` form."""
    from hf_archs.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm, _unit_rms_norm

    torch.manual_seed(0)
    norm = Gemma3nRMSNorm(256, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(256) * 0.5 + 1.0)
    norm.to(dtype)
    for scale in (1e-3, 1.0, 40.0):
        x = (torch.randn(3, 7, 256) * scale).to(dtype)
        h = x.float() * torch.pow(x.float().pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
        assert torch.equal(norm(x), (h * norm.weight.float()).to(dtype))
        assert torch.equal(_unit_rms_norm(x, 1e-6), h.to(dtype))
