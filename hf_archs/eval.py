"""Evaluation on local data: perplexity (strided sliding window), multiple-choice accuracy by log-likelihood,
exact-match generation accuracy, and an lm-evaluation-harness adapter for an in-memory model.

Every function takes a model already in memory (a CausalLM, a PEFT model, a merged model) and a tokenizer, and
returns a dict that records its settings next to its numbers; `run_suite` gathers several into one JSON-able
result and `write_to_model_card` appends it to a README.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _texts(source: str | os.PathLike | Sequence[str] | Any, text_field: str = "text") -> list[str]:
    """Texts from a local file (read with `datasets`), a `datasets.Dataset`, or a list of strings."""
    if isinstance(source, (str, os.PathLike)):
        from .finetune import load_records

        source = load_records(source)
    if isinstance(source, Sequence) and (not source or isinstance(source[0], str)):
        return list(source)
    return [r[text_field] for r in source]


def _records(source: str | os.PathLike | Sequence[dict[str, Any]] | Any) -> list[dict[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        from .finetune import load_records

        source = load_records(source)
    return [dict(r) for r in source]


# ----------------------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, source: str | os.PathLike | Sequence[str] | Any, max_length: int = 1024,
               stride: int = 512, text_field: str = "text", joiner: str = "\n\n",
               add_bos: bool = True) -> dict[str, Any]:
    """Perplexity of the joined texts with the strided sliding window of the transformers documentation
    ("Perplexity of fixed-length models"): windows of `max_length` tokens starting every `stride` tokens; in
    each window only the tokens not scored by the previous window are targets (the rest is context, labels
    masked), and every token except the very first is scored exactly once. Counted after the shift: a window
    scores its last `trg_len` positions that have a previous token in the window.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in (0, max_length = {max_length}], got {stride}")
    texts = _texts(source, text_field)
    ids = tokenizer(joiner.join(texts), add_special_tokens=False)["input_ids"]
    if add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    ids_t = torch.tensor(ids, dtype=torch.long)
    was_training = model.training
    model.eval()
    nll, count, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end  # tokens not yet scored
        window = ids_t[begin:end].unsqueeze(0).to(_device(model))
        labels = window.clone()
        labels[:, :-trg_len] = -100
        logits = model(window).logits.float()
        shift_labels = labels[:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((shift_labels != -100).sum())
        windows += 1
        prev_end = end
        if end == len(ids):
            break
    model.train(was_training)
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens_scored": count, "tokens": len(ids),
            "windows": windows, "settings": {"max_length": max_length, "stride": stride, "joiner": joiner,
                                             "add_bos": add_bos, "texts": len(texts)}}


# ----------------------------------------------------------------------------------------------------------------
# Prompts shared with the fine-tuning recipe
# ----------------------------------------------------------------------------------------------------------------
def prompt_ids(tokenizer, prompt: str | list[dict[str, str]], chat_template: bool) -> list[int]:
    """Token ids of a prompt exactly as `hf_archs.finetune` formats it for training: the chat template with the
    assistant header, or bos + plain text."""
    if chat_template:
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _prompt_and_answer(record: dict[str, Any], prompt_field: str, answer_field: str, messages_field: str
                       ) -> tuple[str | list[dict[str, str]], str]:
    if record.get(messages_field):
        msgs = list(record[messages_field])
        return msgs[:-1], msgs[-1]["content"]
    return str(record[prompt_field]), str(record[answer_field])


# ----------------------------------------------------------------------------------------------------------------
# Exact-match generation
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[list[int]], max_new_tokens: int, eos_token_id: int | None,
                    pad_token_id: int) -> list[list[int]]:
    """Greedy continuation of each prompt (left-padded batch, no sampling); stops at eos."""
    device = _device(model)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    result = []
    for row in out[:, width:].tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[:row.index(eos_token_id)]
        result.append(row)
    return result


