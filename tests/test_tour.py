"""`hf-archs tour`: tiny models of every architecture end to end, then the report (on a reduced set here)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import needs

import hf_archs
from hf_archs.cli import main
from hf_archs.tour import TINY, encode, run_tour, split_text, tiny_config, tour_text

ARCHS = sorted(hf_archs.ARCHITECTURES)
# A reduced set for the end-to-end run: dense, sliding window, MoE.
REDUCED = ["qwen3", "gemma3", "qwen3_moe"]


@pytest.mark.parametrize("name", ARCHS)
def test_tiny_config_is_tiny_and_keeps_every_block(name):
    needs(name)
    arch = hf_archs.ARCHITECTURES[name]
    flagship, tiny = arch.config_class(), tiny_config(arch)
    assert set(tiny.layer_types) == set(flagship.layer_types)
    for window in ("sliding_window", "attention_chunk_size"):
        if getattr(flagship, window, None):
            assert getattr(tiny, window) < 16, window
    model = arch.causal_lm_class(tiny)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    # Blocks present in the flagship are present tiny: MoE stays MoE (fewer experts), MLA stays MLA.
    from hf_archs.layers.moe import Experts

    with torch.device("meta"):
        big = arch.causal_lm_class(flagship)
    assert any(isinstance(m, Experts) for m in model.modules()) == any(isinstance(m, Experts) for m in big.modules())
    assert {type(m).__name__ for m in model.modules()} == {type(m).__name__ for m in big.modules()}


def test_text_is_shipped_and_tokenised_as_bytes():
    text = tour_text()
    assert len(text) > 2000 and text.isascii()
    ids = encode(text, TINY["vocab_size"])
    assert ids.min() >= 3 and ids.max() < TINY["vocab_size"] and len(ids) == len(text.encode())
    train, held_out = split_text(ids, 64)
    assert train.shape[1] == held_out.shape[1] == 64 and len(held_out) >= 1 and len(train) > len(held_out)
    assert torch.equal(held_out[-1], ids[(len(train) + len(held_out) - 1) * 64:(len(train) + len(held_out)) * 64])


def test_tour_end_to_end_on_a_reduced_set(tmp_path):
    result = run_tour(REDUCED, report_dir=tmp_path / "report", new_tokens=4, progress=False, steps=3)
    assert [r["architecture"] for r in result.rows] == REDUCED
    for r in result.rows:
        assert r["reload_exact"] is True and r["generated"] == 4
        assert r["class"] == hf_archs.ARCHITECTURES[r["architecture"]].causal_lm_class.__name__
        assert len(r["lora_loss"]) == 3 and r["lora_loss"][-1] < r["lora_loss"][0], r["lora_loss"]
        assert r["lora_trainable"] > 0
        assert math.isfinite(r["ppl_before"]) and math.isfinite(r["ppl_after_lora"])
    # The comparison covers the toured architectures' flagships.
    compared = {r["name"] for r in result.comparison}
    assert {"qwen3-32b", "gemma-3-27b"} <= compared
    assert all(r["architecture"] in REDUCED for r in result.comparison)
    out = tmp_path / "report"
    assert {p.name for p in result.files} == {"report.md", "summary.json", "cache_vs_context.png",
                                              "params_total_vs_active.png"}
    report = (out / "report.md").read_text()
    assert "qwen3-32b" in report and "![cache vs context](cache_vs_context.png)" in report
    assert "Counting conventions" in report and "https://huggingface.co/Qwen/Qwen3-32B/blob/main/config.json" in report
    summary = json.loads((out / "summary.json").read_text())
    assert [r["architecture"] for r in summary["tour"]] == REDUCED
    assert {r["name"] for r in summary["comparison"]} == compared
    for png in ("cache_vs_context.png", "params_total_vs_active.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_tour_command_json_and_report_location(tmp_path, capsys):
    out = tmp_path / "tour"
    assert main(["tour", "--arch", "qwen3", "--quiet", "--format", "json", "--new-tokens", "3", "--lora-steps", "1",
                 "--out", str(out), "--no-compare"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)  # only JSON on stdout
    assert [r["architecture"] for r in rows] == ["qwen3"] and rows[0]["generated"] == 3
    assert f"Report: {(out / 'report.md').resolve()}" in captured.err
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()


def test_tour_command_table_says_where_the_report_is(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["tour", "--arch", "smollm3", "--quiet", "--new-tokens", "2", "--lora-steps", "1", "--out", str(out),
                 "--no-compare"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:3] == ["architecture", "layers", "params"]
    assert "smollm3" in text and "1 NoPE" in text
    assert text.strip().endswith(f"Report: {(out / 'report.md').resolve()}")


def test_tour_refuses_an_architecture_that_cannot_be_built(monkeypatch):
    from hf_archs.registry import Architecture

    monkeypatch.setitem(hf_archs.ARCHITECTURES, "broken", Architecture("broken", "does_not_exist", "X", "Y", "Z",
                                                                       ("broken",)))
    with pytest.raises(ValueError, match="architecture 'broken' is registered but its classes do not import"):
        run_tour(["broken"], progress=False)
