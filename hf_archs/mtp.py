"""Multi-token prediction (MTP): the extra modules DeepSeek V3 and GLM-4.5 ship and MiniMax-M2's config declares
(its files hold none), for training and for self-speculative greedy decoding. Nothing here is specific to one
architecture.

An MTP module k (1-based) turns the representation of position i at depth k - 1 (the main model's final, normed
hidden state for k = 1; module k - 1's output otherwise) and the embedding of token i + k into a prediction of token
i + k + 1 (DeepSeek-V3 report, section 2.2):

    h_k[i] = Block_k(eh_proj([enorm(Emb(t[i + k])) ; hnorm(h_{k-1}[i])]))        (embedding first: eh_proj)
    logits_k[i] = shared_head.head(shared_head.norm(h_k[i]))

The release layout puts module k right after the decoder, as `model.layers.{num_hidden_layers + k - 1}`: the keys of
a full decoder layer plus `enorm`, `hnorm`, `eh_proj`, `embed_tokens` and `shared_head.{norm,head}` (DeepSeek,
GLM: the embedding and head are stored copies of the main ones; MiniMax-M2, after RBLN-SW/vllm-rbln's
minimax_m2_mtp.py: a head of its own, and the embedding at most once, under the first module, a copy of the main
one). So an MTP layer here is the architecture's own decoder-layer class with those modules added (`MTPLayer`
mixin); `MultiTokenPrediction` (mixed into a CausalLM) adds the training loss and `generate(..., use_mtp=True)`.

Training: `loss = main loss + mtp_loss_weight * mean_k(cross-entropy of module k)` (weight from the config, or the
forward's `mtp_loss_weight=`; by default only in training mode). The main hidden state fed to module 1 is the
normed `last_hidden_state`, as vLLM, SGLang and transformers feed it.

Speculative decoding (`speculative_greedy`): each round the drafter proposes D tokens (module k proposes token
n + k, chaining its own output into module k + 1), the main model scores [x_n, d_1 .. d_D] in one forward, the longest
prefix of drafts equal to the main model's greedy tokens is kept plus the main model's next token, and every cache is
cropped back to the kept tokens. The output is the main model's greedy decoding, token for token, whatever the
drafts (a batch keeps the smallest number of accepted drafts over its rows).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.utils.deprecation import deprecate_kwarg

from .layers import Linear, attention_function
from .modeling_base import MASK_FUNCTIONS


class SharedHead(nn.Module):
    """`shared_head.norm` then `shared_head.head` (None: the caller passes the main model's head)."""

    def __init__(self, norm: nn.Module, head: nn.Linear | None) -> None:
        super().__init__()
        self.norm, self.head = norm, head


class MTPLayer:
    """Mixin for a decoder-layer class: `class MyMTPLayer(MTPLayer, MyDecoderLayer)`, whose `__init__` builds the
    decoder layer and then calls `add_mtp_modules(...)`. The layer's own `forward` is the MTP module's block."""

    def add_mtp_modules(self, hidden_size: int, vocab_size: int, norm: Callable[[], nn.Module],
                        embedding: bool = True, head: bool = True, padding_idx: int | None = None,
                        hidden_first: bool = False) -> None:
        """`norm()` builds one norm over `hidden_size`. `embedding` / `head`: the release stores its own copies
        (DeepSeek, GLM); otherwise the main model's are used. `hidden_first`: eh_proj reads [hidden ; embedding]."""
        self.enorm, self.hnorm = norm(), norm()
        self.eh_proj = Linear(2 * hidden_size, hidden_size, bias=False)
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size, padding_idx) if embedding else None
        self.shared_head = SharedHead(norm(), Linear(hidden_size, vocab_size, bias=False) if head else None)
        self.mtp_hidden_first = hidden_first

    def mtp_embed(self, input_ids: torch.Tensor, main_embedding: nn.Module) -> torch.Tensor:
        return (main_embedding if self.embed_tokens is None else self.embed_tokens)(input_ids)

    def mtp_forward(self, inputs_embeds: torch.Tensor, previous_hidden: torch.Tensor,
                    **layer_kwargs: Any) -> torch.Tensor:
        """`h_k` for the positions of `inputs_embeds` (the embeddings of tokens i + k) and `previous_hidden` (h_{k-1}
        at positions i), both `[batch, seq, hidden]`; `layer_kwargs` are the decoder layer's own arguments."""
        e, h = self.enorm(inputs_embeds), self.hnorm(previous_hidden)
        x = self.eh_proj(torch.cat((h, e) if self.mtp_hidden_first else (e, h), dim=-1))
        return self(x, **layer_kwargs)

    def mtp_logits(self, hidden: torch.Tensor, main_head: nn.Module) -> torch.Tensor:
        head = main_head if self.shared_head.head is None else self.shared_head.head
        return head(self.shared_head.norm(hidden))


