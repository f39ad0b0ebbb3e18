"""Side-by-side speed of hf_archs' mixture-of-experts decoders and transformers' own classes, on the same weights.

The dense benchmark's method (bench_dense.py, imported: same parity gate, interleaving, repeat rules, ceilings,
roofline fractions, clocks), applied to the MoE cases of tests/ that have a transformers twin: each case's tiny
official config.json is scaled to hidden 512, 4 layers, vocab 32000, `--experts` routed experts of width
`--expert-intermediate` with the family's release top-k, dense layers of width `--intermediate`, and (MLA) DeepSeek
V3's latent and head sizes; the case's dense-prefix / shared-expert / interleave / window pattern is kept.

Three sections:
  MoE table   1x512 prefill and greedy decode ms/token, fp32 and bf16, per architecture (as bench_dense)
  Llama 4     the same at `--llama4-experts` (128) experts: transformers runs every token through every expert;
              once at the table's widths and once at Maverick's proportions to the hidden size (experts 1.6x,
              dense layers 3.2x: 819 / 1638 at hidden 512)
  MLA         DeepSeek V3 single-token decode-step time at contexts 64 ... 4096, ours (absorbed decoding, the
              default) against transformers' DeepseekV3 on the same weights; growth t(4096) / t(64); cache bytes
              against the analytic latent size

    python bench/bench_moe.py                                     # everything (see bench/README.md for the time)
    python bench/bench_moe.py --arch qwen3_moe --dtypes fp32 --no-llama4 --no-mla
    python bench/bench_moe.py --clock cpu --threads 1 --out bench/results/moe-cpu-1thread-cputime.md
    python bench/bench_moe.py --mla-only --profile                # + profiler tables of MLA steps at 64 / 4096
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dense as bd  # after the path: bench/ is not a package
import torch
from bench_dense import log
from torch import nn

# The routed-expert count and top-k fields of each family, and the top-k of its releases (Qwen3-30B-A3B /
# 235B-A22B, DeepSeek V3, Kimi K2, GLM-4.5, MiniMax-M2: 8; gpt-oss: 4; Llama 4: 1). Grok 2 (top-2) has no
# transformers class to compare with.
EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")
RELEASE_TOP_K = {"qwen3_moe": 8, "deepseek_v3": 8, "kimi_k2": 8, "glm4_moe": 8, "minimax_m2": 8, "gpt_oss": 4,
                 "llama4": 1}
LINEAR_ATTENTION_KEYS = ("linear_num_value_heads", "linear_key_head_dim", "linear_attn_config")
NOT_RUN = {
    "kimi_k2": "the DeepSeek V3 architecture at other sizes (same classes on both sides): the deepseek_v3 row stands "
               "for it (`--arch kimi_k2` runs it)",
}
NO_TWIN = {"grok2": "no transformers class to compare with (its reference runtime is SGLang); not timed"}


def moe_cases(cases: list) -> list:
    """Cases with routed experts and softmax attention only (linear-attention hybrids: bench/linear_mixers.py)."""
    out = []
    for c in cases:
        text, _ = bd._text_part(c.official, None)
        if any(text.get(k) for k in EXPERT_KEYS) and not any(k in text for k in LINEAR_ATTENTION_KEYS):
            out.append(c)
    return out


# --------------------------------------------------------------------------------------------------------------
# The benchmark shape
# --------------------------------------------------------------------------------------------------------------

def scale_moe(official: dict[str, Any], arch, args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """bench_dense's scaling (hidden, layers, vocab, heads, windows kept) plus the experts, their width and top-k,
    the dense-layer width, MLA's sizes; MTP layers are left out (a forward never runs them)."""
    official = bd.scale_official(official, arch, args, layers)
    text, _ = bd._text_part(official, arch)
    name = arch.name
    for key in EXPERT_KEYS:
        if text.get(key):
            text[key] = args.experts
    top_k = min(RELEASE_TOP_K.get(name, text["num_experts_per_tok"]), args.experts)
    text["num_experts_per_tok"] = top_k
    if "experts_per_token" in text:  # gpt-oss' Hub config repeats it
        text["experts_per_token"] = top_k
    if "moe_intermediate_size" in text:  # intermediate_size is then the dense layers' (and shared expert's) width
        text["moe_intermediate_size"] = args.expert_intermediate
    else:  # the experts' width (gpt-oss, MiniMax-M2, Llama 4, whose dense layers use intermediate_size_mlp)
        text["intermediate_size"] = args.expert_intermediate
        if "intermediate_size_mlp" in text:
            text["intermediate_size_mlp"] = args.intermediate
    if text.get("kv_lora_rank"):  # MLA: DeepSeek V3's latent and per-head sizes (heads from --heads)
        text.update(kv_lora_rank=args.kv_lora_rank, qk_nope_head_dim=args.qk_nope_head_dim,
                    qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim)
        if text.get("q_lora_rank"):
            text["q_lora_rank"] = args.q_lora_rank
        text.pop("head_dim", None)
    for key in ("num_nextn_predict_layers", "num_mtp_modules"):
        if key in text:
            text[key] = 0
    if "use_mtp" in text:
        text["use_mtp"] = False
    if getattr(args, "max_positions", None):
        text["max_position_embeddings"] = max(text.get("max_position_embeddings") or 0, args.max_positions)
    return official


