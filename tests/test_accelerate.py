"""Multi-process training on the CPU: the recipe under `accelerate launch` with the shipped 2-process config (DDP on
gloo) gives the same adapter as one process with the same global batch; FSDP2 sharding of the decoder layers
(MoE and the experts' LoRA included) on gloo with torch's `fully_shard`; the shipped Accelerate configs parse."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_archs
from hf_archs.finetune import finetune, synthetic_task, write_records

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
ARCH = "qwen3_moe" if "qwen3_moe" in hf_archs.ARCHITECTURES else "qwen3"
HARD_TIMEOUT = 240  # a hang is a failure


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _recipe_args(data: Path, out: Path, batch_size: int) -> list[str]:
    return ["--tiny", ARCH, "--tiny-config", '{"num_hidden_layers": 2}', "--train-file", str(data),
            "--no-chat-template", "--max-steps", "3", "--lr", "1e-2", "--batch-size", str(batch_size),
            "--grad-accum", "2", "--experts", "on" if ARCH != "qwen3" else "off", "--no-progress", "--no-plot",
            "--output-dir", str(out), "--save", str(out / "save")]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not on PATH")
def test_two_process_ddp_equals_one_process(tmp_path):
    data = write_records(synthetic_task("shift", 64, seed=0), tmp_path / "train.jsonl")
    # One process, global batch 4 x 2 accumulation; in this test process.
    torch.set_num_threads(1)
    args = _recipe_args(data, tmp_path / "one", 4)
    from hf_archs.finetune import add_arguments, args_from_namespace
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    one = finetune(**vars(args_from_namespace(parser.parse_args(args))))
    # Two processes x batch 2: the same global batch, through `accelerate launch` and the shipped config.
    cmd = ["accelerate", "launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"), "--main_process_port", "29571",
           "-m", "hf_archs.finetune", *_recipe_args(data, tmp_path / "two", 2)]
    run = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=HARD_TIMEOUT)
    assert run.returncode == 0, run.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "log.json").read_text())
    assert two["settings"]["world_size"] == 2 and "MULTI_CPU" in two["settings"]["distributed"]
    # The two replicas hold the same weights after training.
    assert len(two["replica_checksums"]) == 2
    assert two["replica_checksums"][0] == pytest.approx(two["replica_checksums"][1], rel=1e-12)
    for a, b in zip(one["history"], two["history"]):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    ad1 = load_file(tmp_path / "one" / "save" / "adapter_model.safetensors")
    ad2 = load_file(tmp_path / "two" / "save" / "adapter_model.safetensors")
    assert ad1.keys() == ad2.keys()
    if ARCH != "qwen3":
        assert any(".experts.lora_A." in k for k in ad1)
    for k in ad1:
        torch.testing.assert_close(ad2[k], ad1[k], rtol=1e-3, atol=5e-5, msg=k)
    assert max(float((ad1[k] - torch.zeros_like(ad1[k])).abs().max()) for k in ad1 if "lora_B" in k) > 1e-3


FSDP_WORKER = r'''
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
from peft import LoraConfig, get_peft_model
from hf_archs.finetune import LossModel, causal_lm_of, tiny_model
from hf_archs.lora import lora_targets
arch, out = sys.argv[1], sys.argv[2]
base = tiny_model(arch, 512, seed=0, num_hidden_layers=2)
experts = None if arch != "qwen3" else False
model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False, **lora_targets(base, experts=experts)))
lm = LossModel(causal_lm_of(model), chunk_size=16)
mesh = init_device_mesh("cpu", (world,))
layer_names = set(lm._no_split_modules or [])
units = [m for m in lm.modules() if type(m).__name__ in layer_names]
for m in units:  # one FSDP2 unit per decoder layer (what the shipped fsdp2.yaml asks Accelerate to do)
    fully_shard(m, mesh=mesh)
fully_shard(lm, mesh=mesh)
ids = torch.load(sys.argv[3])
mine = ids[rank * 2:(rank + 1) * 2]
total, n, _ = lm(mine, mine.clone())
total.backward()
loss = total.detach().clone()
dist.all_reduce(loss)
sharded = sum(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in lm.parameters())
grads = {k: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for k, p in lm.named_parameters()
         if p.grad is not None}
if rank == 0:
    torch.save({"loss": loss, "grads": grads, "units": len(units), "sharded": sharded}, out)
dist.destroy_process_group()
'''


def test_fsdp2_shards_decoder_layers_on_cpu(tmp_path):
    """Accelerate 1.15 sets FSDP up only for GPU-like devices (on a CPU an FSDP config falls back to data
    parallel), so the sharding itself is exercised here with torch's `fully_shard`, as the FSDP2 config applies
    it: one unit per decoder layer (MoE layers and the experts' LoRA factors included), gloo, 2 processes."""
    from peft import LoraConfig, get_peft_model

    from hf_archs.finetune import LossModel, causal_lm_of, tiny_model
    from hf_archs.lora import lora_targets

    ids = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573",
           str(tmp_path / "worker.py"), ARCH, str(tmp_path / "out.pt"), str(tmp_path / "ids.pt")]
    run = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=HARD_TIMEOUT)
    assert run.returncode == 0, run.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["units"] == 2 and got["sharded"] > 0
    # One process, the whole batch: same loss; FSDP averages gradients over the 2 ranks.
    torch.set_num_threads(1)
    base = tiny_model(ARCH, 512, seed=0, num_hidden_layers=2)
    model = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False,
                                            **lora_targets(base, experts=None if ARCH != "qwen3" else False)))
    lm = LossModel(causal_lm_of(model), chunk_size=16)
    total, _, _ = lm(ids, ids.clone())
    total.backward()
    torch.testing.assert_close(got["loss"], total.detach(), rtol=1e-5, atol=1e-4)
    ref = {k: p.grad for k, p in lm.named_parameters() if p.grad is not None}
    assert got["grads"].keys() == ref.keys()
    if ARCH != "qwen3":
        assert any(".experts.lora_A." in k for k in ref)
    for k, g in ref.items():
        torch.testing.assert_close(got["grads"][k] * 2, g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=k)


def test_shipped_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for name in ("cpu_2proc.yaml", "ddp_multi_gpu.yaml", "fsdp2.yaml", "deepspeed_zero3.yaml", "cpu_2proc_fsdp2.yaml"):
        cfg = load_config_from_file(str(CONFIGS / name))
        kinds[name] = str(cfg.distributed_type)
    assert "FSDP" in kinds["fsdp2.yaml"] and "DEEPSPEED" in kinds["deepspeed_zero3.yaml"]
    fsdp = load_config_from_file(str(CONFIGS / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    ds = json.loads((CONFIGS / "deepspeed_zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    # The wrap policy reads `_no_split_modules`: every registered architecture names its decoder layers.
    from hf_archs.finetune import LossModel, tiny_model

    for name in hf_archs.ARCHITECTURES:
        model = tiny_model(name, 512)
        names = set(LossModel(model)._no_split_modules or [])
        assert any(type(m).__name__ in names for m in model.modules()), name
