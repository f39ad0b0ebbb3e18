"""Run under torchrun: load each saved model with transformers' own tensor-parallel plan (`tp_plan="auto"`) and
save rank 0's logits. Used by test_distributed.py (gloo on the CPU)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_archs  # noqa: F401 - registers the architectures

root = Path(sys.argv[1])
for path in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()
    sharded = [n for n, p in model.named_parameters() if isinstance(p.data, torch.distributed.tensor.DTensor)
               and p.data.to_local().shape != p.shape]
    with torch.no_grad():
        logits = model(torch.load(path / "ids.pt")).logits
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "sharded": sharded}, path / "tp.pt")
dist.barrier()
dist.destroy_process_group()
