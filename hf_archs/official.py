"""`from_official`: load an official release directory, in its publisher's layout, strictly.

Steps: read config.json (official model_type and field names) -> pick the architecture -> build our config ->
list every tensor of the release from the safetensors headers (cheap) -> map names by the architecture's declared
renames and skip rules -> check names and shapes against the model (every problem named) -> only then read the data.
Nothing is written anywhere; pickle files are never read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
import logging
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .modeling_base import HfaPreTrainedModel
from .registry import Architecture, by_official_model_type

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
    arch = arch or by_official_model_type(official.get("model_type", ""))
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


def _safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
        files = []
        for name in dict.fromkeys(weight_map.values()):
            file = (root / name).resolve()
            if root.resolve() not in file.parents:
                raise CheckpointError(f"{index}: entry {name!r} points outside the release directory")
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {name!r} is listed but missing")
            files.append(file)
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        extra = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise CheckpointError(f"{root}: no safetensors weights{extra}")
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from err


def iter_headers(files: list[Path]) -> Iterator[tuple[Path, str, tuple[int, ...], str]]:
    """(file, tensor name, shape, dtype name) for every tensor, from the headers only."""
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                info = f.get_slice(name)
                yield file, name, tuple(info.get_shape()), info.get_dtype()


def map_name(arch: Architecture, name: str) -> str | None:
    """Our tensor name for an official one, or None when a declared rule skips it."""
    for prefix, _reason in arch.skip_keys:
        if name.startswith(prefix):
            return None
    for old, new in arch.key_renames:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def plan_load(arch: Architecture, model: torch.nn.Module, files: list[Path]) -> dict[str, tuple[Path, str]]:
    """Check every release tensor against `model`; return our name -> (file, official name). Raises on any problem."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    plan: dict[str, tuple[Path, str]] = {}
    unexpected, mis_shaped = [], []
    skipped: dict[str, int] = {}
    for file, name, shape, _dtype in iter_headers(files):
        ours = map_name(arch, name)
        if ours is None:
            reason = next(r for p, r in arch.skip_keys if name.startswith(p))
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        if ours not in expected:
            unexpected.append(f"{name} (in {file.name})")
        elif expected[ours] != shape:
            mis_shaped.append(f"{name}: checkpoint {list(shape)}, model {list(expected[ours])}")
        else:
            plan[ours] = (file, name)
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(plan) - optional)
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {mis_shaped}")
    if problems:
        raise CheckpointError(f"cannot load the release into {type(model).__name__}: " + "; ".join(problems))
    for reason, count in skipped.items():
        logger.info("hf_archs: skipped %d tensors of the release (%s)", count, reason)
    return plan


def _release_dtype(config, files: list[Path]) -> torch.dtype:
    """The dtype the release declares, else the one most of its floating-point tensors are stored in."""
    if isinstance(getattr(config, "dtype", None), torch.dtype):
        return config.dtype
    counts: dict[str, int] = {}
    for _file, _name, shape, dtype in iter_headers(files):
        counts[dtype] = counts.get(dtype, 0) + 1
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    floating = {k: v for k, v in counts.items() if k in names}
    return names[max(floating, key=floating.get)] if floating else torch.float32


def from_official(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                  **kwargs: Any) -> HfaPreTrainedModel:
    """Load an official release directory (config.json + safetensors) into this package's CausalLM class.

    `dtype`: None keeps the release's dtype; otherwise every tensor is cast. Extra `kwargs` override config
    fields; `attn_implementation="eager" | "sdpa"` picks the attention kernel. The model is built on the meta
    device and takes the loaded tensors as they are, so peak memory is one copy of the weights.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    official = read_config(root)
    arch = by_official_model_type(official.get("model_type", ""))
    attn = kwargs.pop("attn_implementation", None)
    config = config_from_official(official, arch, **kwargs)
    files = _safetensors_files(root)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or _release_dtype(config, files)

    with torch.device("meta"):
        model = arch.causal_lm_class(config)
    plan = plan_load(arch, model, files)  # every check happens before any data is read

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, (file, name) in plan.items():
        by_file.setdefault(file, []).append((ours, name))
    state = {}
    for file, names in by_file.items():
        try:
            with _open(file) as f:
                for ours, name in names:
                    state[ours] = f.get_tensor(name).to(dtype)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from err
    model.load_state_dict(state, strict=False, assign=True)  # plan_load has checked names and shapes
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
