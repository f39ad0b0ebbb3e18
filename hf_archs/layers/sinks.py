"""Attention with learned per-head sinks: one extra logit per head joins every query's softmax and carries no value.

With sink logit `s_h`, a query's weights over the keys are `exp(l_j) / (exp(s_h) + sum_j exp(l_j))`: the sink takes
probability mass (a query may attend to "nothing") and is dropped before the values are mixed.

Two kernels with the signature of transformers' attention interface (`fn(module, q, k, v, mask, scaling=...,
dropout=..., **kwargs) -> (out [b, q, h, d], weights)`), reading `module.sinks` [heads]:
- `sink_eager_attention`: an extra sink column on the logits, in the reference runtime's op order (so bf16
  results are bit-identical to transformers' eager gpt-oss attention).
- `sink_sdpa_attention`: `torch.nn.functional.scaled_dot_product_attention` over the keys plus one extra key / value
  column whose key and value are zero and whose mask entry is `s_h`: its logit is exactly the sink, and it adds
  nothing to the output. Exact (not an approximation), at the cost of a per-head float mask `[b, h, q, k + 1]`.
`SinkAttention` is `Attention` holding the `sinks` parameter and routing the model's kernel to these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import ROW_WISE_KERNELS, Attention, eager_attention


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv_heads, k, d] -> [b, kv_heads * groups, k, d]; head i uses kv head i // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sink_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                         softcap: float | None = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with one sink logit per head. query `[b, h, q, d]`, key/value `[b, kv_h, k, d]`;
    returns (`[b, q, h, d]`, the weights over the keys `[b, h, q, k]`)."""
    if softcap is not None:
        raise ValueError("sink attention has no logit soft-cap")
    groups = query.shape[1] // key.shape[1]
    key, value = _expand_kv(key, groups), _expand_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [b, h, q, k]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    b, h, q, _ = scores.shape
    sinks = module.sinks.reshape(1, h, 1, 1).expand(b, h, q, 1)
    logits = torch.cat([scores, sinks], dim=-1)  # [b, h, q, k + 1]: one sink logit per head
    # Max-subtracted, and the softmax in the logits' dtype: transformers' order (it keeps bf16 overflow away).
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]  # the sink's share is dropped
    probs = nn.functional.dropout(probs, p=dropout, training=module.training).to(value.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def sink_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                        softcap: float | None = None, **_: object) -> tuple[torch.Tensor, None]:
    """The same attention through `scaled_dot_product_attention` with an extra zero key / value column whose mask
    entry is the sink logit. `attention_mask`: transformers' sdpa mask (bool `[b, 1, q, k]`, True = attend), a float
    additive mask, or None (causal, aligned as sdpa's `is_causal`: top-left when q > 1, everything when q == 1)."""
    if softcap is not None:
        raise ValueError("sink attention has no logit soft-cap")
    b, h, q, d = query.shape
    kv_heads, k = key.shape[1], key.shape[2]
    dtype = query.dtype
    if attention_mask is None:  # transformers leaves the mask out when sdpa's own `is_causal` would do
        bias = torch.zeros(1, 1, q, k, dtype=dtype, device=query.device)
        if q > 1:
            causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril()
            bias = bias.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        bias = torch.zeros(attention_mask.shape, dtype=dtype, device=query.device)
        bias = bias.masked_fill(~attention_mask, float("-inf"))  # the sink keeps every row finite: no NaN
    else:
        bias = attention_mask.to(dtype)
    bias = bias[..., :k]  # as transformers' sdpa kernel: a mask may be longer than the keys (static caches)
    sink = module.sinks.to(dtype).reshape(1, h, 1, 1).expand(b, h, q, 1)
    bias = torch.cat([bias.expand(b, h, q, k), sink], dim=-1)  # [b, h, q, k + 1]: the sink column is its logit
    zeros = key.new_zeros(b, kv_heads, 1, d)
    key = torch.cat([key, zeros], dim=2)  # q . 0 = 0, so the sink column's logit is the mask entry alone
    value = torch.cat([value, value.new_zeros(b, kv_heads, 1, value.shape[-1])], dim=2)  # and it adds nothing
    groups = h // kv_heads
    out = F.scaled_dot_product_attention(query, _expand_kv(key, groups), _expand_kv(value, groups), attn_mask=bias,
                                         dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


ROW_WISE_KERNELS.extend([sink_eager_attention, sink_sdpa_attention])  # a sink joins each row's softmax alone


def sink_kernel(attention_fn: Callable) -> Callable:
    """The sink-aware kernel for the model's choice (`eager` or `sdpa`); anything else is refused by name."""
    if attention_fn in (sink_eager_attention, sink_sdpa_attention):
        return attention_fn
    if attention_fn is eager_attention:
        return sink_eager_attention
    if attention_fn is ALL_ATTENTION_FUNCTIONS.get("sdpa"):
        return sink_sdpa_attention
    name = getattr(attention_fn, "__name__", repr(attention_fn))
    raise NotImplementedError(f"attention kernel {name!r} does not support attention sinks; use "
                              f"attn_implementation='eager' or 'sdpa'")


class SinkAttention(Attention):
    """Attention except: a learned logit per head, `sinks` [num_heads], joins every query's softmax and carries no
    value, and the model's kernel is swapped for its sink-aware version (eager or sdpa). No logit soft-cap."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int,
                 **kwargs) -> None:
        if kwargs.get("softcap") is not None:
            raise ValueError("SinkAttention does not support a logit soft-cap")
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, layer_idx, **kwargs)
        self.sinks = nn.Parameter(torch.zeros(num_heads))

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
                attention_mask: torch.Tensor | None, cache=None, attention_fn: Callable = eager_attention,
                **kwargs) -> torch.Tensor:
        return super().forward(hidden_states, position_embeddings, attention_mask, cache,
                               attention_fn=sink_kernel(attention_fn), **kwargs)


__all__ = ["SinkAttention", "sink_eager_attention", "sink_kernel", "sink_sdpa_attention"]
