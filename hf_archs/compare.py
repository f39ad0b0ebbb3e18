"""`hf-archs compare`: the official flagships side by side, measured from the models themselves.

Parameter counts come from building each preset's model on the meta device (no memory, no weights) and walking its
parameters; nothing is a hand formula. What a token touches is read from the module tree: embedding tables
(`nn.Embedding`: one row per token), the head (all of it), routed experts (the shared `Experts` block, or a
per-expert `ModuleList` named `experts`: top-k of E), everything else (all of it).

Cache sizes come from the per-layer plan (`layer_types`) and the attention fields of the config, layer by layer:

    full_attention                     grows with the context: 2 * kv_heads * head_dim per token
                                       (MLA, `kv_lora_rank` set: the latent, kv_lora_rank + qk_rope_head_dim)
    sliding_attention / chunked_...    bounded: the same per token, for at most window - 1 past tokens
                                       (transformers' DynamicSlidingWindowLayer; the current token completes it)
    linear_attention                   a fixed state: recurrent heads * dk * dv + the causal-conv window
    KV-shared layers                   nothing (`kv_sharing_modes` "reuse", `num_kv_shared_layers`)

tests/test_compare.py checks these against the DynamicCache a tiny model of every registered architecture really
fills after a forward.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .presets import all_presets, get_preset, preset_names, skipped_presets

BF16 = 2  # bytes per element of every reported cache figure
DEFAULT_CONTEXTS = (4096, 32768, 131072)
DEFAULT_FLOPS_CONTEXT = 32768

ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
LINEAR_TYPES = ("linear_attention",)
TOP_K_FIELDS = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk")
SHARED_EXPERT_FIELDS = ("n_shared_experts", "num_shared_experts")
# Module-path segments that are not the released language model (never counted): multi-token-prediction heads and
# the vision / audio towers of multimodal releases.
EXCLUDED_SEGMENTS = ("mtp", "nextn", "vision_tower", "audio_tower", "multi_modal_projector", "embed_vision",
                     "embed_audio")

CONVENTIONS = """\
Counting conventions:
  total_params       the language model as released: every decoder layer, the embedding and the head (counted
                     once when tied); without MTP (multi-token prediction) layers and without vision or audio
                     towers (a model that carries MTP layers reports them as not_counted_params). Counted
                     from the model built on the meta device.
  active_params      every parameter one token touches: one row of each embedding table, the whole head,
                     routed experts at top-k / experts, shared experts, routers and everything else in full.
  active_params_without_embedding
                     active_params without the embedding tables and the head (the non-embedding count).
  active_params_with_embedding_table
                     active_params with every embedding table counted whole (Meta's count for Llama 4).
                     Publishers differ on embeddings (OpenAI counts the head only, Meta the tables too), so all
                     three are reported.
  embedding share    embedding tables + head (untied) as a fraction of total_params.
  KV cache           bf16 (2 bytes per element), batch 1. kv_bytes_per_token is the part that grows with the
                     context (full-attention layers; MLA stores its latent, kv_lora_rank + qk_rope_head_dim);
                     bounded_kv_bytes is what sliding-window and chunked layers hold at most (window - 1 past
                     tokens each); state_bytes is the fixed linear-attention state (recurrent + conv window).
                     KV-shared layers store nothing. kv_bytes_at[n] = growing * n + bounded part at n + state.
  FLOPs per token    forward, one token at position n (--flops-context): 2 * active matmul parameters (embedding
                     lookups excluded, head included) + attention: 4 * heads * head_dim * visible tokens per
                     softmax layer (MLA: 2 * heads * (qk_nope + qk_rope + v_head) * visible), 4 * heads * dk * dv
                     per linear-attention layer. Norms, activations and softmax are not counted.
"""


class CompareError(ValueError):
    """A layout this module cannot measure; the message names the config class and field."""


def counting_conventions() -> str:
    """The counting conventions, as stated in `hf-archs compare --help` (for the README)."""
    return CONVENTIONS


# ------------------------------------------------------------------------------------------------------------------
# Parameters, from the meta-device model
# ------------------------------------------------------------------------------------------------------------------
def meta_model(config) -> nn.Module:
    """The architecture's CausalLM built on the meta device (shapes only)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _top_k(config) -> int:
    for name in TOP_K_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise CompareError(f"{type(config).__name__} has routed experts but none of the top-k fields {TOP_K_FIELDS}")


def _routed_containers(model: nn.Module, excluded: Callable[[str], bool]) -> dict[str, int]:
    """Module path -> number of experts, for every block of routed experts of the counted model."""
    from .layers.moe import Experts

    found = {}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in found) or excluded(name + "."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, Experts):
            found[name] = module.num_experts
        elif isinstance(module, nn.ModuleList) and leaf == "experts" and len(module):
            found[name] = len(module)
    return found


