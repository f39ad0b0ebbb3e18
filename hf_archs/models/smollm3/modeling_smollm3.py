"""SmolLM3: a Llama-layout pre-norm GQA decoder in which some layers use no positional encoding (NoPE).

How it differs from a plain pre-norm GQA decoder (Llama):
- NoPE layers: `no_rope_layers[i] == 1` means layer i applies RoPE, 0 means it does not (every 4th layer of the
  3B, `no_rope_layer_interval: 4`). The config's `layer_uses_rope` reads the list, so the shared loop hands those
  layers `position_embeddings=None` and `Attention` skips the rotation.
- `head_dim` is not a config field: hidden_size // num_attention_heads.
- Tied input / output embeddings in the 3B release (no `lm_head.weight` in the checkpoint).
- Optional sliding window (off in the release); when on, transformers makes the NoPE layers the sliding ones.
- `mlp_bias` is a separate switch from `attention_bias` (both off in the release).
References: https://huggingface.co/blog/smollm3 ,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/smollm3/modeling_smollm3.py
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ...layers import Attention, GatedMLP, RMSNorm
from ...modeling_base import CausalLM, DecoderModel, HfaPreTrainedModel
from .configuration_smollm3 import HfaSmolLM3Config


class SmolLM3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaSmolLM3Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        sliding = c.use_sliding_window and c.layer_types[layer_idx] == "sliding_attention"
        self.self_attn = Attention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, bias=c.attention_bias, dropout=c.attention_dropout,
            sliding_window=c.sliding_window if sliding else None)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act, bias=c.mlp_bias)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        # Pre-norm; `position_embeddings` is None on NoPE layers.
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.mlp(self.post_attention_layernorm(h))


class HfaSmolLM3PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaSmolLM3Config
    _no_split_modules = ["SmolLM3DecoderLayer"]
    _can_record_outputs = {"hidden_states": SmolLM3DecoderLayer}


class HfaSmolLM3Model(HfaSmolLM3PreTrainedModel, DecoderModel):
    layer_class = SmolLM3DecoderLayer


class HfaSmolLM3ForCausalLM(HfaSmolLM3PreTrainedModel, CausalLM):
    base_model_class = HfaSmolLM3Model


__all__ = ["SmolLM3DecoderLayer", "HfaSmolLM3ForCausalLM", "HfaSmolLM3Model", "HfaSmolLM3PreTrainedModel"]
