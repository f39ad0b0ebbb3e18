"""LoRA on routed experts, two ways, one process, interleaved: PEFT's `target_parameters` (W + B A built for every
expert on each forward) vs hf_archs' per-expert low-rank path (`ExpertsLoraLayer`). Reports step time (forward +
backward of one MoE layer), peak memory (GPU), and the agreement of outputs and gradients.

    python examples/bench_experts_lora.py --tiny     # CPU, small shapes, seconds
    python examples/bench_experts_lora.py            # GPU: E=128, top-8, H=2048, I=768, 4096 tokens, bf16
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hf_archs.layers.moe import Experts, TopKRouter, softmax_topk
from hf_archs.lora import copy_param_wrapper_adapter, lora_targets


class Block(nn.Module):
    def __init__(self, e: int, h: int, i: int, k: int) -> None:
        super().__init__()
        self.gate = TopKRouter(h, e, functools.partial(softmax_topk, top_k=k, norm_topk_prob=True))
        self.experts = Experts(e, h, i)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, w, idx = self.gate(x)
        return self.experts(x, idx, w)


class Model(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.mlp = Block(**kw)

    def forward(self, x):
        return self.mlp(x)


def build(method: str, shape: dict, r: int, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = Model(**shape).to(device, dtype)
    kwargs = lora_targets(base, attention=False, experts=True, experts_method=method)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, **kwargs))


def timed(model: nn.Module, x: torch.Tensor, iters: int, device: str) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        model(x).float().square().mean().backward()
        sync()
        times.append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return min(times) * 1e3, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        shape, tokens, dtype, r = dict(e=16, h=128, i=64, k=4), 256, torch.float32, 8
    else:
        shape, tokens, dtype, r = dict(e=128, h=2048, i=768, k=8), 4096, torch.bfloat16, 16
    torch.manual_seed(1)
    x = torch.randn(tokens, shape["h"], device=device, dtype=dtype, requires_grad=True)
    # Agreement at fp32 (same factors).
    peft_way, ours = build("peft", shape, r, device, torch.float32), build("grouped", shape, r, device, torch.float32)
    copy_param_wrapper_adapter(peft_way, ours)
    x32 = x.detach().float().requires_grad_(True)
    a, b = peft_way(x32), ours(x32.detach().requires_grad_(True))
    agree = {"max_abs_diff_out": float((a - b).detach().abs().max()), "max_abs_out": float(a.detach().abs().max())}
    del peft_way, ours
    results = {"shape": shape, "tokens": tokens, "dtype": str(dtype), "r": r, "device": device,
               "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu", **agree}
    models = {m: build(m, shape, r, device, dtype) for m in ("peft", "grouped")}
    for m in models.values():
        timed(m, x, 1, device)  # warm-up
    best = {m: (float("inf"), 0.0) for m in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            ms, peak = timed(m, x, args.iters, device)
            best[name] = (min(best[name][0], ms), max(best[name][1], peak))
    for name, (ms, peak) in best.items():
        results[name] = {"ms_per_fwd_bwd": round(ms, 3), "peak_GiB": round(peak, 3)}
    results["speedup"] = round(best["peft"][0] / best["grouped"][0], 2)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
