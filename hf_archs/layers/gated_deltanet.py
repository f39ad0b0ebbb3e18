"""Gated DeltaNet (Yang, Kautz, Hatamizadeh, arXiv:2412.06464): linear attention whose [K, V] state per head is
decayed and then corrected toward each new key-value pair (the delta rule).

For each value head, token t (q, k L2-normalised, q scaled by K^-0.5; g_t <= 0 a log decay, beta_t in (0, 1)):

    S_t = exp(g_t) S_{t-1}                        decay
    S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T  write the part of v_t the state does not yet predict
    o_t = S_t^T q_t

Paths, all checked against `naive_recurrent_gated_delta_rule` (the oracle, one token at a time):
- `chunk_gated_delta_rule` (prefill, training): chunks of C tokens. Inside a chunk the C updates are condensed by
  the WY / UT transform (Yang et al., arXiv:2406.06484): with Gamma_i = exp(cumsum of g in the chunk),
  L[i, j] = beta_i (k_i . k_j) Gamma_i / Gamma_j for j < i, T = (I + L)^-1, the chunk's corrected values are
  U = T beta V - T beta (Gamma K) S_0, its outputs O = (Gamma Q) S_0 + (QK^T * Gamma_i / Gamma_j)_{j<=i} U and the
  next state Gamma_C S_0 + (K Gamma_C / Gamma)^T U; only the [C, K] x [K, V] products of the last two lines run
  chunk after chunk. Every intermediate is [chunk, C, *] per head: memory is linear in T.
- `recurrent_gated_delta_rule` (decoding): the recurrence with batched matmuls, for a few tokens on a cached state.
- flash-linear-attention's Triton kernels (`fla.ops.gated_delta_rule`) when the package is installed and the
  tensors are on a GPU (the `[kernels]` extra); one log line says which path is active.

Also here, shared with `kda.py`: the gated output norm, the per-chunk scan, packed-sequence handling (several
documents in one row, from restarting `position_ids` or `cu_seq_lens_q`: each document is run on its own, exactly)
and the flash-linear-attention detection.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from ..errors import InputError
from .linear import Linear
from .short_conv import ShortConvolution, conv_state

logger = logging.getLogger(__name__)

MODES = ("auto", "chunk", "recurrent", "naive", "fla")


# ----------------------------------------------------------------------------------------------------------------
# flash-linear-attention (optional) and which path runs
# ----------------------------------------------------------------------------------------------------------------
def fla_available() -> bool:
    """True when flash-linear-attention (`fla`, the `[kernels]` extra) and Triton can be imported."""
    return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None


_REPORTED: set[tuple[str, str]] = set()


def report_path(mixer: str, path: str) -> None:
    """One log line per (mixer, path) and process, so users can see which implementation runs."""
    if (mixer, path) not in _REPORTED:
        _REPORTED.add((mixer, path))
        logger.info("hf_archs: %s runs the %s path", mixer, path)


def pick_mode(mode: str, x: torch.Tensor, seq_len: int, has_state: bool) -> str:
    """"auto": fla kernels on CUDA when installed, else the recurrent path for a few tokens after a cached state
    (decoding), else the chunked path."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if x.is_cuda and fla_available():
        return "fla"
    return "recurrent" if has_state and seq_len <= 4 else "chunk"


