"""Kimi K2 (Instruct, 0905, Thinking) configuration: DeepSeek V3's fields with the defaults of
moonshotai/Kimi-K2-Instruct's config.json.

Source: https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json (`model_type: kimi_k2`,
`architectures: ["DeepseekV3ForCausalLM"]`). K2-Instruct-0905 and K2-Thinking change only rope_scaling.factor (64)
and max_position_embeddings (262144), which their config.json files carry. Differences from DeepSeek V3: 64 heads,
384 experts, one dense layer, no expert groups (n_group 1), routed_scaling_factor 2.827, rope_theta 50000, YaRN x32
with beta_fast 1 (DeepSeek: 32), no MTP layer, vocab 163840. The release keeps DeepSeek's training fields with
DeepSeek's values (`aux_loss_alpha: 0.001`, `seq_aux: true`, `topk_method: noaux_tc`), so training with
`output_router_logits=True` uses DeepSeek's sequence-wise balance loss here too (see the DeepSeek V3 config).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from ..deepseek_v3.configuration_deepseek_v3 import HfaDeepseekV3Config

KIMI_K2_YARN = {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


@strict
class HfaKimiK2Config(HfaDeepseekV3Config):
    model_type = "hfa_kimi_k2"

    vocab_size: int = 163840
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 64
    n_routed_experts: int | None = 384
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float | int = 2.827
    num_nextn_predict_layers: int = 0
    max_position_embeddings: int = 131072
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585

    default_theta = 50000.0
    default_rope_scaling = KIMI_K2_YARN


__all__ = ["KIMI_K2_YARN", "HfaKimiK2Config"]
