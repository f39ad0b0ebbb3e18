"""MiniMax-M2 checks the contract suite does not make: the release's config.json loads with its own field names
(rotary_dim as transformers converts it), variants the architecture does not implement are refused by name,
QK-norm really spans all heads, the release / save layouts keep `block_sparse_moe` with per-expert w1/w3/w2, and
the MTP modules (vllm-rbln's names) load from a block-FP8 release that stores them, are dropped from one that stores
none (the official files), and are refused by name when only partly there."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_archs
from cases import BY_NAME
from helpers import assert_bias_updates_balance, max_rel_diff, ours_from, reference, tokens
from hf_archs.mtp import run_mtp_layer
from test_official import fp8_quantize

CASE = BY_NAME["minimax_m2"]
ARCH = hf_archs.ARCHITECTURES["minimax_m2"]

# MiniMaxAI/MiniMax-M2 config.json, less file keys (auto_map, quantization_config, transformers_version).
HUB = dict(attn_type_list=[1] * 62, head_dim=128, hidden_act="silu", hidden_size=3072, intermediate_size=1536,
           max_position_embeddings=196608, mtp_transformer_layers=1, num_attention_heads=48, num_experts_per_tok=8,
           num_hidden_layers=62, num_key_value_heads=8, num_local_experts=256, num_mtp_modules=3,
           qk_norm_type="per_layer", rms_norm_eps=1e-6, rope_theta=5000000, rotary_dim=64, scoring_func="sigmoid",
           shared_intermediate_size=0, tie_word_embeddings=False, use_cache=True, use_mtp=True, use_qk_norm=True,
           use_routing_bias=True, vocab_size=200064)


def test_release_config_loads_and_defaults_match_it():
    from transformers import MiniMaxM2Config

    hub = ARCH.config_class(**copy.deepcopy(HUB))
    ours = ARCH.config_class()
    theirs = MiniMaxM2Config(**copy.deepcopy(HUB))
    assert hub.rope_parameters == theirs.rope_parameters == {
        "rope_type": "default", "rope_theta": 5000000, "partial_rotary_factor": 0.5}
    for name in [k for k in HUB if k not in ("rope_theta", "use_mtp")] + ["rope_parameters", "layer_types"]:
        assert getattr(ours, name) == getattr(hub, name), name
    assert hub.mlp_layer_types == ["sparse"] * 62 and hub.num_experts == 256
    # `use_mtp` is not kept: transformers' generate would take it as "decode with MTP".
    assert "use_mtp" not in json.loads(hub.to_json_string())
    # What save_pretrained writes converts to itself.
    again = ARCH.config_class(**{k: v for k, v in json.loads(hub.to_json_string()).items() if k != "model_type"})
    assert again.rotary_dim == 64 and again.rope_parameters == hub.rope_parameters
    # The flagship config builds the 3 MTP modules it declares after its 62 layers (as DeepSeek V3's builds 1).
    with torch.device("meta"):
        flagship = ARCH.causal_lm_class(hub)
    assert len(flagship.model.layers) == 65 and len(flagship.mtp_layers) == 3
    assert flagship.model.layers[62].shared_head.head.weight.shape == (200064, 3072)
    assert flagship.model.layers[62].eh_proj.weight.shape == (3072, 6144)


@pytest.mark.parametrize("bad, match", [
    (dict(attn_type_list=[1, 0, 1, 1]), r"attn_type_list must hold 1 .* lightning attention \(0\) is not implemented"),
    (dict(scoring_func="softmax"), "scoring_func must be 'sigmoid', got 'softmax'"),
    (dict(qk_norm_type="per_head"), "qk_norm_type must be 'per_layer'"),
    (dict(shared_intermediate_size=64), r"shared_intermediate_size must be 0 .* got 64"),
    (dict(rotary_dim=30), r"rotary_dim \(30\) must be even, at most head_dim \(24\)"),
    (dict(mlp_layer_types=["sparse", "dense", "sparse", "sparse"]), "mlp_layer_types must be 'sparse'"),
    (dict(mtp_transformer_layers=2), r"mtp_transformer_layers must be 1 .* got 2"),
    (dict(num_mtp_modules=-1), r"num_mtp_modules \(-1\) and mtp_loss_weight \(0.1\) must be >= 0"),
    (dict(mtp_loss_weight=-0.5), r"num_mtp_modules \(2\) and mtp_loss_weight \(-0.5\) must be >= 0"),
])
def test_unsupported_variants_are_refused_by_name(bad, match):
    cfg = {k: v for k, v in CASE.official_config().items() if k not in ("model_type", "architectures")}
    with pytest.raises(hf_archs.ConfigError, match=match):
        ARCH.config_class(**dict(cfg, **bad))


def test_qk_norm_spans_all_heads():
    ours = ours_from(CASE, reference(CASE))
    attn = ours.model.layers[0].self_attn
    c = ours.config
    assert attn.q_norm.weight.shape == (c.num_attention_heads * c.head_dim,)
    assert attn.k_norm.weight.shape == (c.num_key_value_heads * c.head_dim,)
    q = torch.randn(2, 3, c.num_attention_heads * c.head_dim)
    # One RMS over heads x head_dim: scaling a single head changes every head's output.
    scaled = q.clone()
    scaled[..., : c.head_dim] *= 10
    a, b = attn.q_norm(q), attn.q_norm(scaled)
    assert not torch.allclose(a[..., c.head_dim:], b[..., c.head_dim:])
    rms = q.pow(2).mean(-1, keepdim=True).add(c.rms_norm_eps).rsqrt()
    torch.testing.assert_close(a, attn.q_norm.weight * (q * rms))


def test_variants_without_routing_bias_or_qk_norm_build():
    cfg = {k: v for k, v in CASE.official_config().items() if k not in ("model_type", "architectures")}
    model = ARCH.causal_lm_class(ARCH.config_class(**dict(cfg, use_routing_bias=False, use_qk_norm=False)))
    assert not any("e_score_correction_bias" in k or "_norm" in k.split(".")[-2] for k in model.state_dict())
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_release_and_saved_layouts_keep_block_sparse_moe(tmp_path):
    ref = reference(CASE)
    (tmp_path / "release").mkdir()
    CASE.write_release(ref, CASE.official_config(), tmp_path / "release")
    with safe_open(str(tmp_path / "release" / "model.safetensors"), framework="pt") as f:
        release = set(f.keys())
    n = CASE.official["num_hidden_layers"]
    assert {"model.layers.0.block_sparse_moe.experts.7.w1.weight", "model.layers.0.block_sparse_moe.experts.7.w3.weight",
            "model.layers.0.block_sparse_moe.experts.7.w2.weight", "model.layers.0.block_sparse_moe.gate.weight",
            "model.layers.0.block_sparse_moe.e_score_correction_bias"} <= release
    # the MTP modules, in vllm-rbln's names, with the embedding's copy under the first one only
    assert {f"model.layers.{n + i}.{k}" for i in range(2) for k in (
        "eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight", "shared_head.head.weight",
        "self_attn.q_norm.weight", "block_sparse_moe.experts.7.w2.weight")} <= release
    assert f"model.layers.{n}.embed_tokens.weight" in release
    assert f"model.layers.{n + 1}.embed_tokens.weight" not in release
    assert not any(".mlp." in k for k in release)
    ours = ours_from(CASE, ref)
    ours.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert saved == release - {f"model.layers.{n}.embed_tokens.weight"}


def test_mtp_layer_keys_are_vllm_rbln_keys():
    """An MTP module: a full decoder layer plus the names vllm-rbln's minimax_m2_mtp.py loads (no embedding)."""
    model = ours_from(CASE, reference(CASE))
    n = model.config.num_hidden_layers
    assert len(model.model.layers) == n + 2 and len(model.mtp_layers) == 2
    for k in range(2):
        extra = {key.split(".", 3)[3] for key in model.state_dict() if key.startswith(f"model.layers.{n + k}.")}
        decoder = {key.split(".", 3)[3] for key in model.state_dict() if key.startswith(f"model.layers.{n - 1}.")}
        assert extra - decoder == {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                                   "shared_head.head.weight"}
        assert decoder <= extra and "block_sparse_moe.e_score_correction_bias" in decoder
        assert model.mtp_layers[k].embed_tokens is None  # reads the main embedding