# ----------------------------------------------------------------------------------------------------------------
# Small shared pieces
# ----------------------------------------------------------------------------------------------------------------
def l2norm_rsqrt(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum x^2 + eps)` as `x * rsqrt(...)` (flash-linear-attention's and transformers' Gated DeltaNet)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class GatedRMSNorm(nn.Module):
    """`w * rmsnorm(x) * act(gate)` over the last dimension, computed in fp32, cast back to x's dtype.

    `weight_in_fp32=False`: the weight multiplies the normalised x rounded to x's dtype (transformers' Qwen3-Next
    order); `True`: everything in fp32 (its Kimi Linear order). The two agree in fp32.
    """

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "silu", weight_in_fp32: bool = False) -> None:
        super().__init__()
        self.eps, self.activation, self.weight_in_fp32 = eps, activation, weight_in_fp32
        self.act_fn = ACT2FN[activation]
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight.float() * h if self.weight_in_fp32 else self.weight * h.to(dtype)
        return (h * self.act_fn(gate.float())).to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, activation={self.activation}"


def unit_lower_inverse(lower: torch.Tensor, base: int = 8) -> torch.Tensor:
    """`(I + L)^-1` for strictly lower-triangular `L` [..., C, C], by 2 x 2 blocks down to `base`
    (`[[A, 0], [B, D]]^-1 = [[A^-1, 0], [-D^-1 B A^-1, D^-1]]`), and on a block by the finite series
    `(I - L)(I + L^2)(I + L^4)...` (L is nilpotent). Only batched matmuls: on a 2-core CPU, inverting 1024 [64, 64]
    blocks and multiplying took about half the time of a batched triangular solve with the same right-hand sides."""
    c = lower.shape[-1]
    if c <= base:
        eye = torch.eye(c, dtype=lower.dtype, device=lower.device)
        inv, power, span = eye - lower, None, 2
        while span < c:
            power = lower @ lower if power is None else power @ power
            inv = inv + inv @ power
            span *= 2
        return inv
    h = c // 2
    a_inv = unit_lower_inverse(lower[..., :h, :h], base)
    d_inv = unit_lower_inverse(lower[..., h:, h:], base)
    top = torch.cat((a_inv, torch.zeros_like(lower[..., :h, h:])), dim=-1)
    bottom = torch.cat((-(d_inv @ (lower[..., h:, :h] @ a_inv)), d_inv), dim=-1)
    return torch.cat((top, bottom), dim=-2)


def chunk_scan(u: torch.Tensor, w: torch.Tensor, q_decayed: torch.Tensor, k_to_end: torch.Tensor,
               a_qk: torch.Tensor, state_decay: torch.Tensor, state: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The sequential part of the chunked delta rule, chunk after chunk (leading dim N = chunks; M = batch x heads).

    u [N, M, C, V], w [N, M, C, K]: the chunk's WY terms (corrected values = u - w S);
    q_decayed [N, M, C, K] = Gamma * q; k_to_end [N, M, C, K] = k * Gamma_C / Gamma; a_qk [N, M, C, C] the
    intra-chunk scores (causal, diagonal included); state_decay [N, M, K or 1, 1] = Gamma_C; state [M, K, V].
    Writes the outputs into `out` [batch, N, C, heads, V]; returns the final state.
    """
    batch, c, dv = out.shape[0], u.shape[2], u.shape[3]
    for i in range(u.shape[0]):
        new_v = torch.baddbmm(u[i], w[i], state, alpha=-1.0)  # [M, C, V]
        o = torch.baddbmm(torch.bmm(a_qk[i], new_v), q_decayed[i], state)
        out[:, i] = o.view(batch, -1, c, dv).transpose(1, 2)
        state = torch.baddbmm(state * state_decay[i], k_to_end[i].transpose(1, 2), new_v)
    return state


def blockwise_scan(prepare: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...],
                   chunk_size: int, heads: int, dv: int, state: torch.Tensor, block_tokens: int = 2048
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a chunked delta rule over blocks of whole chunks (about `block_tokens` each), so that the per-chunk
    operands exist for one block at a time: memory is the inputs and outputs plus one block.

    `prepare(*block_inputs) -> (u, w, q_decayed, k_to_end, a_qk, state_decay)` (see `chunk_scan`) for inputs
    [B, t_block, ...] (the last block zero-padded to whole chunks by `to_chunks`). Returns ([B, T, heads, V], state).
    """
    b, t = inputs[0].shape[:2]
    n = -(-t // chunk_size)
    out = inputs[0].new_empty(b, n, chunk_size, heads, dv, dtype=torch.float32)
    step = max(1, block_tokens // chunk_size)
    for first in range(0, n, step):
        block = tuple(x[:, first * chunk_size:(first + step) * chunk_size] for x in inputs)
        state = chunk_scan(*prepare(*block), state, out[:, first:first + step])
    return out.view(b, n * chunk_size, heads, dv)[:, :t], state


# ----------------------------------------------------------------------------------------------------------------
# The gated delta rule: reference, chunked, recurrent, fla
# ----------------------------------------------------------------------------------------------------------------
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> int:
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [batch, T, heads, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t, h, _ = k.shape
    hv = v.shape[2]
    if v.shape[:2] != (b, t) or hv % h:
        raise ValueError(f"v must be [batch, T, value_heads, V] with value_heads a multiple of {h}, "
                         f"got {tuple(v.shape)}")
    if beta.shape != (b, t, hv):
        raise ValueError(f"beta must be [batch, T, value_heads] = {(b, t, hv)}, got {tuple(beta.shape)}")
    return hv // h


def naive_recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                     beta: torch.Tensor, scale: float | None = None,
                                     initial_state: torch.Tensor | None = None, output_final_state: bool = False
                                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The oracle: the recurrence as written, one token at a time, in fp32.

    q, k [B, T, H, K] (already L2-normalised); v [B, T, HV, V] (value head j reads key head j // (HV / H));
    g, beta [B, T, HV]; initial_state [B, HV, K, V]. Returns (o [B, T, HV, V] fp32, final state or None).
    """
    groups = _check(q, k, v, g, beta)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = (x.float().repeat_interleave(groups, dim=2) for x in (q, k))
    v, g, beta = v.float(), g.float(), beta.float()
    b, t, hv, dv = v.shape
    state = q.new_zeros(b, hv, q.shape[-1], dv) if initial_state is None else initial_state.float().clone()
    out = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k[:, i], state)
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, i], beta[:, i, :, None] * (v[:, i] - predicted))
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, state))
    return torch.stack(out, dim=1), (state if output_final_state else None)


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, scale: float | None = None,
                               initial_state: torch.Tensor | None = None, output_final_state: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding: the recurrence with batched matmuls over (batch, value heads); same contract as the oracle."""
    groups = _check(q, k, v, g, beta)
    return recurrent_delta_rule(q, k, v, g, beta, groups, scale, initial_state, output_final_state)


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                         beta: torch.Tensor, groups: int, scale: float | None, initial_state: torch.Tensor | None,
                         output_final_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule one token at a time, shared by Gated DeltaNet (`log_decay` [b, t, hv]: one decay per
    head) and KDA ([b, t, hv, dk]: one per key channel); inputs already checked, `groups` value heads per key head."""
    b, t, _, dk = k.shape
    hv, dv = v.shape[-2:]
    scale = dk**-0.5 if scale is None else scale
    q = (q.float() * scale).repeat_interleave(groups, dim=2).reshape(b, t, hv, 1, dk)
    k = k.float().repeat_interleave(groups, dim=2).reshape(b, t, hv, 1, dk)
    v, decay, beta = v.float(), log_decay.float().exp(), beta.float()
    if decay.dim() == 3:
        decay = decay[..., None]  # one decay per head: the same for every key channel
    state = q.new_zeros(b, hv, dk, dv) if initial_state is None else initial_state.float()
    out = q.new_empty(b, t, hv, dv)
    for i in range(t):
        state = state * decay[:, i, :, :, None]
        new_v = beta[:, i, :, None] * (v[:, i] - (k[:, i] @ state)[..., 0, :])  # [b, hv, dv]
        state = torch.baddbmm(state.reshape(-1, dk, dv), k[:, i].reshape(-1, dk, 1),
                              new_v.reshape(-1, 1, dv)).view(b, hv, dk, dv)
        out[:, i] = (q[:, i] @ state)[..., 0, :]
    return out, (state if output_final_state else None)


def to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[B, T, *rest] -> [N, B, *rest[:1], C, *rest[1:]]: zero-padded to N whole chunks, chunk index first (the scan
    then reads contiguous slices), heads before the position in the chunk. One copy."""
    b, t = x.shape[:2]
    n = -(-t // chunk_size)
    padded = x.new_empty(b, n * chunk_size, *x.shape[2:])
    padded[:, :t] = x
    padded[:, t:] = 0
    x = padded.view(b, n, chunk_size, *x.shape[2:])
    order = (1, 0, 3, 2, *range(4, x.dim())) if x.dim() > 3 else (1, 0, 2)
    return x.permute(*order).contiguous()


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, chunk_size: int = 64, block_tokens: int = 2048
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prefill / training: the chunked form (module docstring); same contract as the oracle. The per-chunk operands
    are built `block_tokens` at a time (`blockwise_scan`)."""
    groups = _check(q, k, v, g, beta)
    b, _, h, dk = k.shape
    hv, dv = v.shape[-2:]
    c = chunk_size
    scale = dk**-0.5 if scale is None else scale
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()

    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
        # [N, B, H, C, K] for keys and queries, [N, B, H, G, C, *] per value head (G value heads share a key head)
        qc, kc = to_chunks(q.float() * scale, c), to_chunks(k.float(), c)
        n = qc.shape[0]
        vc = to_chunks(v.float(), c).view(n, b, h, groups, c, dv)
        gc = to_chunks(g.float(), c).view(n, b, h, groups, c).cumsum(-1)  # log Gamma
        bc = to_chunks(beta.float(), c).view(n, b, h, groups, c)
        decay = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # Gamma_i / Gamma_j
        kk = (kc @ kc.transpose(-1, -2)).unsqueeze(3)  # [N, B, H, 1, C, C]
        a_qk = (qc @ kc.transpose(-1, -2)).unsqueeze(3) * decay
        gamma = gc.exp()
        # T diag(beta): beta (and Gamma for w) scale the columns of the small [C, C] inverse, not the big operands
        t_beta = unit_lower_inverse((kk * decay * bc[..., None]).tril(-1)) * bc[..., None, :]
        u = t_beta @ vc  # [N, B, H, G, C, V]
        # the G value heads of a key head stacked along rows: one [G C, C] x [C, K] product per key head
        w = ((t_beta * gamma[..., None, :]).view(n, b, h, groups * c, c) @ kc).view(n, b, h, groups, c, dk)
        q_decayed = qc.unsqueeze(3) * gamma[..., None]
        k_to_end = kc.unsqueeze(3) * (gc[..., -1:] - gc).exp()[..., None]
        m = b * hv
        return (u.view(n, m, c, dv), w.view(n, m, c, dk), q_decayed.view(n, m, c, dk), k_to_end.view(n, m, c, dk),
                a_qk.view(n, m, c, c), gamma[..., -1].reshape(n, m, 1, 1))

    state = (q.new_zeros(b * hv, dk, dv, dtype=torch.float32) if initial_state is None
             else initial_state.float().reshape(b * hv, dk, dv))
    out, state = blockwise_scan(prepare, (q, k, v, g, beta), c, hv, dv, state, block_tokens)
    return out, (state.view(b, hv, dk, dv) if output_final_state else None)


def fla_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         scale: float | None = None, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False, recurrent: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flash-linear-attention's kernels (GPU only): `chunk_gated_delta_rule`, or `fused_recurrent_...` for decoding."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    from fla.ops.gated_delta_rule import (
        fused_recurrent_gated_delta_rule as fla_recurrent,
    )

    fn = fla_recurrent if recurrent else fla_chunk
    out, state = fn(q, k, v, g=g.float(), beta=beta, scale=scale,
                    initial_state=None if initial_state is None else initial_state.float(),
                    output_final_state=output_final_state, use_qk_l2norm_in_kernel=True)
    return out.float(), state


DELTA_RULES: dict[str, Callable] = {"naive": naive_recurrent_gated_delta_rule, "chunk": chunk_gated_delta_rule,
                                    "recurrent": recurrent_gated_delta_rule}


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     mode: str, scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, chunk_size: int = 64
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to one of the paths (`mode` already resolved by `pick_mode`). Returns fp32 outputs."""
    report_path("Gated DeltaNet", {"fla": "flash-linear-attention (GPU)", "chunk": "chunked torch",
                                   "recurrent": "recurrent torch", "naive": "naive reference"}[mode])
    if mode == "fla":
        return fla_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state,
                                    recurrent=q.shape[1] == 1 and initial_state is not None)
    kwargs = {"chunk_size": chunk_size} if mode == "chunk" else {}
    return DELTA_RULES[mode](q, k, v, g, beta, scale, initial_state, output_final_state, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Packed sequences: several documents in one row
# ----------------------------------------------------------------------------------------------------------------
def packed_boundaries(position_ids: torch.Tensor | None, cu_seq_lens: torch.Tensor | None, batch: int,
                      seq_len: int, attention_mask: torch.Tensor | None) -> list[list[int]] | None:
    """Document start offsets per row when a row holds several documents, else None.

    Detected from `cu_seq_lens` (flash-attention varlen style, batch 1) or from `position_ids` that restart
    (a step other than +1, transformers' `find_packed_sequence_indices` rule) when there is no padding mask
    (a left-padded row has repeated position ids under its padding; the mask handles those).
    """
    if seq_len <= 1:
        return None
    if cu_seq_lens is not None:
        cu = [int(x) for x in cu_seq_lens.reshape(-1).tolist()]
        if batch != 1 or cu[0] != 0 or cu[-1] != seq_len or any(b <= a for a, b in itertools.pairwise(cu)):
            raise InputError(f"cu_seq_lens_q {cu} does not describe documents packed in one row of {seq_len} "
                             f"tokens (batch {batch})")
        return [cu[:-1]] if len(cu) > 2 else None
    if position_ids is None or attention_mask is not None:
        return None
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] == 1 else position_ids
    if pos.shape[-1] != seq_len:
        return None
    starts = torch.diff(pos, dim=-1) != 1  # a new document starts after each such step
    if not bool(starts.any()):
        return None
    return [[0] + (torch.nonzero(row).reshape(-1) + 1).tolist() for row in starts]


def run_packed(fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]], x: torch.Tensor,
               boundaries: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run `fn(x, lengths)` (a mixer from a fresh state on right-padded documents x [docs, longest, d] ->
    (out, conv state, recurrent state), the states taken after each document's own length) on every document
    alone: none sees another's tokens or state. Returns the outputs re-packed into rows and, per row, the states
    after its last document (None where `fn` returns none)."""
    b, t, _ = x.shape
    docs = [(r, s, e) for r, starts in enumerate(boundaries) for s, e in zip(starts, starts[1:] + [t])]
    longest = max(e - s for _, s, e in docs)
    batch = x.new_zeros(len(docs), longest, x.shape[-1])
    for i, (r, s, e) in enumerate(docs):
        batch[i, : e - s] = x[r, s:e]
    lengths = [e - s for _, s, e in docs]
    out, conv_state, state = fn(batch, lengths)
    packed = out.new_empty(b, t, out.shape[-1])
    for i, (r, s, e) in enumerate(docs):
        packed[r, s:e] = out[i, : e - s]
    last = [max(i for i, (r, _, _) in enumerate(docs) if r == row) for row in range(b)]
    return packed, None if conv_state is None else conv_state[last], None if state is None else state[last]


def valid_positions(lengths: list[int], seq_len: int, device: torch.device) -> torch.Tensor:
    """[rows, seq_len] 1.0 where the position is inside the row's document, else 0.0."""
    return (torch.arange(seq_len, device=device) < torch.tensor(lengths, device=device)[:, None]).float()


def conv_state_at(x: torch.Tensor, kernel_size: int, lengths: list[int]) -> torch.Tensor:
    """The conv state after each row's first `lengths[i]` inputs of x [rows, channels, T]."""
    return torch.stack([conv_state(x[i, :, :n], kernel_size) for i, n in enumerate(lengths)])


# ----------------------------------------------------------------------------------------------------------------
# The token mixer
# ----------------------------------------------------------------------------------------------------------------
class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer with a short convolution and a gated output norm, from explicit sizes.

    Parameters (the checkpoint names of the one release, grouped by key head):
    - `in_proj_qkvz` [nk * (2 dk + 2 r dv), hidden] with r = nv / nk: per key head h, rows
      `[q_h (dk) | k_h (dk) | v (r dv) | z (r dv)]` for that key head's r value heads;
      `in_proj_ba` [nk * 2r, hidden]: per key head, `[b (r) | a (r)]`. (A split of the whole projection into
      q, k, v, z would be wrong.)
    - `conv1d` (ShortConvolution, SiLU) over the channels `[q (nk dk) | k (nk dk) | v (nv dv)]`.
    - `A_log`, `dt_bias` [nv]: g = -exp(A_log) softplus(a + dt_bias); beta = sigmoid(b).
    - `norm` (GatedRMSNorm over dv, SiLU of z), `out_proj` [hidden, nv dv].
    Cache (transformers' `LinearAttentionLayer`, layer type "linear_attention"): the conv inputs [b, conv_dim, K]
    and the state [b, nv, dk, dv] in fp32; constant in the sequence length.
    `mode`: "auto" (see `pick_mode`), "chunk", "recurrent", "naive" or "fla". Padding (2-D `attention_mask`) zeroes
    the padded inputs, which then leave a zero state unchanged (left padding is exact).
    """

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 layer_idx: int, conv_kernel_size: int = 4, norm_eps: float = 1e-6, chunk_size: int = 64,
                 mode: str = "auto") -> None:
        super().__init__()
        if num_v_heads % num_k_heads:
            raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_k_heads ({num_k_heads})")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.layer_idx, self.mode, self.chunk_size = layer_idx, mode, chunk_size
        self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim = (num_k_heads, num_v_heads,
                                                                                head_k_dim, head_v_dim)
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        r = num_v_heads // num_k_heads
        self.in_proj_qkvz = Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(hidden_size, 2 * num_v_heads, bias=False)
        self.conv1d = ShortConvolution(2 * self.key_dim + self.value_dim, conv_kernel_size)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        self.A_log = nn.Parameter(torch.empty(num_v_heads).uniform_(1, 16).log())
        self.norm = GatedRMSNorm(head_v_dim, eps=norm_eps, activation="silu")
        self.out_proj = Linear(self.value_dim, hidden_size, bias=False)
        self._split_qkvz = [head_k_dim, head_k_dim, r * head_v_dim, r * head_v_dim]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [b, t, hidden] -> conv input [b, conv_dim, t], z [b, t, nv, dv], b and a [b, t, nv]."""
        bsz, t, _ = x.shape
        nk = self.num_k_heads
        q, k, v, z = self.in_proj_qkvz(x).view(bsz, t, nk, -1).split(self._split_qkvz, dim=-1)
        b, a = self.in_proj_ba(x).view(bsz, t, nk, -1).chunk(2, dim=-1)
        mixed = torch.cat((q.reshape(bsz, t, -1), k.reshape(bsz, t, -1), v.reshape(bsz, t, -1)), dim=-1)
        return (mixed.transpose(1, 2), z.reshape(bsz, t, self.num_v_heads, self.head_v_dim),
                b.reshape(bsz, t, -1), a.reshape(bsz, t, -1))

    def mix(self, x: torch.Tensor, conv_context: torch.Tensor | None, state: torch.Tensor | None,
            want_state: bool, lengths: list[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [b, t, hidden] continuing (conv_context, state) -> (output, conv state, recurrent state)."""
        bsz, t, _ = x.shape
        mixed, z, b, a = self.project(x)
        conv_out = self.conv1d(mixed, conv_context).transpose(1, 2)  # [b, t, conv_dim]
        q, k, v = conv_out.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(bsz, t, self.num_k_heads, self.head_k_dim)
        k = k.reshape(bsz, t, self.num_k_heads, self.head_k_dim)
        v = v.reshape(bsz, t, self.num_v_heads, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # fp32, as transformers
        if lengths is not None:  # right-padded documents: the padding must leave the state as it is
            valid = valid_positions(lengths, t, x.device)[..., None]
            beta, g = beta * valid.to(beta.dtype), g * valid
        mode = pick_mode(self.mode, x, t, state is not None)
        if mode != "fla":  # the fla kernels normalise q and k themselves
            q, k = l2norm_rsqrt(q.float()), l2norm_rsqrt(k.float())
        out, new_state = gated_delta_rule(q, k, v, g, beta, mode, initial_state=state, output_final_state=want_state,
                                          chunk_size=self.chunk_size)
        new_conv = None
        if want_state:
            new_conv = (self.conv1d.new_state(mixed, conv_context) if lengths is None
                        else conv_state_at(mixed, self.conv1d.kernel_size[0], lengths))
        out = self.norm(out.to(x.dtype), z).reshape(bsz, t, -1)
        return self.out_proj(out), new_conv, new_state

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                position_ids: torch.Tensor | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        return linear_mixer_forward(self, hidden_states, attention_mask, cache, position_ids, cu_seq_lens_q)


def linear_mixer_forward(mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                         cache, position_ids: torch.Tensor | None, cu_seq_lens_q: torch.Tensor | None) -> torch.Tensor:
    """The cache and packing logic shared by the linear mixers (`mixer.mix` does the math)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        # zero the padded positions: their keys and values are then 0, so a zero state stays zero through them
        hidden_states = (hidden_states * attention_mask[:, -hidden_states.shape[1]:, None]).to(hidden_states.dtype)
    bsz, t, _ = hidden_states.shape
    idx = mixer.layer_idx
    if cache is not None and not isinstance(cache.layers[idx] if idx < len(cache.layers) else None,
                                            LinearAttentionCacheLayerMixin):
        raise InputError(f"layer {idx} is a linear-attention layer but its cache layer is "
                         f"{type(cache.layers[idx]).__name__ if idx < len(cache.layers) else 'missing'}: build the "
                         "cache from the model's config (DynamicCache(config=model.config))")
    has_state = cache is not None and cache.has_previous_state(idx)
    conv_context = cache.get_conv_state(idx) if has_state else None
    state = cache.get_recurrent_state(idx) if has_state else None
    boundaries = packed_boundaries(position_ids, cu_seq_lens_q, bsz, t,
                                   attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None)
    if boundaries is not None and has_state:
        raise InputError("packed sequences (several documents in one row) cannot continue a cached state: pass "
                         "them without a cache, or one document per row")
    want = cache is not None
    if boundaries is None:
        out, conv_state, state = mixer.mix(hidden_states, conv_context, state, want)
    else:
        out, conv_state, state = run_packed(lambda x, lengths: mixer.mix(x, None, None, want, lengths),
                                            hidden_states, boundaries)
    if cache is not None:
        cache.update_conv_state(conv_state, idx, conv_kernel_size=conv_state.shape[-1])
        cache.update_recurrent_state(state.float(), idx)
    return out


__all__ = ["GatedDeltaNet", "GatedRMSNorm", "chunk_gated_delta_rule", "fla_available", "gated_delta_rule",
           "naive_recurrent_gated_delta_rule", "recurrent_gated_delta_rule", "unit_lower_inverse"]
