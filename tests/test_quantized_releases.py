"""Quantized official releases, each built tiny in the publisher's storage (names, dtypes, packing, scales, config),
load with the logits of the reference model holding the dequantized weights (fp32, 1e-5 relative):
- Kimi K2 Thinking: compressed-tensors `pack-quantized` INT4, group 32, routed experts only;
- GLM-4.5-FP8 / Llama-4-Maverick-FP8: compressed-tensors `float-quantized` FP8 with per-channel scales;
- gpt-oss root release: MXFP4 experts (`*_blocks` / `*_scales`), transposed to the in-major layout.
The reference weights are computed here from the stored tensors by plain code written from the format
descriptions (or transformers' own MXFP4 converter), not by conversion/dequant.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from cases import BY_NAME
from helpers import max_rel_diff, randomize, tokens
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hf_archs

_EXPERT = re.compile(r"^(?P<p>.*\.experts)\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight$")


def _write(name: str, root: Path, official: dict | None = None) -> tuple[torch.nn.Module, dict]:
    case = BY_NAME[name]
    official = official or case.official_config()
    torch.manual_seed(0)
    ref = randomize(case.reference(official))  # = helpers.reference(case) for the case's own config
    if case.write_release is not None:
        case.write_release(ref, official, root)
    else:
        ref.save_pretrained(root)
    return ref, official


def _release_file(root: Path) -> Path:
    (file,) = root.glob("*.safetensors")
    return file


def _set_config(root: Path, **fields) -> None:
    cfg = json.loads((root / "config.json").read_text())
    cfg.update(fields)
    (root / "config.json").write_text(json.dumps(cfg))


def _hold(ref: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put release-named (per-expert) weights into the reference: plain tensors by name, experts fused as
    transformers keeps them in memory (gate_up_proj [E, 2I, H] = [gate; up], down_proj [E, H, I])."""
    state = ref.state_dict()
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    with torch.no_grad():
        for key, w in weights.items():
            if m := _EXPERT.match(key):
                experts.setdefault(m["p"], {}).setdefault(int(m["e"]), {})[m["w"]] = w
            elif key in state:
                state[key].copy_(w)
        for prefix, by_e in experts.items():
            if f"{prefix}.gate_up_proj" not in state:  # the MTP layer: not part of the reference
                continue
            n = state[f"{prefix}.gate_up_proj"].shape[0]
            state[f"{prefix}.gate_up_proj"].copy_(torch.stack(
                [torch.cat([by_e[e]["gate_proj"], by_e[e]["up_proj"]]) for e in range(n)]))
            state[f"{prefix}.down_proj"].copy_(torch.stack([by_e[e]["down_proj"] for e in range(n)]))


def _compare(name: str, root: Path, ref: torch.nn.Module) -> torch.nn.Module:
    model = hf_archs.from_official(root, dtype=torch.float32, attn_implementation="eager")
    ids = tokens(BY_NAME[name])
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5
    return model


# --- Kimi K2 Thinking: INT4 pack-quantized routed experts ------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors pack_to_int32 (num_bits 4): q + 8 as unsigned nibbles, element 8j + i in bits [4i, 4i+4)
    of word j, columns zero-padded to a multiple of 8, the uint32 words viewed as int32."""
    out, cols = q.shape
    u = torch.zeros(out, -(-cols // 8) * 8, dtype=torch.int64)
    u[:, :cols] = q + 8
    packed = torch.zeros(out, u.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        packed |= u[:, i::8] << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def int4_quantize(w: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-group INT4 of an [out, in] weight: (q in [-8, 7], bf16 scale [out, in / group], dequantized)."""
    out, cols = w.shape
    g = w.reshape(out, cols // group, group)
    scale = (g.abs().amax(-1) / 7.5).clamp_min(1e-8).to(torch.bfloat16)  # the release's scales are bf16
    q = torch.clamp(torch.round(g / scale.float()[..., None]), -8, 7)
    return q.reshape(out, cols).to(torch.int64), scale, (q * scale.float()[..., None]).reshape(out, cols)


K2_THINKING_QUANT = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "input_activations": None,
                                  "output_activations": None,
                                  "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                              "group_size": 32, "dynamic": False, "actorder": None,
                                              "observer": "minmax"}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None}


