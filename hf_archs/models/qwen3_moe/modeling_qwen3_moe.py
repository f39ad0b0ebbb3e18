"""Qwen3-MoE: Qwen3's attention (per-head QK-norm before RoPE) with routed experts.

How it differs from Qwen3 (dense):
- The MLP of each sparse layer (`mlp_layer_types`) is a softmax top-k router (`mlp.gate`, renormalised over the
  k chosen when `norm_topk_prob`) and `num_experts` SwiGLU experts; no shared expert.
- Experts are fused 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]);
  the release's per-expert `mlp.experts.<e>.{gate,up,down}_proj.weight` are fused at load and written back on
  save.
Reference: https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_moe/modeling_qwen3_moe.py
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import Attention, GatedMLP, RMSNorm
from ...layers.moe import Experts, TopKRouter, act_glu, softmax_topk
from ...modeling_base import HfaPreTrainedModel, MoECausalLM, MoEDecoderModel
from .configuration_qwen3_moe import HfaQwen3MoeConfig


class Qwen3MoeSparseBlock(nn.Module):
    def __init__(self, config: HfaQwen3MoeConfig) -> None:
        super().__init__()
        c = config
        self.gate = TopKRouter(c.hidden_size, c.num_experts, functools.partial(
            softmax_topk, top_k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob))
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size, glu=act_glu(c.hidden_act))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        _, weights, indices = self.gate(x)
        return self.experts(x, indices, weights).reshape(b, t, h)


class Qwen3MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaQwen3MoeConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = Attention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, bias=c.attention_bias, dropout=c.attention_dropout,
            q_norm=RMSNorm(c.head_dim, eps=c.rms_norm_eps), k_norm=RMSNorm(c.head_dim, eps=c.rms_norm_eps),
            sliding_window=c.sliding_window if c.layer_types[layer_idx] == "sliding_attention" else None)
        self.mlp = (Qwen3MoeSparseBlock(c) if c.mlp_layer_types[layer_idx] == "sparse"
                    else GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act))
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.mlp(self.post_attention_layernorm(h))


class HfaQwen3MoePreTrainedModel(HfaPreTrainedModel):
    config_class = HfaQwen3MoeConfig
    _no_split_modules = ["Qwen3MoeDecoderLayer"]
    _can_record_outputs = {"hidden_states": Qwen3MoeDecoderLayer,
                           "router_logits": OutputRecorder(TopKRouter, index=0)}


class HfaQwen3MoeModel(HfaQwen3MoePreTrainedModel, MoEDecoderModel):
    layer_class = Qwen3MoeDecoderLayer


class HfaQwen3MoeForCausalLM(HfaQwen3MoePreTrainedModel, MoECausalLM):
    base_model_class = HfaQwen3MoeModel


__all__ = ["HfaQwen3MoeForCausalLM", "HfaQwen3MoeModel", "HfaQwen3MoePreTrainedModel", "Qwen3MoeDecoderLayer"]
