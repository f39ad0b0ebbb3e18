"""Mistral Small 3.1: a tiny multimodal `mistral3` release whose `text_config` is the decoder hf_archs loads.

The shape of the real release is kept: outer model_type "mistral3" with a Pixtral `vision_config`, text model_type
"mistral" with `head_dim` given and != hidden_size / num_attention_heads (24 * 4 = 96 != 64, as 128 * 32 != 5120),
rope_theta 1e9, the official text field names. One change for coverage: `sliding_window` 8 (< SEQ_LEN) instead of
the release's null, so parity runs past a window; tests/test_mistral3.py checks the null (full attention) shape.
Source: https://huggingface.co/mistralai/Mistral-Small-3.1-24B-Base-2503/blob/main/config.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cases import Case

TEXT = dict(model_type="mistral", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, hidden_act="silu", rms_norm_eps=1e-5,
            max_position_embeddings=256, rope_theta=1e9, sliding_window=8, attention_dropout=0.0,
            initializer_range=0.02, use_cache=True)
# One vision layer: the contract tests look for the first tensor named "layers.1." and "proj", which must be a
# text-decoder tensor.
VISION = dict(model_type="pixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
              head_dim=16, image_size=56, patch_size=14, num_channels=3, rope_theta=10000.0, hidden_act="silu",
              attention_dropout=0.0, initializer_range=0.02)
OFFICIAL = dict(model_type="mistral3", architectures=["Mistral3ForConditionalGeneration"], text_config=TEXT,
                vision_config=VISION, image_token_index=10, projector_hidden_act="gelu", spatial_merge_size=2,
                multimodal_projector_bias=False, vision_feature_layer=-1,
                # The release's lm_head is its own tensor. Its config.json has no outer tie_word_embeddings, which
                # transformers 5's Mistral3Config reads as True and then ties the tiny model's head to the
                # embeddings; saying False keeps the written release untied like the real one.
                tie_word_embeddings=False)


def _without_file_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}


def reference(official: dict[str, Any]) -> torch.nn.Module:
    """transformers' text-only MistralForCausalLM from the release's text_config (state_dict keys equal ours)."""
    import transformers

    config = transformers.MistralConfig(**_without_file_keys(official["text_config"]))
    config._attn_implementation = "eager"
    return transformers.MistralForCausalLM(config).eval()


def multimodal_model(ref: torch.nn.Module, official: dict[str, Any]) -> torch.nn.Module:
    """transformers' Mistral3ForConditionalGeneration (tiny random vision tower) holding `ref`'s text weights."""
    import transformers

    config = transformers.Mistral3Config(**_without_file_keys(official))
    gen = torch.Generator().manual_seed(7)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    text = {k[len("model."):]: v for k, v in ref.state_dict().items() if k.startswith("model.")}
    with torch.no_grad():
        for p in model.model.vision_tower.parameters():  # not the init values: a wrong load would show
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        model.model.language_model.load_state_dict(text, strict=True)
        model.lm_head.weight.copy_(ref.lm_head.weight)
    return model


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    """The release as transformers writes it: one safetensors file, config.json with model_type "mistral3"."""
    multimodal_model(ref, official).save_pretrained(root)
    assert json.loads((root / "config.json").read_text())["model_type"] == "mistral3"


CASE = Case(name="mistral3", official=OFFICIAL, reference=reference, write_release=write_release)
