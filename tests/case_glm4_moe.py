"""GLM-4.5: a tiny `glm4_moe` release in zai-org's layout (per-expert tensors, one MTP layer after the decoder's).

Every layer kind of the release: a dense prefix (first_k_dense_replace) and routed layers with a shared expert,
QK-norm and attention biases; head_dim differs from hidden_size // num_attention_heads, as in the release
(96 x 128 > 5120). The correction bias is set non-zero so it takes part in the routing.
transformers' Glm4MoeForCausalLM is the reference; it has no MTP layer (it drops `model.layers.92.*` /
`model.layers.46.*`), so the MTP tensors are generated here (seeded) and written into the release and into the
state handed to ours (`to_ours`).
Source of the shape: https://huggingface.co/zai-org/GLM-4.5/blob/main/config.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from case_deepseek_v3 import seeded_mtp_state
from cases import TINY, Case
from safetensors.torch import save_file

OFFICIAL = dict(TINY, model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], head_dim=24,
                partial_rotary_factor=0.5, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=True,
                use_qk_norm=True, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
                n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                norm_topk_prob=True, num_nextn_predict_layers=1, tie_word_embeddings=False)


def set_correction_bias(model: torch.nn.Module, seed: int = 2) -> torch.nn.Module:
    """The release's balancing bias is a trained buffer; random values here so it really steers the choice."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    return model


def reference_config(official: dict[str, Any]):
    from transformers import Glm4MoeConfig

    config = Glm4MoeConfig(**{k: v for k, v in official.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "eager"
    return config


def reference(official: dict[str, Any]) -> torch.nn.Module:
    from transformers import Glm4MoeForCausalLM

    return set_correction_bias(Glm4MoeForCausalLM(reference_config(official)).eval())


def mtp_state(official: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Seeded MTP tensors in the in-memory layout (fused experts): a transformers decoder layer at index
    num_hidden_layers + k (routed) plus enorm / hnorm / eh_proj / embed_tokens / shared_head."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer

    config = reference_config(official)
    return seeded_mtp_state(lambda i: {name: t.shape for name, t in Glm4MoeDecoderLayer(config, i).state_dict().items()},
                            official, official.get("num_nextn_predict_layers", 0),
                            bias_suffixes=("e_score_correction_bias", ".bias"))


def to_ours(official: dict[str, Any]):
    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**state, **mtp_state(official)}
    return convert


def per_expert(state: dict[str, torch.Tensor], gate: str, up: str, down: str) -> dict[str, torch.Tensor]:
    """Fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] -> the release's per-expert
    `experts.<e>.<gate|up|down>.weight`; every other tensor unchanged."""
    out = {}
    for name, value in state.items():
        if name.endswith(".experts.gate_up_proj"):
            stem = name[: -len("gate_up_proj")]
            for e, w in enumerate(value):
                g, u = w.chunk(2, dim=0)
                out[f"{stem}{e}.{gate}.weight"], out[f"{stem}{e}.{up}.weight"] = g.clone(), u.clone()
        elif name.endswith(".experts.down_proj"):
            stem = name[: -len("down_proj")]
            for e, w in enumerate(value):
                out[f"{stem}{e}.{down}.weight"] = w.clone()
        else:
            out[name] = value.clone()
    return out


def write_file_release(tensors: dict[str, torch.Tensor], official: dict[str, Any], root: Path) -> None:
    """One safetensors file and the release's own config.json (its field names; tiny weights are fp32)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "model.safetensors", metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(dict(official, torch_dtype="float32"), indent=2))


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    """zai-org's layout: per-expert tensors, and the MTP layer at index num_hidden_layers (a full MoE layer plus
    eh_proj, enorm, hnorm, shared_head.{norm,head} and its own embed_tokens)."""
    state = to_ours(official)(ref.state_dict())
    write_file_release(per_expert(state, "gate_proj", "up_proj", "down_proj"), official, root)


CASE = Case(name="glm4_moe", official=OFFICIAL, reference=reference, write_release=write_release,
            to_ours=to_ours(OFFICIAL))
