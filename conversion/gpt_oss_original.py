"""gpt-oss's `original/` folder: OpenAI's own layout, read by its reference code (openai/gpt-oss).

`config.json` is OpenAI's `ModelConfig` (no model_type: `num_experts`, `experts_per_token`, `initial_context_length`,
`rope_scaling_factor`, `rope_ntk_alpha` / `rope_ntk_beta`), the weights `*.safetensors` under OpenAI's names:
- `block.N.attn.qkv.{weight,bias}` fused [(heads + 2 kv heads) * head_dim, ...]: split into q / k / v rows;
- `block.N.mlp.mlp1_weight.{blocks,scales}` / `mlp2_weight.{blocks,scales}`: MXFP4 along the input dimension,
  [E, out, in] once dequantized; the gpt_oss architecture's declared `dequant_transposed` rule lays them out
  in-major (`gate_up_proj` [E, H, 2I] with gate / up still interleaved by column, `down_proj` [E, I, H]);
- `block.N.attn.sinks`, `block.N.{attn,mlp}.norm.scale` (fp32), `block.N.mlp.gate` (the router), `mlp{1,2}_bias`,
  `embedding`, `norm.scale`, `unembedding` (the untied head).
Sources: openai/gpt-oss `gpt_oss/torch/{model,weights}.py`; huggingface/transformers
`models/gpt_oss/convert_gpt_oss_weights_to_hf.py` (key map, qkv split, YaRN fields, eos ids).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hf_archs.errors import CheckpointError

from . import dequant
from .io import Release
from .plan import Producer

_RENAMES = [
    (r"^embedding\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.scale$", "model.norm.weight"),
    (r"^unembedding\.weight$", "lm_head.weight"),
    (r"^block\.(\d+)\.attn\.norm\.scale$", r"model.layers.\1.input_layernorm.weight"),
    (r"^block\.(\d+)\.attn\.sinks$", r"model.layers.\1.self_attn.sinks"),
    (r"^block\.(\d+)\.attn\.out\.(weight|bias)$", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"^block\.(\d+)\.mlp\.norm\.scale$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^block\.(\d+)\.mlp\.gate\.(weight|bias)$", r"model.layers.\1.mlp.router.\2"),
    (r"^block\.(\d+)\.mlp\.mlp1_bias$", r"model.layers.\1.mlp.experts.gate_up_proj_bias"),
    (r"^block\.(\d+)\.mlp\.mlp2_bias$", r"model.layers.\1.mlp.experts.down_proj_bias"),
]
_QKV = re.compile(r"^block\.(\d+)\.attn\.qkv\.(weight|bias)$")
_EXPERTS = re.compile(r"^block\.(\d+)\.mlp\.(mlp1|mlp2)_weight(\.blocks|\.scales|)$")
_TARGET = {"mlp1": "gate_up_proj", "mlp2": "down_proj"}
# o200k_harmony's fixed ids (transformers' GptOssConverter): <|endoftext|> 199999, <|return|> 200002.
_HARMONY_LAST_SPECIAL = 200018


def official_config(root: Path) -> dict[str, Any]:
    """OpenAI's ModelConfig in transformers' GptOssConfig names (as transformers' converter maps it)."""
    from .formats import read_json

    c = read_json(root / "config.json")
    try:
        cfg = {
            "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"],
            "num_hidden_layers": c["num_hidden_layers"], "num_local_experts": c["num_experts"],
            "num_experts_per_tok": c["experts_per_token"], "vocab_size": c["vocab_size"],
            "hidden_size": c["hidden_size"], "intermediate_size": c["intermediate_size"],
            "swiglu_limit": c["swiglu_limit"], "head_dim": c["head_dim"],
            "num_attention_heads": c["num_attention_heads"], "num_key_value_heads": c["num_key_value_heads"],
            "sliding_window": c["sliding_window"], "rope_theta": c["rope_theta"],
            # The reference's RoPE: NTK-by-parts YaRN without truncation (beta_fast = ntk_beta, beta_slow =
            # ntk_alpha) over initial_context_length (transformers' converter hard-codes its 4096).
            "rope_scaling": {"rope_type": "yarn", "factor": float(c["rope_scaling_factor"]),
                             "beta_fast": float(c["rope_ntk_beta"]), "beta_slow": float(c["rope_ntk_alpha"]),
                             "original_max_position_embeddings": c["initial_context_length"], "truncate": False},
            "rms_norm_eps": 1e-5, "attention_bias": True, "tie_word_embeddings": False,
        }
    except KeyError as err:
        raise CheckpointError(f"{root / 'config.json'}: OpenAI's ModelConfig field {err} is missing") from err
    harmony = c["vocab_size"] > _HARMONY_LAST_SPECIAL  # the ids below exist only in o200k_harmony's vocabulary
    cfg.update(eos_token_id=199999 if harmony else None, pad_token_id=199999 if harmony else None)
    return cfg


