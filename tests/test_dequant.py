"""The dequantization recipes against plain per-element references on hand-made blocks."""

from __future__ import annotations

import math

import pytest
import torch

from conversion import dequant


def test_fp8_block_matches_a_per_element_loop_on_ragged_shapes():
    torch.manual_seed(0)
    m, n = 5, 7  # not multiples of the (2, 3) blocks: edge blocks are partial
    w = (torch.randn(m, n) * 3).to(torch.float8_e4m3fn)
    s = torch.rand(3, 3) + 0.5
    out = dequant.fp8_block(w, s, block=(2, 3))
    ref = torch.empty(m, n)
    for i in range(m):
        for j in range(n):
            ref[i, j] = float(w[i, j].float()) * float(s[i // 2, j // 3])
    assert torch.equal(out, ref)


def test_e4m3_table_is_torchs_conversion_of_every_byte():
    codes = torch.arange(256, dtype=torch.uint8)
    table, plain = dequant.byte_values(), codes.view(torch.float8_e4m3fn).float()
    nan = torch.isnan(plain)
    assert nan.sum() == 2 and torch.equal(torch.isnan(table), nan)  # 0x7F and 0xFF
    assert torch.equal(table[~nan].view(torch.int32), plain[~nan].view(torch.int32))  # -0.0 and subnormals too


@pytest.mark.parametrize("chunk_elements", [1, 40, 2**22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_block_in_chunks_is_bit_exact(chunk_elements, dtype):
    """Chunked, table-decoded, scaled in place and rounded once to `dtype`: the same bits as the plain
    `(w.float() * s_expanded).to(dtype)`, for chunks of one block row up to the whole weight, ragged edges."""
    gen = torch.Generator().manual_seed(0)
    m, n, bm, bn = 37, 29, 4, 8  # 10 x 4 blocks, the last row and column of blocks partial
    w = torch.randint(0, 256, (m, n), dtype=torch.uint8, generator=gen)
    w[w & 0x7F == 0x7F] = 0  # no NaN codes: torch.equal would fail on NaN == NaN
    w = w.view(torch.float8_e4m3fn)
    s = torch.rand(10, 4, generator=gen) * 1e-2
    expanded = s.repeat_interleave(bm, 0)[:m].repeat_interleave(bn, 1)[:, :n]
    ref = (w.float() * expanded).to(dtype)
    out = dequant.fp8_block(w, s, block=(bm, bn), chunk_elements=chunk_elements, dtype=dtype)
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), ref.view(torch.uint8))


def test_fp8_scaled_rounds_once_to_the_dtype():
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(0, 126, (6, 10), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    scale = torch.rand(6, 1, generator=gen)
    out = dequant.fp8_scaled(w, scale, dtype=torch.bfloat16)
    assert torch.equal(out.view(torch.int16), (w.float() * scale).to(torch.bfloat16).view(torch.int16))


def test_fp8_block_deepseek_576_rows():
    w = torch.ones(576, 256).to(torch.float8_e4m3fn)
    s = torch.arange(1, 11, dtype=torch.float32).reshape(5, 2)
    out = dequant.fp8_block(w, s)
    assert out[575, 255].item() == 10.0 and out[512, 0].item() == 9.0 and out[511, 128].item() == 8.0
    with pytest.raises(ValueError, match=r"fp8 scale grid \[4, 2\] does not fit weight \[576, 256\]"):
        dequant.fp8_block(w, s[:4])


def test_fp8_scaled_strategies():
    w = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(torch.float8_e4m3fn)
    assert torch.equal(dequant.fp8_scaled(w, torch.tensor([2.0])), torch.tensor([[2.0, -4.0], [1.0, 8.0]]))
    assert torch.equal(dequant.fp8_scaled(w, torch.tensor([[2.0], [3.0]])), torch.tensor([[2.0, -4.0], [1.5, 12.0]]))
    with pytest.raises(ValueError, match="fits neither a tensor nor a channel strategy"):
        dequant.fp8_scaled(w, torch.ones(3))


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Plain packer written from the format description: nibble i of word j holds element 8j + i, as q + 8."""
    out, cols = q.shape
    words = -(-cols // 8)
    u = torch.zeros(out, words * 8, dtype=torch.int64)
    u[:, :cols] = q + 8
    packed = torch.zeros(out, words, dtype=torch.int64)
    for i in range(8):
        packed |= u[:, i::8] << (4 * i)
    packed[packed >= 2**31] -= 2**32  # stored as int32
    return packed.to(torch.int32)


def test_int4_pack_round_trip():
    torch.manual_seed(0)
    q = torch.randint(-8, 8, (3, 70))  # 70 columns: padded to 72 in the packing
    scale = torch.rand(3, 3) + 0.1
    out = dequant.int4_pack(_pack_int4(q), scale, torch.tensor([3, 70]), group_size=32)
    ref = torch.stack([torch.tensor([q[r, c].item() * scale[r, c // 32].item() for c in range(70)]) for r in range(3)])
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="int4 weight_scale shape"):
        dequant.int4_pack(_pack_int4(q), scale[:, :2], [3, 70])


def test_mxfp4_matches_the_lut_definition():
    blocks = torch.tensor([[[0x21] + [0x00] * 15, [0xF8] + [0x7F] * 15]], dtype=torch.uint8)  # [1, 2, 16]
    scales = torch.tensor([[127, 129]], dtype=torch.uint8)
    out = dequant.mxfp4(blocks, scales)
    assert out.shape == (1, 64)
    # group 0, scale 2^0: byte 0x21 -> low nibble 1 (0.5) even element, high nibble 2 (1.0) odd element
    assert out[0, 0].item() == 0.5 and out[0, 1].item() == 1.0 and out[0, 2:32].abs().sum() == 0
    # group 1, scale 2^2: 0xF8 -> low 8 (-0.0), high 15 (-6.0); 0x7F -> low 15 (-6), high 7 (6)
    assert math.copysign(1, out[0, 32].item()) == -1 and out[0, 33].item() == -24.0
    assert out[0, 34].item() == -24.0 and out[0, 35].item() == 24.0


def test_mxfp4_agrees_with_transformers_converter():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (2, 6, 4, 16), dtype=torch.uint8)  # [E, out, G, 16]
    scales = torch.randint(118, 136, (2, 6, 4), dtype=torch.uint8)
    ours = dequant.mxfp4(blocks, scales)  # [E, out, in]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transposed to [E, in, out]
    torch.testing.assert_close(ours.transpose(1, 2), theirs)
