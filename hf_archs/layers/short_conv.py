"""Short causal depthwise convolution (kernel 4 in the 2025 linear-attention releases), with its decoding state.

Each channel c is filtered on its own: `y[c, t] = act(sum_i w[c, i] * x[c, t - K + 1 + i])`, zeros before the first
token. The state a decoder carries from one call to the next is the last K inputs `[batch, channels, K]` (K, not
K - 1: the layout of transformers' `LinearAttentionLayer` cache, whose `update_conv_state` returns the stored inputs
followed by the new ones); a call that starts from a state sees those inputs as left context instead of zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          act_fn=None, context: torch.Tensor | None = None) -> torch.Tensor:
    """x [batch, channels, T] (continuing `context` [batch, channels, L] if given), weight [channels, 1, K] ->
    act(conv) [batch, channels, T] in x's dtype; the convolution runs in the weight's dtype."""
    t, k = x.shape[-1], weight.shape[-1]
    full = x if context is None else torch.cat((context.to(x.dtype), x), dim=-1)
    # padding K - 1 zeros on the left only matters where no context covers the window
    out = F.conv1d(full.to(weight.dtype), weight, bias, padding=k - 1, groups=weight.shape[0])[..., : full.shape[-1]]
    out = out[..., -t:]
    if act_fn is not None:
        out = act_fn(out)
    return out.to(x.dtype)


def conv_state(x: torch.Tensor, kernel_size: int, context: torch.Tensor | None = None) -> torch.Tensor:
    """The last `kernel_size` inputs after x [batch, channels, T] (zeros where the sequence is shorter)."""
    full = x if context is None else torch.cat((context.to(x.dtype), x), dim=-1)
    return F.pad(full, (max(0, kernel_size - full.shape[-1]), 0))[..., -kernel_size:]


class ShortConvolution(nn.Conv1d):
    """Depthwise causal conv1d + activation. Same parameters as `nn.Conv1d(channels, channels, kernel_size,
    groups=channels)`: `weight` [channels, 1, kernel_size] (the releases' `conv1d.weight`), optional `bias`.

    `forward(x)` with `x` [batch, channels, T]: the causal convolution of x alone (zero left context), or of x
    continuing `context` [batch, channels, L] (earlier inputs: the cached state); returns [batch, channels, T] in
    x's dtype. The convolution runs in the weight's dtype, the activation after it (transformers' op order).
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = False, activation: str | None = "silu") -> None:
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias, padding=0)
        self.activation = activation
        self.act_fn = ACT2FN[activation] if activation else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return causal_depthwise_conv(x, self.weight, self.bias, self.act_fn, context)

    def naive(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The same, one output at a time (the reference the tests check `forward` against)."""
        k = self.kernel_size[0]
        full = x if context is None else torch.cat((context.to(x.dtype), x), dim=-1)
        full = F.pad(full.to(self.weight.dtype), (k - 1, 0))
        w = self.weight[:, 0]  # [channels, K]
        outs = []
        for t in range(full.shape[-1] - x.shape[-1], full.shape[-1]):
            y = (full[..., t - k + 1: t + 1] * w).sum(-1)
            outs.append(y if self.bias is None else y + self.bias)
        out = torch.stack(outs, dim=-1)
        return (self.act_fn(out) if self.act_fn is not None else out).to(x.dtype)

    def new_state(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The last K inputs after `x` (zeros where the sequence is shorter): the state to cache."""
        return conv_state(x, self.kernel_size[0], context)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, kernel_size={self.kernel_size[0]}, activation={self.activation}"


__all__ = ["ShortConvolution", "causal_depthwise_conv", "conv_state"]
