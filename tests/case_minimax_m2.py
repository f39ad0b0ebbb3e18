"""MiniMax-M2: a tiny `minimax_m2` release in MiniMaxAI's layout (`block_sparse_moe`, per-expert w1 / w3 / w2,
the correction bias beside `gate`, `num_mtp_modules` MTP modules after the decoder's layers).

The config.json carries the release's own fields (rotary_dim, attn_type_list, scoring_func, use_routing_bias,
qk_norm_type, shared_intermediate_size, use_mtp, ...); head_dim differs from hidden_size // num_attention_heads,
as in the release (48 x 128 > 3072). transformers renames `block_sparse_moe` to `mlp` in memory; ours keeps the
release's name.
Source of the shape: https://huggingface.co/MiniMaxAI/MiniMax-M2/blob/main/config.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cases import TINY, Case
from case_glm4_moe import per_expert, set_correction_bias, write_file_release

LAYERS = TINY["num_hidden_layers"]
OFFICIAL = dict(TINY, model_type="minimax_m2", architectures=["MiniMaxM2ForCausalLM"], head_dim=24, rotary_dim=12,
                rope_theta=5_000_000, intermediate_size=32, num_local_experts=8, num_experts_per_tok=3,
                scoring_func="sigmoid", use_routing_bias=True, use_qk_norm=True, qk_norm_type="per_layer",
                attn_type_list=[1] * LAYERS, shared_intermediate_size=0, use_mtp=True, num_mtp_modules=3,
                mtp_transformer_layers=1, tie_word_embeddings=False)


def reference(official: dict[str, Any]) -> torch.nn.Module:
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    # `use_mtp` left out: transformers' generate would read it as "decode with MTP" and fail (no MTP weights).
    cfg = {k: v for k, v in official.items() if k not in ("model_type", "architectures", "use_mtp")}
    config = MiniMaxM2Config(**cfg)
    config._attn_implementation = "eager"
    return set_correction_bias(MiniMaxM2ForCausalLM(config).eval())


def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory `mlp` is the release's `block_sparse_moe`."""
    return {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in state.items()}


def copy_layer(release: dict[str, torch.Tensor], src: int, dst: int) -> dict[str, torch.Tensor]:
    """Layer `src`'s release tensors renamed to layer `dst` (an MTP layer holds a full decoder layer)."""
    prefix = f"model.layers.{src}."
    return {f"model.layers.{dst}.{k[len(prefix):]}": v.clone() for k, v in release.items() if k.startswith(prefix)}


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    """MiniMaxAI's layout: `block_sparse_moe.experts.<e>.{w1,w3,w2}.weight`, and MTP modules at layers
    num_hidden_layers .. + num_mtp_modules - 1. Their inner names are not verified against the release (vLLM
    skips the whole layer prefix): each holds a full decoder layer plus DeepSeek-style eh_proj / enorm / hnorm."""
    release = per_expert(to_ours(ref.state_dict()), "w1", "w3", "w2")
    n, h = official["num_hidden_layers"], official["hidden_size"]
    gen = torch.Generator().manual_seed(3)
    for i in range(official["num_mtp_modules"]):
        release.update(copy_layer(release, n - 1, n + i))
        release.update({f"model.layers.{n + i}.{k}": torch.randn(shape, generator=gen) for k, shape in {
            "eh_proj.weight": (h, 2 * h), "enorm.weight": (h,), "hnorm.weight": (h,)}.items()})
    write_file_release(release, official, root)


CASE = Case(name="minimax_m2", official=OFFICIAL, reference=reference, write_release=write_release, to_ours=to_ours)
