"""`hf-archs compare`: published figures reproduced from the presets, cache sizes checked against real caches."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from helpers import needs

import hf_archs
from hf_archs.cli import main
from hf_archs.compare import (
    CONVENTIONS,
    attention_flops,
    cache_bytes,
    compare,
    compare_config,
    count_params,
    format_rows,
    meta_model,
    plot,
)
from hf_archs.layers.moe import Experts
from hf_archs.presets import get_preset, preset
from hf_archs.tour import tiny_config

ARCHS = sorted(hf_archs.ARCHITECTURES)


def row(name: str) -> dict:
    needs(get_preset(name).architecture)
    rows, skipped = compare([name])
    assert not skipped
    return rows[0]


def within(value: float, published: float, tolerance: float) -> bool:
    return abs(value - published) <= tolerance * published


# ------------------------------------------------------------------------------------------------------------------
# Published figures
# ------------------------------------------------------------------------------------------------------------------
# (preset, published total, published active, the convention the publisher's active figure follows)
PUBLISHED = [
    # DeepSeek-V3 README: 671B total, 37B activated.
    ("deepseek-v3", 671e9, 37e9, "active_params"),
    # Qwen3 model card: 235B total, 22B activated.
    ("qwen3-235b-a22b", 235e9, 22e9, "active_params"),
    # gpt-oss model card: 116.83B total (117B), 5.13B active (5.1B); OpenAI counts the unembedding, not the embedding.
    ("gpt-oss-120b", 117e9, 5.1e9, "active_params"),
    # Kimi K2 card: 1T (1.03T) total, 32B activated.
    ("kimi-k2", 1.03e12, 32e9, "active_params"),
    # Llama 4 Scout: 17B active; Meta counts the whole embedding table (the row + head count is 16.1B, -5%).
    # 109B total includes the vision tower; the text decoder alone is about 108B.
    ("llama-4-scout", 108e9, 17e9, "active_params_with_embedding_table"),
]


@pytest.mark.parametrize(("name", "total", "active", "convention"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_sizes_are_reproduced(name, total, active, convention):
    r = row(name)
    assert within(r["total_params"], total, 0.015), (r["total_params"], total)
    assert within(r[convention], active, 0.03), (convention, r[convention], active)


def test_deepseek_v3_latent_cache_is_70272_bytes_per_token():
    r = row("deepseek-v3")
    assert r["kv_bytes_per_token"] == 70_272  # 61 layers x (512 latent + 64 RoPE key) x 2 bytes
    assert r["bounded_kv_bytes"] == 0 and r["state_bytes"] == 0


# Dense releases: the model cards' total and non-embedding counts.
DENSE = [
    ("qwen3-0.6b", 0.6e9, 0.44e9),
    ("qwen3-8b", 8.2e9, 6.95e9),
    ("qwen3-32b", 32.8e9, 31.2e9),
    ("olmo-2-7b", 7.3e9, None),
    ("olmo-2-32b", 32.2e9, None),
    ("smollm3-3b", 3.08e9, None),
]


@pytest.mark.parametrize(("name", "total", "non_embedding"), DENSE, ids=[d[0] for d in DENSE])
def test_dense_published_sizes(name, total, non_embedding):
    r = row(name)
    assert within(r["total_params"], total, 0.015), r["total_params"]
    if non_embedding is not None:
        assert within(r["active_params_without_embedding"], non_embedding, 0.015)
    # Dense: every non-embedding parameter is active; the embedding counts one row (the head in full).
    assert r["moe"] is None
    assert r["active_params_without_embedding"] == r["total_params"] - r["embedding_params"] - r["head_params"]


# official-releases.md table C: growing KV bytes per token (bf16), and the bounded / state parts.
TABLE_C = [
    ("deepseek-v3", 70_272, 0),
    ("kimi-k2", 70_272, 0),
    ("olmo-2-32b", 262_144, 0),
    ("olmo-2-7b", 524_288, 0),
    ("gemma-3-27b", 81_920, 52 * 8_192 * 1023),  # 52 local layers x 8 KiB per token, 1023 past tokens each
    ("gemma-3n-e4b", 8_192, 16 * 2_048 * 511),  # 4 global + 16 local own-KV layers; 15 layers share
    ("mistral-small-3.1-24b", 163_840, 0),
    ("llama-4-scout", 49_152, 36 * 4_096 * 8_191),  # 12 NoPE global + 36 chunked (8192) layers
    ("llama-4-maverick", 49_152, 36 * 4_096 * 8_191),
    ("qwen3-235b-a22b", 192_512, 0),
    ("qwen3-32b", 262_144, 0),
    ("qwen3-30b-a3b", 98_304, 0),
    ("smollm3-3b", 73_728, 0),
    ("gpt-oss-120b", 36_864, 18 * 2_048 * 127),
    ("gpt-oss-20b", 24_576, 12 * 2_048 * 127),
    ("grok-2", 262_144, 0),
    ("glm-4.5", 376_832, 0),
    ("glm-4.5-air", 188_416, 0),
    ("qwen3-next-80b-a3b", 24_576, 0),
    ("minimax-m2", 253_952, 0),
    ("kimi-linear-48b-a3b", 8_064, 0),
]


@pytest.mark.parametrize(("name", "growing", "bounded"), TABLE_C, ids=[t[0] for t in TABLE_C])
def test_kv_bytes_per_token_match_table_c(name, growing, bounded):
    r = row(name)
    assert r["kv_bytes_per_token"] == growing
    assert r["bounded_kv_bytes"] == bounded
    n = 131072
    assert r["kv_bytes_at"][str(n)] == growing * n + bounded + r["state_bytes"]


def test_linear_attention_state_is_counted():
    r = row("qwen3-next-80b-a3b")
    # 36 gated-DeltaNet layers: 32 value heads x 128 x 128 state + 8192 conv channels x 4 (bf16).
    assert r["state_bytes"] == 36 * (32 * 128 * 128 + 8192 * 4) * 2
    r = row("kimi-linear-48b-a3b")
    # 20 KDA layers: 32 heads x 128 x 128 state + q, k and v convs (3 x 4096 channels) x 4.
    assert r["state_bytes"] == 20 * (32 * 128 * 128 + 3 * 4096 * 4) * 2


# ------------------------------------------------------------------------------------------------------------------
# Cache sizes against the caches tiny models really fill
# ------------------------------------------------------------------------------------------------------------------
def allocated_bytes(layer) -> int:
    """Bytes a transformers cache layer holds: keys / values, or linear-attention conv / recurrent states."""
    total = 0
    for attr in ("keys", "values"):
        t = getattr(layer, attr, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    for attr in ("conv_states", "recurrent_states"):
        for t in (getattr(layer, attr, None) or {}).values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("name", ARCHS)
def test_cache_rule_matches_the_cache_a_tiny_model_fills(name):
    needs(name)
    arch = hf_archs.ARCHITECTURES[name]
    config = tiny_config(arch)
    model = arch.causal_lm_class(config).eval()
    prompt = torch.randint(3, config.vocab_size, (1, 19))  # past every tiny window (8)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        real = [allocated_bytes(layer) for layer in out.cache.layers]
        assert real == cache_bytes(config, 19, bytes_per_element=4), "after the prompt"
        model(prompt[:, :1], cache=out.cache, use_cache=True)  # one decoding step
        real = [allocated_bytes(layer) for layer in out.cache.layers]
    assert real == cache_bytes(config, 20, bytes_per_element=4), "after one more token"


# ------------------------------------------------------------------------------------------------------------------
# Counting from the model, not a formula
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_counts_are_the_instantiated_models(name):
    """The meta-device count equals the real model's, and routed experts count top-k of E in the active figure."""
    needs(name)
    arch = hf_archs.ARCHITECTURES[name]
    config = tiny_config(arch)
    model = arch.causal_lm_class(config)
    counts = count_params(meta_model(config), config)
    # MTP modules, where a release keeps them after the decoder (model.layers.{num_hidden_layers + k}), are not
    # part of the language model's count.
    mtp = [f"model.layers.{i}." for i in range(config.num_hidden_layers, len(model.model.layers))] + ["mtp."]
    params = dict(model.named_parameters())
    counted = {n: p for n, p in params.items() if not n.startswith(tuple(mtp))}
    assert counts.total == sum(p.numel() for p in counted.values())
    assert counts.not_counted == sum(p.numel() for n, p in params.items() if n not in counted)
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, Experts) and not (n + ".").startswith(
        tuple(mtp))]
    routed = sum(p.numel() for _, m in experts for p in m.parameters())
    assert counts.routed_total == routed
    if experts:
        k = next(getattr(config, f) for f in ("num_experts_per_tok", "num_experts_per_token", "experts_per_token")
                 if hasattr(config, f))
        assert counts.routed_active == routed * k // experts[0][1].num_experts
    head = model.get_output_embeddings().weight
    untied = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)
              and m.weight is not head and not (n + ".").startswith(tuple(mtp))]
    assert counts.active == (counts.total - routed + counts.routed_active
                             - sum(t.numel() for t in untied) + sum(t.shape[1] for t in untied))
    assert counts.active_with_embedding_table == counts.active - sum(t.shape[1] for t in untied) + sum(
        t.numel() for t in untied)


