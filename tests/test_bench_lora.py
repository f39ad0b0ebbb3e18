"""bench/bench_lora.py end to end at its tiny shape: the parity gate runs and passes, the table has its rows, the
memory processes report. No time is asserted (performance is measured in bench/, never in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_lora.py"


def _run(tmp_path: Path, *extra: str) -> tuple[str, dict]:
    out = tmp_path / "lora.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--threads", "1", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text(), json.loads(out.with_suffix(".json").read_text())


def test_tiny_cpu_run(tmp_path):
    table, results = _run(tmp_path, "--tiny")
    assert results["parity"]["passed"] and results["parity"]["lora_tensors"] > 0
    assert results["parity"]["loss_rel_diff"] <= 1e-4 and results["parity"]["grad_rel_diff"] <= 1e-4
    assert "Parity (fp32, one step, same adapters)" in table and "passed" in table
    for dtype in ("fp32", "bf16"):
        sides = results["dtypes"][dtype]["sides"]
        assert set(sides) == {"transformers + PEFT", "ours"}
        for side in sides.values():
            assert side["step_s"] > 0
            assert side["memory"]["total_peak_bytes"] > 0 and side["memory"]["step_peak_bytes"] >= 0
        assert f"| {dtype} | transformers + PEFT |" in table and f"| {dtype} | ours |" in table
    assert "Targets (" in table


def test_gpu_mode_dry_run_on_the_cpu(tmp_path):
    table, results = _run(tmp_path, "--device", "cuda", "--dry-run", "--no-memory")
    assert results["parity"]["passed"]
    assert list(results["dtypes"]) == ["bf16"] and "Dry run" in table
    assert results["gemm"]["tflops"] > 0 and results["flops"]["flops"] > 0
    ours = results["dtypes"]["bf16"]["sides"]["ours"]
    assert ours["mfu"] > 0 and "| bf16 | ours |" in table and "MFU" in table
