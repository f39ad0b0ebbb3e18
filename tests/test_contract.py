"""The contract every architecture meets, parametrised over tests/cases.py."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_archs
from cases import CASES, SEQ_LEN, Case
from helpers import first_divergence, max_rel_diff, ours_from, reference, tokens

params = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def _release(case: Case, ref: torch.nn.Module, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if case.write_release is not None:
        case.write_release(ref, case.official_config(), root)
    else:
        ref.save_pretrained(root)
        cfg = json.loads((root / "config.json").read_text())
        assert cfg["model_type"] == case.official["model_type"]
    return root


@params
def test_parity_logits_every_position(case):
    ref = reference(case)
    ours = ours_from(case, ref)
    ids = tokens(case, batch=2)
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
        assert a.shape == b.shape == (2, SEQ_LEN, ours.config.vocab_size)
        diff = max_rel_diff(a, b)
        assert diff <= 1e-5, first_divergence(ours, ref, ids)


@params
def test_parity_bf16_is_bit_exact(case):
    # Same op order as the reference runtime, so bf16 rounding matches too (norm and RoPE precision included).
    ref = reference(case).to(torch.bfloat16)
    ours = ours_from(case, ref).to(torch.bfloat16)
    ids = tokens(case)
    with case.bf16_reference_kernels() if case.bf16_reference_kernels else contextlib.nullcontext():
        with torch.no_grad():
            assert torch.equal(ours(ids).logits, ref(ids).logits)


@params
def test_parity_greedy_generation(case):
    ref = reference(case)
    ours = ours_from(case, ref)
    ids = tokens(case, length=6)
    kw = dict(max_new_tokens=SEQ_LEN, do_sample=False, min_new_tokens=SEQ_LEN, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@params
def test_official_layout_loads(case, tmp_path):
    ref = reference(case)
    root = _release(case, ref, tmp_path / "release")
    before = sorted(p.name for p in root.rglob("*"))
    model = hf_archs.from_official(root, attn_implementation="eager")
    assert type(model) is hf_archs.ARCHITECTURES[case.name].causal_lm_class
    ids = tokens(case)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5
    assert sorted(p.name for p in root.rglob("*")) == before  # the source is never modified


@params
def test_cached_decoding_equals_full_forward(case):
    ours = ours_from(case, reference(case))
    ids = tokens(case)
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(5, SEQ_LEN):
            out = ours(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert max_rel_diff(torch.cat(steps, dim=1), full) <= 1e-5


@params
def test_left_padded_batch_equals_each_alone(case):
    ours = ours_from(case, reference(case))
    long, short = tokens(case, seed=2)[0], tokens(case, length=SEQ_LEN - 7, seed=3)[0]
    pad = SEQ_LEN - short.numel()
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask).logits
        alone_long = ours(long[None]).logits
        alone_short = ours(short[None]).logits
    assert max_rel_diff(batch[0], alone_long[0]) <= 1e-5
    assert max_rel_diff(batch[1, pad:], alone_short[0]) <= 1e-5


@params
def test_left_padded_batch_generates_what_each_prompt_generates_alone(case):
    ours = ours_from(case, reference(case))
    long, short = tokens(case, length=8, seed=2)[0], tokens(case, length=5, seed=3)[0]
    pad = long.numel() - short.numel()
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    kw = {"max_new_tokens": SEQ_LEN - 8, "min_new_tokens": SEQ_LEN - 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        batch = ours.generate(ids, attention_mask=mask, **kw)
        alone = [ours.generate(p[None], **kw)[0] for p in (long, short)]
    assert torch.equal(batch[0], alone[0])
    assert torch.equal(batch[1, pad:], alone[1])


@params
def test_eager_equals_sdpa(case):
    ref = reference(case)
    eager, sdpa = ours_from(case, ref, "eager"), ours_from(case, ref, "sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    ids = tokens(case, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        assert max_rel_diff(sdpa(ids).logits, eager(ids).logits) <= 1e-5
        assert max_rel_diff(sdpa(ids, attention_mask=mask).logits[1, 4:],
                            eager(ids, attention_mask=mask).logits[1, 4:]) <= 1e-5


@params
def test_save_and_auto_load_round_trip_is_bit_exact(case, tmp_path):
    ours = ours_from(case, reference(case))
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == f"hfa_{case.name}"
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back) is type(ours)
    sd_a, sd_b = ours.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    ids = tokens(case)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, back(ids).logits)


@params
def test_generate_keeps_only_the_window_on_windowed_layers(case):
    ours = ours_from(case, reference(case))
    cfg = ours.config
    windows = {"sliding_attention": getattr(cfg, "sliding_window", None),
               "chunked_attention": getattr(cfg, "attention_chunk_size", None)}
    out = ours.generate(tokens(case, length=6), max_new_tokens=SEQ_LEN, min_new_tokens=SEQ_LEN, do_sample=False,
                        pad_token_id=0, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    total = out.sequences.shape[1] - 1
    shared = {i for i, mode in enumerate(getattr(cfg, "kv_sharing_modes", None) or []) if mode == "reuse"}
    for i, (kind, layer) in enumerate(zip(cfg.layer_types, cache.layers)):
        if i in shared:  # a KV-shared layer (Gemma 3n) reads another layer's keys and values and stores none
            assert layer.keys is None
            continue
        if kind == "linear_attention":  # recurrent: conv inputs and a state, constant in the sequence length
            assert not hasattr(layer, "keys")
            assert layer.conv_states[0].shape[-1] == cfg.linear_conv_kernel_dim
            continue
        kept = layer.keys.shape[-2]
        window = windows.get(kind)
        if window is not None:
            assert kept <= window < total
        else:
            assert kept == total



@params
def test_generate_computes_the_prompts_logits_at_its_last_position_only(case):
    """`generate` asks the prompt's forward for the last position's logits only (`logits_to_keep=1`) when the
    model's `forward` names that argument: the head never builds [prompt x vocab] logits it throws away."""
    ours = ours_from(case, reference(case))
    rows = []
    hook = ours.lm_head.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[-2]))
    with torch.no_grad():
        ours.generate(tokens(case, length=6), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    hook.remove()
    assert rows == [1, 1, 1]


@pytest.mark.parametrize("name", sorted(hf_archs.ARCHITECTURES))
def test_every_causal_lm_forward_names_what_generate_looks_for(name):
    """`generate` reads the forward's signature: it passes `logits_to_keep=1` to the prompt's step, builds the
    attention mask and the position ids (left padding) only for a forward that names them. Every registered class,
    the ones without a transformers twin (Grok 2.5) included."""
    params = inspect.signature(hf_archs.ARCHITECTURES[name].causal_lm_class.forward).parameters
    assert {"logits_to_keep", "attention_mask", "position_ids"} <= set(params)

@params
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_changes_weights(case, checkpointing):
    ours = ours_from(case, reference(case)).train()
    if checkpointing:
        ours.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    before = {k: v.detach().clone() for k, v in ours.named_parameters()}
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    ids = tokens(case, batch=2)
    loss = ours(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [k for k, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    opt.step()
    changed = [k for k, p in ours.named_parameters() if not torch.equal(p, before[k])]
    assert len(changed) == len(before)


@params
def test_bad_inputs_are_refused(case):
    ours = ours_from(case, reference(case))
    vocab = ours.config.vocab_size
    with pytest.raises(hf_archs.InputError, match="empty"):
        ours(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(hf_archs.InputError, match=f"token id {vocab}, outside the vocabulary"):
        ours(torch.tensor([[1, 2, vocab]]))
    with pytest.raises(hf_archs.InputError, match="integer tensor"):
        ours(torch.tensor([[1.0, 2.0]]))


@params
def test_bad_configs_are_refused(case):
    arch = hf_archs.ARCHITECTURES[case.name]
    base = case.official_config()
    base = base.get("text_config", base) if arch.text_config_key else base
    base = {k: v for k, v in base.items() if k not in ("model_type", "architectures")}
    n = base["num_hidden_layers"]
    with pytest.raises(hf_archs.ConfigError, match="num_attention_heads .* is not divisible by num_key_value_heads"):
        arch.config_class(**dict(base, num_attention_heads=4, num_key_value_heads=3))
    if not case.head_dim_given:
        with pytest.raises(hf_archs.ConfigError, match="hidden_size .* is not divisible by num_attention_heads"):
            arch.config_class(**dict(base, hidden_size=66))
    with pytest.raises(hf_archs.ConfigError, match=f"layer_types has {n - 1} entries but num_hidden_layers is {n}"):
        arch.config_class(**dict(base, layer_types=["full_attention"] * (n - 1)))
    with pytest.raises(hf_archs.ConfigError, match=r"layer_types has unknown entries \['banana'\]"):
        arch.config_class(**dict(base, layer_types=["full_attention"] * (n - 1) + ["banana"]))


def _tamper(root: Path, edit) -> None:
    files = sorted(root.glob("*.safetensors"))
    assert len(files) == 1, "tiny releases are written as one file"
    tensors = load_file(files[0])
    edit(tensors)
    save_file(tensors, files[0], metadata={"format": "pt"})


def _check_refused(root: Path, match: str) -> None:
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    with pytest.raises(hf_archs.CheckpointError, match=match):
        hf_archs.from_official(root)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing written


@params
def test_bad_checkpoints_are_refused_by_name(case, tmp_path):
    ref = reference(case)
    root = _release(case, ref, tmp_path / "missing")
    name = next(k for k in load_file(next(root.glob("*.safetensors"))) if "layers.1." in k and "proj" in k)
    _tamper(root, lambda t: t.pop(name))
    our_name = hf_archs.official.map_name(hf_archs.ARCHITECTURES[case.name], name)
    _check_refused(root, f"missing tensors: .*{our_name}")

    root = _release(case, ref, tmp_path / "extra")
    _tamper(root, lambda t: t.__setitem__("model.layers.0.surprise.weight", torch.zeros(3)))
    _check_refused(root, r"unexpected tensors: .*model\.layers\.0\.surprise\.weight")

    root = _release(case, ref, tmp_path / "shape")
    _tamper(root, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    _check_refused(root, rf"mis-shaped tensors: .*{name}: checkpoint \[")


@params
def test_corrupt_and_truncated_files_are_refused_by_name(case, tmp_path):
    ref = reference(case)
    root = _release(case, ref, tmp_path / "truncated")
    file = next(root.glob("*.safetensors"))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _check_refused(root, f"{file.name}: corrupt or truncated")

    root = _release(case, ref, tmp_path / "corrupt")
    file = next(root.glob("*.safetensors"))
    file.write_bytes(b"\xff" * 64)
    _check_refused(root, f"{file.name}: corrupt or truncated")


def test_index_entries_may_not_escape_the_directory(tmp_path):
    case = CASES[0]
    root = _release(case, reference(case), tmp_path / "rel")
    file = next(root.glob("*.safetensors"))
    outside = tmp_path / "outside.safetensors"
    os.replace(file, outside)
    keys = load_file(outside).keys()
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../outside.safetensors" for k in keys}}))
    _check_refused(root, "points outside the release directory")


def test_pickle_weights_are_never_loaded(tmp_path):
    case = CASES[0]
    root = _release(case, reference(case), tmp_path / "rel")
    sd = load_file(next(root.glob("*.safetensors")))
    for f in root.glob("*.safetensors"):
        f.unlink()
    torch.save(sd, root / "pytorch_model.bin")
    _check_refused(root, r"no safetensors weights \(found \['pytorch_model.bin'\]: pickle files are never loaded;")
    model = hf_archs.from_official(root, allow_pickle=True)  # opt-in: torch.load(weights_only=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
