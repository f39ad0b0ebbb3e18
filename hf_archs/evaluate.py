"""`hf-archs evaluate` (alias `hf-archs eval`): perplexity, multiple choice, exact match and lm-evaluation-harness
tasks on local files, for a model directory with an optional LoRA adapter; results as JSON with every setting,
optionally appended to a model card."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def load_for_eval(model: str | None, adapter: str | None = None, tokenizer: str | None = None,
                  tiny: str | None = None, dtype: str = "fp32", seed: int = 0):
    """(model, tokenizer): a model directory (or `tiny` architecture), with a PEFT adapter applied if given."""
    from .finetune import build_tokenizer, load_model, tiny_model

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if tiny:
        tok = build_tokenizer() if tokenizer in (None, "builtin") else _auto_tokenizer(tokenizer)
        m = tiny_model(tiny, len(tok), seed=seed).to(torch_dtype)
    else:
        if model is None:
            raise ValueError("pass --model DIR or --tiny ARCH")
        m = load_model(model, torch_dtype)
        tok = build_tokenizer() if tokenizer == "builtin" else _auto_tokenizer(tokenizer or adapter or model)
    if adapter:
        import hf_archs.lora  # noqa: F401 - registers the experts LoRA layer with PEFT
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, adapter)
    return m.eval(), tok


def _auto_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def run(args: argparse.Namespace) -> dict[str, Any]:
    from . import eval as ev

    model, tok = load_for_eval(args.model, args.adapter, args.tokenizer, args.tiny, args.dtype, args.seed)
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    if args.perplexity:
        r = ev.perplexity(model, tok, args.perplexity, max_length=args.max_length, stride=args.stride,
                          text_field=args.text_field)
        metrics["perplexity"] = {k: r[k] for k in ("perplexity", "nll_per_token", "tokens_scored", "windows")}
        details["perplexity"] = r["settings"] | {"file": args.perplexity}
    if args.multiple_choice:
        r = ev.multiple_choice(model, tok, args.multiple_choice, question_field=args.question_field,
                               choices_field=args.choices_field, answer_field=args.answer_field,
                               chat_template=args.chat_template)
        metrics["multiple_choice"] = {k: r[k] for k in ("accuracy", "accuracy_norm", "n")}
        details["multiple_choice"] = r["settings"] | {"file": args.multiple_choice}
    if args.exact_match:
        r = ev.exact_match(model, tok, args.exact_match, prompt_field=args.prompt_field,
                           answer_field=args.completion_field, chat_template=args.chat_template,
                           max_new_tokens=args.max_new_tokens)
        metrics["exact_match"] = {k: r[k] for k in ("exact_match", "correct", "n")}
        details["exact_match"] = r["settings"] | {"file": args.exact_match, "examples": r["examples"]}
    if args.lm_eval_tasks:
        r = ev.run_lm_eval(model, tok, args.lm_eval_tasks.split(","), include_path=args.lm_eval_include,
                           limit=args.limit)
        metrics.update({f"lm_eval.{t}": m for t, m in r["results"].items()})
        details["lm_eval"] = r["settings"]
    if not metrics:
        raise SystemExit("nothing to evaluate: pass --perplexity, --multiple-choice, --exact-match or --lm-eval-tasks")
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings["torch"] = torch.__version__
    return {"metrics": metrics, "settings": settings, "details": details}


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", aliases=["eval"], help="perplexity, multiple choice, exact match and "
                                                          "lm-evaluation-harness tasks on local files",
                       description=__doc__)
    g = p.add_argument_group("model")
    g.add_argument("--model", help="model directory (this package's layout or an official release)")
    g.add_argument("--tiny", metavar="ARCH", help="a tiny random model instead (smoke tests)")
    g.add_argument("--adapter", help="PEFT adapter directory to apply (hf-archs finetune --save)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the adapter's, else the model's; "
                                       "'builtin' = the package's character tokenizer)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("tasks (local files read with datasets)")
    g.add_argument("--perplexity", metavar="FILE", help="text file (txt, or json/jsonl/csv/parquet with --text-field)")
    g.add_argument("--max-length", type=int, default=1024, help="perplexity window")
    g.add_argument("--stride", type=int, default=512, help="perplexity stride")
    g.add_argument("--text-field", default="text")
    g.add_argument("--multiple-choice", metavar="FILE", help="records with question, choices, answer")
    g.add_argument("--question-field", default="question")
    g.add_argument("--choices-field", default="choices")
    g.add_argument("--answer-field", default="answer")
    g.add_argument("--exact-match", metavar="FILE", help="records with prompt and completion (or messages)")
    g.add_argument("--prompt-field", default="prompt")
    g.add_argument("--completion-field", default="completion")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false")
    g.add_argument("--lm-eval-tasks", help="comma-separated lm-evaluation-harness tasks (needs lm_eval)")
    g.add_argument("--lm-eval-include", help="directory of task YAMLs (local data files)")
    g.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    g = p.add_argument_group("output")
    g.add_argument("--output", default="eval_results.json", help="results JSON (default: eval_results.json)")
    g.add_argument("--model-card", help="append the results to this README.md")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .eval import write_results, write_to_model_card

    results = run(args)
    write_results(results, args.output)
    if args.model_card:
        write_to_model_card(results, args.model_card)
    print(json.dumps(results["metrics"], indent=1))
    logger.info("results written to %s", Path(args.output))
    return 0