def test_bias_update_reaches_the_block_level_bias():
    """MiniMax-M2 keeps `e_score_correction_bias` on `block_sparse_moe`, beside its router: the aux-loss-free
    balancing step must find it there (the MTP modules' too: the training forward with labels runs them) and move
    the load toward balance (nothing else changes)."""
    model = ours_from(CASE, reference(CASE)).train()
    blocks = [layer.block_sparse_moe for layer in model.model.layers]
    assert len(blocks) == CASE.official["num_hidden_layers"] + 2
    ids = torch.randint(3, CASE.official["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(5))
    assert_bias_updates_balance(model, blocks, lambda: model(ids, labels=ids))


# --- MTP modules from the release -------------------------------------------------------------------------------

BLOCK = 24  # not a divisor of 64 / 32 / 96: edge blocks are partial, as in the release's 128-blocks of odd shapes
_EXPERT = re.compile(r"^(?P<p>.*\.experts)\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_QUANTIZED = ("proj.weight", ".w1.weight", ".w2.weight", ".w3.weight")  # modules_to_not_convert: gate, bias, heads


def _dequantize(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """Block FP8 read back by its definition: each [block, block] tile of the e4m3 weight times its scale."""
    m, n = q.shape
    return q.float() * scale.repeat_interleave(block, 0)[:m].repeat_interleave(block, 1)[:, :n]


def _write_fp8_release(root: Path, mtp: bool = True) -> dict[str, torch.Tensor]:
    """The tiny release in MiniMaxAI's storage: every 2-D projection (attention, experts, eh_proj) block-FP8 e4m3
    with its `weight_scale_inv`; routers, biases, norms, embeddings and heads as they are. `mtp=False`: no tensor
    under model.layers.<num_hidden_layers + k>, as the official files. Returns the release's tensors with the
    quantized ones read back (what the loaded model must hold), the scales left out."""
    from case_minimax_m2 import release_tensors  # here: `cases` (imported above) imports it first

    official = CASE.official_config()
    tensors = release_tensors(reference(CASE), official)
    if not mtp:
        n = official["num_hidden_layers"]
        mtp_layers = (f"model.layers.{n}.", f"model.layers.{n + 1}.")
        tensors = {k: v for k, v in tensors.items() if not k.startswith(mtp_layers)}
    expected = dict(tensors)
    for key in [k for k in tensors if k.endswith(_QUANTIZED)]:
        q, s = fp8_quantize(tensors[key].float(), BLOCK)
        tensors[key], tensors[key + "_scale_inv"] = q, s
        expected[key] = _dequantize(q, s, BLOCK)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "model.safetensors", metadata={"format": "pt"})
    official.update(torch_dtype="bfloat16", quantization_config={
        "activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]})
    (root / "config.json").write_text(json.dumps(official))
    return expected


def _model_holding(release: dict[str, torch.Tensor], **overrides) -> torch.nn.Module:
    """Our model loaded strictly with release-named tensors, experts fused by plain code (w1 ; w3 -> gate_up_proj,
    w2 -> down_proj) and the embedding's copy under the first MTP module left out."""
    state, experts = {}, {}
    for key, value in release.items():
        if m := _EXPERT.match(key):
            experts.setdefault(m["p"], {}).setdefault(int(m["e"]), {})[m["w"]] = value
        elif not (key.startswith("model.layers.") and key.endswith(".embed_tokens.weight")):
            state[key] = value
    for prefix, by_e in experts.items():
        state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([by_e[e]["w1"], by_e[e]["w3"]]) for e in sorted(by_e)])
        state[f"{prefix}.down_proj"] = torch.stack([by_e[e]["w2"] for e in sorted(by_e)])
    config = hf_archs.config_from_official(dict(CASE.official_config(), **overrides))
    model = ARCH.causal_lm_class(config)
    model.load_state_dict(state, strict=True)
    model.set_attn_implementation("eager")
    return model.eval()


def _mtp_logits(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each MTP module's logits at every position it predicts from (module k reads h_{k-1}[i] and token i + k)."""
    with torch.no_grad():
        previous = model.model(ids).last_hidden_state
        pos = torch.arange(ids.shape[1])[None]
        out = []
        for k, layer in enumerate(model.mtp_layers, start=1):
            n = ids.shape[1] - k
            embeds = layer.mtp_embed(ids[:, k:], model.get_input_embeddings())
            previous = run_mtp_layer(model, k - 1, embeds, previous[:, :n], pos[:, :n], None)
            out.append(layer.mtp_logits(previous, model.lm_head))
    return out


def test_fp8_release_with_mtp_modules_loads_them(tmp_path):
    expected = _write_fp8_release(tmp_path)
    n = CASE.official["num_hidden_layers"]
    prep = hf_archs.official.prepare(tmp_path)
    assert prep.config.num_mtp_modules == 2
    # the embedding's copy under the first MTP module: skipped by the declared rule, with its reason
    assert prep.skipped == {ARCH.skip_keys[0][1]: 1} and "copy of the main embedding" in ARCH.skip_keys[0][1]
    model = hf_archs.from_official(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert model.config.num_mtp_modules == 2 and len(model.mtp_layers) == 2
    state = model.state_dict()
    for name in (f"model.layers.{n}.eh_proj.weight", f"model.layers.{n + 1}.self_attn.q_proj.weight"):
        assert torch.equal(state[name], expected[name]), name  # dequantized exactly
    assert torch.equal(state[f"model.layers.{n + 1}.block_sparse_moe.experts.down_proj"][7],
                       expected[f"model.layers.{n + 1}.block_sparse_moe.experts.7.w2.weight"])
    source = _model_holding(expected)  # the model the release was written from, holding the read-back weights
    ids = tokens(CASE, batch=2)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, source(ids).logits) <= 1e-6
    ours, theirs = _mtp_logits(model, ids), _mtp_logits(source, ids)
    assert [t.shape for t in ours] == [(2, 23, 128), (2, 22, 128)]
    for a, b in zip(ours, theirs):
        assert max_rel_diff(a, b) <= 1e-6
    # the MTP modules are live: MTP logits differ from the main head's at the same positions
    with torch.no_grad():
        assert max_rel_diff(ours[0], model(ids).logits[:, :23]) > 0.1


def test_release_without_mtp_modules_loads_without_them(tmp_path, caplog):
    """The official files: config.json declares num_mtp_modules but no tensor is under model.layers.<n + k>."""
    expected = _write_fp8_release(tmp_path, mtp=False)
    n = CASE.official["num_hidden_layers"]
    with caplog.at_level(logging.WARNING, logger="hf_archs.official"):
        model = hf_archs.from_official(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert ("hf_archs: the release declares 2 MTP modules (num_mtp_modules) but stores none (no tensor under "
            f"model.layers.<i> for i >= {n}): loaded without them, num_mtp_modules=0") in caplog.messages
    assert model.config.num_mtp_modules == 0 and len(model.model.layers) == n and model.mtp_layers == []
    assert json.loads((tmp_path / "config.json").read_text())["num_mtp_modules"] == 2  # the release is untouched
    source = _model_holding(expected, num_mtp_modules=0)
    ids = tokens(CASE, batch=2)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, source(ids).logits) <= 1e-6
        kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, use_mtp=True, **kw), model.generate(ids, **kw))  # nothing to draft
    # asking for the modules explicitly is strict: they are missing, by name
    with pytest.raises(hf_archs.CheckpointError, match=rf"missing tensors: .*model\.layers\.{n}\.eh_proj\.weight"):
        hf_archs.from_official(tmp_path, num_mtp_modules=2)


def _tampered(root: Path, edit) -> Path:
    """The tiny release (fp32, MTP modules at layers 4 and 5) with `edit` applied to its tensors."""
    root.mkdir()
    CASE.write_release(reference(CASE), CASE.official_config(), root)
    tensors = load_file(root / "model.safetensors")
    edit(tensors)
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.mark.parametrize("edit, match", [
    # one tensor of a module missing
    (lambda t: t.pop("model.layers.5.shared_head.norm.weight"),
     r"missing tensors: \['model\.layers\.5\.shared_head\.norm\.weight'\]"),
    # module 0 missing, module 1 there: a gap, not "no MTP modules"
    (lambda t: [t.pop(k) for k in [k for k in t if k.startswith("model.layers.4.")]],
     (r"missing tensors: \['model\.layers\.4\.block_sparse_moe\.e_score_correction_bias', .*"
      r"'model\.layers\.4\.eh_proj\.weight', .*'model\.layers\.4\.shared_head\.norm\.weight'\]$")),
    # only the embedding's copy stored under the first module
    (lambda t: [t.pop(k) for k in [k for k in t if k.startswith(("model.layers.4.", "model.layers.5."))
                                    and not k.endswith("embed_tokens.weight")]],
     r"missing tensors: .*model\.layers\.4\.enorm\.weight"),
    # a module more than the config declares
    (lambda t: t.update({k.replace("model.layers.5.", "model.layers.6."): v.clone()
                         for k, v in list(t.items()) if k.startswith("model.layers.5.")}),
     r"unexpected tensors: .*model\.layers\.6\.eh_proj\.weight"),
    (lambda t: t.__setitem__("model.layers.4.eh_proj.weight", t["model.layers.4.eh_proj.weight"][:, :64].clone()),
     r"mis-shaped tensors: \['model\.layers\.4\.eh_proj\.weight: checkpoint \[64, 64\], model \[64, 128\]'\]"),
    # the embedding's copy is skipped under an MTP layer only: under a decoder layer it is unexpected
    (lambda t: t.__setitem__("model.layers.1.embed_tokens.weight", t["model.layers.4.embed_tokens.weight"].clone()),
     r"unexpected tensors: \['model\.layers\.1\.embed_tokens\.weight'\]"),
], ids=["one_tensor", "one_module", "embedding_only", "extra_module", "mis_shaped", "embedding_under_decoder"])
def test_partly_stored_mtp_modules_are_refused_by_name(tmp_path, edit, match):
    assert CASE.official["num_hidden_layers"] == 4 and CASE.official["num_mtp_modules"] == 2  # names below
    root = _tampered(tmp_path / "release", edit)
    with pytest.raises(hf_archs.CheckpointError, match=match):
        hf_archs.from_official(root)


def test_fp8_release_missing_a_quantized_mtp_weight_is_refused_by_name(tmp_path):
    _write_fp8_release(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.5.eh_proj.weight"], tensors["model.layers.5.eh_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf_archs.CheckpointError, match=r"missing tensors: \['model\.layers\.5\.eh_proj\.weight'\]"):
        hf_archs.from_official(tmp_path)
