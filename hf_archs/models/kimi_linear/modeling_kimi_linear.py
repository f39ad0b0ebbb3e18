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
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import (
    create_causal_mask,
    create_recurrent_attention_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ...errors import InputError
from ...layers import GatedMLP, RMSNorm, attention_function
from ...layers.kda import KimiDeltaAttention
from ...layers.mla import MultiHeadLatentAttention
from ...layers.moe import TopKRouter, act_glu, sigmoid_grouped_topk
from ...modeling_base import (
    HfaPreTrainedModel,
    MoECausalLM,
    MoEDecoderModel,
    check_input_ids,
)
from ..deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts
from .configuration_kimi_linear import HfaKimiLinearConfig

MASKS = {"full_attention": create_causal_mask, "linear_attention": create_recurrent_attention_mask}


def cached_length(cache: Cache | None) -> int:
    """Tokens already cached. A cache of linear-attention layers only keeps no length (transformers raises): 0 then,
    which only positions RoPE layers, of which such a model has none."""
    if cache is None or not any(isinstance(layer, CacheLayerMixin) for layer in cache.layers):
        return 0
    return cache.get_seq_length()


def is_packed(position_ids: torch.Tensor, attention_mask) -> bool:
    """Position ids restarting inside a row, with no padding (transformers' packed-sequence rule)."""
    if position_ids.shape[-1] < 2 or isinstance(attention_mask, dict):
        return False
    if attention_mask is not None and (attention_mask.dim() != 2 or not bool(attention_mask.all())):
        return False
    return find_packed_sequence_indices(position_ids) is not None


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
        self.experts = DeepseekV3Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size,
                                         glu=act_glu(c.hidden_act))
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

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kwargs: Any):
        # Same as DecoderModel.forward except: linear-attention layers get the 2-D padding mask (or None), not a
        # causal mask (transformers' `create_recurrent_attention_mask`); no layer uses RoPE.
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.shape[1] == 0:
            raise InputError("inputs_embeds is empty: at least one position is needed")
        if position_ids is not None and is_packed(position_ids, attention_mask):
            # Several documents per row: every layer must see them apart. Attention layers do so only without a
            # cache (transformers builds the block-diagonal mask then), so a packed batch runs, and returns, none.
            if cached_length(cache) > 0:
                raise InputError("packed sequences (position_ids restarting inside a row) cannot continue a cache")
            attention_mask, cache, use_cache = None, None, False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cached_length(cache)
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)

        layer_types = self.config.layer_types
        masks = attention_mask if isinstance(attention_mask, dict) else {
            kind: MASKS[kind](config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              cache=cache, position_ids=position_ids)
            for kind in set(layer_types)}
        attention_fn = attention_function(self.config._attn_implementation)

        hidden_states = inputs_embeds
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, position_embeddings=None, attention_mask=masks[layer_types[i]],
                                  cache=cache, attention_fn=attention_fn, position_ids=position_ids, **kwargs)
        return self.output_class(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)


class HfaKimiLinearForCausalLM(HfaKimiLinearPreTrainedModel, MoECausalLM):
    base_model_class = HfaKimiLinearModel


__all__ = ["HfaKimiLinearForCausalLM", "HfaKimiLinearModel", "HfaKimiLinearPreTrainedModel", "KimiLinearDecoderLayer",
           "NoPELatentAttention"]
