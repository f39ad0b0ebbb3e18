"""`from_official`: load an official release directory, in its publisher's layout, strictly.

Steps: read config.json (official model_type and field names) -> pick the architecture -> build our config ->
list every tensor of the release from the safetensors headers (cheap) -> drop the MTP modules the config declares
if the release stores none of them (where the architecture allows it: `Architecture.optional_mtp`) -> map names by
the architecture's declared renames and skip rules -> check names and shapes against the model (every problem
named) -> only then read the data.
Nothing is written anywhere; pickle files are never read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .modeling_base import HfaPreTrainedModel
from .registry import Architecture, by_official_config

logger = logging.getLogger(__name__)

# config.json keys that describe the file, not the model.
_FILE_KEYS = {"model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "torch_dtype",
              "dtype", "quantization_config"}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: no config.json in the release directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err


def config_from_official(official: dict[str, Any], arch: Architecture | None = None, **overrides: Any):
    """Build this package's config from an official config.json dict (the decoder part of a multimodal one)."""
    arch = arch or by_official_config(official)
    cfg = dict(official)
    if arch.text_config_key and arch.text_config_key in cfg:
        outer = cfg
        cfg = dict(cfg[arch.text_config_key] or {})
        # Multimodal releases keep tying and dtype at the outer level.
        for key in ("tie_word_embeddings", "torch_dtype", "dtype"):
            if key in outer and key not in cfg:
                cfg[key] = outer[key]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    cfg = {k: v for k, v in cfg.items() if k not in _FILE_KEYS}
    cfg.update(overrides)
    config = arch.config_class(**cfg)
    if dtype is not None:
        config.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return config


def prepare(path: str | os.PathLike, format: str | None = None, allow_pickle: bool = False, **overrides: Any):
    """Everything before reading data: detect the format, build our config and a model on the meta device, and
    check every release tensor against it. Returns a `Prepared` (used by from_official and hf-archs convert)."""
    from conversion.formats import detect
    from conversion.plan import plan_tensors

    root = Path(path)
    fmt = detect(root, format)
    official = fmt.official_config(root)
    arch = by_official_config(official)
    config = config_from_official(official, arch, **overrides)
    logical, sources, notes = fmt.tensors(root, official, allow_pickle)
    if arch.optional_mtp is not None:
        prefix, field = arch.optional_mtp
        declared = getattr(config, field)
        if declared and field not in overrides and not stores_layers_after(logical, prefix, config.num_hidden_layers):
            logger.warning("hf_archs: the release declares %d MTP modules (%s) but stores none (no tensor under "
                           "%s<i> for i >= %d): loaded without them, %s=0", declared, field, prefix,
                           config.num_hidden_layers, field)
            notes.append(f"the release stores none of its {declared} declared MTP modules: {field} set to 0")
            config = config_from_official(official, arch, **overrides, **{field: 0})
    with torch.device("meta"):
        model = arch.causal_lm_class(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    plan, skipped = plan_tensors(arch, expected, logical, optional, type(model).__name__,
                                 decoder_layers=getattr(config, "num_hidden_layers", None))
    return Prepared(root, fmt.name, official, arch, config, model, plan, skipped, sources, notes, logical)


class Prepared:
    """A checked plan: our tensor name -> producer, with the model (meta device) it fills."""

    def __init__(self, root, format_name, official, arch, config, model, plan, skipped, sources, notes, logical):
        self.root, self.format, self.official, self.arch, self.config = root, format_name, official, arch, config
        self.model, self.plan, self.skipped, self.sources, self.notes = model, plan, skipped, sources, notes
        self.logical = logical

    def dtype(self, requested: torch.dtype | str | None = None) -> torch.dtype:
        if requested is not None:
            return getattr(torch, requested) if isinstance(requested, str) else requested
        if isinstance(getattr(self.config, "dtype", None), torch.dtype):
            return self.config.dtype
        from conversion.io import _ST_DTYPES

        counts: dict[torch.dtype, int] = {}
        for prod in self.plan.values():
            dt = torch.bfloat16 if prod.dequantized else _ST_DTYPES.get(prod.dtype or "")
            if dt in (torch.float32, torch.bfloat16, torch.float16):
                counts[dt] = counts.get(dt, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32


def from_official(path: str | os.PathLike, dtype: torch.dtype | str | None = None, format: str | None = None,
                  allow_pickle: bool = False, **kwargs: Any) -> HfaPreTrainedModel:
    """Load an official release directory, in its publisher's layout, into this package's CausalLM class.

    `format`: override the detected release format (see `hf-archs convert --help`). `dtype`: None keeps the
    release's dtype (bf16 for dequantized releases); otherwise every tensor is cast. `allow_pickle`: read
    `.bin` / `.pth` weights with `torch.load(weights_only=True)` (never by default). Extra `kwargs` override
    config fields; `attn_implementation="eager" | "sdpa"` picks the attention kernel. The model is built on the
    meta device and takes the loaded tensors as they are, so peak memory is one copy of the weights.
    """
    from conversion.io import Reader

    attn = kwargs.pop("attn_implementation", None)
    prep = prepare(path, format, allow_pickle, **kwargs)  # every check happens before any data is read
    dtype = prep.dtype(dtype)
    model, config = prep.model, prep.config
    keep = fp32_names(model, prep.plan, dtype)
    with Reader() as reader:
        state = {name: prod.produce(reader, torch.float32 if name in keep else dtype)
                 for name, prod in prep.plan.items()}
    model.load_state_dict(state, strict=False, assign=True)  # the plan has checked names and shapes
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.reset_buffers("cpu")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:  # a bug here, never the release's fault: refuse rather than run uninitialised
        raise RuntimeError(f"hf_archs: tensors left uninitialised after loading: {left}")
    if attn is not None:
        model.set_attn_implementation(attn)
    model.config.dtype = dtype
    return model.eval()


def fp32_names(model: torch.nn.Module, names, dtype: torch.dtype) -> set[str]:
    """Tensors the model keeps in fp32 whatever the load dtype (`_keep_in_fp32_modules[_strict]`, transformers'
    convention: a listed name matches a module name component of the tensor's name)."""
    if dtype == torch.float32:
        return set()
    modules = set(getattr(model, "_keep_in_fp32_modules", None) or []) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return {n for n in names if any(m in n.split(".") or f".{m}." in f".{n}" for m in modules)}


def stores_layers_after(names: Iterable[str], prefix: str, num_layers: int) -> bool:
    """Whether any of a release's tensor names is under `<prefix><i>.` with i >= num_layers (MTP modules kept
    after the decoder's layers)."""
    from conversion.plan import layer_index

    return any((index := layer_index(name, prefix)) is not None and index >= num_layers for name in names)


def map_name(arch: Architecture, name: str) -> str | None:
    from conversion.plan import map_name as _map

    return _map(arch, name)
