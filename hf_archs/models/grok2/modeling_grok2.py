"""Grok 2 / 2.5 (xAI): a GQA decoder with sandwich norms, soft-capped attention with a long-context temperature,
and a top-2-of-8 GELU mixture of experts added to a dense residual MLP.

How it differs from a plain pre-norm GQA decoder (Llama), per the official runtime (SGLang's `models/grok.py` and
its attention kernels):
- Embeddings are multiplied by `embedding_multiplier_scale` (sqrt(8192) = 90.51).
- Sandwich norms: pre_attn_norm -> attention -> post_attn_norm -> residual; pre_moe_norm -> MoE -> post_moe_norm
  -> residual.
- Attention logits `q.k / sqrt(head_dim)` are soft-capped, `30 tanh(s / 30)`, and then, for a query at 0-based
  position p > `attn_temperature_len` (1024), multiplied by `log2(p) / log2(1024)`: the temperature multiplies the
  capped logit, in that order. Positions are the RoPE positions (`position_ids`; from the attention mask when a
  left-padded batch gives none, so a padded row sees its own positions). Eager only: sdpa can express neither
  step, and the model says so (`_supports_sdpa = False`, so transformers refuses `attn_implementation="sdpa"`).
- MoE: router logits in fp32, soft-capped at 30, softmax over all 8 experts, top 2, no renormalisation; experts
  `down(gelu_tanh(w1 x) * w3 x)`. With `residual_moe` a dense GeGLU MLP runs on the same input and the sum is
  scaled: `(mlp(x) + moe(x)) / sqrt(2)`.
- RoPE: `rope_type: "original"` is plain RoPE at theta 208533496 (no YaRN scaling), half-split rotation.
- Logits: `lm_head(h) * output_multiplier_scale` (0.5; SGLang folds it into the lm_head weight at load), then
  soft-capped at `final_logit_softcapping` (50).

Module names: the release's tensor names as SGLang loads them (official-releases.md §11), which our converter
(conversion/, from the TP-8 pre-sharded files) writes unchanged:
    model.embed_tokens.weight                                   embedding (unscaled)
    model.layers.N.self_attn.{q,k,v,o}_proj.weight               attention, no bias
    model.layers.N.{pre_attn,post_attn,pre_moe,post_moe}_norm.weight
    model.layers.N.block_sparse_moe.gate.weight                  router [8, H]
    model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight  per expert (w1 gate, w2 down, w3 up; the TP-8
                                                                 shards joined: w1 / w3 along rows, w2 along columns)
    model.layers.N.mlp.{gate,up,down}_proj.weight                dense residual MLP
    model.norm.weight, lm_head.weight                            lm_head unscaled (the 0.5 is applied to logits)
In memory the experts are fused: `block_sparse_moe.experts.gate_up_proj` [E, 2I, H] = [w1; w3] per expert and
`block_sparse_moe.experts.down_proj` [E, H, I] = w2 (fused at load, written back per expert on save: the registry
declares it).
Reference: https://github.com/sgl-project/sglang/blob/main/python/sglang/srt/models/grok.py ; routing:
`python/sglang/srt/layers/moe/router.py`; temperature: the `xai_temperature_len` code of its attention kernels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import Attention, GatedMLP, RMSNorm, eager_attention
from ...layers.moe import Experts, TopKRouter, act_glu, softcapped_softmax_topk
from ...modeling_base import HfaPreTrainedModel, MoECausalLM, MoEDecoderModel
from .configuration_grok2 import HfaGrok2Config


def softcap_temperature_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                                  softcap: float | None = None, position_ids: torch.Tensor | None = None,
                                  **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as eager_attention except: after the soft-cap, the logits of a query at position p > L
    (`module.temperature_len`) are multiplied by log2(p) / log2(L). `position_ids` [b or 1, q]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [b, h, q, k]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    length = module.temperature_len
    if length > 0:
        if position_ids is None:
            raise ValueError("the attention temperature needs position_ids (the decoder passes them)")
        p = position_ids.float()
        temperature = torch.where(p > length, torch.log2(p) * (1.0 / math.log2(length)), 1.0)  # [b, q]
        scores = scores * temperature[:, None, :, None].to(scores.dtype)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class TemperatureAttention(Attention):
    """Same as Attention except: the logits get Grok's long-context temperature after the soft-cap
    (`softcap_temperature_attention`), and only the eager kernel exists."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int,
                 temperature_len: int = -1, **kwargs) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, layer_idx, **kwargs)
        self.temperature_len = temperature_len

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                attention_mask: torch.Tensor | None, cache=None, attention_fn: Callable = eager_attention,
                **kwargs) -> torch.Tensor:
        if attention_fn is not eager_attention:
            name = getattr(attention_fn, "__name__", repr(attention_fn))
            raise NotImplementedError(f"Grok's soft-capped, temperature-scaled attention runs eagerly only, not "
                                      f"through {name!r}: use attn_implementation='eager'")
        return super().forward(hidden_states, position_embeddings, attention_mask, cache,
                               attention_fn=softcap_temperature_attention, **kwargs)


