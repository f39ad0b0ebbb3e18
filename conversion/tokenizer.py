"""The release's tokenizer in the output: faithful `tokenizers` conversions of the formats publishers ship instead
of a tokenizer.json.

- Mistral's `tekken.json` (Mistral Small 3.1's native layout): a tiktoken-style byte-level BPE (base64 token bytes
  in rank order) whose ids are shifted by the special-token count; the special tokens (`<unk>`, `<s>`, `</s>`,
  `[INST]`, ...) take ids 0..n-1, fillers `<SPECIAL_i>` complete `default_num_special_tokens`, and the vocabulary
  is cut at `default_vocab_size`. Sources: mistralai/mistral-common `tokens/tokenizers/tekken.py` (`Tekkenizer`),
  transformers 5.24 `integrations/mistral/tokenizer.py` (`MistralConverter`, `_MAP_SPECIALS`).
- Llama 4's tiktoken `tokenizer.model` (in `original/`): BPE ranks, O200K split pattern, then 2048 reserved special
  ids in llama-models' fixed order (begin/end of text, fim, the post-train, vision and reasoning tokens, then
  `<|reserved_special_token_i|>`); `<|begin_of_text|>` is prepended by the post-processor as transformers'
  `Llama4Converter` does. Sources: meta-llama/llama-models `models/llama4/tokenizer.py`, transformers
  `models/llama4/convert_llama4_weights_to_hf.py` (`Llama4Converter`, `write_tokenizer`; its special-token list
  stops after the vision tokens, ids agree where both define them; its pad token `<|finetune_right_pad_id|>` is
  not a token of the vocabulary: `<|finetune_right_pad|>` is used).

Both are built the way transformers' `TikTokenConverter` builds them: a byte-level BPE whose merges come from the
ranks (a token's merges are its splits into two tokens, ordered by the token's rank), `ignore_merges`, the split
regex as a pre-tokenizer, then byte-level mapping. Anything else (a SentencePiece `tokenizer.model`, xAI's
`tokenizer.tok.json`, ...) is reported as missing, never guessed.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from hf_archs.errors import CheckpointError

# llama-models models/llama4/tokenizer.py
O200K_PATTERN = (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"""
                 r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"""
                 r"""\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA4_NUM_RESERVED = 2048


def _reserved(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


LLAMA4_SPECIAL_TOKENS = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    + ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    + _reserved("text_post_train", 6) + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    + _reserved("text_post_train", 61, 8)
    + ["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
       "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    + _reserved("vision", 4, 2) + ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
    + _reserved("vision", 1041, 7)
    + _reserved("reasoning", 8) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
)
LLAMA4_SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>"
                          for i in range(LLAMA4_NUM_RESERVED - len(LLAMA4_SPECIAL_TOKENS))]
# transformers' _MAP_SPECIALS for tekken.
TEKKEN_ROLES = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
# tekken.json files without a `special_tokens` list (version <= v7) use mistral-common's deprecated defaults.
TEKKEN_DEPRECATED_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                              "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                              "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]",
                              "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]


