"""Gated DeltaNet: every path against the naive recurrence (the oracle), the short convolution against its naive
form, the token mixer's cache / padding / packed-sequence handling, and transformers' torch functions as a second
witness."""

from __future__ import annotations

import pytest
import torch
from test_linear_mixers import close, fresh_cache, mixer
from transformers.cache_utils import DynamicCache
from transformers.models.qwen3_next import modeling_qwen3_next as tq

from hf_archs import InputError
from hf_archs.layers.gated_deltanet import (
    GatedDeltaNet,
    GatedRMSNorm,
    chunk_gated_delta_rule,
    fla_available,
    gated_delta_rule,
    l2norm_rsqrt,
    naive_recurrent_gated_delta_rule,
    packed_boundaries,
    pick_mode,
    recurrent_gated_delta_rule,
    unit_lower_inverse,
)
from hf_archs.layers.short_conv import ShortConvolution


def inputs(b: int, t: int, h: int, hv: int, dk: int, dv: int, decay: float = 0.5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = l2norm_rsqrt(torch.randn(b, t, h, dk, generator=gen))
    k = l2norm_rsqrt(torch.randn(b, t, h, dk, generator=gen))
    v = torch.randn(b, t, hv, dv, generator=gen)
    g = -decay * torch.rand(b, t, hv, generator=gen)
    beta = torch.rand(b, t, hv, generator=gen)
    state = torch.randn(b, hv, dk, dv, generator=gen)
    return q, k, v, g, beta, state


# Lengths below, at, between and above whole chunks of 16 (and several blocks of 64 tokens).
LENGTHS = [1, 5, 16, 37, 64, 150]


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("heads", [(2, 2), (2, 4)], ids=["mha", "gva"])
def test_chunked_equals_naive(t, with_state, heads):
    q, k, v, g, beta, s0 = inputs(2, t, *heads, 16, 8)
    s0 = s0 if with_state else None
    ref, ref_state = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    for chunk_size, block in [(16, 64), (64, 2048), (8, 8)]:
        out, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                            chunk_size=chunk_size, block_tokens=block)
        close(out, ref)
        close(state, ref_state)


@pytest.mark.parametrize("t", [1, 3, 20])
@pytest.mark.parametrize("with_state", [False, True])
def test_recurrent_equals_naive(t, with_state):
    q, k, v, g, beta, s0 = inputs(2, t, 2, 4, 16, 8, seed=1)
    s0 = s0 if with_state else None
    ref, ref_state = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    out, state = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    close(out, ref, 1e-6)
    close(state, ref_state, 1e-6)


def test_strong_and_no_decay_stay_exact():
    # near-total forgetting inside a chunk (exp(-30) per step) and none at all
    for decay in (30.0, 0.0):
        q, k, v, g, beta, s0 = inputs(1, 70, 2, 2, 16, 8, decay=decay, seed=2)
        ref, ref_state = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
        out, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                            chunk_size=32)
        assert torch.isfinite(out).all()
        close(out, ref, 5e-5)
        close(state, ref_state, 5e-5)


def test_chunked_matches_transformers_torch_path():
    q, k, v, g, beta, s0 = inputs(1, 100, 2, 4, 16, 8, seed=3)
    ours, ours_state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    theirs, their_state = tq.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=s0,
                                                          output_final_state=True)
    close(ours, theirs)
    close(ours_state, their_state)


def test_chunked_gradients_equal_naive():
    q, k, v, g, beta, s0 = inputs(1, 40, 2, 2, 8, 8, seed=4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, s0)]
    grads = []
    for fn in (naive_recurrent_gated_delta_rule, lambda *a, **kw: chunk_gated_delta_rule(*a, chunk_size=16, **kw)):
        out, state = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        (out.square().sum() + state.sum()).backward()
        grads.append([x.grad.clone() for x in leaves])
        for x in leaves:
            x.grad = None
    for a, b in zip(*grads):
        close(a, b, 5e-5)


def test_unit_lower_inverse():
    gen = torch.Generator().manual_seed(5)
    for c in (1, 5, 8, 48, 64):
        lower = (0.3 * torch.randn(3, c, c, generator=gen)).tril(-1)
        eye = torch.eye(c)
        expected = torch.linalg.solve_triangular(eye + lower, eye.expand(3, c, c), upper=False, unitriangular=True)
        close(unit_lower_inverse(lower), expected, 1e-5)


def test_short_convolution_equals_naive_and_continues_from_its_state():
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4)
    x = torch.randn(2, 6, 11)
    close(conv(x), conv.naive(x), 1e-6)
    # in pieces, each continuing from the state the previous one left: the same outputs
    outs, state = [], None
    for piece in (x[..., :2], x[..., 2:3], x[..., 3:9], x[..., 9:]):
        outs.append(conv(piece, state))
        state = conv.new_state(piece, state)
        assert state.shape == (2, 6, 4)
    close(torch.cat(outs, dim=-1), conv(x), 1e-6)
    close(state, x[..., -4:], 0)
    # transformers' fallback: same math
    close(conv(x), tq.causal_conv1d_fn(x, conv.weight.squeeze(1), None, activation="silu"), 1e-6)