class MTPDecoderLayers:
    """Mixin for a DecoderModel (before it in the bases): the release's layout, the MTP layers continue `layers`
    after the decoder's, `mtp_layer_class(config, num_hidden_layers + k)` for k < `config.<mtp_count_field>`."""

    mtp_layer_class: type[nn.Module]
    mtp_count_field = "num_nextn_predict_layers"

    def make_layers(self, config) -> list[nn.Module]:
        n = config.num_hidden_layers
        return [*super().make_layers(config),
                *(self.mtp_layer_class(config, n + k) for k in range(getattr(config, self.mtp_count_field)))]


def _rope_name(model: nn.Module) -> str | None:
    names = list(model.model.rotary_emb.keys())
    return "default" if "default" in names else ("full_attention" if "full_attention" in names else None)


def run_mtp_layer(model: nn.Module, k: int, inputs_embeds: torch.Tensor, previous_hidden: torch.Tensor,
                  position_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache=None) -> torch.Tensor:
    """Module `k` (0-based) of `model` (a `MultiTokenPrediction` CausalLM) on one chunk of positions; with `cache`,
    the module's attention continues from what it cached before (cache layer `num_hidden_layers + k`)."""
    layer = model.mtp_layers[k]
    layer_idx = model.config.num_hidden_layers + k
    name = _rope_name(model)
    rope = None if name is None else model.model.rotary_emb[name](inputs_embeds, position_ids)
    mask = MASK_FUNCTIONS["full_attention"](config=model.config, inputs_embeds=inputs_embeds,
                                            attention_mask=attention_mask, cache=cache, position_ids=position_ids,
                                            layer_idx=layer_idx)
    return layer.mtp_forward(inputs_embeds, previous_hidden, position_embeddings=rope, attention_mask=mask,
                             cache=cache, attention_fn=attention_function(model.config._attn_implementation),
                             position_ids=position_ids)


