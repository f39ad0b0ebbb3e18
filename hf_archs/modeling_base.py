"""The shared PreTrainedModel base and the plain decoder loop.

Every architecture supplies a config, a decoder layer (written out in its own modeling file) and a few class
attributes; this file never grows model-specific flags. Data flow of `DecoderModel.forward`:

    input_ids ─► embed_tokens (× embed_scale) ─► h
    positions ─► one (cos, sin) per RoPE variant in `rope_parameters` (None for NoPE layers)
    attention_mask ─► one mask per entry of `layer_types` (full / sliding / chunked)
    for each layer i:  h = layer_i(h, rope[layer_types[i]], mask[layer_types[i]], cache)
    h ─► norm ─► last_hidden_state            (CausalLM: ─► lm_head ─► logits)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import (
    create_causal_mask,
    create_chunked_causal_mask,
    create_recurrent_attention_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .errors import InputError
from .layers import Linear, RMSNorm, RotaryEmbedding, attention_function
from .layers.moe import load_balancing_loss

MASK_FUNCTIONS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
    "chunked_attention": create_chunked_causal_mask,
    "linear_attention": create_recurrent_attention_mask,  # the 2-D padding mask (or None): recurrent layers
}


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Refuse inputs that would otherwise give garbage or an opaque indexing error."""
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise InputError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise InputError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise InputError(f"input_ids is empty (shape {tuple(input_ids.shape)}): at least one token is needed")
    if torch.compiler.is_compiling():
        return
    if input_ids.device.type != "cpu":
        # No host sync on an accelerator (it would stall every decoding step): a device-side assertion instead.
        torch._assert_async(((input_ids >= 0) & (input_ids < vocab_size)).all(),
                            f"input_ids contains a token id outside the vocabulary [0, {vocab_size})")
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise InputError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size})")


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


class HfaPreTrainedModel(PreTrainedModel):
    """Class flags shared by every architecture here; each sets `config_class` and `_no_split_modules`."""

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RMSNorm):
            init.zeros_(module.weight) if module.unit_offset else init.ones_(module.weight)
        elif not isinstance(module, RotaryEmbedding):
            super()._init_weights(module)
        if hasattr(module, "init_buffers"):  # non-persistent buffers: RoPE frequencies, embedding scales
            device = next((b.device for b in module.buffers(recurse=False) if b.device.type != "meta"), None)
            module.init_buffers(device)

    def reset_buffers(self, device: torch.device | str = "cpu") -> None:
        """Recompute every non-persistent buffer on `device` (a model built on the meta device has none)."""
        for module in self.modules():
            if hasattr(module, "init_buffers"):
                module.init_buffers(device)


class DecoderModel(HfaPreTrainedModel):
    """Embeddings, a stack of `layer_class` decoder layers, a final norm.

    Subclasses set `layer_class` and may override `make_embedding` / `make_norm`.
    """

    layer_class: type[nn.Module]
    output_class: type[BaseModelOutputWithPast] = BaseModelOutputWithPast
    # Models with recurrent (linear-attention) layers: a packed batch (several documents per row, told apart by
    # position ids restarting) runs without a cache, since attention layers keep documents apart only then
    # (transformers builds the block-diagonal mask from the position ids) and the recurrent layers read the same ids.
    packed_runs_without_cache: bool = False

    def __init__(self, config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = self.make_embedding(config)
        self.layers = nn.ModuleList(self.make_layers(config))
        self.norm = self.make_norm(config)
        self.rotary_emb = nn.ModuleDict(
            {name: self.make_rotary(config, params) for name, params in config.rope_variants().items()})
        # Per-layer plans read once (config attribute access is slow on every decoding step).
        self._rope_of = [config.rope_variant_of_layer(i) for i in range(config.num_hidden_layers)]
        self._layer_types = list(config.layer_types)
        self.gradient_checkpointing = False
        self.post_init()

    def make_layers(self, config) -> list[nn.Module]:
        """The decoder layers; a release may keep more after them (MTP layers), which `forward` does not run."""
        return [self.layer_class(config, i) for i in range(config.num_hidden_layers)]

    def make_embedding(self, config) -> nn.Module:
        return nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def make_norm(self, config) -> nn.Module:
        return RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def make_rotary(self, config, rope_parameters: dict) -> RotaryEmbedding:
        return RotaryEmbedding(config.head_dim, rope_parameters)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        elif inputs_embeds.shape[1] == 0:
            raise InputError("inputs_embeds is empty: at least one position is needed")
        if self.packed_runs_without_cache and position_ids is not None and is_packed(position_ids, attention_mask):
            if cached_length(cache) > 0:
                raise InputError("packed sequences (position_ids restarting inside a row) cannot continue a cache")
            attention_mask, cache, use_cache = None, None, False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cached_length(cache)
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)

        layer_types = self._layer_types
        masks = attention_mask if isinstance(attention_mask, dict) else {
            kind: MASK_FUNCTIONS[kind](config=self.config, inputs_embeds=inputs_embeds,
                                       attention_mask=attention_mask, cache=cache, position_ids=position_ids)
            for kind in set(layer_types)}
        rope = {name: emb(inputs_embeds, position_ids) for name, emb in self.rotary_emb.items()}
        rope_of = self._rope_of.__getitem__
        attention_fn = attention_function(self.config._attn_implementation)

        hidden_states = inputs_embeds
        # zip stops at the decoder layers: MTP layers a release keeps after them (`make_layers`) do not run here
        for i, (layer, kind) in enumerate(zip(self.layers, layer_types)):
            hidden_states = layer(hidden_states, position_embeddings=rope.get(rope_of(i)),
                                  attention_mask=masks[kind], cache=cache, attention_fn=attention_fn,
                                  position_ids=position_ids, **kwargs)
        return self.output_class(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)


