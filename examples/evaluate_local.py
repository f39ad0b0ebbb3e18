"""Evaluation on local files: strided perplexity, multiple choice by log-likelihood, exact-match generation, and
(when lm_eval is installed) an lm-evaluation-harness task defined on a local file; results as JSON.

    python examples/evaluate_local.py --tiny
    python examples/evaluate_local.py --model DIR [--adapter ADAPTER_DIR] --text corpus.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

from hf_archs import eval as ev
from hf_archs.evaluate import load_for_eval
from hf_archs.finetune import synthetic_task, write_records

TEXT = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
        "Sphinx of black quartz, judge my vow."]
TASK = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--model")
    p.add_argument("--adapter")
    p.add_argument("--text", help="text file for perplexity")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hfa-eval-"))
    model, tok = load_for_eval(args.model, args.adapter, tiny="qwen3" if args.tiny else None)
    text = Path(args.text) if args.text else write_records([{"text": t} for t in TEXT], work / "text.txt")
    mc = write_records([{"question": "2+2=", "choices": ["4", "5"], "answer": 0},
                        {"question": "The sky is", "choices": ["blue", "loud"], "answer": 0}], work / "mc.jsonl")
    em = write_records(synthetic_task("shift", 8, seed=1), work / "em.jsonl")
    results = {"metrics": {
        "perplexity": ev.perplexity(model, tok, text, max_length=64, stride=32),
        "multiple_choice": ev.multiple_choice(model, tok, mc),
        "exact_match": ev.exact_match(model, tok, em, chat_template=False, max_new_tokens=5),
    }, "settings": {"model": args.model or "tiny qwen3", "adapter": args.adapter}}
    if importlib.util.find_spec("lm_eval"):
        tasks = work / "tasks"
        tasks.mkdir()
        (tasks / "local_mc.yaml").write_text(TASK.format(data=mc))
        results["metrics"]["lm_eval"] = ev.run_lm_eval(model, tok, ["local_mc"], include_path=tasks)
    out = ev.write_results(results, args.output or work / "results.json")
    print(json.dumps({k: {m: v for m, v in r.items() if isinstance(v, (int, float))}
                      for k, r in results["metrics"].items()}, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
