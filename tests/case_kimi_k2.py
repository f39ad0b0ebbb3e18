"""Kimi K2: a tiny `kimi_k2` release (the DeepSeek V3 architecture; q-LoRA off, no expert groups, two dense layers,
YaRN with beta_fast 1, one MTP layer) laid out as Moonshot ships it: config.json says `model_type: kimi_k2` with
`architectures: ["DeepseekV3ForCausalLM"]` and the custom-code auto_map, tensors in DeepSeek's names.

The reference is transformers' DeepseekV3ForCausalLM built from the same fields (its "DeepSeek V3 twin":
transformers itself cannot load a kimi_k2 release). Source: https://huggingface.co/moonshotai/Kimi-K2-Instruct
"""

from __future__ import annotations

from case_deepseek_v3 import AUTO_MAP, reference, to_ours, write_release
from cases import TINY, Case

OFFICIAL = dict(
    TINY, model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], auto_map=AUTO_MAP,
    num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
    n_group=1, topk_group=1, routed_scaling_factor=2.827, first_k_dense_replace=2, moe_layer_freq=1,
    norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001, seq_aux=True,
    q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    rope_theta=50000.0, rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 1.0},
    num_nextn_predict_layers=1, hidden_act="silu", attention_bias=False, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2)

CASE = Case(name="kimi_k2", official=OFFICIAL, reference=reference, write_release=write_release,
            to_ours=to_ours(OFFICIAL))
