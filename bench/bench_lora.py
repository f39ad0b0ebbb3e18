"""LoRA training step of the `hf-archs finetune` recipe against transformers + PEFT defaults, same weights.

Baseline ("transformers + PEFT"): transformers' own `Qwen3ForCausalLM` with
`peft.get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))` and the step a
`Trainer` with default arguments runs: forward with `labels` (transformers' loss over full logits), backward,
gradient clipping at 1.0, `AdamW(fused=True)` (Trainer's `adamw_torch_fused`, lr 5e-5), zero_grad; bf16 = the
base cast to bf16 (PEFT keeps the adapters in fp32) under bf16 autocast, as `Trainer(bf16=True)`.

Ours: `hfa_qwen3` loaded strictly with the same weights, trained through the recipe's own functions
(`hf_archs.finetune`): `recipe_accelerator`, `prepare_model` (LoRA on `lora_targets`: the same 7 projections per
layer as "all-linear"), `LossModel` (the chunked, fused head + cross-entropy), `build_optimizers`, `optimizer_step`;
the recipe's defaults except the LoRA alpha (PEFT's default, 8, so that both compute the same numbers).

Before timing (fp32): the loss and every LoRA gradient of one step must agree (max relative difference <= 1e-4),
with the baseline's adapters (B made non-zero) copied into ours. Then both sides train in one process,
interleaved (transformers, ours, ours, transformers, ...): min of >= --repeats steps after warm-up, and the median
of the per-round ratios. Peak memory: each side's steps run again in a fresh subprocess (see bench/README.md).

    python bench/bench_lora.py --out bench/results/lora-cpu.md      # CPU: fp32 and bf16 (+ lora-cpu.json)
    python bench/bench_lora.py --clock cpu --threads 1              # on a shared, loaded machine
    python bench/bench_lora.py --tiny                               # a seconds-long smoke run of everything
    python bench/bench_lora.py --device cuda --out bench/results/lora-h200.md   # Qwen3-0.6B, 4 x 2048, bf16, + Liger
    python bench/bench_lora.py --device cuda --dry-run              # the GPU mode's code path, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's hf_archs, installed or not
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import bench_dense as bd  # machine description, interleaved rounds under load, the help formatter
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PARITY_TOL = 1e-4
T0 = time.perf_counter()
TRANSFORMERS, LIGER, OURS = "transformers + PEFT", "transformers + PEFT + Liger", "ours"
MEMORY_TAG = "BENCH_LORA_CHILD "

# https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
QWEN3_0_6B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# The shape per mode: (hidden, layers, intermediate, heads, kv heads, head_dim, vocab, batch, seq).
SHAPES: dict[str, dict[str, int]] = {
    "cpu": {"hidden": 512, "layers": 4, "intermediate": 1536, "heads": 8, "kv_heads": 4, "head_dim": 64,
            "vocab": 151936, "batch": 2, "seq": 512},
    "cuda": {"hidden": 1024, "layers": 28, "intermediate": 3072, "heads": 16, "kv_heads": 8, "head_dim": 128,
             "vocab": 151936, "batch": 4, "seq": 2048},
    "tiny": {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 16, "vocab": 1000,
             "batch": 2, "seq": 32},
}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------
# The model pair
# --------------------------------------------------------------------------------------------------------------

def official_config(args: argparse.Namespace) -> dict[str, Any]:
    """Qwen3-0.6B's config.json at the benchmark shape (unchanged in the GPU mode)."""
    official = dict(QWEN3_0_6B)
    official.update(hidden_size=args.hidden, num_hidden_layers=args.layers, intermediate_size=args.intermediate,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                    vocab_size=args.vocab, max_window_layers=args.layers)
    for key in ("bos_token_id", "eos_token_id"):  # the tiny vocabulary has no room for Qwen's special ids
        if official[key] >= args.vocab:
            official[key] = args.vocab - 1
    return official


