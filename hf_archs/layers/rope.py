"""Rotary position embeddings: inverse frequencies for each scaling type, and their application.

The scaling types are those of transformers' rope registry (`rope_type` in a config's `rope_parameters`):
default, linear, llama3 and yarn. Each is a plain function of explicit numbers, tested against
`transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _linear(dim: int, theta: float, *, factor: float, **_: Any) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(dim, theta) / factor, 1.0


def _llama3(dim: int, theta: float, *, factor: float, low_freq_factor: float, high_freq_factor: float,
            original_max_position_embeddings: int, **_: Any) -> tuple[torch.Tensor, float]:
    # Llama 3.1: wavelengths longer than old_len / low_freq_factor are divided by `factor`, shorter than
    # old_len / high_freq_factor are kept, the band between is interpolated smoothly.
    inv_freq = _base_inv_freq(dim, theta)
    old_len = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high_freq_factor) & (wavelen <= old_len / low_freq_factor)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, *, factor: float, original_max_position_embeddings: int,
          beta_fast: float | None = None, beta_slow: float | None = None, attention_factor: float | None = None,
          mscale: float | None = None, mscale_all_dim: float | None = None, truncate: bool = True,
          **_: Any) -> tuple[torch.Tensor, float]:
    # YaRN (arXiv:2309.00071): interpolate low frequencies, extrapolate high ones, ramp between; scale cos/sin by
    # `attention_factor` (DeepSeek's mscale / mscale_all_dim ratio when both are given).
    beta_fast, beta_slow = beta_fast or 32, beta_slow or 1
    if attention_factor is None:
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


ROPE_TYPES = {
    "default": lambda dim, theta, **_: (_base_inv_freq(dim, theta), 1.0),
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}


def rope_inv_freq(head_dim: int, rope_parameters: Mapping[str, Any]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[rotary_dim // 2]` and the cos/sin scale for one `rope_parameters` dict."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {sorted(ROPE_TYPES)}")
    dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
    params = {k: v for k, v in rope_parameters.items() if k not in ("rope_type", "type", "rope_theta")}
    return ROPE_TYPES[rope_type](dim, float(rope_parameters["rope_theta"]), **params)


class RotaryEmbedding(nn.Module):
    """Computes `(cos, sin)` of shape `[batch, seq, rotary_dim]` for the given positions.

    `interleaved=False` pairs dimension i with i + d/2 (the HF "rotate_half" layout); `interleaved=True` pairs
    2i with 2i + 1 (the layout of Meta's and DeepSeek's original code). `fp32=True` returns cos/sin in fp32 so
    `apply_rope` rotates in fp32 whatever the activations' dtype (OLMo's runtime does).
    """

    def __init__(self, head_dim: int, rope_parameters: Mapping[str, Any], interleaved: bool = False,
                 fp32: bool = False) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_parameters = dict(rope_parameters)
        self.interleaved = interleaved
        self.fp32 = fp32
        inv_freq, self.attention_scaling = rope_inv_freq(head_dim, self.rope_parameters)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent `inv_freq` (after building on the meta device, say)."""
        inv_freq, _ = rope_inv_freq(self.head_dim, self.rope_parameters)
        self.inv_freq = nn.Buffer(inv_freq.to(device or "cpu"), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [batch, seq, rotary_dim / 2]
        emb = freqs.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((freqs, freqs), dim=-1)
        dtype = torch.float32 if self.fp32 else x.dtype
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate `x` `[batch, heads, seq, head_dim]`; only the first `cos.shape[-1]` dims rotate (partial RoPE).
    The rotation runs in the dtype of `cos` and `x` promoted together; the result has `x`'s dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:  # the whole head rotates: no slicing (fewer ops per decoding step)
        rotated = x * cos + (_rotate_pairs(x) if interleaved else _rotate_half(x)) * sin
        return rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    rotated = x_rot * cos + (_rotate_pairs(x_rot) if interleaved else _rotate_half(x_rot)) * sin
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)
