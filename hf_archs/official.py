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
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .registry import Architecture, by_official_model_type

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


def iter_headers(files: list[Path]) -> Iterator[tuple[Path, str, tuple[int, ...]]]:
    """(file, tensor name, shape) for every tensor, from the headers only."""
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                yield file, name, tuple(f.get_slice(name).get_shape())


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
    for file, name, shape in iter_headers(files):
        ours = map_name(arch, name)
        if ours is None:
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
    return plan


def from_official(path: str | os.PathLike, dtype: torch.dtype | str | None = None, **kwargs: Any):
    """Load an official release directory (config.json + safetensors) into this package's CausalLM class.

    `dtype`: None keeps the release's dtype; otherwise tensors are cast. Extra `kwargs` override config fields
    (e.g. `attn_implementation="eager"`).
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    official = read_config(root)
    arch = by_official_model_type(official.get("model_type", ""))
    attn = kwargs.pop("attn_implementation", None)
    config = config_from_official(official, arch, **kwargs)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    files = _safetensors_files(root)

    with torch.device("meta"):
        model = arch.causal_lm_class(config)
    plan = plan_load(arch, model, files)  # every check happens before any data is read

    model.to_empty(device="cpu")
    for module in model.modules():  # non-persistent buffers (RoPE frequencies, embedding scales)
        model._init_weights(module) if not list(module.parameters(recurse=False)) else None
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for ours, (file, name) in plan.items():
        by_file.setdefault(file, []).append((ours, name))
    state = {}
    for file, names in by_file.items():
        try:
            with _open(file) as f:
                for ours, name in names:
                    tensor = f.get_tensor(name)
                    state[ours] = tensor if dtype is None else tensor.to(dtype)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from err
    load_dtype = dtype or next(iter(state.values())).dtype
    model.to(load_dtype)
    model.load_state_dict(state, strict=False, assign=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if attn is not None:
        model.set_attn_implementation(attn)
    model.config.dtype = load_dtype
    return model.eval()
