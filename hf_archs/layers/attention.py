"""Grouped-query attention through transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias if o_bias is None else o_bias)
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
        out, _ = attention_fn(self, q, k, v, attention_mask, scaling=self.scaling,
                              dropout=self.attention_dropout if self.training else 0.0,
                              sliding_window=self.sliding_window, softcap=self.softcap, **kwargs)
        return self.o_proj(out.reshape(b, t, -1))
