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


def fp8_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 as the releases store it: one fp32 scale per block (amax / 448), weight / scale in e4m3."""
    m, n = w.shape
    gm, gn = -(-m // block), -(-n // block)
    scale = torch.empty(gm, gn)
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for i in range(gm):
        for j in range(gn):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = blk.abs().max().clamp_min(1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("name", ["qwen3", "qwen3_moe"])
def test_fp8_block_release_is_dequantized_exactly(name, tmp_path):
    from conversion.dequant import fp8_block

    case = BY_NAME[name]
    ref = reference(case)
    ref.save_pretrained(tmp_path)
    file = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(file)
    block = 24  # 64 and 96 are not multiples: edge blocks are partial, as DeepSeek's 576-row kv_a_proj
    quantized = 0
    for key in [k for k in tensors if k.endswith("proj.weight") and tensors[k].dim() == 2]:
        q, s = fp8_quantize(tensors[key].float(), block)
        tensors[key], tensors[key + "_scale_inv"] = q, s
        quantized += 1
    assert quantized > 8
    save_file(tensors, file, metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = hf_archs.from_official(tmp_path, dtype=torch.float32, attn_implementation="eager")
    # The reference holding the dequantized weights (its fused experts from the dequantized per-expert tensors).
    with torch.no_grad():
        state = ref.state_dict()
        for key, q in load_file(file).items():
            if key.endswith("_scale_inv"):
                continue
            if key + "_scale_inv" in tensors:
                w = fp8_block(tensors[key], tensors[key + "_scale_inv"], (block, block))
                if key in state:
                    state[key].copy_(w)
        def deq(key: str) -> torch.Tensor:
            return fp8_block(tensors[key], tensors[key + "_scale_inv"], (block, block))

        for i, layer in enumerate(ref.model.layers):  # fused experts from the dequantized per-expert tensors
            if hasattr(layer.mlp, "experts"):
                p = f"model.layers.{i}.mlp.experts"
                n = layer.mlp.experts.gate_up_proj.shape[0]
                layer.mlp.experts.gate_up_proj.copy_(torch.stack([torch.cat(
                    [deq(f"{p}.{e}.gate_proj.weight"), deq(f"{p}.{e}.up_proj.weight")]) for e in range(n)]))
                layer.mlp.experts.down_proj.copy_(torch.stack([deq(f"{p}.{e}.down_proj.weight") for e in range(n)]))
    ids = tokens(case)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5
    sd = model.state_dict()
    w = fp8_block(tensors["model.layers.0.self_attn.q_proj.weight"],
                  tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"], (block, block))
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], w)


def test_unsupported_quantization_is_refused_by_name(tmp_path):
    case = BY_NAME["qwen3"]
    reference(case).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf_archs.CheckpointError, match="quantization method 'gptq' is not supported"):
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
