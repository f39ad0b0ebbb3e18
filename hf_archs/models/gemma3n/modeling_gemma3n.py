"""Gemma 3n (text decoder): the language model of google/gemma-3n-E2B and -E4B.

How it differs from a plain pre-norm GQA decoder (Llama), beyond what Gemma 3 already does (sandwich norms, scaled
embeddings, GeGLU, 4 sliding-window : 1 full layers with their own RoPE bases, final logit soft-cap):
- AltUp (Alternating Updates, https://arxiv.org/abs/2301.13310): the residual stream is `altup_num_inputs` (4)
  streams. The embedding is stream 0; streams 1-3 are projections of it rescaled to its RMS. Each layer *predicts*
  all streams from a learned mix (coefficients from a tanh router on stream 0), runs attention + MLP on the active
  stream only, then *corrects* every stream with the innovation (output - prediction). At the end streams 1-3 are
  projected back, rescaled, and the four are averaged.
- LAuReL (Learned Augmented Residual Layer, https://arxiv.org/abs/2411.07501): a rank-64 linear branch beside
  attention; the two residual sums are averaged with a 1/sqrt(2) factor.
- Per-layer embeddings: a second table (`vocab_size_per_layer_input` x layers * 256) plus a projection of the
  embedding give every layer a 256-wide input, which gates (GeLU(W h) * input) an update added to streams 1-3.
- KV sharing: the last `num_kv_shared_layers` layers have no k/v projections; they attend over the keys and values
  of the last earlier layer of the same type, and keep no cache of their own (`DummyLayer` in `DynamicCache`).
- Values are RMS-normalised per head (no weight); the attention scale is 1.
- Gaussian top-k activation sparsity on the first layers' gate pre-activations (cut at mean + std * Phi^-1(0.95)).
- FFN width per layer (`intermediate_size` is a list: MatFormer slices, see `hf_archs.matformer`).
- Norms are `w * norm(x)` (weights stored as is, not zero-centred), with 1/rms computed as `pow(ms, -0.5)`.
References: https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma3n/modeling_gemma3n.py
(the Gemma3nText* classes) and https://ai.google.dev/gemma/docs/gemma-3n.

Data flow of `HfaGemma3nModel.forward`:

    input_ids ─► embed_tokens (× sqrt(hidden)) ─► e ──► stream 0 = e, stream k = rms-matched altup_projections[k](e)
        │                                         └───► per_layer_model_projection(e) × hidden^-0.5 ─► norm ─┐
        └─► embed_tokens_per_layer (× sqrt(256)) ──────────────────────────────────────────── (+) × 2^-0.5 ─► p
    for each layer i:  streams = layer_i(streams, rope[type_i], p[:, :, i], mask[type_i], cache, shared_kv)
    streams ─► stream 0 and rms-matched altup_unembed_projections[k](stream k), averaged ─► norm ─► last_hidden_state
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ...errors import InputError
from ...layers import Attention, GatedMLP, Linear, RMSNorm, RotaryEmbedding, apply_rope, attend, eager_attention
from ...modeling_base import MASK_FUNCTIONS, CausalLM, HfaPreTrainedModel, attention_function, check_input_ids
from ..gemma3.modeling_gemma3 import ScaledWordEmbedding
from .configuration_gemma3n import HfaGemma3nConfig


class Gemma3nRMSNorm(RMSNorm):
    """Same as RMSNorm(unit_offset=False, weight_in_fp32=True) except: 1/rms is `pow(ms + eps, -0.5)`, the op the
    reference runtime uses (chosen there to match JAX); `rsqrt` may round differently on some devices."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__(dim, eps=eps, unit_offset=False, weight_in_fp32=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == self.weight.dtype:
            # torch's fused CPU kernel: these exact bits in one op (tests/test_gemma3n.py), ~11 norms per layer
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        return (h * self.weight.float()).to(x.dtype)


def _unit_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm without a weight (the values' norm)."""
    if x.device.type == "cpu":
        return F.rms_norm(x, x.shape[-1:], None, eps)  # the same bits on the CPU (tests/test_gemma3n.py)
    h = x.float()
    return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)).to(x.dtype)


