"""Registration, the registry, and the hf-archs command."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_archs
from hf_archs.cli import main
from hf_archs.registry import Architecture, register_all
from hf_archs.tour import tiny_config

NAMES = sorted(hf_archs.ARCHITECTURES)


def test_every_architecture_registered_without_failures():
    assert hf_archs._registration_failures == []
    for arch in hf_archs.ARCHITECTURES.values():
        assert arch.model_type == f"hfa_{arch.name}"
        assert CONFIG_MAPPING[arch.model_type] is arch.config_class
        config = AutoConfig.for_model(arch.model_type)
        assert type(config) is arch.config_class
        for official in arch.official_model_types:
            assert hf_archs.by_official_model_type(official) is arch
        for name in arch.official_architectures:
            assert hf_archs.registry.by_official_config({"model_type": "git", "architectures": [name]}) is arch
        assert arch.official_model_types or arch.official_architectures, arch.name
        assert hf_archs.by_official_model_type(arch.model_type) is arch


def test_transformers_own_types_are_untouched():
    import transformers

    for arch in hf_archs.ARCHITECTURES.values():
        for official in arch.official_model_types:
            if official in CONFIG_MAPPING:
                assert CONFIG_MAPPING[official].__module__.startswith("transformers."), official
    assert CONFIG_MAPPING["qwen3"] is transformers.Qwen3Config


def test_registration_never_raises(monkeypatch, caplog):
    broken = Architecture("broken", "does_not_exist", "X", "Y", "Z", ("broken",))
    monkeypatch.setitem(hf_archs.ARCHITECTURES, "broken", broken)
    with caplog.at_level(logging.WARNING, logger="hf_archs.registry"):
        assert register_all() == ["broken"]
    assert "could not register broken" in caplog.text


def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type 'banana' is not supported by hf_archs; supported: "):
        hf_archs.by_official_model_type("banana")


@pytest.mark.parametrize("name", NAMES)
def test_tiny_config_keeps_the_flagship_layout(name):
    arch = hf_archs.ARCHITECTURES[name]
    flagship, tiny = arch.config_class(), tiny_config(arch)
    assert tiny.hidden_size == 64 and tiny.num_hidden_layers == 6
    assert set(tiny.layer_types) == set(flagship.layer_types)
    assert (tiny.num_key_value_heads == tiny.num_attention_heads) == (
        flagship.num_key_value_heads == flagship.num_attention_heads)
    model = AutoModelForCausalLM.from_config(tiny)
    assert type(model) is arch.causal_lm_class
    assert type(AutoModel.from_config(tiny)) is arch.model_class


def test_tour_command_runs_and_reports(capsys, tmp_path):
    assert main(["tour", "--arch", NAMES[0], "--quiet", "--format", "json", "--new-tokens", "4",
                 "--out", str(tmp_path / "tour")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["architecture"] for r in rows] == [NAMES[0]]
    assert rows[0]["reload_exact"] is True and rows[0]["generated"] == 4
    assert rows[0]["class"] == hf_archs.ARCHITECTURES[NAMES[0]].causal_lm_class.__name__


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "hf_archs.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "tour" in out and "list" in out
    out = subprocess.run([sys.executable, "-m", "hf_archs.cli", "list"], capture_output=True, text=True,
                         check=True).stdout
    assert all(name in out for name in NAMES)
