"""Multi-process paths that run on the CPU: transformers' tensor-parallel plans under torchrun with gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import hf_archs
from hf_archs.tour import tiny_config


def test_tensor_parallel_plans_shard_and_match_single_process(tmp_path):
    expected, expected_names = {}, {}
    for name, arch in hf_archs.ARCHITECTURES.items():
        torch.manual_seed(0)
        model = arch.causal_lm_class(tiny_config(arch)).eval()
        model.save_pretrained(tmp_path / name)
        ids = torch.randint(3, model.config.vocab_size, (1, 20))
        torch.save(ids, tmp_path / name / "ids.pt")
        with torch.no_grad():
            expected[name] = model(ids).logits
        expected_names[name] = [n for n, _ in model.named_parameters()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(Path(__file__).with_name("tp_worker.py")), str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    for name, logits in expected.items():
        got = torch.load(tmp_path / name / "tp.pt")
        # Every column / row split the plan names (where the model has that module) is really split across the
        # two ranks. Fused experts without a tensor-parallel style in transformers (gpt-oss's interleaved in-major
        # layout) are not in the plans and stay replicated.
        params = expected_names[name]
        for pattern, style in hf_archs.ARCHITECTURES[name].config_class.base_model_tp_plan.items():
            if style not in ("colwise", "rowwise"):
                continue
            regex = re.compile(r"model\." + re.escape(pattern).replace(r"\*", r"\d+") + r"\.weight")
            if any(regex.fullmatch(n) for n in params):
                assert any(regex.fullmatch(n) for n in got["sharded"]), (name, pattern, got["sharded"])
        assert got["sharded"], name
        torch.testing.assert_close(got["logits"], logits, rtol=1e-5, atol=1e-5, msg=name)
