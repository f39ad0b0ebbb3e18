"""Attention sinks (layers/sinks.py): the eager and sdpa kernels against a naive loop and against transformers'
eager gpt-oss attention, with causal, sliding-window, left-padded and cached (q < k) masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_oss.modeling_gpt_oss import (
    eager_attention_forward as gpt_oss_eager,
)

from hf_archs.layers import RotaryEmbedding, eager_attention
from hf_archs.layers.sinks import (
    SinkAttention,
    sink_eager_attention,
    sink_kernel,
    sink_sdpa_attention,
)

SCALE = 0.3


def _module(heads: int, kv_heads: int, sinks: torch.Tensor | None = None) -> nn.Module:
    m = nn.Module().eval()
    m.sinks = nn.Parameter(torch.randn(heads) if sinks is None else sinks)
    m.num_key_value_groups = heads // kv_heads  # read by transformers' kernel
    return m


def _allowed(q_len: int, k_len: int, window: int | None = None, padding: torch.Tensor | None = None,
             batch: int = 2) -> torch.Tensor:
    """[b, 1, q, k] bool, True = attend: causal aligned bottom-right (queries are the last q positions), an
    optional window (a query sees itself and window - 1 earlier keys), optional left padding [b, k]."""
    qpos = torch.arange(k_len - q_len, k_len)[:, None]
    kpos = torch.arange(k_len)[None]
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    mask = mask[None, None].expand(batch, 1, q_len, k_len)
    if padding is not None:
        mask = mask & padding[:, None, None, :].bool()
    return mask


def _naive(q, k, v, sinks, allowed, scale=SCALE) -> torch.Tensor:
    """Per batch, head and query: softmax over [allowed logits, sink], the sink's share dropped. float64."""
    q, k, v, sinks = q.double(), k.double(), v.double(), sinks.double()
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    out = torch.zeros(b, t, h, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keep = allowed[bi, 0, i].nonzero().flatten()
                logits = torch.stack([q[bi, hi, i] @ k[bi, hi // groups, j] * scale for j in keep.tolist()]
                                     + [sinks[hi]])
                p = torch.softmax(logits, 0)[:-1]
                for w, j in zip(p, keep.tolist()):
                    out[bi, i, hi] += w * v[bi, hi // groups, j]
    return out


def _additive(allowed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """transformers' eager mask: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


MASKS = {
    "causal": dict(q_len=7, k_len=7),
    "window": dict(q_len=9, k_len=9, window=3),
    "left_padding": dict(q_len=8, k_len=8, padding=torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])),
    "window_padding": dict(q_len=8, k_len=8, window=4, padding=torch.tensor([[1] * 8, [0, 0] + [1] * 6])),
    "cached_chunk": dict(q_len=3, k_len=10, padding=torch.tensor([[1] * 10, [0] * 4 + [1] * 6])),
    "decode_step": dict(q_len=1, k_len=6, window=4),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_eager_and_sdpa_equal_the_naive_loop(name):
    spec = MASKS[name]
    q_len, k_len = spec["q_len"], spec["k_len"]
    q, k, v = torch.randn(2, 4, q_len, 8), torch.randn(2, 2, k_len, 8), torch.randn(2, 2, k_len, 8)
    module = _module(4, 2)
    allowed = _allowed(q_len, k_len, spec.get("window"), spec.get("padding"))
    ref = _naive(q, k, v, module.sinks.detach(), allowed).float()
    # Padding query rows see no key: only the sink, so every kernel returns zeros there (no NaN).
    for mask in (_additive(allowed), allowed):
        out, _ = sink_eager_attention(module, q, k, v, mask, scaling=SCALE)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out, weights = sink_sdpa_attention(module, q, k, v, allowed, scaling=SCALE)
    assert weights is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_len,k_len", [(7, 7), (1, 6)])
def test_sdpa_without_a_mask_is_causal_as_sdpa_would_be(q_len, k_len):
    # transformers leaves the mask out for sdpa when `is_causal` does the job: q == k (causal) or q == 1 (all keys).
    q, k, v = torch.randn(2, 4, q_len, 8), torch.randn(2, 2, k_len, 8), torch.randn(2, 2, k_len, 8)
    module = _module(4, 2)
    out, _ = sink_sdpa_attention(module, q, k, v, None, scaling=SCALE)
    ref = _naive(q, k, v, module.sinks.detach(), _allowed(q_len, k_len)).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_kernel_equals_transformers_gpt_oss_eager(dtype):
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=dtype), torch.randn(2, 2, 9, 8, dtype=dtype),
               torch.randn(2, 2, 9, 8, dtype=dtype))
    module = _module(4, 2).to(dtype)
    mask = _additive(_allowed(9, 9, window=4, padding=torch.tensor([[1] * 9, [0, 0] + [1] * 7])), dtype)
    ours, ours_w = sink_eager_attention(module, q, k, v, mask, scaling=SCALE)
    theirs, theirs_w = gpt_oss_eager(module, q, k, v, mask, scaling=SCALE)
    if dtype == torch.bfloat16:  # same op order: bit-identical
        assert torch.equal(ours, theirs) and torch.equal(ours_w, theirs_w)
    else:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    sdpa, _ = sink_sdpa_attention(module.float(), q.float(), k.float(), v.float(), mask.float() == 0, scaling=SCALE)
    torch.testing.assert_close(sdpa, theirs.float(), rtol=1e-5 if dtype == torch.float32 else 2e-2,
                               atol=1e-6 if dtype == torch.float32 else 2e-2)


def test_gradients_agree_between_eager_and_sdpa():
    allowed = _allowed(8, 8, window=3, padding=torch.tensor([[1] * 8, [0, 0] + [1] * 6]))
    base = [torch.randn(2, 4, 8, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)]
    sinks = torch.randn(4)
    grads = []
    for kernel, mask in ((sink_eager_attention, _additive(allowed)), (sink_sdpa_attention, allowed)):
        q, k, v = (t.clone().requires_grad_() for t in base)
        module = _module(4, 2, sinks.clone())
        out, _ = kernel(module, q, k, v, mask, scaling=SCALE)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([q.grad, k.grad, v.grad, module.sinks.grad])
    for a, b in zip(*grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_very_negative_sinks_give_plain_attention_and_large_ones_silence_it():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    allowed = _allowed(5, 5, batch=1)
    plain, _ = eager_attention(nn.Module().eval(), q, k, v, allowed, scaling=SCALE)
    for kernel in (sink_eager_attention, sink_sdpa_attention):
        out, _ = kernel(_module(2, 2, torch.full((2,), -1e4)), q, k, v, allowed, scaling=SCALE)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
        out, _ = kernel(_module(2, 2, torch.tensor([1e4, 0.0])), q, k, v, allowed, scaling=SCALE)
        assert out[:, :, 0].abs().max() == 0 and out[:, :, 1].abs().max() > 0  # head 0 attends to the sink only


def test_sink_attention_block_routes_the_models_kernel():
    torch.manual_seed(0)
    attn = SinkAttention(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, layer_idx=0, bias=True,
                         sliding_window=4).eval()
    with torch.no_grad():
        attn.sinks.normal_()
    assert attn.sinks.shape == (4,) and attn.q_proj.bias is not None
    x = torch.randn(2, 9, 32)
    cos, sin = RotaryEmbedding(8, {"rope_type": "default", "rope_theta": 1e4})(x, torch.arange(9)[None])
    allowed = _allowed(9, 9, window=4)
    a = attn(x, (cos, sin), _additive(allowed), attention_fn=eager_attention)
    b = attn(x, (cos, sin), allowed, attention_fn=ALL_ATTENTION_FUNCTIONS["sdpa"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain = super(SinkAttention, attn).forward(x, (cos, sin), _additive(allowed), attention_fn=eager_attention)
    assert not torch.allclose(a, plain)  # the sinks are really used


def test_unsupported_kernels_and_softcap_are_refused():
    assert sink_kernel(eager_attention) is sink_eager_attention
    assert sink_kernel(ALL_ATTENTION_FUNCTIONS["sdpa"]) is sink_sdpa_attention
    assert sink_kernel(sink_sdpa_attention) is sink_sdpa_attention
    with pytest.raises(NotImplementedError, match="'flash_attention_forward' does not support attention sinks; "
                                                  "use attn_implementation='eager' or 'sdpa'"):
        sink_kernel(ALL_ATTENTION_FUNCTIONS["flash_attention_2"])
    with pytest.raises(ValueError, match="SinkAttention does not support a logit soft-cap"):
        SinkAttention(hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8, layer_idx=0, softcap=30.0)