@pytest.mark.parametrize("name", ["kimi_k2", "deepseek_v3"])
def test_int4_pack_quantized_experts(name, tmp_path):
    ref, _ = _write(name, tmp_path)
    file = _release_file(tmp_path)
    tensors = load_file(file)
    dequantized, packed = {}, 0
    for key in [k for k in tensors if _EXPERT.match(k)]:  # the routed experts only, as K2 Thinking
        q, scale, w = int4_quantize(tensors.pop(key).float())
        base = key[: -len(".weight")]
        tensors[f"{base}.weight_packed"] = pack_int4(q)
        tensors[f"{base}.weight_scale"] = scale
        tensors[f"{base}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int32)
        dequantized[key] = w
        packed += 1
    assert packed >= 3 * 2 * 6  # two routed layers (plus the MTP layer) of 6+ experts x 3 projections
    save_file(tensors, file, metadata={"format": "pt"})
    _set_config(tmp_path, quantization_config=K2_THINKING_QUANT)
    _hold(ref, dequantized)
    model = _compare(name, tmp_path, ref)
    expert = next(k for k in dequantized if ".layers.3." in k and ".experts.1.gate_proj" in k)
    inter = dequantized[expert].shape[0]
    assert torch.equal(model.state_dict()["model.layers.3.mlp.experts.gate_up_proj"][1, :inter], dequantized[expert])


def test_int4_pack_quantized_needs_its_scale(tmp_path):
    _write("kimi_k2", tmp_path)
    file = _release_file(tmp_path)
    tensors = load_file(file)
    key = "model.layers.2.mlp.experts.0.up_proj.weight"
    q, _, _ = int4_quantize(tensors.pop(key).float())
    tensors[key.replace(".weight", ".weight_packed")] = pack_int4(q)  # no weight_scale / weight_shape
    save_file(tensors, file, metadata={"format": "pt"})
    _set_config(tmp_path, quantization_config=K2_THINKING_QUANT)
    with pytest.raises(hf_archs.CheckpointError, match="up_proj: pack-quantized weight without its weight_scale"):
        hf_archs.from_official(tmp_path)


# --- compressed-tensors FP8, channel strategy (GLM-4.5-FP8, Llama-4-Maverick-FP8) -------------------------------

def fp8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8: scale [out, 1] = amax / 448 (fp32), weight / scale in e4m3; and W = w8 * scale."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
    q = (w / scale).to(torch.float8_e4m3fn)
    return q, scale, q.float() * scale


FP8_CHANNEL_QUANT = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "format": "float-quantized",
                                  "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                              "strategy": "channel", "dynamic": False, "observer": "minmax"},
                                  "input_activations": {"num_bits": 8, "type": "float", "symmetric": True,
                                                        "strategy": "token", "dynamic": True}}},
    "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None}


def test_fp8_channel_compressed_tensors_glm4_moe(tmp_path):
    ref, _ = _write("glm4_moe", tmp_path)
    file = _release_file(tmp_path)
    tensors = load_file(file)
    dequantized = {}
    for key in [k for k in tensors if k.endswith("_proj.weight") and tensors[k].dim() == 2]:
        q, scale, w = fp8_channel(tensors[key].float())
        tensors[key], tensors[key[: -len("weight")] + "weight_scale"] = q, scale
        if ".self_attn." in key:  # a static activation scale, as some FP8 exports carry: unused once dequantized
            tensors[key[: -len("weight")] + "input_scale"] = torch.tensor([0.02])
        dequantized[key] = w
    assert len(dequantized) > 40
    save_file(tensors, file, metadata={"format": "pt"})
    _set_config(tmp_path, quantization_config=FP8_CHANNEL_QUANT)
    _hold(ref, dequantized)
    model = _compare("glm4_moe", tmp_path, ref)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[key], dequantized[key])


