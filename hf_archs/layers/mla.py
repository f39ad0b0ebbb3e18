"""Multi-head latent attention (MLA, DeepSeek-V2 / V3): keys and values are decompressed from one small latent.

Per token, `kv_a_proj_with_mqa` gives a latent `c` (`kv_lora_rank`, normalised by `kv_a_layernorm`) and one RoPE
key `k_rot` (`qk_rope_head_dim`) shared by all heads. `kv_b_proj` decompresses `c` into each head's key part
`k_nope` (`qk_nope_head_dim`) and value (`v_head_dim`). A head's key is `[k_nope | k_rot]`, its query
`[q_nope | q_rot]` (from `q_proj`, or the low-rank `q_a_proj -> q_a_layernorm -> q_b_proj` when `q_lora_rank` is
set). The cache holds only `c` and `k_rot`: (kv_lora_rank + qk_rope_head_dim) numbers per token and layer.

Two ways to attend, equal up to rounding (arXiv:2405.04434 section 2.1.2; deepseek-ai/DeepSeek-V3
inference/model.py, `attn_impl = "absorb"`):

    decompressed:  k_nope = W_UK c, v = W_UV c for every cached token, then ordinary attention (what transformers
                   does: each decoding step re-expands the whole history through kv_b_proj).
    absorbed:      q_nope . (W_UK c) = (W_UK^T q_nope) . c, so the query is moved into latent space once per step;
                   scores = q_lat . c + q_rot . k_rot; the output sum_t p_t (W_UV c_t) = W_UV (sum_t p_t c_t), so the
                   probabilities are applied to the latents and W_UV once at the end. The history is never expanded:
                   a step reads the cache once, flat in the number of heads. A single new token attends through
                   sdpa with the heads as its query rows and the joint `[c | k_rot]` rows as keys and values (one
                   pass of blocked online softmax over the cache); longer chunks take scores, softmax, then values.

`absorb="auto"` (default) decompresses a prompt (no history: cheaper and the same op order as transformers) and
absorbs when a short chunk attends a cached history (decoding, speculative verification).

Cache: transformers' `DynamicLayer` with the latent as "keys" `[b, 1, T, kv_lora_rank]` and the RoPE key as "values"
`[b, 1, T, qk_rope_head_dim]` (what transformers does). An MLA layer turns an empty `DynamicLayer` into a
`LatentCacheLayer`, the same layer except that it appends into storage grown in chunks instead of concatenating
(a concatenation copies the whole history at every step, as many bytes as the absorbed attention reads).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from .attention import eager_attention
from .linear import Linear
from .norms import RMSNorm
from .rope import apply_rope


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """`[x0, x1, x2, x3, ...]` -> `[x0, x2, ..., x1, x3, ...]` over the last dim.

    DeepSeek's checkpoints rotate adjacent pairs (2i, 2i + 1); after this permutation the pairs are (i, i + d/2) and
    the usual rotate-half RoPE applies. Queries and keys get the same permutation, so their dot products are
    unchanged (transformers' `apply_rotary_pos_emb_interleave` computes exactly this, op for op).
    """
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class LatentCacheLayer(DynamicLayer):
    """Same as transformers' `DynamicLayer` except: `update` writes the new tokens into storage that grows in chunks of
    `chunk` tokens (at most `chunk - 1` tokens allocated ahead) instead of `torch.cat` with the whole history, and the
    keys and values of a token sit side by side in one `[..., capacity, d_k + d_v]` storage (MLA reads the latent
    and the RoPE key of a token together: `joint_view`).

    `keys` / `values` stay views of exactly the cached tokens, so crop, beam reordering, batch selection and offloading
    (which reassign them) work unchanged: an update adopts reassigned tensors into fresh storage. When autograd tracks
    the new states it concatenates like `DynamicLayer` (earlier steps' graphs may still read the storage).
    """

    chunk = 256

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._storage: torch.Tensor | None = None

    def _views(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        d_k = self._d_k
        return self._storage[..., :length, :d_k], self._storage[..., :length, d_k:]

    def _owns_cached(self, past: int) -> bool:
        keys, values = self._views(past)
        return all(a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                   for a, b in ((self.keys, keys), (self.values, values)))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if (torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad)) \
                or key_states.dtype != value_states.dtype:
            self._storage = None
            return super().update(key_states, value_states, *args, **kwargs)
        past, new = self.get_seq_length(), key_states.shape[-2]
        lead, d_k = key_states.shape[:-2], key_states.shape[-1]
        storage = self._storage
        if (storage is None or past + new > storage.shape[-2] or storage.shape[:-2] != lead or self._d_k != d_k
                or storage.dtype != key_states.dtype or (past and not self._owns_cached(past))):
            capacity = -(-(past + new) // self.chunk) * self.chunk
            old = (self.keys, self.values) if past else None
            self._storage, self._d_k = key_states.new_empty(*lead, capacity, d_k + value_states.shape[-1]), d_k
            if old is not None:
                keys, values = self._views(past)
                keys.copy_(old[0])
                values.copy_(old[1])
        self._storage[..., past:past + new, :d_k].copy_(key_states)
        self._storage[..., past:past + new, d_k:].copy_(value_states)
        self.keys, self.values = self._views(past + new)
        return self.keys, self.values


def joint_view(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """`[..., T, d_k + d_v]` over `keys` and `values` when they sit side by side in one storage (a `LatentCacheLayer`),
    without copying; None otherwise."""
    if (keys.dtype != values.dtype or keys.shape[:-1] != values.shape[:-1] or keys.stride() != values.stride()
            or keys.stride(-1) != 1 or values.data_ptr() != keys.data_ptr() + keys.shape[-1] * keys.element_size()
            or keys.stride(-2) < keys.shape[-1] + values.shape[-1]):
        return None
    return keys.as_strided((*keys.shape[:-1], keys.shape[-1] + values.shape[-1]), keys.stride())


def blocked_scores(q: torch.Tensor, keys: torch.Tensor, block: int = 256) -> torch.Tensor:
    """`q [b, m, d] @ keys[b, T, d]^T -> [b, m, T]`, the keys taken in blocks of `block` rows as one batched matmul.

    For a few query rows and a long cache (absorbed decoding: m = heads x new tokens), one GEMM over the whole
    `[T, d]` cache runs at about half the memory bandwidth on CPU (a tall-skinny GEMM); the same products as a batch
    of `[m, d] x [d, block]` GEMMs stream the cache at nearly the rate of a plain read (decode step at context 4096,
    DeepSeek V3 latent sizes: ~35 % less time in this product).
    """
    b, m, _ = q.shape
    T = keys.shape[1]
    n = T // block
    if n < 2:
        return torch.bmm(q, keys.transpose(1, 2))
    body = n * block
    out = q.new_empty(b, m, T)
    for i in range(b):
        blocks = keys[i, :body].unflatten(0, (n, block))  # [n, block, d], a view
        out[i, :, :body] = torch.bmm(q[i].expand(n, -1, -1), blocks.transpose(1, 2)).transpose(0, 1).reshape(m, body)
        if body < T:
            out[i, :, body:] = q[i] @ keys[i, body:].T
    return out


class MultiHeadLatentAttention(nn.Module):
    """MLA from explicit sizes; parameter names are those of DeepSeek's HF-layout checkpoints.

    - `q_lora_rank=None`: a full `q_proj` (DeepSeek-V2-Lite, Kimi Linear); otherwise `q_a_proj`, `q_a_layernorm`,
      `q_b_proj`.
    - `scaling`: the softmax scale (default `(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`; YaRN releases multiply
      it by mscale^2, which the caller computes).
    - `interleaved_rope`: the checkpoint rotates adjacent pairs (DeepSeek V3, Kimi K2).
    - `bias`: biases on `q_a_proj` / `kv_a_proj_with_mqa` / `o_proj` (transformers' `attention_bias`).
    - `absorb`: "auto", True (always absorbed) or False (always decompressed); a forward's `mla_absorb=` overrides.
    `position_embeddings` are the rotate-half `(cos, sin)` of a `qk_rope_head_dim` RoPE.
    """

    def __init__(self, hidden_size: int, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, layer_idx: int, q_lora_rank: int | None = None,
                 scaling: float | None = None, bias: bool = False, latent_norm_eps: float = 1e-6,
                 interleaved_rope: bool = True, dropout: float = 0.0, absorb: bool | str = "auto") -> None:
        super().__init__()
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {qk_rope_head_dim}")
        if absorb not in ("auto", True, False):
            raise ValueError(f"absorb must be 'auto', True or False, got {absorb!r}")
        self.layer_idx = layer_idx
        self.num_heads, self.kv_lora_rank, self.q_lora_rank = num_heads, kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scaling = self.qk_head_dim**-0.5 if scaling is None else scaling
        self.interleaved_rope, self.absorb = interleaved_rope, absorb
        self.attention_dropout = dropout
        self.is_causal = True
        self.num_key_value_groups = 1  # read by transformers' kernels: the decompressed keys are per head
        if q_lora_rank is None:
            self.q_proj = Linear(hidden_size, num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=latent_norm_eps)
            self.q_b_proj = Linear(q_lora_rank, num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=latent_norm_eps)
        self.kv_b_proj = Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = Linear(num_heads * v_head_dim, hidden_size, bias=bias)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(deinterleave(x) if self.interleaved_rope else x, cos, sin)

    def use_absorbed(self, past: int, q_len: int, mode: bool | str | None = None) -> bool:
        """The "auto" rule: absorb when attending a cached history with a chunk short enough that absorbing costs
        fewer FLOPs (per query and cached token: ~2r + d_rope multiply-adds absorbed against d_nope + d_rope + d_v
        decompressed, plus the r x h x (d_nope + d_v) expansion of each cached token on the decompressed path)."""
        mode = self.absorb if mode is None else mode
        if mode != "auto":
            return bool(mode)
        r, dn, dv = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        return past > 0 and q_len * (2 * r - dn - dv) < r * (dn + dv)

    def upgrade_cache_layer(self, cache) -> None:
        """Make this layer's entry of a `Cache` a `LatentCacheLayer` if it is an empty `DynamicLayer`."""
        layers = getattr(cache, "layers", None)
        if layers is None:
            return
        if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:  # a lazily grown DynamicCache()
            while len(layers) <= self.layer_idx:
                layers.append(DynamicLayer())
        if (self.layer_idx < len(layers) and type(layers[self.layer_idx]) is DynamicLayer
                and not layers[self.layer_idx].is_initialized):
            layers[self.layer_idx] = LatentCacheLayer()

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache=None, attention_fn: Callable = eager_attention,
                mla_absorb: bool | None = None, **kwargs) -> torch.Tensor:
        b, t, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(b, t, -1, self.qk_head_dim).transpose(1, 2)  # [b, h, t, d_nope + d_rope]
        q_nope, q_rot = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [self.kv_lora_rank, self.qk_rope_head_dim],
                                    dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, 1, t, self.kv_lora_rank)  # one "head": cache layers accept it
        k_rot = k_rot.view(b, 1, t, self.qk_rope_head_dim)
        cos, sin = position_embeddings
        q_rot, k_rot = self._rope(q_rot, cos, sin), self._rope(k_rot, cos, sin)
        past = 0
        if cache is not None:
            self.upgrade_cache_layer(cache)
            past = cache.get_seq_length(self.layer_idx)
            latent, k_rot = cache.update(latent, k_rot, self.layer_idx)  # [b, 1, past + t, r], [b, 1, past + t, d_rope]
        if self.use_absorbed(past, t, mla_absorb):
            out = self.absorbed(q_nope, q_rot, latent, k_rot, attention_mask)
        else:
            out = self.decompressed(q_nope, q_rot, latent, k_rot, attention_mask, attention_fn, **kwargs)
        return self.o_proj(out.reshape(b, t, -1))

    def decompressed(self, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
                     attention_mask: torch.Tensor | None, attention_fn: Callable = eager_attention,
                     **kwargs) -> torch.Tensor:
        """Expand every cached latent into per-head keys and values; returns `[b, t, h, d_v]`."""
        b, _, kv_len, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, kv_len, -1, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, value = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # [b, h, T, .]
        key = kv.new_empty(*kv.shape[:-1], self.qk_head_dim)
        key[..., : self.qk_nope_head_dim].copy_(k_nope)
        key[..., self.qk_nope_head_dim:].copy_(k_rot.expand(-1, key.shape[1], -1, -1))  # k_rot shared by heads
        query = torch.cat((q_nope, q_rot), dim=-1)
        out, _ = attention_fn(self, query, key, value, attention_mask, scaling=self.scaling,
                              dropout=self.attention_dropout if self.training else 0.0, **kwargs)
        return out

    def absorbed(self, q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Attend in latent space (the history stays compressed); returns `[b, t, h, d_v]`."""
        b, h, t, _ = q_nope.shape
        kv_len = latent.shape[2]
        w = self.kv_b_proj.weight.view(h, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]  # [h, d_nope, r], [h, d_v, r]
        # q_lat = W_UK^T q_nope per head: batched over heads on strided weight views (no weight copy)
        q_lat = torch.bmm(q_nope.transpose(0, 1).reshape(h, b * t, -1), w_uk.to(q_nope.dtype))  # [h, b*t, r]
        q = torch.cat((q_lat.view(h, b, t, -1).permute(1, 0, 2, 3), q_rot), dim=-1).reshape(b, h * t, -1)
        joint = joint_view(latent, k_rot)
        if joint is not None and t == 1 and not (self.training and self.attention_dropout):
            o_lat = self._one_token_fused(q, joint, attention_mask)  # [b, h, r]
        else:
            o_lat = self._two_pass(q, latent, k_rot, joint, attention_mask, h, t)  # [b, h*t, r]
        o_lat = o_lat.view(b, h, t, -1).transpose(0, 1).reshape(h, b * t, -1)
        out = torch.bmm(o_lat, w_uv.to(o_lat.dtype).transpose(1, 2))  # [h, b*t, d_v]: W_UV once per query
        return out.view(h, b, t, -1).permute(1, 2, 0, 3)  # [b, t, h, d_v]

    def _one_token_fused(self, q: torch.Tensor, joint: torch.Tensor, attention_mask: torch.Tensor | None
                         ) -> torch.Tensor:
        """One new token per row: `sum_T softmax(q . [c | k_rot]) c` for the h query rows `q [b, h, r + d_rope]` in
        one pass over the cache. The heads are the query rows of one attention "head" whose keys and values are both
        the joint `[c | k_rot]` rows (the output's last d_rope columns are dropped): sdpa's blocked online softmax
        then reads each block of the cache once for the scores and finds it still in cache for the values, where the
        two-pass form streams the whole history from memory twice. A single token attends its whole history, so the
        only mask is padding (`[b, 1, 1, T]`, broadcast over the heads)."""
        out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(1), joint, joint, attn_mask=attention_mask,
                                                               scale=self.scaling)
        return out[:, 0, :, : self.kv_lora_rank]

    def _two_pass(self, q: torch.Tensor, latent: torch.Tensor, k_rot: torch.Tensor, joint: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, h: int, t: int) -> torch.Tensor:
        """Scores, softmax, then the probabilities applied to the latents (any chunk length, dropout)."""
        b, kv_len = q.shape[0], latent.shape[2]
        # Heads fold into the query rows: [b, h*t, r + d_rope] x [b, r + d_rope, T] streams each cached token once,
        # in 256-token blocks (`blocked_scores`: the fastest form on CPU for a few query rows and a long cache).
        if joint is not None:
            scores = blocked_scores(q, joint[:, 0])  # [b, h*t, T]
        else:
            scores = torch.baddbmm(torch.bmm(q[..., self.kv_lora_rank:], k_rot[:, 0].transpose(1, 2)),
                                   q[..., : self.kv_lora_rank], latent[:, 0].transpose(1, 2))
        scores = (scores * self.scaling).view(b, h, t, kv_len)  # [b, h, t, T]
        if attention_mask is None and t > 1:  # a kernel-side causal mask (sdpa) was skipped: build it
            attention_mask = torch.ones(t, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - t)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = nn.functional.dropout(probs, p=self.attention_dropout, training=self.training)
        return torch.bmm(probs.view(b, h * t, kv_len), latent[:, 0])  # [b, h*t, r]: sum_T p c, still latent


__all__ = ["LatentCacheLayer", "MultiHeadLatentAttention", "blocked_scores", "deinterleave", "joint_view"]
