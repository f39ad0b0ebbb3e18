"""Side-by-side speed of hf_archs' dense decoders and transformers' own classes, on the same weights.

For every dense architecture with a case in tests/ (tests/cases.py and tests/case_<name>.py), the case's tiny
official config.json is scaled to one benchmark shape (hidden 512, 4 layers, vocab 32000, intermediate 1536, 8 heads,
4 KV heads, head_dim 64; layer pattern and windows kept), transformers' reference is built with the case's own
builder, our model is built from the same config.json through `hf_archs.config_from_official` and loaded strictly
with the reference's state_dict. Logits must agree (fp32, max relative diff <= 1e-4) before anything is timed.

Measured in one process, both models interleaved (ref, ours, ours, ref, ...), min over repeats after warm-up
(repeats added while a best time is not reproduced or was taken while other processes used the CPUs),
`torch.inference_mode`, the same attention implementation (sdpa) for both:
  prefill  one forward over 1 x 512 tokens with a fresh DynamicCache and logits_to_keep=1 (as generate's first step)
  decode   `generate` (greedy, DynamicCache) after a 64-token prompt: a logits processor stamps the clock once per
           generated token, so the N single-token steps are timed on their own (prefill excluded)
The machine's ceilings (copy bandwidth, fp32 / bf16 GEMM) are measured in the same run and every time is also
given as a fraction of its roofline. Progress goes to stderr; the Markdown table to stdout (and --out).

    python bench/bench_dense.py                          # every dense case, fp32 and bf16
    python bench/bench_dense.py --arch qwen3 --repeats 5 --dtypes fp32
    python bench/bench_dense.py --out bench/results/cpu-2core.md   # also writes cpu-2core.json
    python bench/bench_dense.py --clock cpu --threads 1  # ratios that hold on a loaded, shared machine
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(ROOT))  # this checkout's hf_archs, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARITY_TOL = 1e-4
T0 = time.perf_counter()
# The clock of every timed run: wall time by default; `--clock cpu` uses this process's CPU time instead, which a
# neighbour's load barely moves (use it with --threads 1 on a shared machine).
clock = time.perf_counter


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# Machine information
# --------------------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))]
    except OSError:
        pass
    return []


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip() or "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    import hf_archs

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_archs": hf_archs.__version__,
        "git": git_revision(),
        "loadavg_start": loadavg(),
    }


# --------------------------------------------------------------------------------------------------------------
# Repeating under load
# --------------------------------------------------------------------------------------------------------------

def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks used by this process), from /proc; (0, 0) where there is none."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0, 0


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
QUIET = 0.10  # a run is quiet when other processes (and the hypervisor's steal) used <= 10 % of the CPUs


def others_share(before: tuple[int, int], after: tuple[int, int], wall: float) -> float:
    """Fraction of the machine's CPU time that other processes used during a run. The counters tick every 10 ms,
    so one tick is forgiven (a short run would otherwise read as busy from a single stray tick)."""
    others = (after[0] - before[0]) - (after[1] - before[1]) - 1
    return min(1.0, max(0.0, others / _HZ / (wall * (os.cpu_count() or 1))))


def confirmed(times: list[float], tol: float) -> bool:
    """The minimum was reproduced: the second-best time is within `tol` of the best."""
    best = sorted(times)[:2]
    return len(best) == 2 and best[1] <= best[0] * (1 + tol)


def trustworthy(runs: list[tuple[float, float, Any]], tol: float) -> bool:
    """Best time reproduced within `tol`, and (wall clock) measured while the machine was quiet."""
    best = min(runs, key=lambda r: r[0])
    quiet = clock is not time.perf_counter or best[1] <= QUIET
    return confirmed([t for t, _, _ in runs], tol) and quiet


def rounds(fns: dict[str, Any], args: argparse.Namespace, min_rounds: int | None = None,
           budget: float | None = None) -> dict[str, list]:
    """Run each `fns[name]()` -> (seconds, extra) once per round, the order reversed every other round (ref, ours,
    ours, ref, ...) so none always runs right after another. Returns name -> [(seconds, others' CPU share, extra)].

    At least `min_rounds` (default `--repeats`) rounds; more, up to `--max-repeats` rounds or `budget` seconds
    (default `--budget`), while some best time is not reproduced within `--stable` or (wall clock) was measured
    while other processes were busy: on a shared machine a neighbour's burst can slow every run several-fold.
    """
    min_rounds = args.repeats if min_rounds is None else min_rounds
    budget = args.budget if budget is None else budget
    runs: dict[str, list] = {name: [] for name in fns}
    orders = [list(fns.items()), list(fns.items())[::-1]]
    start, i = time.perf_counter(), 0
    while True:
        for name, fn in orders[i % 2]:
            before, t = _cpu_ticks(), time.perf_counter()
            seconds, extra = fn()
            wall = time.perf_counter() - t
            runs[name].append((seconds, others_share(before, _cpu_ticks(), wall), extra))
        i += 1
        if i >= min_rounds and (i >= args.max_repeats or time.perf_counter() - start > budget
                                or all(trustworthy(r, args.stable) for r in runs.values())):
            return runs


def measure_ceilings(args: argparse.Namespace, min_rounds: int = 5, budget: float | None = None) -> dict[str, list]:
    """Copy bandwidth (read + write bytes / time) and GEMM throughput: the rooflines every figure is set against.

    Returns name -> [(seconds, others' CPU share, None)]; `ceilings()` turns them into rates. Run at the start,
    between architectures and at the end, and the best of all runs is used, so that a burst of load does not lower
    a ceiling.
    """
    n = args.copy_mib * 2**20 // 4
    x = torch.randn(n)
    y = torch.empty_like(x)
    s = args.gemm_size
    mats = {d: (torch.randn(s, s).to(DTYPES[d]), torch.randn(s, s).to(DTYPES[d])) for d in args.dtypes}

    def timed(fn):
        def run():
            t = clock()
            fn()
            return clock() - t, None
        return run

    fns = {"copy": timed(lambda: y.copy_(x))}
    for d, (a, b) in mats.items():
        fns[f"gemm_{d}"] = timed(lambda a=a, b=b: a @ b)
    for fn in fns.values():  # warm-up: first touch of the pages, oneDNN / AMX initialisation
        fn(), fn()
    return rounds(fns, args, min_rounds=min_rounds, budget=budget)


def ceilings(runs: dict[str, list], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, r in runs.items():
        best = min(t for t, _, _ in r)
        entry: dict[str, Any] = {"times_s": [t for t, _, _ in r], "others_cpu_share": [o for _, o, _ in r],
                                 "trusted": trustworthy(r, args.stable)}
        if name == "copy":
            entry.update(bytes=2 * args.copy_mib * 2**20, gbps=2 * args.copy_mib * 2**20 / best / 1e9)
        else:
            entry.update(shape=[args.gemm_size] * 3, gflops=2 * args.gemm_size**3 / best / 1e9)
        out[name] = entry
    return out


# --------------------------------------------------------------------------------------------------------------
# Cases and the benchmark shape
# --------------------------------------------------------------------------------------------------------------

def load_cases() -> list:
    sys.path.insert(0, str(TESTS))
    try:
        import cases
    except Exception:  # noqa: BLE001 - a broken case file must not hide the reason
        log("ERROR: importing tests/cases.py failed (a tests/case_<name>.py may be broken):")
        traceback.print_exc()
        raise SystemExit(2)
    return cases.CASES


def _text_part(official: dict[str, Any], arch) -> tuple[dict[str, Any], str | None]:
    key = getattr(arch, "text_config_key", None) or ("text_config" if isinstance(official.get("text_config"), dict)
                                                     else None)
    if key and isinstance(official.get(key), dict):
        return official[key], key
    return official, None


def _resize_layers(value: list, n: int) -> list:
    return [value[i % len(value)] for i in range(n)]


def scale_official(official: dict[str, Any], arch, args: argparse.Namespace, layers: int) -> dict[str, Any]:
    """The case's config.json at the benchmark shape: sizes replaced, layer pattern and windows kept."""
    official = copy.deepcopy(official)
    text, _ = _text_part(official, arch)
    tiny_layers = text["num_hidden_layers"]
    tiny_heads = text["num_attention_heads"]
    tiny_kv = text.get("num_key_value_heads") or tiny_heads
    tiny_head_dim = text.get("head_dim") or text["hidden_size"] // tiny_heads
    heads = args.heads
    kv = max(1, heads * tiny_kv // tiny_heads)  # keep the case's GQA ratio (MHA stays MHA)
    tiny_hidden, tiny_vocab = text["hidden_size"], text["vocab_size"]
    text.update(hidden_size=args.hidden, num_hidden_layers=layers, vocab_size=args.vocab, num_attention_heads=heads)
    if "num_key_value_heads" in text:
        text["num_key_value_heads"] = kv
    if isinstance(text.get("intermediate_size"), list):  # per-layer widths (Gemma 3n): scaled with hidden_size
        text["intermediate_size"] = [w * args.hidden // tiny_hidden for w in text["intermediate_size"]]
    else:
        text["intermediate_size"] = args.intermediate
    if text.get("hidden_size_per_layer_input"):  # Gemma 3n's per-layer inputs: scaled with hidden_size
        text["hidden_size_per_layer_input"] = text["hidden_size_per_layer_input"] * args.hidden // tiny_hidden
    if text.get("vocab_size_per_layer_input"):  # Gemma 3n: the text ids; the rest of the vocabulary is multimodal
        text["vocab_size_per_layer_input"] = args.vocab - (tiny_vocab - text["vocab_size_per_layer_input"])
    if "head_dim" in text or args.hidden // heads != args.head_dim:
        text["head_dim"] = args.head_dim
    if text.get("query_pre_attn_scalar"):  # Gemma's attention scale 1/sqrt(qpas): scaled with head_dim
        text["query_pre_attn_scalar"] = text["query_pre_attn_scalar"] * args.head_dim // tiny_head_dim
    needed = args.prefill_len + args.prompt_len + args.decode_steps + 8
    if (text.get("max_position_embeddings") or 0) < needed:
        text["max_position_embeddings"] = max(4096, needed)
    if layers != tiny_layers:
        for key, value in list(text.items()):  # per-layer lists (layer_types, no_rope_layers, ...)
            if isinstance(value, list) and len(value) == tiny_layers and key not in ("eos_token_id",):
                text[key] = _resize_layers(value, layers)
        if isinstance(text.get("max_window_layers"), int):
            text["max_window_layers"] = round(text["max_window_layers"] * layers / tiny_layers)
    if args.window is not None:
        for key in ("sliding_window", "attention_chunk_size"):
            if text.get(key):
                text[key] = args.window
    return official


# Keys whose presence marks an architecture this dense benchmark does not cover (routed experts, latent attention,
# linear attention): their costs depend on shapes this script does not scale.
NOT_DENSE_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_intermediate_size", "experts_per_token",
                  "kv_lora_rank", "linear_num_value_heads", "linear_key_head_dim")


def not_dense_reason(case) -> str | None:
    text, _ = _text_part(case.official, None)
    found = [k for k in NOT_DENSE_KEYS if text.get(k)]
    return f"not a dense decoder ({', '.join(found)})" if found else None


def text_vocab(config) -> int:
    """Token ids drawn for the inputs stay below this: text tokens (Gemma 3n's last ids are multimodal)."""
    return min(config.vocab_size, getattr(config, "vocab_size_per_layer_input", None) or config.vocab_size)


def layer_plan(config) -> list[tuple[str, bool]]:
    """(layer type, uses RoPE) for each layer of one of our configs."""
    uses_rope = getattr(config, "layer_uses_rope", lambda i: True)
    return [(t, bool(uses_rope(i))) for i, t in enumerate(config.layer_types)]


def benchmark_config(case, arch, args: argparse.Namespace, scale=None, plan=None) -> tuple[dict[str, Any], Any, str]:
    """Scale to `--layers`; if that loses a layer kind of the case (a 4:1 pattern in 4 layers) or its config
    refuses that depth (KV sharing across the last 5 layers), keep the case's own depth.

    `scale(official, arch, args, layers)` (default `scale_official`) and `plan(config)` (default `layer_plan`, the
    kinds that must survive) let other benchmarks (bench_moe.py) scale more fields and check more kinds."""
    import hf_archs

    scale = scale or scale_official
    plan = plan or layer_plan
    tiny_plan = set(plan(hf_archs.config_from_official(case.official_config(), arch)))
    text, _ = _text_part(case.official, arch)
    why = ""
    for layers in dict.fromkeys([args.layers, text["num_hidden_layers"]]):
        official = scale(case.official_config(), arch, args, layers)
        try:
            config = hf_archs.config_from_official(official, arch)
        except Exception as err:  # noqa: BLE001 - retried at the case's own depth
            why = f"{type(err).__name__}: {err}"
            continue
        if set(plan(config)) == tiny_plan:
            note = "" if layers == args.layers else f"{layers} layers (the case's depth) instead of {args.layers}: " \
                + (why or "fewer would drop a layer kind of its pattern")
            return official, config, note
        why = "fewer would drop a layer kind of its pattern"
    raise RuntimeError(f"{case.name}: no depth keeps the case's layer pattern {sorted(tiny_plan)} ({why})")


def describe_layers(config) -> str:
    short = {"full_attention": "F", "sliding_attention": "S", "chunked_attention": "C"}
    return "".join(short.get(t, "?") if rope else short.get(t, "?").lower() for t, rope in layer_plan(config))


# --------------------------------------------------------------------------------------------------------------
# Building the pair
# --------------------------------------------------------------------------------------------------------------

def load_into_ours(ours: nn.Module, ref: nn.Module, arch, to_ours=None) -> None:
    """Strict load of the reference's state_dict (passed through `to_ours(state)` if given); through the registry's
    renames only if the keys differ."""
    from hf_archs.official import map_name

    state = ref.state_dict() if to_ours is None else to_ours(ref.state_dict())
    try:
        ours.load_state_dict(state, strict=True)
        return
    except RuntimeError as direct_err:
        mapped = {}
        for key, value in state.items():
            new = map_name(arch, key)
            if new is not None:
                mapped[new] = value
        try:
            ours.load_state_dict(mapped, strict=True)
            log(f"  loaded through the registry's key_renames / skip_keys ({len(state) - len(mapped)} skipped)")
        except RuntimeError:
            raise direct_err from None


def build_pair(case, arch, official: dict[str, Any], config, attn: str, to_ours=None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = case.reference(copy.deepcopy(official))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms (and biases) away from their init values, so that they count in the check
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))
    ours = arch.causal_lm_class(config)
    load_into_ours(ours, ref, arch, to_ours)
    for m in (ref, ours):
        m.set_attn_implementation(attn)
        m.eval()
    return ref, ours


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_parity(ref: nn.Module, ours: nn.Module, ids: torch.Tensor, prompt_len: int) -> dict[str, float]:
    """Full-sequence logits, then cached decoding (prompt + 4 greedy steps fed the same tokens to both)."""
    with torch.inference_mode():
        full = max_rel_diff(ours(ids).logits, ref(ids).logits)
        out_r = ref(ids[:, :prompt_len], use_cache=True)
        out_o = ours(ids[:, :prompt_len], use_cache=True)
        steps = [max_rel_diff(out_o.logits, out_r.logits)]
        cache_r, cache_o = out_r.cache, out_o.cache
        for _ in range(4):
            tok = out_r.logits[:, -1:].argmax(-1)
            out_r = ref(tok, cache=cache_r, use_cache=True)
            out_o = ours(tok, cache=cache_o, use_cache=True)
            cache_r, cache_o = out_r.cache, out_o.cache
            steps.append(max_rel_diff(out_o.logits, out_r.logits))
    return {"full_logits": full, "cached_decode": max(steps)}


# --------------------------------------------------------------------------------------------------------------
# FLOPs and bytes: the rooflines
# --------------------------------------------------------------------------------------------------------------

def linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def attended_pairs(config, layer_idx: int, q_positions: range) -> int:
    """(query, key) pairs a causal layer must compute for queries at `q_positions` (keys 0..q)."""
    kind = config.layer_types[layer_idx]
    total = 0
    for q in q_positions:
        if kind == "sliding_attention" and getattr(config, "sliding_window", None):
            total += min(q + 1, config.sliding_window)
        elif kind == "chunked_attention" and getattr(config, "attention_chunk_size", None):
            total += q % config.attention_chunk_size + 1
        else:
            total += q + 1
    return total


def decode_context(config, args: argparse.Namespace, layer: int) -> float:
    """Tokens layer `layer` attends at the mean context of a timed decode step: the window or chunk bounds it."""
    ctx = args.prompt_len + (args.decode_steps + 1) / 2
    kind = config.layer_types[layer]
    if kind == "sliding_attention" and getattr(config, "sliding_window", None):
        ctx = min(ctx, config.sliding_window)
    if kind == "chunked_attention" and getattr(config, "attention_chunk_size", None):
        ctx = min(ctx, config.attention_chunk_size)
    return ctx


def roofline_model(ours: nn.Module, config, args: argparse.Namespace) -> dict[str, Any]:
    """Useful work per measurement: prefill FLOPs and bytes read per decode step (per element size 1)."""
    decoder = linear_params(ours.model)
    head = ours.lm_head.weight.numel()
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    T = args.prefill_len
    attn_pairs = sum(attended_pairs(config, i, range(T)) for i in range(config.num_hidden_layers))
    # 2 FLOPs per multiply-add; the head runs on one position only (logits_to_keep=1); QK^T and PV: 2 * 2 * d per pair.
    prefill_flops = 2 * decoder * T + 2 * head + 4 * heads * hd * attn_pairs
    # Decode: every linear weight once per token (the head included), plus the KV cache at the mean context.
    kv_elems = sum(2 * kv_heads * hd * decode_context(config, args, i) for i in range(config.num_hidden_layers))
    return {"decoder_linear_params": decoder, "lm_head_params": head,
            "embedding_params": ours.model.embed_tokens.weight.numel(), "attention_pairs_prefill": attn_pairs,
            "prefill_flops": prefill_flops, "decode_weight_elems": decoder + head, "decode_kv_elems": kv_elems}


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------

def make_stamper():
    from transformers.generation import LogitsProcessor

    class Stamp(LogitsProcessor):
        """Records the clock each time a token's scores are ready (appended last, so one call per loop turn)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(clock())
            return scores

    return Stamp()


def run_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    t = clock()
    model(ids, use_cache=True, logits_to_keep=1)  # the model makes its DynamicCache, as generate's first step does
    return clock() - t


def run_decode(model: nn.Module, prompt: torch.Tensor, steps: int, gen_config) -> tuple[float, float, torch.Tensor]:
    """(prompt step seconds, seconds per decode step, generated ids) of one greedy generate call."""
    from transformers.generation import LogitsProcessorList

    stamp = make_stamper()
    t = clock()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_config,
                         logits_processor=LogitsProcessorList([stamp]))
    if len(stamp.times) != steps + 1:
        raise RuntimeError(f"expected {steps + 1} generation steps, got {len(stamp.times)}")
    return stamp.times[0] - t, (stamp.times[-1] - stamp.times[0]) / steps, out


def time_pair(ref: nn.Module, ours: nn.Module, config, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import GenerationConfig

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, text_vocab(config), (1, args.prefill_len), generator=gen)
    prompt = torch.randint(3, text_vocab(config), (1, args.prompt_len), generator=gen)
    # max_new_tokens = steps + 1: the prompt's forward yields the first token, then `steps` single-token steps.
    gen_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=args.decode_steps + 1,
                                  min_new_tokens=args.decode_steps + 1, pad_token_id=0,
                                  eos_token_id=None, use_cache=True)
    models = {"transformers": ref, "ours": ours}

    def prefill(m):
        return lambda: (run_prefill(m, ids), None)

    def decode(m):
        def run():
            prompt_s, per_token, out = run_decode(m, prompt, args.decode_steps, gen_config)
            return per_token, (prompt_s, out)
        return run

    with torch.inference_mode():
        for _ in range(args.warmup):
            for m in models.values():
                prefill(m)()
                decode(m)()
        pre = rounds({name: prefill(m) for name, m in models.items()}, args)
        dec = rounds({name: decode(m) for name, m in models.items()}, args)
    raw: dict[str, Any] = {}
    for name in models:
        raw[name] = {"prefill_s": [t for t, _, _ in pre[name]],
                     "prefill_others_cpu_share": [o for _, o, _ in pre[name]],
                     "prefill_trusted": trustworthy(pre[name], args.stable),
                     "decode_s_per_token": [t for t, _, _ in dec[name]],
                     "decode_others_cpu_share": [o for _, o, _ in dec[name]],
                     "decode_trusted": trustworthy(dec[name], args.stable),
                     "prompt_s": [extra[0] for _, _, extra in dec[name]]}
    raw["greedy_tokens_equal"] = bool(torch.equal(dec["transformers"][-1][2][1], dec["ours"][-1][2][1]))
    # Per round, both models ran back to back: the median of the per-round ratios is a second, load-robust
    # estimate of the ratio (compare it with the ratio of minima).
    for phase, runs in (("prefill", pre), ("decode", dec)):
        pairs = [a[0] / b[0] for a, b in zip(runs["transformers"], runs["ours"])]
        raw[f"{phase}_paired_ratio_median"] = statistics.median(pairs)
    return raw


def gate_and_time(name: str, ref: nn.Module, ours: nn.Module, config, args: argparse.Namespace,
                  entry: dict[str, Any]) -> None:
    """The fp32 parity gate (a failure names the first diverging layer and nothing is timed), then for each dtype
    the informational agreement, the interleaved timings (`time_pair`) and, with --profile, the profiler tables;
    all recorded in `entry`."""
    gen = torch.Generator().manual_seed(3)
    check_ids = torch.randint(3, text_vocab(config), (1, args.prefill_len), generator=gen)
    entry["parity_fp32"] = parity = check_parity(ref, ours, check_ids, args.prompt_len)
    log(f"{name}: fp32 parity {parity}")
    if max(parity.values()) > PARITY_TOL:
        from helpers import first_divergence

        with torch.inference_mode():
            where = first_divergence(ours, ref, check_ids[:, :64], tol=PARITY_TOL)
        raise RuntimeError(f"PARITY FAILED: ours and transformers differ (max rel diff "
                           f"{max(parity.values()):.2e} > {PARITY_TOL:g}); {where}. Not timed.")
    entry["parity"], entry["dtypes"], entry["profile"] = {}, {}, {}
    for dtype in args.dtypes:
        r, o = (copy.deepcopy(m).to(DTYPES[dtype]) for m in (ref, ours))
        if dtype != "fp32":
            entry["parity"][dtype] = check_parity(r, o, check_ids, args.prompt_len)
            log(f"{name}: {dtype} agreement (informational) {entry['parity'][dtype]}")
        log(f"{name}: timing {dtype}")
        entry["dtypes"][dtype] = {"raw": (raw := time_pair(r, o, config, args))}
        p = [min(raw[w]["prefill_s"]) * 1e3 for w in ("transformers", "ours")]
        d = [min(raw[w]["decode_s_per_token"]) * 1e3 for w in ("transformers", "ours")]
        log(f"{name} {dtype}: prefill {p[0]:.1f} / {p[1]:.1f} ms ({p[0] / p[1]:.2f}x), decode "
            f"{d[0]:.2f} / {d[1]:.2f} ms/token ({d[0] / d[1]:.2f}x)  [transformers / ours]")
        if args.profile:
            for label, m in (("transformers", r), ("ours", o)):
                table = profile_decode(m, config, args)
                entry["profile"][f"{dtype}/{label}"] = table
                print(f"\n=== {name} {dtype} {label}: 8 decode steps ===\n{table}", file=sys.stderr)
        del r, o
        gc.collect()


def profile_decode(model: nn.Module, config, args: argparse.Namespace, steps: int = 8) -> str:
    """torch.profiler table of `steps` single-token forwards after a prompt (per-step averages in the total)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, text_vocab(config), (1, args.prompt_len), generator=gen)
    with torch.inference_mode():
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(2):  # warm
            out = model(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                out = model(tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

def log_ceilings(c: dict[str, Any], args: argparse.Namespace) -> None:
    log("ceilings: copy {:.1f} GB/s; ".format(c["copy"]["gbps"]) + ", ".join(
        f"{d} GEMM {c[f'gemm_{d}']['gflops']:.0f} GFLOP/s" for d in args.dtypes))


def summarise(raw: dict[str, Any], work: dict[str, Any], ceilings: dict[str, Any], dtype: str) -> dict[str, Any]:
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    gemm = ceilings[f"gemm_{dtype}"]["gflops"] * 1e9
    bw = ceilings["copy"]["gbps"] * 1e9
    floor_prefill = work["prefill_flops"] / gemm
    floor_decode = (work["decode_weight_elems"] + work["decode_kv_elems"]) * elem / bw
    s: dict[str, Any] = {"prefill_floor_s": floor_prefill, "decode_floor_s": floor_decode}
    for name in ("transformers", "ours"):
        p, d = min(raw[name]["prefill_s"]), min(raw[name]["decode_s_per_token"])
        s[name] = {"prefill_s": p, "prefill_median_s": statistics.median(raw[name]["prefill_s"]),
                   "decode_s": d, "decode_median_s": statistics.median(raw[name]["decode_s_per_token"]),
                   "prefill_gflops": work["prefill_flops"] / p / 1e9,
                   "prefill_roofline": floor_prefill / p, "decode_roofline": floor_decode / d}
    s["prefill_ratio"] = s["transformers"]["prefill_s"] / s["ours"]["prefill_s"]
    s["decode_ratio"] = s["transformers"]["decode_s"] / s["ours"]["decode_s"]
    s["prefill_paired_ratio_median"] = raw["prefill_paired_ratio_median"]
    s["decode_paired_ratio_median"] = raw["decode_paired_ratio_median"]
    return s


def load_line(shares: list[float]) -> str:
    """The table-header line on other processes' share of the CPUs during the timed runs."""
    return (f"- Load from other processes during the {len(shares)} timed runs: median {statistics.median(shares):.0%} "
            f"of the CPUs, max {max(shares):.0%}; {sum(x <= QUIET for x in shares) / len(shares):.0%} of runs quiet "
            f"(<= {QUIET:.0%}).")


def _star(entry: dict[str, Any]) -> str:
    return "" if entry["trusted"] else "*"


def markdown(results: dict[str, Any], args: argparse.Namespace, title: str = "dense decoders",
             shape: str | None = None) -> str:
    """The table; `title` and `shape` (the shape line of the header) let other benchmarks reuse it."""
    m, c = results["machine"], results["ceilings"]
    gemm = ", ".join(f"{d} {c[f'gemm_{d}']['gflops']:.0f}{_star(c[f'gemm_{d}'])} GFLOP/s" for d in args.dtypes)
    flags = " ".join(m["cpu_flags"]) or "no AVX-512 / AMX flags"
    more = " or was measured under load" if args.clock == "wall" else ""
    if args.clock == "wall":
        clock_line = "- Clock: wall time."
    else:
        clock_line = (f"- Clock: this process's CPU time (`--clock cpu`, summed over its {m['torch_threads']} torch "
                      "thread(s)), not wall time: robust to other processes' load; ceilings measured the same way, "
                      "so roofline % are per CPU-second.")
    lines = [
        f"# hf_archs vs transformers: {title}",
        "",
        (f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch thread(s) ({flags}); "
         f"load average {m['loadavg_start']} at the start, {m.get('loadavg_end', 'n/a')} at the end."),
        (f"- Software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
         f"hf_archs {m['hf_archs']} (git {m['git']}); {m['date']}."),
        (f"- Ceilings (same run, best of the runs at its start, between architectures and at its end): "
         f"copy {c['copy']['gbps']:.1f}"
         f"{_star(c['copy'])} GB/s (read + write of a {args.copy_mib} MiB fp32 tensor); "
         f"GEMM {args.gemm_size}^3: {gemm}."),
        shape or (f"- Shape: hidden {args.hidden}, {args.layers} layers (unless noted), vocab {args.vocab}, "
                  f"intermediate {args.intermediate}, {args.heads} heads, head_dim {args.head_dim}, KV heads in the "
                  f"case's ratio; layer pattern and windows of each case kept. Attention: {args.attn} for both."),
        (f"- Prefill: 1 x {args.prefill_len} tokens, logits_to_keep=1. Decode: greedy `generate`, "
         f"{args.prompt_len}-token prompt, {args.decode_steps} single-token steps timed (prompt excluded), "
         f"DynamicCache. Min of >= {args.repeats} interleaved repeats after {args.warmup} warm-up (more, up to "
         f"{args.max_repeats} or {args.budget:.0f} s, while a best time is not reproduced within "
         f"{args.stable:.0%}{more})."),
        clock_line,
        ("- ratio = transformers / ours (> 1: ours faster). Roofline %: prefill = useful FLOPs / GEMM peak / time; "
         "decode = (weights + KV cache bytes per token) / copy bandwidth / time."),
    ]
    shares = [x for r in results["archs"].values() for s in r.get("dtypes", {}).values()
              for who in ("transformers", "ours") for phase in ("prefill", "decode")
              for x in s["raw"][who][f"{phase}_others_cpu_share"]]
    if shares:
        lines.append(load_line(shares))
    if args.note:
        lines.append(f"- Note: {args.note}")
    lines += [
        "",
        ("| arch | layers | dtype | prefill ms: transformers | ours | ratio | decode ms/token: transformers | ours "
         "| ratio | prefill % of GEMM peak (tf / ours) | decode % of BW roofline (tf / ours) | parity |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for arch, r in results["archs"].items():
        if "skipped" in r:
            lines.append(f"| {arch} | | | | | | | | | | | skipped: {r['skipped']} |")
            continue
        if "error" in r:
            lines.append(f"| {arch} | | | | | | | | | | | **{r['error'].splitlines()[0][:120]}** |")
            continue
        for dtype, s in r["dtypes"].items():
            t, o = s["transformers"], s["ours"]
            par = r["parity_fp32"] if dtype == "fp32" else r["parity"].get(dtype, {})
            par_s = f"{max(par.values()):.1e}" if par else ""
            if dtype == "fp32" and not s["raw"]["greedy_tokens_equal"]:
                par_s += " (greedy tokens differ)"
            def ms(who: str, phase: str, digits: int, s: dict[str, Any] = s) -> str:
                star = "" if s["raw"][who][f"{phase}_trusted"] else "*"
                return f"{s[who][f'{phase}_s'] * 1e3:.{digits}f}{star}"

            lines.append(
                f"| {arch} | {r['layers']} | {dtype} "
                f"| {ms('transformers', 'prefill', 1)} | {ms('ours', 'prefill', 1)} "
                f"| {s['prefill_ratio']:.2f}x ({s['prefill_paired_ratio_median']:.2f}) "
                f"| {ms('transformers', 'decode', 2)} | {ms('ours', 'decode', 2)} "
                f"| {s['decode_ratio']:.2f}x ({s['decode_paired_ratio_median']:.2f}) "
                f"| {t['prefill_roofline']:.0%} / {o['prefill_roofline']:.0%} "
                f"| {t['decode_roofline']:.0%} / {o['decode_roofline']:.0%} | {par_s} |")
    under_load = (f" or not measured while other processes used <= {QUIET:.0%} of the CPUs"
                  if args.clock == "wall" else "")
    lines += ["", ("layers: F full, S sliding, C chunked attention; lower case = NoPE (no rotary). "
                   f"* = best time not reproduced within {args.stable:.0%}{under_load} (treat as noisy). "
                   "ratio (x): of the minima; in brackets the median of the per-round ratios (both models ran back "
                   "to back), a second estimate robust to load. parity: max relative logits difference ours vs "
                   "transformers on the same weights (full sequence and cached decoding).")]
    notes = [f"- {a}: {r['note']}" for a, r in results["archs"].items() if r.get("note")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except where there is none to show or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, "") or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_timing_args(p: argparse.ArgumentParser, repeats: int, max_repeats: int, budget: float = 60.0) -> None:
    """The timing options every benchmark here shares (the repeat rules of `rounds`, threads, clock, attention)."""
    p.add_argument("--repeats", type=int, default=repeats, help="least timed repeats per measurement (the min is "
                                                                "reported)")
    p.add_argument("--max-repeats", type=int, default=max_repeats,
                   help="upper bound on repeats while a best time is not reproduced or was measured under load")
    p.add_argument("--stable", type=float, default=0.05, help="a minimum counts as reproduced when the second-best "
                                                              "time is within this fraction of it")
    p.add_argument("--budget", type=float, default=budget, help="seconds after which a measurement stops adding "
                                                                "repeats beyond --repeats")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each measurement per model first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's own choice, usually all cores)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (all threads), robust to other processes' "
                        "load on a shared machine, best with --threads 1 (default: wall)")
    p.add_argument("--attn", default="sdpa", help="attention implementation of every model")


def render_saved(args: argparse.Namespace, markdown) -> bool:
    """`--render JSON`: print (and write to `--out`) the table of a saved run; False when not asked to."""
    if not args.render:
        return False
    results = json.loads(args.render.read_text())
    table = markdown(results, argparse.Namespace(**{**vars(args), **results["args"]}))
    if args.out:
        args.out.write_text(table)
    print(table)
    return True


def finish_ceilings(results: dict[str, Any], ceiling_runs: dict[str, list], args: argparse.Namespace) -> None:
    """Measure the ceilings once more, keep the best of all their runs, and fill in every timed entry's roofline
    fractions and the end-of-run load."""
    log("measuring ceilings again (the best of all their runs is used)")
    for k, runs in measure_ceilings(args).items():
        ceiling_runs[k] += runs
    results["ceilings"] = final = ceilings(ceiling_runs, args)
    log_ceilings(final, args)
    for entry in results["archs"].values():
        for dtype, s in entry.get("dtypes", {}).items():
            s.update(summarise(s["raw"], entry["work"], final, dtype))
    results["machine"]["loadavg_end"] = loadavg()


def write_results(args: argparse.Namespace, results: dict[str, Any], table: str) -> None:
    """Print the table; with `--out`, write it and the raw numbers beside it (.json)."""
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        json_path = args.out.with_suffix(".json") if args.out.suffix == ".md" else Path(str(args.out) + ".json")
        json_path.write_text(json.dumps(results, indent=1, default=str))
        log(f"wrote {args.out} and {json_path}")


def record_abort(label: str, err: Exception, entry: dict[str, Any], failed: list[str]) -> None:
    """One architecture failed: log it with its traceback, keep the error in its entry, count it as failed."""
    msg = f"{type(err).__name__}: {err}"
    log(f"!!!!! {label}: ABORTED: {msg}")
    traceback.print_exc()
    entry["error"] = msg
    failed.append(label)


def finish_run(args: argparse.Namespace, results: dict[str, Any], ceiling_runs: dict[str, list], markdown,
               failed: list[str]) -> int:
    """The end of a table benchmark: last ceilings, the table and raw numbers written, the exit status (1 when an
    architecture or section failed)."""
    finish_ceilings(results, ceiling_runs, args)
    results["wall_s"] = time.perf_counter() - T0
    write_results(args, results, markdown(results, args))
    log(f"total {results['wall_s']:.0f} s")
    if failed:
        log(f"FAILED: {failed}")
        return 1
    return 0


def parse_args(argv: list[str] | None = None, extend=None) -> argparse.Namespace:
    """The options; `extend(parser)` (other benchmarks: bench_moe.py) may add options and change the texts and
    defaults before parsing."""
    p = argparse.ArgumentParser(
        description="Benchmark hf_archs' dense decoders against transformers' own classes (same weights, same\n"
                    "process, interleaved): 1x512 prefill and greedy decode ms/token, fp32 and bf16, with the\n"
                    "machine's copy-bandwidth and GEMM ceilings and each time's roofline fraction.",
        epilog="Example: python bench/bench_dense.py --arch qwen3 --dtypes fp32 --repeats 5\n"
               "See bench/README.md for what is measured and how to read the ratios.",
        formatter_class=_HelpFormatter)
    p.add_argument("--arch", nargs="+", metavar="NAME",
                   help="architectures to run (default: every dense case in tests/; those hf_archs does not register "
                        "yet are listed as skipped)")
    p.add_argument("--list", action="store_true",
                   help="list the cases, whether hf_archs registers each and whether it is dense, then exit")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES),
                   help="dtypes to time (parity is always checked in fp32 first)")
    add_timing_args(p, repeats=7, max_repeats=25)
    g = p.add_argument_group("shape")
    g.add_argument("--hidden", type=int, default=512, help="hidden_size")
    g.add_argument("--layers", type=int, default=4, help="raised to the case's own depth if fewer would drop a "
                                                          "layer kind of its pattern")
    g.add_argument("--vocab", type=int, default=32000, help="vocab_size")
    g.add_argument("--intermediate", type=int, default=1536, help="intermediate_size (MLP width)")
    g.add_argument("--heads", type=int, default=8, help="num_attention_heads; KV heads keep the case's ratio")
    g.add_argument("--head-dim", type=int, default=64, help="head_dim")
    g.add_argument("--window", type=int, default=None, help="override sliding_window / attention_chunk_size "
                                                             "(default: keep the case's)")
    g.add_argument("--prefill-len", type=int, default=512, help="tokens of the timed prefill")
    g.add_argument("--prompt-len", type=int, default=64, help="prompt before the timed decode steps")
    g.add_argument("--decode-steps", type=int, default=32, help="timed single-token decode steps")
    g = p.add_argument_group("ceilings")
    g.add_argument("--copy-mib", type=int, default=512, help="size of the tensor copied for the bandwidth ceiling")
    g.add_argument("--gemm-size", type=int, default=2048, help="square GEMM for the compute ceiling")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="write the Markdown table here and the raw numbers to the same name "
                                            "with .json")
    g.add_argument("--note", default="", help="a line added to the table's header (e.g. 'other jobs running')")
    g.add_argument("--render", type=Path, metavar="JSON",
                   help="only re-render the Markdown table of a saved run's JSON (to stdout, and to --out)")
    g.add_argument("--profile", action="store_true", help="also print a torch.profiler table of decode steps of "
                                                           "both models (stderr and JSON)")
    g.add_argument("--profile-rows", type=int, default=20, help="rows of each profiler table")
    if extend is not None:
        extend(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.max_repeats = max(args.max_repeats, args.repeats)
    if args.decode_steps < 1:
        p.error("--decode-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    global clock
    args = parse_args(argv)
    if render_saved(args, markdown):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    import transformers

    import hf_archs

    transformers.logging.set_verbosity_error()
    cases = load_cases()
    if args.list:
        for c in cases:
            status = "no hf_archs class yet" if c.name not in hf_archs.ARCHITECTURES else "registered"
            print(f"{c.name:12s} {status}{'; ' + not_dense_reason(c) if not_dense_reason(c) else '; dense'}")
        return 0
    by_name = {c.name: c for c in cases}
    wanted = args.arch or [c.name for c in cases if not not_dense_reason(c)]
    unknown = [a for a in wanted if a not in by_name]
    if unknown:
        log(f"ERROR: no case for {unknown}; cases: {sorted(by_name)}")
        return 2
    refused = [f"{a}: {not_dense_reason(by_name[a])}" for a in wanted if not_dense_reason(by_name[a])]
    if refused:
        log(f"ERROR: this benchmark covers dense decoders only; {'; '.join(refused)}")
        return 2

    results: dict[str, Any] = {"machine": machine_info(args), "args": {k: str(v) if isinstance(v, Path) else v
                                                                       for k, v in vars(args).items()},
                               "archs": {}}
    log(f"machine: {results['machine']['cpu']}, {results['machine']['torch_threads']} threads, "
        f"load {results['machine']['loadavg_start']}")
    log("measuring ceilings (copy bandwidth, GEMM)")
    ceiling_runs = measure_ceilings(args)
    log_ceilings(ceilings(ceiling_runs, args), args)

    failed = []
    for n, name in enumerate(wanted):
        case = by_name[name]
        if n:  # again between architectures: one more chance of a quiet moment for the ceilings
            for k, runs in measure_ceilings(args, min_rounds=2, budget=0).items():
                ceiling_runs[k] += runs
        if name not in hf_archs.ARCHITECTURES:
            log(f"{name}: skipped, hf_archs registers no such architecture yet")
            results["archs"][name] = {"skipped": "not in hf_archs.ARCHITECTURES"}
            continue
        arch = hf_archs.ARCHITECTURES[name]
        entry: dict[str, Any] = {}
        results["archs"][name] = entry
        try:
            official, config, note = benchmark_config(case, arch, args)
            entry.update(note=note, layers=describe_layers(config), official=official)
            log(f"{name}: building both models ({entry['layers']}) ")
            ref, ours = build_pair(case, arch, official, config, args.attn)
            entry["params"] = sum(p.numel() for p in ours.parameters())
            entry["work"] = roofline_model(ours, config, args)
            gate_and_time(name, ref, ours, config, args, entry)
            del ref, ours
            gc.collect()
        except Exception as err:  # noqa: BLE001 - one broken architecture must not lose the others' numbers
            record_abort(name, err, entry, failed)

    return finish_run(args, results, ceiling_runs, markdown, failed)


if __name__ == "__main__":
    sys.exit(main())