def maverick_widths(hidden: int) -> tuple[int, int]:
    """(routed-expert width, dense-layer width) in Llama 4 Maverick's proportions to its hidden size (8192 and
    16384 at 5120: 1.6x and 3.2x), scaled to `hidden`, from the preset transcribed from the release."""
    from hf_archs.presets import preset

    config = preset("llama-4-maverick")
    scale = hidden / config.hidden_size
    return round(config.intermediate_size * scale), round(config.intermediate_size_mlp * scale)


def moe_plan(config) -> list[tuple[str, bool, str]]:
    """(attention type, uses RoPE, "dense" or "sparse" MLP) of each layer: every kind must survive the scaling."""
    mlp = getattr(config, "mlp_layer_types", None) or ["sparse"] * config.num_hidden_layers
    return [(t, r, mlp[i]) for i, (t, r) in enumerate(bd.layer_plan(config))]


def describe(config) -> str:
    mlp = getattr(config, "mlp_layer_types", None) or ["sparse"] * config.num_hidden_layers
    return f"{bd.describe_layers(config)} {''.join('E' if m == 'sparse' else 'D' for m in mlp)}"


def to_ours_of(case):
    """The case's reference -> ours state mapping, without the tensors it generates for modules the benchmark
    leaves out (MTP layers at the tiny shape): every tensor of the reference is still loaded strictly."""
    if case.to_ours is None:
        return None
    generated = set(case.to_ours({}))

    def convert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in case.to_ours(state).items() if k not in generated or k in state}

    return convert


# --------------------------------------------------------------------------------------------------------------
# Rooflines: only the routed experts a token uses count
# --------------------------------------------------------------------------------------------------------------

def expert_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")
            and isinstance(m.gate_up_proj, nn.Parameter)]


