"""MatFormer slicing: smaller Gemma 3n models cut out of a larger one (E2B and Mix-n-Match models out of E4B).

Gemma 3n E4B is a MatFormer (https://arxiv.org/abs/2310.07707): every layer's FFN was trained so that a prefix of
its hidden units is itself a good FFN, and some layers can be dropped. E2B is such a sub-model: FFN width 8192 in
every layer, layers 20-24 dropped. Mix-n-Match picks a width per layer and a set of layers to drop
(https://ai.google.dev/gemma/docs/gemma-3n and the MatFormer Lab; Google's own Pareto-optimal cuts are in
https://huggingface.co/datasets/google/gemma3n-slicing-configs).

`slice(model, ffn_dims, skip_layers)` returns a new, standalone model with its own config (saved and loaded like
any other); `model` is not modified. What depends on layer indices is kept consistent:
- FFN of layer i at width w: the first w rows of `gate_proj` / `up_proj`, the first w columns of `down_proj`
  (Gaussian top-k sparsity is then computed over those w units, as E2B's own layers do);
- per-layer embeddings: the `hidden_size_per_layer_input`-wide slices of skipped layers leave
  `embed_tokens_per_layer` [V, layers * P] and `per_layer_model_projection` [layers * P, hidden];
- KV sharing: the config says "the last `num_kv_shared_layers` layers reuse the last earlier layer of their type";
  that count becomes the number of kept KV-shared layers, and a cut that drops a layer whose keys and values a kept
  layer reuses is refused (the kept layer would silently switch to another source);
- `layer_types` (sliding / full), `activation_sparsity_pattern`, `intermediate_size`: the kept layers' entries.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .models.gemma3n import HfaGemma3nConfig, HfaGemma3nForCausalLM, HfaGemma3nModel


class CutError(ValueError):
    """A MatFormer cut that cannot be made (a width too large, a layer that must stay, an index out of range)."""


@dataclass(frozen=True)
class Cut:
    """A MatFormer cut of a model with `num_layers` layers: one FFN width per layer (None keeps the layer's width;
    entries of skipped layers are ignored) and the layers to drop."""

    num_layers: int
    ffn_dims: tuple[int | None, ...]
    skip_layers: tuple[int, ...] = ()
    source: str = ""

    @classmethod
    def from_kept(cls, kept_ffn_dims: Sequence[int], skip_layers: Sequence[int] = (), num_layers: int = 35,
                  source: str = "") -> Cut:
        """A cut written as the slicing-configs dataset writes it: one width per *kept* layer, in order."""
        skip = tuple(skip_layers)
        kept = [i for i in range(num_layers) if i not in skip]
        if len(kept_ffn_dims) != len(kept):
            raise CutError(f"{len(kept_ffn_dims)} FFN widths given for {len(kept)} kept layers")
        widths = dict(zip(kept, kept_ffn_dims))
        return cls(num_layers, tuple(widths.get(i) for i in range(num_layers)), skip, source)


_SLICING_CONFIGS = "https://huggingface.co/datasets/google/gemma3n-slicing-configs"
_E4B_LAYERS = 35
_W4, _W8 = 2048 * 4, 2048 * 8

PRESETS: dict[str, Cut] = {
    # The released E2B inside E4B: https://ai.google.dev/gemma/docs/gemma-3n ("Config for official E2B Model").
    "E2B": Cut.from_kept([_W4] * 30, range(20, 25), source=_SLICING_CONFIGS),
    # Mix-n-Match, layer-level: wider FFNs where they help most (layer 4: the first full-attention layer).
    "E1.96B": Cut.from_kept([_W4] * 4 + [_W8] + [_W4] * 25, range(20, 25), source=_SLICING_CONFIGS),
    "E2.54B": Cut.from_kept([_W4] * 4 + [_W8] + [_W4] * 15 + [_W8] * 5 + [_W4] * 10, (), source=_SLICING_CONFIGS),
}


def _base(model: nn.Module) -> HfaGemma3nModel:
    if isinstance(model, HfaGemma3nForCausalLM):
        return model.model
    if isinstance(model, HfaGemma3nModel):
        return model
    raise TypeError(f"MatFormer slicing needs a Gemma 3n model (HfaGemma3nForCausalLM or HfaGemma3nModel), "
                    f"got {type(model).__name__}")


def _check_cut(config: HfaGemma3nConfig, ffn_dims: Sequence[int | None] | None,
               skip_layers: Sequence[int]) -> tuple[list[int], list[int]]:
    """(kept layer indices, their new widths); raises CutError naming what is wrong."""
    n = config.num_hidden_layers
    skip = list(skip_layers)
    for i in skip:
        if not isinstance(i, int) or isinstance(i, bool):
            raise CutError(f"skip_layers must hold layer indices (int), got {i!r}")
        if not 0 <= i < n:
            raise CutError(f"skip_layers: layer {i} is out of range: the model has layers 0-{n - 1}")
    twice = sorted({i for i in skip if skip.count(i) > 1})
    if twice:
        raise CutError(f"skip_layers lists layers {twice} more than once")
    kept = [i for i in range(n) if i not in skip]
    if not kept:
        raise CutError(f"skip_layers drops all {n} layers")
    widths = list(config.intermediate_size)
    if ffn_dims is not None:
        if len(ffn_dims) != n:
            raise CutError(f"ffn_dims has {len(ffn_dims)} entries but the model has {n} layers (one width per layer "
                           "of the original model; entries of skipped layers are ignored)")
        for i in kept:
            w = ffn_dims[i]
            if w is None:
                continue
            if not isinstance(w, int) or isinstance(w, bool) or w <= 0:
                raise CutError(f"ffn_dims[{i}] must be a positive integer, got {w!r}")
            if w > widths[i]:
                raise CutError(f"ffn_dims[{i}] = {w} is larger than layer {i}'s FFN width ({widths[i]}): a slice "
                               "keeps a prefix of the hidden units")
            widths[i] = w
    sources = config.kv_sources()
    for s in sorted(set(sources.values()) & set(skip)):
        readers = [i for i in kept if sources.get(i) == s]
        if readers:
            raise CutError(f"layer {s} cannot be skipped: kept layers {readers} reuse its keys and values "
                           "(KV sharing)")
    return kept, [widths[i] for i in kept]


def sliced_config(config: HfaGemma3nConfig, ffn_dims: Sequence[int | None] | None = None,
                  skip_layers: Sequence[int] = ()) -> HfaGemma3nConfig:
    """The config of the cut (validated): the kept layers' plans, the new widths and KV-shared count."""
    kept, widths = _check_cut(config, ffn_dims, skip_layers)
    first_shared = config.num_hidden_layers - config.num_kv_shared_layers
    d = config.to_dict()
    for key in ("model_type", "transformers_version"):
        d.pop(key, None)
    d.update(num_hidden_layers=len(kept), intermediate_size=widths,
             layer_types=[config.layer_types[i] for i in kept],
             activation_sparsity_pattern=[config.activation_sparsity_pattern[i] for i in kept],
             num_kv_shared_layers=sum(i >= first_shared for i in kept))
    new = type(config).from_dict(d)
    # The shared layers must read the very layers they read before (the cut checks guarantee it; keep it checked).
    old_sources = config.kv_sources()
    for j, src in new.kv_sources().items():
        if kept[src] != old_sources[kept[j]]:
            raise CutError(f"after the cut, layer {kept[j]} would reuse the keys and values of layer {kept[src]} "
                           f"instead of layer {old_sources[kept[j]]}")
    return new


