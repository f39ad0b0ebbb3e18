"""Component tests: each shared block against transformers' function or a plain reference (the test ladder's
first rung)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from hf_archs.layers import Attention, GatedMLP, Linear, RMSNorm, RotaryEmbedding, apply_rope, eager_attention, rope_inv_freq
from hf_archs.layers.attention import attention_function

ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 8.0},
    "llama3": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1,
             "original_max_position_embeddings": 4096},
    "yarn_mscale": {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                    "original_max_position_embeddings": 4096},
    "yarn_mscale_unequal": {"rope_type": "yarn", "factor": 32.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                            "original_max_position_embeddings": 4096},
    "yarn_no_truncate": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                         "truncate": False, "original_max_position_embeddings": 4096},
    "partial_yarn": {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.25,
                     "original_max_position_embeddings": 2048},
}


class _RopeConfig(PreTrainedConfig):
    model_type = "rope_test"


@pytest.mark.parametrize("name", sorted(ROPE_CASES))
@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_scaling_matches_transformers(name, theta):
    params = dict(ROPE_CASES[name], rope_theta=theta)
    ref_config = _RopeConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072)
    ref_config.head_dim = 128
    ref_config.rope_parameters = dict(params)
    ref_inv, ref_scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](ref_config, "cpu")
    inv, scale = rope_inv_freq(128, params)
    torch.testing.assert_close(inv, ref_inv, rtol=1e-6, atol=0)
    assert math.isclose(scale, ref_scale, rel_tol=1e-7)


def test_rope_default_and_unknown_type():
    inv, scale = rope_inv_freq(64, {"rope_type": "default", "rope_theta": 10000.0})
    assert scale == 1.0
    torch.testing.assert_close(inv, 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    with pytest.raises(ValueError, match="rope_type 'banana' is not supported"):
        rope_inv_freq(64, {"rope_type": "banana", "rope_theta": 1.0})


def test_interleaved_rope_equals_complex_rotation():
    # Meta's / DeepSeek's original code: consecutive pairs as complex numbers times e^{i * pos * freq}.
    b, h, t, d = 2, 3, 7, 16
    x = torch.randn(b, h, t, d)
    rope = RotaryEmbedding(d, {"rope_type": "default", "rope_theta": 10000.0}, interleaved=True)
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = rope(x, pos)
    ours = apply_rope(x, cos, sin, interleaved=True)
    angles = pos[..., None].float() * rope.inv_freq  # [b, t, d/2]
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None]
    torch.testing.assert_close(ours, torch.view_as_real(z).flatten(-2), rtol=1e-5, atol=1e-5)


def test_half_rope_equals_interleaved_on_permuted_dims():
    # rotate_half pairs (i, i + d/2); permuting dims to (0, d/2, 1, d/2+1, ...) turns it into interleaved pairs.
    d = 8
    x = torch.randn(1, 2, 5, d)
    perm = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], -1).flatten()
    params = {"rope_type": "default", "rope_theta": 100.0}
    pos = torch.arange(5)[None]
    half = apply_rope(x, *RotaryEmbedding(d, params)(x, pos))
    inter = apply_rope(x[..., perm], *RotaryEmbedding(d, params, interleaved=True)(x, pos), interleaved=True)
    torch.testing.assert_close(half[..., perm], inter)


def test_partial_rope_leaves_the_tail_untouched():
    x = torch.randn(1, 2, 5, 16)
    cos, sin = RotaryEmbedding(16, {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25})(
        x, torch.arange(5)[None])
    assert cos.shape[-1] == 4
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[..., 4:], x[..., 4:])
    assert not torch.allclose(out[..., 1:4], x[..., 1:4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_both_reference_orders(dtype):
    x = torch.randn(3, 5, 32, dtype=dtype) * 3
    plain, ref = RMSNorm(32, eps=1e-6), Qwen3RMSNorm(32, eps=1e-6)
    offset, gref = RMSNorm(32, eps=1e-6, unit_offset=True), Gemma3RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        for m in (plain, ref, offset, gref):
            m.to(dtype)
        w = torch.randn(32)
        plain.weight.copy_(w), ref.weight.copy_(w), offset.weight.copy_(w), gref.weight.copy_(w)
    assert torch.equal(plain(x), ref(x))
    assert torch.equal(offset(x), gref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_rmsnorm_equals_the_written_out_formula(dtype, unit_offset, weight_in_fp32):
    """Whichever kernel runs (torch's fused rms_norm or the op-by-op lines), the bits are those of the formula."""
    torch.manual_seed(0)
    norm = RMSNorm(512, eps=1e-5, unit_offset=unit_offset, weight_in_fp32=weight_in_fp32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(512) * 0.3 + (0.0 if unit_offset else 1.0))
    norm.to(dtype)
    x = (torch.randn(2, 7, 512) * 3).to(dtype)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    w = norm.weight.float() + 1.0 if unit_offset else norm.weight.float()
    if weight_in_fp32:
        expected = (h * w).to(dtype)
    else:
        expected = ((1.0 + norm.weight) if unit_offset else norm.weight) * h.to(dtype)
    assert torch.equal(norm(x), expected)
    x.requires_grad_(True)
    norm(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(64, 64), (1536, 512), (513, 2049)])
