"""Evaluation: strided perplexity against a brute-force token-by-token computation, multiple choice and exact
match on local files, the lm-evaluation-harness adapter on a task defined on local files, results JSON and the
model card, and the `hf-archs evaluate` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_archs.eval import (
    continuation_logprobs,
    exact_match,
    multiple_choice,
    perplexity,
    prompt_ids,
    write_to_model_card,
)
from hf_archs.finetune import build_tokenizer, tiny_model, write_records

TEXT = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
        "Sphinx of black quartz, judge my vow."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3", 512, seed=0, num_hidden_layers=2, initializer_range=0.2).eval()


def brute_force_perplexity(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """Each token scored alone: one forward over exactly the context the strided method gives it (the tokens
    from the start of the window that first scores it), the log-probability read at the last position."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        for p in range(max(prev_end, begin + 1), end):  # tokens first scored by this window
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:p]])).logits[0, -1].double()
            nll -= float(torch.log_softmax(logits, -1)[ids[p]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("max_length,stride", [(32, 32), (32, 8), (48, 20)])
def test_strided_perplexity_equals_token_by_token(model, tok, tmp_path, max_length, stride):
    path = write_records([{"text": t} for t in TEXT], tmp_path / "text.txt")
    r = perplexity(model, tok, path, max_length=max_length, stride=stride)
    ids = [tok.bos_token_id] + tok("\n\n".join(TEXT), add_special_tokens=False)["input_ids"]
    expected, count = brute_force_perplexity(model, ids, max_length, stride)
    assert r["tokens"] == len(ids) and r["tokens_scored"] == count
    # Overlapping windows score every token but the very first; disjoint ones miss each window's first token.
    assert count == len(ids) - (r["windows"] if stride == max_length else 1)
    assert r["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert r["settings"]["stride"] == stride and r["settings"]["max_length"] == max_length


def test_more_context_changes_perplexity(model, tok):
    short = perplexity(model, tok, TEXT, max_length=16, stride=15)
    overlapping = perplexity(model, tok, TEXT, max_length=16, stride=4)
    assert short["tokens_scored"] == overlapping["tokens_scored"] == short["tokens"] - 1
    assert short["perplexity"] != pytest.approx(overlapping["perplexity"], rel=1e-6)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, TEXT, max_length=16, stride=32)


def test_perplexity_reads_every_local_format(model, tok, tmp_path):
    values = set()
    for suffix in (".jsonl", ".csv", ".parquet", ".txt"):
        path = write_records([{"text": t} for t in TEXT], tmp_path / f"t{suffix}")
        values.add(round(perplexity(model, tok, path, max_length=32, stride=16)["perplexity"], 6))
    assert len(values) == 1


def test_multiple_choice_picks_the_likeliest(model, tok, tmp_path):
    records = [{"question": "Q1", "choices": ["aa", "zzz", "b"]}, {"question": "Q2", "choices": ["x y", "qq"]}]
    for r in records:  # the right answer = the choice the model itself finds likeliest: accuracy must be 1
        ctx = prompt_ids(tok, r["question"], False)
        scores = continuation_logprobs(model, ctx, [tok(" " + c, add_special_tokens=False)["input_ids"]
                                                    for c in r["choices"]])
        r["answer"] = max(range(len(scores)), key=scores.__getitem__)
    path = write_records(records, tmp_path / "mc.jsonl")
    res = multiple_choice(model, tok, path)
    assert res["accuracy"] == 1.0 and res["n"] == 2
    wrong = [dict(r, answer=(r["answer"] + 1) % len(r["choices"])) for r in records]
    assert multiple_choice(model, tok, wrong)["accuracy"] == 0.0
    by_text = [dict(r, answer=r["choices"][r["answer"]]) for r in records]
    assert multiple_choice(model, tok, by_text)["accuracy"] == 1.0


def test_exact_match_on_the_model_own_greedy_outputs(model, tok, tmp_path):
    from hf_archs.eval import greedy_generate

    prompts = ["abc=", "xyz=", "hello="]
    outs = greedy_generate(model, [prompt_ids(tok, p, False) for p in prompts], 4, tok.eos_token_id,
                           tok.pad_token_id)
    records = [{"prompt": p, "completion": tok.decode(o, skip_special_tokens=True)} for p, o in zip(prompts, outs)]
    records[2]["completion"] += "!"  # one wrong reference
    path = write_records(records, tmp_path / "em.json")
    r = exact_match(model, tok, path, chat_template=False, max_new_tokens=4, normalize=False)
    assert r["correct"] == 2 and r["n"] == 3 and r["exact_match"] == pytest.approx(2 / 3)
    # Batched (left padding) and one-at-a-time generation agree.
    assert exact_match(model, tok, path, chat_template=False, max_new_tokens=4, batch_size=1,
                       normalize=False)["correct"] == 2


def test_results_json_and_model_card(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("# my model\n")
    results = {"metrics": {"perplexity": {"perplexity": 12.5, "tokens_scored": 99}}, "settings": {"stride": 8}}
    write_to_model_card(results, card)
    write_to_model_card(results, card)  # replaced, not duplicated
    text = card.read_text()
    assert text.startswith("# my model") and text.count("## Evaluation") == 1
    assert "| perplexity.perplexity | 12.5 |" in text and '"stride": 8' in text


def test_evaluate_command(tmp_path, capsys):
    from hf_archs.cli import main

    write_records([{"text": t} for t in TEXT], tmp_path / "t.txt")
    write_records([{"prompt": "ab=", "completion": "bc"}], tmp_path / "em.jsonl")
    write_records([{"question": "q", "choices": ["a", "b"], "answer": 0}], tmp_path / "mc.jsonl")
    out = tmp_path / "res.json"
    card = tmp_path / "README.md"
    assert main(["eval", "--tiny", "qwen3", "--perplexity", str(tmp_path / "t.txt"), "--max-length", "32",
                 "--stride", "16", "--exact-match", str(tmp_path / "em.jsonl"), "--no-chat-template",
                 "--multiple-choice", str(tmp_path / "mc.jsonl"), "--output", str(out),
                 "--model-card", str(card)]) == 0
    res = json.loads(out.read_text())
    assert set(res["metrics"]) == {"perplexity", "exact_match", "multiple_choice"}
    assert res["settings"]["stride"] == 16 and res["details"]["perplexity"]["file"].endswith("t.txt")
    assert "perplexity.perplexity" in card.read_text()


def test_evaluate_applies_a_saved_adapter(tmp_path, tok):
    from peft import LoraConfig, get_peft_model

    from hf_archs.evaluate import load_for_eval
    from hf_archs.lora import lora_targets

    base = tiny_model("qwen3", len(tok), seed=0)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, init_lora_weights=False, **lora_targets(base)))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        ref = peft_model(ids).logits
    loaded, _ = load_for_eval(str(tmp_path / "base"), adapter=str(tmp_path / "adapter"),
                              tokenizer=str(tmp_path / "base"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-5, atol=1e-5)


LM_EVAL_TASK = """task: hfa_local_mc
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


def test_lm_eval_adapter_offline_on_local_task(model, tok, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional [eval] extra")
    from hf_archs.eval import run_lm_eval

    records = [{"question": "Q1", "choices": ["aa", "zzz", "b"]}, {"question": "Q2", "choices": ["x y", "qq"]},
               {"question": "Q3", "choices": ["m", "nn"]}]
    for r in records:  # gold = the model's own likeliest choice (lm-eval joins with a space): acc must be 1
        ctx = tok(r["question"], add_special_tokens=False)["input_ids"]
        scores = continuation_logprobs(model, ctx, [tok(" " + c, add_special_tokens=False)["input_ids"]
                                                    for c in r["choices"]])
        r["answer"] = max(range(len(scores)), key=scores.__getitem__)
    data = write_records(records, tmp_path / "mc.jsonl")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hfa_local_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    res = run_lm_eval(model, tok, ["hfa_local_mc"], include_path=tasks, batch_size=2)
    assert res["results"]["hfa_local_mc"]["acc,none"] == 1.0
    assert res["settings"]["tasks"] == ["hfa_local_mc"]
