"""The tour: every registered architecture built tiny from its flagship shape, saved, loaded back through
`AutoModelForCausalLM`, and made to generate. Runs on a CPU in seconds, with no download."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .registry import ARCHITECTURES, Architecture

# Sizes for a tiny model; everything else (layer pattern, norms, RoPE, windows' existence) stays the flagship's.
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16, vocab_size=512,
            num_hidden_layers=6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_WINDOW = 8


def tiny_config(arch: Architecture, **overrides: Any):
    """The architecture's flagship config (its config class defaults), shrunk to TINY sizes."""
    cls = arch.config_class
    fields = {f.name for f in dataclasses.fields(cls)}
    flagship = cls()
    kw = {k: v for k, v in TINY.items() if k in fields}
    # Keep multi-head attention multi-head, and grouped-query attention grouped.
    mha = flagship.num_key_value_heads in (None, flagship.num_attention_heads)
    kw["num_key_value_heads"] = kw["num_attention_heads"] if mha else 2
    if getattr(flagship, "sliding_window", None):
        kw["sliding_window"] = TINY_WINDOW
    kw.update(overrides)
    return cls(**kw)


def describe_layers(config) -> str:
    """Compact attention layout, e.g. '5 sliding(8) + 1 full' or '4 full, 1 NoPE'."""
    counts: dict[str, int] = {}
    for t in config.layer_types:
        counts[t] = counts.get(t, 0) + 1
    parts = [f"{n} {t.replace('_attention', '')}" + (f"({config.sliding_window})" if t == "sliding_attention" else "")
             for t, n in counts.items()]
    nope = sum(not config.layer_uses_rope(i) for i in range(config.num_hidden_layers))
    return " + ".join(parts) + (f", {nope} NoPE" if nope else "")


def tour_one(arch: Architecture, workdir: Path, new_tokens: int = 16, seed: int = 0) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the tour has its own progress bar
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = arch.causal_lm_class(tiny_config(arch)).eval()
    prompt = torch.randint(3, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))
    path = workdir / arch.name
    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        same = torch.equal(model(prompt).logits, loaded(prompt).logits)
        out = loaded.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0)
    return {
        "architecture": arch.name,
        "model_type": arch.model_type,
        "official": ", ".join(arch.official_model_types),
        "class": type(loaded).__name__,
        "layers": describe_layers(loaded.config),
        "params": sum(p.numel() for p in loaded.parameters()),
        "reload_exact": same,
        "generated": out.shape[1] - prompt.shape[1],
        "seconds": round(time.perf_counter() - start, 2),
    }


def run_tour(names: Iterable[str] | None = None, out_dir: str | None = None, new_tokens: int = 16,
             progress: bool = True) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    archs = [ARCHITECTURES[n] for n in (names or ARCHITECTURES)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(out_dir) if out_dir else Path(tmp)
        for arch in tqdm(archs, desc="tour", disable=not progress):
            rows.append(tour_one(arch, workdir, new_tokens))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ["architecture", "official", "class", "layers", "params", "reload_exact", "generated", "seconds"]
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def add_parser(sub) -> None:
    from .registry import ARCHITECTURES

    tour = sub.add_parser("tour", help="build every architecture tiny from its flagship shape, save, reload "
                                       "through AutoModelForCausalLM and generate (the default command)")
    tour.add_argument("--arch", action="append", choices=sorted(ARCHITECTURES),
                      help="only this architecture (repeatable; default: all)")
    tour.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per model (default: 16)")
    tour.add_argument("--out", help="keep the saved tiny models in this directory (default: a temporary one)")
    tour.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    tour.add_argument("--quiet", action="store_true", help="no progress bar")
    tour.set_defaults(func=_cmd_tour)


def _cmd_tour(args) -> int:
    import json
    import sys

    rows = run_tour(args.arch or None, out_dir=args.out, new_tokens=args.new_tokens, progress=not args.quiet)
    print(json.dumps(rows, indent=2) if args.format == "json" else format_table(rows))
    failed = [r["architecture"] for r in rows if not r["reload_exact"] or r["generated"] != args.new_tokens]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0