def test_linear_single_bf16_row_is_bit_exact(bias, shape):
    """The one-row bf16 CPU path (`mv`) gives nn.Linear's bits; other inputs take F.linear unchanged."""
    torch.manual_seed(0)
    out_f, in_f = shape
    ours = Linear(in_f, out_f, bias=bias).to(torch.bfloat16)
    ref = torch.nn.Linear(in_f, out_f, bias=bias).to(torch.bfloat16)
    ref.load_state_dict(ours.state_dict())
    for x in (torch.randn(1, 1, in_f), torch.randn(in_f), torch.randn(2, 3, in_f)):
        x = x.bfloat16()
        assert torch.equal(ours(x), ref(x))
        assert ours(x).shape == ref(x).shape
    x = torch.randn(1, 1, in_f, dtype=torch.bfloat16, requires_grad=True)
    ours(x).float().sum().backward()
    assert x.grad is not None and ours.weight.grad is not None


def test_rmsnorm_initial_weights():
    assert torch.equal(RMSNorm(4).weight, torch.ones(4))
    assert torch.equal(RMSNorm(4, unit_offset=True).weight, torch.zeros(4))


def _naive_attention(q, k, v, mask, scale, softcap=None):
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        s = q[:, h] @ k[:, h // groups].transpose(-1, -2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ v[:, h // groups]
    return out.transpose(1, 2)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_eager_attention_equals_naive_loop(softcap):
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    mask[:, 0] = mask[:, 0] & (torch.arange(6) < 3)  # some extra masking (a window-like hole)
    module = torch.nn.Module().eval()
    out, _ = eager_attention(module, q, k, v, mask[None, None].expand(2, 1, 6, 6), scaling=0.3, softcap=softcap)
    torch.testing.assert_close(out, _naive_attention(q, k, v, mask, 0.3, softcap), rtol=1e-5, atol=1e-6)


def test_sdpa_equals_eager_through_the_block():
    torch.manual_seed(0)
    attn = Attention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, layer_idx=0,
                     q_norm=RMSNorm(8), k_norm=RMSNorm(8)).eval()
    x = torch.randn(2, 9, 32)
    cos, sin = RotaryEmbedding(8, {"rope_type": "default", "rope_theta": 1e4})(x, torch.arange(9)[None])
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    a = attn(x, (cos, sin), mask, attention_fn=attention_function("eager"))
    b = attn(x, (cos, sin), mask, attention_fn=attention_function("sdpa"))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_qk_norm_across_heads_normalises_the_whole_vector():
    attn = Attention(hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8, layer_idx=0,
                     q_norm=RMSNorm(16), k_norm=RMSNorm(16), qk_norm_across_heads=True)
    with pytest.raises(RuntimeError):  # a per-head norm on a [.., 16] vector would not fit: weights are per vector
        Attention(hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8, layer_idx=0,
                  q_norm=RMSNorm(16), k_norm=RMSNorm(16))(torch.randn(1, 3, 16), None, None)
    assert attn(torch.randn(1, 3, 16), None, None).shape == (1, 3, 16)


def test_attention_refuses_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        Attention(hidden_size=16, num_heads=6, num_kv_heads=4, head_dim=8, layer_idx=0)


@pytest.mark.parametrize("act,fn", [("silu", torch.nn.functional.silu),
                                    ("gelu_pytorch_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh"))])
def test_gated_mlp(act, fn):
    mlp = GatedMLP(8, 12, act=act)
    x = torch.randn(3, 8)
    ref = (fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["eager", "sdpa", "sink_eager", "sink_sdpa"])