def _decoder_layers(model: nn.Module, n_layers: int) -> str | None:
    """Module path of the decoder-layer list: the `ModuleList` named `layers` with at least num_hidden_layers
    entries (releases that keep MTP modules there, DeepSeek V3 and GLM-4.5, put them after the decoder)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= n_layers and name.rsplit(".", 1)[-1] == "layers" \
                and not any(seg.startswith(EXCLUDED_SEGMENTS) for seg in name.split(".")):
            return name
    return None


def exclusion_rule(model: nn.Module, config) -> Callable[[str], bool]:
    """Whether a parameter / module path is outside the released language model: MTP layers (a segment named
    mtp* / nextn*, or entries of the decoder-layer list past num_hidden_layers) and vision / audio towers."""
    prefix = _decoder_layers(model, config.num_hidden_layers)
    extra = ()
    if prefix is not None:
        extra = tuple(f"{prefix}.{i}." for i in range(config.num_hidden_layers, len(model.get_submodule(prefix))))

    def excluded(name: str) -> bool:
        return name.startswith(extra) or any(seg.startswith(EXCLUDED_SEGMENTS) for seg in name.split("."))

    return excluded


@dataclass
class ParamCounts:
    total: int
    embedding: int  # every embedding table (the input one, and per-layer ones), tied head excluded
    head: int  # the output projection when it is not tied to an embedding table
    active: int
    active_without_embedding: int
    active_with_embedding_table: int
    active_matmul: int  # active parameters that cost 2 FLOPs per token (dim >= 2, lookups excluded)
    routed_total: int
    routed_active: int
    not_counted: int = 0  # MTP layers and towers the model carries (outside total_params)


def count_params(model: nn.Module, config) -> ParamCounts:
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head_module, "weight", None)
    excluded = exclusion_rule(model, config)
    routed = _routed_containers(model, excluded)
    top_k = _top_k(config) if routed else 0

    seen: set[int] = set()
    total = head = active = active_no_emb = matmul = routed_total = routed_active = not_counted = 0
    table_total = table_rows = tied_table = 0  # embedding tables other than a tied head: whole, one row
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) in seen:
                continue
            seen.add(id(p))
            if excluded(full):
                not_counted += p.numel()
                continue
            n = p.numel()
            total += n
            if head_weight is not None and p is head_weight:  # every logit reads all of it
                if isinstance(module, nn.Embedding):  # tied: the input table is the head
                    tied_table = n
                else:
                    head += n
                active += n
                matmul += n
                continue
            if isinstance(module, nn.Embedding):  # a lookup: one row per token
                table_total += n
                table_rows += p.shape[-1]
                active += p.shape[-1]
                continue
            container = next((c for c in routed if full.startswith(c + ".")), None)
            if container is not None:  # routed experts: top-k of E
                e = routed[container]
                share = n // e * top_k if n % e == 0 else round(n * top_k / e)
                routed_total += n
                routed_active += share
                n = share
            active += n
            active_no_emb += n
            if p.dim() >= 2:
                matmul += n
    return ParamCounts(total=total, embedding=table_total + tied_table, head=head, active=active,
                       active_without_embedding=active_no_emb,
                       active_with_embedding_table=active - table_rows + table_total,
                       active_matmul=matmul, routed_total=routed_total, routed_active=routed_active,
                       not_counted=not_counted)


# ------------------------------------------------------------------------------------------------------------------
# Cache, from the layer types
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCache:
    """What one layer keeps between tokens (elements, batch 1)."""

    kind: str  # the layer type
    per_token: int = 0  # elements per cached token
    window: int | None = None  # sliding / chunked: tokens seen by one query (the cache keeps window - 1)
    state: int = 0  # fixed elements (linear attention)
    shared: bool = False  # reuses another layer's keys and values

    def elements_at(self, tokens: int) -> int:
        if self.shared:
            return 0
        kept = tokens if self.window is None else min(tokens, self.window - 1)
        return self.per_token * kept + self.state


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if isinstance(head_dim, int) and head_dim > 0 else config.hidden_size // config.num_attention_heads


def is_mla(config) -> bool:
    return isinstance(getattr(config, "kv_lora_rank", None), int)


def attention_kv_elements(config) -> int:
    """Elements one softmax-attention layer caches per token."""
    if is_mla(config):
        return config.kv_lora_rank + config.qk_rope_head_dim  # the latent and the shared RoPE key
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * kv_heads * _head_dim(config)


def linear_state_dims(config) -> tuple[int, int, int, int, int]:
    """(value heads, dk, dv, conv channels, conv width) of a linear-attention layer, from the official fields."""
    if getattr(config, "linear_num_value_heads", None):  # gated DeltaNet (Qwen3-Next field names)
        nk, nv = config.linear_num_key_heads, config.linear_num_value_heads
        dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
        return nv, dk, dv, 2 * nk * dk + nv * dv, config.linear_conv_kernel_dim
    lin = getattr(config, "linear_attn_config", None)
    if isinstance(lin, dict) and lin.get("num_heads"):  # KDA (Kimi Linear field names): q, k and v convs
        h, d = lin["num_heads"], lin["head_dim"]
        return h, d, d, 3 * h * d, lin["short_conv_kernel_size"]
    raise CompareError(f"{type(config).__name__}: linear_attention layers, but neither the linear_num_* fields nor "
                       "linear_attn_config give their state size")


def linear_state_elements(config) -> int:
    heads, dk, dv, channels, width = linear_state_dims(config)
    return heads * dk * dv + channels * width


def _kv_shared(config) -> list[bool]:
    n = config.num_hidden_layers
    modes = getattr(config, "kv_sharing_modes", None)
    if modes is not None:
        return [m == "reuse" for m in modes]
    shared = getattr(config, "num_kv_shared_layers", 0) or 0
    return [i >= n - shared for i in range(n)]


def cache_layout(config) -> list[LayerCache]:
    """One `LayerCache` per decoder layer, from `layer_types` and the attention fields."""
    shared = _kv_shared(config)
    layers = []
    for i, kind in enumerate(config.layer_types):
        if kind in ATTENTION_TYPES:
            window = None
            if kind == "sliding_attention":
                window = config.sliding_window
            elif kind == "chunked_attention":
                window = config.attention_chunk_size
            layers.append(LayerCache(kind, per_token=attention_kv_elements(config), window=window, shared=shared[i]))
        elif kind in LINEAR_TYPES:
            layers.append(LayerCache(kind, state=linear_state_elements(config)))
        else:
            raise CompareError(f"{type(config).__name__}: layer_types[{i}] is {kind!r}, which has no cache rule "
                               f"(known: {ATTENTION_TYPES + LINEAR_TYPES})")
    return layers


def cache_bytes(config, tokens: int, bytes_per_element: int = BF16) -> list[int]:
    """Bytes each layer holds after `tokens` tokens (batch 1)."""
    return [layer.elements_at(tokens) * bytes_per_element for layer in cache_layout(config)]


# ------------------------------------------------------------------------------------------------------------------
# Layouts and FLOPs
# ------------------------------------------------------------------------------------------------------------------
def attention_layout(config) -> dict[str, Any]:
    types = list(config.layer_types)
    uses_rope = getattr(config, "layer_uses_rope", lambda i: True)
    shared = _kv_shared(config)
    return {
        "global": types.count("full_attention"),
        "local": types.count("sliding_attention"),
        "chunked": types.count("chunked_attention"),
        "linear": types.count("linear_attention"),
        "nope": sum(1 for i, t in enumerate(types) if t in ATTENTION_TYPES and not uses_rope(i)),
        "kv_shared": sum(shared),
        "window": getattr(config, "sliding_window", None) if "sliding_attention" in types else None,
        "chunk": getattr(config, "attention_chunk_size", None) if "chunked_attention" in types else None,
        "mla": is_mla(config),
    }


def describe_attention(a: dict[str, Any]) -> str:
    parts = []
    if a["global"]:
        parts.append(f"{a['global']} global")
    if a["local"]:
        parts.append(f"{a['local']} local({a['window']})")
    if a["chunked"]:
        parts.append(f"{a['chunked']} chunked({a['chunk']})")
    if a["linear"]:
        parts.append(f"{a['linear']} linear")
    text = " + ".join(parts) + (" MLA" if a["mla"] else "")
    extras = [f"{a['nope']} NoPE"] if a["nope"] else []
    if a["kv_shared"]:
        extras.append(f"{a['kv_shared']} KV-shared")
    return text + (f" ({', '.join(extras)})" if extras else "")


def moe_layout(model: nn.Module, config) -> dict[str, Any] | None:
    """Routed experts, top-k, shared experts, and how many decoder layers have routed experts (None: dense)."""
    routed = _routed_containers(model, exclusion_rule(model, config))
    if not routed:
        return None
    prefix = _decoder_layers(model, config.num_hidden_layers)
    if prefix is None:
        raise CompareError(f"{type(config).__name__}: no decoder-layer list named 'layers' with "
                           f"{config.num_hidden_layers} entries")
    moe_layers = {int(c[len(prefix) + 1:].split(".", 1)[0]) for c in routed if c.startswith(prefix + ".")}
    shared = next((getattr(config, f) for f in SHARED_EXPERT_FIELDS if isinstance(getattr(config, f, None), int)),
                  None)
    if shared is None:  # no count in the config: the always-on expert modules of one MoE layer
        layer = model.get_submodule(f"{prefix}.{min(moe_layers)}")
        shared = sum(1 for n, _ in layer.named_modules() if n.rsplit(".", 1)[-1] in ("shared_expert", "shared_experts"))
    return {"experts": max(routed.values()), "active": _top_k(config), "shared": shared,
            "moe_layers": len(moe_layers), "dense_layers": config.num_hidden_layers - len(moe_layers)}


def describe_moe(m: dict[str, Any] | None) -> str:
    if m is None:
        return "dense"
    text = f"{m['active']}/{m['experts']}"
    if m["shared"]:
        text += f" +{m['shared']} shared"
    if m["dense_layers"]:
        text += f", {m['dense_layers']} dense layer" + ("s" if m["dense_layers"] > 1 else "")
    return text


def attention_flops(config, position: int) -> int:
    """Forward FLOPs of the token mixers for one token at `position` (it sees `position` tokens, itself included)."""
    heads = config.num_attention_heads
    if is_mla(config):
        per_visible = 2 * heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    else:
        per_visible = 4 * heads * _head_dim(config)
    flops = 0
    for layer in cache_layout(config):
        if layer.kind in LINEAR_TYPES:
            h, dk, dv, _, _ = linear_state_dims(config)
            flops += 4 * h * dk * dv
        else:
            visible = position if layer.window is None else min(position, layer.window)
            flops += per_visible * visible
    return flops


# ------------------------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------------------------
def compare_config(config, name: str, contexts: Sequence[int] = DEFAULT_CONTEXTS,
                   flops_context: int = DEFAULT_FLOPS_CONTEXT, model: nn.Module | None = None) -> dict[str, Any]:
    """Every figure for one config (a preset's, or any config of a registered architecture)."""
    model = meta_model(config) if model is None else model
    counts = count_params(model, config)
    layout = cache_layout(config)
    growing = sum(layer.per_token for layer in layout if layer.window is None and not layer.shared) * BF16
    bounded = sum(layer.per_token * (layer.window - 1) for layer in layout
                  if layer.window is not None and not layer.shared) * BF16
    state = sum(layer.state for layer in layout) * BF16
    attention = attention_layout(config)
    moe = moe_layout(model, config)
    return {
        "name": name,
        "architecture": config.model_type.removeprefix("hfa_"),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "total_params": counts.total,
        "active_params": counts.active,
        "active_params_without_embedding": counts.active_without_embedding,
        "active_params_with_embedding_table": counts.active_with_embedding_table,
        "embedding_params": counts.embedding,
        "head_params": counts.head,
        "not_counted_params": counts.not_counted,
        "embedding_share": (counts.embedding + counts.head) / counts.total,
        "kv_bytes_per_token": growing,
        "bounded_kv_bytes": bounded,
        "state_bytes": state,
        "kv_bytes_at": {str(n): sum(layer.elements_at(n) for layer in layout) * BF16 for n in contexts},
        "attention": attention,
        "attention_layout": describe_attention(attention),
        "moe": moe,
        "moe_layout": describe_moe(moe),
        "flops_context": flops_context,
        "flops_per_token": 2 * counts.active_matmul + attention_flops(config, flops_context),
    }


def compare(names: Iterable[str] | None = None, contexts: Sequence[int] = DEFAULT_CONTEXTS,
            flops_context: int = DEFAULT_FLOPS_CONTEXT, progress: Callable[[str], None] | None = None,
            strict: bool = True) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows for the presets `names` (default: every preset); returns (rows, skipped: name -> reason).

    A preset whose architecture is not registered yet is skipped with the reason, never an error. A preset that
    fails to load or measure raises, or with `strict=False` is skipped with "failed: <error>".
    """
    names = list(names) if names else list(all_presets())
    not_registered = skipped_presets()
    rows, skipped = [], {}
    for name in names:
        p = get_preset(name)  # unknown names raise PresetError
        if name in not_registered:
            skipped[name] = not_registered[name]
        else:
            try:
                row = compare_config(p.config(), name, contexts, flops_context)
            except Exception as err:
                if strict:
                    raise
                skipped[name] = f"failed: {type(err).__name__}: {err}"
            else:
                row.update(title=p.title, source=p.source, unverified=list(p.unverified))
                rows.append(row)
        if progress is not None:
            progress(name)
    return rows, skipped


# ------------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------------
def human_params(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}" if n / size < 100 else f"{n / size:.0f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def _cells(row: dict[str, Any]) -> dict[str, str]:
    cells = {
        "preset": row["name"],
        "total": human_params(row["total_params"]),
        "active": human_params(row["active_params"]),
        "active w/o emb": human_params(row["active_params_without_embedding"]),
        "emb+head": f"{100 * row['embedding_share']:.1f}%",
        "KV/token": human_bytes(row["kv_bytes_per_token"]),
        "bounded KV": human_bytes(row["bounded_kv_bytes"]) if row["bounded_kv_bytes"] else "-",
        "state": human_bytes(row["state_bytes"]) if row["state_bytes"] else "-",
    }
    for n, b in row["kv_bytes_at"].items():
        cells[f"cache@{int(n) // 1024}k"] = human_bytes(b)
    cells["attention"] = row["attention_layout"]
    cells["MoE"] = row["moe_layout"]
    cells[f"GFLOP/tok@{row['flops_context'] // 1024}k"] = f"{row['flops_per_token'] / 1e9:.1f}"
    return cells


def format_rows(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    """Rows as a terminal table, Markdown, CSV or JSON (a list of objects, integers as integers)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        flat = [_flatten(r) for r in rows]
        keys = list(dict.fromkeys(k for r in flat for k in r))
        writer = csv.DictWriter(out, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
        return out.getvalue()
    if not rows:
        return "(no presets)"
    cells = [_cells(r) for r in rows]
    cols = list(dict.fromkeys(k for c in cells for k in c))
    grid = [[c.get(k, "") for k in cols] for c in cells]
    if fmt == "markdown":
        right = {i for i, k in enumerate(cols) if k not in ("preset", "attention", "MoE")}
        head = "| " + " | ".join(cols) + " |"
        rule = "|" + "|".join("---:" if i in right else "---" for i in range(len(cols))) + "|"
        return "\n".join([head, rule, *("| " + " | ".join(r) + " |" for r in grid)])
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; choose table, markdown, csv or json")
    widths = [max(len(k), *(len(r[i]) for r in grid)) for i, k in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), "  ".join("-" * w for w in widths), *map(line, grid)])


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            flat[key] = "; ".join(map(str, v))
        else:
            flat[key] = v
    return flat


