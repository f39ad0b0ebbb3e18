"""gpt-oss (20b, 120b): a pre-norm GQA decoder with attention sinks and a biased, clamped-SwiGLU mixture of experts.

How it differs from a plain pre-norm GQA decoder (Llama):
- Attention sinks: a learned logit per head (`self_attn.sinks`) joins each query's softmax and carries no value
  (`SinkAttention`; eager and sdpa kernels in `layers/sinks.py`, transformers itself refuses sdpa here).
- Sliding-window (128) and full attention alternate, the window on even layers, starting with layer 0.
- Biases on q/k/v/o, on the router and on both expert matmuls. q is 64 x 64 = 4096 wide, more than hidden 2880.
- Every MLP is routed: the router (`mlp.router`) takes the top k of its biased logits, then a softmax over those k
  only (equal to softmax-then-renormalise, computed the reference's way for bf16 parity).
- Experts use the clamped SwiGLU: gate clamped above at 7, up clamped to [-7, 7],
  `gate * sigmoid(1.702 * gate) * (up + 1)`, with gate / up in interleaved columns (even / odd) of
  `gate_up_proj` [E, H, 2I] (in-major, as transformers keeps it in memory and save_pretrained writes it);
  `down_proj` [E, I, H]; biases `gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, H].
- YaRN (factor 32 from 4096, beta 32 / 1, no truncation of the correction range); its attention factor
  `0.1 ln 32 + 1` scales both cos and sin. Half-split (not interleaved) rotation.
- Norms multiply by their weight in fp32, then cast (the release keeps the norms in fp32).
- Untied unembedding.
References: https://github.com/openai/gpt-oss/blob/main/gpt_oss/torch/model.py ,
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt_oss/modeling_gpt_oss.py
The root HF release stores the experts in MXFP4 (`*_blocks` / `*_scales`, blocks along the input dimension, so
[E, out, in] once dequantized); like transformers, the loader must transpose them to the in-major layout above.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import RMSNorm
from ...layers.moe import Experts, TopKRouter, clamped_swiglu
from ...layers.sinks import SinkAttention
from ...modeling_base import HfaPreTrainedModel, MoECausalLM, MoEDecoderModel
from .configuration_gpt_oss import HfaGptOssConfig


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of the raw logits, then a softmax over those k only; weights in the logits' dtype (as the reference
    runtime computes them, so bf16 routing weights match bit for bit). Mathematically equal to
    `softmax_topk(logits, top_k, norm_topk_prob=True)`."""
    top, indices = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=-1, dtype=top.dtype), indices


class GptOssSparseBlock(nn.Module):
    def __init__(self, config: HfaGptOssConfig) -> None:
        super().__init__()
        c = config
        self.router = TopKRouter(c.hidden_size, c.num_local_experts,
                                 functools.partial(topk_softmax, top_k=c.num_experts_per_tok), bias=True)
        self.experts = Experts(c.num_local_experts, c.hidden_size, c.intermediate_size,
                               glu=clamped_swiglu(c.swiglu_alpha, c.swiglu_limit), transposed=True,
                               interleaved=True, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        _, weights, indices = self.router(x)
        return self.experts(x, indices, weights).reshape(b, t, h)


def _norm(config: HfaGptOssConfig) -> RMSNorm:
    return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, weight_in_fp32=True)


class GptOssDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaGptOssConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        sliding = c.layer_types[layer_idx] == "sliding_attention"
        self.self_attn = SinkAttention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, bias=c.attention_bias, dropout=c.attention_dropout,
            sliding_window=c.sliding_window if sliding else None)
        self.mlp = GptOssSparseBlock(c)
        self.input_layernorm = _norm(c)
        self.post_attention_layernorm = _norm(c)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.mlp(self.post_attention_layernorm(h))


class HfaGptOssPreTrainedModel(HfaPreTrainedModel):
    config_class = HfaGptOssConfig
    _no_split_modules = ["GptOssDecoderLayer"]
    _keep_in_fp32_modules = ["post_attention_layernorm", "input_layernorm", "norm"]
    _can_record_outputs = {"hidden_states": GptOssDecoderLayer,
                           "router_logits": OutputRecorder(TopKRouter, index=0)}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SinkAttention):
            init.normal_(module.sinks, mean=0.0, std=std)
        elif isinstance(module, TopKRouter) and module.bias is not None:
            init.normal_(module.bias, mean=0.0, std=std)


class HfaGptOssModel(HfaGptOssPreTrainedModel, MoEDecoderModel):
    layer_class = GptOssDecoderLayer

    def make_norm(self, config: HfaGptOssConfig) -> nn.Module:
        return _norm(config)


class HfaGptOssForCausalLM(HfaGptOssPreTrainedModel, MoECausalLM):
    base_model_class = HfaGptOssModel


__all__ = ["GptOssDecoderLayer", "GptOssSparseBlock", "HfaGptOssForCausalLM", "HfaGptOssModel",
           "HfaGptOssPreTrainedModel", "topk_softmax"]