def build_reference(official: dict[str, Any], attn: str) -> torch.nn.Module:
    """transformers' Qwen3ForCausalLM in fp32 on the CPU, seeded; norms moved off their init so they count."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**{k: v for k, v in official.items() if k not in ("model_type", "architectures")})
    ref = transformers.Qwen3ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ref.set_attn_implementation(attn)
    return ref


def build_ours(official: dict[str, Any], ref: torch.nn.Module, attn: str) -> torch.nn.Module:
    import hf_archs

    arch = hf_archs.ARCHITECTURES["qwen3"]
    ours = arch.causal_lm_class(hf_archs.config_from_official(copy.deepcopy(official), arch))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.set_attn_implementation(attn)
    return ours


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids, every token a target (labels = input_ids; each side shifts them itself)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


class Side:
    """One way of training: `step()` runs one full optimizer step and returns the loss (a tensor)."""

    def __init__(self, name: str, model: torch.nn.Module, peft_model: torch.nn.Module, step: Callable[[], Any],
                 loss_and_grads: Callable[[], torch.Tensor]) -> None:
        self.name, self.model, self.peft_model = name, model, peft_model
        self.step, self.loss_and_grads = step, loss_and_grads

    def lora_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.peft_model.named_parameters() if "lora_" in n}


def transformers_side(ref: torch.nn.Module, dtype: torch.dtype, device: torch.device,
                      batch: dict[str, torch.Tensor], args: argparse.Namespace, name: str = TRANSFORMERS) -> Side:
    """transformers + PEFT defaults, stepped as `Trainer` with default arguments does (see the module docstring)."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(ref).to(device=device, dtype=dtype)
    base.config.use_cache = False  # Trainer's `model.config.use_cache` stays; the forward makes no cache with labels
    model = get_peft_model(base, LoraConfig(r=args.rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, fused=True)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else contextlib.nullcontext

    def loss_and_grads() -> torch.Tensor:
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        return loss.detach()

    def step() -> torch.Tensor:
        loss = loss_and_grads()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return Side(name, model, model, step, loss_and_grads)


def ours_side(ours_fp32: torch.nn.Module, dtype: torch.dtype, device: torch.device,
              batch: dict[str, torch.Tensor], args: argparse.Namespace) -> Side:
    """The recipe's own functions, with its defaults (LoRA alpha set to PEFT's 8; lr to Trainer's 5e-5)."""
    from hf_archs.finetune import (
        FinetuneArgs,
        LossModel,
        build_optimizers,
        causal_lm_of,
        optimizer_step,
        prepare_model,
        recipe_accelerator,
    )

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    fa = FinetuneArgs(tiny="qwen3", train_file="-", lora_r=args.rank, lora_alpha=8.0, lr=5e-5,
                      precision=precision, gradient_checkpointing=args.gradient_checkpointing,
                      **({"loss_chunk_size": args.chunk_size} if args.chunk_size is not None else {}))
    acc = recipe_accelerator(precision, cpu=device.type == "cpu")
    model, _ = prepare_model(copy.deepcopy(ours_fp32).to(device), fa)
    loss_model = LossModel(causal_lm_of(model), fa.loss_chunk_size, fa.router_aux_loss_coef)
    optimizers = build_optimizers(loss_model, fa.optimizer, fa.lr, fa.weight_decay, (fa.beta1, fa.beta2))
    prepared = acc.prepare(loss_model, *optimizers)
    ddp_model, optimizers = prepared[0], list(prepared[1:])
    ddp_model.train()

    def loss_and_grads() -> torch.Tensor:
        with acc.autocast():
            total, n, _ = ddp_model(**batch)
        loss = total / n
        acc.backward(loss)
        return loss.detach()

    def step() -> torch.Tensor:
        loss, _, _ = optimizer_step(ddp_model, optimizers, [batch], acc, max_grad_norm=fa.max_grad_norm)
        return loss

    return Side(OURS, ddp_model, model, step, loss_and_grads)


def liger_side(ref: torch.nn.Module, official: dict[str, Any], dtype: torch.dtype, device: torch.device,
               batch: dict[str, torch.Tensor], args: argparse.Namespace) -> Side:
    """transformers + PEFT with Liger's kernels patched into transformers' Qwen3 (RMSNorm, SwiGLU, RoPE, fused
    linear cross-entropy), as `apply_liger_kernel_to_qwen3()` documents: patch, then build the model. The patch is
    process-wide, so this side runs in a process of its own."""
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3

    apply_liger_kernel_to_qwen3()
    patched = build_reference(official, args.attn)
    patched.load_state_dict(ref.state_dict(), strict=True)
    return transformers_side(patched, dtype, device, batch, args, name=LIGER)


def copy_adapters(src: Side, dst: Side, perturb_b: bool) -> None:
    """The same adapters on both sides (by parameter name); B made non-zero first so that A gets gradients."""
    s, d = src.lora_params(), dst.lora_params()
    if set(s) != set(d):
        raise RuntimeError(f"the sides adapt different tensors: only {src.name}: {sorted(set(s) - set(d))[:4]}, "
                           f"only {dst.name}: {sorted(set(d) - set(s))[:4]}")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n in sorted(s):
            if perturb_b and "lora_B" in n:
                s[n].copy_(0.02 * torch.randn(s[n].shape, generator=gen).to(s[n]))
            d[n].copy_(s[n])


def check_parity(ref_side: Side, ours: Side) -> dict[str, Any]:
    """Loss and LoRA gradients of one forward + backward on the same batch (grads cleared afterwards)."""
    out = {}
    losses = {}
    grads = {}
    for side in (ref_side, ours):
        losses[side.name] = side.loss_and_grads()
        grads[side.name] = {n: p.grad.detach().clone() for n, p in side.lora_params().items()}
        side.peft_model.zero_grad(set_to_none=True)
    lr, lo = losses[ref_side.name].float(), losses[ours.name].float()
    out["loss_transformers"], out["loss_ours"] = float(lr), float(lo)
    out["loss_rel_diff"] = float((lr - lo).abs() / lr.abs().clamp_min(1e-12))
    worst, where = 0.0, ""
    for n, g in grads[ref_side.name].items():
        o = grads[ours.name][n]
        if o is None or g is None:
            raise RuntimeError(f"{n}: no gradient on one side")
        d = float((g.float() - o.float()).abs().max() / g.float().abs().max().clamp_min(1e-12))
        if d > worst:
            worst, where = d, n
    out["grad_rel_diff"], out["grad_worst"] = worst, where
    out["lora_tensors"] = len(grads[ref_side.name])
    return out


# --------------------------------------------------------------------------------------------------------------
# Work: model FLOPs (MFU) and the GEMM ceiling
# --------------------------------------------------------------------------------------------------------------

def model_flops(official: dict[str, Any], tokens_per_row: int, rows: int) -> dict[str, float]:
    """Model FLOPs of one training step, the usual MFU convention: 6 x (matmul parameters: every decoder linear and
    the head; not the embedding lookup) x tokens, + attention 3 x 4 x heads x head_dim x causal (query, key) pairs
    per layer (QK^T and PV, forward and 2x backward). A frozen-base LoRA step skips the base weights' gradients
    (about a third of 6N), so this overstates its work: MFU compares to the other sides, not to a full fine-tune."""
    h, L = official["hidden_size"], official["num_hidden_layers"]
    hd, nh, nkv = official["head_dim"], official["num_attention_heads"], official["num_key_value_heads"]
    inter, vocab = official["intermediate_size"], official["vocab_size"]
    per_layer = h * hd * (2 * nh + 2 * nkv) + 3 * h * inter
    params = L * per_layer + vocab * h
    tokens = rows * tokens_per_row
    pairs = rows * tokens_per_row * (tokens_per_row + 1) // 2
    attn = 3 * 4 * nh * hd * pairs * L
    return {"matmul_params": params, "tokens": tokens, "flops": 6 * params * tokens + attn, "attention_flops": attn}


def measure_gemm(device: torch.device, dtype: torch.dtype, size: int, args: argparse.Namespace) -> dict[str, Any]:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def run():
        t = timer(device)
        a @ b
        return timer(device) - t, None

    run(), run()
    r = bd.rounds({"gemm": run}, args, min_rounds=5, budget=10)["gemm"]
    best = min(t for t, _, _ in r)
    return {"size": size, "dtype": str(dtype), "times_s": [t for t, _, _ in r], "tflops": 2 * size**3 / best / 1e12}


def timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return bd.clock()


# --------------------------------------------------------------------------------------------------------------
# Peak memory, each side in a fresh process
# --------------------------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(args: argparse.Namespace) -> int:
    """`--child SIDE --child-dtype D`: build one side, run `--memory-steps` steps, print peak memory (and the steps'
    times) as one tagged JSON line. CPU: resident set (VmRSS, VmHWM after resetting it through
    /proc/self/clear_refs); CUDA: the caching allocator's allocated bytes."""
    device, dtype = torch.device(args.device_used), DTYPES[args.child_dtype]
    cpu = device.type == "cpu"
    # What building a side imports lazily is code, not the step's memory: imported before the first reading.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401

    import hf_archs.finetune
    import hf_archs.lora  # noqa: F401

    gc.collect()
    _malloc_trim()
    before = _status_kib("VmRSS") * 1024 if cpu else torch.cuda.memory_allocated(device)
    official = official_config(args)
    batch = make_batch(args, device)
    ref = build_reference(official, args.attn)
    if args.child == OURS:
        base = build_ours(official, ref, args.attn)
        del ref
        side = ours_side(base, dtype, device, batch, args)
        del base
    elif args.child == LIGER:
        side = liger_side(ref, official, dtype, device, batch, args)
        del ref
    else:
        side = transformers_side(ref, dtype, device, batch, args)
        del ref
    gc.collect()
    _malloc_trim()
    if cpu:
        built = _status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    else:
        built = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.memory_steps):
        t = timer(device)
        loss = side.step()
        times.append(timer(device) - t)
    peak = _status_kib("VmHWM") * 1024 if cpu else torch.cuda.max_memory_allocated(device)
    out = {"side": args.child, "dtype": args.child_dtype, "before_bytes": before, "built_bytes": built,
           "peak_bytes": peak, "model_bytes": built - before, "step_peak_bytes": peak - built,
           "total_peak_bytes": peak - before, "step_times_s": times, "loss": float(loss)}
    print(MEMORY_TAG + json.dumps(out), flush=True)
    return 0


