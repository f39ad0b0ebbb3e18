"""Llama 4's `original/` layout: Meta's tensor-parallel `consolidated.NN.pth` shards + `params.json`.

Each file holds one model-parallel rank's slice of every tensor (Scout and Maverick ship 8). Merged back here as
llama-models' `checkpoint.py::reshard_mp` and transformers' `convert_llama4_weights_to_hf.py` do:
- column-parallel weights (tok_embeddings, output, w1/w3, the shared expert's w_in/w_swiglu) join along dim 0,
  row-parallel ones (wo, w2, fc2, the shared expert's w_out) along the last dim; norms and the router are
  replicated (checked equal across ranks when read);
- the fused `attention.wqkv` of each rank is split into its q / k / v rows first, then joined over ranks;
- the fused dense `feed_forward.mlp.fc1_weight` of each rank is its [w1; w3] halves;
- routed experts are stored flattened, input-major: `moe_w_in_eD_F` / `moe_w_swiglu_eD_F` [E*D, F/ranks] and
  `moe_w_out_eF_D` [E*F/ranks, D]; they are regrouped per expert and joined along F, giving the HF layout
  `experts.gate_up_proj` [E, D, 2F] (gate then up) and `experts.down_proj` [E, F, D] (transformers hard-codes
  8 ranks x 1024 columns; the rule here is the same for any rank count);
- the router `router_DE` [D, E] is transposed to `router.weight` [E, D];
- RoPE is kept interleaved (complex) as in the HF release: no q/k permutation.
Rotary tables, TransformerEngine `_extra_state` blobs and routing statistics are dropped (listed in the notes).
The files are pickles: read only with `allow_pickle`, through `torch.load(weights_only=True, mmap=True)`; the only
non-tensor objects accepted are the `io.BytesIO` values of `*._extra_state` keys (as transformers' converter).

Sizes come from `params.json` by llama-models' formulas (`model.py`, `moe.py`, `args.py`); the plan then checks
them against the shards' shapes. Sources: meta-llama/llama-models `models/llama4/{args,model,moe,ffn,checkpoint,
tokenizer}.py`; huggingface/transformers `models/llama4/convert_llama4_weights_to_hf.py`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hf_archs.errors import CheckpointError

from .io import _ST_NAMES, Reader
from .plan import Producer

# Ranks: column-parallel (joined along dim 0), row-parallel (joined along the last dim), replicated.
COL, ROW, REPL = "col", "row", "repl"
_L = r"^layers\.(\d+)\."
_HF = r"language_model.model.layers.\1."
# (Meta name, HF release name, how the ranks join). The HF names are the release's own (`language_model.`);
# the llama4 architecture's declared renames take them to ours.
_TENSORS: list[tuple[str, str, str]] = [
    (r"^tok_embeddings\.weight$", "language_model.model.embed_tokens.weight", COL),
    (r"^output\.weight$", "language_model.lm_head.weight", COL),
    (r"^norm\.weight$", "language_model.model.norm.weight", REPL),
    (_L + r"attention_norm\.weight$", _HF + "input_layernorm.weight", REPL),
    (_L + r"attention\.wqkv\.layer_norm_weight$", _HF + "input_layernorm.weight", REPL),
    (_L + r"ffn_norm\.weight$", _HF + "post_attention_layernorm.weight", REPL),
    (_L + r"feed_forward\.norm\.weight$", _HF + "post_attention_layernorm.weight", REPL),
    (_L + r"feed_forward\.mlp\.layer_norm_weight$", _HF + "post_attention_layernorm.weight", REPL),
    (_L + r"attention\.wq\.weight$", _HF + "self_attn.q_proj.weight", COL),
    (_L + r"attention\.wk\.weight$", _HF + "self_attn.k_proj.weight", COL),
    (_L + r"attention\.wv\.weight$", _HF + "self_attn.v_proj.weight", COL),
    (_L + r"attention\.wo\.weight$", _HF + "self_attn.o_proj.weight", ROW),
    (_L + r"feed_forward\.w1\.weight$", _HF + "feed_forward.gate_proj.weight", COL),
    (_L + r"feed_forward\.w3\.weight$", _HF + "feed_forward.up_proj.weight", COL),
    (_L + r"feed_forward\.w2\.weight$", _HF + "feed_forward.down_proj.weight", ROW),
    (_L + r"feed_forward\.mlp\.fc2_weight$", _HF + "feed_forward.down_proj.weight", ROW),
    (_L + r"feed_forward\.w_in_shared_FD\.weight$", _HF + "feed_forward.shared_expert.gate_proj.weight", COL),
    (_L + r"feed_forward\.w_swiglu_FD\.weight$", _HF + "feed_forward.shared_expert.up_proj.weight", COL),
    (_L + r"feed_forward\.w_out_shared_DF\.weight$", _HF + "feed_forward.shared_expert.down_proj.weight", ROW),
]
_QKV = re.compile(_L + r"attention\.wqkv\.weight$")
_FC1 = re.compile(_L + r"feed_forward\.mlp\.fc1_weight$")
_ROUTER = re.compile(_L + r"feed_forward\.router_DE$")
_EXPERTS = re.compile(_L + r"feed_forward\.experts\.(moe_w_in_eD_F|moe_w_swiglu_eD_F|moe_w_out_eF_D)$")
# The vision encoder and projector: named as in the HF release so the architecture's skip rules drop them.
_TOWER = [(r"^vision_embeddings\.", "vision_model."), (r"^vision_projection\.", "multi_modal_projector.")]
_DROPPED = [
    (r"(^|\.)_extra_state$", "TransformerEngine extra state (not a weight)"),
    (r"^(rope\.freqs|freqs_cis|freq_cis)$", "precomputed rotary table (recomputed from the config)"),
    (r"\.(global_gate_stats_3E|running_gate_stats_3E|expert_activation_DE)$", "routing statistics (not a weight)"),
]


def _params(root: Path) -> dict[str, Any]:
    from .formats import read_json

    p = read_json(root / "params.json")
    return p.get("model", p)


def _round_up(h: int, multiple: int) -> int:
    return h + (-h % multiple)


def official_config(root: Path) -> dict[str, Any]:
    """The release's `params.json` in transformers' `Llama4Config` field names."""
    p = _params(root)
    dim, n_heads, n_layers = p["dim"], p["n_heads"], p["n_layers"]
    multiple_of = p.get("multiple_of", 256)
    mult = p.get("ffn_dim_multiplier")
    # Dense layers (model.py TransformerBlock): 4*dim -> 2/3 -> x ffn_dim_multiplier -> up to multiple_of.
    dense = int(2 * int(4 * dim) / 3)
    dense = _round_up(int(mult * dense) if mult is not None else dense, multiple_of)
    moe = p.get("moe_args") or None
    text: dict[str, Any] = {
        "model_type": "llama4_text",
        "hidden_size": dim, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": p.get("n_kv_heads") or n_heads, "head_dim": p.get("head_dim") or dim // n_heads,
        "vocab_size": p["vocab_size"], "rms_norm_eps": p.get("norm_eps", 1e-5), "intermediate_size_mlp": dense,
        "use_qk_norm": bool(p.get("use_qk_norm", False)), "attention_chunk_size": p.get("attention_chunk_size"),
        "attn_temperature_tuning": bool(p.get("attn_temperature_tuning", False)),
        "floor_scale": int(p.get("floor_scale", 8192)), "attn_scale": p.get("attn_scale", 0.1),
        "rope_theta": p.get("rope_theta", 500000.0), "hidden_act": "silu", "attention_bias": False,
        # params.json has no context length: transformers' converter writes 256K for the base models.
        "max_position_embeddings": 256 * 1024, "tie_word_embeddings": False,
    }
    # RoPE: llama-models' apply_scaling (low_freq_factor 1, original context 8192); args.py's Scout defaults.
    text["rope_scaling"] = None if not p.get("use_scaled_rope") else {
        "rope_type": "llama3", "factor": float(p.get("rope_scaling_factor") or 16),
        "low_freq_factor": 1.0, "high_freq_factor": float(p.get("rope_high_freq_factor") or 1),
        "original_max_position_embeddings": 8192}
    interval = p.get("nope_layer_interval")
    if interval:
        text["no_rope_layer_interval"] = interval
    else:
        text["no_rope_layers"] = [1] * n_layers
    if moe:
        # Experts (moe.py MoE): ffn_exp*dim -> 2/3 -> x ffn_dim_multiplier -> / (capacity_factor + 1) if
        # auto_scale_F -> up to multiple_of.
        h = int(2 * int(p["ffn_exp"] * dim) / 3)
        h = int(mult * h)
        if moe.get("auto_scale_F", True):
            h = int(h / (moe.get("capacity_factor", 1.0) + 1))
        text.update(intermediate_size=_round_up(h, multiple_of), num_local_experts=moe["num_experts"],
                    num_experts_per_tok=moe.get("top_k", 1),
                    interleave_moe_layer_step=moe.get("interleave_moe_layer_step", 1))
    else:
        text.update(intermediate_size=dense, num_local_experts=1, moe_layers=[])
    # Special token ids (llama-models tokenizer.py): 2048 reserved ids after the BPE ranks, in a fixed order.
    base = p["vocab_size"] - 2048
    if base >= 0:
        text.update(bos_token_id=base, eos_token_id=[base + 1, base + 7, base + 8], pad_token_id=base + 18)
    else:
        text.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "text_config": text,
            "tie_word_embeddings": False}


def shard_files(root: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth in rank order (or a single consolidated.pth)."""
    numbered = {}
    for p in root.glob("consolidated*.pth"):
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)
        if m:
            numbered[int(m[1])] = p
        elif p.name != "consolidated.pth":
            raise CheckpointError(f"{p}: not a consolidated.NN.pth shard name")
    if numbered:
        if sorted(numbered) != list(range(len(numbered))):
            missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
            raise CheckpointError(f"{root}: model-parallel shards {[f'consolidated.{i:02d}.pth' for i in missing]} "
                                  f"are missing")
        return [numbered[i] for i in range(len(numbered))]
    if (root / "consolidated.pth").is_file():
        return [root / "consolidated.pth"]
    raise CheckpointError(f"{root}: no consolidated.NN.pth shards")


