"""GLM-4.5 / GLM-4.5-Air: a GQA decoder with a dense prefix and DeepSeek-style routed experts.

How it differs from a plain pre-norm GQA decoder (Llama):
- Attention: biases on q/k/v (none on o), `head_dim` from the release (96 heads x 128 = 12288 > hidden 5120),
  optional per-head QK-norm before RoPE (`use_qk_norm`: GLM-4.5 yes, Air no), partial RoPE on the first half
  of each head (`partial_rotary_factor` 0.5, rotate-half pairing).
- MLP plan (`mlp_layer_types`): the first `first_k_dense_replace` layers are dense SwiGLU; the others route.
- Routed layers: sigmoid router in fp32 whose choice adds `e_score_correction_bias` (aux-loss-free balancing)
  and is limited to the `topk_group` best of `n_group` groups; weights are the unbiased scores, renormalised,
  times `routed_scaling_factor`; plus one always-on shared expert (`mlp.shared_experts`).
- Experts are fused 3-D parameters; the release's per-expert `mlp.experts.<e>.{gate,up,down}_proj.weight` are
  fused at load and written back on save.
- `num_nextn_predict_layers` MTP layers follow the decoder in `model.layers` (the release's layout: layer 92 of
  GLM-4.5, 46 of Air): a routed decoder layer plus enorm / hnorm / eh_proj / embed_tokens / shared_head, run by
  `hf_archs/mtp.py` (training loss, `generate(use_mtp=True)`), never by the main forward.
References: https://arxiv.org/abs/2508.06471 (GLM-4.5),
https://github.com/huggingface/transformers/blob/main/src/transformers/models/glm4_moe/modeling_glm4_moe.py
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils.output_capturing import OutputRecorder

from ...layers import Attention, GatedMLP, RMSNorm
from ...layers.moe import Experts, TopKRouter, act_glu
from ...modeling_base import HfaPreTrainedModel, MoECausalLM, MoEDecoderModel
from ...mtp import MTPDecoderLayers, MTPLayer, MultiTokenPrediction
from .configuration_glm4_moe import HfaGlm4MoeConfig


def sigmoid_grouped_topk_in_slot_order(logits: torch.Tensor, top_k: int, correction_bias: torch.Tensor | None = None,
                                       n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                                       routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as layers.moe.sigmoid_grouped_topk except: the k chosen experts come in `torch.topk(sorted=False)`
    order, as transformers' GLM-4.5 / MiniMax-M2 routers return them. The order reaches bf16 outputs: the k
    weights are normalised by their fp32 sum, and the experts add the k outputs in slot order (`Experts(slot_sum=True)`)."""
    scores = logits.float().sigmoid()  # [tokens, experts]
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        grouped = choice.unflatten(-1, (n_group, -1))  # [tokens, groups, experts / group]
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # a group scores by its best two
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(
            1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    indices = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


class Glm4MoeSparseBlock(nn.Module):
    def __init__(self, config: HfaGlm4MoeConfig) -> None:
        super().__init__()
        c = config
        self.gate = TopKRouter(c.hidden_size, c.n_routed_experts, functools.partial(
            sigmoid_grouped_topk_in_slot_order, top_k=c.num_experts_per_tok, n_group=c.n_group,
            topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor),
            correction_bias=True, fp32=True)
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
                               glu=act_glu(c.hidden_act), slot_sum=True)
        self.shared_experts = GatedMLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, act=c.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        _, weights, indices = self.gate(x)
        return self.experts(x, indices, weights).reshape(b, t, h) + self.shared_experts(hidden_states)


class Glm4MoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaGlm4MoeConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        norm = (lambda: RMSNorm(c.head_dim, eps=c.rms_norm_eps)) if c.use_qk_norm else (lambda: None)
        self.self_attn = Attention(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, bias=c.attention_bias, o_bias=False,
            dropout=c.attention_dropout, q_norm=norm(), k_norm=norm())  # per head, before RoPE
        self.mlp = (Glm4MoeSparseBlock(c) if c.mlp_layer_type(layer_idx) == "sparse"
                    else GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act))
        self.input_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, cache=None,
                **kwargs) -> torch.Tensor:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                           attention_mask, cache, **kwargs)
        return h + self.mlp(self.post_attention_layernorm(h))


class Glm4MoeMTPLayer(MTPLayer, Glm4MoeDecoderLayer):
    """GLM's MTP module `model.layers.{num_hidden_layers + k}`: a routed decoder layer plus enorm / hnorm / eh_proj
    (embedding first) and stored copies of the embedding and head, the names vLLM's glm4_moe_mtp.py reads."""

    def __init__(self, config: HfaGlm4MoeConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.add_mtp_modules(config.hidden_size, config.vocab_size,
                             norm=lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps),
                             padding_idx=config.pad_token_id)


class HfaGlm4MoePreTrainedModel(HfaPreTrainedModel):
    config_class = HfaGlm4MoeConfig
    _no_split_modules = ["Glm4MoeDecoderLayer", "Glm4MoeMTPLayer"]
    # The router runs in fp32; keep its weight and the balancing bias fp32 when loading in bf16 (as transformers).
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    _can_record_outputs = {"hidden_states": Glm4MoeDecoderLayer,
                           "router_logits": OutputRecorder(TopKRouter, index=0)}


class HfaGlm4MoeModel(HfaGlm4MoePreTrainedModel, MTPDecoderLayers, MoEDecoderModel):
    layer_class = Glm4MoeDecoderLayer
    mtp_layer_class = Glm4MoeMTPLayer


class HfaGlm4MoeForCausalLM(HfaGlm4MoePreTrainedModel, MultiTokenPrediction, MoECausalLM):
    base_model_class = HfaGlm4MoeModel


__all__ = ["Glm4MoeDecoderLayer", "Glm4MoeMTPLayer", "HfaGlm4MoeForCausalLM", "HfaGlm4MoeModel", "HfaGlm4MoePreTrainedModel",
           "sigmoid_grouped_topk_in_slot_order"]
