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

from hf_archs.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding, apply_rope, eager_attention, rope_inv_freq
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
