"""Which tensors `hf_archs.lora_targets` adapts, group by group, for every registered architecture (tiny models
built from each flagship's shape), and the `peft.LoraConfig` arguments it returns.

    python examples/lora_targets.py --tiny
    python examples/lora_targets.py --tiny --arch qwen3_moe --experts on --router on
"""

from __future__ import annotations

import argparse
import logging

import hf_archs
from hf_archs.lora import lora_targets
from hf_archs.tour import tiny_config

CHOICE = {"on": True, "auto": None, "off": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models (the only mode: no weights needed)")
    p.add_argument("--arch", action="append", help="only these architectures")
    for g in ("attention", "mlp", "shared-experts", "experts", "router"):
        p.add_argument(f"--{g}", choices=sorted(CHOICE), default="off" if g in ("experts", "router") else "auto")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    groups = {g: CHOICE[getattr(args, g)] for g in ("attention", "mlp", "shared_experts", "experts", "router")}
    for name in args.arch or sorted(hf_archs.ARCHITECTURES):
        arch = hf_archs.ARCHITECTURES[name]
        model = arch.causal_lm_class(tiny_config(arch))
        try:
            print(f"== {name}: {lora_targets(model, **groups)}")
        except ValueError as err:
            print(f"== {name}: {err}")


if __name__ == "__main__":
    main()