def read_tiktoken(file: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token bytes) rank` per line (tiktoken.load.load_tiktoken_bpe)."""
    try:
        text = file.read_text(encoding="utf-8")
        ranks = {base64.b64decode(tok, validate=True): int(rank)
                 for tok, rank in (line.split() for line in text.splitlines() if line)}
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{file}: not a tiktoken BPE file ({err})") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{file}: tiktoken ranks are not 0..{len(ranks) - 1}")
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int], offset: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """transformers' TikTokenConverter.extract_vocab_merges_from_model: byte-level strings, merges by rank."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_encoder = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[as_str(token)] = rank + offset
        if len(token) == 1:
            continue
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        merges.extend(sorted(local, key=lambda x: (ranks[x[0]], ranks[x[1]])))
    merges.sort(key=lambda x: x[2])
    return vocab, [(as_str(a), as_str(b)) for a, b, _ in merges]


def bpe_tokenizer(ranks: dict[bytes, int], pattern: str, specials: dict[str, int], offset: int = 0,
                  bos: str | None = None):
    """A `tokenizers.Tokenizer` equal to tiktoken's encoding of `ranks` + `offset`, with `specials` at their ids."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    vocab, merges = _vocab_and_merges(ranks, offset)
    clash = sorted(s for s in specials if s in vocab)
    if clash:
        raise CheckpointError(f"special tokens {clash[:5]} are also BPE tokens")
    vocab.update(specials)
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True)
                            for s, _ in sorted(specials.items(), key=lambda kv: kv[1])])
    post = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                  special_tokens=[(bos, specials[bos])]))
    tok.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
    return tok


def from_tekken(file: Path) -> tuple[Any, dict[str, str], int]:
    """tekken.json -> (tokenizer, special-token roles, its vocabulary size)."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        config = raw["config"]
        pattern = config["pattern"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: not a tekken tokenizer ({err!r})") from err
    entries = raw.get("special_tokens")
    if entries is None:
        names = list(TEKKEN_DEPRECATED_SPECIALS)
    else:
        by_rank = sorted((int(e["rank"]), str(e["token_str"])) for e in entries)
        if [r for r, _ in by_rank] != list(range(len(by_rank))):
            raise CheckpointError(f"{file}: special token ranks are not 0..{len(by_rank) - 1}")
        names = [s for _, s in by_rank]
    n_special = config.get("default_num_special_tokens") or len(names)
    if len(set(names)) != len(names) or len(names) > n_special:
        raise CheckpointError(f"{file}: {len(names)} special tokens (unique: {len(set(names))}) for "
                              f"default_num_special_tokens {n_special}")
    names += [f"<SPECIAL_{i}>" for i in range(len(names), n_special)]
    vocab = raw["vocab"]
    size = config.get("default_vocab_size") or len(vocab) + n_special
    inner = size - n_special
    if inner > len(vocab):
        raise CheckpointError(f"{file}: default_vocab_size {size} needs {inner} BPE tokens, the file has {len(vocab)}")
    ranks = {}
    for e in vocab[:inner]:  # mistral-common keeps the first vocab_size - num_special_tokens ranks
        ranks[base64.b64decode(e["token_bytes"])] = int(e["rank"])
    if sorted(ranks.values()) != list(range(inner)):
        raise CheckpointError(f"{file}: BPE ranks are not 0..{inner - 1}")
    tok = bpe_tokenizer(ranks, pattern, {s: i for i, s in enumerate(names)}, offset=n_special)
    roles = {role: s for role, s in TEKKEN_ROLES.items() if s in names}
    return tok, roles, size


def from_llama4_tiktoken(file: Path) -> tuple[Any, dict[str, str], int]:
    """Llama 4's tiktoken tokenizer.model -> (tokenizer, special-token roles, its vocabulary size)."""
    ranks = read_tiktoken(file)
    base = len(ranks)
    specials = {s: base + i for i, s in enumerate(LLAMA4_SPECIAL_TOKENS)}
    tok = bpe_tokenizer(ranks, O200K_PATTERN, specials, bos="<|begin_of_text|>")
    roles = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|finetune_right_pad|>"}
    return tok, roles, base + len(specials)


def _is_tiktoken(file: Path) -> bool:
    with open(file, "rb") as f:
        head = f.read(4096)
    lines = head.split(b"\n")[:-1] or [head]
    return all(re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", line) for line in lines[:50])


def convert_release_tokenizer(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    """For a release without tokenizer.json: write tokenizer.json (+ tokenizer_config.json, unless the release
    shipped one) from its own format into `dst`. Returns (files written, what is missing and why)."""
    from transformers import PreTrainedTokenizerFast

    model_vocab = None
    if (dst / "config.json").is_file():
        model_vocab = json.loads((dst / "config.json").read_text()).get("vocab_size")
    if (src / "tekken.json").is_file():
        source, build = "tekken.json", from_tekken
    elif (src / "tokenizer.model").is_file() and _is_tiktoken(src / "tokenizer.model"):
        from .llama4_original import _detect

        if not _detect(src):
            return [], [("tokenizer.json (the release ships a tiktoken tokenizer.model, but its special tokens are "
                         "defined by the publisher's code: only Llama 4's are known here)")]
        source, build = "tokenizer.model", from_llama4_tiktoken
    else:
        own = [n for n in ("tokenizer.model", "tokenizer.tok.json", "tiktoken.model") if (src / n).is_file()]
        return [], [f"tokenizer.json (the release ships {own}: no faithful conversion here)" if own
                    else "tokenizer.json"]
    try:
        tok, roles, size = build(src / source)
    except CheckpointError as err:
        return [], [f"tokenizer.json ({source} could not be converted: {err})"]
    if model_vocab is not None and size > model_vocab:
        return [], [f"tokenizer.json ({source} has {size} tokens, more than the model's vocab_size {model_vocab})"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    keep_config = (dst / "tokenizer_config.json").is_file()  # carried from the release: the publisher's wins
    saved = fast.save_pretrained(str(dst / ".tokenizer-tmp"))
    written = []
    for path in map(Path, saved):
        if path.name in ("tokenizer.json", "tokenizer_config.json") and not (
                path.name == "tokenizer_config.json" and keep_config):
            path.replace(dst / path.name)
            written.append(path.name)
    for path in (dst / ".tokenizer-tmp").iterdir():
        path.unlink()
    (dst / ".tokenizer-tmp").rmdir()
    return written, []
