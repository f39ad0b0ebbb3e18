"""Grok 2.5's TP-8 pre-sharded release and gpt-oss's `original/` folder: tiny synthetic releases in the publishers'
exact layouts load (and convert) with the reference's logits.

Grok has no transformers reference: its reference is the naive float64 forward of tests/test_grok2.py (written from
SGLang's semantics) and the same weights loaded from the unsharded layout. gpt-oss's is transformers'
GptOssForCausalLM holding the dequantized MXFP4 experts (transformers' own MXFP4 converter)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from cases import BY_NAME
from helpers import max_rel_diff, randomize, tokens
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_archs
from hf_archs.convert import convert

# --- Grok 2.5: *-TP-common + *-TP-000 ... 007 ----------------------------------------------------------------------

# The real release groups tensors by kind, one file per kind for all layers (official-releases.md §11): the common
# files hold whole tensors, the expert files one rank's rows (w1, w3) or columns (w2) of every expert.
_COMMON = {"model.embed_tokens.": "00000", "lm_head.": "00001", "model.norm.": "00002", "mlp.gate_proj.": "00003",
           "mlp.down_proj.": "00004", "mlp.up_proj.": "00005", "self_attn.k_proj.": "00009",
           "self_attn.o_proj.": "00010", "self_attn.q_proj.": "00011", "self_attn.v_proj.": "00012",
           "pre_attn_norm.": "00013", "post_attn_norm.": "00014", "pre_moe_norm.": "00015",
           "post_moe_norm.": "00016", "block_sparse_moe.gate.": "00017"}
_EXPERT_FILES = {"w1": ("00006", 0), "w2": ("00007", 1), "w3": ("00008", 0)}


def grok_config() -> dict:
    from test_grok2 import RELEASE

    return dict(copy.deepcopy(RELEASE), model_type="git")  # what xai-org/grok-2's config.json says


def write_tp8(root: Path, cfg: dict, tensors: dict[str, torch.Tensor], ranks: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        kind = name.rsplit(".", 2)[-2] if ".experts." in name else None
        if kind in _EXPERT_FILES:
            stem, dim = _EXPERT_FILES[kind]
            for r, piece in enumerate(t.chunk(ranks, dim=dim)):
                files.setdefault(f"pytorch_model-{stem}-TP-{r:03d}.safetensors", {})[name] = piece.contiguous()
            continue
        stem = next(s for key, s in _COMMON.items() if key in name)
        files.setdefault(f"pytorch_model-{stem}-TP-common.safetensors", {})[name] = t.contiguous()
    for fname, content in files.items():
        save_file(content, root / fname, metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    return root


@pytest.fixture(scope="module")
def grok(tmp_path_factory):
    from test_grok2 import release_tensors

    cfg = grok_config()
    tensors = release_tensors(cfg)
    root = write_tp8(tmp_path_factory.mktemp("grok") / "grok-2", cfg, tensors)
    return cfg, tensors, root


def test_grok_tp8_release_holds_the_unsharded_weights(grok, tmp_path):
    from test_grok2 import write_release

    cfg, tensors, root = grok
    assert len(list(root.glob("*-TP-00[0-7].safetensors"))) == 24 and len(list(root.glob("*-TP-common*"))) == 15
    model = hf_archs.from_official(root, format="grok_tp8", attn_implementation="eager")
    assert type(model) is hf_archs.ARCHITECTURES["grok2"].causal_lm_class
    # The same weights from the unsharded layout (the release's names, one file): every tensor equal.
    plain = hf_archs.from_official(write_release(tmp_path / "plain", dict(cfg, model_type="hfa_grok2"), tensors))
    ours, theirs = model.state_dict(), plain.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(t, theirs[n]) for n, t in ours.items())
    w2 = tensors["model.layers.2.block_sparse_moe.experts.5.w2.weight"]
    assert torch.equal(ours["model.layers.2.block_sparse_moe.experts.down_proj"][5], w2)


def test_grok_tp8_release_logits_match_the_naive_reference(grok):
    from test_grok2 import naive_forward

    cfg, tensors, root = grok
    model = hf_archs.from_official(root, format="grok_tp8", attn_implementation="eager")
    ids = torch.randint(3, cfg["vocab_size"], (12,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None]).logits[0]
    assert max_rel_diff(ours.double(), naive_forward(tensors, cfg, ids.tolist())) <= 1e-5


def test_grok_tp8_convert(grok, tmp_path):
    _, _, root = grok
    (root / "tokenizer.tok.json").write_text("{}")  # xAI's own format: no faithful conversion, reported
    try:
        manifest = convert(root, tmp_path / "out", format="grok_tp8", progress=False)
    finally:
        (root / "tokenizer.tok.json").unlink()
    assert manifest["source_format"] == "grok_tp8"
    assert {f"pytorch_model-00007-TP-{r:03d}.safetensors" for r in range(8)} <= set(manifest["source_files"])
    assert manifest["tokenizer"]["missing"] == [
        "tokenizer.json (the release ships ['tokenizer.tok.json']: no faithful conversion here)"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").state_dict()
    direct = hf_archs.from_official(root, format="grok_tp8", attn_implementation="eager").state_dict()
    assert set(saved) == set(direct) and all(torch.equal(t, direct[n]) for n, t in saved.items())


def test_grok_tp8_broken_releases_are_named(grok, tmp_path):
    from test_grok2 import release_tensors

    cfg, _, _ = grok
    tensors = release_tensors(cfg)
    root = write_tp8(tmp_path / "a", cfg, tensors)
    (root / "pytorch_model-00007-TP-003.safetensors").unlink()
    with pytest.raises(hf_archs.CheckpointError, match=r"block_sparse_moe\.experts\.0\.w2\.weight: no slice in the "
                                                        r"files of ranks \[3\]"):
        hf_archs.from_official(root, format="grok_tp8", attn_implementation="eager")
    root = write_tp8(tmp_path / "b", cfg, tensors)
    for f in root.glob("*-TP-005.safetensors"):
        f.unlink()
    with pytest.raises(hf_archs.CheckpointError, match=r"the files of tensor-parallel ranks \[5\] are missing"):
        hf_archs.from_official(root, format="grok_tp8", attn_implementation="eager")
    root = write_tp8(tmp_path / "c", cfg, tensors)
    file = root / "pytorch_model-00006-TP-002.safetensors"
    pieces = load_file(file)
    pieces["model.layers.1.block_sparse_moe.experts.4.w1.weight"] = pieces[
        "model.layers.1.block_sparse_moe.experts.4.w1.weight"][:, :-1].contiguous()
    save_file(pieces, file)
    with pytest.raises(hf_archs.CheckpointError, match=r"experts\.4\.w1\.weight: rank slices do not line up"):
        hf_archs.from_official(root, format="grok_tp8", attn_implementation="eager")
    root = write_tp8(tmp_path / "d", cfg, tensors)  # a non-expert tensor split across ranks: no known join
    for r in range(8):
        save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(4)},
                  root / f"pytorch_model-00020-TP-{r:03d}.safetensors")
    with pytest.raises(hf_archs.CheckpointError, match=r"q_proj\.bias: split across the TP files, but no join rule"):
        hf_archs.from_official(root, format="grok_tp8", attn_implementation="eager")


def test_grok_tp8_is_detected(grok):
    _, _, root = grok
    hf_archs.from_official(root)


# --- gpt-oss original/ ---------------------------------------------------------------------------------------------

def gpt_oss_official() -> dict:
    """The gpt_oss case in what OpenAI's ModelConfig can say: hidden 96 (so gate_up_proj [E, 96, 64] is not square
    and a missing transpose cannot hide), the reference runtime's fixed eps 1e-5, 131072 positions."""
    off = BY_NAME["gpt_oss"].official_config()
    off.update(hidden_size=96, rms_norm_eps=1e-5, max_position_embeddings=131072)
    return off


