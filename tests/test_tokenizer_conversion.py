"""The release's own tokenizer formats converted to `tokenizers`: tiny synthetic tekken.json / tiktoken files encode
the same ids before (tiktoken's algorithm, as mistral-common's Tekkenizer and llama-models' Tokenizer run it) and
after conversion, special tokens survive `hf-archs convert`, and anything else is reported as missing."""

from __future__ import annotations

import base64
import collections
import itertools
import json
from pathlib import Path

import pytest
import regex
import torch
from transformers import AutoTokenizer

from conversion import tokenizer as tk
from hf_archs.convert import convert

TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ("The quick brown fox jumps over the lazy dog. the dog sleeps; the fox runs! 123 4567 hello world, "
          "hello there. Ça va? naïve café, über straße. 日本語のテキスト. don't won't it's\n\n  indented\tcode()")
SAMPLES = ["the quick brown fox", "Hello there, the dog's 12345 runs!\n\n  ok", "héllo wörld 日本 naïve",
           "  leading spaces\tand tabs\r\n", "don't stop; it's 2024 — emoji 🦊 too", ""]


def train_bpe(text: str, merges: int = 80) -> dict[bytes, int]:
    """All 256 bytes, then the most frequent pair of each round (ties: first seen), as BPE ranks."""
    ranks = {bytes([i]): i for i in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(tk.O200K_PATTERN, text)]
    for _ in range(merges):
        pairs = collections.Counter(p for w in words for p in itertools.pairwise(w))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    return ranks


def tiktoken_encode(ranks: dict[bytes, int], pattern: str, text: str) -> list[int]:
    """tiktoken's algorithm in plain Python: split by the pattern; each piece is its own token if ranked, else
    its adjacent pair whose join has the lowest rank is merged until none is ranked (`_byte_pair_merge`)."""
    out = []
    for piece in regex.findall(pattern, text):
        parts = [bytes([b]) for b in piece.encode()]
        if piece.encode() in ranks:
            out.append(ranks[piece.encode()])
            continue
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], float("inf")))
            if parts[best] + parts[best + 1] not in ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        out.extend(ranks[p] for p in parts)
    return out


def write_tiktoken(ranks: dict[bytes, int], file: Path) -> None:
    file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]


def write_tekken(ranks: dict[bytes, int], file: Path, num_special: int = 100, extra: int = 7) -> int:
    """tekken.json as Mistral ships it: explicit special tokens (fewer than default_num_special_tokens: the rest
    are <SPECIAL_i> fillers), and more vocab entries than default_vocab_size keeps (`extra` are cut).
    Returns the vocabulary size."""
    vocab = [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode("utf-8", "replace")}
             for t, r in ranks.items()]
    vocab += [{"rank": len(ranks) + i, "token_bytes": base64.b64encode(f"zz{i}qq".encode()).decode(),
               "token_str": f"zz{i}qq"} for i in range(extra)]
    size = num_special + len(ranks)
    file.write_text(json.dumps({
        "config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(vocab), "default_vocab_size": size,
                   "default_num_special_tokens": num_special, "version": "v7"},
        "vocab": vocab, "special_tokens": [{"rank": i, "token_str": s, "is_control": True}
                                           for i, s in enumerate(TEKKEN_SPECIALS)]}))
    return size


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return train_bpe(CORPUS)