class CausalLM(HfaPreTrainedModel, GenerationMixin):
    """A `DecoderModel` and a linear head. Subclasses set `base_model_class` (and may override `process_logits`)."""

    base_model_class: type[DecoderModel]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        logits = self.process_logits(self.lm_head(hidden_states))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return self.finish_output(CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache,
                                                         hidden_states=out.hidden_states, attentions=out.attentions),
                                  out, attention_mask)

    def finish_output(self, result: CausalLMOutputWithPast, model_output: BaseModelOutputWithPast,
                      attention_mask: torch.Tensor | None) -> CausalLMOutputWithPast:
        """Hook for extra outputs and losses (the MoE subclass adds router logits and the auxiliary loss)."""
        return result


class MoEDecoderModel(DecoderModel):
    """Same as DecoderModel except: outputs can carry each MoE layer's router logits (`output_router_logits`)."""

    output_class = MoeModelOutputWithPast


class MoECausalLM(CausalLM):
    """Same as CausalLM except: with `output_router_logits` (argument or config) the output carries the router
    logits and the release's load-balancing auxiliary loss (`router_balance_loss`), added to the loss times
    `router_aux_loss_coef` when there are labels. Config fields read: `output_router_logits`,
    `router_aux_loss_coef`, `num_experts_per_tok`, the expert count from `num_experts` / `num_local_experts` /
    `n_routed_experts`, and DeepSeek's `seq_aux` where the config has it.
    """

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                output_router_logits: bool | None = None, **kwargs: Any) -> MoeCausalLMOutputWithPast:
        # Every argument is named (no *args): `generate` reads the signature, and passes `logits_to_keep=1` to
        # the prompt's forward only when it finds that name there.
        if output_router_logits is None:
            output_router_logits = getattr(self.config, "output_router_logits", False)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, output_router_logits=output_router_logits, **kwargs)

    @property
    def num_routed_experts(self) -> int:
        c = self.config
        return next(getattr(c, n) for n in ("num_experts", "num_local_experts", "n_routed_experts") if hasattr(c, n))

    def router_balance_loss(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None,
                            batch_size: int) -> torch.Tensor:
        """The auxiliary loss of the release's recipe, before its coefficient, from the router logits (one
        `[batch_size * seq, experts]` per MoE layer):
        - configs with DeepSeek's `seq_aux` field (DeepSeek V3, Kimi K2): DeepSeek's complementary balance loss
          (`balancing.sequence_balance_loss`; per sequence, or over the batch with `seq_aux: false`), in training
          mode only, as DeepSeek's gate computes it (`if self.training`); zero in eval mode.
        - otherwise the Switch-Transformer loss in transformers' convention (`load_balancing_loss`).
        """
        seq_aux = getattr(self.config, "seq_aux", None)
        if seq_aux is None:
            return load_balancing_loss(router_logits, self.num_routed_experts, self.config.num_experts_per_tok,
                                       attention_mask)
        if not self.training:
            return router_logits[0].new_zeros((), dtype=torch.float32)
        from .balancing import sequence_balance_loss

        return sequence_balance_loss(router_logits, self.config.num_experts_per_tok, batch_size, attention_mask,
                                     per_sequence=seq_aux)

    def finish_output(self, result, model_output, attention_mask):
        router_logits = getattr(model_output, "router_logits", None)
        aux_loss = None
        if router_logits:
            aux_loss = self.router_balance_loss(router_logits, attention_mask,
                                                model_output.last_hidden_state.shape[0])
            if result.loss is not None:
                result.loss = result.loss + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(loss=result.loss, aux_loss=aux_loss, logits=result.logits,
                                         cache=result.cache, hidden_states=result.hidden_states,
                                         attentions=result.attentions, router_logits=router_logits)
