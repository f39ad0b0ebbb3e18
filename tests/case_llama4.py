"""Llama 4: a tiny multimodal `llama4` release (text decoder + a one-layer vision tower), in the Hub's layout.

Every layer kind of the real models is present: no_rope_layers [1, 1, 0, 0] and interleave_moe_layer_step 2
give (RoPE chunked, dense), (RoPE chunked, MoE), (NoPE global, dense), (NoPE global, MoE); chunks of 8 < SEQ_LEN,
llama3 RoPE scaling that moves frequencies at head_dim 16, Scout's L2 QK-norm. The text_config carries the
releases' forms: `rope_theta` + `rope_scaling`, an explicit `no_rope_layers` list, `attn_temperature_tuning: 4`.

floor_scale is 25: the NoPE temperature starts at position 24, which greedy generation (6 + 24 tokens) reaches
while every forward of SEQ_LEN positions stays below it. Below it, left-padded batches can be compared with
transformers, whose temperature ignores padding (tests/test_llama4.py covers a small floor_scale on its own).
Source of the shape: https://huggingface.co/meta-llama/Llama-4-Scout-17B-16E/blob/main/config.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cases import TINY, Case

TEXT_CONFIG = dict(
    TINY, model_type="llama4_text", head_dim=16, intermediate_size=32, intermediate_size_mlp=96,
    num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 0, 0],
    attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=4, floor_scale=25, attn_scale=0.1,
    rope_theta=500_000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    hidden_act="silu", attention_bias=False, tie_word_embeddings=False)

VISION_CONFIG = dict(model_type="llama4_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, image_size=16, patch_size=4, vision_output_dim=16,
                     projector_input_dim=16, projector_output_dim=16, pixel_shuffle_ratio=0.5)

OFFICIAL = dict(model_type="llama4", architectures=["Llama4ForConditionalGeneration"], text_config=TEXT_CONFIG,
                vision_config=VISION_CONFIG, boi_token_index=124, eoi_token_index=125, image_token_index=126,
                tie_word_embeddings=False)


def text_config(official: dict[str, Any]):
    """transformers' Llama4TextConfig from the release's text_config. transformers 5.24's strict config refuses
    the releases' `attn_temperature_tuning: 4` (it wants a bool), so it gets the truth value."""
    from transformers import Llama4TextConfig

    cfg = {k: v for k, v in official["text_config"].items() if k != "model_type"}
    cfg["attn_temperature_tuning"] = bool(cfg.get("attn_temperature_tuning", True))
    return Llama4TextConfig(**cfg)


def reference(official: dict[str, Any]) -> torch.nn.Module:
    """transformers' text-only Llama4ForCausalLM: keys model.* / lm_head.*, like ours."""
    from transformers import Llama4ForCausalLM

    config = text_config(official)
    config._attn_implementation = "eager"
    return Llama4ForCausalLM(config).eval()


def multimodal(ref: torch.nn.Module, official: dict[str, Any]) -> torch.nn.Module:
    """transformers' Llama4ForConditionalGeneration (random vision tower) carrying the reference's weights."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    cfg = {k: v for k, v in official.items() if k not in ("model_type", "architectures", "text_config")}
    torch.manual_seed(1)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text_config(official), **cfg)).eval()
    model.language_model.load_state_dict(ref.state_dict(), strict=True)
    return model


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    """The Hub layout: save_pretrained writes `language_model.model.*`, `language_model.lm_head.weight`,
    `vision_model.*` and `multi_modal_projector.*` in one file; config.json is the release's form."""
    multimodal(ref, official).save_pretrained(root)
    (root / "config.json").write_text(json.dumps(official, indent=2))


CASE = Case(name="llama4", official=OFFICIAL, reference=reference, write_release=write_release, head_dim_given=True)