class MultipliedEmbedding(nn.Embedding):
    """Same as nn.Embedding except: the output is multiplied by `multiplier`, a Python float (as the runtime does)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, multiplier: float) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.multiplier = multiplier

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.multiplier


class Grok2SparseBlock(nn.Module):
    def __init__(self, config: HfaGrok2Config) -> None:
        super().__init__()
        c = config
        self.gate = TopKRouter(c.hidden_size, c.num_local_experts, functools.partial(
            softcapped_softmax_topk, top_k=c.num_experts_per_tok, softcap=c.router_logit_softcapping), fp32=True)
        self.experts = Experts(c.num_local_experts, c.hidden_size, c.moe_intermediate_size,
                               glu=act_glu("gelu_pytorch_tanh"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        _, weights, indices = self.gate(x)
        return self.experts(x, indices, weights).reshape(b, t, h)


def _norm(config: HfaGrok2Config) -> RMSNorm:
    return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, weight_in_fp32=True)


class Grok2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaGrok2Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = TemperatureAttention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, dropout=c.attention_dropout,
            softcap=c.attn_logit_softcapping or None, temperature_len=c.attn_temperature_len)
        self.block_sparse_moe = Grok2SparseBlock(c)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act="gelu_pytorch_tanh") if c.residual_moe else None
        self.pre_attn_norm = _norm(c)
        self.post_attn_norm = _norm(c)
        self.pre_moe_norm = _norm(c)
        self.post_moe_norm = _norm(c)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        # Sandwich norms around both blocks; the dense MLP and the MoE read the same normalised input.
        attn = self.self_attn(self.pre_attn_norm(hidden_states), position_embeddings, attention_mask, cache, **kwargs)
        h = hidden_states + self.post_attn_norm(attn)
        x = self.pre_moe_norm(h)
        ffn = self.block_sparse_moe(x)
        if self.mlp is not None:
            ffn = (self.mlp(x) + ffn) / math.sqrt(2)  # residual MoE (SGLang's `moe_with_rmoe`)
        return h + self.post_moe_norm(ffn)


class HfaGrok2PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaGrok2Config
    _supports_sdpa = False  # soft-cap and temperature: eager only (transformers refuses sdpa by this flag)
    _no_split_modules = ["Grok2DecoderLayer"]
    _can_record_outputs = {"hidden_states": Grok2DecoderLayer,
                           "router_logits": OutputRecorder(TopKRouter, index=0)}


class HfaGrok2Model(HfaGrok2PreTrainedModel, MoEDecoderModel):
    layer_class = Grok2DecoderLayer

    def make_embedding(self, config: HfaGrok2Config) -> nn.Module:
        return MultipliedEmbedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                   multiplier=config.embedding_multiplier_scale)

    def make_norm(self, config: HfaGrok2Config) -> nn.Module:
        return _norm(config)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs):
        """Same as DecoderModel.forward except: with a 2-D attention mask and no `position_ids`, positions count
        each row's real tokens (as `generate` does), since the temperature reads absolute positions."""
        if position_ids is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            inputs = input_ids if input_ids is not None else inputs_embeds
            if inputs is not None:
                length = inputs.shape[1]
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, **kwargs)


class HfaGrok2ForCausalLM(HfaGrok2PreTrainedModel, MoECausalLM):
    base_model_class = HfaGrok2Model

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits * self.config.output_multiplier_scale
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits


__all__ = ["Grok2DecoderLayer", "Grok2SparseBlock", "HfaGrok2ForCausalLM", "HfaGrok2Model",
           "HfaGrok2PreTrainedModel", "MultipliedEmbedding", "TemperatureAttention",
           "softcap_temperature_attention"]
