"""Gemma 3n: a tiny multimodal `gemma3n` release (text decoder + tiny audio tower, vision tower and embedders).

The text_config keeps every layer feature of E4B at a tenth of the depth: 10 layers, four sliding to one full
(full layers 4 and 9); the last 5 layers KV-shared (5-8 reuse layer 3's keys and values, 9 reuses layer 4's);
Gaussian top-k sparsity on layers 0-1; per-layer FFN widths; 4 AltUp streams; LAuReL; per-layer inputs whose
vocabulary (96) is smaller than the text vocabulary (128), as 262144 < 262400 on the Hub: the last 32 ids stand for
the vision and audio tokens, as `vocab_offset` says there. It carries the Hub's legacy names (`rope_theta`,
`rope_local_base_freq`, `rope_scaling`) and the two keys transformers ignores (`query_pre_attn_scalar`,
`altup_lr_multiplier`).

The sparse layers are the widest (256, 192; E4B's are 16384): sparsity 0.95 keeps about 5% of the units, each
`gate - cutoff` of a barely kept unit is a difference of two O(1) numbers, and with only a handful of units kept
that fp32 rounding dominates the layer's output. At widths of 64-96, transformers' own model then disagrees with
itself between cached decoding and a full forward by 5e-5 (relative), over the contract's 1e-5.
Source of the shape: https://huggingface.co/google/gemma-3n-E4B/blob/main/config.json

transformers cannot build the multimodal class here (its vision tower needs timm), so `write_release` writes the
safetensors file itself, with the release's key prefixes: the text decoder under `model.language_model.`, a tiny
transformers `Gemma3nAudioEncoder` under `model.audio_tower.`, transformers' `Gemma3nMultimodalEmbedder`s under
`model.embed_audio.` / `model.embed_vision.`, a few timm MobileNet-V5 tensors under `model.vision_tower.timm_model.`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cases import Case

LAYER_TYPES = ["sliding_attention"] * 4 + ["full_attention"] + ["sliding_attention"] * 4 + ["full_attention"]

TEXT_CONFIG = dict(
    model_type="gemma3n_text", vocab_size=128, vocab_size_per_layer_input=96, hidden_size=64,
    hidden_size_per_layer_input=8, intermediate_size=[256, 192, 96, 80, 128, 64, 96, 80, 64, 128],
    num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=LAYER_TYPES,
    sliding_window=8, num_kv_shared_layers=5, activation_sparsity_pattern=[0.95, 0.95] + [0.0] * 8,
    altup_active_idx=0, altup_coef_clip=120.0, altup_correct_scale=True, altup_lr_multiplier=1.0, altup_num_inputs=4,
    laurel_rank=4, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    max_position_embeddings=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None,
    query_pre_attn_scalar=16, attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
    bos_token_id=2, eos_token_id=1, pad_token_id=0, use_cache=True)

AUDIO_CONFIG = dict(
    model_type="gemma3n_audio", vocab_size=16, vocab_offset=112, input_feat_size=16, hidden_size=16,
    rms_norm_eps=1e-6, conf_attention_chunk_size=4, conf_attention_context_left=5, conf_attention_context_right=0,
    conf_attention_logit_cap=50.0, conf_num_attention_heads=2, conf_num_hidden_layers=1, conf_conv_kernel_size=3,
    conf_reduction_factor=4, conf_residual_weight=0.5, sscp_conv_channel_size=[4, 4], sscp_conv_group_norm_eps=1e-3,
    sscp_conv_kernel_size=[[3, 3], [3, 3]], sscp_conv_stride_size=[[2, 2], [2, 2]])

VISION_CONFIG = dict(model_type="gemma3n_vision", architecture="mobilenetv5_300m_enc", hidden_size=16, vocab_size=16,
                     vocab_offset=96, rms_norm_eps=1e-6, do_pooling=False, initializer_range=0.02)

OFFICIAL = dict(model_type="gemma3n", architectures=["Gemma3nForConditionalGeneration"], text_config=TEXT_CONFIG,
                audio_config=AUDIO_CONFIG, vision_config=VISION_CONFIG, audio_soft_tokens_per_image=4,
                vision_soft_tokens_per_image=4, boi_token_id=95, eoi_token_id=96, image_token_id=97, boa_token_id=94,
                eoa_token_id=112, audio_token_id=113, initializer_range=0.02)

# A few tensors of the timm MobileNet-V5 tower, named as in the release (shapes tiny).
VISION_TENSORS = {"conv_stem.conv.weight": (8, 3, 3, 3), "conv_stem.bn.weight": (8,), "conv_stem.bn.bias": (8,),
                  "blocks.0.0.conv_exp.weight": (16, 8, 3, 3), "blocks.0.0.bn1.weight": (16,),
                  "msfa.ffn.pw_exp.conv.weight": (32, 16, 1, 1), "msfa.norm.weight": (16,)}


def _without_file_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}


def text_config(official: dict[str, Any]):
    from transformers import Gemma3nTextConfig

    return Gemma3nTextConfig(**_without_file_keys(official["text_config"]))


def reference(official: dict[str, Any]) -> torch.nn.Module:
    """transformers' text-only Gemma3nForCausalLM: keys model.* / lm_head.*, like ours."""
    from transformers import Gemma3nForCausalLM

    config = text_config(official)
    config._attn_implementation = "eager"
    return Gemma3nForCausalLM(config).eval()


def tower_tensors(official: dict[str, Any], seed: int = 7) -> dict[str, torch.Tensor]:
    """The release's non-text tensors: tiny audio tower, both embedders, a few vision-tower tensors (random)."""
    from transformers import Gemma3nAudioConfig, Gemma3nVisionConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder, Gemma3nMultimodalEmbedder

    torch.manual_seed(seed)
    text = text_config(official)
    audio_cfg = Gemma3nAudioConfig(**_without_file_keys(official["audio_config"]))
    vision_cfg = Gemma3nVisionConfig(**_without_file_keys(official["vision_config"]))
    out = {f"model.audio_tower.{k}": v for k, v in Gemma3nAudioEncoder(audio_cfg).state_dict().items()}
    out |= {f"model.embed_audio.{k}": v for k, v in Gemma3nMultimodalEmbedder(audio_cfg, text).state_dict().items()}
    out |= {f"model.embed_vision.{k}": v for k, v in Gemma3nMultimodalEmbedder(vision_cfg, text).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out |= {f"model.vision_tower.timm_model.{k}": torch.randn(shape, generator=gen)
            for k, shape in VISION_TENSORS.items()}
    return out


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path,
                  extra: dict[str, torch.Tensor] | None = None) -> None:
    """The release's layout: one safetensors file, the text decoder under `model.language_model.` (no lm_head: it
    is tied), the towers beside it; config.json is the official multimodal one. `extra` adds tensors."""
    tensors = {f"model.language_model.{k}": v for k, v in ref.model.state_dict().items()}
    tensors |= tower_tensors(official)
    tensors |= extra or {}
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, root / "model.safetensors",
              metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(official, indent=2))


CASE = Case(name="gemma3n", official=OFFICIAL, reference=reference, write_release=write_release)
