"""Gemma 3 (text decoder): a GQA decoder with sandwich norms and interleaved local / global attention.

How it differs from a plain pre-norm GQA decoder (Llama):
- Every RMSNorm is `(1 + w) * norm(x)` in fp32, weights stored zero-centred: the four norms of each layer, the
  per-head q/k norms (before RoPE) and the final norm.
- Sandwich norms: the attention and MLP outputs are normalised again before they join the residual stream.
- The embedding output is multiplied by `sqrt(hidden_size)`, cast to the weight dtype first (73.5 in bf16 for
  hidden 5376, not 73.32).
- Attention scale `query_pre_attn_scalar ** -0.5` (168 on 27B), not `head_dim ** -0.5`.
- Layer types interleave sliding-window (local, RoPE base 1e4) and full (global, base 1e6, linear x8 on 4B-27B)
  layers, five local to one global; each type has its own RoPE.
- GeGLU MLP with tanh-approximated GELU; optional tanh soft-capping of the final logits.
References: https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma3/modeling_gemma3.py
and the Gemma 3 technical report, https://arxiv.org/abs/2503.19786
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ...layers import Attention, GatedMLP, RMSNorm
from ...modeling_base import CausalLM, DecoderModel, HfaPreTrainedModel
from .configuration_gemma3 import HfaGemma3Config


class ScaledWordEmbedding(nn.Embedding):
    """Same as nn.Embedding except: the output is multiplied by `embed_scale`, cast to the weight dtype."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scalar_embed_scale = embed_scale
        # Non-persistent: not in checkpoints, recomputed by `init_buffers` after meta-device initialisation.
        self.embed_scale = nn.Buffer(torch.tensor(embed_scale), persistent=False)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent `embed_scale` (after building on the meta device, say)."""
        self.embed_scale = nn.Buffer(torch.tensor(self.scalar_embed_scale, device=device or "cpu"), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The cast happens before the product: Gemma's runtime multiplies by the bf16-rounded scale.
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


def _norm(config: HfaGemma3Config, dim: int) -> RMSNorm:
    return RMSNorm(dim, eps=config.rms_norm_eps, unit_offset=True)


class Gemma3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaGemma3Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        sliding = c.layer_types[layer_idx] == "sliding_attention"
        self.self_attn = Attention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, scaling=c.query_pre_attn_scalar**-0.5,
            bias=c.attention_bias, dropout=c.attention_dropout,
            q_norm=_norm(c, c.head_dim), k_norm=_norm(c, c.head_dim),  # per head, before RoPE
            sliding_window=c.sliding_window if sliding else None, softcap=c.attn_logit_softcapping)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_activation)
        self.input_layernorm = _norm(c, c.hidden_size)
        self.post_attention_layernorm = _norm(c, c.hidden_size)
        self.pre_feedforward_layernorm = _norm(c, c.hidden_size)
        self.post_feedforward_layernorm = _norm(c, c.hidden_size)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        # Sandwich norms: norm -> attention -> norm -> residual, then norm -> MLP -> norm -> residual.
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache,
                              **kwargs)
        h = hidden_states + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class HfaGemma3PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaGemma3Config
    _no_split_modules = ["Gemma3DecoderLayer"]
    _can_record_outputs = {"hidden_states": Gemma3DecoderLayer}


class HfaGemma3Model(HfaGemma3PreTrainedModel, DecoderModel):
    layer_class = Gemma3DecoderLayer

    def make_embedding(self, config: HfaGemma3Config) -> nn.Module:
        return ScaledWordEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                   embed_scale=config.hidden_size**0.5)

    def make_norm(self, config: HfaGemma3Config) -> nn.Module:
        return _norm(config, config.hidden_size)


class HfaGemma3ForCausalLM(HfaGemma3PreTrainedModel, CausalLM):
    base_model_class = HfaGemma3Model

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap


__all__ = ["Gemma3DecoderLayer", "HfaGemma3ForCausalLM", "HfaGemma3Model", "HfaGemma3PreTrainedModel",
           "ScaledWordEmbedding"]