def test_flops_grow_with_the_visible_context():
    config = preset("gemma-3-27b")
    r1, r2 = compare_config(config, "g", flops_context=4096), compare_config(config, "g", flops_context=8192)
    # Only the 10 global layers see more: 4 * 32 heads * 128 * 4096 more tokens each; the local ones stop at 1024.
    assert r2["flops_per_token"] - r1["flops_per_token"] == 10 * 4 * 32 * 128 * 4096
    assert attention_flops(config, 1) == 62 * 4 * 32 * 128
    assert r1["flops_per_token"] > 2 * r1["active_params_without_embedding"]


# ------------------------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------------------------
def test_json_output_is_only_the_list(capsys):
    assert main(["compare", "qwen3-8b", "gemma-3-27b", "--format", "json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["qwen3-8b", "gemma-3-27b"]
    for r in rows:
        for field in ("total_params", "active_params", "active_params_without_embedding", "kv_bytes_per_token"):
            assert isinstance(r[field], int) and not isinstance(r[field], bool), field
        assert set(r["kv_bytes_at"]) == {"4096", "32768", "131072"}
        assert all(isinstance(v, int) for v in r["kv_bytes_at"].values())
    assert rows[0]["kv_bytes_at"]["131072"] == 131072 * 147_456  # 36 layers x 2 x 8 x 128 x 2 bytes


def test_table_markdown_csv_and_contexts(capsys):
    assert main(["compare", "qwen3-0.6b", "--contexts", "1024,2048"]) == 0
    out = capsys.readouterr().out
    assert "qwen3-0.6b" in out and "cache@1k" in out and "cache@2k" in out
    rows, _ = compare(["qwen3-0.6b", "smollm3-3b"])
    md = format_rows(rows, "markdown").splitlines()
    assert md[0].startswith("| preset |") and md[1].startswith("|---|") and len(md) == 4
    parsed = list(csv.DictReader(io.StringIO(format_rows(rows, "csv"))))
    assert [p["name"] for p in parsed] == ["qwen3-0.6b", "smollm3-3b"]
    assert int(parsed[1]["attention.nope"]) == 9 and parsed[1]["kv_bytes_at.131072"]


def test_skipped_presets_are_reported_not_fatal(monkeypatch, capsys):
    monkeypatch.delitem(hf_archs.ARCHITECTURES, "olmo2")
    assert main(["compare", "olmo-2-7b", "qwen3-8b", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert [r["name"] for r in json.loads(captured.out)] == ["qwen3-8b"]
    assert "skipped olmo-2-7b: architecture 'olmo2' is not registered in hf_archs yet" in captured.err


def test_a_preset_that_fails_to_load_is_named(monkeypatch, capsys):
    import dataclasses

    from hf_archs import presets

    bad = dataclasses.replace(get_preset("qwen3-8b"), config_json=dict(get_preset("qwen3-8b").config_json,
                                                                        num_key_value_heads=5))
    monkeypatch.setitem(presets._load_all(), "qwen3-8b", bad)
    with pytest.raises(hf_archs.ConfigError, match="num_key_value_heads"):
        compare(["qwen3-8b"])
    assert main(["compare", "qwen3-8b", "qwen3-0.6b", "--format", "json"]) == 1
    captured = capsys.readouterr()
    assert [r["name"] for r in json.loads(captured.out)] == ["qwen3-0.6b"]
    assert "skipped qwen3-8b: failed: ConfigError: num_attention_heads (32) is not divisible by" in captured.err


def test_unknown_preset_exits_with_a_message(capsys):
    assert main(["compare", "banana"]) == 2
    assert "unknown preset 'banana'" in capsys.readouterr().err


def test_plots_are_pngs(tmp_path):
    rows, _ = compare(["qwen3-0.6b", "gemma-3-27b"])
    paths = plot(rows, tmp_path)
    assert [p.name for p in paths] == ["cache_vs_context.png", "params_total_vs_active.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_help_states_the_counting_conventions(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "without MTP" in out and "vision or audio" in out and "top-k / experts" in out
    assert "MTP" in CONVENTIONS


def test_list_names_every_preset_and_its_source(capsys):
    assert main(["compare", "--list"]) == 0
    out = capsys.readouterr().out
    assert "deepseek-v3" in out and "https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json" in out
