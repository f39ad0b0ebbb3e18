"""Mistral Small 3.1 (24B, 2503) text decoder: a plain pre-norm GQA decoder (Llama's block, no QK-norm, no bias).

It differs from a plain pre-norm GQA decoder only in layout and shapes, nothing in the math:
- The release is multimodal (`model_type: "mistral3"`, `Mistral3ForConditionalGeneration`): the text weights sit
  under a multimodal prefix (`language_model.model.*` / `language_model.lm_head.weight` in the Hub files,
  `model.language_model.*` in transformers v5's in-memory layout) beside a Pixtral `vision_tower.*` and a
  `multi_modal_projector.*`. The registry declares the renames and the skip rules; this file holds the decoder only.
- `head_dim` is explicit: 32 heads * 128 = 4096 != hidden_size 5120, so q_proj is [4096, 5120], o_proj [5120, 4096].
- rope_theta 1e9, no sliding window in the release. When a config sets `sliding_window`, transformers' Mistral
  applies it to every layer, and so does this one (`layer_types` is all "sliding_attention").
Source: https://huggingface.co/mistralai/Mistral-Small-3.1-24B-Base-2503
Reference: https://github.com/huggingface/transformers/blob/main/src/transformers/models/mistral/modeling_mistral.py
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ...layers import Attention, GatedMLP, RMSNorm
from ...modeling_base import CausalLM, DecoderModel, HfaPreTrainedModel
from .configuration_mistral3 import HfaMistral3Config


class Mistral3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaMistral3Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = Attention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, dropout=c.attention_dropout,
            sliding_window=c.sliding_window if c.layer_types[layer_idx] == "sliding_attention" else None)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        # pre-norm: x + attn(norm(x)), then h + mlp(norm(h))
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.mlp(self.post_attention_layernorm(h))


class HfaMistral3PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaMistral3Config
    _no_split_modules = ["Mistral3DecoderLayer"]
    _can_record_outputs = {"hidden_states": Mistral3DecoderLayer}


class HfaMistral3Model(HfaMistral3PreTrainedModel, DecoderModel):
    layer_class = Mistral3DecoderLayer


class HfaMistral3ForCausalLM(HfaMistral3PreTrainedModel, CausalLM):
    base_model_class = HfaMistral3Model


__all__ = ["HfaMistral3ForCausalLM", "HfaMistral3Model", "HfaMistral3PreTrainedModel", "Mistral3DecoderLayer"]
