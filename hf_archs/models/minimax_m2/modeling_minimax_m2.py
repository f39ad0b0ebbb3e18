"""MiniMax-M2: a GQA decoder whose every MLP is a sigmoid-routed mixture of experts.

How it differs from a plain pre-norm GQA decoder (Llama):
- Softmax attention in every layer (`attn_type_list` all 1; M1's lightning attention is gone).
- QK-norm across heads: one RMSNorm over the whole projected q (`[heads * head_dim]` weight, 6144) and k
  (`[kv_heads * head_dim]`, 1024), before the split into heads and before RoPE (vLLM all-reduces its variance
  under tensor parallelism; transformers' plan gathers q / k instead).
- Partial RoPE on the first `rotary_dim` (64) of 128 dims, rotate-half pairing.
- Every layer's MLP is `block_sparse_moe` (the release's name): a router (`gate`) whose sigmoid scores plus
  `e_score_correction_bias` (kept on the block, beside `gate`) choose the top k; the weights are the unbiased
  scores renormalised; no group limit, no routed scaling, no shared expert. Experts are SwiGLU with the release's
  per-expert `w1` (gate) / `w3` (up) / `w2` (down), fused at load into 3-D parameters.
- The router's logits are computed in the activations' dtype (transformers' port; vLLM computes them in fp32).
- `num_mtp_modules` MTP modules follow the decoder in `model.layers` (layers 62-64 of the release's config):
  DeepSeek's recipe on a MiniMax-M2 decoder layer, with enorm / hnorm / eh_proj (embedding first) and its own
  shared_head.{norm,head}, reading the main model's embedding; run by `hf_archs/mtp.py` (training loss,
  `generate(use_mtp=True)`), never by the main forward. The inner tensor names are those of RBLN-SW/vllm-rbln's
  vllm_rbln/models/minimax_m2_mtp.py (upstream vLLM only skips the layers). MiniMax publishes no trained MTP
  weights (the official files hold layers 0-61 only): `from_official` then loads with num_mtp_modules=0.
References: https://github.com/vllm-project/vllm/blob/main/vllm/model_executor/models/minimax_m2.py,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/minimax_m2/modular_minimax_m2.py,
https://github.com/RBLN-SW/vllm-rbln/blob/899c5389f674475ca306820affd145560055a683/vllm_rbln/models/minimax_m2_mtp.py
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import Attention, RMSNorm
from ...layers.moe import Experts, TopKRouter, act_glu
from ...modeling_base import HfaPreTrainedModel, MoECausalLM, MoEDecoderModel
from ...mtp import MTPDecoderLayers, MTPLayer, MultiTokenPrediction
from ..glm4_moe.modeling_glm4_moe import sigmoid_grouped_topk_in_slot_order
from .configuration_minimax_m2 import HfaMiniMaxM2Config


class BlockBiasRouter(TopKRouter):
    """Same as TopKRouter except: the correction bias is passed in by the caller, since the release keeps it on
    the MoE block (`block_sparse_moe.e_score_correction_bias`), not inside `gate`."""

    def forward(self, x: torch.Tensor, correction_bias: torch.Tensor | None = None):
        x = x.reshape(-1, x.shape[-1])
        logits = F.linear(x, self.weight)  # [T, E], in the activations' dtype
        weights, indices = self.rule(logits, correction_bias=correction_bias)
        return logits, weights, indices


class MiniMaxM2SparseBlock(nn.Module):
    def __init__(self, config: HfaMiniMaxM2Config) -> None:
        super().__init__()
        c = config
        self.gate = BlockBiasRouter(c.hidden_size, c.num_local_experts, functools.partial(
            sigmoid_grouped_topk_in_slot_order, top_k=c.num_experts_per_tok))
        self.experts = Experts(c.num_local_experts, c.hidden_size, c.intermediate_size,
                               glu=act_glu(c.hidden_act), slot_sum=True)
        if c.use_routing_bias:
            self.e_score_correction_bias = nn.Buffer(torch.zeros(c.num_local_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        _, weights, indices = self.gate(x, self.e_score_correction_bias)
        return self.experts(x, indices, weights).reshape(b, t, h)


class MiniMaxM2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaMiniMaxM2Config, layer_idx: int) -> None:
        super().__init__()
        c = config
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.self_attn = Attention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, dropout=c.attention_dropout,
            q_norm=RMSNorm(q_dim, eps=c.rms_norm_eps) if c.use_qk_norm else None,
            k_norm=RMSNorm(kv_dim, eps=c.rms_norm_eps) if c.use_qk_norm else None,
            qk_norm_across_heads=True)
        self.block_sparse_moe = MiniMaxM2SparseBlock(c)
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class MiniMaxM2MTPLayer(MTPLayer, MiniMaxM2DecoderLayer):
    """MiniMax-M2's MTP module `model.layers.{num_hidden_layers + k}` (vllm-rbln's names): a decoder layer plus
    enorm / hnorm / eh_proj (embedding first) and its own shared_head; the embedding is the main model's (a copy a
    release stores under the layer is skipped at load, see hf_archs/registry.py)."""

    def __init__(self, config: HfaMiniMaxM2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.add_mtp_modules(config.hidden_size, config.vocab_size,
                             norm=lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps), embedding=False)


class HfaMiniMaxM2PreTrainedModel(HfaPreTrainedModel):
    config_class = HfaMiniMaxM2Config
    _no_split_modules = ["MiniMaxM2DecoderLayer", "MiniMaxM2MTPLayer"]
    # The release stores the balancing bias in fp32 (vLLM keeps it so); bf16 would round it to 2^-9 near 0.5.
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _can_record_outputs = {"hidden_states": MiniMaxM2DecoderLayer,
                           "router_logits": OutputRecorder(BlockBiasRouter, index=0)}


class HfaMiniMaxM2Model(HfaMiniMaxM2PreTrainedModel, MTPDecoderLayers, MoEDecoderModel):
    layer_class = MiniMaxM2DecoderLayer
    mtp_layer_class = MiniMaxM2MTPLayer
    mtp_count_field = "num_mtp_modules"


class HfaMiniMaxM2ForCausalLM(HfaMiniMaxM2PreTrainedModel, MultiTokenPrediction, MoECausalLM):
    base_model_class = HfaMiniMaxM2Model


__all__ = ["BlockBiasRouter", "HfaMiniMaxM2ForCausalLM", "HfaMiniMaxM2Model", "HfaMiniMaxM2PreTrainedModel",
           "MiniMaxM2DecoderLayer", "MiniMaxM2MTPLayer"]
