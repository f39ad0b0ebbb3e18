"""Multi-process paths that run on the CPU: transformers' tensor-parallel plans under torchrun with gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import hf_archs
from hf_archs.tour import tiny_config


def test_tensor_parallel_plans_shard_and_match_single_process(tmp_path):
    expected = {}
    for name, arch in hf_archs.ARCHITECTURES.items():
        torch.manual_seed(0)
        model = arch.causal_lm_class(tiny_config(arch)).eval()
        model.save_pretrained(tmp_path / name)
        ids = torch.randint(3, model.config.vocab_size, (1, 20))
        torch.save(ids, tmp_path / name / "ids.pt")
        with torch.no_grad():
            expected[name] = model(ids).logits
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(Path(__file__).with_name("tp_worker.py")), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    for name, logits in expected.items():
        got = torch.load(tmp_path / name / "tp.pt")
        # The projections the plan names are really split across the two ranks: attention always, and the dense
        # MLPs where the model has them (transformers has no tensor-parallel style for every fused expert
        # layout, e.g. gpt-oss's interleaved in-major experts, which then stay replicated).
        assert any(".self_attn.q_proj" in n or ".self_attn.q_a_proj" in n or ".self_attn.q_b_proj" in n
                   for n in got["sharded"]), (name, got["sharded"])
        cfg = hf_archs.ARCHITECTURES[name].config_class()
        if "dense" in (getattr(cfg, "mlp_layer_types", None) or ["dense"]):
            assert any("down_proj" in n for n in got["sharded"]), (name, got["sharded"])
        torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5, msg=name)
