"""Kimi Linear: Kimi Delta Attention layers with a few NoPE MLA layers, DeepSeek-style MoE after a dense first layer.

How it differs from a plain pre-norm GQA decoder:
- `layer_types` (from the release's 1-based `linear_attn_config` lists, see the config): KDA layers
  (`hf_archs/layers/kda.py`: the gated delta rule with a per-channel forget gate, three short convolutions, an
  RMSNorm gated by sigmoid) and MLA layers (`hf_archs/layers/mla.py`) that use **no positional embedding**: the
  64 "rope" dims of q and of `kv_a_proj_with_mqa` are used as they are (vLLM passes no rotary embedding and asserts
  `mla_use_nope`; rotating them, as one port does, is wrong). No RoPE anywhere in the model.
- KDA layers cache transformers' `LinearAttentionLayer` (conv inputs + state, constant in the sequence length);
  MLA layers cache the latent.
- Layer 0 has a dense `mlp`; the others a `block_sparse_moe`: sigmoid router with a correction bias, top-8 of 256,
  renormalised, times routed_scaling_factor, plus one shared expert. Experts are stored per expert as `w1` / `w3`
  (gate / up) / `w2` (down) in the release and fused here.
- Packed rows (position ids restarting, no padding): every document is run on its own, exactly, in every layer; such
  a forward keeps no cache (attention layers keep documents apart only without one).
References: https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/models/kimi_linear.py,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/kimi_linear/modular_kimi_linear.py
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import GatedMLP, RMSNorm
from ...layers.kda import KimiDeltaAttention
from ...layers.mla import MultiHeadLatentAttention
from ...layers.moe import Experts, TopKRouter, act_glu, sigmoid_grouped_topk
from ...modeling_base import (
    HfaPreTrainedModel,
    MoECausalLM,
    MoEDecoderModel,
)
from .configuration_kimi_linear import HfaKimiLinearConfig


class NoPELatentAttention(MultiHeadLatentAttention):
    """Same as MultiHeadLatentAttention except: no rotary embedding; the `qk_rope_head_dim` part of the query and
    the shared key is used unrotated (`position_embeddings` is ignored)."""

    def _rope(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        return x

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask: torch.Tensor | None,
                cache=None, **kwargs) -> torch.Tensor:
        return super().forward(hidden_states, (None, None), attention_mask, cache, **kwargs)


class KimiSparseMoeBlock(nn.Module):
    """Routed experts (sigmoid scores, correction bias for the choice, renormalised, times routed_scaling_factor)
    plus the shared experts, both on the same input."""

    def __init__(self, config: HfaKimiLinearConfig) -> None:
        super().__init__()
        c = config
        groups = c.num_expert_group if c.use_grouped_topk else 1
        self.gate = TopKRouter(c.hidden_size, c.num_experts, functools.partial(
            sigmoid_grouped_topk, top_k=c.num_experts_per_token, n_group=groups, topk_group=c.topk_group,
            norm_topk_prob=c.moe_renormalize, routed_scaling_factor=c.routed_scaling_factor),
            correction_bias=True, fp32=True)
        # transformers' KimiLinearExperts is DeepSeek V3's (fp32 weighting and sum, one rounding)
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size,
                               glu=act_glu(c.hidden_act), slot_sum=True)
        self.shared_experts = GatedMLP(c.hidden_size, c.moe_intermediate_size * c.num_shared_experts,
                                       act=c.hidden_act) if c.num_shared_experts else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        _, weights, indices = self.gate(x)
        out = self.experts(x, indices, weights).reshape(b, t, h)
        return out if self.shared_experts is None else out + self.shared_experts(hidden_states)


class KimiLinearDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm; `self_attn` is KDA or NoPE MLA by layer type; the feed-forward is `mlp` (dense) or
    `block_sparse_moe` (the release's names)."""

    def __init__(self, config: HfaKimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.layer_type = c.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.self_attn = KimiDeltaAttention(
                hidden_size=c.hidden_size, num_heads=c.linear_num_heads, head_dim=c.linear_head_dim,
                layer_idx=layer_idx, conv_kernel_size=c.linear_conv_kernel_dim, norm_eps=c.rms_norm_eps,
                chunk_size=c.linear_chunk_size, mode=c.linear_attn_mode)
        else:
            self.self_attn = NoPELatentAttention(
                hidden_size=c.hidden_size, num_heads=c.num_attention_heads, kv_lora_rank=c.kv_lora_rank,
                qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
                layer_idx=layer_idx, q_lora_rank=c.q_lora_rank, interleaved_rope=False, dropout=c.attention_dropout)
        self.sparse = c.mlp_layer_types[layer_idx] == "sparse"
        if self.sparse:
            self.block_sparse_moe = KimiSparseMoeBlock(c)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        x = self.input_layernorm(hidden_states)
        if self.layer_type == "linear_attention":
            mixed = self.self_attn(x, attention_mask, cache, position_ids=kwargs.get("position_ids"),
                                   cu_seq_lens_q=kwargs.get("cu_seq_lens_q"))
        else:
            mixed = self.self_attn(x, None, attention_mask, cache, **kwargs)
        h = hidden_states + mixed
        ffn = self.block_sparse_moe if self.sparse else self.mlp
        return h + ffn(self.post_attention_layernorm(h))


class HfaKimiLinearPreTrainedModel(HfaPreTrainedModel):
    config_class = HfaKimiLinearConfig
    _no_split_modules = ["KimiLinearDecoderLayer"]
    _can_record_outputs = {"hidden_states": KimiLinearDecoderLayer,
                           "router_logits": OutputRecorder(TopKRouter, index=0)}
    # The release keeps the balancing bias in fp32; bf16 would round it.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _is_stateful = True  # linear-attention states cannot be cropped: no assisted decoding


class HfaKimiLinearModel(HfaKimiLinearPreTrainedModel, MoEDecoderModel):
    layer_class = KimiLinearDecoderLayer

    packed_runs_without_cache = True


class HfaKimiLinearForCausalLM(HfaKimiLinearPreTrainedModel, MoECausalLM):
    base_model_class = HfaKimiLinearModel


__all__ = ["HfaKimiLinearForCausalLM", "HfaKimiLinearModel", "HfaKimiLinearPreTrainedModel", "KimiLinearDecoderLayer",
           "NoPELatentAttention"]