def run_child(side: str, dtype: str, argv: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    # glibc's malloc returns a freed block to the OS only above its mmap threshold, which it raises to the size of
    # the blocks freed: fixed here, so that the resident set follows the live tensors (not the allocator's cache).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", side, "--child-dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MEMORY_TAG):
            return json.loads(line[len(MEMORY_TAG):])
    raise RuntimeError(f"memory child {side} {dtype} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


# --------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------

def time_sides(sides: list[Side], device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    def timed(side: Side):
        def run():
            t = timer(device)
            loss = side.step()
            return timer(device) - t, float(loss)
        return run

    for _ in range(args.warmup):
        for s in sides:
            timed(s)()
    runs = bd.rounds({s.name: timed(s) for s in sides}, args)
    raw: dict[str, Any] = {}
    for s in sides:
        raw[s.name] = {"step_s": [t for t, _, _ in runs[s.name]], "others_cpu_share": [o for _, o, _ in runs[s.name]],
                       "losses": [x for _, _, x in runs[s.name]], "trusted": bd.trustworthy(runs[s.name], args.stable)}
    base = runs[sides[0].name]
    for s in sides[1:]:
        raw[s.name]["paired_ratio_median"] = statistics.median(a[0] / b[0] for a, b in zip(base, runs[s.name]))
    return raw


def profile_step(side: Side, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        side.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------

def mib(x: float) -> str:
    return f"{x / 2**20:,.0f}"


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    m = results["machine"]
    gpu = args.device == "cuda"
    tokens = args.batch * args.seq
    lines = [f"# LoRA training step: the hf_archs recipe vs transformers + PEFT ({'GPU' if gpu else 'CPU'})", ""]
    if results.get("provisional"):
        lines += [f"**Provisional:** {results['provisional']}", ""]
    if gpu and not args.dry_run:
        lines.append(f"- Machine: {m.get('gpu', 'GPU')}; host {m['cpu']}.")
    else:
        flags = " ".join(m["cpu_flags"]) or "no AVX-512 / AMX flags"
        lines.append(f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch "
                     f"thread(s) ({flags}); load average {m['loadavg_start']} at the start, "
                     f"{m.get('loadavg_end', 'n/a')} at the end.")
    if args.dry_run:
        lines.append("- **Dry run** of the GPU mode's code on the CPU with the tiny shape: not a measurement.")
    liger = f", liger-kernel {m['liger']}" if m.get("liger") else ""
    gc_note = (" + gradient checkpointing" if args.gradient_checkpointing
               else " (gradient checkpointing off, its default)")
    lines += [
        (f"- Software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, peft "
         f"{m.get('peft')}, hf_archs {m['hf_archs']} (git {m['git']}){liger}; {m['date']}."),
        (f"- Shape: Qwen3-0.6B's config.json with hidden {args.hidden}, {args.layers} layers, intermediate "
         f"{args.intermediate}, {args.heads} heads / {args.kv_heads} KV heads, head_dim {args.head_dim}, vocab "
         f"{args.vocab}, tied embeddings; {results['params'] / 1e6:.1f} M parameters. Batch {args.batch} x "
         f"{args.seq} tokens, every token a target. LoRA r={args.rank} on q/k/v/o/gate/up/down of every layer "
         f"({results.get('parity', {}).get('lora_tensors', '?')} adapted tensors). Attention: {args.attn}."),
        (f"- transformers + PEFT: `get_peft_model(Qwen3ForCausalLM, LoraConfig(r={args.rank}, "
         "target_modules=\"all-linear\"))`, forward with labels (transformers' loss), backward, clip 1.0, "
         "AdamW(fused=True), zero_grad: a `Trainer` "
         "step with default arguments (bf16: base in bf16, adapters fp32, bf16 autocast)."),
        (f"- ours: `hfa_qwen3`, same weights (strict load), `hf_archs.finetune`'s `prepare_model`, `LossModel` "
         f"(loss_chunk_size {results['chunk_size']}), `build_optimizers`, `optimizer_step` with the recipe's defaults"
         f"{gc_note}"
         "; LoRA alpha 8 as PEFT's default."),
        (f"- Time: both sides in one process, interleaved (the order swaps every round), min of >= {args.repeats} "
         f"steps after {args.warmup} warm-up (more, up to {args.max_repeats} or {args.budget:.0f} s, while a best "
         f"time is not reproduced within {args.stable:.0%}); in brackets the median of the per-round ratios. "
         + ("Wall clock, CUDA synchronised." if gpu else
            ("Clock: this process's CPU time (`--clock cpu`), robust to other processes' load." if args.clock == "cpu"
             else "Clock: wall time."))),
        ("- Peak memory: each side alone in a fresh process, after building it, "
         f"{args.memory_steps} steps; " + ("`torch.cuda.max_memory_allocated` (weights included). " if gpu else
                                           "peak resident set (VmHWM, reset after the build) minus the resident set "
                                           "before the model was built: weights + the step's peak. ")
         + "`step`: the part above the built model (activations, logits, gradients, optimizer state)."),
    ]
    if gpu:
        g = results.get("gemm", {})
        lines.append(f"- MFU: model FLOPs (6 x {results['flops']['matmul_params'] / 1e6:.0f} M matmul parameters x "
                     f"{tokens} tokens + causal attention) / time / the bf16 GEMM peak measured in this run "
                     f"({g.get('tflops', float('nan')):.0f} TFLOP/s, {g.get('size')}^3).")
    shares = [x for d in results["dtypes"].values() for r in d.get("raw", {}).values()
              for x in r.get("others_cpu_share", [])]
    if shares and not gpu:
        lines.append(f"- Load from other processes during the {len(shares)} timed steps: median "
                     f"{statistics.median(shares):.0%} of the CPUs, max {max(shares):.0%}.")
    if args.note:
        lines.append(f"- Note: {args.note}")
    p = results.get("parity")
    if p:
        lines.append(f"- Parity (fp32, one step, same adapters): loss {p['loss_transformers']:.6f} vs "
                     f"{p['loss_ours']:.6f} (rel. diff {p['loss_rel_diff']:.1e}); LoRA gradients max rel. diff "
                     f"{p['grad_rel_diff']:.1e} over {p['lora_tensors']} tensors: "
                     f"{'passed' if p['passed'] else 'FAILED'} (tolerance {PARITY_TOL:g}).")
    mfu_h = " MFU |" if gpu else ""
    lines += ["", (f"| dtype | side | ms/step | tokens/s | speed vs transformers + PEFT | peak MiB | of which step "
                   f"| memory vs transformers + PEFT |{mfu_h}"),
              "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for dtype, d in results["dtypes"].items():
        if "error" in d:
            lines.append(f"| {dtype} | **{d['error'].splitlines()[0][:150]}** | | | | | | |" + (" |" if gpu else ""))
            continue
        base = d["sides"][TRANSFORMERS]
        for name, s in d["sides"].items():
            star = "" if s.get("trusted", True) else "*"
            ms = f"{s['step_s'] * 1e3:,.1f}{star}" if s.get("step_s") else "n/a"
            tps = f"{tokens / s['step_s']:,.0f}" if s.get("step_s") else "n/a"
            speed = mem = ""
            if name != TRANSFORMERS and s.get("step_s") and base.get("step_s"):
                speed = f"{base['step_s'] / s['step_s']:.2f}x"
                if s.get("paired_ratio_median"):
                    speed += f" ({s['paired_ratio_median']:.2f})"
            mem_total = s.get("memory", {}).get("total_peak_bytes")
            mem_step = s.get("memory", {}).get("step_peak_bytes")
            base_total = base.get("memory", {}).get("total_peak_bytes")
            if name != TRANSFORMERS and mem_total and base_total:
                mem = f"{mem_total / base_total:.2f}x (step {mem_step / base['memory']['step_peak_bytes']:.2f}x)"
            row = (f"| {dtype} | {name} | {ms} | {tps} | {speed} | {mib(mem_total) if mem_total else 'n/a'} "
                   f"| {mib(mem_step) if mem_step else 'n/a'} | {mem} |")
            if gpu:
                row += f" {s['mfu']:.1%} |" if s.get("mfu") else " |"
            lines.append(row)
    lines += ["", ("speed: transformers + PEFT time / this side's time (> 1: faster), ratio of the minima; in brackets "
                   "the median of the per-round ratios. memory: peak / transformers + PEFT's peak (< 1: less). "
                   f"* = best time not reproduced within {args.stable:.0%} (treat as noisy).")]
    targets = []
    for dtype, d in results["dtypes"].items():
        o, b = d.get("sides", {}).get(OURS, {}), d.get("sides", {}).get(TRANSFORMERS, {})
        if o.get("step_s") and b.get("step_s") and o.get("memory") and b.get("memory"):
            sp = b["step_s"] / o["step_s"]
            mem = o["memory"]["total_peak_bytes"] / b["memory"]["total_peak_bytes"]
            targets.append(f"{dtype}: speed {sp:.2f}x ({'met' if sp >= 1.2 else 'missed'}), peak memory {mem:.2f}x "
                           f"({'met' if mem <= 0.8 else 'missed'})")
    if targets:
        goal = ("<= 150 ms/step and <= 15 GB" if gpu else ">= 1.2x tokens/s and <= 0.8x peak memory")
        lines += ["", f"Targets ({goal}): " + "; ".join(targets) + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark a LoRA training step of the hf-archs finetune recipe against transformers + PEFT\n"
                    "defaults (same Qwen3 weights, same data, one process, interleaved): ms/step, tokens/s and\n"
                    "peak memory (each side in a fresh process); on a GPU also MFU and Liger's kernels.",
        epilog="See bench/README.md for what is measured and how to read the table.",
        formatter_class=bd._HelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: the CPU shape, fp32 and bf16; cuda: Qwen3-0.6B, 4 x 2048, bf16, + Liger if installed")
    p.add_argument("--tiny", action="store_true", help="a tiny shape and few repeats: a smoke run of every path")
    p.add_argument("--dry-run", action="store_true", help="with --device cuda: run the GPU mode's code on the CPU "
                                                          "with the tiny shape (implies --tiny)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="default: fp32 bf16 on the CPU, bf16 on a GPU (parity is checked in fp32 first)")
    bd.add_timing_args(p, repeats=5, max_repeats=12)
    g = p.add_argument_group("shape (default: per --device, see SHAPES)")
    for k in ("hidden", "layers", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "batch", "seq"):
        g.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    g.add_argument("--rank", type=int, default=16, help="LoRA rank")
    g = p.add_argument_group("ours")
    g.add_argument("--chunk-size", type=int, default=None, help="the recipe's --loss-chunk-size (default: its own)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="the recipe's --gradient-checkpointing "
                                                                         "(off by default, as in the recipe)")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-steps", type=int, default=3, help="steps run in each memory process")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    g.add_argument("--child", default=None, help=argparse.SUPPRESS)
    g.add_argument("--child-dtype", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="write the Markdown table here and the raw numbers beside it (.json)")
    g.add_argument("--note", default="", help="a line added to the table's header")
    g.add_argument("--provisional", default="", help="mark the table as provisional, with this reason")
    g.add_argument("--render", type=Path, metavar="JSON", help="only re-render a saved run's table")
    g.add_argument("--profile", action="store_true", help="also print a torch.profiler table of one step of each "
                                                          "side (stderr and JSON)")
    g.add_argument("--profile-rows", type=int, default=25)
    args = p.parse_args(argv)
    if args.dry_run:
        if args.device != "cuda":
            p.error("--dry-run runs the GPU mode's code on the CPU: use it with --device cuda")
        args.tiny = True
    shape = SHAPES["tiny" if args.tiny else args.device]
    for k, v in shape.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dtypes is None:
        args.dtypes = ["bf16"] if args.device == "cuda" else ["fp32", "bf16"]
    if args.tiny:
        args.repeats, args.max_repeats, args.memory_steps = min(args.repeats, 2), min(args.max_repeats, 2), 1
    args.max_repeats = max(args.max_repeats, args.repeats)
    args.device_used = "cpu" if (args.device == "cpu" or args.dry_run) else "cuda"
    return args


def child_argv(argv: list[str]) -> list[str]:
    """The parent's arguments a memory process needs (the same shape and settings; no output)."""
    out, skip = [], False
    drop = {"--out", "--note", "--provisional", "--render", "--profile-rows"}
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a == "--profile" or any(a.startswith(d + "=") for d in drop):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if bd.render_saved(args, markdown):
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    bd.clock = time.process_time if (args.clock == "cpu" and args.device_used == "cpu") else time.perf_counter
    import transformers

    transformers.logging.set_verbosity_error()
    import logging

    logging.getLogger("hf_archs").setLevel(logging.WARNING)
    if args.child:
        return child(args)

    import peft

    device = torch.device(args.device_used)
    results: dict[str, Any] = {"machine": bd.machine_info(args), "args": {k: str(v) if isinstance(v, Path) else v
                                                                        for k, v in vars(args).items()},
                               "dtypes": {}, "provisional": args.provisional}
    results["machine"]["peft"] = peft.__version__
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        results["machine"]["liger"] = version("liger-kernel")
    except ImportError:
        pass
    if device.type == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name(device)
    gpu_mode = args.device == "cuda"
    log(f"machine: {results['machine'].get('gpu') or results['machine']['cpu']}, "
        f"{results['machine']['torch_threads']} threads, load {results['machine']['loadavg_start']}")
    from hf_archs.finetune import FinetuneArgs

    results["chunk_size"] = args.chunk_size if args.chunk_size is not None else FinetuneArgs().loss_chunk_size
    official = official_config(args)
    results["official"] = official
    results["flops"] = model_flops(official, args.seq, args.batch)
    if gpu_mode:
        results["gemm"] = measure_gemm(device, torch.bfloat16, 256 if args.dry_run else 8192, args)
        log(f"bf16 GEMM peak {results['gemm']['tflops']:.1f} TFLOP/s")
    ref = build_reference(official, args.attn)
    ours_fp32 = build_ours(official, ref, args.attn)
    results["params"] = sum(p.numel() for p in ours_fp32.parameters())
    batch = make_batch(args, device)
    failed = False

    # Parity gate, fp32, before anything is timed.
    log("parity: one fp32 step of each side on the same batch and adapters")
    t_side = transformers_side(ref, torch.float32, device, batch, args)
    o_side = ours_side(ours_fp32, torch.float32, device, batch, args)
    copy_adapters(t_side, o_side, perturb_b=True)
    parity = check_parity(t_side, o_side)
    parity["passed"] = parity["loss_rel_diff"] <= PARITY_TOL and parity["grad_rel_diff"] <= PARITY_TOL
    results["parity"] = parity
    log(f"parity: loss {parity['loss_transformers']:.6f} / {parity['loss_ours']:.6f} "
        f"(rel {parity['loss_rel_diff']:.1e}), LoRA grads max rel {parity['grad_rel_diff']:.1e} "
        f"({parity['grad_worst']}) -> {'passed' if parity['passed'] else 'FAILED'}")
    if not parity["passed"]:
        log("PARITY FAILED: ours and transformers + PEFT compute different losses or gradients. Not timed.")
        failed = True
    if "fp32" not in args.dtypes:
        del t_side, o_side
    child_args = child_argv(argv)
    for dtype in args.dtypes if not failed else []:
        entry: dict[str, Any] = {"sides": {}}
        results["dtypes"][dtype] = entry
        try:
            if dtype != "fp32":
                t_side = transformers_side(ref, DTYPES[dtype], device, batch, args)
                o_side = ours_side(ours_fp32, DTYPES[dtype], device, batch, args)
                copy_adapters(t_side, o_side, perturb_b=True)
            gc.collect()
            log(f"{dtype}: timing {TRANSFORMERS} and {OURS}, interleaved")
            raw = time_sides([t_side, o_side], device, args)
            entry["raw"] = raw
            for name in (TRANSFORMERS, OURS):
                r = raw[name]
                entry["sides"][name] = {"step_s": min(r["step_s"]), "median_s": statistics.median(r["step_s"]),
                                        "trusted": r["trusted"], "paired_ratio_median": r.get("paired_ratio_median")}
            tl, ol = raw[TRANSFORMERS]["losses"], raw[OURS]["losses"]
            entry["loss_trace_max_abs_diff"] = max(abs(a - b) for a, b in zip(tl, ol))
            b, o = entry["sides"][TRANSFORMERS]["step_s"], entry["sides"][OURS]["step_s"]
            log(f"{dtype}: {b * 1e3:.1f} / {o * 1e3:.1f} ms/step ({b / o:.2f}x; per-round median "
                f"{raw[OURS]['paired_ratio_median']:.2f}); losses over the steps differ by <= "
                f"{entry['loss_trace_max_abs_diff']:.1e}")
            if args.profile:
                entry["profile"] = {}
                for s in (t_side, o_side):
                    entry["profile"][s.name] = table = profile_step(s, args.profile_rows)
                    print(f"\n=== {dtype} {s.name}: one step ===\n{table}", file=sys.stderr)
            del t_side, o_side
            gc.collect()
            names = [TRANSFORMERS, OURS]
            if gpu_mode and results["machine"].get("liger"):
                names.insert(1, LIGER)
            for name in names:
                if args.no_memory and name != LIGER:
                    continue
                log(f"{dtype}: {name} in a fresh process (peak memory{', time' if name == LIGER else ''})")
                mem = run_child(name, dtype, child_args, timeout=1800)
                side = entry["sides"].setdefault(name, {})
                side["memory"] = mem
                if name == LIGER:  # timed in its own process: Liger patches transformers process-wide
                    side["step_s"] = min(mem["step_times_s"])
                log(f"{dtype}: {name}: peak {mib(mem['total_peak_bytes'])} MiB (model {mib(mem['model_bytes'])}, "
                    f"step {mib(mem['step_peak_bytes'])})")
            if gpu_mode:
                for s in entry["sides"].values():
                    if s.get("step_s"):
                        s["mfu"] = results["flops"]["flops"] / s["step_s"] / (results["gemm"]["tflops"] * 1e12)
        except Exception as err:  # noqa: BLE001 - one dtype's failure must not lose the other's numbers
            msg = f"{type(err).__name__}: {err}"
            log(f"!!!!! {dtype}: ABORTED: {msg}")
            traceback.print_exc()
            entry["error"] = msg
            failed = True
    results["machine"]["loadavg_end"] = bd.loadavg()
    results["wall_s"] = time.perf_counter() - T0
    table = markdown(results, args)
    bd.write_results(args, results, table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
