"""`hf-archs list`: the registered architectures and the official model_types they load."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    lst = sub.add_parser("list", help="list the registered architectures and the official model_types they load")
    lst.set_defaults(func=_cmd_list)


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import ARCHITECTURES

    for arch in ARCHITECTURES.values():
        print(f"{arch.name:10s} {arch.model_type:14s} official model_type: {', '.join(arch.official_model_types)}")
    return 0