def moe_roofline(ours: nn.Module, config, args: argparse.Namespace) -> dict[str, Any]:
    """Useful work (bench_dense's keys, per element size 1). Linear weights of the decoder (attention, dense MLPs,
    shared experts, routers) and the top-k routed experts of each token; prefill attention FLOPs over the causal
    pairs (windows, chunks respected) with MLA's q.k and p.v widths; decode reads the KV cache (MLA: the latent and
    RoPE key) at the mean context."""
    experts = expert_modules(ours.model)
    routers = sum(m.weight.numel() for m in ours.model.modules() if type(m).__name__.endswith("Router")
                  and not isinstance(m, nn.Linear))
    dense = bd.linear_params(ours.model) + routers
    per_token_experts = sum(config.num_experts_per_tok * (e.gate_up_proj.numel() + e.down_proj.numel())
                            // e.num_experts for e in experts)
    head = ours.lm_head.weight.numel()
    heads = config.num_attention_heads
    mla = bool(getattr(config, "kv_lora_rank", None))
    qk = config.qk_head_dim if mla else config.head_dim
    v = config.v_head_dim if mla else config.head_dim
    T = args.prefill_len
    pairs = sum(bd.attended_pairs(config, i, range(T)) for i in range(config.num_hidden_layers))
    prefill_flops = 2 * (dense + per_token_experts) * T + 2 * head + 2 * heads * (qk + v) * pairs
    per_token = (config.kv_lora_rank + config.qk_rope_head_dim) if mla else 2 * config.num_key_value_heads * config.head_dim
    kv = sum(bd.decode_context(config, args, i) * per_token for i in range(config.num_hidden_layers))
    return {"decoder_linear_params": dense, "routed_expert_params_per_token": per_token_experts,
            "routed_expert_params": sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts),
            "lm_head_params": head, "attention_pairs_prefill": pairs, "prefill_flops": prefill_flops,
            "decode_weight_elems": dense + per_token_experts + head, "decode_kv_elems": kv}


# --------------------------------------------------------------------------------------------------------------
# One architecture (the MoE table and the Llama 4 section)
# --------------------------------------------------------------------------------------------------------------

def build(case, arch, args: argparse.Namespace) -> tuple[dict[str, Any], Any, str, nn.Module, nn.Module]:
    """Both models at the benchmark shape, with `--attn` for both; where transformers refuses it for this model
    (gpt-oss: no sdpa with sinks), eager for both, said in the note."""
    official, config, note = bd.benchmark_config(case, arch, args, scale=scale_moe, plan=moe_plan)
    try:
        ref, ours = bd.build_pair(case, arch, official, config, args.attn, to_ours=to_ours_of(case))
    except ValueError as err:
        if args.attn == "eager" or "attention implementation" not in str(err):
            raise
        log(f"{case.name}: transformers refuses attn {args.attn!r} for this model; eager for both")
        ref, ours = bd.build_pair(case, arch, official, config, "eager", to_ours=to_ours_of(case))
        note = "; ".join(filter(None, [note, f"attention eager for both (transformers refuses {args.attn} here)"]))
    return official, config, note, ref, ours


def run_arch(case, arch, args: argparse.Namespace, entry: dict[str, Any]) -> None:
    official, config, note, ref, ours = build(case, arch, args)
    entry.update(note=note, layers=describe(config), official=official, experts=args.experts,
                 top_k=config.num_experts_per_tok, widths=[args.expert_intermediate, args.intermediate])
    log(f"{case.name}: built ({entry['layers']}, {args.experts} experts, top-{config.num_experts_per_tok})")
    entry["params"] = sum(p.numel() for p in ours.parameters())
    entry["work"] = moe_roofline(ours, config, args)
    bd.gate_and_time(case.name, ref, ours, config, args, entry)


# --------------------------------------------------------------------------------------------------------------
# MLA: decode-step time against the context length
# --------------------------------------------------------------------------------------------------------------

def cache_bytes(cache) -> dict[str, int]:
    """Bytes of the cached tokens (the layers' keys + values views) and of the storage allocated for them."""
    held = allocated = 0
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False):
            continue
        for t in (layer.keys, layer.values):
            held += t.numel() * t.element_size()
        storage = getattr(layer, "_storage", None)
        if storage is not None:
            allocated += storage.numel() * storage.element_size()
        else:
            allocated += sum(t.untyped_storage().nbytes() for t in (layer.keys, layer.values))
    return {"held": held, "allocated": allocated}


