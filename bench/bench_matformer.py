"""Speed and size of a MatFormer cut (Gemma 3n E2B out of E4B) relative to the full model, on a CPU-sized E4B.

Gemma 3n E4B's E2B sub-model (`hf_archs.matformer.PRESETS["E2B"]`) keeps every layer's first half of FFN units
(16384 -> 8192) and drops layers 20-24 (35 -> 30 layers; the KV-shared layers go from 15 to 10). At the release's
size the timing does not fit a CPU, so E4B's structure is kept and its widths are scaled by `s = hidden / 2048`:

  kept      35 layers, 4 sliding : 1 full (window 512), KV sharing over the last 15 layers, Gaussian top-k sparsity
            (0.95) on layers 0-9, per-layer embeddings, 4 AltUp streams, LAuReL, 8 heads / 2 KV heads, soft-cap
  scaled    hidden_size, intermediate_size (16384 s), head_dim (256 s), hidden_size_per_layer_input (256 s),
            laurel_rank (64 s), vocab_size (262400 s) and vocab_size_per_layer_input (262144 s)

Every parameter block then scales as s^2 (AltUp's small coefficient matrices and the norms excepted), so the cut's
parameter ratios at the scaled size are those of the release. The cut is the E2B preset itself, its widths scaled
the same way (`scaled_cut`: 8192 -> 8192 s = 4 x hidden, the same layers skipped), applied with
`hf_archs.matformer.slice`; `slice_preset` takes the release's absolute widths (8192), larger than the scaled model's.
For reference the parameter counts at the release's own sizes come from models built on the meta device.

Parity gate (fp32, before any timing): our full model against transformers' Gemma3nForCausalLM on the same weights,
then the cut against models built directly at the E2B-style config (E2B's published text fields, widths scaled:
ours and transformers') with weights cut independently (kept layers renumbered, FFN prefixes, the kept layers'
slices of the per-layer embeddings): full-sequence logits and cached decoding must agree to 1e-4 (relative).

Timing reuses bench_dense.py (same rules): full and cut interleaved in one process, min of >= `--repeats` rounds
(more while a best time is not reproduced), 1 x 512 prefill with logits_to_keep=1, greedy `generate` ms/token after a
64-token prompt, fp32 and bf16 (fresh copies), copy-bandwidth and GEMM ceilings and roofline fractions.

    python bench/bench_matformer.py                                  # hidden 512, fp32 and bf16
    python bench/bench_matformer.py --clock cpu --threads 1 --out bench/results/matformer-cpu.md
    python bench/bench_matformer.py --tiny                           # the whole path at hidden 64 (a smoke test)
    python bench/bench_matformer.py --render bench/results/matformer-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dense as bd

sys.path.insert(0, str(bd.TESTS))
from helpers import matformer_cut_state  # the tests' reference cut, written independently of hf_archs.matformer
import torch
from torch import nn

E4B_HIDDEN = 2048
# google/gemma-3n-E4B config.json, `text_config` (the fields the runtime reads; official names and legacy RoPE keys):
# https://huggingface.co/google/gemma-3n-E4B/blob/main/config.json
E4B_TEXT: dict[str, Any] = {
    "model_type": "gemma3n_text", "vocab_size": 262_400, "vocab_size_per_layer_input": 262_144,
    "hidden_size": 2048, "hidden_size_per_layer_input": 256, "intermediate_size": [16_384] * 35,
    "num_hidden_layers": 35, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
    "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7, "sliding_window": 512,
    "num_kv_shared_layers": 15, "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 25,
    "altup_active_idx": 0, "altup_coef_clip": 120.0, "altup_correct_scale": True, "altup_lr_multiplier": 1.0,
    "altup_num_inputs": 4, "laurel_rank": 64, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "max_position_embeddings": 32_768, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0, "rope_scaling": None, "query_pre_attn_scalar": 256, "attention_bias": False,
    "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
    "use_cache": True, "tie_word_embeddings": True}
# google/gemma-3n-E2B: the same fields except these (transformers' convert_gemma3n_weights.py `_VARIANTS`; the
# layer pattern is the same 4:1 over 30 layers).
E2B_TEXT_CHANGES: dict[str, Any] = {
    "intermediate_size": [2048 * 4] * 30, "num_hidden_layers": 30, "num_kv_shared_layers": 10,
    "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 6,
    "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 20}
# Widths scaled with hidden_size (each times hidden / 2048).
SCALED_FIELDS = ("hidden_size", "hidden_size_per_layer_input", "intermediate_size", "head_dim", "laurel_rank",
                 "vocab_size", "vocab_size_per_layer_input", "query_pre_attn_scalar")
PRESET = "E2B"


def _scale(value: int, hidden: int, name: str) -> int:
    if value * hidden % E4B_HIDDEN:
        raise SystemExit(f"hidden {hidden}: {name} = {value} x {hidden} / {E4B_HIDDEN} is not an integer; use a "
                         "hidden size that is a multiple of 32")
    return value * hidden // E4B_HIDDEN


def scaled_text(text: dict[str, Any], hidden: int) -> dict[str, Any]:
    """A Gemma 3n text config.json with every width scaled by hidden / 2048, its layer structure unchanged."""
    out = copy.deepcopy(text)
    for key in SCALED_FIELDS:
        v = out[key]
        out[key] = [_scale(w, hidden, key) for w in v] if isinstance(v, list) else _scale(v, hidden, key)
    return out


def scaled_cut(cut, hidden: int) -> tuple[list[int | None], list[int]]:
    """A preset (`hf_archs.matformer.Cut`, widths of the 2048-wide release) at hidden `hidden`: (ffn_dims,
    skip_layers) for `hf_archs.matformer.slice`."""
    dims = [None if w is None else _scale(w, hidden, "ffn width") for w in cut.ffn_dims]
    return dims, list(cut.skip_layers)


# --------------------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------------------

def sizes(model: nn.Module) -> dict[str, Any]:
    """Parameter counts (tied tensors once): the token embedding (tied with lm_head), the per-layer-embedding table,
    and the rest, which is what a forward multiplies by."""
    from hf_archs.matformer import count_parameters

    base, config = model.model, model.config
    total = count_parameters(model)
    embed = base.embed_tokens.weight.numel()
    per_layer = base.embed_tokens_per_layer.weight.numel()
    ffn = sum(layer.mlp.gate_proj.weight.numel() + layer.mlp.up_proj.weight.numel()
              + layer.mlp.down_proj.weight.numel() for layer in base.layers)
    widths = sorted(set(config.intermediate_size))
    return {"layers": config.num_hidden_layers, "kv_shared_layers": config.num_kv_shared_layers,
            "ffn_widths": widths, "total": total, "embed_tokens": embed, "per_layer_embeddings": per_layer,
            "without_embeddings": total - embed - per_layer, "ffn": ffn,
            "tied_lm_head": model.lm_head.weight is base.embed_tokens.weight}


def release_sizes() -> dict[str, Any]:
    """Parameter counts at the release's sizes: E4B built on the meta device from its config.json, cut with the
    E2B preset; E2B also built directly from its own published fields (the counts must agree)."""
    import hf_archs
    from hf_archs.matformer import count_parameters, slice_preset

    arch = hf_archs.ARCHITECTURES["gemma3n"]
    with torch.device("meta"):
        e4b = arch.causal_lm_class(hf_archs.config_from_official(E4B_TEXT, arch))
        direct = arch.causal_lm_class(hf_archs.config_from_official({**E4B_TEXT, **E2B_TEXT_CHANGES}, arch))
    e2b = slice_preset(e4b, PRESET)
    if count_parameters(e2b) != count_parameters(direct):
        raise RuntimeError(f"the {PRESET} preset cut of E4B has {count_parameters(e2b):,} parameters, the E2B "
                           f"config built directly {count_parameters(direct):,}")
    return {"full": sizes(e4b), "cut": sizes(e2b)}


# --------------------------------------------------------------------------------------------------------------
# Models and the parity gate
# --------------------------------------------------------------------------------------------------------------

def transformers_model(text: dict[str, Any]) -> nn.Module:
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    config = Gemma3nTextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    config._attn_implementation = "eager"
    return Gemma3nForCausalLM(config).eval()


PLAN_FIELDS = ("num_hidden_layers", "intermediate_size", "layer_types", "activation_sparsity_pattern",
               "num_kv_shared_layers", "hidden_size_per_layer_input", "vocab_size_per_layer_input")


def build_and_gate(args: argparse.Namespace, entry: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """(full, cut) in fp32, after the parity gate; raises RuntimeError if any check fails."""
    import hf_archs
    from hf_archs import matformer

    arch = hf_archs.ARCHITECTURES["gemma3n"]
    full_text = scaled_text(E4B_TEXT, args.hidden)
    direct_text = scaled_text({**E4B_TEXT, **E2B_TEXT_CHANGES}, args.hidden)
    ffn_dims, skip = scaled_cut(matformer.PRESETS[PRESET], args.hidden)
    entry.update(full_config=full_text, direct_cut_config=direct_text, ffn_dims=ffn_dims, skip_layers=skip)
    gen = torch.Generator().manual_seed(3)
    vocab = min(full_text["vocab_size"], full_text["vocab_size_per_layer_input"])
    ids = torch.randint(3, vocab, (1, args.prefill_len), generator=gen)
    parity: dict[str, dict[str, float]] = {}
    entry["parity_fp32"] = parity

    bd.log(f"building the E4B-shaped model (hidden {args.hidden}) in transformers and ours, same weights")
    ref, full = bd.build_pair(SimpleNamespace(reference=transformers_model), arch, full_text,
                              hf_archs.config_from_official(full_text, arch), args.attn)
    parity["full: ours vs transformers"] = bd.check_parity(ref, full, ids, args.prompt_len)
    del ref
    gc.collect()

    bd.log(f"cutting it: {PRESET} preset at the scaled widths (FFN {sorted({w for w in ffn_dims if w})}, "
           f"layers {skip} skipped)")
    cut = matformer.slice(full, ffn_dims, skip)
    kept = [i for i in range(full.config.num_hidden_layers) if i not in skip]
    direct = arch.causal_lm_class(hf_archs.config_from_official(direct_text, arch))
    mismatch = [f for f in PLAN_FIELDS if getattr(cut.config, f) != getattr(direct.config, f)]
    if mismatch:
        raise RuntimeError(f"PARITY FAILED: the cut's config differs from E2B's at the scaled widths in {mismatch}")
    state = matformer_cut_state(full.state_dict(), kept, direct.config.intermediate_size,
                      full.config.hidden_size_per_layer_input)
    direct.load_state_dict(state, strict=True)
    direct.set_attn_implementation(args.attn)
    direct.eval()
    theirs = transformers_model(direct_text)
    theirs.load_state_dict(state, strict=True)
    theirs.set_attn_implementation(args.attn)
    bd.log("parity gate: the cut against models built at the E2B-style config (ours, transformers')")
    parity["cut vs ours built at the cut config"] = bd.check_parity(direct, cut, ids, args.prompt_len)
    parity["cut vs transformers built at the cut config"] = bd.check_parity(theirs, cut, ids, args.prompt_len)
    del direct, theirs, state
    gc.collect()
    bd.log(f"parity {json.dumps(parity)}")
    worst = {k: max(v.values()) for k, v in parity.items()}
    failed = {k: v for k, v in worst.items() if not v <= bd.PARITY_TOL}
    entry["parity_gate"] = "failed" if failed else "passed"
    if failed:
        raise RuntimeError(f"PARITY FAILED (max rel diff > {bd.PARITY_TOL:g}): {failed}. Not timed.")
    return full, cut


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------

def work(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """bench_dense's useful work (prefill FLOPs, bytes per decode step) with the KV cache of KV-shared layers
    removed: they store nothing and read their source layer's cache, which is already counted."""
    w = bd.roofline_model(model, model.config, args)
    c = model.config
    mean_ctx = args.prompt_len + (args.decode_steps + 1) / 2
    w["decode_kv_elems"] = sum(
        2 * c.num_key_value_heads * c.head_dim
        * (min(mean_ctx, c.sliding_window) if t == "sliding_attention" else mean_ctx)
        for t, mode in zip(c.layer_types, c.kv_sharing_modes) if mode != "reuse")
    return w


