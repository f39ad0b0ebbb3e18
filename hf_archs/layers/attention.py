"""Grouped-query attention through transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .linear import Linear
from .rope import apply_rope


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    softcap: float | None = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. query `[b, h, q, d]`, key/value `[b, kv_h, k, d]`; returns `[b, q, h, d]`."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [b, h, q, k]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def attention_function(implementation: str | None) -> Callable:
    """The attention kernel registered under `implementation` ("eager" or None gives ours)."""
    if implementation in (None, "eager"):
        return eager_attention
    return ALL_ATTENTION_FUNCTIONS[implementation]


# Kernels whose output for a query depends only on the keys its mask row lets through (no state across rows):
# `attend` may hand them the sliding window's band of keys instead of the whole sequence. sinks.py adds its own.
ROW_WISE_KERNELS: list[Callable] = [eager_attention]


def attend(attention_fn: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, sliding_window: int | None = None, chunk_size: int | None = None,
           **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attention_fn(module, query, key, value, attention_mask, sliding_window=..., **kwargs)`, with one shortcut.

    A sliding-window or chunked layer over a long fresh sequence (queries = keys, no cache before) attends block
    by block: the queries of positions [s, e) meet only the keys their mask can let through, [s - window, e) for a
    window, [start of s's chunk, e) for chunks (blocks never straddle a chunk boundary), with the mask sliced to
    match. The kernels then do O(T x (block + window or chunk)) work instead of O(T^2) (torch's sdpa and the eager
    path compute every masked-out pair; 512 tokens, window 8: 17 ms -> 1.6 ms per layer on one CPU thread). Same
    values up to the summation order of fp32 (tests/test_layers.py); the band path returns no attention weights.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    span = sliding_window or chunk_size
    block = min(max(span or 0, 64), 1024)
    if (not span or q_len != k_len or q_len <= block + (sliding_window or 0) or attention_mask is None
            or attention_mask.shape[-2:] != (q_len, k_len)
            or not (attention_fn in ROW_WISE_KERNELS or attention_fn is ALL_ATTENTION_FUNCTIONS.get("sdpa"))):
        return attention_fn(module, query, key, value, attention_mask, sliding_window=sliding_window, **kwargs)
    outs, s = [], 0
    while s < q_len:
        if sliding_window:
            e, ks = min(s + block, q_len), max(0, s - sliding_window)
        else:
            ks = s // chunk_size * chunk_size
            e = min(s + block, ks + chunk_size, q_len)
        out, _ = attention_fn(module, query[:, :, s:e], key[:, :, ks:e], value[:, :, ks:e],
                              attention_mask[..., s:e, ks:e], sliding_window=sliding_window, **kwargs)
        outs.append(out)  # [b, e - s, h, d]
        s = e
    return torch.cat(outs, dim=1), None


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads.

    Options, each one branch in `forward`:
    - `q_norm` / `k_norm`: norms applied before RoPE; `qk_norm_across_heads=False` normalises each head
      (`[.., head_dim]` weights), `True` the whole projected vector (`[.., heads * head_dim]` weights).
    - `sliding_window`: passed to the kernel (the mask also carries it).
    - `softcap`: `tanh(s / c) * c` on the attention logits (eager only).
    - `bias` on q/k/v, `o_bias` on the output projection.
    RoPE is applied when the caller passes `position_embeddings`; a NoPE layer passes None.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int,
                 scaling: float | None = None, bias: bool = False, o_bias: bool | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 qk_norm_across_heads: bool = False, sliding_window: int | None = None,
                 softcap: float | None = None, interleaved_rope: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_key_value_groups = num_heads // num_kv_heads  # read by transformers' kernels
        self.scaling = head_dim**-0.5 if scaling is None else scaling
        self.sliding_window, self.softcap = sliding_window, softcap
        self.interleaved_rope = interleaved_rope
        self.attention_dropout = dropout
        self.is_causal = True
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=bias if o_bias is None else o_bias)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.qk_norm_across_heads = qk_norm_across_heads

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                attention_mask: torch.Tensor | None, cache=None, attention_fn: Callable = eager_attention,
                **kwargs) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.q_norm is not None and self.qk_norm_across_heads:
            q, k = self.q_norm(q), self.k_norm(k)  # one norm over heads * head_dim
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)  # [b, heads, t, head_dim]
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)  # [b, kv_heads, t, head_dim]
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and not self.qk_norm_across_heads:
            q, k = self.q_norm(q), self.k_norm(k)  # per head
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = apply_rope(q, cos, sin, self.interleaved_rope), apply_rope(k, cos, sin, self.interleaved_rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, _ = attend(attention_fn, self, q, k, v, attention_mask, scaling=self.scaling,
                        dropout=self.attention_dropout if self.training else 0.0,
                        sliding_window=self.sliding_window, softcap=self.softcap, **kwargs)
        return self.o_proj(out.reshape(b, t, -1))