@pytest.mark.parametrize("window,chunk", [(8, None), (100, None), (None, 48), (None, 100)])
def test_banded_attention_equals_the_whole_sequence(kernel, window, chunk):
    """`attend` on a long sliding-window or chunked prefill (block by block over the band) equals the kernel on
    the whole sequence, left padding included, and passes gradients."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from hf_archs.layers import attend
    from hf_archs.layers.sinks import sink_eager_attention, sink_sdpa_attention

    fn = {"eager": eager_attention, "sdpa": ALL_ATTENTION_FUNCTIONS["sdpa"], "sink_eager": sink_eager_attention,
          "sink_sdpa": sink_sdpa_attention}[kernel]
    torch.manual_seed(0)
    b, h, kv, t, d = 2, 4, 2, 300, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = h // kv, True, False
    module.sinks = torch.nn.Parameter(torch.randn(h))
    q = torch.randn(b, h, t, d, requires_grad=True)
    k, v = torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    i = torch.arange(t)
    allowed = i[:, None] >= i[None, :]
    allowed &= (i[:, None] - i[None, :] < window) if window else (i[:, None] // chunk == i[None, :] // chunk)
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[1, :37] = False  # left padding in the second row
    mask = (allowed[None] & pad[:, None, :])[:, None]  # [b, 1, t, t] bool
    if kernel == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    whole, _ = fn(module, q, k, v, mask, scaling=d**-0.5, sliding_window=window)
    banded, weights = attend(fn, module, q, k, v, mask, scaling=d**-0.5, sliding_window=window, chunk_size=chunk)
    assert weights is None  # the band path was taken (the whole-sequence call would return weights or None)
    keep = pad[:, :, None, None].expand_as(whole)  # fully padded query rows are undefined in both
    torch.testing.assert_close(banded[keep], whole[keep], rtol=1e-5, atol=1e-6)
    (g_whole,) = torch.autograd.grad(whole[keep].sum(), q)
    (g_banded,) = torch.autograd.grad(banded[keep].sum(), q)
    torch.testing.assert_close(g_banded, g_whole, rtol=1e-5, atol=1e-6)


def test_attend_bands_only_where_it_is_exact_and_useful(monkeypatch):
    from hf_archs.layers import attend, attention

    calls = []

    def kernel(module, q, k, v, mask, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return q.transpose(1, 2), "weights"

    q = torch.randn(1, 2, 300, 8)
    full = torch.ones(1, 1, 300, 300, dtype=torch.bool)
    longer = torch.randn(1, 2, 310, 8)
    monkeypatch.setattr(attention, "ROW_WISE_KERNELS", [kernel])
    cases = [  # (window, keys, mask, banded?)
        (8, q, full, True),  # sliding layer, fresh prefill: blocks of 64 queries over their band of keys
        (None, q, full, False),  # no window
        (8, q, None, False),  # no mask to slice (the mask carries the window)
        (8, longer, torch.ones(1, 1, 300, 310, dtype=torch.bool), False),  # keys from a cache: not aligned
        (250, q, full, False),  # window as long as the sequence: nothing to skip
    ]
    for window, keys, mask, banded in cases:
        calls.clear()
        out = attend(kernel, None, q, keys, keys, mask, sliding_window=window)
        if banded:
            assert out[1] is None and calls == [(64, 64), (64, 72), (64, 72), (64, 72), (44, 52)]
            torch.testing.assert_close(out[0], q.transpose(1, 2))
        else:
            assert out[1] == "weights" and calls == [(300, keys.shape[2])]
    calls.clear()  # chunks of 100: one block per chunk
    out = attend(kernel, None, q, q, q, full, chunk_size=100)
    assert out[1] is None and calls == [(100, 100)] * 3
    calls.clear()  # chunks of 2048: blocks of 1024 that stop at each chunk boundary, keys from the chunk's start
    long = torch.randn(1, 2, 3000, 8)
    out = attend(kernel, None, long, long, long, torch.ones(1, 1, 3000, 3000, dtype=torch.bool), chunk_size=2048)
    assert out[1] is None and calls == [(1024, 1024), (1024, 2048), (952, 952)]
    monkeypatch.setattr(attention, "ROW_WISE_KERNELS", [])
    calls.clear()
    assert attend(kernel, None, q, q, q, full, sliding_window=8)[1] == "weights" and len(calls) == 1  # unknown kernel
