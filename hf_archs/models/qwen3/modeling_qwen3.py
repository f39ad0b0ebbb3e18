"""Qwen3 (dense): a pre-norm GQA decoder with per-head QK-norm.

How it differs from a plain pre-norm GQA decoder (Llama):
- RMSNorm over each head's q and k (weights `[head_dim]`), before RoPE.
- `head_dim` is explicit and need not equal hidden_size / num_attention_heads (0.6B: 1024 / 16 heads, head_dim 128).
- No q/k/v bias (Qwen2 had one). Optional sliding-window layers from `max_window_layers` on.
Reference: https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3/modeling_qwen3.py
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ...layers import Attention, GatedMLP, RMSNorm
from ...modeling_base import CausalLM, DecoderModel, HfaPreTrainedModel
from .configuration_qwen3 import HfaQwen3Config


class Qwen3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaQwen3Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = Attention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, bias=c.attention_bias, dropout=c.attention_dropout,
            q_norm=RMSNorm(c.head_dim, eps=c.rms_norm_eps), k_norm=RMSNorm(c.head_dim, eps=c.rms_norm_eps),
            sliding_window=c.sliding_window if c.layer_types[layer_idx] == "sliding_attention" else None)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.mlp(self.post_attention_layernorm(h))


class HfaQwen3PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaQwen3Config
    _no_split_modules = ["Qwen3DecoderLayer"]
    _can_record_outputs = {"hidden_states": Qwen3DecoderLayer}


class HfaQwen3Model(HfaQwen3PreTrainedModel, DecoderModel):
    layer_class = Qwen3DecoderLayer


class HfaQwen3ForCausalLM(HfaQwen3PreTrainedModel, CausalLM):
    base_model_class = HfaQwen3Model


__all__ = ["Qwen3DecoderLayer", "HfaQwen3ForCausalLM", "HfaQwen3Model", "HfaQwen3PreTrainedModel"]
