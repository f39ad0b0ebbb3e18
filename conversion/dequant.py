"""Dequantization of the quantized official releases, on the CPU, to fp32 (callers cast to bf16 if wanted).

Each function takes the stored tensors exactly as the release holds them. Sources of the math are cited per
function; tests check each one against a plain per-element reference on hand-made blocks.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128


def fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
              chunk_elements: int = 2**24) -> torch.Tensor:
    """FP8 e4m3 with block scales (DeepSeek V3/R1, Kimi K2, MiniMax-M2, Qwen3-FP8): W[i, j] = w[i, j] * s[i//bm, j//bn].

    The scale grid is ceil(M / bm) x ceil(N / bn): edges that do not fill a block have their own scale (the
    release zero-pads them before computing it), so shapes need not be multiples of the block (DeepSeek's
    `kv_a_proj_with_mqa` has 576 rows). Despite the name, `weight_scale_inv` multiplies.
    Source: deepseek-ai/DeepSeek-V3 inference/kernel.py `weight_dequant`.
    """
    if weight.dim() != 2:
        raise ValueError(f"fp8 block dequantization needs a 2-D weight, got shape {list(weight.shape)}")
    m, n = weight.shape
    bm, bn = block
    grid = (-(-m // bm), -(-n // bn))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(f"fp8 scale grid {list(scale_inv.shape)} does not fit weight {[m, n]} with blocks "
                         f"{[bm, bn]} (expected {list(grid)})")
    # A few block rows at a time straight into the output: peak extra memory two chunks, not two weight-sized
    # fp32 temporaries.
    out = torch.empty(m, n, dtype=torch.float32)
    col_scales = scale_inv.float()[:, torch.arange(n) // bn]  # [grid rows, n]
    step = max(1, chunk_elements // (bm * n))  # block rows per chunk
    for g0 in range(0, grid[0], step):
        r0, r1 = g0 * bm, min((g0 + step) * bm, m)
        torch.mul(weight[r0:r1].float(), col_scales[g0:g0 + step].repeat_interleave(bm, 0)[: r1 - r0], out=out[r0:r1])
    return out


def fp8_scaled(weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int] | None = None
               ) -> torch.Tensor:
    """compressed-tensors `float-quantized` FP8 (GLM-4.5-FP8, Llama 4 Maverick FP8): W = w * weight_scale.

    The scale's shape follows the strategy: `tensor` (a scalar or [1]), `channel` ([out, 1]) or `block`
    ([ceil(out/b), ceil(in/b)], pass `block`). Source: neuralmagic/compressed-tensors' float quantization.
    """
    if block is not None:
        return fp8_block(weight, weight_scale, block)
    out = weight.shape[0]
    if weight_scale.numel() == 1:
        return weight.float() * weight_scale.float().reshape(())
    if tuple(weight_scale.shape) in ((out, 1), (out,)):
        return weight.float() * weight_scale.float().reshape(out, *([1] * (weight.dim() - 1)))
    raise ValueError(f"fp8 weight_scale of shape {list(weight_scale.shape)} fits neither a tensor nor a channel "
                     f"strategy for weight {list(weight.shape)}")


def int4_pack(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_shape: torch.Tensor | list[int],
              group_size: int = 32) -> torch.Tensor:
    """compressed-tensors `pack-quantized` symmetric INT4 (Kimi K2 Thinking's experts).

    `weight_packed` int32 [out, ceil(in / 8)]: element 8j + i sits in bits [4i, 4i + 4) of column j, stored as
    q + 8 (unsigned nibble); `weight_scale` [out, in / group_size]; W = (u - 8) * scale[:, col // group_size].
    Source: neuralmagic/compressed-tensors pack_quantized.py (`unpack_from_int32`).
    """
    out, cols = (int(v) for v in (weight_shape.tolist() if torch.is_tensor(weight_shape) else weight_shape))
    packed = weight_packed.to(torch.int64) & 0xFFFFFFFF  # view the int32 words as unsigned
    if packed.shape[0] != out or packed.shape[1] * 8 < cols:
        raise ValueError(f"int4 packed shape {list(weight_packed.shape)} cannot hold weight_shape {[out, cols]}")
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # [out, words, 8]
    q = nibbles.reshape(out, -1)[:, :cols] - 8
    groups = -(-cols // group_size)
    if tuple(weight_scale.shape) != (out, groups):
        raise ValueError(f"int4 weight_scale shape {list(weight_scale.shape)} does not match {[out, groups]}")
    return q.float() * weight_scale.float().repeat_interleave(group_size, 1)[:, :cols]


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 (gpt-oss experts): `blocks` uint8 [..., G, 16] holds 32 E2M1 codes per group (low nibble = even
    element), `scales` uint8 [..., G] an E8M0 exponent per group: value = LUT[code] * 2^(scale - 127).
    Returns [..., G * 32] along the last (input) dimension, as stored.
    Source: openai/gpt-oss gpt_oss/torch/weights.py `_get_mxfp4_tensor`.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"mxfp4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"mxfp4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
                         f"(blocks must be [..., G, 16] with scales [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2)
