"""bench/across_runs.py on hand-made results: per-run ratios, their median, the pooled minima, the cells under 1.0x
listed, cells missing from a run left out, and bad input refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_bench


@pytest.fixture(scope="module")
def across():
    return load_bench("across_runs")


def _cell(tf_prefill, ours_prefill, tf_decode, ours_decode):
    raw = {"transformers": {"prefill_s": tf_prefill, "decode_s_per_token": tf_decode},
           "ours": {"prefill_s": ours_prefill, "decode_s_per_token": ours_decode}}
    return {"raw": raw, "prefill_ratio": min(tf_prefill) / min(ours_prefill),
            "decode_ratio": min(tf_decode) / min(ours_decode)}


def _run(path: Path, date: str, cells: dict) -> Path:
    machine = {"cpu": "test CPU", "logical_cpus": 2, "torch_threads": 1, "python": "3", "torch": "t",
               "transformers": "t", "hf_archs": "0", "git": "abc", "date": date, "loadavg_start": "0 0 0"}
    archs = {name: {"dtypes": dtypes} for name, dtypes in cells.items()}
    path.write_text(json.dumps({"machine": machine, "args": {"note": "n"}, "archs": archs}))
    return path


def test_merge_reports_each_run_the_median_and_the_pooled_minima(across, tmp_path):
    runs = [
        _run(tmp_path / "a.json", "d1", {"qwen3": {"fp32": _cell([2.0, 2.2], [1.0, 1.1], [1.0], [1.25])},
                                         "gemma3": {"fp32": _cell([1.0], [1.0], [1.0], [1.0])}}),
        _run(tmp_path / "b.json", "d2", {"qwen3": {"fp32": _cell([3.0], [2.0], [0.9], [1.0])},
                                         "gemma3": {"bf16": _cell([1.0], [1.0], [1.0], [1.0])}}),
        _run(tmp_path / "c.json", "d3", {"qwen3": {"fp32": _cell([1.8], [1.2], [1.0], [0.8])}}),
    ]
    out = tmp_path / "merged.md"
    assert across.main([str(p) for p in runs] + ["--title", "t", "--out", str(out)]) == 0
    merged = json.loads(out.with_suffix(".json").read_text())["cells"]
    assert list(merged) == ["qwen3/fp32"]  # gemma3 has no dtype timed in every run
    prefill, decode = merged["qwen3/fp32"]["prefill"], merged["qwen3/fp32"]["decode"]
    assert prefill["ratios"] == pytest.approx([2.0, 1.5, 1.5]) and prefill["median"] == pytest.approx(1.5)
    assert prefill["pooled_ratio"] == pytest.approx(1.8 / 1.0)
    assert decode["ratios"] == pytest.approx([0.8, 0.9, 1.25]) and decode["median"] == pytest.approx(0.9)
    assert decode["pooled_ratio"] == pytest.approx(0.9 / 0.8)
    table = out.read_text()
    assert "| qwen3 | fp32 | 2.00 / 1.50 / 1.50 | 1.50x | 1.80x | 0.80 / 0.90 / 1.25 | 0.90x | 1.12x |" in table
    assert "under 1.0x: qwen3 fp32 decode (0.90x)." in table


def test_bad_input_is_refused_by_name(across, tmp_path, capsys):
    good = _run(tmp_path / "a.json", "d1", {"qwen3": {"fp32": _cell([1.0], [1.0], [1.0], [1.0])}})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SystemExit, match=r"cannot read .*broken\.json"):
        across.main([str(good), str(broken)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match=r"other\.json is not a bench_dense\.py / bench_moe\.py result"):
        across.main([str(good), str(other)])
    disjoint = _run(tmp_path / "b.json", "d2", {"olmo2": {"fp32": _cell([1.0], [1.0], [1.0], [1.0])}})
    with pytest.raises(SystemExit, match="no architecture and dtype was timed in every run"):
        across.main([str(good), str(disjoint)])
    with pytest.raises(SystemExit) as err:
        across.main([str(good)])
    assert err.value.code == 2 and "give at least two runs" in capsys.readouterr().err