def plot(rows: list[dict[str, Any]], out_dir: str | Path, max_context: int = 1 << 20) -> list[Path]:
    """cache_vs_context.png (total cache, bf16, batch 1) and params_total_vs_active.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    contexts = [2**k for k in range(10, int(math.log2(max_context)) + 1)]
    colors = plt.get_cmap("tab20").colors
    styles = ("-", "--", "-.", ":")
    fig, ax = plt.subplots(figsize=(11, 6.5))
    for i, row in enumerate(rows):
        layout = cache_layout(get_preset(row["name"]).config())
        ys = [sum(layer.elements_at(n) for layer in layout) * BF16 / 2**30 for n in contexts]
        ax.plot(contexts, ys, marker=".", color=colors[i % len(colors)], linestyle=styles[i // len(colors) % 4],
                label=row["name"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("cache (GiB, bf16, batch 1)")
    ax.set_title("KV cache and linear-attention state vs context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths.append(out / "cache_vs_context.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 6.5))
    xs = [r["total_params"] / 1e9 for r in rows]
    lo, hi = min(xs) / 1.5, max(xs) * 1.5
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="grey", linewidth=0.8, label="dense: active = total")
    points = [(r["total_params"] / 1e9, r["active_params"] / 1e9, r["name"]) for r in rows]
    for i, (x, y, _) in enumerate(points):
        ax.scatter([x], [y], s=30, color=colors[i % len(colors)])
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _label_points(fig, ax, points)
    ax.set_xlabel("total parameters (B)")
    ax.set_ylabel("active parameters per token (B)")
    ax.set_title("Total vs active parameters (embedding row and head included)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "params_total_vs_active.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _label_points(fig, ax, points: list[tuple[float, float, str]], fontsize: int = 7) -> None:
    """Name each point, trying a few offsets so that labels do not overlap (boxes estimated in points)."""
    ax.figure.canvas.draw()  # fixes the limits, so data -> display positions are final
    scale = fig.dpi / 72
    char_w, height = 0.6 * fontsize * scale, 1.2 * fontsize * scale
    offsets = [(5, 3), (5, -10), (-5, 3), (-5, -10), (5, 12), (5, -19), (-5, 12), (-5, -19)]
    placed: list[tuple[float, float, float, float]] = []
    for x, y, name in sorted(points, key=lambda p: (p[0], p[1])):
        px, py = ax.transData.transform((x, y))
        width = char_w * len(name)
        for dx, dy in offsets:
            left = px + dx * scale - (width if dx < 0 else 0)
            bottom = py + dy * scale
            box = (left, bottom, left + width, bottom + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(name, (x, y), fontsize=fontsize, xytext=(dx, dy), textcoords="offset points",
                    ha="right" if dx < 0 else "left", va="bottom")


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("compare", help="compare the official flagship configs: parameters, active parameters, "
                                       "KV cache, attention and MoE layout, FLOPs per token",
                       description="Compare the official flagship configs side by side. Counts come from the "
                                   "models built on the meta device.\n\n" + CONVENTIONS,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="*", metavar="PRESET",
                   help="preset names (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list the presets and where each came from, then exit")
    p.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table",
                   help="output format (json: only the JSON list on stdout)")
    p.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)),
                   help="context lengths for the total cache, comma-separated (default: 4096,32768,131072)")
    p.add_argument("--flops-context", type=int, default=DEFAULT_FLOPS_CONTEXT,
                   help="position of the token whose forward FLOPs are counted (default: 32768)")
    p.add_argument("--plots", metavar="DIR", help="write cache_vs_context.png and params_total_vs_active.png here")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from transformers.utils import logging as hf_logging

    # Flagship configs' own warnings (Llama 4 Scout's llama3 RoPE with equal low / high factors) are not news here.
    hf_logging.set_verbosity_error()
    from .presets import PresetError

    if args.list:
        not_registered = skipped_presets()
        for name, p in all_presets().items():
            status = f"  [skipped: {not_registered[name]}]" if name in not_registered else ""
            print(f"{name:24} {p.architecture:12} {p.source}{status}")
        return 0
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        print(f"hf-archs compare: --contexts must be integers, got {args.contexts!r}", file=sys.stderr)
        return 2
    try:
        rows, skipped = compare(args.presets or None, contexts, args.flops_context, strict=False)
    except PresetError as err:
        print(f"hf-archs compare: {err}", file=sys.stderr)
        return 2
    print(format_rows(rows, args.format))
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if args.plots and rows:
        for path in plot(rows, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r.startswith("failed:") for r in skipped.values()) else 0


__all__ = ["BF16", "CONVENTIONS", "CompareError", "LayerCache", "ParamCounts", "attention_flops",
           "attention_layout", "cache_bytes", "cache_layout", "compare", "compare_config", "count_params",
           "counting_conventions", "format_rows", "meta_model", "moe_layout", "plot", "preset_names"]