def load_shard(file: Path) -> dict[str, torch.Tensor]:
    """One rank's tensors, memory-mapped, through `torch.load(weights_only=True)` (see `_load_raw`)."""
    return {k: v for k, v in _load_raw(file).items() if torch.is_tensor(v)}


def _load_raw(file: Path) -> dict[str, Any]:
    """Meta's shards also pickle TransformerEngine state as `io.BytesIO` under `*._extra_state`: allowed for those
    keys only (as transformers' converter does), never read."""
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{file}: cannot be read with torch.load(weights_only=True) ({err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a dict of tensors")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)
           and not (isinstance(v, io.BytesIO) and str(k).endswith("._extra_state"))]
    if bad:
        raise CheckpointError(f"{file}: entries that are not tensors: {bad[:10]}")
    return state


def _get(r: Reader, file: Path, name: str) -> torch.Tensor:
    if file not in r._open:  # the Reader's own pickle loader refuses the BytesIO blobs: open it here
        r._open[file] = load_shard(file)
    return r.get(file, name)


def _join(shapes: list[tuple[int, ...]], how: str, name: str) -> tuple[int, ...]:
    first = shapes[0]
    if how == REPL:
        if any(s != first for s in shapes):
            raise CheckpointError(f"{name}: replicated tensor has different shapes across ranks: {shapes}")
        return first
    dim = 0 if how == COL else len(first) - 1
    if any(len(s) != len(first) or s[:dim] + s[dim + 1:] != first[:dim] + first[dim + 1:] for s in shapes):
        raise CheckpointError(f"{name}: rank slices do not line up along dim {dim}: {shapes}")
    return (*first[:dim], sum(s[dim] for s in shapes), *first[dim + 1:])


def _same(shapes: list[tuple[int, ...]], name: str) -> tuple[int, ...]:
    """Ranks whose slices are split inside each rank (wqkv, fc1, experts): every rank's slice has one shape."""
    if any(s != shapes[0] for s in shapes):
        raise CheckpointError(f"{name}: the model-parallel ranks hold slices of different shapes: {shapes}")
    return shapes[0]


def _read_all(r: Reader, files: list[Path], name: str) -> list[torch.Tensor]:
    return [_get(r, f, name) for f in files]


def _replicated(r: Reader, files: list[Path], name: str) -> torch.Tensor:
    parts = _read_all(r, files, name)
    if any(not torch.equal(p, parts[0]) for p in parts[1:]):
        raise CheckpointError(f"{name}: replicated tensor differs across the model-parallel ranks")
    return parts[0]


def tensors(root: Path, official: dict[str, Any], allow_pickle: bool):
    files = shard_files(root)
    if not allow_pickle:
        raise CheckpointError(f"{root}: Meta's consolidated.NN.pth shards are pickle files, never loaded by default; "
                              f"pass allow_pickle / --allow-pickle to read them with torch.load(weights_only=True)")
    text = official["text_config"]
    n = len(files)
    listing: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = []
    for f in files:
        listing.append({k: (tuple(v.shape), v.dtype) if torch.is_tensor(v) else ((), None)
                        for k, v in _load_raw(f).items()})
    names = list(listing[0])
    for f, keys in zip(files[1:], listing[1:]):
        if set(keys) != set(names):
            diff = sorted(set(keys) ^ set(names))
            raise CheckpointError(f"{f}: holds different tensors than {files[0].name}: {diff[:10]}")

    def shapes(name: str) -> list[tuple[int, ...]]:
        return [keys[name][0] for keys in listing]

    def stored(name: str) -> str | None:
        return _ST_NAMES.get(listing[0][name][1])

    def src(*names: str) -> list[tuple[Path, str]]:
        return [(f, nm) for nm in names for f in files]

    out: dict[str, Producer] = {}
    dropped: dict[str, int] = {}
    experts: dict[str, dict[str, str]] = {}

    def add(hf: str, shape: tuple[int, ...], sources: list[tuple[Path, str]], make: Callable, dtype: str | None):
        if hf in out:
            raise CheckpointError(f"{root}: two tensors of the release map to {hf}")
        out[hf] = Producer(tuple(shape), sources, make, dtype=dtype)

    heads, kv, head_dim = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    for name in names:
        reason = next((why for pat, why in _DROPPED if re.search(pat, name)), None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        if m := _EXPERTS.match(name):
            experts.setdefault(m[1], {})[m[2]] = name
            continue
        if m := _QKV.match(name):
            if heads % n or kv % n:
                raise CheckpointError(f"{name}: {heads} query / {kv} key-value heads do not split over {n} ranks")
            split = [heads * head_dim // n, kv * head_dim // n, kv * head_dim // n]
            rows, cols = _same(shapes(name), name)
            if rows != sum(split):
                raise CheckpointError(f"{name}: {rows} rows per rank, expected {split} (q, k, v)")
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                add(f"language_model.model.layers.{m[1]}.self_attn.{proj}.weight", (split[i] * n, cols), src(name),
                    lambda r, nm=name, i=i, split=split: torch.cat(
                        [p.split(split, dim=0)[i] for p in _read_all(r, files, nm)], dim=0), stored(name))
            continue
        if m := _FC1.match(name):
            rows, cols = _same(shapes(name), name)
            for i, proj in enumerate(("gate_proj", "up_proj")):  # each rank's [w1; w3]
                add(f"language_model.model.layers.{m[1]}.feed_forward.{proj}.weight", (rows // 2 * n, cols),
                    src(name), lambda r, nm=name, i=i: torch.cat(
                        [p.chunk(2, dim=0)[i] for p in _read_all(r, files, nm)], dim=0), stored(name))
            continue
        if m := _ROUTER.match(name):
            d, e = _join(shapes(name), REPL, name)
            add(f"language_model.model.layers.{m[1]}.feed_forward.router.weight", (e, d), src(name),
                lambda r, nm=name: _replicated(r, files, nm).t().contiguous(), stored(name))
            continue
        hf, how = None, None
        for pattern, repl, kind in _TENSORS:
            new, k = re.subn(pattern, repl, name)
            if k:
                hf, how = new, kind
                break
        if hf is None:
            tower = next((re.sub(p, rp, name) for p, rp in _TOWER if re.match(p, name)), None)
            # The towers are skipped by the architecture's rule (never read); anything else is reported by the
            # plan as unexpected, under its own name.
            add(tower or name, shapes(name)[0], src(name), lambda r, nm=name: _get(r, files[0], nm), stored(name))
            continue
        shape = _join(shapes(name), how, name)
        if how == REPL:
            make = lambda r, nm=name: _replicated(r, files, nm)
        else:
            dim = 0 if how == COL else -1
            make = lambda r, nm=name, dim=dim: torch.cat(_read_all(r, files, nm), dim=dim)
        add(hf, shape, src(name), make, stored(name))

    num_experts, dim = text["num_local_experts"], text["hidden_size"]
    for layer, parts in experts.items():
        need = {"moe_w_in_eD_F", "moe_w_swiglu_eD_F", "moe_w_out_eF_D"}
        if set(parts) != need:
            raise CheckpointError(f"layers.{layer}.feed_forward.experts: missing {sorted(need - set(parts))}")
        w_in, w_swiglu, w_out = parts["moe_w_in_eD_F"], parts["moe_w_swiglu_eD_F"], parts["moe_w_out_eF_D"]
        for nm in (w_in, w_swiglu, w_out):
            _same(shapes(nm), nm)
        f_rank = shapes(w_in)[0][-1]
        if torch.Size(shapes(w_in)[0]).numel() != num_experts * dim * f_rank or shapes(w_swiglu) != shapes(w_in) \
                or torch.Size(shapes(w_out)[0]).numel() != num_experts * dim * f_rank:
            raise CheckpointError(f"layers.{layer}.feed_forward.experts: shapes {shapes(w_in)[0]} / "
                                  f"{shapes(w_swiglu)[0]} / {shapes(w_out)[0]} do not hold {num_experts} experts of "
                                  f"[{dim}, F/{n}] and [F/{n}, {dim}]")
        prefix = f"language_model.model.layers.{layer}.feed_forward.experts"

        def gate_up(r: Reader, w_in=w_in, w_swiglu=w_swiglu) -> torch.Tensor:
            # Each rank: [E*D, F/n] -> [E, D, F/n]; ranks join along F; gate then up: [E, D, 2F].
            halves = [torch.cat([p.reshape(num_experts, dim, -1) for p in _read_all(r, files, nm)], dim=-1)
                      for nm in (w_in, w_swiglu)]
            return torch.cat(halves, dim=-1)

        def down(r: Reader, w_out=w_out) -> torch.Tensor:
            # Each rank: [E*F/n, D] -> [E, F/n, D]; ranks join along F: [E, F, D].
            return torch.cat([p.reshape(num_experts, -1, dim) for p in _read_all(r, files, w_out)], dim=1)

        add(f"{prefix}.gate_up_proj", (num_experts, dim, 2 * f_rank * n), src(w_in, w_swiglu), gate_up, stored(w_in))
        add(f"{prefix}.down_proj", (num_experts, f_rank * n, dim), src(w_out), down, stored(w_out))

    notes = [(f"merged {n} model-parallel ranks (consolidated.NN.pth); wqkv split, experts regrouped, router "
             "transposed")]
    notes += [f"dropped {count} tensors: {reason}" for reason, count in dropped.items()]
    return out, files + [root / "params.json"], notes


def _detect(root: Path) -> bool:
    if not (root / "params.json").is_file() or not any(root.glob("consolidated*.pth")):
        return False
    try:
        p = _params(root)
    except CheckpointError:
        return False
    # Llama 4's ModelArgs fields that earlier Llama releases (same file names) do not have.
    return any(k in p for k in ("moe_args", "nope_layer_interval", "attention_chunk_size", "ffn_exp", "use_qk_norm"))


def _format():
    from .formats import Format

    return Format("llama4_original", ("Llama 4's original/ folder: Meta's consolidated.NN.pth model-parallel "
                                      "shards + params.json (pickle: needs --allow-pickle)"),
                  _detect, official_config, tensors)


FORMAT = _format()
