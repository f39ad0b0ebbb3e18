"""Mistral Small 3.1 specifics: both multimodal key layouts load, the vision tower is skipped by the declared rule,
transformers' own CausalLM entry points cannot load the release (reference-gaps), the real release's config shape."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import hf_archs
from cases import BY_NAME, SEQ_LEN  # before case_mistral3: cases.py imports every tests/case_*.py itself
from case_mistral3 import multimodal_model, write_release  # isort: skip
from helpers import max_rel_diff, ours_from, reference, tokens

CASE = BY_NAME["mistral3"]


@pytest.fixture
def arch() -> hf_archs.Architecture:
    # Looked up per test, not at import: a missing registry entry fails these tests, not every test's collection.
    return hf_archs.ARCHITECTURES["mistral3"]


# transformers 5 in-memory names of Mistral3ForConditionalGeneration -> the Hub's older file layout
# (https://huggingface.co/mistralai/Mistral-Small-3.1-24B-Base-2503/blob/main/model.safetensors.index.json).
HUB_LAYOUT = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
              ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))


def _rename(name: str, renames) -> str:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old):]
    raise AssertionError(f"no rename for {name}")


def _write_layout(ref: torch.nn.Module, root: Path, layout: str) -> dict[str, torch.Tensor]:
    """A one-file release in the given key layout, written by hand (not by save_pretrained)."""
    official = CASE.official_config()
    state = multimodal_model(ref, official).state_dict()
    if layout == "hub":
        state = {_rename(k, HUB_LAYOUT): v for k, v in state.items()}
    root.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, root / "model.safetensors", metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(official))
    return state


def _release_keys(root: Path) -> list[str]:
    with safe_open(str(root / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_both_multimodal_layouts_load_with_equal_logits(layout, tmp_path):
    ref = reference(CASE)
    root = tmp_path / layout
    state = _write_layout(ref, root, layout)
    if layout == "hub":
        assert {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"} <= state.keys()
        assert any(k.startswith("vision_tower.") for k in state)
        assert any(k.startswith("multi_modal_projector.") for k in state)
        assert not any(k.startswith("model.") for k in state)
    else:
        assert {"model.language_model.embed_tokens.weight", "lm_head.weight"} <= state.keys()
        assert any(k.startswith("model.vision_tower.") for k in state)

    ids = tokens(CASE, batch=2)
    ours = hf_archs.from_official(root, attn_implementation="eager")
    with torch.no_grad():
        expected = ref(ids).logits
        assert max_rel_diff(ours(ids).logits, expected) <= 1e-5
        # The hand-written file is a genuine release: transformers' multimodal model loads it completely.
        full, info = transformers.Mistral3ForConditionalGeneration.from_pretrained(
            root, attn_implementation="eager", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert max_rel_diff(full.eval()(ids).logits, expected) <= 1e-5


def test_transformers_causal_lm_cannot_load_the_release_and_from_official_can(arch, tmp_path):
    ref = reference(CASE)
    root = tmp_path / "release"
    root.mkdir()
    write_release(ref, CASE.official_config(), root)

    # What users hit today (docs/reference-gaps.md, "Mistral Small 3.1 text").
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        transformers.AutoModelForCausalLM.from_pretrained(root)
    text_only, info = transformers.MistralForCausalLM.from_pretrained(root, output_loading_info=True)
    assert set(info["missing_keys"]) == set(text_only.state_dict())  # every weight random-initialised

    model = hf_archs.from_official(root, attn_implementation="eager")
    assert type(model) is arch.causal_lm_class
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert not [n for n, _ in model.named_parameters() if "vision" in n or "projector" in n]

    # Every release tensor outside the text decoder is dropped by a declared skip rule, and nothing else is.
    skipped = [k for k in _release_keys(root) if hf_archs.official.map_name(arch, k) is None]
    assert skipped and all(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in skipped)
    assert {k for k in _release_keys(root) if k.startswith(("vision_tower.", "multi_modal_projector."))} \
        == set(skipped)
    reasons = {reason for prefix, reason in arch.skip_keys if any(k.startswith(prefix) for k in skipped)}
    assert any("vision" in r for r in reasons)

    ids = tokens(CASE, batch=2)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5


def test_release_shape_without_sliding_window_matches_transformers():
    official = CASE.official_config()
    official["text_config"]["sliding_window"] = None  # as in the 24B release
    case = dataclasses.replace(CASE, official=official)
    ref = reference(case)
    ours = ours_from(case, ref)
    assert ours.config.layer_types == ["full_attention"] * 4 and ours.config.sliding_window is None
    ids = tokens(case, batch=2)
    with torch.no_grad():
        full = ours(ids).logits
        assert max_rel_diff(full, ref(ids).logits) <= 1e-5
        out = ours(ids[:, :5], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(5, SEQ_LEN):
            out = ours(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    assert max_rel_diff(torch.cat(steps, dim=1), full) <= 1e-5
    assert all(layer.keys.shape[-2] == SEQ_LEN for layer in cache.layers)  # nothing evicted


def test_defaults_and_the_real_release_config(arch):
    real = {  # text_config of Mistral-Small-3.1-24B-Base-2503's config.json (docs/official-releases.md, section 5)
        "model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"],
        "text_config": {"attention_dropout": 0.0, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
                        "initializer_range": 0.02, "intermediate_size": 32768, "max_position_embeddings": 131072,
                        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
                        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
                        "sliding_window": None, "use_cache": True, "vocab_size": 131072},
        "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "num_hidden_layers": 24},
        "torch_dtype": "bfloat16", "image_token_index": 10,
    }
    from_release = hf_archs.config_from_official(real)
    default = arch.config_class()
    for config in (from_release, default):
        assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                config.num_key_value_heads, config.head_dim, config.intermediate_size, config.vocab_size) \
            == (5120, 40, 32, 8, 128, 32768, 131072)
        assert config.rope_parameters["rope_theta"] == 1e9 and config.rope_parameters["rope_type"] == "default"
        assert config.rms_norm_eps == 1e-5 and config.max_position_embeddings == 131072
        assert config.sliding_window is None and config.layer_types == ["full_attention"] * 40
        assert config.tie_word_embeddings is False and config.hidden_act == "silu"
    assert from_release.dtype == torch.bfloat16
    with torch.device("meta"):
        model = arch.causal_lm_class(from_release)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4096, 5120) and attn.o_proj.weight.shape == (5120, 4096)
    assert attn.k_proj.weight.shape == (1024, 5120)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 23_572_403_200


def test_layer_types_must_follow_the_one_window(arch):
    text = {k: v for k, v in CASE.official["text_config"].items() if k != "model_type"}
    with pytest.raises(hf_archs.ConfigError, match="layer_types must be 'sliding_attention' on every layer"):
        arch.config_class(**dict(text, layer_types=["full_attention"] * 4))
    with pytest.raises(hf_archs.ConfigError, match="layer_types must be 'full_attention' on every layer"):
        arch.config_class(**dict(text, sliding_window=None, layer_types=["sliding_attention"] * 4))
    assert arch.config_class(**text).layer_types == ["sliding_attention"] * 4