def test_plain_reference_is_tiktoken(ranks, tmp_path):
    """The plain reference used below agrees with tiktoken itself (when it is installed)."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken not installed: the plain reference stands alone")
    enc = tiktoken.Encoding("t", pat_str=tk.O200K_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for s in SAMPLES + [CORPUS]:
        assert tiktoken_encode(ranks, tk.O200K_PATTERN, s) == enc.encode(s)


def test_llama4_tiktoken_encodes_the_same_ids(ranks, tmp_path):
    write_tiktoken(ranks, tmp_path / "tokenizer.model")
    tok, _, size = tk.from_llama4_tiktoken(tmp_path / "tokenizer.model")
    base = len(ranks)
    assert size == base + 2048 and len(tk.LLAMA4_SPECIAL_TOKENS) == 2048
    for s in SAMPLES + [CORPUS]:
        ids = tiktoken_encode(ranks, tk.O200K_PATTERN, s)
        assert tok.encode(s, add_special_tokens=False).ids == ids
        assert tok.encode(s).ids == [base] + ids  # <|begin_of_text|> first, as transformers' Llama4Converter
        assert tok.decode(ids) == s
    # llama-models' ids (tokenizer.py comments: 200005 header_start ... 200080 image_start, 201134 reasoning).
    expect = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|header_start|>": 5, "<|eot|>": 8,
              "<|finetune_right_pad|>": 18, "<|image_start|>": 80, "<|patch|>": 92,
              "<|reasoning_reserved_special_token_0|>": 1134, "<|reasoning_thinking_end|>": 1143,
              "<|reserved_special_token_0|>": 1144, "<|reserved_special_token_903|>": 2047}
    assert {t: tok.token_to_id(t) - base for t in expect} == expect
    chat = "<|header_start|>user<|header_end|>\n\nhello there<|eot|>"
    ids = tok.encode(chat, add_special_tokens=False).ids
    enc = lambda t: tiktoken_encode(ranks, tk.O200K_PATTERN, t)
    assert ids == [base + 5] + enc("user") + [base + 6] + enc("\n\nhello there") + [base + 8]
    assert tok.decode(ids, skip_special_tokens=False) == chat


def test_tekken_encodes_the_same_ids(ranks, tmp_path):
    size = write_tekken(ranks, tmp_path / "tekken.json")
    tok, roles, n = tk.from_tekken(tmp_path / "tekken.json")
    assert n == size and tok.get_vocab_size() == size  # the 7 entries past default_vocab_size are cut
    assert roles == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    for s in SAMPLES + [CORPUS]:
        ids = [i + 100 for i in tiktoken_encode(ranks, TEKKEN_PATTERN, s)]  # Tekkenizer.encode: + num_special
        assert tok.encode(s).ids == ids
        assert tok.decode(ids) == s
    assert [tok.token_to_id(s) for s in TEKKEN_SPECIALS] == list(range(20))
    assert tok.token_to_id("<SPECIAL_20>") == 20 and tok.token_to_id("<SPECIAL_99>") == 99
    assert tok.token_to_id("zz0qq") is None
    ids = tok.encode("<s>[INST] hello there [/INST]").ids
    assert ids[:2] == [1, 3] and ids[-1] == 4
    # transformers' own tekken converter builds the same tokenizer.
    from transformers.integrations.mistral.tokenizer import MistralConverter

    theirs = MistralConverter(vocab_file=str(tmp_path / "tekken.json")).converted()
    for s in SAMPLES + ["<s>[INST] hi [/INST]"]:
        assert theirs.encode(s).ids == tok.encode(s).ids


def test_mistral_native_release_carries_a_converted_tekken(ranks, tmp_path):
    from cases import BY_NAME
    from helpers import randomize
    from test_conversion_formats import write_mistral_native

    case = BY_NAME["mistral3"]
    src = tmp_path / "src"
    src.mkdir()
    size = write_tekken(ranks, src / "tekken.json")
    official = case.official_config()
    official["text_config"]["vocab_size"] = size
    torch.manual_seed(0)
    write_mistral_native(randomize(case.reference(official)), official["text_config"], src)
    manifest = convert(src, tmp_path / "out", progress=False)
    assert manifest["tokenizer"]["missing"] == []
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(manifest["tokenizer"]["carried"])
    assert set(manifest["output_files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("[INST]")) == (1, 2, 3)
    text = "[INST] the quick brown fox [/INST]"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == [3] + [i + 100 for i in tiktoken_encode(ranks, TEKKEN_PATTERN, " the quick brown fox ")] + [4]
    assert tok.decode(ids) == text


def test_llama4_original_release_carries_a_converted_tiktoken(ranks, tmp_path):
    from test_conversion_llama4 import write_original

    src = tmp_path / "original"
    vocab = len(ranks) + 2048
    write_original(src, 2, vocab=vocab)
    write_tiktoken(ranks, src / "tokenizer.model")
    manifest = convert(src, tmp_path / "out", allow_pickle=True, progress=False)
    assert manifest["tokenizer"]["missing"] == []
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    # The model's config and the tokenizer agree on the special ids (both from llama-models' layout).
    assert tok.bos_token_id == cfg["bos_token_id"] == len(ranks)
    assert tok.convert_tokens_to_ids("<|end_of_text|>") == cfg["eos_token_id"][0]
    assert tok.pad_token_id == cfg["pad_token_id"] == len(ranks) + 18
    assert tok("hello there").input_ids == [len(ranks)] + tiktoken_encode(ranks, tk.O200K_PATTERN, "hello there")
    assert tok.convert_ids_to_tokens(len(ranks) + 8) == "<|eot|>"


def test_other_formats_are_reported_missing(ranks, tmp_path):
    from test_convert import _release

    src, _ = _release(tmp_path, "qwen3")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.model").write_bytes(b"\n\x0b\x08\x01\x12\x07<unk>\x15\x00\x00\x00\x00\x18\x02")  # SentencePiece
    manifest = convert(src, tmp_path / "a", progress=False)
    assert manifest["tokenizer"]["missing"] == [
        "tokenizer.json (the release ships ['tokenizer.model']: no faithful conversion here)"]
    assert not (tmp_path / "a" / "tokenizer.json").exists()
    write_tiktoken(ranks, src / "tokenizer.model")  # a tiktoken file, but not a Llama 4 release
    manifest = convert(src, tmp_path / "b", progress=False)
    assert "only Llama 4's are known here" in manifest["tokenizer"]["missing"][0]
    (src / "tokenizer.model").unlink()
    size = write_tekken(ranks, src / "tekken.json")  # more tokens than the model's 128: refused by name
    manifest = convert(src, tmp_path / "c", progress=False)
    assert manifest["tokenizer"]["missing"] == [
        f"tokenizer.json (tekken.json has {size} tokens, more than the model's vocab_size 128)"]