def mla_steps(model: nn.Module, cache, tokens: torch.Tensor, context: int):
    """Timed `len(tokens)` single-token steps on a cache holding `context` tokens; the cache is cropped back after."""
    def run() -> tuple[float, torch.Tensor]:
        t = bd.clock()
        for i in range(tokens.shape[1]):
            out = model(tokens[:, i:i + 1], cache=cache, use_cache=True)
        seconds = (bd.clock() - t) / tokens.shape[1]
        cache.crop(-tokens.shape[1])  # back to `context` tokens (transformers 5: a negative count removes)
        if cache.get_seq_length() != context:
            raise RuntimeError(f"cache holds {cache.get_seq_length()} tokens after crop, expected {context}")
        return seconds, out.logits
    return run


def profile_steps(model: nn.Module, cache, tokens: torch.Tensor, context: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mla_steps(model, cache, tokens, context)()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run_mla(case, arch, args: argparse.Namespace, out: dict[str, Any]) -> None:
    margs = copy.copy(args)
    margs.max_positions = max(args.mla_contexts) + args.mla_steps + 16
    _, config, note, ref, ours = build(case, arch, margs)
    dtype = bd.DTYPES[args.mla_dtype]
    ref, ours = ref.to(dtype), ours.to(dtype)
    elem = torch.finfo(dtype).bits // 8
    per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * elem
    out.update(arch=case.name, layers=describe(config), note=note, dtype=args.mla_dtype, steps=args.mla_steps,
               kv_lora_rank=config.kv_lora_rank, qk_rope_head_dim=config.qk_rope_head_dim,
               heads=config.num_attention_heads, qk_nope_head_dim=config.qk_nope_head_dim,
               v_head_dim=config.v_head_dim, q_lora_rank=config.q_lora_rank, analytic_bytes_per_token=per_token,
               contexts={})
    log(f"MLA: {case.name} ({out['layers']}), latent {config.kv_lora_rank} + rope {config.qk_rope_head_dim}, "
        f"{config.num_attention_heads} heads, {args.mla_dtype}")
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, bd.text_vocab(config), (1, args.mla_steps), generator=gen)
    models = {"transformers": ref, "ours": ours}
    with torch.inference_mode():
        for context in args.mla_contexts:
            prompt = torch.randint(3, bd.text_vocab(config), (1, context), generator=gen)
            caches = {}
            for name, m in models.items():
                t = time.perf_counter()
                caches[name] = m(prompt, use_cache=True, logits_to_keep=1).cache
                log(f"MLA context {context}: {name} prefill {time.perf_counter() - t:.1f} s (untimed)")
            c: dict[str, Any] = {"cache_bytes": {n: cache_bytes(caches[n]) for n in models},
                                 "analytic_bytes": per_token * context}
            out["contexts"][context] = c
            fns = {n: mla_steps(m, caches[n], tokens, context) for n, m in models.items()}
            logits = {n: fn()[1] for n, fn in fns.items()}  # warm-up, and the parity gate at this context
            c["parity"] = bd.max_rel_diff(logits["ours"], logits["transformers"])
            tol = bd.PARITY_TOL if dtype == torch.float32 else float("inf")
            if c["parity"] > tol:
                c["error"] = f"PARITY FAILED at context {context}: {c['parity']:.2e} > {tol:g}; not timed"
                log(c["error"])
                continue
            runs = bd.rounds(fns, args, min_rounds=args.mla_repeats, budget=args.budget)
            for n in models:
                c[n] = {"step_s": [t for t, _, _ in runs[n]], "others_cpu_share": [o for _, o, _ in runs[n]],
                        "trusted": bd.trustworthy(runs[n], args.stable)}
            best = {n: min(c[n]["step_s"]) * 1e3 for n in models}
            log(f"MLA context {context}: step {best['transformers']:.2f} / {best['ours']:.2f} ms "
                f"[transformers / ours]; cache bytes ours {c['cache_bytes']['ours']['held']} "
                f"(analytic {c['analytic_bytes']}), transformers {c['cache_bytes']['transformers']['held']}")
            if args.profile and context in (min(args.mla_contexts), max(args.mla_contexts)):
                c["profile"] = profile_steps(ours, caches["ours"], tokens, context, args.profile_rows)
                print(f"\n=== MLA ours, context {context}: {args.mla_steps} steps ===\n{c['profile']}",
                      file=sys.stderr)
            del caches
            gc.collect()


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