def slice(model: nn.Module, ffn_dims: Sequence[int | None] | None = None,  # noqa: A001 - the issue's name
          skip_layers: Sequence[int] = ()) -> nn.Module:
    """A new Gemma 3n model cut out of `model` (which is left unchanged): FFN width `ffn_dims[i]` in layer i (one
    entry per layer of `model`; None, or `ffn_dims=None`, keeps the width; entries of skipped layers are ignored),
    layers in `skip_layers` dropped. Same class, dtype, device, attention implementation and train/eval mode;
    tensors are copies. Raises CutError for a cut that cannot be made."""
    base = _base(model)
    config = base.config
    new_config = sliced_config(config, ffn_dims, skip_layers)
    kept = [i for i in range(config.num_hidden_layers) if i not in set(skip_layers)]
    widths = new_config.intermediate_size
    new_index = {old: j for j, old in enumerate(kept)}
    n, p, h = config.num_hidden_layers, config.hidden_size_per_layer_input, config.hidden_size
    prefix = "model." if base is not model else ""
    layer_key = re.compile(rf"^{re.escape(prefix)}layers\.(\d+)\.(.+)$")

    state = {}
    for name, t in model.state_dict().items():
        m = layer_key.match(name)
        if m:
            old, rest = int(m[1]), m[2]
            if old not in new_index:
                continue
            j = new_index[old]
            w = widths[j]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t = t[:w]  # [intermediate, hidden]: the first w hidden units
            elif rest == "mlp.down_proj.weight":
                t = t[:, :w]  # [hidden, intermediate]
            name = f"{prefix}layers.{j}.{rest}"
        elif name == f"{prefix}embed_tokens_per_layer.weight":
            t = t.view(t.shape[0], n, p)[:, kept].reshape(t.shape[0], len(kept) * p)
        elif name == f"{prefix}per_layer_model_projection.weight":
            t = t.view(n, p, h)[kept].reshape(len(kept) * p, h)
        state[name] = t.clone()

    device = next(model.parameters()).device
    with torch.device("meta"):
        new = type(model)(new_config)
    new.load_state_dict(state, strict=True, assign=True)
    if new_config.tie_word_embeddings and prefix:
        new.tie_weights()  # lm_head is the embedding again, not a copy of it
    new.reset_buffers(device)
    left = [k for k, v in [*new.named_parameters(), *new.named_buffers()] if v.device.type == "meta"]
    if left and device.type != "meta":
        raise RuntimeError(f"hf_archs: tensors left uninitialised after slicing: {left}")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn is not None and device.type != "meta":
        new.set_attn_implementation(attn)
    return new.train(model.training)


def slice_preset(model: nn.Module, name: str) -> nn.Module:
    """`slice` with a named cut of `PRESETS` (each a cut of E4B's 35 layers)."""
    if name not in PRESETS:
        raise CutError(f"unknown MatFormer preset {name!r}; known: {sorted(PRESETS)}")
    cut = PRESETS[name]
    layers = _base(model).config.num_hidden_layers
    if layers != cut.num_layers:
        raise CutError(f"preset {name!r} cuts a {cut.num_layers}-layer model (E4B); this model has {layers} layers")
    return slice(model, cut.ffn_dims, cut.skip_layers)


def count_parameters(model: nn.Module) -> int:
    """Parameters, each tied tensor counted once (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["Cut", "CutError", "PRESETS", "count_parameters", "slice", "slice_preset", "sliced_config"]
