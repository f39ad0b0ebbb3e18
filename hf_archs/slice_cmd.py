"""`hf-archs slice`: cut a smaller Gemma 3n model out of a larger one (MatFormer), from the command line."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

_EPILOG = """\
examples:
  hf-archs slice gemma-3n-E4B e2b --preset E2B          # the released E2B, cut out of E4B
  hf-archs slice gemma-3n-E4B e3b --ffn-dims 8192 --skip-layers 20-24 --dtype bfloat16
  hf-archs slice my-saved-model smaller --ffn-dims 8192,16384,keep,...   # one entry per layer of the source

The source is an official gemma3n / gemma3n_text release directory (loaded with from_official: the text decoder
only) or a directory written by save_pretrained from an hf_archs Gemma 3n model. The output is written with
save_pretrained (model_type hfa_gemma3n; load it with AutoModelForCausalLM.from_pretrained after `import hf_archs`);
tokenizer files and the chat template of the source are copied along.
"""

# Files that describe how to use the model rather than the model itself: copied to the output as they are.
_SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "chat_template.json")


def add_parser(sub) -> None:
    from .matformer import PRESETS

    p = sub.add_parser(
        "slice", help="cut a smaller Gemma 3n model out of a larger one (MatFormer: E2B or Mix-n-Match out of E4B)",
        description="Cut a smaller Gemma 3n model out of a larger one (MatFormer): keep a prefix of each layer's "
                    "FFN hidden units and drop whole layers, keeping per-layer embeddings, KV sharing, the "
                    "sliding/full pattern and activation sparsity consistent. Prints the parameter count before "
                    "and after.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="official gemma3n release directory, or a saved hf_archs Gemma 3n model")
    p.add_argument("output", type=Path, help="directory to write the sliced model to (must not hold a model yet)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a named cut of E4B (35 layers): E2B is the released E2B; the others are Mix-n-Match cuts "
                        "from google/gemma3n-slicing-configs")
    p.add_argument("--ffn-dims", metavar="W[,W...]",
                   help="FFN width per layer of the source, comma-separated ('keep' keeps a layer's width; entries "
                        "of skipped layers are ignored), or one width for every layer")
    p.add_argument("--skip-layers", metavar="I[,I-J...]", default="",
                   help="layer indices of the source to drop, comma-separated, ranges inclusive (e.g. 20-24)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="cast the sliced model before saving (default: keep the source's dtype)")
    p.set_defaults(func=_cmd_slice)


def _parse_layers(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError:
            raise ValueError(f"--skip-layers: {part!r} is not a layer index or a range like 20-24") from None
    return out


def _parse_widths(text: str, num_layers: int) -> list[int | None]:
    parts = [s.strip() for s in text.split(",")]
    try:
        widths = [None if s == "keep" else int(s) for s in parts]
    except ValueError:
        raise ValueError(f"--ffn-dims: {text!r} must be comma-separated integers or 'keep'") from None
    return widths * num_layers if len(widths) == 1 else widths


def _load(source: Path):
    import hf_archs
    from transformers import AutoModelForCausalLM

    from .official import read_config

    model_type = read_config(source).get("model_type")
    arch = hf_archs.ARCHITECTURES["gemma3n"]
    if model_type == arch.model_type:
        return AutoModelForCausalLM.from_pretrained(source), "saved hf_archs model"
    if model_type in arch.official_model_types:
        return hf_archs.from_official(source), f"official {model_type} release, text decoder"
    raise ValueError(f"{source}: model_type {model_type!r} is not Gemma 3n (expected one of "
                     f"{[arch.model_type, *arch.official_model_types]})")


def _cmd_slice(args: argparse.Namespace) -> int:
    import torch

    from .errors import CheckpointError, ConfigError
    from .matformer import PRESETS, CutError, count_parameters, slice

    try:
        if args.preset and (args.ffn_dims or args.skip_layers):
            raise ValueError("--preset cannot be combined with --ffn-dims or --skip-layers")
        if not (args.preset or args.ffn_dims or args.skip_layers):
            raise ValueError("nothing to cut: give --preset, or --ffn-dims and/or --skip-layers")
        if args.output.exists() and (args.output / "config.json").exists():
            raise ValueError(f"{args.output} already holds a model (config.json); choose another output directory")
        skip = _parse_layers(args.skip_layers)
        model, kind = _load(args.source)
        n = model.config.num_hidden_layers
        if args.preset:
            cut = PRESETS[args.preset]
            if n != cut.num_layers:
                raise CutError(f"preset {args.preset!r} cuts a {cut.num_layers}-layer model (E4B); "
                               f"{args.source} has {n} layers")
            ffn_dims, skip = cut.ffn_dims, list(cut.skip_layers)
        else:
            ffn_dims = _parse_widths(args.ffn_dims, n) if args.ffn_dims else None
        before = count_parameters(model)
        print(f"source: {args.source} ({kind}): {n} layers, {before:,} parameters")
        sliced = slice(model, ffn_dims, skip)
        del model
        if args.dtype:
            sliced = sliced.to(getattr(torch, args.dtype))
        after = count_parameters(sliced)
        c = sliced.config
        print(f"sliced: {c.num_hidden_layers} layers (skipped {sorted(skip) or 'none'}), FFN widths "
              f"{_widths_summary(c.intermediate_size)}, {c.num_kv_shared_layers} KV-shared layers")
        print(f"parameters: {before:,} -> {after:,} ({after / before:.1%} of the source)")
        args.output.mkdir(parents=True, exist_ok=True)
        sliced.save_pretrained(args.output)
        for name in _SIDE_FILES:
            if (args.source / name).is_file():
                shutil.copy2(args.source / name, args.output / name)
        assert json.loads((args.output / "config.json").read_text())["model_type"] == c.model_type
        print(f"wrote {args.output}")
        return 0
    except (CutError, CheckpointError, ConfigError, ValueError, TypeError) as err:
        print(f"hf-archs slice: error: {err}", file=sys.stderr)
        return 2


def _widths_summary(widths: list[int]) -> str:
    """'8192 x 30', or the run-length form '16384 x 2, 8192 x 28'."""
    runs: list[list[int]] = []
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    return ", ".join(f"{w} x {k}" for w, k in runs)
