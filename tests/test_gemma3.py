"""Gemma 3 checks the contract suite does not make: both checkpoint prefixes, the window is really active,
the legacy config names convert as transformers converts them, and the embedding scale (buffer and bf16 rounding)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

import hf_archs
from cases import BY_NAME, SEQ_LEN
from case_gemma3 import multimodal
from helpers import max_rel_diff, ours_from, reference, tokens
from hf_archs.models.gemma3.modeling_gemma3 import ScaledWordEmbedding

CASE = BY_NAME["gemma3"]
ARCH = hf_archs.ARCHITECTURES["gemma3"]

# google/gemma-3-27b-pt config.json, text_config (sparse: the rest are Gemma3TextConfig defaults).
HUB_27B_TEXT = dict(head_dim=128, hidden_size=5376, intermediate_size=21504, model_type="gemma3_text",
                    num_attention_heads=32, num_hidden_layers=62, num_key_value_heads=16, query_pre_attn_scalar=168,
                    rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024)
# A 1B-style config: legacy names, no scaling.
HUB_1B_STYLE_TEXT = dict(head_dim=256, hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                         num_hidden_layers=26, num_key_value_heads=1, query_pre_attn_scalar=256,
                         rope_local_base_freq=10_000, rope_scaling=None, rope_theta=1_000_000, sliding_window=512,
                         sliding_window_pattern=6, max_position_embeddings=32_768, vocab_size=262_144)


def _keys(root) -> list[str]:
    with safe_open(str(next(root.glob("*.safetensors"))), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("text", [HUB_27B_TEXT, HUB_1B_STYLE_TEXT, CASE.official["text_config"]],
                         ids=["27b", "1b-style", "tiny"])
def test_legacy_config_names_convert_as_transformers_does(text):
    cfg = {k: v for k, v in text.items() if k != "model_type"}
    ours, theirs = ARCH.config_class(**copy.deepcopy(cfg)), Gemma3TextConfig(**copy.deepcopy(cfg))
    assert ours.layer_types == theirs.layer_types
    assert ours.rope_parameters == theirs.rope_parameters
    for name in ("sliding_window", "query_pre_attn_scalar", "head_dim", "hidden_activation", "rms_norm_eps",
                 "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings"):
        assert getattr(ours, name) == getattr(theirs, name), name
    # The converted form (what save_pretrained writes) converts to itself.
    again = ARCH.config_class(**{k: v for k, v in json.loads(ours.to_json_string()).items() if k != "model_type"})
    assert again.layer_types == ours.layer_types and again.rope_parameters == ours.rope_parameters


def test_defaults_are_gemma_3_27b():
    ours, hub = ARCH.config_class(), ARCH.config_class(**copy.deepcopy(HUB_27B_TEXT))
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "vocab_size",
                 "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "hidden_activation",
                 "layer_types", "rope_parameters"):
        assert getattr(ours, name) == getattr(hub, name), name
    assert [i for i, t in enumerate(ours.layer_types) if t == "full_attention"] == list(range(5, 62, 6))
    assert ours.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert ours.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}


def test_flat_rope_parameters_are_refused():
    with pytest.raises(hf_archs.ConfigError, match="rope_parameters must be keyed by layer type"):
        ARCH.config_class(rope_parameters={"rope_type": "default", "rope_theta": 1e4})


def test_both_checkpoint_prefixes_load(tmp_path):
    ref = reference(CASE)
    official = CASE.official_config()

    hub = tmp_path / "hub"  # the Hub files' prefix, which save_pretrained still writes
    hub.mkdir()
    CASE.write_release(ref, official, hub)
    hub_keys = _keys(hub)
    assert any(k.startswith("language_model.model.layers.") for k in hub_keys)
    assert any(k.startswith("vision_tower.") for k in hub_keys)
    assert any(k.startswith("multi_modal_projector.") for k in hub_keys)

    v5 = tmp_path / "v5"  # transformers v5 module names, with the config.json it writes
    mm = multimodal(ref, official)
    mm.config.save_pretrained(v5)
    save_file({k: v.contiguous() for k, v in mm.state_dict().items() if k != "lm_head.weight"},
              v5 / "model.safetensors", metadata={"format": "pt"})
    v5_keys = _keys(v5)
    assert any(k.startswith("model.language_model.layers.") for k in v5_keys)
    assert any(k.startswith("model.vision_tower.") for k in v5_keys)
    assert not any(k.startswith("language_model.") for k in v5_keys)

    ids = tokens(CASE, batch=2)
    with torch.no_grad():
        expected = ref(ids).logits
        logits = [hf_archs.from_official(root, attn_implementation="eager")(ids).logits for root in (hub, v5)]
    assert max_rel_diff(logits[0], expected) <= 1e-5
    assert torch.equal(logits[0], logits[1])


def test_sliding_window_is_active():
    ref = reference(CASE)
    ours = ours_from(CASE, ref)
    window = ours.config.sliding_window
    assert window < SEQ_LEN
    official = CASE.official_config()
    official["text_config"]["sliding_window"] = 10 * SEQ_LEN  # wider than the sequence: no position is cut off
    wide = ARCH.causal_lm_class(hf_archs.config_from_official(official))
    wide.load_state_dict(ref.state_dict(), strict=True)
    wide.set_attn_implementation("eager")
    ids = tokens(CASE)
    with torch.no_grad():
        a, b = ours(ids).logits[0], wide.eval()(ids).logits[0]
    # Up to position window - 1 every key is inside the window; from position `window` on, key 0 and up fall out.
    assert max_rel_diff(a[:window], b[:window]) <= 1e-6
    per_position = (a[window:] - b[window:]).abs().amax(dim=-1)
    assert (per_position > 1e-3).all(), per_position


def test_embedding_scale_buffer_after_loading(tmp_path):
    ours = ours_from(CASE, reference(CASE))
    expected = torch.tensor(ours.config.hidden_size**0.5)
    ours.save_pretrained(tmp_path / "ours")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(back.model.embed_tokens.embed_scale, expected)

    CASE.write_release(reference(CASE), CASE.official_config(), tmp_path / "hub")
    loaded = hf_archs.from_official(tmp_path / "hub")
    assert torch.equal(loaded.model.embed_tokens.embed_scale, expected)


def test_bf16_embedding_scale_rounds_like_transformers():
    hidden = 5376  # 27B: sqrt(5376) = 73.32, which is 73.5 in bf16
    torch.manual_seed(0)
    theirs = Gemma3TextScaledWordEmbedding(8, hidden, 0, embed_scale=hidden**0.5).to(torch.bfloat16)
    ours = ScaledWordEmbedding(8, hidden, 0, embed_scale=hidden**0.5).to(torch.bfloat16)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ids = torch.arange(8)[None]
    out = ours(ids)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, theirs(ids))
    assert torch.equal(out, ours.weight[ids] * 73.5)
    assert not torch.equal(out, (ours.weight[ids].float() * hidden**0.5).to(torch.bfloat16))


def test_bf16_model_embeddings_match_transformers():
    # hidden 72: sqrt = 8.485, which is 8.5 in bf16, so the rounding shows in the embeddings.
    case = copy.deepcopy(CASE)
    case.official["text_config"]["hidden_size"] = 72
    ref = reference(case).to(torch.bfloat16)
    ours = ours_from(case, ref).to(torch.bfloat16)
    ids = tokens(case)
    with torch.no_grad():
        a, b = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert torch.equal(a.hidden_states[0], b.hidden_states[0])
    assert max_rel_diff(a.logits.float(), b.logits.float()) <= 2e-2