def write_gpt_oss_original(root: Path, seed: int = 3) -> torch.nn.Module:
    """OpenAI's original/ layout from the reference: fused qkv, MXFP4 mlp1 / mlp2 (random codes; the reference then
    holds what transformers' converter makes of them), fp32 norm scales, two safetensors files and no index."""
    from test_quantized_releases import mxfp4_random
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    off = gpt_oss_official()
    torch.manual_seed(0)
    ref = randomize(BY_NAME["gpt_oss"].reference(off))
    sd = ref.state_dict()
    gen = torch.Generator().manual_seed(seed)
    out = {"embedding.weight": sd["model.embed_tokens.weight"], "norm.scale": sd["model.norm.weight"],
           "unembedding.weight": sd["lm_head.weight"]}
    with torch.no_grad():
        for i in range(off["num_hidden_layers"]):
            p, b = f"model.layers.{i}.", f"block.{i}."
            for kind in ("weight", "bias"):
                out[b + f"attn.qkv.{kind}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
                out[b + f"attn.out.{kind}"] = sd[p + f"self_attn.o_proj.{kind}"]
                out[b + f"mlp.gate.{kind}"] = sd[p + f"mlp.router.{kind}"]
            out[b + "attn.sinks"] = sd[p + "self_attn.sinks"]
            out[b + "attn.norm.scale"] = sd[p + "input_layernorm.weight"]
            out[b + "mlp.norm.scale"] = sd[p + "post_attention_layernorm.weight"]
            out[b + "mlp.mlp1_bias"] = sd[p + "mlp.experts.gate_up_proj_bias"]
            out[b + "mlp.mlp2_bias"] = sd[p + "mlp.experts.down_proj_bias"]
            for mlp, ours in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
                experts, cols, rows = sd[p + f"mlp.experts.{ours}"].shape  # in-major [E, in, out]
                blocks, scales = mxfp4_random(experts, rows, cols, gen)
                out[b + f"mlp.{mlp}_weight.blocks"], out[b + f"mlp.{mlp}_weight.scales"] = blocks, scales
                sd[p + f"mlp.experts.{ours}"].copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(out)
    for k, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        save_file({n: out[n].contiguous() for n in part}, root / f"model-0000{k + 1}.safetensors")
    config = {"num_hidden_layers": off["num_hidden_layers"], "num_experts": off["num_local_experts"],
              "experts_per_token": off["num_experts_per_tok"], "vocab_size": off["vocab_size"],
              "hidden_size": off["hidden_size"], "intermediate_size": off["intermediate_size"],
              "swiglu_limit": off["swiglu_limit"], "head_dim": off["head_dim"],
              "num_attention_heads": off["num_attention_heads"], "num_key_value_heads": off["num_key_value_heads"],
              "sliding_window": off["sliding_window"], "initial_context_length": off["initial_context_length"],
              "rope_theta": off["rope_theta"], "rope_scaling_factor": off["rope_scaling"]["factor"],
              "rope_ntk_alpha": off["rope_scaling"]["beta_slow"], "rope_ntk_beta": off["rope_scaling"]["beta_fast"]}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return ref


@pytest.fixture(scope="module")
def gpt_oss_original(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss") / "original"
    return root, write_gpt_oss_original(root)


def test_gpt_oss_original_loads_with_the_reference_logits(gpt_oss_original):
    root, ref = gpt_oss_original
    model = hf_archs.from_official(root, format="gpt_oss_original", dtype=torch.float32,
                                   attn_implementation="eager")
    assert type(model) is hf_archs.ARCHITECTURES["gpt_oss"].causal_lm_class
    ids = tokens(BY_NAME["gpt_oss"])
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5
    key = "model.layers.1.mlp.experts.gate_up_proj"
    assert model.state_dict()[key].shape == (8, 96, 64) and torch.equal(model.state_dict()[key], ref.state_dict()[key])


def test_gpt_oss_original_convert(gpt_oss_original, tmp_path):
    root, ref = gpt_oss_original
    manifest = convert(root, tmp_path / "out", dtype="float32", format="gpt_oss_original", progress=False)
    assert manifest["source_format"] == "gpt_oss_original" and manifest["tokenizer"]["missing"] == ["tokenizer.json"]
    assert {"model-00001.safetensors", "model-00002.safetensors", "config.json"} <= set(manifest["source_files"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = tokens(BY_NAME["gpt_oss"])
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5


def test_gpt_oss_original_broken_release_is_named(tmp_path):
    root = tmp_path / "original"
    write_gpt_oss_original(root)
    files = {f: load_file(f) for f in sorted(root.glob("*.safetensors"))}

    def rewrite(edit) -> None:
        for f, tensors in files.items():
            save_file(edit(dict(tensors)), f)

    def drop(name):
        return lambda t: {k: v for k, v in t.items() if k != name}

    rewrite(drop("block.1.mlp.mlp1_weight.scales"))
    with pytest.raises(hf_archs.CheckpointError, match=r"block\.1\.mlp\.mlp1_weight: expected \.blocks and \.scales "
                                                        r"\(MXFP4\) or one unquantized tensor, found \['\.blocks'\]"):
        hf_archs.from_official(root, format="gpt_oss_original")
    first = next(iter(files))
    rewrite(lambda t: t)  # everything back
    save_file(dict(files[first], **{"block.0.attn.qkv_extra.weight": torch.zeros(2)}), first)
    with pytest.raises(hf_archs.CheckpointError, match=r"unexpected tensors: \['block\.0\.attn\.qkv_extra\.weight'\]"):
        hf_archs.from_official(root, format="gpt_oss_original")
    qkv = next(f for f, t in files.items() if "block.1.attn.qkv.weight" in t)
    rewrite(lambda t: t)
    save_file(dict(files[qkv], **{"block.1.attn.qkv.weight": files[qkv]["block.1.attn.qkv.weight"][1:]}), qkv)
    with pytest.raises(hf_archs.CheckpointError, match=r"block\.1\.attn\.qkv\.weight: 255 rows, expected"):
        hf_archs.from_official(root, format="gpt_oss_original")


def test_gpt_oss_original_is_detected(gpt_oss_original):
    root, _ = gpt_oss_original
    hf_archs.from_official(root)
