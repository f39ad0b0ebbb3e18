"""DeepSeek V3 / Kimi K2 specifics: presets and layer plans from the official fields, K2 releases with K2's defaults,
the MTP layers in the release layout, and aux-loss-free bias updates that move the expert load toward balance."""

from __future__ import annotations

import math

import pytest
import torch
from cases import BY_NAME
from helpers import assert_bias_updates_balance, ours_from, randomize, reference, tokens

import hf_archs
from hf_archs.balancing import ExpertLoadTracker
from hf_archs.layers.moe import TopKRouter
from hf_archs.models.deepseek_v3 import HfaDeepseekV3Config
from hf_archs.models.deepseek_v3.modeling_deepseek_v3 import softmax_scale
from hf_archs.models.kimi_k2 import HfaKimiK2Config


def test_defaults_are_the_published_configs():
    ds, k2 = HfaDeepseekV3Config(), HfaKimiK2Config()
    assert (ds.hidden_size, ds.num_hidden_layers, ds.num_attention_heads, ds.n_routed_experts, ds.n_group,
            ds.topk_group, ds.first_k_dense_replace, ds.routed_scaling_factor, ds.q_lora_rank, ds.kv_lora_rank,
            ds.num_nextn_predict_layers, ds.vocab_size) == (7168, 61, 128, 256, 8, 4, 3, 2.5, 1536, 512, 1, 129280)
    assert ds.rope_parameters["rope_type"] == "yarn" and ds.rope_parameters["factor"] == 40.0
    assert ds.rope_parameters["rope_theta"] == 10000.0 and ds.rope_parameters["beta_fast"] == 32
    assert ds.mlp_layer_types[:4] == ["dense"] * 3 + ["sparse"] and ds.mlp_layer_type(61) == "sparse"
    assert (k2.num_attention_heads, k2.n_routed_experts, k2.n_group, k2.first_k_dense_replace,
            k2.routed_scaling_factor, k2.num_nextn_predict_layers, k2.vocab_size) == (64, 384, 1, 1, 2.827, 0, 163840)
    assert k2.rope_parameters["rope_theta"] == 50000.0 and k2.rope_parameters["beta_fast"] == 1.0
    assert k2.rope_parameters["factor"] == 32.0 and k2.mlp_layer_types[:2] == ["dense", "sparse"]
    # DeepSeek's own code reads moe_layer_freq too (transformers ignores it)
    c = HfaDeepseekV3Config(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert c.mlp_layer_types == ["dense", "dense", "sparse", "dense", "sparse", "dense"]


def test_softmax_scale_matches_transformers_yarn_mscale():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    c = HfaDeepseekV3Config()
    assert softmax_scale(c) == pytest.approx(yarn_apply_mscale(c.rope_parameters, 192**-0.5))
    assert softmax_scale(c) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)  # DeepSeek's model.py


@pytest.mark.parametrize("field, value, message", [
    ("n_group", 3, r"n_routed_experts \(256\) must be divisible by n_group \(3\)"),
    ("topk_group", 9, r"topk_group \(9\) must be in \[1, n_group \(8\)\]"),
    ("num_experts_per_tok", 200, r"num_experts_per_tok \(200\) must be in \[1, topk_group x experts per group"),
    ("scoring_func", "softmax", "scoring_func='softmax' with topk_method='noaux_tc' is not supported"),
    ("q_lora_rank", 0, "q_lora_rank must be a positive integer or null, got 0"),
    ("qk_rope_head_dim", 63, "qk_rope_head_dim must be even"),
    ("num_nextn_predict_layers", -1, r"num_nextn_predict_layers \(-1\) and mtp_loss_weight \(0\.1\) must be >= 0"),
    ("mtp_loss_weight", -0.5, r"num_nextn_predict_layers \(1\) and mtp_loss_weight \(-0\.5\) must be >= 0"),
])
def test_bad_values_are_refused_by_name(field, value, message):
    with pytest.raises(hf_archs.ConfigError, match=message):
        HfaDeepseekV3Config(**{field: value})


def test_kimi_k2_release_gets_kimi_k2_defaults():
    """A kimi_k2 config.json that leaves fields out gets K2's values for them, not DeepSeek V3's."""
    official = {"model_type": "kimi_k2", "architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 3,
                "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "n_routed_experts": 16,
                "num_attention_heads": 4, "num_key_value_heads": 4}
    config = hf_archs.config_from_official(official)
    assert type(config) is HfaKimiK2Config
    assert (config.routed_scaling_factor, config.n_group, config.first_k_dense_replace, config.vocab_size,
            config.rope_parameters["beta_fast"]) == (2.827, 1, 1, 163840, 1.0)
    assert type(hf_archs.config_from_official(dict(official, model_type="deepseek_v3"))) is HfaDeepseekV3Config


def test_without_mtp_layers_the_state_dict_is_transformers_own():
    case = BY_NAME["deepseek_v3"]
    official = dict(case.official_config(), num_nextn_predict_layers=0)
    ref = randomize(case.reference(official))
    model = hf_archs.ARCHITECTURES["deepseek_v3"].causal_lm_class(hf_archs.config_from_official(official))
    model.load_state_dict(ref.state_dict(), strict=True)
    assert len(model.model.layers) == official["num_hidden_layers"] and not model.mtp_layers


def test_mtp_layer_keys_are_the_release_keys():
    case = BY_NAME["deepseek_v3"]
    model = ours_from(case, reference(case))
    n = model.config.num_hidden_layers
    extra = {k.split(".", 3)[3] for k in model.state_dict() if k.startswith(f"model.layers.{n}.")}
    decoder = {k.split(".", 3)[3] for k in model.state_dict() if k.startswith(f"model.layers.{n - 1}.")}
    assert extra - decoder == {"enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                               "shared_head.norm.weight", "shared_head.head.weight"}
    assert decoder <= extra and "mlp.gate.e_score_correction_bias" in decoder


def test_bias_update_moves_expert_load_toward_balance():
    case = BY_NAME["deepseek_v3"]
    model = ours_from(case, reference(case)).train()
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]  # main MoE layers and the MTP layer's
    ids = tokens(case, batch=4, seed=5)
    assert_bias_updates_balance(model, routers, lambda: model(ids, labels=ids))


def test_expert_load_statistics_count_every_routed_token():
    case = BY_NAME["kimi_k2"]
    model = ours_from(case, reference(case))
    tracker = ExpertLoadTracker(model)
    ids = tokens(case, batch=2)
    with torch.no_grad():
        model(ids)
    k = model.config.num_experts_per_tok
    sparse = [i for i, t in enumerate(model.config.mlp_layer_types) if t == "sparse"]
    loads = tracker.load()
    for i in sparse:
        assert int(loads[f"model.layers.{i}.mlp.gate"].sum()) == ids.numel() * k
    mtp = f"model.layers.{model.config.num_hidden_layers}.mlp.gate"
    assert int(loads[mtp].sum()) == 0  # the MTP layer does not run in a plain forward
