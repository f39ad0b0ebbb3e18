"""Merge the results of several runs (separate processes) of bench_dense.py or bench_moe.py made with the same options.

On the shared development VM the speed of a whole process moves by 10-30 % from one process to the next (a plain
GEMV sweep over 110 MB of weights: 10.0 and 13.4 ms a minute apart), and within one process the per-round times of
one model spread by ~15 %. Interleaving cancels most of that inside a run, but a cell whose two sides run the same
kernels still lands anywhere in about 0.9-1.05x from one process to the next. This script puts the runs side by
side: per architecture and dtype, the ratio (transformers / ours, of the minima) of each run, their median, and the
ratio of the pooled minima (each side's minimum over every round of every run).

    python bench/across_runs.py /tmp/runs/dense_r1.json /tmp/runs/dense_r2.json /tmp/runs/dense_r3.json \\
        --out bench/results/dense-3runs.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

PHASES = (("prefill", "prefill_s"), ("decode", "decode_s_per_token"))


def load(paths: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"error: cannot read {path}: {err}") from None
        if "archs" not in runs[-1] or "machine" not in runs[-1]:
            raise SystemExit(f"error: {path} is not a bench_dense.py / bench_moe.py result (no 'archs' / 'machine')")
    return runs


def cells(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(architecture label, dtype) pairs timed in every run, in the first run's order."""
    out = []
    for label, entry in runs[0]["archs"].items():
        for dtype in (entry.get("dtypes") or {}):
            if all(dtype in ((r["archs"].get(label) or {}).get("dtypes") or {}) for r in runs[1:]):
                out.append((label, dtype))
    return out


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for label, dtype in cells(runs):
        cell: dict[str, Any] = {}
        for phase, key in PHASES:
            entries = [r["archs"][label]["dtypes"][dtype] for r in runs]
            ratios = [e[f"{phase}_ratio"] for e in entries]
            pooled = {side: min(t for e in entries for t in e["raw"][side][key]) for side in ("transformers", "ours")}
            cell[phase] = {"ratios": ratios, "median": statistics.median(ratios),
                           "paired_medians": [e["raw"].get(f"{phase}_paired_ratio_median") for e in entries],
                           "pooled_min_s": pooled, "pooled_ratio": pooled["transformers"] / pooled["ours"]}
        merged[f"{label}/{dtype}"] = {"arch": label, "dtype": dtype, **cell}
    return merged


def markdown(runs: list[dict[str, Any]], merged: dict[str, Any], title: str) -> str:
    m = runs[0]["machine"]
    revisions = sorted({r["machine"].get("git", "?") for r in runs})
    lines = [f"# hf_archs vs transformers across {len(runs)} runs: {title}", "",
             f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch thread(s); "
             f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, hf_archs {m['hf_archs']} "
             f"(git {', '.join(revisions)}).",
             "- Runs (one process each, same options): " + "; ".join(
                 f"{r['machine']['date']} (load {r['machine']['loadavg_start']})" for r in runs) + ".",
             f"- Options of the first run: {runs[0]['args'].get('note') or ''}".rstrip(": ") + ".",
             "- ratio = transformers / ours (> 1: ours faster), of each run's minima; median over the runs; pooled = "
             "each side's minimum over every round of every run.", "",
             "| arch | dtype | prefill ratio per run | median | pooled | decode ratio per run | median | pooled |",
             "|---|---|---|---:|---:|---|---:|---:|"]
    for cell in merged.values():
        row = [cell["arch"], cell["dtype"]]
        for phase, _ in PHASES:
            c = cell[phase]
            row += [" / ".join(f"{x:.2f}" for x in c["ratios"]), f"{c['median']:.2f}x", f"{c['pooled_ratio']:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    below = [f"{c['arch']} {c['dtype']} {phase} ({c[phase]['median']:.2f}x)" for c in merged.values()
             for phase, _ in PHASES if c[phase]["median"] < 1.0]
    lines += ["", "Cells whose median over the runs is under 1.0x: " + (", ".join(below) if below else "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python bench/across_runs.py r1.json r2.json r3.json --out merged.md")
    p.add_argument("results", nargs="+", type=Path, help="the .json files that bench_dense.py / bench_moe.py --out "
                                                          "wrote beside their tables (two or more)")
    p.add_argument("--title", default="side by side", help="what the runs measured, for the heading")
    p.add_argument("--out", type=Path, help="also write the table here (and the merged numbers as .json beside it)")
    args = p.parse_args(argv)
    if len(args.results) < 2:
        p.error("give at least two runs")
    runs = load(args.results)
    merged = merge(runs)
    if not merged:
        raise SystemExit("error: no architecture and dtype was timed in every run")
    table = markdown(runs, merged, args.title)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps({"runs": [str(r) for r in args.results],
                                                             "cells": merged}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