class Gemma3nAttention(Attention):
    """Same as Attention except: values are RMS-normalised per head (no weight); the scale is 1; a KV-shared layer
    (`kv_source` set) has no k/v projections or k norm and attends over the keys and values its source layer put in
    `shared_kv` (after the source's cache update, so all positions the source sees), storing nothing itself;
    `stores_kv` marks a source layer."""

    def __init__(self, config: HfaGemma3nConfig, layer_idx: int) -> None:
        c = config
        sliding = c.layer_types[layer_idx] == "sliding_attention"
        super().__init__(
            hidden_size=c.hidden_size, num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, layer_idx=layer_idx, scaling=1.0, bias=c.attention_bias, dropout=c.attention_dropout,
            q_norm=Gemma3nRMSNorm(c.head_dim, eps=c.rms_norm_eps),  # per head, before RoPE
            k_norm=Gemma3nRMSNorm(c.head_dim, eps=c.rms_norm_eps),
            sliding_window=c.sliding_window if sliding else None)
        self.eps = c.rms_norm_eps
        self.kv_source = c.kv_sources().get(layer_idx)
        self.stores_kv = c.kv_sharing_modes[layer_idx] == "store"
        if self.kv_source is not None:  # the release ships these for shared layers too, unused; we build none
            self.k_proj = self.v_proj = self.k_norm = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache: Cache | None = None,
                attention_fn: Callable = eager_attention, shared_kv: dict | None = None, **kwargs) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        cos, sin = position_embeddings
        q = self.q_norm(self.q_proj(hidden_states).view(b, t, -1, self.head_dim)).transpose(1, 2)  # [b, h, t, d]
        q = apply_rope(q, cos, sin)
        if self.kv_source is not None:
            k, v = shared_kv[self.kv_source]  # [b, kv_h, kv_len, d]: every position the source layer attends to
        else:
            k = self.k_norm(self.k_proj(hidden_states).view(b, t, -1, self.head_dim)).transpose(1, 2)
            k = apply_rope(k, cos, sin)
            v = _unit_rms_norm(self.v_proj(hidden_states).view(b, t, -1, self.head_dim), self.eps).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            if self.stores_kv:
                shared_kv[self.layer_idx] = (k, v)
        out, _ = attend(attention_fn, self, q, k, v, attention_mask, scaling=self.scaling,
                        dropout=self.attention_dropout if self.training else 0.0,
                        sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(b, t, -1))


