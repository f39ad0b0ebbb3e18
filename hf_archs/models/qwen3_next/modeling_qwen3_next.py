"""Qwen3-Next: three Gated DeltaNet layers to one gated full-attention layer, every layer a 512-expert MoE with a
gated shared expert, and one multi-token-prediction layer.

How it differs from a plain pre-norm GQA decoder (Qwen3-MoE, say):
- `layer_types`: every `full_attention_interval`-th layer (4th, 8th, ...) is full attention; the others are Gated
  DeltaNet (`hf_archs/layers/gated_deltanet.py`): per token a [128, 128] state per value head, decayed and
  delta-rule corrected; a causal depthwise conv (kernel 4) on q, k, v first; output through an RMSNorm gated by
  SiLU(z). The release packs its projections by key head (`in_proj_qkvz`, `in_proj_ba`, see `GatedDeltaNet`).
  Their cache is transformers' `LinearAttentionLayer`: conv inputs plus state, constant in the sequence length.
- Gated attention: `q_proj` is doubled, per head `[query | gate]`; the attention output is multiplied by
  sigmoid(gate) before `o_proj`. QK-norm per head; RoPE on the first quarter of each head (partial_rotary_factor).
- Every norm except the DeltaNet output norm is zero-centred: `(1 + w) * norm(x)`, weights stored around 0.
- MoE: softmax top-10 of 512, renormalised; plus `shared_expert` (SwiGLU) times sigmoid(`shared_expert_gate`).
- MTP: the release's `mtp.*` (one full-attention MoE layer; `fc` over [norm(embedding) ; norm(hidden)], a final
  norm; the main embedding and head are shared) is held as `mtp.layers.0` with the names of `hf_archs/mtp.py`
  (the registry renames `mtp.fc` -> `mtp.layers.0.eh_proj`, `mtp.pre_fc_norm_embedding` -> `enorm`,
  `mtp.pre_fc_norm_hidden` -> `hnorm`, `mtp.norm` -> `shared_head.norm`). It trains with the MTP loss; drafting
  (`generate(use_mtp=True)`) is refused: rejecting drafts needs the DeltaNet states rolled back.
- Packed rows (position ids restarting, no padding): every document is run on its own, exactly, in every layer; such
  a forward keeps no cache (attention layers keep documents apart only without one).
References: https://github.com/huggingface/transformers/blob/main/src/transformers/models/qwen3_next/modular_qwen3_next.py,
https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/models/qwen3_next_mtp.py
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import (
    Attention,
    GatedMLP,
    Linear,
    RMSNorm,
    apply_rope,
    eager_attention,
)
from ...layers.gated_deltanet import GatedDeltaNet
from ...layers.moe import Experts, TopKRouter, act_glu, softmax_topk
from ...modeling_base import (
    HfaPreTrainedModel,
    MoECausalLM,
    MoEDecoderModel,
)
from ...mtp import MTPLayer, MultiTokenPrediction
from .configuration_qwen3_next import HfaQwen3NextConfig


class GatedAttention(Attention):
    """Same as Attention except: `q_proj` gives, per head, `[query (head_dim) | gate (head_dim)]`, and the attention
    output is multiplied by sigmoid(gate) before `o_proj` (the split is per head, not over the whole projection)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, **kwargs: Any) -> None:
        super().__init__(hidden_size, num_heads, head_dim=head_dim, **kwargs)
        self.q_proj = Linear(hidden_size, num_heads * head_dim * 2, bias=self.q_proj.bias is not None)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache=None, attention_fn: Callable = eager_attention,
                **kwargs) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        q, gate = self.q_proj(hidden_states).view(b, t, -1, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(b, t, -1)
        q = self.q_norm(q).transpose(1, 2)  # [b, heads, t, head_dim]
        k = self.k_norm(self.k_proj(hidden_states).view(b, t, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, _ = attention_fn(self, q, k, v, attention_mask, scaling=self.scaling,
                              dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.o_proj(out.reshape(b, t, -1) * torch.sigmoid(gate))


class Qwen3NextSparseBlock(nn.Module):
    """Softmax top-k routed experts plus a shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, config: HfaQwen3NextConfig) -> None:
        super().__init__()
        c = config
        self.gate = TopKRouter(c.hidden_size, c.num_experts, functools.partial(
            softmax_topk, top_k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob))
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size, glu=act_glu(c.hidden_act))
        self.shared_expert = GatedMLP(c.hidden_size, c.shared_expert_intermediate_size, act=c.hidden_act)
        self.shared_expert_gate = Linear(c.hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        shared = self.shared_expert(x)
        _, weights, indices = self.gate(x)
        out = self.experts(x, indices, weights) + torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out.reshape(b, t, h)


class Qwen3NextDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm; the token mixer is `linear_attn` (Gated DeltaNet) or `self_attn` (gated attention) by layer type."""

    def __init__(self, config: HfaQwen3NextConfig, layer_idx: int, layer_type: str | None = None) -> None:
        super().__init__()
        c = config
        self.layer_type = layer_type or c.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(
                hidden_size=c.hidden_size, num_k_heads=c.linear_num_key_heads, num_v_heads=c.linear_num_value_heads,
                head_k_dim=c.linear_key_head_dim, head_v_dim=c.linear_value_head_dim, layer_idx=layer_idx,
                conv_kernel_size=c.linear_conv_kernel_dim, norm_eps=c.rms_norm_eps, chunk_size=c.linear_chunk_size,
                mode=c.linear_attn_mode)
        else:
            self.self_attn = GatedAttention(
                hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                head_dim=c.head_dim, layer_idx=layer_idx, bias=c.attention_bias, dropout=c.attention_dropout,
                q_norm=RMSNorm(c.head_dim, eps=c.rms_norm_eps, unit_offset=True),
                k_norm=RMSNorm(c.head_dim, eps=c.rms_norm_eps, unit_offset=True))
        self.mlp = (Qwen3NextSparseBlock(c) if c.mlp_layer_type(layer_idx) == "sparse"
                    else GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act))
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, unit_offset=True)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        x = self.input_layernorm(hidden_states)
        if self.layer_type == "linear_attention":
            mixed = self.linear_attn(x, attention_mask, cache, position_ids=kwargs.get("position_ids"),
                                     cu_seq_lens_q=kwargs.get("cu_seq_lens_q"))
        else:
            mixed = self.self_attn(x, position_embeddings, attention_mask, cache, **kwargs)
        h = hidden_states + mixed
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3NextMTPLayer(MTPLayer, Qwen3NextDecoderLayer):
    """The release's MTP layer: a full-attention MoE decoder layer plus enorm / hnorm / eh_proj and the final
    norm (`shared_head.norm`); embedding and head are the main model's."""

    def __init__(self, config: HfaQwen3NextConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, layer_type="full_attention")
        self.add_mtp_modules(config.hidden_size, config.vocab_size, embedding=False, head=False,
                             norm=lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps, unit_offset=True))


class Qwen3NextMTP(nn.Module):
    """`mtp.layers.k`: the MTP layers, at the top level as in the release."""

    def __init__(self, config: HfaQwen3NextConfig) -> None:
        super().__init__()
        n = config.num_hidden_layers
        self.layers = nn.ModuleList(Qwen3NextMTPLayer(config, n + k) for k in range(config.num_nextn_predict_layers))


class HfaQwen3NextPreTrainedModel(HfaPreTrainedModel):
    config_class = HfaQwen3NextConfig
    _no_split_modules = ["Qwen3NextDecoderLayer", "Qwen3NextMTPLayer"]
    _can_record_outputs = {"hidden_states": Qwen3NextDecoderLayer,
                           "router_logits": OutputRecorder(TopKRouter, index=0)}
    _is_stateful = True  # linear-attention states cannot be cropped: no assisted decoding


class HfaQwen3NextModel(HfaQwen3NextPreTrainedModel, MoEDecoderModel):
    layer_class = Qwen3NextDecoderLayer
    packed_runs_without_cache = True

    def make_norm(self, config) -> nn.Module:
        return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, unit_offset=True)


class HfaQwen3NextForCausalLM(HfaQwen3NextPreTrainedModel, MultiTokenPrediction, MoECausalLM):
    base_model_class = HfaQwen3NextModel

    def __init__(self, config: HfaQwen3NextConfig) -> None:
        super().__init__(config)
        self.mtp = Qwen3NextMTP(config)
        self.post_init()

    @property
    def mtp_layers(self) -> list[nn.Module]:
        return list(self.mtp.layers)

    def generate(self, *args: Any, use_mtp: bool = False, **kwargs: Any):
        if use_mtp:
            raise NotImplementedError("generate(use_mtp=True) is not supported for Qwen3-Next: rejecting drafted tokens "
                                      "needs the Gated DeltaNet states rolled back, which the cache cannot do")
        return super().generate(*args, **kwargs)


__all__ = ["GatedAttention", "HfaQwen3NextForCausalLM", "HfaQwen3NextModel", "HfaQwen3NextPreTrainedModel",
           "Qwen3NextDecoderLayer", "Qwen3NextMTPLayer"]
