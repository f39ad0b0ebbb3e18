"""Gemma 3: a tiny multimodal `gemma3` release (text decoder + a one-layer SigLIP tower), in the Hub's layout.

The text_config uses the legacy names the Hub config.json files carry (rope_theta, rope_local_base_freq,
rope_scaling, sliding_window_pattern); pattern 2 over 4 layers gives local, global, local, global.
Source of the shape: https://huggingface.co/google/gemma-3-27b-pt/blob/main/config.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cases import TINY, Case

TEXT_CONFIG = dict(
    TINY, model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
    sliding_window_pattern=2, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    rope_scaling={"factor": 8.0, "rope_type": "linear"}, hidden_activation="gelu_pytorch_tanh",
    final_logit_softcapping=30.0, attn_logit_softcapping=None)

VISION_CONFIG = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, image_size=16, patch_size=4, vision_use_head=False)

OFFICIAL = dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], text_config=TEXT_CONFIG,
                vision_config=VISION_CONFIG, mm_tokens_per_image=4, boi_token_index=124, eoi_token_index=125,
                image_token_index=126, tie_word_embeddings=True)


def text_config(official: dict[str, Any]):
    """transformers' Gemma3TextConfig from the release's text_config (tying lives at the outer level)."""
    from transformers import Gemma3TextConfig

    cfg = {k: v for k, v in official["text_config"].items() if k != "model_type"}
    cfg.setdefault("tie_word_embeddings", official.get("tie_word_embeddings", True))
    return Gemma3TextConfig(**cfg)


def reference(official: dict[str, Any]) -> torch.nn.Module:
    """transformers' text-only Gemma3ForCausalLM: keys model.* / lm_head.*, like ours."""
    from transformers import Gemma3ForCausalLM

    config = text_config(official)
    config._attn_implementation = "eager"
    return Gemma3ForCausalLM(config).eval()


def multimodal(ref: torch.nn.Module, official: dict[str, Any]) -> torch.nn.Module:
    """transformers' Gemma3ForConditionalGeneration (random vision tower) carrying the reference's text weights."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = {k: v for k, v in official.items() if k not in ("model_type", "architectures")}
    torch.manual_seed(1)
    model = Gemma3ForConditionalGeneration(Gemma3Config(**cfg)).eval()
    model.model.language_model.load_state_dict(ref.model.state_dict(), strict=True)
    model.tie_weights()
    return model


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    """The Hub layout: save_pretrained writes the checkpoint keys the Hub files have (`language_model.model.*`,
    `vision_tower.*`, `multi_modal_projector.*`); config.json is the Hub's sparse form with legacy names."""
    multimodal(ref, official).save_pretrained(root)
    (root / "config.json").write_text(json.dumps(official, indent=2))


CASE = Case(name="gemma3", official=OFFICIAL, reference=reference, write_release=write_release, head_dim_given=True)
