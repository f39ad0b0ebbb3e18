"""Mistral's native release layout: `consolidated.safetensors` + `params.json` (Mistral Small 3.1).

Names follow mistral-inference; q and k rows are stored with interleaved RoPE pairs and are permuted to the HF
rotate-half layout. Source: transformers models/mistral3/convert_mistral3_weights_to_hf.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .io import Release
from .plan import Producer

_RENAMES = [
    (r"^tok_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.attention\.wq\.weight$", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wk\.weight$", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wv\.weight$", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
]
# Vision tower and adapter of the multimodal release: named so the architecture's skip rule drops them.
_TOWER = [(r"^(vision_encoder|patch_merger|pre_mm_projector_norm)\.", r"vision_tower.\1."),
          (r"^vision_language_adapter\.", "multi_modal_projector.")]


def official_config(root: Path) -> dict[str, Any]:
    from .formats import read_json

    p = read_json(root / "params.json")
    text = {
        "model_type": "mistral",
        "hidden_size": p["dim"], "num_hidden_layers": p["n_layers"], "intermediate_size": p["hidden_dim"],
        "num_attention_heads": p["n_heads"], "num_key_value_heads": p.get("n_kv_heads", p["n_heads"]),
        "head_dim": p.get("head_dim", p["dim"] // p["n_heads"]), "rms_norm_eps": p.get("norm_eps", 1e-5),
        "vocab_size": p["vocab_size"], "rope_theta": p.get("rope_theta", 1e6),
        "sliding_window": p.get("sliding_window"),
        # params.json has no context length; the converter's default (transformers' script takes it as an argument).
        "max_position_embeddings": p.get("max_seq_len", 131072), "tie_word_embeddings": False,
    }
    return {"model_type": "mistral3", "architectures": ["Mistral3ForConditionalGeneration"], "text_config": text,
            "tie_word_embeddings": False}


def _permute_for_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Interleaved pairs (2i, 2i+1) -> halves (i, i + d/2) within each head.
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def tensors(root: Path, official: dict[str, Any], allow_pickle: bool):
    text = official["text_config"]
    release = Release(root, allow_pickle=allow_pickle, index_name="consolidated.safetensors.index.json",
                      pattern="consolidated*.safetensors")
    out: dict[str, Producer] = {}
    for name, info in release.tensors.items():
        new = None
        for pattern, repl in _RENAMES + _TOWER:
            new, n = re.subn(pattern, repl, name)
            if n:
                break
        else:
            new = name  # unknown: reported by the plan as unexpected, under its own name
        heads = {"q_proj": text["num_attention_heads"], "k_proj": text["num_key_value_heads"]}
        kind = next((k for k in heads if f".self_attn.{k}." in new), None)
        if kind:
            out[new] = Producer(info.shape, [(info.file, info.name)],
                                lambda r, i=info, h=heads[kind]: _permute_for_rope(r.get(i.file, i.name), h),
                                dtype=info.dtype)
        else:
            out[new] = Producer(info.shape, [(info.file, info.name)], lambda r, i=info: r.get(i.file, i.name),
                                dtype=info.dtype)
    return out, release.source_files() + [root / "params.json"], ["q/k rows permuted from interleaved RoPE pairs"]


def _detect(root: Path) -> bool:
    return (root / "params.json").is_file() and any(root.glob("consolidated*.safetensors"))


def _format():
    from .formats import Format

    return Format("mistral", "Mistral's native layout: consolidated.safetensors + params.json", _detect,
                  official_config, tensors)


FORMAT = _format()
