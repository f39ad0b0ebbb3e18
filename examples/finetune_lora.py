"""LoRA supervised fine-tuning with the hf_archs recipe, then exact-match evaluation on held-out prompts.

    python examples/finetune_lora.py --tiny                      # CPU, a tiny random model, ~1 minute
    python examples/finetune_lora.py --model DIR --train-file data.jsonl --eval-file heldout.jsonl
    accelerate launch --config_file examples/accelerate/cpu_2proc.yaml examples/finetune_lora.py --tiny

With --tiny the data is a synthetic task the script writes (3-letter words shifted by one letter: "abz=" -> "bca"),
the model a tiny random Qwen3 (any registered architecture with --arch), the tokenizer the package's own
character tokenizer; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hf_archs.finetune import finetune, synthetic_task, write_records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model + synthetic data, runs on a CPU")
    p.add_argument("--arch", default="qwen3", help="--tiny: the architecture")
    p.add_argument("--model", help="model directory (this package's layout or an official release)")
    p.add_argument("--train-file")
    p.add_argument("--eval-file")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--save", default=None, help="write the adapter, tokenizer and model card here")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="hfa-finetune-"))
    if args.tiny:
        train = write_records(synthetic_task("shift", 2000, seed=0), out / "train.jsonl")
        heldout = write_records(synthetic_task("shift", 64, seed=99), out / "heldout.jsonl")
        setup = dict(tiny=args.arch, tiny_init_std=0.2, chat_template=False, lr=1e-2, batch_size=32,
                     max_new_tokens=5, eval_generate=64)
    else:
        if not (args.model and args.train_file):
            p.error("pass --tiny, or --model and --train-file")
        train, heldout = Path(args.train_file), Path(args.eval_file) if args.eval_file else None
        setup = dict(model=args.model, lr=2e-4, batch_size=8, eval_generate=32 if heldout else 0)
    summary = finetune(train_file=str(train), eval_file=str(heldout) if heldout else None, max_steps=args.steps,
                       warmup_steps=max(1, args.steps // 10), eval_steps=args.steps if heldout else 0,
                       output_dir=str(out), save=args.save, **setup)
    first, last = (summary["evals"][0], summary["evals"][-1]) if summary["evals"] else ({}, {})
    print(json.dumps({"output_dir": str(out), "final_train_loss": summary["final_loss"],
                      "heldout_before": first, "heldout_after": last,
                      "loss_plot": str(out / "loss.png"), "log": str(out / "log.json")}, indent=1))


if __name__ == "__main__":
    main()
