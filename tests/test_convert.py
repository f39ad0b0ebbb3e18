"""hf-archs convert / export: outputs, provenance, and every guarantee tried."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_archs
from cases import BY_NAME
from helpers import max_rel_diff, reference, tokens
from hf_archs.cli import main
from hf_archs.convert import convert, export


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _release(tmp_path: Path, name: str = "qwen3") -> tuple[Path, torch.nn.Module]:
    ref = reference(BY_NAME[name])
    src = tmp_path / "src"
    ref.save_pretrained(src)
    (src / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [
        {"id": 1, "content": "<s>", "special": True}, {"id": 2, "content": "</s>", "special": True}]}))
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}", "eos_token": "</s>"}))
    return src, ref


def test_convert_writes_a_strict_loadable_hashed_model(tmp_path):
    src, ref = _release(tmp_path)
    before = _digest(src)
    dst = tmp_path / "out"
    manifest = convert(src, dst, dtype="float32", max_shard_bytes=60_000, progress=False)
    assert _digest(src) == before  # the source is never modified
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 1 and (dst / "model.safetensors.index.json").exists()
    for file, digest in manifest["output_files"].items():
        assert hashlib.sha256((dst / file).read_bytes()).hexdigest() == digest
    assert set(manifest["source_files"]) >= {"model.safetensors", "config.json"}
    assert manifest["source_files"]["model.safetensors"] == before["model.safetensors"]
    with safe_open(str(shards[0]), "pt") as f:
        assert f.metadata()["source_format"] == "hf" and f.metadata()["converter"].startswith("hf_archs ")
    assert json.loads((dst / "config.json").read_text())["model_type"] == "hfa_qwen3"
    card = (dst / "README.md").read_text()
    assert "library_name: transformers" in card and "base_model:" in card and "hf_archs" in card
    # The tokenizer files travel, special tokens intact.
    assert json.loads((dst / "tokenizer.json").read_text())["added_tokens"][1]["content"] == "</s>"
    assert manifest["tokenizer"]["carried"] == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    model = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager")
    assert type(model) is hf_archs.ARCHITECTURES["qwen3"].causal_lm_class
    ids = tokens(BY_NAME["qwen3"])
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5


def test_convert_moe_fp8_release(tmp_path):
    from test_official import fp8_quantize

    src, ref = _release(tmp_path, "qwen3_moe")
    file = src / "model.safetensors"
    tensors = load_file(file)
    for key in [k for k in tensors if k.endswith("proj.weight")]:
        tensors[key], tensors[key + "_scale_inv"] = fp8_quantize(tensors[key].float(), 16)
    save_file(tensors, file, metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    cfg["dtype"] = "bfloat16"  # what FP8 releases declare: their unquantized tensors are bf16
    (src / "config.json").write_text(json.dumps(cfg))
    manifest = convert(src, tmp_path / "out", progress=False)
    assert manifest["dtype"] == "bfloat16" and any("fp8" in n for n in manifest["notes"])
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    direct = hf_archs.from_official(src).float()  # bf16 (what the release declares), then computed in fp32
    ids = tokens(BY_NAME["qwen3_moe"])
    with torch.no_grad():  # bf16 storage of the dequantized weights: the same model as loading directly in bf16
        assert torch.equal(converted(ids).logits, direct(ids).logits)


def test_existing_destination_is_never_touched(tmp_path):
    src, _ = _release(tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        convert(src, dst, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["convert", str(src), str(dst), "--quiet"]) == 2
    convert(src, dst, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "manifest.json").exists()


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    from conversion import io

    src, _ = _release(tmp_path)
    calls = []
    real = io.SafetensorsWriter.add

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(self, name, tensor)

    monkeypatch.setattr(io.SafetensorsWriter, "add", failing)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no partial directory


def test_killed_conversion_leaves_no_destination(tmp_path):
    src, _ = _release(tmp_path)
    dst = tmp_path / "out"
    script = (
        "import time, sys\n"
        "from conversion import io\n"
        "real = io.SafetensorsWriter.add\n"
        "def slow(self, name, tensor):\n"
        "    time.sleep(0.2)\n"
        "    return real(self, name, tensor)\n"
        "io.SafetensorsWriter.add = slow\n"
        "import hf_archs.convert as c\n"
        f"c.convert({str(src)!r}, {str(dst)!r}, progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[1])
    deadline = time.time() + 120
    while not any(p.name.startswith(".out.partial-") and any(p.glob("*.safetensors")) for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "the conversion never started writing"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()


def test_unknown_tensor_stops_before_writing(tmp_path):
    src, _ = _release(tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hf_archs.CheckpointError, match=r"unexpected tensors: \['model\.layers\.0\.mystery\.weight'\]"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_index_shard_names_must_be_plain_and_symlinks_are_followed(tmp_path):
    src, ref = _release(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    os.replace(src / "model.safetensors", blobs / "abc123")
    (src / "model.safetensors").symlink_to(blobs / "abc123")  # the HF cache's snapshot layout
    keys = list(load_file(blobs / "abc123"))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in keys}}))
    convert(src, tmp_path / "ok", progress=False)
    for bad in ("../blobs/abc123", "/etc/passwd", "sub/model.safetensors"):
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: bad for k in keys}}))
        with pytest.raises(hf_archs.CheckpointError, match="points outside the release directory"):
            convert(src, tmp_path / "bad", progress=False)


def test_pickle_needs_the_flag(tmp_path):
    src, ref = _release(tmp_path)
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(hf_archs.CheckpointError, match="pickle files are never loaded"):
        convert(src, tmp_path / "out", progress=False)
    manifest = convert(src, tmp_path / "out", allow_pickle=True, progress=False)
    assert "pytorch_model.bin" in manifest["source_files"]


def test_truncated_source_names_the_file(tmp_path):
    src, _ = _release(tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(hf_archs.CheckpointError, match="model.safetensors: corrupt or truncated"):
        convert(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_export_round_trips_to_the_official_layout(tmp_path):
    import transformers

    for name, cls in (("qwen3", "Qwen3ForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM")):
        src, ref = _release(tmp_path / name, name)
        convert(src, tmp_path / name / "ours", dtype="float32", progress=False)
        export(tmp_path / name / "ours", tmp_path / name / "official")
        cfg = json.loads((tmp_path / name / "official" / "config.json").read_text())
        assert cfg["model_type"] == name and cfg["architectures"] == [cls]
        theirs = getattr(transformers, cls).from_pretrained(tmp_path / name / "official", attn_implementation="eager")
        ids = tokens(BY_NAME[name])
        with torch.no_grad():
            assert max_rel_diff(theirs(ids).logits, ref(ids).logits) <= 1e-5


def test_convert_help_lists_formats(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--allow-pickle" in out and "one of: hf (" in out and "mistral (" in out
