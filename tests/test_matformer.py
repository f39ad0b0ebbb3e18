"""MatFormer slicing (hf_archs.matformer and `hf-archs slice`): identity, sliced FFNs, sliced models against models
built directly at the sliced config (ours and transformers'), the E2B and Mix-n-Match presets, invalid cuts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3nForCausalLM, Gemma3nTextConfig

import hf_archs
from cases import BY_NAME
from helpers import matformer_cut_state, max_rel_diff, ours_from, reference, tokens
from hf_archs import matformer
from hf_archs.cli import main
from hf_archs.matformer import PRESETS, Cut, CutError, count_parameters, slice_preset
from hf_archs.models.gemma3n import HfaGemma3nConfig, HfaGemma3nForCausalLM

CASE = BY_NAME["gemma3n"]
# The tiny case: layers S S S S F S S S S F, widths 256 192 96 80 128 64 96 80 64 128, sparse layers 0-1,
# KV-shared layers 5-8 (read layer 3) and 9 (reads layer 4).
CUT = dict(ffn_dims=[128, 999, 64, 80, 100, 32, 1, 40, 64, 128], skip_layers=[1, 6])  # 999 and 1: skipped layers
KEPT = [0, 2, 3, 4, 5, 7, 8, 9]
SLICED_TEXT = dict(num_hidden_layers=8, intermediate_size=[128, 64, 80, 100, 32, 40, 64, 128],
                   layer_types=["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3
                   + ["full_attention"], activation_sparsity_pattern=[0.95] + [0.0] * 7, num_kv_shared_layers=4)


@pytest.fixture(scope="module")
def ref():
    return reference(CASE)


@pytest.fixture(scope="module")
def ours(ref):
    return ours_from(CASE, ref)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_full_widths_and_no_skipped_layer_is_the_identity(ours):
    ids = tokens(CASE, batch=2)
    for kwargs in ({}, dict(ffn_dims=list(ours.config.intermediate_size), skip_layers=())):
        same = matformer.slice(ours, **kwargs)
        assert same is not ours and type(same) is type(ours)
        assert same.config.to_dict() == ours.config.to_dict()
        a, b = same.state_dict(), ours.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(a[k].data_ptr() != b[k].data_ptr() for k in a)  # standalone: copies, not views
        with torch.no_grad():
            assert torch.equal(same(ids).logits, ours(ids).logits)


def test_slicing_leaves_the_model_unchanged(ours):
    before, config = _state(ours), ours.config.to_dict()
    sliced = matformer.slice(ours, **CUT)
    with torch.no_grad():
        for p in sliced.parameters():
            p.add_(1.0)
    after = ours.state_dict()
    assert ours.config.to_dict() == config
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sliced_config(ours):
    cfg = matformer.slice(ours, **CUT).config
    for name, value in SLICED_TEXT.items():
        assert getattr(cfg, name) == value, name
    # New layer j is old layer KEPT[j]; the shared layers read the very layers they read before (3 and 4).
    assert cfg.kv_sources() == {4: 2, 5: 2, 6: 2, 7: 3}
    assert {KEPT[j]: KEPT[s] for j, s in cfg.kv_sources().items()} == {5: 3, 7: 3, 8: 3, 9: 4}


def test_sliced_ffn_equals_the_full_ffn_on_the_kept_units(ours):
    sliced = matformer.slice(ours, **CUT)
    x = torch.randn(2, 5, ours.config.hidden_size)
    with torch.no_grad():
        # Dense layer 4 (new 3), width 128 -> 100: the full FFN with units 100.. removed.
        full = copy.deepcopy(ours.model.layers[4].mlp)
        full.gate_proj.weight[100:] = 0  # gelu(0) * 0 = 0: those units contribute nothing
        full.up_proj.weight[100:] = 0
        small = sliced.model.layers[3].mlp
        assert small.down_proj.weight.shape == (64, 100)
        assert max_rel_diff(small(x), full(x)) <= 1e-6
        # Sparse layer 0, width 256 -> 128: the Gaussian top-k statistics are those of the kept units.
        big = ours.model.layers[0].mlp
        g = x @ big.gate_proj.weight[:128].T
        cut = g.mean(-1, keepdim=True) + g.std(-1, keepdim=True, unbiased=False) * 1.6448536269514722
        h = torch.nn.functional.gelu((g - cut).clamp(min=0), approximate="tanh") * (x @ big.up_proj.weight[:128].T)
        assert max_rel_diff(sliced.model.layers[0].mlp(x), h @ big.down_proj.weight[:, :128].T) <= 1e-5


def test_sliced_model_equals_models_built_at_the_sliced_config(ref, ours):
    sliced = matformer.slice(ours, **CUT)
    official = CASE.official_config()
    official["text_config"].update(copy.deepcopy(SLICED_TEXT))
    state = matformer_cut_state(_state(ours), KEPT, SLICED_TEXT["intermediate_size"],
                                ours.config.hidden_size_per_layer_input)

    direct = HfaGemma3nForCausalLM(hf_archs.config_from_official(official))
    direct.load_state_dict(state, strict=True)
    direct.set_attn_implementation("eager")
    theirs = Gemma3nForCausalLM(Gemma3nTextConfig(
        **{k: v for k, v in official["text_config"].items() if k != "model_type"}))
    theirs.config._attn_implementation = "eager"
    theirs.load_state_dict(state, strict=True)

    ids = tokens(CASE, batch=2)
    with torch.no_grad():
        logits = sliced(ids).logits
        assert torch.equal(logits, direct.eval()(ids).logits)
        assert max_rel_diff(logits, theirs.eval()(ids).logits) <= 1e-5
        assert not torch.equal(logits, ours(ids).logits)
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    prompt = tokens(CASE, length=6)
    assert torch.equal(sliced.generate(prompt, **kw), theirs.generate(prompt, **kw))


def test_sliced_model_saves_and_loads_like_any_other(ours, tmp_path):
    sliced = matformer.slice(ours, **CUT)
    sliced.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "hfa_gemma3n" and saved["intermediate_size"] == SLICED_TEXT["intermediate_size"]
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back) is HfaGemma3nForCausalLM
    ids = tokens(CASE)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, sliced(ids).logits)


def test_slicing_keeps_dtype_and_mode(ours):
    bf16 = matformer.slice(copy.deepcopy(ours).to(torch.bfloat16).train(), skip_layers=[9])
    assert bf16.training and all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.lm_head.weight is bf16.model.embed_tokens.weight  # still tied


def _e4b_on_meta() -> HfaGemma3nForCausalLM:
    with torch.device("meta"):
        return HfaGemma3nForCausalLM(HfaGemma3nConfig())


def test_e2b_preset_cuts_e4b_into_the_published_e2b():
    e4b = _e4b_on_meta()
    e2b = slice_preset(e4b, "E2B")
    c = e2b.config
    assert c.num_hidden_layers == 30 and c.intermediate_size == [2048 * 4] * 30
    assert c.layer_types == (["sliding_attention"] * 4 + ["full_attention"]) * 6
    assert c.num_kv_shared_layers == 10 and c.activation_sparsity_pattern == [0.95] * 10 + [0.0] * 20
    assert c.kv_sources() == {i: 19 if i % 5 == 4 else 18 for i in range(20, 30)}
    # The published E2B text config (official-releases.md section 4) builds the same tensors, in ours and in
    # transformers.
    e2b_text = dict(intermediate_size=2048 * 4, num_hidden_layers=30, num_kv_shared_layers=10,
                    activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20)
    with torch.device("meta"):
        direct = HfaGemma3nForCausalLM(HfaGemma3nConfig(**e2b_text))
        theirs = Gemma3nForCausalLM(Gemma3nTextConfig(**e2b_text))
    shapes = {k: v.shape for k, v in e2b.state_dict().items()}
    assert shapes == {k: v.shape for k, v in direct.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    # Parameter count: E4B minus layers 20-24, minus half of every kept FFN, minus the skipped layers' per-layer
    # embedding columns and projection rows.
    h, p, v_pl = 2048, 256, 262_144
    full, cut = count_parameters(e4b), count_parameters(e2b)
    skipped = sum(count_parameters(e4b.model.layers[i]) for i in range(20, 25))
    assert cut == full - skipped - 30 * 3 * h * (16384 - 8192) - 5 * p * (v_pl + h)
    assert cut == count_parameters(direct) == sum(t.numel() for t in theirs.parameters())
    assert (full, cut) == (6_835_235_568, 4_435_182_688)


def test_mix_n_match_presets():
    e4b = _e4b_on_meta()
    c = slice_preset(e4b, "E1.96B").config
    assert c.num_hidden_layers == 30 and c.intermediate_size == [8192] * 4 + [16384] + [8192] * 25
    c = slice_preset(e4b, "E2.54B").config
    assert c.num_hidden_layers == 35 and c.num_kv_shared_layers == 15
    assert [i for i, w in enumerate(c.intermediate_size) if w == 16384] == [4, 20, 21, 22, 23, 24]
    assert all(len(cut.ffn_dims) == 35 for cut in PRESETS.values())
    with pytest.raises(CutError, match="29 FFN widths given for 30 kept layers"):
        Cut.from_kept([8192] * 29, range(20, 25))


@pytest.mark.parametrize("kwargs, match", [
    (dict(ffn_dims=[256, 193, 96, 80, 128, 64, 96, 80, 64, 128]),
     r"ffn_dims\[1\] = 193 is larger than layer 1's FFN width \(192\): a slice keeps a prefix of the hidden units"),
    (dict(skip_layers=[3]), r"layer 3 cannot be skipped: kept layers \[5, 6, 7, 8\] reuse its keys and values"),
    (dict(skip_layers=[4, 8]), r"layer 4 cannot be skipped: kept layers \[9\] reuse its keys and values"),
    (dict(skip_layers=[10]), r"skip_layers: layer 10 is out of range: the model has layers 0-9"),
    (dict(skip_layers=[-1]), r"skip_layers: layer -1 is out of range: the model has layers 0-9"),
    (dict(skip_layers=[2, 2]), r"skip_layers lists layers \[2\] more than once"),
    (dict(skip_layers=list(range(10))), r"skip_layers drops all 10 layers"),
    (dict(ffn_dims=[64] * 9), r"ffn_dims has 9 entries but the model has 10 layers"),
    (dict(ffn_dims=[64] * 9 + [0]), r"ffn_dims\[9\] must be a positive integer, got 0"),
])
def test_invalid_cuts_are_refused(ours, kwargs, match):
    with pytest.raises(CutError, match=match):
        matformer.slice(ours, **kwargs)


def test_skipping_a_source_together_with_all_its_readers_is_allowed(ours):
    cfg = matformer.slice(ours, skip_layers=[3, 5, 6, 7, 8]).config
    assert cfg.num_hidden_layers == 5 and cfg.num_kv_shared_layers == 1 and cfg.kv_sources() == {4: 3}


def test_other_models_and_wrong_presets_are_refused(ours):
    qwen = BY_NAME["qwen3"]
    with pytest.raises(TypeError, match="MatFormer slicing needs a Gemma 3n model .* got HfaQwen3ForCausalLM"):
        matformer.slice(ours_from(qwen, reference(qwen)))
    with pytest.raises(CutError, match=r"preset 'E2B' cuts a 35-layer model \(E4B\); this model has 10 layers"):
        slice_preset(ours, "E2B")
    with pytest.raises(CutError, match=r"unknown MatFormer preset 'E3B'"):
        slice_preset(ours, "E3B")


def test_cli_slices_an_official_release_and_a_saved_model(ref, ours, tmp_path, capsys):
    release = tmp_path / "release"
    release.mkdir()
    CASE.write_release(ref, CASE.official_config(), release)
    (release / "tokenizer_config.json").write_text("{}")
    ffn = ",".join("keep" if w is None else str(w) for w in [128, None, 64, 80, 100, 32, None, 40, 64, 128])
    assert main(["slice", str(release), str(tmp_path / "out"), "--ffn-dims", ffn, "--skip-layers", "1,6"]) == 0
    printed = capsys.readouterr().out
    expected = matformer.slice(ours, **CUT)
    before, after = count_parameters(ours), count_parameters(expected)
    assert f"parameters: {before:,} -> {after:,}" in printed and "8 layers" in printed
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = tokens(CASE)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, expected(ids).logits)

    # From the saved model: skip one more layer (a range), then an invalid cut.
    assert main(["slice", str(tmp_path / "out"), str(tmp_path / "out2"), "--skip-layers", "6-7"]) == 0
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["num_hidden_layers"] == 6
    capsys.readouterr()
    assert main(["slice", str(tmp_path / "out"), str(tmp_path / "out3"), "--skip-layers", "2"]) == 2
    assert "layer 2 cannot be skipped: kept layers [4, 5, 6] reuse its keys and values" in capsys.readouterr().err
    assert not (tmp_path / "out3").exists()
    assert main(["slice", str(release), str(tmp_path / "out"), "--skip-layers", "1"]) == 2
    assert "already holds a model" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["slice", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--preset", "E2B", "--ffn-dims", "--skip-layers", "parameter count", "official gemma3n"):
        assert needle in text, needle