class MultiTokenPrediction:
    """Mixin for a CausalLM whose `model.layers` continue past `config.num_hidden_layers` with `MTPLayer`s.

    Reads `config.num_hidden_layers` and `config.mtp_loss_weight`; uses `model.rotary_emb`, `lm_head`,
    `process_logits` and `loss_function` like the CausalLM does.
    """

    @property
    def mtp_layers(self) -> list[nn.Module]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, logits_to_keep: int | torch.Tensor = 0,
                mtp_loss_weight: float | None = None, **kwargs: Any):
        if mtp_loss_weight is None:
            mtp_loss_weight = self.config.mtp_loss_weight if self.training else 0.0
        need = labels is not None and mtp_loss_weight > 0 and bool(self.mtp_layers)
        asked = kwargs.get("output_hidden_states")
        if need and not asked:
            kwargs["output_hidden_states"] = -1  # keeps only the last (normed) hidden state
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, inputs_embeds=inputs_embeds, labels=labels, logits_to_keep=logits_to_keep,
                              **kwargs)
        if not need:
            return out
        mtp_loss = self.mtp_loss(out.hidden_states[-1], labels, input_ids, inputs_embeds, attention_mask, position_ids)
        if not asked:
            out = type(out)(**{k: v for k, v in out.items() if k != "hidden_states"})
        out.loss = out.loss + mtp_loss_weight * mtp_loss
        out["mtp_loss"] = mtp_loss
        return out

    def mtp_loss(self, hidden: torch.Tensor, labels: torch.LongTensor, input_ids: torch.LongTensor | None = None,
                 inputs_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.LongTensor | None = None) -> torch.Tensor:
        """Mean over the MTP modules of module k's cross-entropy on token i + k + 1 (labels in the usual unshifted
        convention). `hidden`: the main model's last hidden state `[batch, T, hidden]`. Without `input_ids` the
        future tokens are read from `inputs_embeds` (the main embeddings)."""
        seq = hidden.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq, device=hidden.device).unsqueeze(0)
        previous, losses = hidden, []
        for k, layer in enumerate(self.mtp_layers, start=1):
            n = seq - k
            if n <= 0:
                break
            embeds = (layer.mtp_embed(input_ids[:, k:], self.get_input_embeddings()) if input_ids is not None
                      else inputs_embeds[:, k:])
            # a key position is usable when both its hidden state and its future token are real tokens
            mask = None if attention_mask is None else attention_mask[:, :n] * attention_mask[:, k:]
            previous = run_mtp_layer(self, k - 1, embeds, previous[:, :n], position_ids[:, :n], mask)
            logits = self.process_logits(layer.mtp_logits(previous, self.lm_head))
            losses.append(self.loss_function(logits=logits, labels=labels[:, k:], vocab_size=self.config.vocab_size))
        if not losses:
            return hidden.new_zeros(())
        return torch.stack(losses).mean()

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, use_mtp: bool = False,
                 **kwargs: Any):
        """`generate(..., use_mtp=True)`: greedy decoding drafted by the MTP layers (`speculative_greedy`); the
        output equals `generate(...)` without it. Supports max_new_tokens / max_length, min_new_tokens / min_length,
        eos_token_id, pad_token_id, attention_mask and return_dict_in_generate; refuses sampling, beams and other
        logits processors. Anything else goes to transformers' `generate`."""
        if not use_mtp:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        config = copy.deepcopy(generation_config or self.generation_config)
        model_kwargs = config.update(**kwargs)
        attention_mask = model_kwargs.pop("attention_mask", None)
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate(use_mtp=True) needs input_ids")
        unsupported = [name for name, bad in [
            ("do_sample", config.do_sample), ("num_beams", (config.num_beams or 1) > 1),
            ("repetition_penalty", config.repetition_penalty not in (None, 1.0)),
            ("no_repeat_ngram_size", bool(config.no_repeat_ngram_size)), ("bad_words_ids", bool(config.bad_words_ids)),
            ("suppress_tokens", bool(config.suppress_tokens)), ("sequence_bias", bool(config.sequence_bias)),
            ("forced_eos_token_id", config.forced_eos_token_id is not None),
            ("num_return_sequences", (config.num_return_sequences or 1) > 1)] if bad]
        if unsupported or model_kwargs:
            raise ValueError(f"generate(use_mtp=True) is greedy decoding only; unsupported here: "
                             f"{unsupported + sorted(model_kwargs)}")
        prompt = input_ids.shape[1]
        max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
        min_new = (config.min_new_tokens if config.min_new_tokens is not None
                   else max(0, (config.min_length or 0) - prompt))
        sequences = speculative_greedy(self, input_ids, MTPDrafter(self), attention_mask=attention_mask,
                                       max_new_tokens=max_new, min_new_tokens=min_new,
                                       eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
        return GenerateDecoderOnlyOutput(sequences=sequences) if config.return_dict_in_generate else sequences


class MTPDrafter:
    """Drafts with a model's MTP layers (all, or the first `num_layers`).

    Module k keeps its own cache of the positions whose inputs are all verified tokens ([0, n - k) once token n is
    verified); positions computed from drafted tokens are cropped after each round. `pending[k]` holds module k's
    verified inputs not yet cached (module k - 1's outputs; for k = 0 the main model's hidden states).
    """

    def __init__(self, model: nn.Module, num_layers: int | None = None) -> None:
        self.model = model
        self.num_layers = len(model.mtp_layers) if num_layers is None else num_layers
        if not 0 <= self.num_layers <= len(model.mtp_layers):
            raise ValueError(f"num_layers ({num_layers}) must be in [0, {len(model.mtp_layers)}]")
        first = model.config.num_hidden_layers
        self.cache = DynamicCache()
        self.cache.layers.extend(DynamicLayer() for _ in range(first + self.num_layers))
        self.cache_layers = self.cache.layers[first:]
        self.cached = [0] * self.num_layers
        self.pending: list[torch.Tensor | None] = [None] * self.num_layers

    @torch.no_grad()
    def draft(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None,
              new_hidden: torch.Tensor) -> torch.Tensor:
        """`tokens` / `positions` / `attention_mask`: the verified sequence `[b, n + 1]` (token n is not yet in the
        main cache); `new_hidden`: the main model's hidden states since the last call (positions up to n - 1).
        Returns the drafts `[b, num_layers]` for positions n + 1 ..."""
        model, n = self.model, tokens.shape[1] - 1
        if self.num_layers == 0:
            return tokens.new_zeros(tokens.shape[0], 0)
        for k in range(self.num_layers):
            if self.pending[k] is None:
                self.pending[k] = new_hidden[:, :0]
        self.pending[0] = torch.cat((self.pending[0], new_hidden), dim=1)
        mask = None if attention_mask is None or bool(attention_mask[:, :n].all()) else attention_mask[:, :n]
        extended, drafts, previous_out = tokens, [], None
        for k in range(self.num_layers):
            start = self.cached[k]
            inputs = self.pending[k] if k == 0 else torch.cat((self.pending[k], previous_out), dim=1)
            assert inputs.shape[1] == n - start, (k, inputs.shape, n, start)
            layer = model.mtp_layers[k]
            embeds = layer.mtp_embed(extended[:, start + k + 1:n + k + 1], model.get_input_embeddings())
            out = run_mtp_layer(model, k, embeds, inputs, positions[:, start:n], mask, cache=self.cache)
            logits = model.process_logits(layer.mtp_logits(out[:, -1:], model.lm_head))
            draft = logits.argmax(dim=-1)  # [b, 1]
            drafts.append(draft)
            extended = torch.cat((extended, draft), dim=1)
            # Verified at depth k: positions whose token i + k + 1 <= n.
            keep = max(n - k, 0)
            self.cache_layers[k].crop(keep - n) if keep < n else None
            self.cached[k] = keep
            verified_inputs_end = n if k == 0 else max(n - k + 1, 0)
            self.pending[k] = inputs[:, keep - start:verified_inputs_end - start]
            previous_out = out
        return torch.cat(drafts, dim=1)


@torch.no_grad()
def speculative_greedy(model: nn.Module, input_ids: torch.LongTensor, drafter: Any | None = None,
                       attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                       eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                       stats: dict | None = None) -> torch.LongTensor:
    """Greedy decoding of `model` (an hf_archs CausalLM) with drafts from `drafter.draft(tokens, positions,
    attention_mask, new_hidden) -> [b, D]` (None: plain greedy, one token per forward). Returns prompt + new tokens
    as `generate` does (rows that hit EOS continue with `pad_token_id`). `stats`, if given, receives the number of
    main-model forwards and of accepted drafts."""
    if max_new_tokens <= 0:
        return input_ids
    device, (b, prompt) = input_ids.device, input_ids.shape
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    if attention_mask is None:
        positions = torch.arange(prompt, device=device).expand(b, -1)
    else:  # generate's rule (`_prepare_position_ids_for_generation`)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)

    def forward(ids: torch.Tensor, pos: torch.Tensor, full_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model.model(input_ids=ids, attention_mask=None if bool(full_mask.all()) else full_mask,
                          position_ids=pos, cache=cache, use_cache=True)
        return out.last_hidden_state, model.process_logits(model.lm_head(out.last_hidden_state)).float()

    def pick(logits: torch.Tensor, generated: int) -> torch.Tensor:  # logits [b, j, V] -> greedy tokens [b, j]
        if len(eos) and generated < min_new_tokens:
            logits = logits.clone()
            early = min(logits.shape[1], min_new_tokens - generated)
            logits[:, :early, eos_ids] = float("-inf")  # MinNewTokensLengthLogitsProcessor
        return logits.argmax(dim=-1)

    hidden, logits = forward(input_ids, positions, mask)
    tokens, finished = input_ids, torch.zeros(b, dtype=torch.bool, device=device)
    new_hidden, chosen, generated, rounds, accepted = hidden, pick(logits[:, -1:], 0), 0, 1, 0
    while True:
        for j in range(chosen.shape[1]):  # append, honouring EOS row by row
            token = torch.where(finished, torch.full_like(chosen[:, j], pad_token_id), chosen[:, j])
            finished = finished | torch.isin(token, eos_ids)
            tokens = torch.cat((tokens, token[:, None]), dim=1)
            positions = torch.cat((positions, positions[:, -1:] + 1), dim=1)
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            generated += 1
            if bool(finished.all()):  # generate stops at once (no padding after the last EOS)
                break
        if generated >= max_new_tokens or bool(finished.all()):
            break
        n = tokens.shape[1] - 1
        drafts = tokens.new_zeros(b, 0) if drafter is None else drafter.draft(tokens, positions, mask, new_hidden)
        d = drafts.shape[1]
        chunk = torch.cat((tokens[:, n:], drafts), dim=1)  # [b, 1 + D]: x_n and the drafts
        chunk_pos = positions[:, n:] + torch.arange(d + 1, device=device)
        hidden, logits = forward(chunk, chunk_pos, torch.cat((mask, torch.ones_like(drafts)), dim=1))
        greedy = pick(logits, generated)  # [b, 1 + D]: the main model's token after each chunk position
        agree = (drafts == greedy[:, :d]).long()
        accept = agree.cumprod(dim=1).sum(dim=1).masked_fill(finished, d)
        a = min(int(accept.min()), max_new_tokens - generated - 1)
        if a < d:
            cache.crop(a - d)
        chosen, new_hidden = greedy[:, :a + 1], hidden[:, :a + 1]
        rounds, accepted = rounds + 1, accepted + a
    if stats is not None:
        stats.update(forwards=rounds, accepted_drafts=accepted, new_tokens=generated)
    return tokens


__all__ = ["MTPDrafter", "MTPLayer", "MultiTokenPrediction", "SharedHead", "run_mtp_layer", "speculative_greedy"]
