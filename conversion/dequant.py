"""Dequantization of the quantized official releases, on the CPU, to fp32 (FP8: straight to any float dtype).

Each function takes the stored tensors exactly as the release holds them. Sources of the math are cited per
function; tests check each one against a plain per-element reference on hand-made blocks.
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
CHUNK_ELEMENTS = 2**18  # elements per chunk: its int32 indices and offsets (1 MiB each) stay in L2 between passes

_BYTE_VALUES: dict[torch.dtype, torch.Tensor] = {}


def byte_values(dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """The fp32 value of each of the 256 bytes of a 1-byte dtype (e4m3 by default), from torch's own conversion
    (NaN codes, -0.0 and subnormals included): looking bytes up in it is exactly `weight.float()`."""
    if dtype not in _BYTE_VALUES:
        _BYTE_VALUES[dtype] = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return _BYTE_VALUES[dtype]


def _chunk_rows(cols: int, block_rows: int, chunk_elements: int) -> int:
    """Rows per chunk: whole blocks of `block_rows` rows, about `chunk_elements` elements (at least one block)."""
    return max(1, chunk_elements // max(1, block_rows * cols)) * block_rows


def _scaled_bytes(weight: torch.Tensor, scale: torch.Tensor, bm: int, bn: int, dtype: torch.dtype,
                  chunk_elements: int) -> torch.Tensor:
    """W[i, j] = float(weight[i, j]) * scale[i // bm, j // bn] in fp32, rounded once to `dtype`; `weight` 2-D of a
    1-byte dtype, `scale` [ceil(m / bm), ceil(n / bn)].

    A weight has at most 256 distinct codes per block, so each chunk of block rows gets a table of every product
    its blocks can need ([blocks, n / bn, 256], computed in fp32 and rounded to `dtype` exactly as the plain
    `(weight.float() * s).to(dtype)` would round each element), and the output is one gather from it: per element
    a byte-to-int32 copy, an add of the block's table offset, and the lookup. No fp32 copy of the weight, no
    separate multiply or cast pass (CPUs without FP8 instructions convert e4m3 element by element otherwise).
    """
    m, n = weight.shape
    gn = scale.shape[1]
    codes = weight.view(torch.uint8)
    values = byte_values(weight.dtype)
    scale = scale.float()
    out = torch.empty(m, n, dtype=dtype)
    step = _chunk_rows(n, bm, chunk_elements)
    rows = min(m, step)
    # Where each element's table starts, relative to the chunk's first block row (the same for every chunk).
    offsets = ((torch.arange(rows, dtype=torch.int32) // bm * gn)[:, None]
               + (torch.arange(n, dtype=torch.int32) // bn)[None, :]) * 256  # [rows, n]
    index = torch.empty(rows, n, dtype=torch.int32)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        table = (values * scale[r0 // bm:-(-r1 // bm), :, None]).to(dtype)  # [blocks, gn, 256]
        idx = index[: r1 - r0]
        idx.copy_(codes[r0:r1])
        idx.add_(offsets[: r1 - r0])
        torch.index_select(table.view(-1), 0, idx.view(-1), out=out[r0:r1].view(-1))
    return out


def fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
              chunk_elements: int = CHUNK_ELEMENTS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 e4m3 with block scales (DeepSeek V3/R1, Kimi K2, MiniMax-M2, Qwen3-FP8): W[i, j] = w[i, j] * s[i//bm, j//bn].

    The scale grid is ceil(M / bm) x ceil(N / bn): edges that do not fill a block have their own scale (the
    release zero-pads them before computing it), so shapes need not be multiples of the block (DeepSeek's
    `kv_a_proj_with_mqa` has 576 rows). Despite the name, `weight_scale_inv` multiplies.
    Source: deepseek-ai/DeepSeek-V3 inference/kernel.py `weight_dequant`.

    Bit for bit `(weight.float() * s_expanded).to(dtype)`: each product in fp32, rounded once to `dtype`.
    """
    if weight.dim() != 2:
        raise ValueError(f"fp8 block dequantization needs a 2-D weight, got shape {list(weight.shape)}")
    m, n = weight.shape
    bm, bn = block
    grid = (-(-m // bm), -(-n // bn))
    if tuple(scale_inv.shape) != grid:
        raise ValueError(f"fp8 scale grid {list(scale_inv.shape)} does not fit weight {[m, n]} with blocks "
                         f"{[bm, bn]} (expected {list(grid)})")
    if weight.element_size() != 1:  # not FP8 storage: the plain formula
        expanded = scale_inv.float().repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]
        return (weight.float() * expanded).to(dtype)
    return _scaled_bytes(weight, scale_inv, bm, bn, dtype, chunk_elements)


def fp8_scaled(weight: torch.Tensor, weight_scale: torch.Tensor, block: tuple[int, int] | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """compressed-tensors `float-quantized` FP8 (GLM-4.5-FP8, Llama 4 Maverick FP8): W = w * weight_scale.

    The scale's shape follows the strategy: `tensor` (a scalar or [1]), `channel` ([out, 1]) or `block`
    ([ceil(out/b), ceil(in/b)], pass `block`). Computed in fp32, rounded once to `dtype` (as `fp8_block`).
    Source: neuralmagic/compressed-tensors' float quantization.
    """
    if block is not None:
        return fp8_block(weight, weight_scale, block, dtype=dtype)
    out = weight.shape[0]
    if weight_scale.numel() == 1:
        scale = weight_scale.float().reshape(1, 1).expand(out, 1)  # as one scale per row
    elif tuple(weight_scale.shape) in ((out, 1), (out,)):
        scale = weight_scale.float().reshape(out, 1)
    else:
        raise ValueError(f"fp8 weight_scale of shape {list(weight_scale.shape)} fits neither a tensor nor a channel "
                         f"strategy for weight {list(weight.shape)}")
    rows = weight.reshape(out, -1)  # [out, everything else]: one scale per row
    if weight.element_size() != 1:
        return (rows.float() * scale).to(dtype).reshape(weight.shape)
    return _scaled_bytes(rows, scale, 1, max(1, rows.shape[1]), dtype, CHUNK_ELEMENTS).reshape(weight.shape)


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
