"""MiniMax-M2: a tiny `minimax_m2` release in MiniMaxAI's layout (`block_sparse_moe`, per-expert w1 / w3 / w2,
the correction bias beside `gate`, `num_mtp_modules` MTP modules after the decoder's layers).

The config.json carries the release's own fields (rotary_dim, attn_type_list, scoring_func, use_routing_bias,
qk_norm_type, shared_intermediate_size, use_mtp, ...); head_dim differs from hidden_size // num_attention_heads,
as in the release (48 x 128 > 3072). transformers renames `block_sparse_moe` to `mlp` in memory; ours keeps the
release's name.
transformers' MiniMaxM2ForCausalLM is the reference; it has no MTP modules, so they are generated here (seeded) and
written into the release and into the state handed to ours (`to_ours`), with the inner names of RBLN-SW/vllm-rbln's
vllm_rbln/models/minimax_m2_mtp.py (the official files hold none: MiniMax publishes no trained MTP weights).
Source of the shape: https://huggingface.co/MiniMaxAI/MiniMax-M2/blob/main/config.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from case_deepseek_v3 import seeded_mtp_state
from case_glm4_moe import per_expert, set_correction_bias, write_file_release
from cases import TINY, Case

LAYERS = TINY["num_hidden_layers"]
OFFICIAL = dict(TINY, model_type="minimax_m2", architectures=["MiniMaxM2ForCausalLM"], head_dim=24, rotary_dim=12,
                rope_theta=5_000_000, intermediate_size=32, num_local_experts=8, num_experts_per_tok=3,
                scoring_func="sigmoid", use_routing_bias=True, use_qk_norm=True, qk_norm_type="per_layer",
                attn_type_list=[1] * LAYERS, shared_intermediate_size=0, use_mtp=True, num_mtp_modules=2,
                mtp_transformer_layers=1, tie_word_embeddings=False)


def reference(official: dict[str, Any]) -> torch.nn.Module:
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    # `use_mtp` left out: transformers' generate would read it as "decode with MTP" and fail (no MTP weights).
    cfg = {k: v for k, v in official.items() if k not in ("model_type", "architectures", "use_mtp")}
    config = MiniMaxM2Config(**cfg)
    config._attn_implementation = "eager"
    return set_correction_bias(MiniMaxM2ForCausalLM(config).eval())


def rename_mlp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory `mlp` is the release's `block_sparse_moe`."""
    return {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in state.items()}


def mtp_state(official: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Seeded MTP tensors in the in-memory layout (fused experts): a transformers decoder layer at index
    num_hidden_layers + k plus enorm / hnorm / eh_proj / shared_head.{norm,head} (no embedding: the modules read
    the main model's)."""
    from transformers import MiniMaxM2Config
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2DecoderLayer

    config = MiniMaxM2Config(**{k: v for k, v in official.items() if k not in ("model_type", "architectures",
                                                                                "use_mtp")})

    def layer_shapes(i: int) -> dict[str, torch.Size]:
        layer = MiniMaxM2DecoderLayer(config, i).state_dict()
        return {name.removeprefix("layer."): t.shape
                for name, t in rename_mlp({f"layer.{name}": t for name, t in layer.items()}).items()}

    return seeded_mtp_state(layer_shapes, official, official.get("num_mtp_modules", 0), embedding=False)


def to_ours(official: dict[str, Any]):
    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**rename_mlp(state), **mtp_state(official)}
    return convert


def release_tensors(ref: torch.nn.Module, official: dict[str, Any]) -> dict[str, torch.Tensor]:
    """MiniMaxAI's layout: `block_sparse_moe.experts.<e>.{w1,w3,w2}.weight`, and the MTP modules at layers
    num_hidden_layers .. + num_mtp_modules - 1, each a full decoder layer plus enorm / hnorm / eh_proj /
    shared_head, with a copy of the embedding under the first one (vllm-rbln: "shared weights live only under the
    first MTP layer's namespace")."""
    release = per_expert(to_ours(official)(ref.state_dict()), "w1", "w3", "w2")
    if official.get("num_mtp_modules", 0):
        n = official["num_hidden_layers"]
        release[f"model.layers.{n}.embed_tokens.weight"] = release["model.embed_tokens.weight"].clone()
    return release


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    write_file_release(release_tensors(ref, official), official, root)


CASE = Case(name="minimax_m2", official=OFFICIAL, reference=reference, write_release=write_release,
            to_ours=to_ours(OFFICIAL))
