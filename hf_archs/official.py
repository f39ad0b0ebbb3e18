"""`from_official`: load an official release directory, in its publisher's layout, strictly.

Steps: read config.json (official model_type and field names) -> pick the architecture -> build our config ->
list every tensor of the release from the safetensors headers (cheap) -> map names by the architecture's declared
renames and skip rules -> check names and shapes against the model (every problem named) -> only then read the data.
Nothing is written anywhere; pickle files are never read.
"""

from __future__ import annotations

import json
import os
import re
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
    for pattern, repl in arch.key_renames:
        new, n = re.subn(pattern, repl, name, count=1)
        if n:
            return new
    return name


_EXPERT = re.compile(r"^(?P<module>.*\.experts)\.(?P<e>\d+)\.(?P<rest>.+)$")

# One source of our tensor: (file, official name). A fused expert tensor has a grid [expert][source] of them.
Source = tuple[Path, str]


def plan_load(arch: Architecture, model: torch.nn.Module, files: list[Path]) -> dict[str, Source | list[list[Source]]]:
    """Check every release tensor against `model`; return our name -> its source(s). Raises on any problem,
    naming each missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    fusions = {src: (i, rule) for rule in arch.fuse_experts for i, src in enumerate(rule.sources)}
    plan: dict[str, Source | list[list[Source]]] = {}
    grids: dict[str, dict[int, dict[int, tuple[Path, str, tuple[int, ...]]]]] = {}
    unexpected, mis_shaped, missing_experts = [], [], []
    skipped: dict[str, int] = {}
    for file, name, shape, _dtype in iter_headers(files):
        ours = map_name(arch, name)
        if ours is None:
            reason = next(r for p, r in arch.skip_keys if name.startswith(p))
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        m = _EXPERT.match(ours)
        if m and m["rest"] in fusions and ours not in expected:
            i, rule = fusions[m["rest"]]
            grids.setdefault(f"{m['module']}.{rule.target}", {}).setdefault(int(m["e"]), {})[i] = (file, name, shape)
        elif ours not in expected:
            unexpected.append(f"{name} (in {file.name})")
        elif expected[ours] != shape:
            mis_shaped.append(f"{name}: checkpoint {list(shape)}, model {list(expected[ours])}")
        else:
            plan[ours] = (file, name)
    for target, grid in grids.items():
        rule = next(r for r in arch.fuse_experts if target.endswith("." + r.target))
        if target not in expected:
            unexpected.extend(f"{n} (in {f.name})" for row in grid.values() for f, n, _ in row.values())
            continue
        num_experts = expected[target][0]
        module = target[: -len(rule.target) - 1]
        holes = [f"{module}.{e}.{src}" for e in range(num_experts) for i, src in enumerate(rule.sources)
                 if i not in grid.get(e, {})]
        extra = [f"{module}.{e}.*" for e in grid if e >= num_experts]
        if holes or extra:
            missing_experts.extend(holes)
            unexpected.extend(extra)
            continue
        rows = [[grid[e][i] for i in range(len(rule.sources))] for e in range(num_experts)]
        out_dim = sum(shape[0] for _, _, shape in rows[0])
        in_dim = rows[0][0][2][1]
        fused = (num_experts, in_dim, out_dim) if rule.transposed else (num_experts, out_dim, in_dim)
        shapes = {shape for row in rows for _, _, shape in row}
        if fused != expected[target] or any(len(sh) != 2 or sh[1] != in_dim for sh in shapes):
            mis_shaped.append(f"{target} (from {len(rows)} experts x {list(rule.sources)}): checkpoint "
                              f"{list(fused)}, model {list(expected[target])}")
            continue
        plan[target] = [[(f, n) for f, n, _ in row] for row in rows]
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(plan) - optional - {t for t in grids})
    problems = []
    if missing or missing_experts:
        problems.append(f"missing tensors: {_some(missing_experts + missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {_some(mis_shaped)}")
    if problems:
        raise CheckpointError(f"cannot load the release into {type(model).__name__}: " + "; ".join(problems))
    for reason, count in skipped.items():
        logger.info("hf_archs: skipped %d tensors of the release (%s)", count, reason)
    return plan


def _read(arch: Architecture, plan: dict[str, Source | list[list[Source]]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read the planned tensors, one open file at a time, fusing per-expert tensors as declared."""
    handles: dict[Path, Any] = {}

    def get(source: Source) -> torch.Tensor:
        file, name = source
        if file not in handles:
            handles[file] = _open(file).__enter__()
        try:
            return handles[file].get_tensor(name).to(dtype)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from err

    state: dict[str, torch.Tensor] = {}
    try:
        for ours, source in sorted(plan.items(), key=lambda kv: str(kv[1][0] if isinstance(kv[1], tuple)
                                                                     else kv[1][0][0][0])):
            if isinstance(source, tuple):
                state[ours] = get(source)
                continue
            rule = next(r for r in arch.fuse_experts if ours.endswith("." + r.target))
            experts = [torch.cat([get(s) for s in row], dim=0) for row in source]  # [out, in] each
            state[ours] = torch.stack([w.T if rule.transposed else w for w in experts]).contiguous()
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return state


def _some(names: list[str], limit: int = 20) -> str:
    """A list for an error message: the first `limit` names and how many more."""
    shown = str(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


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
    quant = official.get("quantization_config") or (official.get(arch.text_config_key or "", None) or {}).get(
        "quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise CheckpointError(f"{root}: the release is quantized ({method!r}); from_official loads unquantized "
                              f"releases only (convert the release with `hf-archs convert` first)")
    attn = kwargs.pop("attn_implementation", None)
    config = config_from_official(official, arch, **kwargs)
    files = _safetensors_files(root)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    dtype = dtype or _release_dtype(config, files)

    with torch.device("meta"):
        model = arch.causal_lm_class(config)
    plan = plan_load(arch, model, files)  # every check happens before any data is read

    state = _read(arch, plan, dtype)
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
