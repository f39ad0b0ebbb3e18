"""DeepSeek V3: a tiny `deepseek_v3` release (q-LoRA on, 2 expert groups, two dense layers then MoE, YaRN, one MTP
layer), in the Hub's layout: per-expert tensors, the MTP layer as `model.layers.<num_hidden_layers>.*`, the config
with the release's own field names (rope_theta + rope_scaling, auto_map, ...).

transformers' DeepseekV3ForCausalLM is the reference; it has no MTP layer (it drops `model.layers.61.*`), so the MTP
tensors are generated here (seeded) and written into the release and into the state handed to ours (`to_ours`).
Source of the layout: https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from cases import TINY, Case
from safetensors.torch import load_file, save_file

AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}

OFFICIAL = dict(
    TINY, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], auto_map=AUTO_MAP,
    num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=2, moe_layer_freq=1, norm_topk_prob=True,
    scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001, seq_aux=True, ep_size=1,
    q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    num_nextn_predict_layers=1, hidden_act="silu", attention_bias=False, attention_dropout=0.0, pretraining_tp=1,
    tie_word_embeddings=False, initializer_range=0.02)

_NOT_TRANSFORMERS = ("model_type", "architectures", "auto_map")


def reference_config(official: dict[str, Any]):
    import transformers

    config = transformers.DeepseekV3Config(**{k: v for k, v in official.items() if k not in _NOT_TRANSFORMERS})
    config._attn_implementation = "eager"
    return config


def reference(official: dict[str, Any]) -> torch.nn.Module:
    """transformers' DeepseekV3ForCausalLM; the balancing biases (buffers, zero at init) get seeded values so the
    bias-for-choice-only rule is exercised."""
    import transformers

    model = transformers.DeepseekV3ForCausalLM(reference_config(official)).eval()
    gen = torch.Generator().manual_seed(7)
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(0.05 * torch.randn(buf.shape, generator=gen))
    return model


def mtp_state(official: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Seeded MTP tensors in the in-memory layout (fused experts): a transformers decoder layer at index
    num_hidden_layers + k plus enorm / hnorm / eh_proj / embed_tokens / shared_head."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3DecoderLayer,
    )

    config = reference_config(official)
    return seeded_mtp_state(lambda i: {name: t.shape for name, t in DeepseekV3DecoderLayer(config, i).state_dict().items()},
                            official, official.get("num_nextn_predict_layers", 0), bias_scale=0.05)


def seeded_mtp_state(layer_shapes, official: dict[str, Any], count: int, embedding: bool = True,
                     bias_scale: float = 0.1, bias_suffixes: tuple[str, ...] = ("e_score_correction_bias",)
                     ) -> dict[str, torch.Tensor]:
    """Seeded tensors of `count` MTP modules at `model.layers.<num_hidden_layers + k>`: the decoder layer's
    (`layer_shapes(layer_idx)`: name -> shape) plus enorm / hnorm / eh_proj / shared_head.{norm,head} and, with
    `embedding`, the module's copy of the embedding. Norm weights near 1, biases named by `bias_suffixes` small."""
    n, hidden, vocab = official["num_hidden_layers"], official["hidden_size"], official["vocab_size"]
    gen = torch.Generator().manual_seed(11)
    state: dict[str, torch.Tensor] = {}
    for k in range(count):
        shapes = dict(layer_shapes(n + k))
        shapes.update({"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden),
                       "shared_head.norm.weight": (hidden,), "shared_head.head.weight": (vocab, hidden)})
        if embedding:
            shapes["embed_tokens.weight"] = (vocab, hidden)
        for name in sorted(shapes):
            noise = torch.randn(shapes[name], generator=gen)
            if name.endswith(bias_suffixes):
                value = bias_scale * noise
            elif len(shapes[name]) == 1:
                value = 1.0 + 0.1 * noise
            else:
                value = 0.08 * noise
            state[f"model.layers.{n + k}.{name}"] = value
    return state


def to_ours(official: dict[str, Any]):
    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**state, **mtp_state(official)}
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
            out[name] = t
    return out


def write_release(ref: torch.nn.Module, official: dict[str, Any], root: Path) -> None:
    """The reference's save_pretrained (per-expert tensors) plus the MTP layer, and the release's own config.json."""
    ref.save_pretrained(root)
    (file,) = root.glob("*.safetensors")
    tensors = load_file(file)
    tensors.update(per_expert(mtp_state(official)))
    save_file(tensors, file, metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(dict(official, torch_dtype="float32"), indent=2))


CASE = Case(name="deepseek_v3", official=OFFICIAL, reference=reference, write_release=write_release,
            to_ours=to_ours(OFFICIAL))