def shape_line(args: argparse.Namespace) -> str:
    return (f"- Shape: hidden {args.hidden}, {args.layers} layers (unless noted), vocab {args.vocab}; {args.experts} "
            f"routed experts of width {args.expert_intermediate} (top-k of the family's releases: Qwen3-MoE, DeepSeek "
            f"V3, GLM-4.5, MiniMax-M2 8, gpt-oss 4, Llama 4 1); dense layers and shared experts as in each case, dense "
            f"width {args.intermediate}; {args.heads} heads, head_dim {args.head_dim}, KV heads in the case's ratio; "
            f"MLA: kv_lora_rank {args.kv_lora_rank}, q_lora_rank {args.q_lora_rank} (where the case has one), "
            f"qk_nope / qk_rope / v head dims {args.qk_nope_head_dim} / {args.qk_rope_head_dim} / {args.v_head_dim}. "
            f"Each case's layer pattern (dense prefix, interleave, windows, NoPE) kept; MTP layers left out (a forward "
            f"never runs them). Attention: {args.attn} for both.")


def mla_markdown(mla: dict[str, Any], args: argparse.Namespace) -> list[str]:
    if not mla.get("contexts"):
        return ["", f"MLA section: **{mla.get('error', 'not run')}**"] if mla else []
    lines = ["", f"## MLA decoding ({mla['arch']}): single-token step time against the context length", "",
             (f"{mla['arch']} at the shape above ({mla['layers']}), {mla['heads']} heads, latent "
              f"{mla['kv_lora_rank']} + RoPE key {mla['qk_rope_head_dim']}, {mla['dtype']}. The cache is filled by an "
              f"untimed prefill of the context; then {mla['steps']} single-token forwards (the same tokens for both) "
              "are timed and the cache is cropped back; the per-step mean, min over interleaved rounds. Ours decodes "
              "absorbed (its default for a single token on a cached history: one sdpa pass over the latent rows, the heads "
              "as query rows); transformers re-expands the whole "
              "latent history through kv_b_proj at every step. The logits of the timed steps are compared first "
              "(fp32: gate 1e-4). Cache bytes: the cached tokens' tensors after the prefill; analytic = (kv_lora_rank "
              "+ qk_rope_head_dim) x layers x element size x context."), "",
             ("| context | step ms: transformers | ours | ratio | cache bytes: ours | analytic latent "
              "| ours / analytic | ours allocated | transformers | parity |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    ctx = {int(k): v for k, v in mla["contexts"].items()}
    for t, c in sorted(ctx.items()):
        cb = c["cache_bytes"]
        if "error" in c or "ours" not in c:
            lines.append(f"| {t} | | | | {cb['ours']['held']} | {c['analytic_bytes']} | | | | "
                         f"**{c.get('error', 'not timed')}** |")
            continue
        tf, ours = min(c["transformers"]["step_s"]) * 1e3, min(c["ours"]["step_s"]) * 1e3
        star = {n: "" if c[n]["trusted"] else "*" for n in ("transformers", "ours")}
        lines.append(f"| {t} | {tf:.2f}{star['transformers']} | {ours:.2f}{star['ours']} | {tf / ours:.2f}x "
                     f"| {cb['ours']['held']} | {c['analytic_bytes']} | {cb['ours']['held'] / c['analytic_bytes']:.3f} "
                     f"| {cb['ours']['allocated']} | {cb['transformers']['held']} | {c['parity']:.1e} |")
    timed = {t: c for t, c in ctx.items() if "ours" in c}
    if len(timed) >= 2:
        lo, hi = min(timed), max(timed)
        g = {n: min(timed[hi][n]["step_s"]) / min(timed[lo][n]["step_s"]) for n in ("transformers", "ours")}
        mla["growth"] = g
        lines += ["", (f"Growth of the step time from context {lo} to {hi}: transformers **{g['transformers']:.2f}x**, "
                       f"ours **{g['ours']:.2f}x**.")]
    lines.append("ours allocated: the latent storage grows in chunks of 256 tokens, so up to 255 tokens are allocated "
                 "ahead; transformers: the bytes of its cache's tensors.")
    return lines


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    table = bd.markdown(results, args, title="mixture-of-experts decoders", shape=shape_line(args))
    lines = table.rstrip("\n").split("\n")
    extra = ["", ("layers: attention kinds (F full, S sliding, C chunked; lower case NoPE), then the MLP of each "
                  "layer (D dense, E routed experts).")]
    for name, why in {**NOT_RUN, **NO_TWIN}.items():
        if name not in results["archs"]:
            extra.append(f"- {name}: {why}.")
    l4 = [(a, r) for a, r in results["archs"].items() if a.startswith("llama4 @")]
    for a, r in l4:
        widths = r.get("widths") or [args.expert_intermediate, args.intermediate]
        for dtype, s in r.get("dtypes", {}).items():
            extra.append(f"- {a} (routed experts {widths[0]} wide, dense layers {widths[1]}; {dtype}): prefill "
                         f"{s['prefill_ratio']:.1f}x, decode {s['decode_ratio']:.1f}x faster than transformers (which "
                         "runs every token through every expert).")
    return "\n".join(lines + extra + mla_markdown(results.get("mla") or {}, args)) + "\n"


# --------------------------------------------------------------------------------------------------------------

def extend_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Benchmark hf_archs' mixture-of-experts decoders against transformers' own classes (same "
                     "weights, same\nprocess, interleaved): 1x512 prefill and greedy decode ms/token, fp32 and bf16; "
                     "Llama 4 at 128 experts;\nMLA decode-step time against the context length. Reuses bench_dense.py.")
    p.epilog = ("Example: python bench/bench_moe.py --arch qwen3_moe --dtypes fp32 --no-llama4 --no-mla\n"
                "See bench/README.md for what is measured and how to read the ratios.")
    g = p.add_argument_group("experts")
    g.add_argument("--experts", type=int, default=32, help="routed experts of every MoE layer")
    g.add_argument("--expert-intermediate", type=int, default=256, help="width of each routed expert")
    g.add_argument("--llama4-experts", type=int, default=128, help="experts of the Llama 4 section")
    g.add_argument("--no-llama4", action="store_true", help="skip the Llama 4 section")
    g.add_argument("--no-llama4-release-widths", action="store_true",
                   help="skip the Llama 4 run whose expert and dense widths keep Maverick's proportions to the "
                        "hidden size (1.6x and 3.2x: 819 and 1638 at hidden 512)")
    g = p.add_argument_group("MLA")
    g.add_argument("--kv-lora-rank", type=int, default=512)
    g.add_argument("--q-lora-rank", type=int, default=1536)
    g.add_argument("--qk-nope-head-dim", type=int, default=128)
    g.add_argument("--qk-rope-head-dim", type=int, default=64)
    g.add_argument("--v-head-dim", type=int, default=128)
    g.add_argument("--mla-contexts", type=int, nargs="+", default=[64, 512, 1024, 2048, 4096],
                   help="contexts of the MLA section (growth = last / first)")
    g.add_argument("--mla-steps", type=int, default=8, help="single-token steps timed per round")
    g.add_argument("--mla-repeats", type=int, default=5, help="least rounds per context")
    g.add_argument("--mla-dtype", default="fp32", choices=sorted(bd.DTYPES))
    g.add_argument("--mla-arch", default="deepseek_v3")
    g.add_argument("--no-mla", action="store_true", help="skip the MLA section")
    g.add_argument("--mla-only", action="store_true", help="only the MLA section (no MoE table, no Llama 4)")


def main(argv: list[str] | None = None) -> int:
    args = bd.parse_args(argv, extend=extend_parser)
    if bd.render_saved(args, markdown):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    bd.clock = time.process_time if args.clock == "cpu" else time.perf_counter
    import transformers

    import hf_archs

    transformers.logging.set_verbosity_error()
    cases = moe_cases(bd.load_cases())
    by_name = {c.name: c for c in cases}
    if args.list:
        for c in cases:
            status = "registered" if c.name in hf_archs.ARCHITECTURES else "no hf_archs class yet"
            print(f"{c.name:12s} {status}{'; ' + NOT_RUN[c.name] if c.name in NOT_RUN else ''}")
        return 0
    wanted = [] if args.mla_only else (args.arch or [c.name for c in cases if c.name not in NOT_RUN])
    unknown = [a for a in wanted if a not in by_name]
    if unknown:
        log(f"ERROR: no MoE case for {unknown}; MoE cases: {sorted(by_name)}")
        return 2
    results: dict[str, Any] = {"machine": bd.machine_info(args), "args": {k: str(v) if isinstance(v, Path) else v
                                                                          for k, v in vars(args).items()},
                               "archs": {}, "mla": {}}
    log(f"machine: {results['machine']['cpu']}, {results['machine']['torch_threads']} threads, "
        f"load {results['machine']['loadavg_start']}")
    log("measuring ceilings (copy bandwidth, GEMM)")
    ceiling_runs = bd.measure_ceilings(args)
    bd.log_ceilings(bd.ceilings(ceiling_runs, args), args)

    jobs = [(name, name, args) for name in wanted]
    if not (args.no_llama4 or args.mla_only) and "llama4" in by_name:
        l4 = copy.copy(args)
        l4.experts = args.llama4_experts
        jobs.append((f"llama4 @{args.llama4_experts} experts", "llama4", l4))
        if not args.no_llama4_release_widths:
            wide = copy.copy(l4)
            wide.expert_intermediate, wide.intermediate = maverick_widths(args.hidden)
            jobs.append((f"llama4 @{args.llama4_experts} experts, Maverick widths", "llama4", wide))
    failed = []
    for n, (label, name, jargs) in enumerate(jobs):
        if n:  # again between architectures: one more chance of a quiet moment for the ceilings
            for k, runs in bd.measure_ceilings(args, min_rounds=2, budget=0).items():
                ceiling_runs[k] += runs
        if name not in hf_archs.ARCHITECTURES:
            results["archs"][label] = {"skipped": "not in hf_archs.ARCHITECTURES"}
            continue
        entry: dict[str, Any] = {}
        results["archs"][label] = entry
        try:
            run_arch(by_name[name], hf_archs.ARCHITECTURES[name], jargs, entry)
        except Exception as err:  # noqa: BLE001 - one broken architecture must not lose the others' numbers
            bd.record_abort(label, err, entry, failed)
        gc.collect()
    if not args.no_mla and args.mla_arch in by_name:
        try:
            run_mla(by_name[args.mla_arch], hf_archs.ARCHITECTURES[args.mla_arch], args, results["mla"])
        except Exception as err:  # noqa: BLE001
            log(f"!!!!! MLA section: ABORTED: {type(err).__name__}: {err}")
            traceback.print_exc()
            results["mla"]["error"] = f"{type(err).__name__}: {err}"
            failed.append("mla")
        if any("error" in c for c in results["mla"].get("contexts", {}).values()):
            failed.append("mla parity")

    return bd.finish_run(args, results, ceiling_runs, markdown, failed)


if __name__ == "__main__":
    sys.exit(main())
