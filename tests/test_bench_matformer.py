"""bench/bench_matformer.py end to end in its --tiny mode: the parity gate runs and passes, the size and speed rows
exist, a broken cut is refused before any timing. Times are never asserted (design.md: performance is measured in
bench/, not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_bench


@pytest.fixture(scope="module")
def bench():
    module = load_bench("bench_matformer")
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # --threads 1 below: leave the session as it was


def _run(bench, out: Path, *extra: str) -> tuple[int, dict]:
    rc = bench.main(["--tiny", "--threads", "1", "--clock", "cpu", "--out", str(out), *extra])
    return rc, json.loads(out.with_suffix(".json").read_text())


def test_tiny_run_gates_parity_and_writes_every_row(bench, tmp_path):
    rc, results = _run(bench, tmp_path / "m.md")
    assert rc == 0
    run = results["run"]
    assert run["parity_gate"] == "passed"
    assert set(run["parity_fp32"]) == {"full: ours vs transformers", "cut vs ours built at the cut config",
                                       "cut vs transformers built at the cut config"}
    assert all(v <= 1e-4 for p in run["parity_fp32"].values() for v in p.values())
    # The cut is the E2B preset at the scaled widths: half of every FFN, layers 20-24 dropped.
    full, cut = run["sizes"]["full"], run["sizes"]["cut"]
    assert (full["layers"], cut["layers"], cut["kv_shared_layers"]) == (35, 30, 10)
    assert cut["ffn_widths"] == [w // 2 for w in full["ffn_widths"]]
    assert run["skip_layers"] == [20, 21, 22, 23, 24]
    for z in (full, cut):
        assert z["total"] == z["embed_tokens"] + z["per_layer_embeddings"] + z["without_embeddings"]
    release = results["release_sizes"]
    assert (release["full"]["total"], release["cut"]["total"]) == (6_835_235_568, 4_435_182_688)
    for dtype in ("fp32", "bf16"):
        s = run["dtypes"][dtype]
        for who in ("full", "cut"):
            assert s[who]["prefill_s"] > 0 and s[who]["decode_s"] > 0
            assert len(s["raw"][who]["prefill_s"]) >= 2
    table = (tmp_path / "m.md").read_text()
    assert "Parity gate (passed" in table
    for row in ("| scaled (hidden 64) cut / full |", "| release (meta device) cut / full |", "| fp32 |", "| bf16 |"):
        assert row in table, row
    # --render gives the same table back from the JSON.
    rendered = tmp_path / "r.md"
    assert bench.main(["--render", str(tmp_path / "m.json"), "--out", str(rendered)]) == 0
    assert rendered.read_text() == table


def test_a_cut_that_differs_from_the_direct_model_is_not_timed(bench, tmp_path, monkeypatch):
    from hf_archs import matformer

    real_slice = matformer.slice

    def off_by_a_little(*args, **kwargs):
        model = real_slice(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[3].mlp.down_proj.weight.mul_(1.01)
        return model

    monkeypatch.setattr(matformer, "slice", off_by_a_little)
    rc, results = _run(bench, tmp_path / "bad.md", "--dtypes", "fp32")
    assert rc == 1
    run = results["run"]
    assert run["parity_gate"] == "failed" and "PARITY FAILED" in run["error"]
    assert "dtypes" not in run
    assert "ABORTED" in (tmp_path / "bad.md").read_text()
