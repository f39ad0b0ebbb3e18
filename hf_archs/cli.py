"""The `hf-archs` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

# Each subcommand lives in its own module with `add_parser(subparsers)`; the first one is the default command.
# A module listed here that is not written yet is skipped; one that exists must import cleanly.
COMMAND_MODULES = ["tour", "compare", "convert", "finetune", "evaluate", "slice_cmd", "registry_cmd"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-archs",
        description="The open-weight LLM architectures of 2025 as transformers plugins.",
    )
    parser.add_argument("--version", action="version", version=f"hf_archs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"hf_archs.{name}") is not None:
            importlib.import_module(f"hf_archs.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["tour", *(argv or [])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
