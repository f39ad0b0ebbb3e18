"""DeepSeek V3 / R1: multi-head latent attention, a sigmoid group-limited router with a balancing bias, a shared
expert, dense first layers, and multi-token-prediction layers after the decoder.

How it differs from a plain pre-norm GQA decoder (Qwen3-MoE, say):
- Attention is MLA (`layers/mla.py`): the cache holds a 512-wide latent and one 64-wide RoPE key per token and
  layer; decoding absorbs kv_b_proj into the query and output, so the cached history is never decompressed.
  RoPE pairs are interleaved in the checkpoint; YaRN scales the softmax by mscale(factor, mscale_all_dim)^2.
- MoE layers from `first_k_dense_replace` on (every `moe_layer_freq`-th): sigmoid scores, chosen with
  `e_score_correction_bias` among the `topk_group` best of `n_group` groups, weighted by the unbiased scores,
  renormalised and times `routed_scaling_factor`; plus `n_shared_experts` always-on experts (one SwiGLU).
- `num_nextn_predict_layers` MTP layers follow the decoder in `model.layers` (the release's layout, layer 61 of 61):
  each is a full MoE decoder layer plus enorm / hnorm / eh_proj / embed_tokens / shared_head (`hf_archs/mtp.py`);
  the decoder loop runs only the first `num_hidden_layers`.
- Aux-loss-free balancing: `hf_archs.balancing.update_correction_bias` moves each router's bias toward balance.
References: https://github.com/deepseek-ai/DeepSeek-V3/blob/main/inference/model.py,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/deepseek_v3/modeling_deepseek_v3.py
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import GatedMLP, RMSNorm, RotaryEmbedding
from ...layers.mla import MultiHeadLatentAttention
from ...layers.moe import Experts, TopKRouter, act_glu, sigmoid_grouped_topk
from ...modeling_base import (
    HfaPreTrainedModel,
    MoECausalLM,
    MoEDecoderModel,
)
from ...mtp import MTPDecoderLayers, MTPLayer, MultiTokenPrediction
from .configuration_deepseek_v3 import HfaDeepseekV3Config


def softmax_scale(config: HfaDeepseekV3Config) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN (transformers' `yarn_apply_mscale`, the release's own code)."""
    scale = config.qk_head_dim**-0.5
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" and rope.get("mscale_all_dim"):
        factor = rope["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * rope["mscale_all_dim"] * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


class DeepseekV3MoE(nn.Module):
    """Routed experts plus the shared experts, both on the same input."""

    def __init__(self, config: HfaDeepseekV3Config) -> None:
        super().__init__()
        c = config
        self.gate = TopKRouter(c.hidden_size, c.n_routed_experts, functools.partial(
            sigmoid_grouped_topk, top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
            norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor),
            correction_bias=True, fp32=True)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
                               glu=act_glu(c.hidden_act), slot_sum=True)
        self.shared_experts = (GatedMLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, act=c.hidden_act)
                               if c.n_shared_experts else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        _, weights, indices = self.gate(x)
        out = self.experts(x, indices, weights).reshape(b, t, h)
        return out if self.shared_experts is None else out + self.shared_experts(hidden_states)


class DeepseekV3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaDeepseekV3Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = MultiHeadLatentAttention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, kv_lora_rank=c.kv_lora_rank,
            qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
            layer_idx=layer_idx, q_lora_rank=c.q_lora_rank, scaling=softmax_scale(c), bias=c.attention_bias,
            interleaved_rope=c.rope_interleave, dropout=c.attention_dropout)
        self.mlp = (DeepseekV3MoE(c) if c.mlp_layer_type(layer_idx) == "sparse"
                    else GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act))
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV3MTPLayer(MTPLayer, DeepseekV3DecoderLayer):
    """DeepSeek's MTP module `model.layers.{num_hidden_layers + k}`: a decoder layer (MoE by the release's rule)
    plus enorm / hnorm / eh_proj and stored copies of the embedding and head."""

    def __init__(self, config: HfaDeepseekV3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.add_mtp_modules(config.hidden_size, config.vocab_size,
                             norm=lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
                             padding_idx=config.pad_token_id)


def expert_conversions() -> list:
    """Per-expert <-> fused conversions anchored on `mlp.experts` (transformers' own patterns for DeepSeek V3).

    Local fix: `registry.expert_conversions` builds `.experts.down_proj`, a regex whose `.` also matches the `_` of
    `mlp.shared_experts.down_proj`, so `save_pretrained` rewrites the shared expert's down_proj as a routed one.
    """
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
    )

    return [WeightConverter(source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
                            target_patterns="mlp.experts.gate_up_proj",
                            operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
            WeightConverter(source_patterns="mlp.experts.*.down_proj.weight", target_patterns="mlp.experts.down_proj",
                            operations=[MergeModulelist(dim=0)])]


class HfaDeepseekV3PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaDeepseekV3Config
    _no_split_modules = ["DeepseekV3DecoderLayer", "DeepseekV3MTPLayer"]
    _can_record_outputs = {"hidden_states": DeepseekV3DecoderLayer,
                           "router_logits": OutputRecorder(TopKRouter, index=0)}
    # The release stores the balancing bias in fp32 (DeepSeek's `Gate.bias`); bf16 would round it to 2^-9 at 0.5.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        from transformers.conversion_mapping import (
            register_checkpoint_conversion_mapping,
        )

        # Replaces the mapping `register_all` made from the registry (see `expert_conversions`); idempotent.
        register_checkpoint_conversion_mapping(config.model_type, expert_conversions(), overwrite=True)


class HfaDeepseekV3Model(HfaDeepseekV3PreTrainedModel, MTPDecoderLayers, MoEDecoderModel):
    layer_class = DeepseekV3DecoderLayer
    mtp_layer_class = DeepseekV3MTPLayer

    def make_rotary(self, config, rope_parameters: dict) -> RotaryEmbedding:
        # Rotate-half cos/sin over the RoPE part of each head; MLA de-interleaves q_rot / k_rot before applying them.
        return RotaryEmbedding(config.qk_rope_head_dim, rope_parameters)


class HfaDeepseekV3ForCausalLM(HfaDeepseekV3PreTrainedModel, MultiTokenPrediction, MoECausalLM):
    base_model_class = HfaDeepseekV3Model


__all__ = ["DeepseekV3DecoderLayer", "DeepseekV3MTPLayer", "HfaDeepseekV3ForCausalLM", "HfaDeepseekV3Model",
           "HfaDeepseekV3PreTrainedModel"]