def test_fp8_channel_compressed_tensors_llama4_per_expert(tmp_path, tmp_path_factory):
    """Llama-4-Maverick-FP8 keeps its experts per expert, [out, in] (the OFFLINE_QUANT_COMPATIBLE layout of
    transformers' converter), each quantized per channel: fused at load into the input-major [E, H, 2I] /
    [E, I, H] of the bf16 releases, exactly; `hf-archs convert` writes that fused layout."""
    ref, _ = _write("llama4", tmp_path)
    file = _release_file(tmp_path)
    tensors = load_file(file)
    dequantized = {}
    for key in [k for k in tensors if k.endswith(".feed_forward.experts.gate_up_proj")]:
        prefix, both, down = key[: -len("gate_up_proj")], tensors.pop(key), tensors.pop(key.replace("gate_up", "down"))
        inter = both.shape[-1] // 2
        for e in range(both.shape[0]):
            for proj, w in (("gate_proj", both[e, :, :inter].T), ("up_proj", both[e, :, inter:].T),
                            ("down_proj", down[e].T)):
                q, scale, deq = fp8_channel(w.float().contiguous())
                tensors[f"{prefix}{e}.{proj}.weight"], tensors[f"{prefix}{e}.{proj}.weight_scale"] = q, scale
                dequantized[f"{prefix}{e}.{proj}.weight"] = deq
    save_file(tensors, file, metadata={"format": "pt"})
    _set_config(tmp_path, quantization_config=FP8_CHANNEL_QUANT)
    state = ref.state_dict()
    with torch.no_grad():
        for key in [k for k in state if k.endswith(".feed_forward.experts.gate_up_proj")]:
            p = "language_model." + key[: -len("gate_up_proj")]
            n = state[key].shape[0]
            state[key].copy_(torch.stack([torch.cat([dequantized[f"{p}{e}.gate_proj.weight"],
                                                     dequantized[f"{p}{e}.up_proj.weight"]]).T for e in range(n)]))
            state[key.replace("gate_up", "down")].copy_(
                torch.stack([dequantized[f"{p}{e}.down_proj.weight"].T for e in range(n)]))
    model = _compare("llama4", tmp_path, ref)
    ours, gate = model.state_dict(), dequantized["language_model.model.layers.1.feed_forward.experts.2.gate_proj.weight"]
    inter = gate.shape[0]
    assert torch.equal(ours["model.layers.1.feed_forward.experts.gate_up_proj"][2, :, :inter], gate.T)
    assert torch.equal(ours["model.layers.3.feed_forward.experts.down_proj"][1],
                       dequantized["language_model.model.layers.3.feed_forward.experts.1.down_proj.weight"].T)
    # Converted, the experts are written fused (the layout of the bf16 releases and of transformers' Llama 4).
    from hf_archs.convert import convert

    out = tmp_path_factory.mktemp("converted") / "llama4"
    convert(tmp_path, out, dtype="float32", progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any(re.search(r"\.experts\.\d+\.", k) for k in keys)
        assert torch.equal(f.get_tensor("model.layers.3.feed_forward.experts.down_proj"),
                           ours["model.layers.3.feed_forward.experts.down_proj"])


# --- gpt-oss root release: MXFP4 experts -----------------------------------------------------------------------

def mxfp4_random(experts: int, out: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 storage of an [E, out, cols] weight: blocks [E, out, cols / 32, 16] (two E2M1 codes a byte),
    E8M0 scales [E, out, cols / 32] around 2^-6 so the values are the size of trained weights."""
    groups = cols // 32
    blocks = torch.randint(0, 256, (experts, out, groups, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 124, (experts, out, groups), generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_mxfp4_gpt_oss_root_release(tmp_path):
    arch = hf_archs.ARCHITECTURES["gpt_oss"]
    # its MXFP4 experts ([E, out, in] once dequantized) are laid out in-major at load
    assert {"gate_up_proj", "down_proj"} <= set(arch.dequant_transposed)
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    official = BY_NAME["gpt_oss"].official_config()
    official["hidden_size"] = 96  # gate_up_proj [E, 96, 64]: not square, so a missing transpose cannot hide
    ref, _ = _write("gpt_oss", tmp_path, official)
    file = _release_file(tmp_path)
    tensors = load_file(file)
    gen = torch.Generator().manual_seed(3)
    state = ref.state_dict()
    for key in [k for k in tensors if k.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"))]:
        experts, cols, out = tensors.pop(key).shape  # stored in-major [E, in, out]
        blocks, scales = mxfp4_random(experts, out, cols, gen)
        tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
        with torch.no_grad():  # transformers' converter: [E, out, G, 16] -> [E, in, out]
            state[key].copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(tensors, file, metadata={"format": "pt"})
    _set_config(tmp_path, quantization_config={
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]})
    model = _compare("gpt_oss", tmp_path, ref)
    key = "model.layers.1.mlp.experts.down_proj"
    assert torch.equal(model.state_dict()[key], state[key])