def _transposed(prod: Producer) -> Producer:
    """An unquantized expert weight stored [E, out, in], laid out in-major as the architecture keeps it."""
    return Producer((*prod.shape[:-2], prod.shape[-1], prod.shape[-2]), prod.sources,
                    lambda r, p=prod: p.make(r).transpose(-1, -2).contiguous(), dtype=prod.dtype)


def tensors(root: Path, official: dict[str, Any], allow_pickle: bool):
    release = Release(root, allow_pickle=allow_pickle)
    heads, kv, head_dim = official["num_attention_heads"], official["num_key_value_heads"], official["head_dim"]
    split = [heads * head_dim, kv * head_dim, kv * head_dim]
    out: dict[str, Producer] = {}
    experts: dict[tuple[str, str], dict[str, Any]] = {}
    for name, info in release.tensors.items():
        if m := _EXPERTS.match(name):
            experts.setdefault((m[1], m[2]), {})[m[3] or "plain"] = info
            continue
        if m := _QKV.match(name):
            if info.shape[0] != sum(split):
                raise CheckpointError(f"{name}: {info.shape[0]} rows, expected {split} (q, k, v)")
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"model.layers.{m[1]}.self_attn.{proj}.{m[2]}"] = Producer(
                    (split[i], *info.shape[1:]), [(info.file, name)],
                    lambda r, info=info, i=i: r.get(info.file, info.name).split(split, dim=0)[i].contiguous(),
                    dtype=info.dtype)
            continue
        for pattern, repl in _RENAMES:
            new, k = re.subn(pattern, repl, name)
            if k:
                break
        else:
            new = name  # unknown: reported by the plan as unexpected, under its own name
        out[new] = Producer(info.shape, [(info.file, name)], lambda r, i=info: r.get(i.file, i.name), dtype=info.dtype)
    for (layer, mlp), parts in experts.items():
        target = f"model.layers.{layer}.mlp.experts.{_TARGET[mlp]}"
        if set(parts) == {".blocks", ".scales"}:
            blocks, scales = parts[".blocks"], parts[".scales"]
            if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
                raise CheckpointError(f"block.{layer}.mlp.{mlp}_weight: blocks {list(blocks.shape)} and scales "
                                      f"{list(scales.shape)} are not MXFP4 [..., G, 16] / [..., G]")
            out[target] = Producer((*blocks.shape[:-2], blocks.shape[-2] * 32),
                                   [(blocks.file, blocks.name), (scales.file, scales.name)],
                                   lambda r, b=blocks, s=scales: dequant.mxfp4(r.get(b.file, b.name),
                                                                               r.get(s.file, s.name)),
                                   dequantized=True)
        elif set(parts) == {"plain"}:
            info = parts["plain"]
            out[target] = _transposed(Producer(info.shape, [(info.file, info.name)],
                                               lambda r, i=info: r.get(i.file, i.name), dtype=info.dtype))
        else:
            raise CheckpointError(f"block.{layer}.mlp.{mlp}_weight: expected .blocks and .scales (MXFP4) or one "
                                  f"unquantized tensor, found {sorted(parts)}")
    notes = ["qkv split into q / k / v", "mxfp4 expert blocks dequantized"]
    return out, release.source_files() + [root / "config.json"], notes


def _detect(root: Path) -> bool:
    import json

    try:
        c = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(c, dict) and "model_type" not in c and {"num_experts", "experts_per_token",
                                                              "rope_ntk_beta"} <= set(c)


def _format():
    from .formats import Format

    return Format("gpt_oss_original", "gpt-oss's original/ folder: OpenAI's layout (config.json without model_type, "
                  "block.N.* tensors, MXFP4 mlp1 / mlp2 experts)", _detect, official_config, tensors,
                  before_hf=True)


FORMAT = _format()