class SparseGatedMLP(GatedMLP):
    """Same as GatedMLP except: with `activation_sparsity` s > 0, the gate pre-activations g become
    `relu(g - (mean(g) + std(g) * Phi^-1(s)))` over the hidden units before the activation: a Gaussian estimate of
    keeping the top (1 - s) fraction, shifted to start at 0."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, activation_sparsity: float) -> None:
        super().__init__(hidden_size, intermediate_size, act=act)
        self.activation_sparsity = activation_sparsity

    def gaussian_topk(self, gate: torch.Tensor) -> torch.Tensor:
        target = torch.tensor(self.activation_sparsity, dtype=torch.float32, device=gate.device)
        std_multiplier = torch.distributions.normal.Normal(0, 1).icdf(target).type(gate.dtype)
        mean = torch.mean(gate, dim=-1, keepdim=True)
        std = torch.std(gate, dim=-1, keepdim=True, unbiased=False)
        return nn.functional.relu(gate - (mean + std * std_multiplier))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.activation_sparsity > 0.0:
            gate = self.gaussian_topk(gate)
        return self.down_proj(self.act_fn(gate) * self.up_proj(x))


class Laurel(nn.Module):
    """LAuReL's low-rank branch: `x + norm(right(left(x)))`."""

    def __init__(self, hidden_size: int, rank: int, eps: float) -> None:
        super().__init__()
        self.linear_left = Linear(hidden_size, rank, bias=False)
        self.linear_right = Linear(rank, hidden_size, bias=False)
        self.post_laurel_norm = Gemma3nRMSNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    """AltUp's predict / correct over `num_inputs` streams stacked as `[n, batch, seq, hidden]`.

    The router `tanh(modality_router(router_norm(x) / hidden))` gives n coefficients per token; `predict` mixes the
    streams with an n x n matrix per token (`prediction_coefs`), `correct` adds the active stream's innovation to
    each stream scaled by `1 + correction_coefs(router)`. In training the coefficient weights are clipped to
    `coef_clip`, as the reference does (it clips `prediction_coefs` in place).
    """

    def __init__(self, hidden_size: int, num_inputs: int, active_idx: int, coef_clip: float | None,
                 eps: float) -> None:
        super().__init__()
        self.hidden_size, self.num_inputs = hidden_size, num_inputs
        self.active_idx, self.coef_clip = active_idx, coef_clip
        self.correct_output_scale = nn.Parameter(torch.zeros(hidden_size))
        self.correction_coefs = Linear(num_inputs, num_inputs, bias=False)
        self.prediction_coefs = Linear(num_inputs, num_inputs**2, bias=False)
        self.modality_router = Linear(hidden_size, num_inputs, bias=False)
        self.router_norm = Gemma3nRMSNorm(hidden_size, eps=eps)
        self.router_input_scale = nn.Buffer(torch.tensor(hidden_size**-1.0), persistent=False)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent `router_input_scale` (after building on the meta device, say)."""
        self.router_input_scale = nn.Buffer(torch.tensor(self.hidden_size**-1.0, device=device or "cpu"),
                                            persistent=False)

    def router(self, x: torch.Tensor) -> torch.Tensor:
        routed = self.modality_router(self.router_norm(x) * self.router_input_scale)
        return torch.tanh(routed.float()).type_as(x)  # [b, t, n]

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        modalities = self.router(streams[self.active_idx])
        if self.training and self.coef_clip is not None:
            self.prediction_coefs.weight.data.clamp_(-self.coef_clip, self.coef_clip)
        n = self.num_inputs
        coefs = self.prediction_coefs(modalities).reshape(*modalities.shape[:-1], n, n).permute(0, 1, 3, 2)
        predictions = torch.matmul(streams.permute(1, 2, 3, 0), coefs)  # [b, t, hidden, n]
        predictions = predictions.permute(3, 0, 1, 2)
        predictions += streams
        return predictions.contiguous().type_as(streams)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        modalities = self.router(activated)
        innovation = (activated - predictions[self.active_idx]).repeat(self.num_inputs, 1, 1, 1)
        weight = self.correction_coefs.weight
        if self.training and self.coef_clip is not None:
            weight = weight.clamp(-self.coef_clip, self.coef_clip)
        coefs = (nn.functional.linear(modalities, weight) + 1.0).permute(2, 0, 1).unsqueeze(-1)  # [n, b, t, 1]
        corrected = torch.mul(innovation, coefs)
        corrected += predictions
        return corrected.contiguous().type_as(activated)

    def forward(self, corrected: torch.Tensor) -> torch.Tensor:
        """Scales the corrected active stream (a module call, so device hooks move `correct_output_scale`)."""
        return (corrected.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(corrected)


class Gemma3nDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HfaGemma3nConfig, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.altup_active_idx, self.altup_correct_scale = c.altup_active_idx, c.altup_correct_scale
        self.self_attn = Gemma3nAttention(c, layer_idx)
        self.mlp = SparseGatedMLP(c.hidden_size, c.intermediate_size[layer_idx], c.hidden_activation,
                                  c.activation_sparsity_pattern[layer_idx])
        self.input_layernorm = Gemma3nRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = Gemma3nRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.pre_feedforward_layernorm = Gemma3nRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_feedforward_layernorm = Gemma3nRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.altup = AltUp(c.hidden_size, c.altup_num_inputs, c.altup_active_idx, c.altup_coef_clip, c.rms_norm_eps)
        self.laurel = Laurel(c.hidden_size, c.laurel_rank, c.rms_norm_eps)
        self.act_fn = ACT2FN[c.hidden_activation]
        self.per_layer_input_gate = Linear(c.hidden_size, c.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = Linear(c.hidden_size_per_layer_input, c.hidden_size, bias=False)
        self.post_per_layer_input_norm = Gemma3nRMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings, per_layer_input: torch.Tensor,
                attention_mask, cache=None, shared_kv: dict | None = None, **kwargs) -> torch.Tensor:
        # hidden_states: [altup_num_inputs, b, t, hidden]; per_layer_input: [b, t, hidden_size_per_layer_input]
        predictions = self.altup.predict(hidden_states)
        active = predictions[self.altup_active_idx]
        normed = self.input_layernorm(active)
        laurel = self.laurel(normed)
        # Sandwich norms on the active stream; the attention and LAuReL residuals are averaged (1/sqrt 2).
        attn = self.post_attention_layernorm(
            self.self_attn(normed, position_embeddings, attention_mask, cache, shared_kv=shared_kv, **kwargs))
        h = (active + attn + laurel) / math.sqrt(2)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)

        # Per-layer input: gate it with the (scaled) corrected active stream, add the update to the other streams.
        first = corrected[self.altup_active_idx].clone()
        if self.altup_correct_scale:
            first = self.altup(first)
        first = torch.multiply(self.act_fn(self.per_layer_input_gate(first)), per_layer_input)
        first = self.post_per_layer_input_norm(self.per_layer_projection(first))
        corrected[1:] += first
        return corrected


class HfaGemma3nPreTrainedModel(HfaPreTrainedModel):
    config_class = HfaGemma3nConfig
    _no_split_modules = ["Gemma3nDecoderLayer"]
    _can_record_outputs = {"hidden_states": Gemma3nDecoderLayer}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, AltUp):
            init.zeros_(module.correct_output_scale)


class HfaGemma3nModel(HfaGemma3nPreTrainedModel):
    """Embeddings, per-layer inputs, the AltUp streams around a stack of `Gemma3nDecoderLayer`s, a final norm."""

    def __init__(self, config: HfaGemma3nConfig) -> None:
        super().__init__(config)
        c = config
        n_layers, per_layer = c.num_hidden_layers, c.hidden_size_per_layer_input
        self.padding_idx = c.pad_token_id
        self.vocab_size = c.vocab_size
        self.embed_tokens = ScaledWordEmbedding(c.vocab_size, c.hidden_size, c.pad_token_id,
                                                embed_scale=c.hidden_size**0.5)
        self.layers = nn.ModuleList(Gemma3nDecoderLayer(c, i) for i in range(n_layers))
        self.norm = Gemma3nRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.rotary_emb = nn.ModuleDict(
            {name: RotaryEmbedding(c.head_dim, params) for name, params in c.rope_variants().items()})
        # [vocab_per_layer, layers * per_layer]: one `per_layer`-wide slice per layer, layer-major.
        self.embed_tokens_per_layer = ScaledWordEmbedding(c.vocab_size_per_layer_input, n_layers * per_layer,
                                                          c.pad_token_id, embed_scale=per_layer**0.5)
        self.per_layer_model_projection = Linear(c.hidden_size, n_layers * per_layer, bias=False)
        self.per_layer_projection_norm = Gemma3nRMSNorm(per_layer, eps=c.rms_norm_eps)
        self.altup_projections = nn.ModuleList(
            Linear(c.hidden_size, c.hidden_size, bias=False) for _ in range(1, c.altup_num_inputs))
        self.altup_unembed_projections = nn.ModuleList(
            Linear(c.hidden_size, c.hidden_size, bias=False) for _ in range(1, c.altup_num_inputs))
        self.per_layer_projection_scale = nn.Buffer(torch.tensor(c.hidden_size**-0.5), persistent=False)
        self.per_layer_input_scale = nn.Buffer(torch.rsqrt(torch.tensor(2.0)), persistent=False)
        self.gradient_checkpointing = False
        self.post_init()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent scales (after building on the meta device, say)."""
        device = device or "cpu"
        self.per_layer_projection_scale = nn.Buffer(torch.tensor(self.config.hidden_size**-0.5, device=device),
                                                    persistent=False)
        self.per_layer_input_scale = nn.Buffer(torch.rsqrt(torch.tensor(2.0, device=device)), persistent=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def get_per_layer_inputs(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """`[b, t, layers, per_layer]` from the per-layer table; ids past it (multimodal tokens) read row 0."""
        in_table = (input_ids >= 0) & (input_ids < self.config.vocab_size_per_layer_input)
        ids = torch.where(in_table, input_ids, 0)
        return self.embed_tokens_per_layer(ids).reshape(*ids.shape, self.config.num_hidden_layers,
                                                        self.config.hidden_size_per_layer_input)

    def project_per_layer_inputs(self, inputs_embeds: torch.Tensor,
                                 per_layer_inputs: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        projection = self.per_layer_model_projection(inputs_embeds)
        projection *= self.per_layer_projection_scale.to(dtype=inputs_embeds.dtype, device=projection.device)
        projection = projection.reshape(*inputs_embeds.shape[:-1], c.num_hidden_layers, c.hidden_size_per_layer_input)
        projection = self.per_layer_projection_norm(projection)
        if per_layer_inputs is None:
            return projection
        if per_layer_inputs.shape != projection.shape:  # callers may pad the layer axis
            per_layer_inputs = per_layer_inputs[..., : c.num_hidden_layers, :]
        return (projection + per_layer_inputs) * self.per_layer_input_scale.to(dtype=inputs_embeds.dtype,
                                                                               device=projection.device)

    @staticmethod
    def _rms_matched(x: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
        rms = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=1e-5))
        return x * target_rms / rms

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)  # layer outputs are the stacked streams, not the final state
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, per_layer_inputs: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache: Cache | None = None, inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        c = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids, c.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
            per_layer_inputs = self.get_per_layer_inputs(input_ids)
        elif inputs_embeds.shape[1] == 0:
            raise InputError("inputs_embeds is empty: at least one position is needed")
        per_layer_inputs = self.project_per_layer_inputs(inputs_embeds, per_layer_inputs)  # [b, t, layers, p]
        if use_cache and cache is None:
            cache = DynamicCache(config=c)  # KV-shared layers get a DummyLayer: no cache of their own
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)

        masks = attention_mask if isinstance(attention_mask, dict) else {
            kind: MASK_FUNCTIONS[kind](config=c, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                       cache=cache, position_ids=position_ids)
            for kind in set(c.layer_types)}
        attention_fn = attention_function(c._attn_implementation)

        # AltUp streams: [altup_num_inputs, b, t, hidden], streams 1.. rescaled to the embedding's RMS.
        target_rms = torch.mean(inputs_embeds**2, dim=-1, keepdim=True) ** 0.5
        streams = [inputs_embeds] + [
            self._rms_matched(proj(inputs_embeds).to(dtype=inputs_embeds.dtype), target_rms)
            for proj in self.altup_projections]
        hidden_states = torch.stack(streams, dim=0)
        rope = {name: emb(hidden_states, position_ids) for name, emb in self.rotary_emb.items()}

        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # source layer -> its keys and values
        for i, layer in enumerate(self.layers):
            kind = c.layer_types[i]
            hidden_states = layer(hidden_states, rope[c.rope_variant_of_layer(i)], per_layer_inputs[:, :, i, :],
                                  attention_mask=masks[kind], cache=cache, shared_kv=shared_kv,
                                  attention_fn=attention_fn, position_ids=position_ids, **kwargs)

        target_rms = torch.mean(hidden_states[0] ** 2, dim=-1, keepdim=True) ** 0.5
        streams = [hidden_states[0]] + [
            self._rms_matched(proj(hidden_states[k + 1]).to(dtype=inputs_embeds.dtype), target_rms)
            for k, proj in enumerate(self.altup_unembed_projections)]
        hidden_states = torch.mean(torch.stack(streams), dim=0)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)


class HfaGemma3nForCausalLM(HfaGemma3nPreTrainedModel, CausalLM):
    base_model_class = HfaGemma3nModel

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap


__all__ = ["AltUp", "Gemma3nAttention", "Gemma3nDecoderLayer", "Gemma3nRMSNorm", "HfaGemma3nForCausalLM",
           "HfaGemma3nModel", "HfaGemma3nPreTrainedModel", "Laurel", "SparseGatedMLP"]
