"""Qwen3-Next: a tiny `qwen3_next` release (3 Gated DeltaNet layers + 1 gated full-attention layer; one MoE layer
made dense by `mlp_only_layers`; one MTP layer), in the Hub's layout: per-expert tensors, the MTP layer as `mtp.*`
(`fc`, `pre_fc_norm_embedding`, `pre_fc_norm_hidden`, `layers.0.*`, `norm`), the config with the release's own field
names (`rope_theta` / `partial_rotary_factor` at the top level, `full_attention_interval`).

transformers' Qwen3NextForCausalLM is the reference (its Gated DeltaNet runs its torch fallback, chunk 64); it has
no MTP layer (it drops `mtp.*`), so the MTP tensors are generated here (seeded) and written into the release and into
the state handed to ours (`to_ours`). Ours runs its DeltaNet in chunks of `linear_chunk_size` = 8 (ours, not a
release field): the test sequence spans three chunks.
Source of the layout: https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct (config.json, model.safetensors.index.json)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from cases import TINY, Case
from safetensors.torch import save_file

OFFICIAL = dict(
    TINY, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], head_dim=16, rope_theta=10000.0,
    partial_rotary_factor=0.25, full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=8,
    linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[1], attention_bias=False, tie_word_embeddings=False,
    hidden_act="silu", linear_chunk_size=8)

# Ours, not transformers' (nor the release's): kept out of the reference's config.
_OURS_ONLY = ("model_type", "architectures", "linear_chunk_size", "num_nextn_predict_layers", "mtp_loss_weight")
# The release's MTP names -> ours (hf_archs/mtp.py's, under `mtp.layers.0`).
MTP_NAMES = {"fc.weight": "layers.0.eh_proj.weight", "pre_fc_norm_embedding.weight": "layers.0.enorm.weight",
             "pre_fc_norm_hidden.weight": "layers.0.hnorm.weight", "norm.weight": "layers.0.shared_head.norm.weight"}


def reference_config(official: dict[str, Any]):
    import transformers

    config = transformers.Qwen3NextConfig(**{k: v for k, v in official.items() if k not in _OURS_ONLY})
    config._attn_implementation = "eager"
    return config


def reference(official: dict[str, Any]) -> torch.nn.Module:
    import transformers

    return transformers.Qwen3NextForCausalLM(reference_config(official)).eval()


def mtp_state(official: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Seeded MTP tensors in the release's names (`mtp.*`), experts fused as transformers keeps them in memory:
    a full-attention MoE decoder layer of transformers' plus fc and the three norms (zero-centred)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer

    config = reference_config(official)
    full = config.layer_types.index("full_attention")  # a layer index whose type is full attention (and MoE)
    hidden = official["hidden_size"]
    shapes = {f"layers.0.{name}": t.shape for name, t in Qwen3NextDecoderLayer(config, full).state_dict().items()}
    shapes.update({"fc.weight": (hidden, 2 * hidden), "pre_fc_norm_embedding.weight": (hidden,),
                   "pre_fc_norm_hidden.weight": (hidden,), "norm.weight": (hidden,)})
    gen = torch.Generator().manual_seed(11)
    state = {}
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=gen)
        state[f"mtp.{name}"] = 0.1 * noise if len(shapes[name]) == 1 else 0.08 * noise
    return state


def to_ours(official: dict[str, Any]):
    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mtp = {"mtp." + MTP_NAMES.get(name[4:], name[4:]): t for name, t in mtp_state(official).items()}
        return {**state, **mtp}
    return convert


def per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] -> the release's per-expert Linears."""
    out = {}
    for name, t in state.items():
        if name.endswith(".experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith(".experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t.clone()
    return out


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    """The reference's weights per expert, plus the MTP layer as `mtp.*`, and the release's own config.json."""
    tensors = per_expert({**ref.state_dict(), **mtp_state(official)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "model.safetensors", metadata={"format": "pt"})
    config = {k: v for k, v in official.items() if k != "linear_chunk_size"}
    (root / "config.json").write_text(json.dumps(dict(config, torch_dtype="float32"), indent=2))


@contextlib.contextmanager
def bf16_reference_kernels(chunk_size: int = OFFICIAL["linear_chunk_size"]) -> Iterator[None]:
    """Inside the block, transformers' Qwen3-Next runs our Gated DeltaNet kernels (chunks of `chunk_size`, the same
    path choice as ours): its torch fallback orders the sums differently, so bf16 outputs could differ in a last bit
    there; with the kernels shared, everything around them must match bit for bit."""
    from transformers.models.qwen3_next import modeling_qwen3_next as tq

    from hf_archs.layers import gated_deltanet as gd

    def kernel(q, k, v, g, beta, initial_state=None, output_final_state=False, **_):
        q, k = gd.l2norm_rsqrt(q.float()), gd.l2norm_rsqrt(k.float())
        mode = gd.pick_mode("auto", q, q.shape[1], initial_state is not None)
        out, state = gd.gated_delta_rule(q, k, v, g, beta, mode, initial_state=initial_state,
                                         output_final_state=output_final_state, chunk_size=chunk_size)
        return out.to(v.dtype), state

    saved = tq.torch_chunk_gated_delta_rule, tq.torch_recurrent_gated_delta_rule
    tq.torch_chunk_gated_delta_rule = tq.torch_recurrent_gated_delta_rule = kernel
    try:
        yield
    finally:
        tq.torch_chunk_gated_delta_rule, tq.torch_recurrent_gated_delta_rule = saved


CASE = Case(name="qwen3_next", official=OFFICIAL, reference=reference, write_release=write_release,
            to_ours=to_ours(OFFICIAL), bf16_reference_kernels=bf16_reference_kernels)
