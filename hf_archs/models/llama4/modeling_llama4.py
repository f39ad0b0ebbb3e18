"""Llama 4 (Scout 17B-16E, Maverick 17B-128E): the text decoder.

How it differs from a plain pre-norm GQA decoder (Llama 3):
- Mixture of experts (`feed_forward`) on the layers of `mlp_layer_types` (Scout: all, Maverick: the odd ones; the
  others are dense SwiGLU of `intermediate_size_mlp`). Routing: top-k (k = 1) on the raw router logits, and the
  expert's *input* is scaled by sigmoid(logit), not its output (llama-models `moe.py`: `routed_in = x * sigmoid`);
  a shared expert runs on every token and is added. Only the routed tokens go through each expert (transformers
  runs every token through every expert, with the unrouted ones scaled by 0).
- Experts are stored input-major, as the release: `experts.gate_up_proj` [E, H, 2I], `experts.down_proj` [E, I, H].
- RoPE rotates interleaved pairs (2i, 2i + 1) in fp32, with cos / sin taken from `torch.polar` as Meta's complex
  multiplication does (the HF conversion keeps this layout: no Llama-3 permute); Scout uses llama3 frequency
  scaling, Maverick plain RoPE.
- Every `no_rope_layer_interval`-th layer is NoPE (`no_rope_layers[i] == 0`) and attends globally; the RoPE
  layers attend within chunks of `attention_chunk_size` tokens (chunked mask and a chunk-window cache).
- RoPE layers L2-normalise q and k after RoPE (weightless; `use_qk_norm`, Scout only).
- NoPE layers scale the queries by the attention temperature (arXiv:2501.19399)
  `1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))`, pos = the token's position id. (transformers uses
  the index in the unpadded sequence instead, so its left-padded rows get the wrong temperature; the two agree
  whenever the position ids are 0, 1, 2, ...)
References: https://github.com/meta-llama/llama-models/tree/main/models/llama4 ,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama4/modeling_llama4.py
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding
from ...layers.attention import attend, eager_attention
from ...layers.moe import Experts, TopKRouter, act_glu, sigmoid_top1_input_scale
from ...layers.rope import apply_rope
from ...modeling_base import HfaPreTrainedModel, MoECausalLM, MoEDecoderModel
from .configuration_llama4 import HfaLlama4Config


class Llama4RotaryEmbedding(RotaryEmbedding):
    """Same as RotaryEmbedding(interleaved=True, fp32=True) except: cos and sin are the parts of
    `torch.polar(1, angle)`, the complex `freqs_cis` of Meta's and transformers' code (torch.cos / torch.sin
    differ from them by an ulp at some angles, which bf16 parity notices)."""

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [batch, seq, head_dim / 2]
        cis = torch.polar(torch.ones_like(freqs), freqs) * self.attention_scaling
        return cis.real.repeat_interleave(2, dim=-1), cis.imag.repeat_interleave(2, dim=-1)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dimension in fp32, no weight (Llama 4's `qk_norm`)."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Llama4Attention(Attention):
    """Same as Attention except: the optional QK-norm is a weightless L2 norm applied *after* RoPE (RoPE layers
    only), and NoPE layers multiply the queries by the attention temperature of their position."""

    def __init__(self, config: HfaLlama4Config, layer_idx: int) -> None:
        c = config
        super().__init__(hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                         num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, layer_idx=layer_idx,
                         bias=c.attention_bias, interleaved_rope=True, dropout=c.attention_dropout)
        use_rope = c.layer_uses_rope(layer_idx)
        self.qk_norm_eps = c.rms_norm_eps if c.use_qk_norm and use_rope else None
        self.temperature_tuning = bool(c.attn_temperature_tuning) and not use_rope
        self.floor_scale, self.attn_scale = c.floor_scale, c.attn_scale
        self.chunk_size = c.attention_chunk_size if c.layer_types[layer_idx] == "chunked_attention" else None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                attention_mask: torch.Tensor | None, cache=None, attention_fn: Callable = eager_attention,
                position_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # [b, heads, t, head_dim]
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)  # [b, kv_heads, t, head_dim]
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rope(q, cos, sin, interleaved=True), apply_rope(k, cos, sin, interleaved=True)
        if self.qk_norm_eps is not None:
            q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
        if self.temperature_tuning:
            if position_ids is None:
                raise ValueError("Llama 4's NoPE layers need position_ids for the attention temperature")
            scale = torch.log1p(torch.floor((position_ids.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scale[:, None, :, None]).to(q.dtype)  # [b or 1, 1, t, 1], fp32 product as transformers
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, _ = attend(attention_fn, self, q, k, v, attention_mask, chunk_size=self.chunk_size,
                        scaling=self.scaling, dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return self.o_proj(out.reshape(b, t, -1))


class Llama4MoE(nn.Module):
    """Routed experts whose inputs are scaled by the router's sigmoid score, plus a shared expert."""

    def __init__(self, config: HfaLlama4Config) -> None:
        super().__init__()
        c = config
        self.router = TopKRouter(c.hidden_size, c.num_local_experts,
                                 functools.partial(sigmoid_top1_input_scale, top_k=c.num_experts_per_tok))
        self.experts = Experts(c.num_local_experts, c.hidden_size, c.intermediate_size, glu=act_glu(c.hidden_act),
                               transposed=True)
        self.shared_expert = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        _, scores, indices = self.router(x)  # [T, k] each; scores = sigmoid(top logits) in fp32
        k = indices.shape[1]
        # One row per (token, choice), scaled before the expert; the product in the activations' dtype.
        routed_in = (x[:, None, :] * scores[..., None].to(x.dtype)).reshape(-1, h)  # [T * k, H]
        routed = self.experts(routed_in, indices.reshape(-1, 1), None)  # [T * k, H]
        out = self.shared_expert(x) + routed.view(-1, k, h).sum(dim=1)
        return out.reshape(b, t, h)


class Llama4DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaLlama4Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.self_attn = Llama4Attention(c, layer_idx)
        self.feed_forward = (Llama4MoE(c) if c.mlp_layer_types[layer_idx] == "sparse"
                             else GatedMLP(c.hidden_size, c.intermediate_size_mlp, act=c.hidden_act))
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        # Pre-norm; `position_embeddings` is None on NoPE layers.
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class HfaLlama4PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaLlama4Config
    _no_split_modules = ["Llama4DecoderLayer"]
    _can_record_outputs = {"hidden_states": Llama4DecoderLayer,
                           "router_logits": OutputRecorder(TopKRouter, index=0)}


class HfaLlama4Model(HfaLlama4PreTrainedModel, MoEDecoderModel):
    layer_class = Llama4DecoderLayer

    def make_rotary(self, config: HfaLlama4Config, rope_parameters: dict) -> RotaryEmbedding:
        return Llama4RotaryEmbedding(config.head_dim, rope_parameters, interleaved=True, fp32=True)


class HfaLlama4ForCausalLM(HfaLlama4PreTrainedModel, MoECausalLM):
    base_model_class = HfaLlama4Model


__all__ = ["HfaLlama4ForCausalLM", "HfaLlama4Model", "HfaLlama4PreTrainedModel", "Llama4DecoderLayer"]
