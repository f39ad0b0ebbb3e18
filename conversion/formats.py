"""The release formats: how each is detected, its config in official HF field names, and its logical tensors.

`hf` is the publisher's Hugging Face layout (config.json + safetensors, possibly quantized); each other format is
a module of its own in this package, registered here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_archs.errors import CheckpointError

from .io import Release
from .plan import Producer, logical_tensors, quantization


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[Path], bool]
    # (root) -> config.json-style dict with the official model_type and HF field names
    official_config: Callable[[Path], dict[str, Any]]
    # (root, official config, allow_pickle) -> (logical tensors in HF names, files read, notes)
    tensors: Callable[[Path, dict[str, Any], bool], tuple[dict[str, Producer], list[Path], list[str]]]
    # Tried before the HF layout: the format recognises its own files in a folder that also has a config.json.
    before_hf: bool = False


def read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err


def _hf_tensors(root: Path, official: dict[str, Any], allow_pickle: bool):
    from hf_archs.registry import by_official_config

    arch = by_official_config(official)
    release = Release(root, allow_pickle=allow_pickle)
    logical, notes = logical_tensors(release, quantization(official, arch.text_config_key))
    return logical, release.source_files(), notes


HF = Format("hf", "the publisher's Hugging Face layout: config.json + safetensors (sharded or not; fp8, "
                  "compressed-tensors and mxfp4 quantization dequantized)",
            detect=lambda root: (root / "config.json").is_file(),
            official_config=lambda root: read_json(root / "config.json"),
            tensors=_hf_tensors)


def formats() -> dict[str, Format]:
    from . import gpt_oss_original, grok_tp8, llama4_original, mistral

    return {f.name: f for f in (HF, mistral.FORMAT, llama4_original.FORMAT, grok_tp8.FORMAT, gpt_oss_original.FORMAT)}


def detect(root: Path, name: str | None = None) -> Format:
    """The format of a release directory (`name` overrides the detection)."""
    known = formats()
    if name is not None:
        if name not in known:
            raise ValueError(f"unknown release format {name!r}; known: {sorted(known)}")
        return known[name]
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    # Formats that recognise their own files (with a config.json of their own) first, then the HF layout, which
    # claims any folder with a config.json: some publishers (Mistral) ship both layouts in one repository.
    first = [f for f in known.values() if f.before_hf]
    for fmt in [*first, HF, *(f for f in known.values() if f is not HF and not f.before_hf)]:
        if fmt.detect(root):
            return fmt
    raise CheckpointError(f"{root}: no known release format (no config.json; known formats: {sorted(known)})")
