"""LoRA on the routed experts of an MoE model: per-expert low-rank factors computed on the routed tokens only
(hf_archs.layers.lora_experts), next to attention and shared-expert adapters; the adapter is saved, reloaded with
PEFT's own API onto a fresh base, and merged.

    python examples/finetune_moe_experts.py --tiny               # CPU, a tiny random Qwen3-MoE
    python examples/finetune_moe_experts.py --model DIR --train-file data.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

import hf_archs
from hf_archs.finetune import finetune, synthetic_task, tiny_model, write_records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--arch", default="qwen3_moe")
    p.add_argument("--model")
    p.add_argument("--train-file")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # lora_targets logs every adapted tensor
    out = Path(tempfile.mkdtemp(prefix="hfa-moe-"))
    if args.tiny:
        if args.arch not in hf_archs.ARCHITECTURES:
            raise SystemExit(f"{args.arch} is not registered in this version of hf_archs")
        train = write_records(synthetic_task("shift", 1000, seed=0), out / "train.jsonl")
        setup = dict(tiny=args.arch, tiny_init_std=0.2, chat_template=False, lr=1e-2, batch_size=32)
    else:
        if not (args.model and args.train_file):
            p.error("pass --tiny, or --model and --train-file")
        train, setup = Path(args.train_file), dict(model=args.model, lr=2e-4, batch_size=8)
    summary = finetune(train_file=str(train), max_steps=args.steps, experts="on", attention="on",
                       output_dir=str(out), save=str(out / "adapter"), progress=True, **setup)
    print(json.dumps({"final_loss": summary["final_loss"], "lora_targets": summary["settings"]["lora_targets"]}))

    from peft import PeftModel

    if args.tiny:
        base = tiny_model(args.arch, 512, seed=0, initializer_range=0.2)  # the same random base as the run
        reloaded = PeftModel.from_pretrained(base, out / "adapter").eval()
        ids = torch.tensor([[1, 70, 71, 72, 34]])
        with torch.no_grad():
            adapted = reloaded(ids).logits
            merged = reloaded.merge_and_unload()(ids).logits
        print(json.dumps({"reloaded_vs_merged_max_diff": float((adapted - merged).abs().max())}))


if __name__ == "__main__":
    main()
