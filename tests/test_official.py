"""from_official beyond the contract: sharded releases, dtypes, quantized releases, fused-expert checks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_archs
from cases import BY_NAME
from helpers import max_rel_diff, reference, tokens


def test_sharded_release_with_index_loads(tmp_path):
    case = BY_NAME["qwen3"]
    ref = reference(case)
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    model = hf_archs.from_official(tmp_path, attn_implementation="eager")
    ids = tokens(case)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5


def test_dtype_follows_the_release_unless_asked(tmp_path):
    case = BY_NAME["qwen3"]
    reference(case).to(torch.bfloat16).save_pretrained(tmp_path)
    assert next(hf_archs.from_official(tmp_path).parameters()).dtype == torch.bfloat16
    model = hf_archs.from_official(tmp_path, dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_quantized_release_is_refused_by_name(tmp_path):
    case = BY_NAME["qwen3"]
    reference(case).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf_archs.CheckpointError, match="the release is quantized \\('fp8'\\)"):
        hf_archs.from_official(tmp_path)


def test_missing_expert_is_named(tmp_path):
    case = BY_NAME["qwen3_moe"]
    reference(case).save_pretrained(tmp_path)
    file = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(file)
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(hf_archs.CheckpointError, match=r"missing tensors: \['model\.layers\.2\.mlp\.experts\.3\.up_proj"):
        hf_archs.from_official(tmp_path)


def test_expert_with_wrong_shape_is_named(tmp_path):
    case = BY_NAME["qwen3_moe"]
    reference(case).save_pretrained(tmp_path)
    file = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(file)
    name = "model.layers.0.mlp.experts.5.gate_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(hf_archs.CheckpointError, match=r"mis-shaped tensors: .*model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        hf_archs.from_official(tmp_path)


def test_unknown_model_type_and_missing_config(tmp_path):
    with pytest.raises(hf_archs.CheckpointError, match="no config.json"):
        hf_archs.from_official(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "banana"}))
    with pytest.raises(ValueError, match="model_type 'banana' is not supported by hf_archs"):
        hf_archs.from_official(tmp_path)
