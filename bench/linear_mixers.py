"""Side-by-side speed and memory of hf_archs' linear-attention mixers (Gated DeltaNet, Kimi Delta Attention) and
transformers' own torch fallbacks, same inputs, one process.

Sections (each prints a Markdown table to stdout; progress goes to stderr):
  kernels  the core recurrence alone at the releases' head shapes (Gated DeltaNet: 16 key / 32 value heads of 128,
           Qwen3-Next; KDA: 32 heads of 128, Kimi Linear), batch 1, fp32, q and k L2-normalised inside the timed
           call: ours chunked (chunk 64) and ours recurrent against transformers' `torch_chunk_*` and
           `torch_recurrent_*` / `recurrent_kimi_delta_attention`. Outputs are checked against each other first.
           Interleaved rounds, minimum over `--repeats`.
  memory   peak resident memory added by one prefill of a 2-layer Kimi Linear (both layers KDA at the release's
           sizes, dense MLPs, vocab 1024) at growing T, ours and transformers', each in a fresh process.
  decode   time of one cached single-token step of one mixer layer (release sizes, ours and transformers', same
           weights) after a prefill of 64 ... 4096 tokens: constant-size state, so flat in the context.
  gpu      (only with CUDA) 2-layer prefills of 16k tokens in bf16: transformers' torch fallback, ours with the torch
           chunked path, ours with flash-linear-attention's kernels (`--fla-path DIR` is put on sys.path after
           transformers' modeling modules were imported, so that transformers keeps its fallback in this process).

    python bench/linear_mixers.py                                   # everything this machine can run
    python bench/linear_mixers.py --sections kernels --lengths 512 2048 4096 --clock cpu --threads 1
    python bench/linear_mixers.py --out bench/results/linear-mixers-cpu.md     # also writes the .json beside it

`--clock cpu` times this process's CPU time (all threads summed): on a shared, loaded machine that with `--threads 1`
gives ratios that hold. transformers' KDA chunk path builds [chunks, 64, 64, 128] tensors per head (T x 32 KB per
head); runs whose estimate exceeds `--max-reference-gb` are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# transformers' modeling modules first: their kernel choice (fla or the torch fallback) is made at import
from transformers.models.kimi_linear import modeling_kimi_linear as tk
from transformers.models.qwen3_next import modeling_qwen3_next as tq

T0 = time.perf_counter()
clock: Callable[[], float] = time.perf_counter


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu") -> float:
    sync(device)
    t = clock()
    fn()
    sync(device)
    return clock() - t


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: str = "cpu") -> dict[str, float]:
    """Best time of each, the order rotating every round."""
    names = list(fns)
    best = {n: float("inf") for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            best[n] = min(best[n], timed(fns[n], device))
    return best


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
def kernel_inputs(kind: str, t: int, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, hv = (16, 32) if kind == "gdn" else (32, 32)
    d = 128
    q = torch.randn(1, t, h, d, generator=gen)
    k = torch.randn(1, t, h, d, generator=gen)
    v = torch.randn(1, t, hv, d, generator=gen)
    g = -0.5 * torch.rand(1, t, hv, *((d,) if kind == "kda" else ()), generator=gen)
    beta = torch.rand(1, t, hv, generator=gen)
    return [x.to(device=device, dtype=dtype if x is not g else torch.float32) for x in (q, k, v, g, beta)]


def kernel_fns(kind: str, t: int, max_ref_gb: float) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    from hf_archs.layers import gated_deltanet as gd
    from hf_archs.layers import kda as kd

    q, k, v, g, beta = kernel_inputs(kind, t)
    skipped = {}
    if kind == "gdn":
        norm = gd.l2norm_rsqrt
        fns = {
            "ours chunked": lambda: gd.chunk_gated_delta_rule(norm(q), norm(k), v, g, beta, output_final_state=True),
            "ours recurrent": lambda: gd.recurrent_gated_delta_rule(norm(q), norm(k), v, g, beta,
                                                                    output_final_state=True),
            "transformers chunk": lambda: tq.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta,
                                                                          use_qk_l2norm_in_kernel=True,
                                                                          output_final_state=True),
            "transformers recurrent": lambda: tq.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta,
                                                                                  use_qk_l2norm_in_kernel=True,
                                                                                  output_final_state=True),
        }
    else:
        norm = kd.l2norm_div
        fns = {
            "ours chunked": lambda: kd.chunk_kda(norm(q), norm(k), v, g, beta, output_final_state=True),
            "ours recurrent": lambda: kd.recurrent_kda(norm(q), norm(k), v, g, beta, output_final_state=True),
            "transformers chunk": lambda: tk.chunk_kimi_delta_attention(q, k, v, g=g, beta=beta,
                                                                        use_qk_l2norm_in_kernel=True,
                                                                        output_final_state=True),
            "transformers recurrent": lambda: tk.recurrent_kimi_delta_attention(q, k, v, g=g, beta=beta,
                                                                                initial_state=None,
                                                                                use_qk_l2norm_in_kernel=True,
                                                                                output_final_state=True),
        }
        need = 3 * t * 32 * 64 * 128 * 4 / 2**30  # three [N, 64, 64, 128] fp32 tensors per head
        if need > max_ref_gb:
            skipped["transformers chunk"] = f"skipped: needs ~{need:.0f} GB (--max-reference-gb {max_ref_gb:g})"
            del fns["transformers chunk"]
    return fns, skipped


def section_kernels(args) -> tuple[str, list[dict]]:
    rows, raw = [], []
    for kind, name in (("gdn", "Gated DeltaNet (16 k / 32 v heads x 128)"), ("kda", "KDA (32 heads x 128)")):
        for t in args.lengths:
            fns, skipped = kernel_fns(kind, t, args.max_reference_gb)
            with torch.inference_mode():
                outs = {n: f()[0] for n, f in fns.items()}
                ref = outs["ours recurrent"]
                agree = max(rel(o, ref) for o in outs.values())
                log(f"{kind} T={t}: outputs agree to {agree:.1e}; timing {list(fns)}")
                best = interleaved(fns, args.repeats)
            raw.append({"mixer": kind, "T": t, "times_s": best, "skipped": skipped, "max_rel_diff": agree})
            theirs = best.get("transformers chunk")
            cells = [name, str(t)]
            for n in ("ours chunked", "ours recurrent", "transformers chunk", "transformers recurrent"):
                cells.append(f"{best[n] * 1e3:.0f}" if n in best else skipped.get(n, "-"))
            ours = best["ours chunked"]
            cells.append(f"{theirs / ours:.1f}x" if theirs else "-")
            cells.append(f"{best['transformers recurrent'] / ours:.1f}x")
            cells.append(f"{agree:.0e}")
            rows.append("| " + " | ".join(cells) + " |")
    head = ("| mixer | T | ours chunked (ms) | ours recurrent (ms) | transformers chunk (ms) | transformers recurrent "
            "(ms) | vs transformers chunk | vs transformers recurrent | max rel diff |\n|" + "---|" * 9)
    return "### Kernels (fp32, batch 1, CPU)\n\n" + head + "\n" + "\n".join(rows) + "\n", raw


# ----------------------------------------------------------------------------------------------------------------
# 2-layer models (release sizes, linear-attention layers only, dense MLPs, small vocab), ours and transformers'
# ----------------------------------------------------------------------------------------------------------------
QWEN3_NEXT = {"model_type": "qwen3_next", "vocab_size": 1024, "hidden_size": 2048, "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "intermediate_size": 512, "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 100, "num_experts": 4, "num_experts_per_tok": 2, "mlp_only_layers": [0, 1], "rope_theta": 1e7, "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
KIMI_LINEAR = {"model_type": "kimi_linear", "vocab_size": 1024, "hidden_size": 2304, "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 1024, "rms_norm_eps": 1e-5, "first_k_dense_replace": 2, "num_experts": 4, "num_experts_per_token": 2, "num_shared_experts": 1, "moe_intermediate_size": 256, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "q_lora_rank": None, "mla_use_nope": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "linear_attn_config": {"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
                                       "full_attn_layers": [], "kda_layers": [1, 2]}}


def kimi_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if ".self_attn.forget_gate." in name:
            out[name.replace(".forget_gate.", ".")] = t
        elif name.endswith(".self_attn.conv1d.weight"):
            for part, w in zip("qkv", t.chunk(3, dim=0)):
                out[name.replace(".conv1d.", f".{part}_conv1d.")] = w
        else:
            out[name] = t
    return out


def build(arch: str, device: str = "cpu", dtype=torch.float32, mode: str = "auto", chunk_size: int = 64,
          with_reference: bool = True):
    """(ours, transformers') 2-layer models on the same weights (transformers' None if not asked)."""
    import transformers

    import hf_archs

    official = QWEN3_NEXT if arch == "qwen3_next" else KIMI_LINEAR
    cfg = {k: v for k, v in official.items() if k != "model_type"}
    torch.manual_seed(0)
    ref = (transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**cfg)) if arch == "qwen3_next"
           else transformers.KimiLinearForCausalLM(transformers.KimiLinearConfig(**cfg)))
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    ref = ref.eval()
    ours_cfg = hf_archs.config_from_official(dict(official, linear_attn_mode=mode, linear_chunk_size=chunk_size,
                                                  **({"num_nextn_predict_layers": 0} if arch == "qwen3_next" else {})))
    ours = hf_archs.ARCHITECTURES[arch].causal_lm_class(ours_cfg)
    state = ref.state_dict()
    ours.load_state_dict(kimi_to_ours(state) if arch == "kimi_linear" else state, strict=True)
    ours = ours.to(device=device, dtype=dtype).eval()
    ref = ref.to(device=device, dtype=dtype) if with_reference else None
    return ours, ref


def _memory_worker(arch: str, which: str, t: int, threads: int, queue) -> None:
    import gc
    import threading

    import psutil

    torch.set_num_threads(threads)
    ours, ref = build(arch)
    model = ours if which == "ours" else ref
    del ours, ref
    gc.collect()
    ids = torch.randint(3, 1024, (1, t), generator=torch.Generator().manual_seed(0))
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:  # resident memory every 0.5 ms while the forward runs
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.inference_mode():
        model(ids, use_cache=False, logits_to_keep=1, position_ids=torch.arange(t)[None])
    done.set()
    sampler.join()
    queue.put(max(peak[0], proc.memory_info().rss) - before)


def measure_memory(arch: str, which: str, t: int, threads: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(arch, which, t, threads, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 and not queue.empty() else float("nan")


def section_memory(args) -> tuple[str, list[dict]]:
    rows, raw = [], []
    for t in args.memory_lengths:
        cells = [str(t)]
        entry = {"T": t}
        for which in ("ours", "transformers"):
            need = 3 * t * 32 * 64 * 128 * 4 / 2**30 if which == "transformers" else 0
            if need > args.max_reference_gb:
                cells.append(f"skipped (~{need:.0f} GB of [C, C, K] temporaries)")
                continue
            log(f"memory: {which} 2-layer Kimi Linear prefill, T={t}")
            added = measure_memory("kimi_linear", which, t, args.threads)
            entry[which] = added
            cells.append(f"{added / 2**20:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
        raw.append(entry)
    head = "| T | ours (MiB) | transformers (MiB) |\n|---|---|---|"
    text = ("### Peak memory of a 2-layer Kimi Linear prefill (KDA x 2 at the release's sizes, fp32, CPU)\n\n"
            "Peak resident memory added by one forward (`logits_to_keep=1`; no cache: transformers cannot build one for a "
            "model without attention layers), each run in a fresh "
            "process; the weights (~0.3 GB) are loaded before the baseline is read.\n\n" + head + "\n" + "\n".join(rows))
    return text + "\n", raw


def mixers(arch: str):
    """(ours, transformers') single token-mixer layers of the 2-layer models above, on the same weights."""
    ours, ref = build(arch)
    if arch == "qwen3_next":
        return ours.model.layers[0].linear_attn, ref.model.layers[0].linear_attn
    return ours.model.layers[0].self_attn, ref.model.layers[0].self_attn


def section_decode(args) -> tuple[str, list[dict]]:
    from transformers.cache_utils import Cache, LinearAttentionLayer

    rows, raw = [], []
    for arch, label in (("qwen3_next", "Gated DeltaNet"), ("kimi_linear", "KDA")):
        ours, ref = mixers(arch)
        hidden = torch.randn(1, max(args.contexts) + 1, 2048 if arch == "qwen3_next" else 2304,
                             generator=torch.Generator().manual_seed(1))
        for ctx_len in args.contexts:
            times = {}
            with torch.inference_mode():
                for name, layer in (("ours", ours), ("transformers", ref)):
                    log(f"decode: {label} {name}, context {ctx_len}")
                    cache = Cache(layers=[LinearAttentionLayer()])
                    for start in range(0, ctx_len, 512):  # prefill in pieces: transformers' KDA chunk path
                        layer(hidden[:, start:min(ctx_len, start + 512)], cache=cache)  # needs T x 96 KB/head
                    step = hidden[:, ctx_len:ctx_len + 1]
                    # the same step each time: the state advances, the work per step does not change
                    def run(layer=layer, step=step, cache=cache):
                        return layer(step, cache=cache)

                    times[name] = min(timed(run) for _ in range(args.repeats * 3))
            raw.append({"mixer": label, "context": ctx_len, "step_s": times})
            rows.append(f"| {label} | {ctx_len} | {times['ours'] * 1e3:.2f} | {times['transformers'] * 1e3:.2f} |")
    head = "| one layer (release sizes) | context | ours ms/step | transformers ms/step |\n|---|---|---|---|"
    return ("### Decode step of one mixer layer from its cache (fp32, batch 1, CPU)\n\n" + head + "\n" + "\n".join(rows)
            + "\n", raw)


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------
def section_gpu(args) -> tuple[str, list[dict]]:
    from hf_archs.layers.gated_deltanet import fla_available

    rows, raw = [], []
    t = args.gpu_tokens
    for arch in ("qwen3_next", "kimi_linear"):
        for label, mode, reference in (("transformers (torch fallback)", "chunk", True),
                                       ("ours, torch chunked", "chunk", False),
                                       ("ours, flash-linear-attention", "auto", False)):
            if mode == "auto" and not fla_available():
                rows.append(f"| {arch} | {label} | not installed | - |")
                continue
            ours, ref = build(arch, "cuda", torch.bfloat16, mode=mode, with_reference=reference)
            model = ref if reference else ours
            ids = torch.randint(3, 1024, (1, t), generator=torch.Generator().manual_seed(0)).cuda()
            pos = torch.arange(t, device="cuda")[None]

            def fn(model=model, ids=ids, pos=pos):
                return model(ids, use_cache=False, logits_to_keep=1, position_ids=pos)

            with torch.inference_mode():
                fn()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                peak = torch.cuda.max_memory_allocated() - base
                best = min(timed(fn, "cuda") for _ in range(args.repeats))
            log(f"gpu: {arch} {label}: {best * 1e3:.1f} ms, peak +{peak / 2**30:.2f} GB")
            raw.append({"arch": arch, "path": label, "T": t, "time_s": best, "peak_bytes": peak})
            rows.append(f"| {arch} | {label} | {best * 1e3:.1f} | {peak / 2**30:.2f} |")
            del ours, ref, model, fn
            torch.cuda.empty_cache()
    head = "| model (2 linear layers) | path | ms | peak GB added |\n|---|---|---|---|"
    return (f"### GPU: 2-layer prefill of {t} tokens, bf16 ({torch.cuda.get_device_name()})\n\n" + head + "\n"
            + "\n".join(rows) + "\n", raw)


def gpu_check() -> str:
    """fla kernels against our naive reference on random inputs (fp32 state), both mixers."""
    from hf_archs.layers import gated_deltanet as gd
    from hf_archs.layers import kda as kd

    lines = []
    for kind in ("gdn", "kda"):
        for t, with_state in ((100, False), (130, True), (1, True)):
            q, k, v, g, beta = kernel_inputs(kind, t)
            hv = v.shape[2]
            s0 = torch.randn(1, hv, 128, 128, generator=torch.Generator().manual_seed(3)) if with_state else None
            norm = gd.l2norm_rsqrt if kind == "gdn" else kd.l2norm_div
            naive = gd.naive_recurrent_gated_delta_rule if kind == "gdn" else kd.naive_recurrent_kda
            ref, ref_state = naive(norm(q), norm(k), v, g, beta, initial_state=s0, output_final_state=True)
            dispatch = gd.gated_delta_rule if kind == "gdn" else kd.kda
            cuda = [x.cuda() for x in (q, k, v, g, beta)]
            out, state = dispatch(*cuda, mode="fla", initial_state=None if s0 is None else s0.cuda(),
                                  output_final_state=True)
            chunk, _ = dispatch(*[norm(x) if i < 2 else x for i, x in enumerate(cuda)], mode="chunk",
                                initial_state=None if s0 is None else s0.cuda(), output_final_state=True)
            lines.append(f"| {kind} | {t} | {with_state} | {rel(out.cpu(), ref):.1e} | "
                         f"{rel(state.float().cpu(), ref_state):.1e} | {rel(chunk.cpu(), ref):.1e} |")
    head = ("| mixer | T | initial state | fla vs naive (out) | fla vs naive (state) | torch chunked on GPU vs naive |"
            "\n|---|---|---|---|---|---|")
    return "### GPU: flash-linear-attention against the naive reference (fp32 inputs)\n\n" + head + "\n" + "\n".join(
        lines) + "\n"


def main() -> int:
    global clock
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", default=["kernels", "memory", "decode", "gpu"],
                   choices=["kernels", "memory", "decode", "gpu"])
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048, 4096])
    p.add_argument("--memory-lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--contexts", nargs="+", type=int, default=[64, 512, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--max-reference-gb", type=float, default=8.0)
    p.add_argument("--gpu-tokens", type=int, default=16384)
    p.add_argument("--fla-path", default=None, help="a directory holding flash-linear-attention, put on sys.path now")
    p.add_argument("--out", default=None, help="write the tables here (Markdown) and the raw times beside (.json)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.fla_path:
        sys.path.insert(0, args.fla_path)
    import transformers

    header = (f"## Linear-attention mixers: hf_archs vs transformers {transformers.__version__}\n\n"
              f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, {args.threads} threads; clock: "
              f"{'this process CPU time' if args.clock == 'cpu' else 'wall'}; best of {args.repeats}.\n")
    parts, raw = [header], {}
    sections = {"kernels": section_kernels, "memory": section_memory, "decode": section_decode}
    for name in args.sections:
        if name == "gpu":
            if not torch.cuda.is_available():
                log("gpu: no CUDA device, skipped")
                continue
            check = gpu_check()
            parts.append(check)
            print(check, flush=True)
            text, raw[name] = section_gpu(args)
        else:
            text, raw[name] = sections[name](args)
        parts.append(text)
        print(text, flush=True)
    if args.out:
        out = Path(args.out)
        out.write_text("\n".join(parts))
        out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": raw}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
