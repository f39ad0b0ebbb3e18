"""OLMo 2: a GQA decoder with post-norm residual branches and QK-norm over all heads.

How it differs from a plain pre-norm GQA decoder (Llama):
- Post-norm on each branch, and no pre-norm at all (no `input_layernorm`):
  `h = x + post_attention_layernorm(attn(x))`, `out = h + post_feedforward_layernorm(mlp(h))`.
  The final `norm` after the last layer stays.
- QK-norm across heads: one RMSNorm over the whole projected q (`[heads * head_dim]` weight) and k
  (`[kv_heads * head_dim]`), before the split into heads and before RoPE (Qwen3 normalises each head instead).
- RMSNorm multiplies the weight in fp32 and casts after (Llama casts first), and RoPE rotates in fp32: the
  same as Llama in fp32, not in bf16.
- `head_dim` is not a config field: hidden_size // num_attention_heads. Untied head.
References: https://arxiv.org/abs/2501.00656 (2 OLMo 2 Furious),
https://github.com/huggingface/transformers/blob/main/src/transformers/models/olmo2/modeling_olmo2.py
"""

from __future__ import annotations

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ...layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding
from ...modeling_base import CausalLM, DecoderModel, HfaPreTrainedModel
from .configuration_olmo2 import HfaOlmo2Config


def _norm(dim: int, eps: float) -> RMSNorm:
    # OLMo's order: the weight multiplies the fp32 normalised vector before the cast back (bf16 parity).
    return RMSNorm(dim, eps=eps, weight_in_fp32=True)


class Olmo2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaOlmo2Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = Attention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, bias=c.attention_bias, dropout=c.attention_dropout,
            q_norm=_norm(c.num_attention_heads * c.head_dim, eps=c.rms_norm_eps),
            k_norm=_norm(c.num_key_value_heads * c.head_dim, eps=c.rms_norm_eps),
            qk_norm_across_heads=True)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act)
        self.post_attention_layernorm = _norm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_feedforward_layernorm = _norm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        # Post-norm: each branch's output is normalised before it joins the residual; the input is not.
        h = hidden_states + self.post_attention_layernorm(
            self.self_attn(hidden_states, position_embeddings, attention_mask, cache, **kwargs))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class HfaOlmo2PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaOlmo2Config
    _no_split_modules = ["Olmo2DecoderLayer"]
    _can_record_outputs = {"hidden_states": Olmo2DecoderLayer}


class HfaOlmo2Model(HfaOlmo2PreTrainedModel, DecoderModel):
    layer_class = Olmo2DecoderLayer

    def make_norm(self, config: HfaOlmo2Config) -> torch.nn.Module:
        return _norm(config.hidden_size, eps=config.rms_norm_eps)

    def make_rotary(self, config: HfaOlmo2Config, rope_parameters: dict) -> RotaryEmbedding:
        # OLMo rotates q and k in fp32 and casts back (bf16 parity with the release's runtime).
        return RotaryEmbedding(config.head_dim, rope_parameters, fp32=True)


class HfaOlmo2ForCausalLM(HfaOlmo2PreTrainedModel, CausalLM):
    base_model_class = HfaOlmo2Model


__all__ = ["Olmo2DecoderLayer", "HfaOlmo2ForCausalLM", "HfaOlmo2Model", "HfaOlmo2PreTrainedModel"]
