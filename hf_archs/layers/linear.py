"""The linear layer every block uses: `nn.Linear`, with a faster kernel for one bf16 row on the CPU."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Linear):
    """`y = x W^T + b`, exactly `nn.Linear` (same parameters, state dict, PEFT / TP / quantizer handling).

    One difference in how it runs: a single bf16 row on the CPU (a decoding step with batch 1) goes through
    `torch.mv` / `torch.addmv` instead of `mm`. torch's CPU `mm` takes a slow path for a one-row bf16 product
    (about 1.5-4x slower than `mv` on the same weights, measured in bench/results/); `mv` gives the same result bit
    for bit (checked in tests/test_layers.py). fp32 and fp16 are left to `F.linear` (no gain, and fp16 `mv` is
    neither faster nor identical).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.dtype is torch.bfloat16 and w.dtype is torch.bfloat16 and x.device.type == "cpu"
                and x.numel() == self.in_features >= 64 and type(w) is nn.Parameter):
            y = torch.mv(w, x.reshape(-1)) if self.bias is None else torch.addmv(self.bias, w, x.reshape(-1))
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)
