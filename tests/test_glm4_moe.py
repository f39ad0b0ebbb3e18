"""GLM-4.5 checks the contract suite does not make: the release's config numbers (head_dim read, never derived),
the dense-prefix plan, the Air variant (no QK-norm) against transformers, the router rule on hand-made logits,
the slot-order combine against a plain loop, and the release layout the tiny release really has."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open

import hf_archs
from cases import BY_NAME, Case
from case_glm4_moe import OFFICIAL, reference as glm_reference, to_ours
from helpers import max_rel_diff, ours_from, reference, tokens
from hf_archs.layers.moe import Experts
from hf_archs.models.glm4_moe.modeling_glm4_moe import sigmoid_grouped_topk_in_slot_order

CASE = BY_NAME["glm4_moe"]
ARCH = hf_archs.ARCHITECTURES["glm4_moe"]

# zai-org/GLM-4.5 and zai-org/GLM-4.5-Air config.json (architecture fields).
GLM_4_5 = dict(hidden_size=5120, num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
               intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160, num_experts_per_tok=8,
               n_shared_experts=1, first_k_dense_replace=3, n_group=1, topk_group=1, routed_scaling_factor=2.5,
               norm_topk_prob=True, partial_rotary_factor=0.5, rope_theta=1_000_000, use_qk_norm=True,
               attention_bias=True, rms_norm_eps=1e-5, vocab_size=151552, num_nextn_predict_layers=1,
               tie_word_embeddings=False, max_position_embeddings=131072, pad_token_id=151329,
               eos_token_id=[151329, 151336, 151338])
GLM_4_5_AIR = dict(GLM_4_5, hidden_size=4096, num_hidden_layers=46, intermediate_size=10944,
                   moe_intermediate_size=1408, n_routed_experts=128, first_k_dense_replace=1,
                   routed_scaling_factor=1.0, use_qk_norm=False)


def test_defaults_are_glm_4_5():
    ours, hub = ARCH.config_class(), ARCH.config_class(**copy.deepcopy(GLM_4_5))
    for name in list(GLM_4_5) + ["rope_parameters", "layer_types", "mlp_layer_types"]:
        if name not in ("rope_theta", "partial_rotary_factor"):
            assert getattr(ours, name) == getattr(hub, name), name
    assert ours.rope_parameters == {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}
    assert ours.mlp_layer_types == ["dense"] * 3 + ["sparse"] * 89


def test_air_head_dim_is_read_not_derived():
    from transformers import Glm4MoeConfig

    air = ARCH.config_class(**copy.deepcopy(GLM_4_5_AIR))
    assert air.head_dim == 128  # transformers derives 4096 // 96 = 42 when the field is absent
    assert Glm4MoeConfig(hidden_size=4096, num_attention_heads=96).hidden_size // 96 == 42
    assert air.mlp_layer_types == ["dense"] + ["sparse"] * 45
    model = ARCH.causal_lm_class(ARCH.config_class(**dict(
        copy.deepcopy(GLM_4_5_AIR), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, intermediate_size=32, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2,
        vocab_size=64, pad_token_id=0)))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 24, 64) and attn.q_norm is None and attn.q_proj.bias is not None
    assert attn.o_proj.bias is None


def test_air_variant_matches_transformers():
    # No QK-norm, one dense layer, no routed scaling: GLM-4.5-Air's switches on the tiny shape.
    air = dict(OFFICIAL, use_qk_norm=False, routed_scaling_factor=1.0)
    case = Case(name="glm4_moe", official=air, reference=glm_reference, to_ours=to_ours(air))
    ref = reference(case)
    ours = ours_from(case, ref)
    ids = tokens(case, batch=2)
    with torch.no_grad():
        assert max_rel_diff(ours(ids).logits, ref(ids).logits) <= 1e-5


def test_router_rule_on_hand_made_logits():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0, 3.0, -2.0, 0.5, 1.5]])
    scores = logits.sigmoid()
    # The bias changes the choice (expert 5 joins, expert 1 leaves: unbiased it would be 4, 1, 7) but not the
    # weights.
    bias = torch.tensor([0.0, -2.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0])
    w, i = sigmoid_grouped_topk_in_slot_order(logits, top_k=3, correction_bias=bias, routed_scaling_factor=2.5)
    assert sorted(i[0].tolist()) == [4, 5, 7]
    expected = scores[0, i[0]] / scores[0, i[0]].sum() * 2.5
    torch.testing.assert_close(w[0], expected)
    # Groups of 4: group 0 = experts 0-3 (best two 2.0 + 1.0), group 1 = 4-7 (3.0 + 1.5) wins with topk_group 1.
    w, i = sigmoid_grouped_topk_in_slot_order(logits, top_k=2, n_group=2, topk_group=1, norm_topk_prob=False)
    assert sorted(i[0].tolist()) == [4, 7]
    torch.testing.assert_close(w[0], scores[0, i[0]])


def test_slot_sum_experts_equal_a_plain_loop():
    # fp32 here; bf16 rounding is checked bit for bit against transformers by the contract suite.
    torch.manual_seed(0)
    fused = Experts(6, 16, 8, slot_sum=True)
    x = torch.randn(10, 16)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(10)])
    w = torch.rand(10, 3)
    plain = torch.stack([sum(fused.expert_forward(x[t:t + 1], int(e))[0] * w[t, s] for s, e in enumerate(idx[t]))
                         for t in range(10)])
    torch.testing.assert_close(fused(x, idx, w), plain, rtol=1e-6, atol=1e-7)
    base = Experts(6, 16, 8)  # the shared block: the same sums in another order
    base.load_state_dict(fused.state_dict())
    torch.testing.assert_close(base(x, idx, w), fused(x, idx, w), rtol=1e-6, atol=1e-7)


def test_release_layout_has_per_expert_tensors_and_the_mtp_layer(tmp_path):
    CASE.write_release(reference(CASE), CASE.official_config(), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    n = OFFICIAL["num_hidden_layers"]
    assert {"model.layers.1.mlp.experts.15.gate_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= keys
    assert not any("gate_up_proj" in k for k in keys)
    assert {f"model.layers.{n}.eh_proj.weight", f"model.layers.{n}.mlp.experts.0.up_proj.weight"} <= keys
    # The MTP layer loads where the release keeps it, after the decoder's layers.
    model = hf_archs.from_official(tmp_path)
    assert len(model.model.layers) == n + 1 and len(model.mtp_layers) == 1
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert torch.equal(model.model.layers[n].eh_proj.weight, f.get_tensor(f"model.layers.{n}.eh_proj.weight"))


def test_mtp_speculative_decoding_equals_greedy_and_trains():
    ours = ours_from(CASE, reference(CASE))
    ids = tokens(CASE, batch=2, length=6)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, use_mtp=True, **kw), ours.generate(ids, **kw))
    ours.train()
    out = ours(tokens(CASE, batch=2), labels=tokens(CASE, batch=2))
    assert torch.isfinite(out.mtp_loss) and out.mtp_loss > 0
    out.loss.backward()
    assert ours.model.layers[-1].eh_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, match", [
    (dict(n_group=3), r"n_routed_experts \(16\) must split into n_group \(3\)"),
    (dict(n_group=2, topk_group=3), r"topk_group \(3\) must be between 1 and n_group \(2\)"),
    (dict(num_experts_per_tok=17), r"num_experts_per_tok \(17\) exceeds n_routed_experts \(16\)"),
    (dict(mlp_layer_types=["dense", "sparse"]), "mlp_layer_types must list 'sparse' or 'dense' for each of the 4"),
    (dict(partial_rotary_factor=0.25, head_dim=20), r"partial_rotary_factor \(0.25\) must rotate an even number"),
])
def test_bad_configs_name_the_field(bad, match):
    cfg = {k: v for k, v in CASE.official_config().items() if k not in ("model_type", "architectures")}
    with pytest.raises(hf_archs.ConfigError, match=match):
        ARCH.config_class(**dict(cfg, **bad))