def exact_match(model: nn.Module, tokenizer, source: str | os.PathLike | Sequence[dict[str, Any]] | Any,
                prompt_field: str = "prompt", answer_field: str = "completion", messages_field: str = "messages",
                chat_template: bool = True, max_new_tokens: int = 32, batch_size: int = 16,
                normalize: bool = True, keep_examples: int = 5) -> dict[str, Any]:
    """Share of records whose greedy completion equals the reference answer (whitespace-stripped, and
    case-folded with `normalize`)."""
    records = _records(source)
    was_training = model.training
    model.eval()
    hits, examples = 0, []
    norm = (lambda s: " ".join(s.split()).casefold()) if normalize else (lambda s: s.strip())
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        pairs = [_prompt_and_answer(r, prompt_field, answer_field, messages_field) for r in chunk]
        prompts = [prompt_ids(tokenizer, p, chat_template) for p, _ in pairs]
        outs = greedy_generate(model, prompts, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
        for (p, ref), out in zip(pairs, outs):
            pred = tokenizer.decode(out, skip_special_tokens=True)
            ok = norm(pred) == norm(ref)
            hits += ok
            if len(examples) < keep_examples:
                examples.append({"prompt": p if isinstance(p, str) else p[-1]["content"], "reference": ref,
                                 "prediction": pred, "correct": ok})
    model.train(was_training)
    return {"exact_match": hits / max(len(records), 1), "correct": hits, "n": len(records), "examples": examples,
            "settings": {"chat_template": chat_template, "max_new_tokens": max_new_tokens, "normalize": normalize,
                         "prompt_field": prompt_field, "answer_field": answer_field}}


# ----------------------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def continuation_logprobs(model: nn.Module, context: list[int], continuations: Sequence[list[int]]
                          ) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens after `context` (one padded batch)."""
    device = _device(model)
    rows = [context + c for c in continuations]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    logprobs = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
    out = []
    for i, c in enumerate(continuations):
        pos = torch.arange(len(context) - 1, len(context) - 1 + len(c), device=device)
        out.append(float(logprobs[i, pos, torch.tensor(c, device=device)].sum()))
    return out


def multiple_choice(model: nn.Module, tokenizer, source: str | os.PathLike | Sequence[dict[str, Any]] | Any,
                    question_field: str = "question", choices_field: str = "choices", answer_field: str = "answer",
                    chat_template: bool = False, choice_prefix: str = " ") -> dict[str, Any]:
    """Accuracy of picking the choice with the highest log-likelihood after the question (`accuracy`), and of
    the highest log-likelihood per character (`accuracy_norm`, lm-evaluation-harness's acc_norm). The answer
    is the index of the right choice or its text."""
    records = _records(source)
    was_training = model.training
    model.eval()
    hit = hit_norm = 0
    for r in records:
        choices = list(r[choices_field])
        answer = r[answer_field]
        gold = choices.index(answer) if isinstance(answer, str) and not str(answer).isdigit() else int(answer)
        context = prompt_ids(tokenizer, str(r[question_field]), chat_template)
        conts = [tokenizer(choice_prefix + str(c), add_special_tokens=False)["input_ids"] for c in choices]
        scores = continuation_logprobs(model, context, conts)
        hit += int(max(range(len(choices)), key=lambda i: scores[i]) == gold)
        normed = [s / max(1, len(choice_prefix + str(c))) for s, c in zip(scores, choices)]
        hit_norm += int(max(range(len(choices)), key=lambda i: normed[i]) == gold)
    model.train(was_training)
    n = max(len(records), 1)
    return {"accuracy": hit / n, "accuracy_norm": hit_norm / n, "n": len(records),
            "settings": {"chat_template": chat_template, "choice_prefix": choice_prefix,
                         "question_field": question_field, "choices_field": choices_field}}


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional extra)
# ----------------------------------------------------------------------------------------------------------------
def lm_eval_model(model: nn.Module, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """An lm-evaluation-harness `LM` for a model already in memory (no download, no reload): its `HFLM` with the
    instance as `pretrained`."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise ImportError("lm-evaluation-harness is not installed: pip install lm_eval (the [eval] extra)") from err
    kwargs = {"max_length": max_length} if max_length else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def run_lm_eval(model: nn.Module, tokenizer, tasks: Sequence[str], include_path: str | os.PathLike | None = None,
                batch_size: int = 8, limit: int | None = None, num_fewshot: int | None = None,
                include_defaults: bool | None = None) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks (built-in names, or task YAMLs under `include_path` reading local files)
    on an in-memory model; returns the per-task metrics and the settings. With an `include_path` the harness's
    own task index (thousands of YAMLs, slow to scan) is skipped unless `include_defaults=True`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_defaults is None:
        include_defaults = include_path is None
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)
    out = lm_eval.simple_evaluate(model=lm_eval_model(model, tokenizer, batch_size), tasks=list(tasks),
                                  task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False)

    def plain(v: Any) -> Any:
        return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)

    return {"results": {t: {k: plain(v) for k, v in m.items()} for t, m in out["results"].items()},
            "settings": {"tasks": list(tasks), "include_path": str(include_path) if include_path else None,
                         "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                         "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}}


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------
def write_results(results: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


def write_to_model_card(results: dict[str, Any], card: str | os.PathLike) -> Path:
    """Append (or replace) an `## Evaluation` section with the results and their settings in a README.md."""
    card = Path(card)
    text = card.read_text() if card.exists() else ""
    marker = "\n## Evaluation (hf-archs evaluate)\n"
    if marker in text:
        text = text[:text.index(marker)]
    lines = [marker, "| metric | value |", "|---|---|"]
    for name, res in results.get("metrics", {}).items():
        for k, v in res.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"| {name}.{k} | {v:.6g} |")
    lines += ["", "Settings:", "", "```json", json.dumps(results.get("settings", {}), indent=1, default=str), "```", ""]
    card.write_text(text.rstrip("\n") + "\n" + "\n".join(lines))
    return card


__all__ = ["continuation_logprobs", "exact_match", "greedy_generate", "lm_eval_model", "multiple_choice",
           "perplexity", "prompt_ids", "run_lm_eval", "write_results", "write_to_model_card"]
