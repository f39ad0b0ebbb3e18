"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in fp32.

    `unit_offset=False`: `w * norm(x)`, weight initialised to 1; `unit_offset=True`: `(1 + w) * norm(x)`, weight
    stored zero-centred and initialised to 0 (Gemma, Qwen3-Next).
    `weight_in_fp32`: multiply by the weight in fp32, then cast to the input dtype (Gemma's and OLMo's order);
    otherwise cast first, then multiply in the input dtype (Llama's order). Defaults to `unit_offset`. The two
    orders agree in fp32; bf16 parity with each release needs its own.
    """

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False,
                 weight_in_fp32: bool | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight_in_fp32 = unit_offset if weight_in_fp32 is None else weight_in_fp32
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype == w.dtype and (x.dtype == torch.float32 or (self.weight_in_fp32 and not self.unit_offset)):
            # torch's fused kernel: the same math in fp32 with the weight product in fp32, bit for bit what the
            # lines below compute in these two cases (tests/test_layers.py), with one op instead of seven.
            return F.rms_norm(x, w.shape, 1.0 + w if self.unit_offset else w, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_fp32:
            w = 1.0 + self.weight.float() if self.unit_offset else self.weight.float()
            return (h * w).to(x.dtype)
        return (1.0 + self.weight if self.unit_offset else self.weight) * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, unit_offset={self.unit_offset}"