def time_full_and_cut(full: nn.Module, cut: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """bench_dense.time_pair with the full model in the reference's slot and the cut in ours' (interleaved: full,
    cut, cut, full, ...); renamed, and the per-round ratios taken as cut / full."""
    raw = bd.time_pair(full, cut, cut.config, args)
    out = {"full": raw["transformers"], "cut": raw["ours"]}
    for phase, key in (("prefill", "prefill_s"), ("decode", "decode_s_per_token")):
        out[f"{phase}_paired_ratio_median"] = statistics.median(
            c / f for f, c in zip(out["full"][key], out["cut"][key]))
    return out


def summarise(raw: dict[str, Any], works: dict[str, Any], ceil: dict[str, Any], dtype: str) -> dict[str, Any]:
    elem = torch.finfo(bd.DTYPES[dtype]).bits // 8
    gemm = ceil[f"gemm_{dtype}"]["gflops"] * 1e9
    bw = ceil["copy"]["gbps"] * 1e9
    s: dict[str, Any] = {}
    for who in ("full", "cut"):
        w = works[who]
        p, d = min(raw[who]["prefill_s"]), min(raw[who]["decode_s_per_token"])
        s[who] = {"prefill_s": p, "prefill_median_s": statistics.median(raw[who]["prefill_s"]),
                  "decode_s": d, "decode_median_s": statistics.median(raw[who]["decode_s_per_token"]),
                  "prefill_roofline": w["prefill_flops"] / gemm / p,
                  "decode_roofline": (w["decode_weight_elems"] + w["decode_kv_elems"]) * elem / bw / d}
    s["prefill_ratio"] = s["cut"]["prefill_s"] / s["full"]["prefill_s"]
    s["decode_ratio"] = s["cut"]["decode_s"] / s["full"]["decode_s"]
    s["prefill_paired_ratio_median"] = raw["prefill_paired_ratio_median"]
    s["decode_paired_ratio_median"] = raw["decode_paired_ratio_median"]
    return s


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

def _m(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n < 1e9 else f"{n / 1e9:,.3f} B"


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    m, r = results["machine"], results["run"]
    lines = ["# MatFormer: Gemma 3n E2B-style cut vs the full E4B-shaped model", ""]
    lines.append(f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch thread(s) "
                 f"({' '.join(m['cpu_flags']) or 'no AVX-512 / AMX flags'}); load average {m['loadavg_start']} at "
                 f"the start, {m.get('loadavg_end', 'n/a')} at the end.")
    lines.append(f"- Software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, hf_archs "
                 f"{m['hf_archs']} (git {m['git']}); {m['date']}.")
    if "ceilings" in results:
        c = results["ceilings"]
        gemm = ", ".join(f"{d} {c[f'gemm_{d}']['gflops']:.0f}{'' if c[f'gemm_{d}']['trusted'] else '*'} GFLOP/s"
                         for d in args.dtypes)
        lines.append(f"- Ceilings (same run, best of its start and end): copy {c['copy']['gbps']:.1f}"
                     f"{'' if c['copy']['trusted'] else '*'} GB/s (read + write of a {args.copy_mib} MiB fp32 "
                     f"tensor); GEMM {args.gemm_size}^3: {gemm}.")
    if args.clock == "cpu":
        lines.append(f"- Clock: this process's CPU time (`--clock cpu`, summed over its {m['torch_threads']} torch "
                     "thread(s)), not wall time: robust to other processes' load; ceilings measured the same way.")
    else:
        lines.append("- Clock: wall time.")
    shares = [x for s in r.get("dtypes", {}).values() for who in ("full", "cut") for ph in ("prefill", "decode")
              for x in s["raw"][who][f"{ph}_others_cpu_share"]]
    if shares:
        lines.append(bd.load_line(shares))
    if args.note:
        lines.append(f"- Note: {args.note}")
    fc = r.get("full_config")
    if fc:
        lines.append(
            f"- Full model: E4B's text decoder structure (35 layers, 4 sliding (window {fc['sliding_window']}) : 1 "
            f"full, the last {fc['num_kv_shared_layers']} layers KV-shared, Gaussian top-k sparsity 0.95 on layers "
            f"0-9, per-layer embeddings, {fc['altup_num_inputs']} AltUp streams, LAuReL, 8 heads / 2 KV heads, "
            f"soft-cap 30) with every width x {args.hidden}/2048: hidden {fc['hidden_size']}, FFN "
            f"{fc['intermediate_size'][0]}, head_dim {fc['head_dim']}, per-layer input "
            f"{fc['hidden_size_per_layer_input']}, LAuReL rank {fc['laurel_rank']}, vocab {fc['vocab_size']} "
            f"(per-layer {fc['vocab_size_per_layer_input']}).")
        widths = sorted({w for w in r["ffn_dims"] if w})
        lines.append(
            f"- Cut: the `{PRESET}` preset of `hf_archs.matformer` (FFN 16384 -> 8192 in every kept layer, layers "
            f"{r['skip_layers'][0]}-{r['skip_layers'][-1]} dropped: 30 layers, 10 KV-shared) at the scaled widths: "
            f"FFN {fc['intermediate_size'][0]} -> {', '.join(map(str, widths))}, through `matformer.slice`.")
    par = r.get("parity_fp32")
    if par:
        lines.append(f"- Parity gate ({r.get('parity_gate', 'not reached')}; fp32, max relative logits difference "
                     f"over a {args.prefill_len}-token forward and cached decoding, tolerance {bd.PARITY_TOL:g}): "
                     + "; ".join(f"{k} {max(v.values()):.1e}" for k, v in par.items()) + ".")
    lines.append(f"- Prefill: 1 x {args.prefill_len} tokens, logits_to_keep=1. Decode: greedy `generate`, "
                 f"{args.prompt_len}-token prompt, {args.decode_steps} single-token steps timed (prompt excluded). "
                 f"Full and cut interleaved in one process, min of >= {args.repeats} rounds after {args.warmup} "
                 f"warm-up (more, up to {args.max_repeats} or {args.budget:.0f} s, while a best time is not "
                 f"reproduced within {args.stable:.0%}). Attention: {args.attn}.")
    if "error" in r:
        lines += ["", f"**ABORTED: {r['error']}**"]

    def size_rows(label: str, s: dict[str, Any], dtype_mib: bool) -> list[str]:
        rows = []
        for who in ("full", "cut"):
            z = s[who]
            mib = (f" | {z['total'] * 4 / 2**20:,.0f} | {z['total'] * 2 / 2**20:,.0f}" if dtype_mib
                   else f" | {z['total'] * 4 / 2**30:,.1f} GiB | {z['total'] * 2 / 2**30:,.1f} GiB")
            rows.append(f"| {label} {who} | {z['layers']} ({z['kv_shared_layers']}) | "
                        f"{', '.join(map(str, z['ffn_widths']))} | {_m(z['total'])} | {_m(z['embed_tokens'])} | "
                        f"{_m(z['per_layer_embeddings'])} | {_m(z['without_embeddings'])} | {_m(z['ffn'])}{mib} |")
        f, c = s["full"], s["cut"]
        rows.append(f"| {label} cut / full | {c['layers'] / f['layers']:.3f} "
                    f"| {c['ffn_widths'][0] / f['ffn_widths'][0]:.3f} | "
                    + " | ".join(f"{c[k] / f[k]:.3f}" for k in ("total", "embed_tokens", "per_layer_embeddings",
                                                               "without_embeddings", "ffn"))
                    + f" | {c['total'] / f['total']:.3f} | {c['total'] / f['total']:.3f} |")
        return rows

    lines += ["", "## Size", "",
              ("| model | layers (KV-shared) | FFN width | parameters | embed_tokens (= lm_head, tied) "
              "| per-layer embeddings | without embeddings | of which FFN | fp32 weights (MiB) | bf16 weights (MiB) |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if "sizes" in r:
        lines += size_rows(f"scaled (hidden {args.hidden})", r["sizes"], True)
    lines += size_rows("release (meta device)", results["release_sizes"], False)
    lines += ["", ("The per-layer-embedding table is read by a gather (a few hundred values per token and layer), not "
                   "multiplied: without it, and without the token embedding, is what costs compute. At the release's "
                   "size the weight columns are in GiB.")]

    if r.get("dtypes"):
        lines += ["", "## Speed", "",
                  ("| dtype | prefill ms: full | cut | cut / full | decode ms/token: full | cut | cut / full "
                  "| prefill % of GEMM peak (full / cut) | decode % of BW roofline (full / cut) |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for dtype, s in r["dtypes"].items():
            def ms(who: str, phase: str, digits: int, s: dict[str, Any] = s) -> str:
                star = "" if s["raw"][who][f"{phase}_trusted"] else "*"
                return f"{s[who][f'{phase}_s'] * 1e3:.{digits}f}{star}"

            lines.append(f"| {dtype} | {ms('full', 'prefill', 1)} | {ms('cut', 'prefill', 1)} "
                         f"| {s['prefill_ratio']:.2f} ({s['prefill_paired_ratio_median']:.2f}) "
                         f"| {ms('full', 'decode', 2)} | {ms('cut', 'decode', 2)} "
                         f"| {s['decode_ratio']:.2f} ({s['decode_paired_ratio_median']:.2f}) "
                         f"| {s['full']['prefill_roofline']:.0%} / {s['cut']['prefill_roofline']:.0%} "
                         f"| {s['full']['decode_roofline']:.0%} / {s['cut']['decode_roofline']:.0%} |")
        lines += ["", ("cut / full: time of the cut over time of the full model (< 1: the cut is faster), of the "
                       "minima; in brackets the median of the per-round ratios (both ran back to back), a second "
                       f"estimate robust to load. * = best time not reproduced within {args.stable:.0%} (noisy). "
                       "Roofline %: prefill = useful FLOPs / GEMM peak / time; decode = (linear weights + the KV "
                       "cache of the layers that store one) bytes per token / copy bandwidth / time.")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------

TINY = {"hidden": 64, "prefill_len": 32, "prompt_len": 8, "decode_steps": 4, "repeats": 2, "max_repeats": 2,
        "budget": 5.0, "warmup": 0, "copy_mib": 8, "gemm_size": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Speed and size of the Gemma 3n E2B-style MatFormer cut relative to the full E4B-shaped model "
                    "(widths scaled to a CPU), with a parity gate against models built at the cut's config.",
        epilog="See bench/README.md (bench_matformer.py) for what is measured.",
        formatter_class=bd._HelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="hidden_size; every width scales with hidden / 2048 "
                                                           "(a multiple of 32)")
    p.add_argument("--tiny", action="store_true", help="the whole path in seconds (hidden 64, 32-token prefill, "
                                                       "2 rounds, small ceilings): a smoke test, not a measurement")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(bd.DTYPES),
                   help="dtypes to time (parity is always checked in fp32 first)")
    bd.add_timing_args(p, repeats=5, max_repeats=10)
    p.add_argument("--prefill-len", type=int, default=512, help="tokens of the timed prefill")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt before the timed decode steps")
    p.add_argument("--decode-steps", type=int, default=32, help="timed single-token decode steps")
    p.add_argument("--copy-mib", type=int, default=512, help="size of the tensor copied for the bandwidth ceiling")
    p.add_argument("--gemm-size", type=int, default=2048, help="square GEMM for the compute ceiling")
    p.add_argument("--out", type=Path, help="write the Markdown here and the raw numbers to the same name with .json")
    p.add_argument("--note", default="", help="a line added to the header (e.g. 'other jobs running')")
    p.add_argument("--render", type=Path, metavar="JSON", help="only re-render a saved run's Markdown")
    args = p.parse_args(argv)
    if args.tiny:
        defaults = {a.dest: a.default for a in p._actions}
        for k, v in TINY.items():  # tiny values, unless given on the command line
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
    if args.repeats < 1 or args.decode_steps < 1:
        p.error("--repeats and --decode-steps must be >= 1")
    args.max_repeats = max(args.max_repeats, args.repeats)
    return args


def write(results: dict[str, Any], args: argparse.Namespace) -> None:
    bd.write_results(args, results, markdown(results, args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bd.render_saved(args, markdown):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    bd.clock = time.process_time if args.clock == "cpu" else time.perf_counter  # read by bench_dense's timers
    import transformers

    transformers.logging.set_verbosity_error()
    run: dict[str, Any] = {}
    results: dict[str, Any] = {"machine": bd.machine_info(args),
                               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "run": run}
    bd.log(f"machine: {results['machine']['cpu']}, {results['machine']['torch_threads']} threads, "
           f"load {results['machine']['loadavg_start']}")
    results["release_sizes"] = release_sizes()
    rc = 0
    try:
        full, cut = build_and_gate(args, run)
        run["sizes"] = {"full": sizes(full), "cut": sizes(cut)}
        works = {"full": work(full, args), "cut": work(cut, args)}
        run["work"] = works
        bd.log("measuring ceilings (copy bandwidth, GEMM)")
        ceiling_runs = bd.measure_ceilings(args)
        run["dtypes"] = {}
        for dtype in args.dtypes:
            f, c = (copy.deepcopy(m).to(bd.DTYPES[dtype]) for m in (full, cut))
            bd.log(f"timing {dtype}")
            run["dtypes"][dtype] = {"raw": (raw := time_full_and_cut(f, c, args))}
            p = [min(raw[w]["prefill_s"]) * 1e3 for w in ("full", "cut")]
            d = [min(raw[w]["decode_s_per_token"]) * 1e3 for w in ("full", "cut")]
            bd.log(f"{dtype}: prefill {p[0]:.1f} / {p[1]:.1f} ms (cut/full {p[1] / p[0]:.2f}), decode {d[0]:.2f} / "
                   f"{d[1]:.2f} ms/token (cut/full {d[1] / d[0]:.2f})  [full / cut]")
            del f, c
            gc.collect()
        bd.log("measuring ceilings again (the best of all their runs is used)")
        for k, more in bd.measure_ceilings(args).items():
            ceiling_runs[k] += more
        results["ceilings"] = bd.ceilings(ceiling_runs, args)
        bd.log_ceilings(results["ceilings"], args)
        for dtype, s in run["dtypes"].items():
            s.update(summarise(s["raw"], works, results["ceilings"], dtype))
    except Exception as err:  # noqa: BLE001 - the sizes and the reason still go to the report
        run["error"] = f"{type(err).__name__}: {err}"
        bd.log(f"!!!!! ABORTED: {run['error']}")
        traceback.print_exc()
        rc = 1
    results["machine"]["loadavg_end"] = bd.loadavg()
    results["wall_s"] = time.perf_counter() - bd.T0
    write(results, args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
