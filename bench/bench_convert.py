"""`hf-archs convert` on a multi-GB synthetic FP8 release: throughput and peak memory, against a plain copy.

A benchmark, not a test. It writes a synthetic HF-layout release to --dir (Qwen3 shape, a few large tensors: the
attention and MLP weights FP8 e4m3 with 128 x 128 block scales, as Qwen3-*-FP8 / DeepSeek ship them; embeddings and
head bf16), converts it to bf16 with `hf_archs.convert.convert` in a child process, and copies the same number of
bytes as the conversion writes, also in a child process, in the same run (kinds interleaved):
  copy (read/write)   the converted shard read and written in 16 MiB chunks by Python (what any converter must do)
  copy (kernel)       shutil.copyfile of the same file (copy_file_range / sendfile: no user-space buffer)
Throughput = bytes written / wall time. Peak RSS: the child's own VmHWM (peak RSS), and the parent polling the
child's /proc/<pid>/status every 20 ms for RssAnon (heap: tensors) and RssFile (file-backed pages), so that a miss
can be attributed. The conversion's time is split by wrapping (in the child only) the reads, the FP8
dequantization, the writer's write+hash (on its own thread) and the SHA-256 of the sources (on its own thread):
busy seconds per phase, which overlap. A third child measures the bounds: FP8 decoding rates (the table lookup
conversion/dequant.py uses, against torch's own e4m3 conversions), SHA-256 and memcpy GB/s, on 1 and 2 threads.
The load average is sampled every second during the run. Targets (issue 6): peak RSS <= 2 x the largest tensor +
500 MB; throughput within 2x of the plain copy.

    python bench/bench_convert.py                                   # ~3.2 GB written, to /tmp
    python bench/bench_convert.py --out bench/results/convert-cpu.md --note "..."
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MB = 1e6


def log(msg: str) -> None:
    print(f"[bench_convert] {msg}", file=sys.stderr, flush=True)


# --- the synthetic release -----------------------------------------------------------------------------------------

def write_release(root: Path, layers: int, hidden: int, inter: int, vocab: int, heads: int, kv: int,
                  head_dim: int, block: int = 128) -> dict[str, Any]:
    """One safetensors file per layer (plus one for embeddings / head), an index, config.json with fp8 block
    quantization. Returns the largest tensors' sizes."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    largest_out = largest_src = 0

    def fp8(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = (torch.randn(rows, cols, generator=gen) * 100).to(torch.float8_e4m3fn)
        scale = torch.rand(-(-rows // block), -(-cols // block), generator=gen) * 1e-3 + 1e-4
        return w, scale

    shards = [("model-embed.safetensors", {
        "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16),
        "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16),
        "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        t: dict[str, torch.Tensor] = {p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                                      p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                                      p + "self_attn.q_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16),
                                      p + "self_attn.k_norm.weight": torch.ones(head_dim, dtype=torch.bfloat16)}
        for name, (rows, cols) in {"self_attn.q_proj": (heads * head_dim, hidden),
                                   "self_attn.k_proj": (kv * head_dim, hidden),
                                   "self_attn.v_proj": (kv * head_dim, hidden),
                                   "self_attn.o_proj": (hidden, heads * head_dim),
                                   "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                                   "mlp.down_proj": (hidden, inter)}.items():
            t[p + name + ".weight"], t[p + name + ".weight_scale_inv"] = fp8(rows, cols)
        shards.append((f"model-layer{i:02d}.safetensors", t))
    for fname, tensors in shards:
        for name, value in tensors.items():
            weight_map[name] = fname
            largest_src = max(largest_src, value.numel() * value.element_size())
            if not name.endswith("_scale_inv"):
                largest_out = max(largest_out, value.numel() * 2)  # bf16 out
        save_file(tensors, root / fname, metadata={"format": "pt"})
        del tensors
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": head_dim, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [block, block]}}, indent=2))
    return {"largest_out_bytes": largest_out, "largest_src_bytes": largest_src,
            "largest_fp8_elements": inter * hidden}


# --- children ------------------------------------------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_child(args: list[str]) -> tuple[dict[str, Any], dict[str, int], float]:
    """Run this script as a child with `args`; poll its memory; return (its JSON report, the polled maxima, wall s)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    peak: dict[str, int] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            s = _status(proc.pid)
            for k, v in s.items():
                peak[k] = max(peak.get(k, 0), v)
            if s.get("VmRSS", 0) >= peak.get("_rss_at", 0):
                peak["_rss_at"] = s.get("VmRSS", 0)
                peak["_anon_at_peak"], peak["_file_at_peak"] = s.get("RssAnon", 0), s.get("RssFile", 0)
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    stop.set()
    thread.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), peak, wall


def _self_memory() -> dict[str, int]:
    """VmHWM: this process's peak RSS. (ru_maxrss is not used: Linux keeps it across the exec that started this
    child, so it would report the parent's RSS at fork time.)"""
    return {"VmHWM": _status(os.getpid()).get("VmHWM", 0)}


def child_convert(src: str, dst: str, dtype: str) -> None:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    import conversion.dequant as dq
    import conversion.io as cio
    import hf_archs.convert as hc

    phases = {"read": 0.0, "dequant": 0.0, "write+hash (writer thread)": 0.0, "sha256 sources (own thread)": 0.0}
    lock = threading.Lock()

    def timed(key: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                with lock:
                    phases[key] += time.perf_counter() - t
        return wrapper

    cio.Reader.get = timed("read", cio.Reader.get)
    dq.fp8_block = timed("dequant", dq.fp8_block)
    cio.SafetensorsWriter._write = timed("write+hash (writer thread)", cio.SafetensorsWriter._write)
    cio.sha256 = timed("sha256 sources (own thread)", cio.sha256)
    t = time.perf_counter()
    manifest = hc.convert(src, dst, dtype=dtype, overwrite=True, progress=False)
    total = time.perf_counter() - t
    written = sum((Path(dst) / f).stat().st_size for f in manifest["output_files"])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": total, "bytes_written": written, "tensor_bytes": manifest["bytes"],
                      "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "bytes_read": sum((Path(src) / f).stat().st_size for f in manifest["source_files"]),
                      "phases": phases, **_self_memory()}))


def child_kernels(rows: str, cols: str) -> None:
    """The bounds, on one [rows, cols] FP8 weight with 128 x 128 block scales, to bf16: each decoder's rate (elements
    per second, best of 3) on 1 and 2 torch threads, checked bit for bit against the plain formula; SHA-256 and
    memcpy GB/s on the bf16 result's bytes."""
    import hashlib

    import torch

    from conversion import dequant

    m, n = int(rows), int(cols)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(m, n, generator=gen) * 100).to(torch.float8_e4m3fn)
    s = torch.rand(-(-m // 128), -(-n // 128), generator=gen) * 1e-3 + 1e-4
    expanded = s.repeat_interleave(128, 0)[:m].repeat_interleave(128, 1)[:, :n]

    def best(fn, reps: int = 3) -> tuple[float, Any]:
        times, out = [], None
        for _ in range(reps):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return min(times), out

    reference = (w.float() * expanded).to(torch.bfloat16)
    decoders = {
        "torch: w.float() * scale, then .to(bf16) (the plain formula)": lambda: (w.float() * expanded).to(torch.bfloat16),
        "torch: w.to(bf16) alone (e4m3 -> bf16, no scale)": lambda: w.to(torch.bfloat16),
        "torch: w.float() alone (e4m3 -> fp32, no scale)": lambda: w.float(),
        "ours: table lookup per block (dequant.fp8_block, dtype=bf16)":
            lambda: dequant.fp8_block(w, s, dtype=torch.bfloat16),
    }
    result: dict[str, Any] = {"elements": m * n, "decode_melem_s": {}}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, fn in decoders.items():
            seconds, out = best(fn)
            if name.startswith("ours"):
                assert torch.equal(out.view(torch.int16), reference.view(torch.int16)), "not bit-exact"
            result["decode_melem_s"][f"{name}, {threads} thread{'s' if threads > 1 else ''}"] = m * n / seconds / 1e6
    data = reference.view(torch.uint8).numpy()
    seconds, _ = best(lambda: hashlib.sha256(data).hexdigest())
    result["sha256_gb_s"] = data.nbytes / seconds / 1e9
    target = torch.empty_like(reference)
    seconds, _ = best(lambda: target.copy_(reference))
    result["memcpy_gb_s"] = data.nbytes / seconds / 1e9
    print(json.dumps(result))


def child_copy(src: str, dst: str, mode: str) -> None:
    t = time.perf_counter()
    if mode == "kernel":
        shutil.copyfile(src, dst)
    else:
        buf = bytearray(16 * 2**20)
        view = memoryview(buf)
        with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
            while n := fi.readinto(buf):
                fo.write(view[:n])
    total = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": total, "bytes_written": Path(dst).stat().st_size,
                      "cpu_seconds": usage.ru_utime + usage.ru_stime, **_self_memory()}))


# --- the report ----------------------------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"cpu": f"{cpu}, {os.cpu_count()} cores", "memory": f"{mem / 2**30:.1f} GiB",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "os": platform.platform(), "load": " / ".join(f"{x:.2f}" for x in os.getloadavg())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", default="/tmp/hfa-bench-convert", help="where the release and outputs go (deleted "
                                                                     "afterwards unless --keep)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each child; the best is reported")
    ap.add_argument("--out", help="write the Markdown table here (and the raw numbers beside it as .json)")
    ap.add_argument("--note", default="", help="a line added under the table")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        {"convert": child_convert, "copy": child_copy, "kernels": child_kernels}[kind](*rest)
        return 0

    root = Path(a.dir)
    if root.exists():
        shutil.rmtree(root)
    src, dst = root / "release", root / "converted"
    free = shutil.disk_usage(root.parent).free
    log(f"writing the synthetic release to {src} ({free / 2**30:.0f} GiB free there)")
    t = time.perf_counter()
    sizes = write_release(src, a.layers, a.hidden, a.intermediate, a.vocab, a.heads, a.kv_heads, a.head_dim)
    log(f"release written in {time.perf_counter() - t:.1f} s")
    kinds = ["convert", "read/write", "kernel"]
    runs: dict[str, list[tuple[dict, dict, float]]] = {k: [] for k in kinds}
    loads: list[float] = []
    sampling = threading.Event()

    def sample_load() -> None:  # the 1-minute load average, every second while the children run
        while not sampling.wait(1.0):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    try:
        for rep in range(a.repeats):  # interleaved, so that load changes hit every kind alike
            log(f"round {rep + 1}: convert")
            runs["convert"].append(run_child(["--child", "convert", str(src), str(dst), a.dtype]))
            shard = max(dst.glob("*.safetensors"), key=lambda p: p.stat().st_size)
            for mode in ("read/write", "kernel"):
                log(f"round {rep + 1}: copy ({mode}) of {shard.name}")
                target = root / "copy.safetensors"
                runs[mode].append(run_child(["--child", "copy", str(shard), str(target),
                                             "kernel" if mode == "kernel" else "rw"]))
                target.unlink()
        log("bounds: fp8 decoding, SHA-256, memcpy")
        kernels = run_child(["--child", "kernels", str(a.hidden), str(a.hidden)])[0]
        sampling.set()
        info = machine()
    finally:
        sampling.set()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)

    def best(kind: str) -> tuple[dict, dict, float]:
        return min(runs[kind], key=lambda r: r[0]["seconds"])

    largest = sizes["largest_out_bytes"]
    target_rss = 2 * largest + 500 * MB
    names = {"convert": f"hf-archs convert, fp8 block -> {a.dtype}",
             "read/write": "plain copy (Python read/write, 16 MiB)", "kernel": "plain copy (shutil.copyfile)"}
    rate = {k: best(k)[0]["bytes_written"] / best(k)[0]["seconds"] / 1e9 for k in kinds}
    conv = best("convert")[0]
    load = (f"load average (1 min) during the runs {min(loads):.1f}-{max(loads):.1f}, mean "
            f"{sum(loads) / len(loads):.1f}" if loads else f"load average at the end {info['load']}")
    lines = [f"# hf-archs convert on a {conv['bytes_written'] / 1e9:.2f} GB synthetic FP8 release (CPU)", "",
             (f"{_dt.date.today()}; {info['cpu']}; {info['memory']} RAM; {load}; Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}; "
              f"{info['os']}."), "",
             (f"Release: Qwen3 shape, {a.layers} layers, hidden {a.hidden}, intermediate {a.intermediate}, vocab "
              f"{a.vocab}; attention / MLP weights FP8 e4m3 with 128x128 block scales, embeddings and head bf16; "
              f"{conv['bytes_read'] / 1e9:.2f} GB read, {conv['bytes_written'] / 1e9:.2f} GB written ({a.dtype}). "
              f"Each run in its own child process, kinds interleaved, best of {a.repeats} by wall time; files in the "
              "page cache (written just before), no fsync. CPU s = the child's user + system time (less sensitive "
              "to the other jobs than wall time)."), "",
             "| run | seconds | CPU s | GB/s written | peak RSS (MB) | max RssAnon (MB) | max RssFile (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k in kinds:
        r, peak, _ = best(k)
        lines.append(f"| {names[k]} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {rate[k]:.2f} | "
                     f"{r['VmHWM'] / MB:.0f} | {peak.get('RssAnon', 0) / MB:.0f} | {peak.get('RssFile', 0) / MB:.0f} |")
    ph = conv["phases"]
    lines += ["", "Busy seconds by phase, convert (they overlap: the writer and the source hashing have threads of "
              "their own): " + ", ".join(f"{n} {v:.1f}" for n, v in ph.items()) + "; wall "
              f"{conv['seconds']:.1f}.", "",
              "| target | measured | met |", "|---|---|---|"]
    rss = conv["VmHWM"]
    lines.append(f"| peak RSS <= 2 x largest tensor ({largest / MB:.0f} MB, bf16) + 500 MB = {target_rss / MB:.0f} MB "
                 f"| {rss / MB:.0f} MB | {'yes' if rss <= target_rss else 'no'} |")
    for mode in ("read/write", "kernel"):
        slow = rate[mode] / rate["convert"]
        lines.append(f"| throughput within 2x of {names[mode]} ({rate[mode]:.2f} GB/s) | {rate['convert']:.2f} GB/s "
                     f"({slow:.2f}x slower) | {'yes' if slow <= 2 else 'no'} |")
    lines += ["", f"Bounds, in a child of their own after the runs ({a.hidden} x {a.hidden} FP8 weight to bf16, best "
              "of 3; the table lookup is checked bit for bit against the plain formula):", "",
              "| kernel | rate |", "|---|---:|"]
    for name, v in kernels["decode_melem_s"].items():
        lines.append(f"| {name} | {v:.0f} M elements/s |")
    lines.append(f"| SHA-256 (hashlib, 1 thread) | {kernels['sha256_gb_s']:.2f} GB/s |")
    lines.append(f"| memcpy (torch copy_, 2 threads) | {kernels['memcpy_gb_s']:.2f} GB/s |")
    if a.note:
        lines += ["", a.note]
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps({"machine": info, "sizes": sizes, "args": vars(a),
                                                        "load_samples": loads, "kernels": kernels, "runs": runs},
                                                       indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
