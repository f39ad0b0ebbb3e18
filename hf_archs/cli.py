"""The `hf-archs` command."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_tour(args: argparse.Namespace) -> int:
    from .tour import format_table, run_tour

    rows = run_tour(args.arch or None, out_dir=args.out, new_tokens=args.new_tokens, progress=not args.quiet)
    print(json.dumps(rows, indent=2) if args.format == "json" else format_table(rows))
    failed = [r["architecture"] for r in rows if not r["reload_exact"] or r["generated"] != args.new_tokens]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import ARCHITECTURES

    for arch in ARCHITECTURES.values():
        print(f"{arch.name:10s} {arch.model_type:14s} official model_type: {', '.join(arch.official_model_types)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .registry import ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog="hf-archs",
        description="The open-weight LLM architectures of 2025 as transformers plugins.",
    )
    parser.add_argument("--version", action="version", version=f"hf_archs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    tour = sub.add_parser("tour", help="build every architecture tiny from its flagship shape, save, reload "
                                       "through AutoModelForCausalLM and generate (the default command)")
    tour.add_argument("--arch", action="append", choices=sorted(ARCHITECTURES),
                      help="only this architecture (repeatable; default: all)")
    tour.add_argument("--new-tokens", type=int, default=16, help="tokens to generate per model (default: 16)")
    tour.add_argument("--out", help="keep the saved tiny models in this directory (default: a temporary one)")
    tour.add_argument("--format", choices=["table", "json"], default="table", help="output format")
    tour.add_argument("--quiet", action="store_true", help="no progress bar")
    tour.set_defaults(func=_cmd_tour)

    lst = sub.add_parser("list", help="list the registered architectures and the official model_types they load")
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["tour", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