def test_gated_rmsnorm_matches_transformers():
    torch.manual_seed(0)
    ours = GatedRMSNorm(8, eps=1e-6)
    theirs = tq.Qwen3NextRMSNormGated(8, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    x, z = torch.randn(5, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    assert torch.equal(ours.to(torch.bfloat16)(x, z), theirs.to(torch.bfloat16)(x, z))


def test_packed_documents_are_refused_after_a_cached_state():
    layer = mixer("gated_deltanet")
    x = torch.randn(1, 10, 32)
    cache = fresh_cache()
    with torch.no_grad():
        layer(x[:, :4], cache=cache)
        with pytest.raises(InputError, match="packed sequences .* cannot continue a cached state"):
            layer(x, cache=cache, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]))
    with pytest.raises(InputError, match="cu_seq_lens_q"):
        layer(x, cu_seq_lens_q=torch.tensor([0, 4, 12]))


def test_packing_detection():
    assert packed_boundaries(torch.arange(8)[None], None, 1, 8, None) is None
    assert packed_boundaries(torch.tensor([[0, 1, 2, 0, 1, 0]]), None, 1, 6, None) == [[0, 3, 5]]
    # a padding mask decides instead (left padding repeats position 0 under the padding)
    assert packed_boundaries(torch.tensor([[0, 0, 0, 1, 2]]), None, 1, 5, torch.ones(1, 5)) is None
    assert packed_boundaries(torch.tensor([[7]]), None, 1, 1, None) is None


def test_cache_of_the_wrong_kind_is_refused():
    layer = mixer("gated_deltanet")
    with pytest.raises(InputError, match="linear-attention layer but its cache layer is"):
        layer(torch.randn(1, 3, 32), cache=DynamicCache())


def test_mode_selection_and_bad_mode():
    x = torch.zeros(1)
    assert pick_mode("auto", x, 100, False) == "chunk"
    assert pick_mode("auto", x, 1, True) == "recurrent"
    assert pick_mode("auto", x, 100, True) == "chunk"
    with pytest.raises(ValueError, match="mode must be one of"):
        GatedDeltaNet(32, 2, 4, 8, 8, layer_idx=0, mode="fast")
    with pytest.raises(ValueError, match="num_v_heads .* must be a multiple of num_k_heads"):
        GatedDeltaNet(32, 2, 3, 8, 8, layer_idx=0)


def test_release_projection_layout_is_grouped_by_key_head():
    """in_proj_qkvz rows are [q_h | k_h | v (r heads) | z (r heads)] for each key head h, not [q | k | v | z]."""
    layer = mixer("gated_deltanet")
    nk, dk, dv, r = 2, 8, 8, 2
    w = layer.in_proj_qkvz.weight.detach()
    x = torch.randn(1, 1, 32)
    conv_in, z, b, a = layer.project(x)
    per_head = (x @ w.T).view(nk, 2 * dk + 2 * r * dv)
    q = torch.cat([per_head[h, :dk] for h in range(nk)])
    v = torch.cat([per_head[h, 2 * dk: 2 * dk + r * dv] for h in range(nk)])
    zz = torch.cat([per_head[h, 2 * dk + r * dv:] for h in range(nk)])
    close(conv_in[0, :, 0][: nk * dk], q, 0)
    close(conv_in[0, :, 0][2 * nk * dk:], v, 0)
    close(z.reshape(-1), zz, 0)
    ba = (x @ layer.in_proj_ba.weight.detach().T).view(nk, 2 * r)
    close(b.reshape(-1), ba[:, :r].reshape(-1), 0)
    close(a.reshape(-1), ba[:, r:].reshape(-1), 0)
    # transformers' reading of the same layout agrees
    theirs = tq.Qwen3NextGatedDeltaNet.fix_query_key_value_ordering
    holder = type("H", (), {"num_k_heads": nk, "num_v_heads": nk * r, "head_k_dim": dk, "head_v_dim": dv})()
    *_, tq_z, tq_b, tq_a = theirs(holder, x @ w.T, x @ layer.in_proj_ba.weight.detach().T)
    close(z, tq_z, 0)
    close(b, tq_b, 0)
    close(a, tq_a, 0)


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()), reason="needs CUDA and flash-linear-attention")
def test_fla_kernels_equal_naive_on_gpu():
    for t, with_state in [(100, False), (128, True), (1, True)]:
        q, k, v, g, beta, s0 = inputs(2, t, 2, 4, 64, 64, seed=6)
        s0 = s0 if with_state else None
        ref, ref_state = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
        cuda = [x.cuda() for x in (q, k, v, g, beta)]
        out, state = gated_delta_rule(*cuda, mode="fla", initial_state=None if s0 is None else s0.cuda(),
                                      output_final_state=True)
        # fla's Triton kernels take their fp32 dot products in TF32 (10-bit mantissa): up to 1.7e-3 measured on an
        # H200 at these sizes (the single-token recurrent kernel: 3e-7)
        close(out.cpu(), ref, 5e-3)
        close(state.float().cpu(), ref_state, 5e-3)
