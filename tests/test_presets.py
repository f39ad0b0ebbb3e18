"""Presets: every official flagship config.json shipped with its source, loaded and validated by its config class."""

from __future__ import annotations

import dataclasses
import json

import pytest
from helpers import needs

import hf_archs
from hf_archs.presets import (
    PRESET_DIR,
    PresetError,
    all_presets,
    get_preset,
    preset,
    preset_names,
    skipped_presets,
)

ALL = list(all_presets())

# The issue's list of flagships, by preset name.
EXPECTED = {"qwen3-0.6b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b-a22b", "smollm3-3b", "olmo-2-7b",
            "olmo-2-32b", "gemma-3-27b", "gemma-3n-e2b", "gemma-3n-e4b", "mistral-small-3.1-24b", "llama-4-scout",
            "llama-4-maverick", "deepseek-v3", "kimi-k2", "gpt-oss-20b", "gpt-oss-120b", "grok-2", "glm-4.5",
            "glm-4.5-air", "qwen3-next-80b-a3b", "minimax-m2", "kimi-linear-48b-a3b"}


def decoder_json(name: str) -> dict:
    """The decoder part of the published config.json (text_config of a multimodal release)."""
    p = get_preset(name)
    cfg = p.config_json
    key = hf_archs.ARCHITECTURES[p.architecture].text_config_key if p.registered else "text_config"
    return cfg.get(key, cfg) if key else cfg


def test_every_flagship_of_the_issue_is_shipped():
    assert set(ALL) == EXPECTED
    files = sorted(f.stem for f in PRESET_DIR.glob("*.json"))
    assert files == sorted(EXPECTED)


@pytest.mark.parametrize("name", ALL)
def test_preset_file_records_where_it_came_from(name):
    data = json.loads((PRESET_DIR / f"{name}.json").read_text())
    assert data["name"] == name
    assert data["source"].startswith("https://huggingface.co/") and data["source"].endswith("/config.json")
    assert data["transcribed_from"], "each preset says where its values were read"
    assert isinstance(data["unverified"], list)
    config = data["config"]
    assert config["model_type"] and config["architectures"], "the file keeps the release's identity fields"


@pytest.mark.parametrize("name", ALL)
def test_preset_loads_into_its_config_class(name):
    p = get_preset(name)
    needs(p.architecture)
    arch = hf_archs.ARCHITECTURES[p.architecture]
    config = preset(name)
    assert type(config) is arch.config_class
    published = decoder_json(name)
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "head_dim", "sliding_window"):
        if published.get(field) is not None:
            assert getattr(config, field) == published[field], field
    assert len(config.layer_types) == config.num_hidden_layers


@pytest.mark.parametrize("architecture", sorted(hf_archs.ARCHITECTURES))
def test_config_class_defaults_are_one_of_the_shipped_flagships(architecture):
    """Each config class's defaults are its flagship: one preset must agree with them on every size."""
    needs(architecture)
    cls = hf_archs.ARCHITECTURES[architecture].config_class
    mine = [n for n, p in all_presets().items() if p.architecture == architecture]
    assert mine, f"no preset for architecture {architecture!r}"
    defaults = cls()
    sizes = [f.name for f in dataclasses.fields(cls) if f.name.endswith(("_size", "_layers", "_heads", "_dim"))
             or f.name.startswith(("num_", "n_"))]

    def differences(name: str) -> dict:
        cfg = preset(name)
        return {f: (getattr(cfg, f), getattr(defaults, f)) for f in sizes if getattr(cfg, f) != getattr(defaults, f)}

    diffs = {n: differences(n) for n in mine}
    assert any(not d for d in diffs.values()), f"no preset matches the {cls.__name__} defaults: {diffs}"


def test_published_values_the_docs_flag_are_carried():
    assert preset("qwen3-32b").intermediate_size == 25600
    olmo = preset("olmo-2-32b")
    assert (olmo.hidden_size, olmo.num_hidden_layers, olmo.num_attention_heads, olmo.num_key_value_heads,
            olmo.intermediate_size) == (5120, 64, 40, 8, 27648)
    gemma = preset("gemma-3-27b")
    assert gemma.layer_types.count("full_attention") == 10 and gemma.sliding_window == 1024
    assert gemma.tie_word_embeddings is True
    assert get_preset("deepseek-v3").config_json["num_nextn_predict_layers"] == 1
    assert get_preset("kimi-k2").config_json["rope_scaling"]["beta_fast"] == 1.0
    assert get_preset("gpt-oss-120b").config_json["num_local_experts"] == 128
    assert any("rms_norm_eps" in u for u in get_preset("kimi-k2").unverified)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(PresetError, match=r"unknown preset 'banana'; known: \["):
        preset("banana")


def test_unregistered_architecture_is_skipped_with_a_note(monkeypatch):
    monkeypatch.delitem(hf_archs.ARCHITECTURES, "olmo2")
    assert skipped_presets()["olmo-2-7b"] == "architecture 'olmo2' is not registered in hf_archs yet"
    assert "olmo-2-7b" not in preset_names()
    assert "olmo-2-7b" in preset_names(registered_only=False)
    with pytest.raises(PresetError, match="preset 'olmo-2-7b' cannot be built: architecture 'olmo2' is not "
                                          "registered"):
        preset("olmo-2-7b")


def test_overrides_go_through_validation():
    assert preset("qwen3-8b", num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(hf_archs.ConfigError, match="num_key_value_heads"):
        preset("qwen3-8b", num_key_value_heads=5)


def test_preset_is_exported_from_the_package():
    assert hf_archs.preset("qwen3-0.6b").hidden_size == 1024
