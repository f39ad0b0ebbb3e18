"""GPU checks and side-by-side timings (bf16), for a machine with one CUDA GPU; `--tiny` runs the logic on a CPU.

Sections (each guarded by a time budget, results to <out>/gpu_check.json and a Markdown table on stdout):
  models   for each architecture with a test case: transformers' model and ours on the same weights at one shape
           (hidden 1024, 4+ layers, vocab 32000, 16 heads, head_dim 64; experts 16, top-2), bf16, sdpa where the
           reference allows it; max relative logits difference; prefill 1 x 2048 and greedy decode ms/token,
           interleaved, min of 5.
  experts  the fused experts' grouped-matmul CUDA path against the per-expert loop (equal outputs and grads),
           and their speed: E=128, top-8, H=2048, I=768, 4096 tokens, fwd + bwd, bf16.
  linear   flash-linear-attention kernels against this package's chunked torch paths, when both are present.
    python bench/gpu_check.py --out $OUT          # on the GPU machine
    python bench/gpu_check.py --tiny --out /tmp   # logic check on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import hf_archs  # noqa: E402

R: dict = {}
T0 = time.time()


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def best(fn, dev: str, reps: int = 5, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return min(times)


def scale(official: dict, tiny: bool) -> dict:
    cfg = copy.deepcopy(official)
    text = cfg.get("text_config", cfg)
    h, heads, hd = (64, 4, 16) if tiny else (1024, 16, 64)
    ratio = max(1, text.get("num_attention_heads", 4) // max(1, text.get("num_key_value_heads") or 1))
    text.update(hidden_size=h, num_attention_heads=heads, num_key_value_heads=max(1, heads // ratio),
                vocab_size=128 if tiny else 32000, intermediate_size=96 if tiny else 2816)
    if "head_dim" in text:
        text["head_dim"] = hd
    for key in ("moe_intermediate_size", "intermediate_size_mlp"):
        if key in text:
            text[key] = 32 if tiny else 704
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if key in text:
            text[key] = 16
    if "num_experts_per_tok" in text:
        text["num_experts_per_tok"] = min(text["num_experts_per_tok"], 2)
    if "query_pre_attn_scalar" in text:
        text["query_pre_attn_scalar"] = hd
    return cfg


def section_models(dev: str, tiny: bool, budget: float) -> None:
    from cases import CASES
    from helpers import randomize

    rows = []
    for case in CASES:
        if time.time() - T0 > budget:
            rows.append({"arch": case.name, "skipped": "time budget"})
            continue
        try:
            official = scale(case.official_config(), tiny)
            torch.manual_seed(0)
            ref = randomize(case.reference(official))
            config = hf_archs.config_from_official(official)
            ours = hf_archs.ARCHITECTURES[case.name].causal_lm_class(config)
            state = ref.state_dict()
            ours.load_state_dict(case.to_ours(state) if case.to_ours else state, strict=True)
            ref, ours = ref.to(dev, torch.bfloat16).eval(), ours.to(dev, torch.bfloat16).eval()
            attn = "sdpa"
            try:
                ref.set_attn_implementation("sdpa")
            except Exception:  # noqa: BLE001 - some references refuse sdpa (gpt-oss): compare against eager
                attn = "eager"
            if getattr(ours.config, "attn_logit_softcapping", None) or not ours._supports_sdpa:
                attn = "eager"
                ref.set_attn_implementation("eager")
            ours.set_attn_implementation(attn if ours._supports_sdpa else "eager")
            vocab = ours.config.vocab_size
            n = 64 if tiny else 2048
            ids = torch.randint(3, vocab, (1, n), device=dev)
            with torch.inference_mode():
                a, b = ours(ids).logits.float(), ref(ids).logits.float()
                diff = ((a - b).abs().max() / b.abs().max()).item()
                pre_ref = best(lambda: ref(ids, logits_to_keep=1), dev)
                pre_ours = best(lambda: ours(ids, logits_to_keep=1), dev)
                prompt = ids[:, :64]
                steps = 8 if tiny else 64
                kw = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
                same = torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))
                dec_ref = best(lambda: ref.generate(prompt, **kw), dev, reps=3, warm=1) / steps
                dec_ours = best(lambda: ours.generate(prompt, **kw), dev, reps=3, warm=1) / steps
            rows.append({"arch": case.name, "attn": attn, "max_rel_diff": diff, "greedy_equal": same,
                         "prefill_ms_ref": pre_ref * 1e3, "prefill_ms_ours": pre_ours * 1e3,
                         "prefill_ratio": pre_ref / pre_ours, "decode_ms_ref": dec_ref * 1e3,
                         "decode_ms_ours": dec_ours * 1e3, "decode_ratio": dec_ref / dec_ours})
            print(json.dumps(rows[-1]), flush=True)
            del ref, ours
            if dev == "cuda":
                torch.cuda.empty_cache()
        except Exception as err:  # noqa: BLE001 - record and go on
            rows.append({"arch": case.name, "error": f"{type(err).__name__}: {err}"[:500]})
            traceback.print_exc()
    R["models"] = rows


def section_experts(dev: str, tiny: bool) -> None:
    from hf_archs.layers.moe import Experts, act_glu

    e, k, h, i, t = (8, 2, 64, 32, 256) if tiny else (128, 8, 2048, 768, 4096)
    torch.manual_seed(0)
    experts = Experts(e, h, i, glu=act_glu("silu")).to(dev, torch.bfloat16)
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(t)])
    w = torch.rand(t, k, device=dev)

    def run(grouped: bool):
        experts.grouped_mm_ok = (lambda: grouped) if dev == "cuda" else (lambda: False)
        out = experts(x, idx, w)
        out.float().square().sum().backward()
        return out

    res = {}
    outs = {}
    for mode in ([True, False] if dev == "cuda" else [False]):
        x.grad = None
        experts.zero_grad()
        outs[mode] = (run(mode).detach().float(), x.grad.detach().float().clone(),
                      experts.gate_up_proj.grad.detach().float().clone())
        res["grouped_ms" if mode else "loop_ms"] = best(lambda m=mode: run(m), dev, reps=5) * 1e3
    if True in outs:
        rel = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs[True], outs[False])]
        res["grouped_vs_loop_rel_diff"] = {"out": rel[0], "grad_x": rel[1], "grad_w": rel[2]}
    flops = 3 * 2 * t * k * 3 * h * i  # fwd + bwd of the three projections
    for key in ("grouped_ms", "loop_ms"):
        if key in res:
            res[key.replace("_ms", "_tflops")] = flops / (res[key] / 1e3) / 1e12
    R["experts"] = res
    print(json.dumps(res), flush=True)


def section_linear(dev: str, tiny: bool) -> None:
    """fla kernels (bf16 inputs) against this package's chunked torch paths (fp32) on the same random inputs:
    relative difference of the outputs and final states, and the time of each at T tokens."""
    import torch.nn.functional as F

    from hf_archs.layers import gated_deltanet as gdn
    from hf_archs.layers import kda as kda_mod

    if dev == "cuda" and not gdn.fla_available():
        R["linear"] = {"skipped": "flash-linear-attention not importable"}
        return
    b, t, h, d = (1, 200, 2, 16) if tiny else (1, 4096, 16, 128)
    results = {}
    torch.manual_seed(0)
    for name in ("gated_deltanet", "kda"):
        try:
            q, k, v = (torch.randn(b, t, h, d, device=dev) for _ in range(3))
            beta = torch.rand(b, t, h, device=dev)
            g = -F.softplus(torch.randn(b, t, h, d if name == "kda" else 1, device=dev)).squeeze(-1) * 0.1
            qn, kn = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
            torch_fn = gdn.chunk_gated_delta_rule if name == "gated_deltanet" else kda_mod.chunk_kda
            fla_fn = gdn.fla_gated_delta_rule if name == "gated_deltanet" else kda_mod.fla_kda
            ref_out, ref_state = torch_fn(qn, kn, v, g, beta, output_final_state=True)
            row = {"torch_chunk_ms": best(lambda: torch_fn(qn, kn, v, g, beta), dev, reps=3) * 1e3}
            if dev == "cuda":
                bf = [x.to(torch.bfloat16) for x in (q, k, v)]
                out, state = fla_fn(*bf, g, beta.to(torch.bfloat16), output_final_state=True)
                row["fla_vs_torch_rel_diff_out"] = ((out.float() - ref_out).abs().max() / ref_out.abs().max()).item()
                row["fla_vs_torch_rel_diff_state"] = ((state.float() - ref_state).abs().max()
                                                      / ref_state.abs().max()).item()
                row["fla_ms"] = best(lambda: fla_fn(*bf, g, beta.to(torch.bfloat16)), dev, reps=3) * 1e3
                row["peak_gb_torch_chunk"] = _peak(lambda: torch_fn(qn, kn, v, g, beta))
                row["peak_gb_fla"] = _peak(lambda: fla_fn(*bf, g, beta.to(torch.bfloat16)))
            results[name] = row
        except Exception as err:  # noqa: BLE001
            results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            traceback.print_exc()
    R["linear"] = results
    print(json.dumps(results), flush=True)


def _peak(fn) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (logic check)")
    p.add_argument("--out", default=".", help="directory for gpu_check.json")
    p.add_argument("--budget", type=float, default=300, help="seconds after which model rows are skipped")
    p.add_argument("--sections", default="experts,models,linear", help="comma-separated sections to run")
    args = p.parse_args()
    dev = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    R.update(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
             hf_archs=hf_archs.__version__)
    import transformers
    R["transformers"] = transformers.__version__
    for name in args.sections.split(","):
        try:
            {"models": lambda: section_models(dev, args.tiny, args.budget),
             "experts": lambda: section_experts(dev, args.tiny),
             "linear": lambda: section_linear(dev, args.tiny)}[name]()
        except Exception as err:  # noqa: BLE001
            R[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            traceback.print_exc()
        Path(args.out, "gpu_check.json").write_text(json.dumps(R, indent=1))
    print(f"\n| arch | attn | max rel diff | greedy equal | prefill ms ref / ours (x) | decode ms/tok ref / ours (x) |")
    print("|---|---|---|---|---|---|")
    for r in R.get("models", []):
        if "prefill_ms_ref" in r:
            print(f"| {r['arch']} | {r['attn']} | {r['max_rel_diff']:.1e} | {r['greedy_equal']} | "
                  f"{r['prefill_ms_ref']:.2f} / {r['prefill_ms_ours']:.2f} ({r['prefill_ratio']:.2f}x) | "
                  f"{r['decode_ms_ref']:.2f} / {r['decode_ms_ours']:.2f} ({r['decode_ratio']:.2f}x) |")
        else:
            print(f"| {r['arch']} | {r.get('error') or r.get('skipped')} |")
    print(json.dumps({k: v for k, v in R.items() if k != "models"}, indent=1))


if __name__ == "__main__":
    main()
