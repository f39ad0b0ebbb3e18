"""Presets: every official flagship config.json as published, shipped with the address it came from.

Each file in `hf_archs/presets/` holds one release:

    {"name": "deepseek-v3", "architecture": "deepseek_v3", "title": ..., "source": <config.json address>,
     "transcribed_from": <where the values were read>, "unverified": [fields not checked against the file],
     "notes": [...], "claimed": {<the publisher's stated sizes>}, "config": {<config.json as published>}}

`preset(name)` loads `config` into the architecture's config class through `config_from_official` (the same path
as `from_official`), so the class validates it. A preset whose architecture is not registered yet is shipped as
data and reported by `skipped_presets()` with the missing architecture named.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .registry import ARCHITECTURES, Architecture

PRESET_DIR = Path(__file__).with_name("presets")
# Listing order (the issue's): families together, small to large; files not named here follow alphabetically.
ORDER = ("qwen3-0.6b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b", "smollm3-3b", "olmo-2-7b",
         "olmo-2-32b", "gemma-3-27b", "gemma-3n-e2b", "gemma-3n-e4b", "mistral-small-3.1-24b", "llama-4-scout",
         "llama-4-maverick", "deepseek-v3", "kimi-k2", "gpt-oss-20b", "gpt-oss-120b", "grok-2", "glm-4.5-air",
         "glm-4.5", "qwen3-next-80b-a3b", "minimax-m2", "kimi-linear-48b-a3b")


class PresetError(KeyError):
    """An unknown preset name, or a preset whose architecture is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str
    title: str
    source: str
    config_json: dict[str, Any]
    transcribed_from: str | None = None
    unverified: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    claimed: dict[str, float] = field(default_factory=dict)

    @property
    def registered(self) -> bool:
        return unavailable_reason(self.architecture) is None

    @property
    def arch(self) -> Architecture:
        reason = unavailable_reason(self.architecture)
        if reason is not None:
            raise PresetError(f"preset {self.name!r} cannot be built: {reason}")
        return ARCHITECTURES[self.architecture]

    def config(self, **overrides: Any):
        """The validated config of this release, in its architecture's config class."""
        from .official import config_from_official

        return config_from_official(copy.deepcopy(self.config_json), self.arch, **overrides)


def unavailable_reason(architecture: str) -> str | None:
    """Why `architecture` cannot be built here (not registered, or its classes fail to import), else None."""
    if architecture not in ARCHITECTURES:
        return f"architecture {architecture!r} is not registered in hf_archs yet"
    return _import_error(architecture)


@lru_cache(maxsize=None)
def _import_error(architecture: str) -> str | None:
    arch = ARCHITECTURES[architecture]
    try:
        arch.config_class, arch.causal_lm_class  # noqa: B018 - imports the model module
    except Exception as err:  # noqa: BLE001 - reported, never raised: the other presets still compare
        return f"architecture {architecture!r} is registered but its classes do not import ({err})"
    return None


@lru_cache(maxsize=1)
def _load_all() -> dict[str, Preset]:
    presets = {}
    for file in sorted(PRESET_DIR.glob("*.json")):
        data = json.loads(file.read_text())
        p = Preset(name=data["name"], architecture=data["architecture"], title=data.get("title", data["name"]),
                   source=data["source"], config_json=data["config"], transcribed_from=data.get("transcribed_from"),
                   unverified=tuple(data.get("unverified", ())), notes=tuple(data.get("notes", ())),
                   claimed=dict(data.get("claimed", {})))
        if p.name != file.stem:
            raise ValueError(f"{file}: name {p.name!r} does not match the file name")
        presets[p.name] = p
    rank = {n: i for i, n in enumerate(ORDER)}
    return dict(sorted(presets.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def all_presets() -> dict[str, Preset]:
    """Every shipped preset, registered architecture or not, by name."""
    return dict(_load_all())


def get_preset(name: str) -> Preset:
    presets = _load_all()
    if name not in presets:
        raise PresetError(f"unknown preset {name!r}; known: {sorted(presets)}")
    return presets[name]


def preset_names(registered_only: bool = True) -> list[str]:
    """Preset names, in listing order; by default only those whose architecture is registered."""
    return [n for n, p in _load_all().items() if p.registered or not registered_only]


def skipped_presets() -> dict[str, str]:
    """Preset name -> why it cannot be built yet (its architecture is not registered)."""
    return {n: unavailable_reason(p.architecture) for n, p in _load_all().items() if not p.registered}


def preset(name: str, **overrides: Any):
    """The validated config of the official release `name` (see `preset_names()`), e.g. `preset("qwen3-32b")`."""
    return get_preset(name).config(**overrides)


__all__ = ["PRESET_DIR", "Preset", "PresetError", "all_presets", "get_preset", "preset", "preset_names",
           "skipped_presets", "unavailable_reason"]
