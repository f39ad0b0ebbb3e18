"""MiniMax-M2 checks the contract suite does not make: the release's config.json loads with its own field names
(rotary_dim as transformers converts it), variants the architecture does not implement are refused by name,
QK-norm really spans all heads, and the release / save layouts keep `block_sparse_moe` with per-expert w1/w3/w2."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import hf_archs
from cases import BY_NAME
from helpers import assert_bias_updates_balance, ours_from, reference

CASE = BY_NAME["minimax_m2"]
ARCH = hf_archs.ARCHITECTURES["minimax_m2"]

# MiniMaxAI/MiniMax-M2 config.json, less file keys (auto_map, quantization_config, transformers_version).
HUB = dict(attn_type_list=[1] * 62, head_dim=128, hidden_act="silu", hidden_size=3072, intermediate_size=1536,
           max_position_embeddings=196608, mtp_transformer_layers=1, num_attention_heads=48, num_experts_per_tok=8,
           num_hidden_layers=62, num_key_value_heads=8, num_local_experts=256, num_mtp_modules=3,
           qk_norm_type="per_layer", rms_norm_eps=1e-6, rope_theta=5000000, rotary_dim=64, scoring_func="sigmoid",
           shared_intermediate_size=0, tie_word_embeddings=False, use_cache=True, use_mtp=True, use_qk_norm=True,
           use_routing_bias=True, vocab_size=200064)


def test_release_config_loads_and_defaults_match_it():
    from transformers import MiniMaxM2Config

    hub = ARCH.config_class(**copy.deepcopy(HUB))
    ours = ARCH.config_class()
    theirs = MiniMaxM2Config(**copy.deepcopy(HUB))
    assert hub.rope_parameters == theirs.rope_parameters == {
        "rope_type": "default", "rope_theta": 5000000, "partial_rotary_factor": 0.5}
    for name in [k for k in HUB if k not in ("rope_theta", "use_mtp")] + ["rope_parameters", "layer_types"]:
        assert getattr(ours, name) == getattr(hub, name), name
    assert hub.mlp_layer_types == ["sparse"] * 62 and hub.num_experts == 256
    # `use_mtp` is not kept: transformers' generate would take it as "decode with MTP".
    assert "use_mtp" not in json.loads(hub.to_json_string())
    # What save_pretrained writes converts to itself.
    again = ARCH.config_class(**{k: v for k, v in json.loads(hub.to_json_string()).items() if k != "model_type"})
    assert again.rotary_dim == 64 and again.rope_parameters == hub.rope_parameters


@pytest.mark.parametrize("bad, match", [
    (dict(attn_type_list=[1, 0, 1, 1]), r"attn_type_list must hold 1 .* lightning attention \(0\) is not implemented"),
    (dict(scoring_func="softmax"), "scoring_func must be 'sigmoid', got 'softmax'"),
    (dict(qk_norm_type="per_head"), "qk_norm_type must be 'per_layer'"),
    (dict(shared_intermediate_size=64), r"shared_intermediate_size must be 0 .* got 64"),
    (dict(rotary_dim=30), r"rotary_dim \(30\) must be even, at most head_dim \(24\)"),
    (dict(mlp_layer_types=["sparse", "dense", "sparse", "sparse"]), "mlp_layer_types must be 'sparse'"),
])
def test_unsupported_variants_are_refused_by_name(bad, match):
    cfg = {k: v for k, v in CASE.official_config().items() if k not in ("model_type", "architectures")}
    with pytest.raises(hf_archs.ConfigError, match=match):
        ARCH.config_class(**dict(cfg, **bad))


def test_qk_norm_spans_all_heads():
    ours = ours_from(CASE, reference(CASE))
    attn = ours.model.layers[0].self_attn
    c = ours.config
    assert attn.q_norm.weight.shape == (c.num_attention_heads * c.head_dim,)
    assert attn.k_norm.weight.shape == (c.num_key_value_heads * c.head_dim,)
    q = torch.randn(2, 3, c.num_attention_heads * c.head_dim)
    # One RMS over heads x head_dim: scaling a single head changes every head's output.
    scaled = q.clone()
    scaled[..., : c.head_dim] *= 10
    a, b = attn.q_norm(q), attn.q_norm(scaled)
    assert not torch.allclose(a[..., c.head_dim:], b[..., c.head_dim:])
    rms = q.pow(2).mean(-1, keepdim=True).add(c.rms_norm_eps).rsqrt()
    torch.testing.assert_close(a, attn.q_norm.weight * (q * rms))


def test_variants_without_routing_bias_or_qk_norm_build():
    cfg = {k: v for k, v in CASE.official_config().items() if k not in ("model_type", "architectures")}
    model = ARCH.causal_lm_class(ARCH.config_class(**dict(cfg, use_routing_bias=False, use_qk_norm=False)))
    assert not any("e_score_correction_bias" in k or "_norm" in k.split(".")[-2] for k in model.state_dict())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_release_and_saved_layouts_keep_block_sparse_moe(tmp_path):
    ref = reference(CASE)
    (tmp_path / "release").mkdir()
    CASE.write_release(ref, CASE.official_config(), tmp_path / "release")
    with safe_open(str(tmp_path / "release" / "model.safetensors"), framework="pt") as f:
        release = set(f.keys())
    n = CASE.official["num_hidden_layers"]
    assert {"model.layers.0.block_sparse_moe.experts.7.w1.weight", "model.layers.0.block_sparse_moe.experts.7.w3.weight",
            "model.layers.0.block_sparse_moe.experts.7.w2.weight", "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.block_sparse_moe.e_score_correction_bias"} <= release
    assert {f"model.layers.{n + i}.eh_proj.weight" for i in range(3)} <= release  # the MTP modules are there
    assert not any(".mlp." in k for k in release)
    ours = ours_from(CASE, ref)
    ours.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert saved == {k for k in release if not k.startswith(tuple(f"model.layers.{n + i}." for i in range(3)))}


def test_bias_update_reaches_the_block_level_bias():
    """MiniMax-M2 keeps `e_score_correction_bias` on `block_sparse_moe`, beside its router: the aux-loss-free
    balancing step must find it there and move the load toward balance (nothing else changes)."""
    model = ours_from(CASE, reference(CASE)).train()
    blocks = [layer.block_sparse_moe for layer in model.model.layers]
    ids = torch.randint(3, CASE.official["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(5))
    assert_bias_updates_balance(model, blocks, lambda: model(ids))
