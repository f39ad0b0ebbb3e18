"""Kimi Linear: a tiny `kimi_linear` release (KDA, NoPE MLA, KDA, NoPE MLA: `linear_attn_config` lists them
1-based as kda_layers [1, 3], full_attn_layers [2, 4], so an off-by-one reading swaps every layer; a dense first
layer, MoE after), in the Hub's layout: the release's names (`self_attn.f_a_proj`, `self_attn.q_conv1d`, ...,
`block_sparse_moe.experts.<e>.w1/w2/w3`) and its config.json field names (`num_experts_per_token`, `moe_renormalize`,
`linear_attn_config`, `model_max_length`, ...).

transformers' KimiLinearForCausalLM is the reference (its KDA runs its torch fallback, chunk 64). Its in-memory
names differ from the release's (`to_ours`): the forget gate's tensors live under `self_attn.forget_gate.`, the three
convolutions are one stacked `self_attn.conv1d`, and `block_sparse_moe` is renamed `mlp`. Ours keeps the release's
names and runs KDA in chunks of `linear_chunk_size` = 8 (ours, not a release field): the test sequence spans three.
Source of the layout: https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct (config.json, configuration_kimi.py);
vLLM's kimi_linear.py for the weight names.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from cases import Case
from safetensors.torch import save_file

OFFICIAL = {"model_type": "kimi_linear", "architectures": ["KimiLinearForCausalLM"], "vocab_size": 128, "hidden_size": 64, "head_dim": 72, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-5, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0, "tie_word_embeddings": False, "moe_intermediate_size": 32, "moe_renormalize": True, "moe_router_activation_func": "sigmoid", "num_experts": 8, "num_experts_per_token": 2, "num_shared_experts": 1, "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "moe_layer_freq": 1, "use_grouped_topk": True, "num_expert_group": 1, "topk_group": 1, "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "mla_use_nope": True, "num_nextn_predict_layers": 0, "model_max_length": 256, "linear_attn_config": {"head_dim": 16, "num_heads": 4, "short_conv_kernel_size": 4, "full_attn_layers": [2, 4],
                        "kda_layers": [1, 3]}, "linear_chunk_size": 8}

_OURS_ONLY = ("model_type", "architectures", "linear_chunk_size")


def reference(official: dict[str, Any]) -> torch.nn.Module:
    """transformers' KimiLinearForCausalLM; the balancing biases (buffers, zero at init) get seeded values so the
    bias-for-choice-only rule is exercised."""
    import transformers

    config = transformers.KimiLinearConfig(**{k: v for k, v in official.items() if k not in _OURS_ONLY})
    config._attn_implementation = "eager"
    model = transformers.KimiLinearForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(7)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))
    return model


def to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory names -> the release's (which ours keep)."""
    sparse = {int(m[1]) for name in state if (m := re.match(r"model\.layers\.(\d+)\.mlp\.experts\.", name))}
    out = {}
    for name, t in state.items():
        m = re.match(r"(model\.layers\.(\d+)\.)(.*)$", name)
        if m is None:
            out[name] = t
            continue
        prefix, layer, rest = m[1], int(m[2]), m[3]
        if rest.startswith("self_attn.forget_gate."):
            out[prefix + "self_attn." + rest[len("self_attn.forget_gate."):]] = t
        elif rest == "self_attn.conv1d.weight":  # [q | k | v] channels stacked
            for part, w in zip(("q", "k", "v"), t.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{part}_conv1d.weight"] = w.clone()
        elif rest.startswith("mlp.") and layer in sparse:
            out[prefix + "block_sparse_moe." + rest[len("mlp."):]] = t
        else:
            out[name] = t
    return out


def per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] -> the release's w1 (gate), w3 (up),
    w2 (down) per expert."""
    out = {}
    for name, t in state.items():
        if name.endswith(".experts.gate_up_proj"):
            prefix, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = t[e, :inter].clone()
                out[f"{prefix}{e}.w3.weight"] = t[e, inter:].clone()
        elif name.endswith(".experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = t[e].clone()
        else:
            out[name] = t.clone()
    return out


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    """The reference's weights in the release's names and per-expert layout, and the release's own config.json."""
    tensors = per_expert(to_ours(ref.state_dict()))
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "model.safetensors", metadata={"format": "pt"})
    config = {k: v for k, v in official.items() if k != "linear_chunk_size"}
    (root / "config.json").write_text(json.dumps(dict(config, torch_dtype="float32", rope_scaling=None), indent=2))


@contextlib.contextmanager
def bf16_reference_kernels(chunk_size: int = OFFICIAL["linear_chunk_size"]) -> Iterator[None]:
    """Inside the block, transformers' Kimi Linear runs our KDA kernels (chunks of `chunk_size`, the same path choice
    as ours): its torch fallback orders the sums differently, so bf16 outputs could differ in a last bit there; with
    the kernels shared, everything around them must match bit for bit."""
    from transformers.models.kimi_linear import modeling_kimi_linear as tk

    from hf_archs.layers import gated_deltanet as gd
    from hf_archs.layers import kda

    def kernel(q, k, v, g, beta, initial_state=None, output_final_state=False, **_):
        q, k = kda.l2norm_div(q.float()), kda.l2norm_div(k.float())
        mode = gd.pick_mode("auto", q, q.shape[1], initial_state is not None)
        out, state = kda.kda(q, k, v, g, beta, mode, initial_state=initial_state,
                             output_final_state=output_final_state, chunk_size=chunk_size)
        return out.to(v.dtype), state

    saved = tk.chunk_kimi_delta_attention, tk.recurrent_kimi_delta_attention
    tk.chunk_kimi_delta_attention = tk.recurrent_kimi_delta_attention = kernel
    try:
        yield
    finally:
        tk.chunk_kimi_delta_attention, tk.recurrent_kimi_delta_attention = saved


CASE = Case(name="kimi_linear", official=OFFICIAL, reference=reference, write_release=write_release, to_ours=to_ours,
            bf16_reference_kernels=bf16_reference_kernels)
