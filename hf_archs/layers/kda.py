"""Kimi Delta Attention (KDA, Kimi Team, arXiv:2510.26692): the gated delta rule with a decay per key channel.

For each head, token t (q, k L2-normalised, q scaled by K^-0.5; g_t [K] <= 0 a per-channel log decay):

    S_t = diag(exp(g_t)) S_{t-1}
    S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T
    o_t = S_t^T q_t

Paths, all checked against `naive_recurrent_kda` (the oracle, one token at a time):
- `chunk_kda` (prefill, training): the WY form of `gated_deltanet.py` with Gamma_i a vector: the intra-chunk scores
  sum_d a_i[d] b_j[d] Gamma_i[d] / Gamma_j[d] (j <= i) no longer factor into one matmul of pre-scaled rows without
  risking overflow (Gamma_j^-1 can exceed fp32 range inside a 64-token chunk). They are built from 16-token
  sub-chunks, as flash-linear-attention's kernels do: a block of rows (sub-chunk a) against earlier columns is one
  matmul with both sides scaled relative to the first position of sub-chunk a, so every factor is <= 1; a diagonal
  block is one matmul scaled relative to its middle position when the decay inside it spans less than
  `DIAGONAL_SPAN` nats, otherwise it is computed exactly, pair by pair. No [C, C, K] tensor is built for the
  whole sequence (transformers' torch path does, which makes it slow and memory-hungry).
- `recurrent_kda` (decoding): the recurrence with batched matmuls.
- flash-linear-attention's kernels (`fla.ops.kda`) on a GPU when installed.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN

from .gated_deltanet import (
    MODES,
    GatedRMSNorm,
    blockwise_scan,
    conv_state_at,
    linear_mixer_forward,
    pick_mode,
    recurrent_delta_rule,
    report_path,
    to_chunks,
    unit_lower_inverse,
    valid_positions,
)
from .linear import Linear
from .short_conv import ShortConvolution, causal_depthwise_conv, conv_state

# Largest |log decay| between a diagonal sub-chunk's middle and any of its positions for which the scaled-matmul
# form is used: exp(+-40) stays far inside fp32's range (1e+-38), so both scaled operands and their products are
# normal numbers. Beyond it the block is computed exactly.
DIAGONAL_SPAN = 40.0
# Factors exp(x) with x <= 0 are clamped at exp(-40) ~ 4e-18 (no subnormals, which are slow on CPUs); the
# entries they feed are then off by less than 4e-18 |q| |k|, far below fp32 resolution of anything else.
MIN_LOG_FACTOR = -40.0


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> int:
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [batch, T, heads, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t, h, dk = k.shape
    hv = v.shape[2]
    if v.shape[:2] != (b, t) or hv % h:
        raise ValueError(f"v must be [batch, T, value_heads, V] with value_heads a multiple of {h}, "
                         f"got {tuple(v.shape)}")
    if g.shape != (b, t, hv, dk) or beta.shape != (b, t, hv):
        raise ValueError(f"g must be [batch, T, value_heads, K] = {(b, t, hv, dk)} and beta [batch, T, value_heads], "
                         f"got {tuple(g.shape)} and {tuple(beta.shape)}")
    return hv // h


def naive_recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        scale: float | None = None, initial_state: torch.Tensor | None = None,
                        output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The oracle: the recurrence as written, one token at a time, in fp32.

    q, k [B, T, H, K] (already L2-normalised); v [B, T, HV, V]; g [B, T, HV, K]; beta [B, T, HV];
    initial_state [B, HV, K, V]. Returns (o [B, T, HV, V] fp32, final state or None).
    """
    groups = _check(q, k, v, g, beta)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = (x.float().repeat_interleave(groups, dim=2) for x in (q, k))
    v, g, beta = v.float(), g.float(), beta.float()
    b, t, hv, dv = v.shape
    state = q.new_zeros(b, hv, q.shape[-1], dv) if initial_state is None else initial_state.float().clone()
    out = []
    for i in range(t):
        state = state * g[:, i].exp()[..., None]
        predicted = torch.einsum("bhk,bhkv->bhv", k[:, i], state)
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, i], beta[:, i, :, None] * (v[:, i] - predicted))
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, state))
    return torch.stack(out, dim=1), (state if output_final_state else None)


def recurrent_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  scale: float | None = None, initial_state: torch.Tensor | None = None,
                  output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoding: the recurrence with batched matmuls over (batch, value heads); same contract as the oracle."""
    groups = _check(q, k, v, g, beta)
    return recurrent_delta_rule(q, k, v, g, beta, groups, scale, initial_state, output_final_state)


def _exact_blocks(q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, group: int = 256
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_d x_i[d] k_j[d] exp(gc_i[d] - gc_j[d]) for j <= i, pair by pair: q, k, gc [U, S, K] -> two [U, S, S]."""
    s = k.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=k.device).tril()
    kk, qk = [], []
    for start in range(0, k.shape[0], group):  # [group, S, S, K] temporaries at most
        sl = slice(start, start + group)
        decay = (gc[sl, :, None] - gc[sl, None, :]).masked_fill(~causal[..., None], float("-inf")).exp()
        kd = k[sl, None, :, :] * decay  # [g, i, j, K]: k_j Gamma_i / Gamma_j
        kk.append((k[sl, :, None, :] * kd).sum(-1))
        qk.append((q[sl, :, None, :] * kd).sum(-1))
    return torch.cat(kk), torch.cat(qk)


def intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor, sub_chunk: int = 16
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A_kk[i, j] = sum_d k_i k_j Gamma_i / Gamma_j (j < i) and A_qk[i, j] = the same with q_i (j <= i), for rows of
    chunks: q, k [R, C, K], gc [R, C, K] the cumulative log decay inside each chunk. Returns two [R, C, C]."""
    r, c, dk = k.shape
    s = sub_chunk if c % sub_chunk == 0 else c
    ns = c // s
    a_kk = k.new_zeros(r, c, c)
    a_qk = k.new_zeros(r, c, c)
    # Diagonal blocks, scaled around their middle position.
    gs, ks, qs = gc.view(r, ns, s, dk), k.view(r, ns, s, dk), q.view(r, ns, s, dk)
    rel = gs - gs[:, :, s // 2: s // 2 + 1]  # [R, ns, S, K]
    far = rel.abs().amax(dim=(2, 3)) > DIAGONAL_SPAN  # [R, ns]: blocks needing the exact form
    rel = rel.clamp(-DIAGONAL_SPAN, DIAGONAL_SPAN)
    grow, shrink = rel.exp(), (-rel).exp()
    k_cols = (ks * shrink).transpose(-1, -2)
    diag_kk = (ks * grow) @ k_cols  # [R, ns, S, S]
    diag_qk = (qs * grow) @ k_cols
    if bool(far.any()):
        rows = far.nonzero(as_tuple=True)
        diag_kk[rows], diag_qk[rows] = _exact_blocks(qs[rows], ks[rows], gs[rows])
    causal = torch.ones(s, s, dtype=torch.bool, device=k.device).tril()
    a_kk.view(r, ns, s, ns, s).diagonal(dim1=1, dim2=3).copy_(diag_kk.masked_fill(~causal, 0).permute(0, 2, 3, 1))
    a_qk.view(r, ns, s, ns, s).diagonal(dim1=1, dim2=3).copy_(diag_qk.masked_fill(~causal, 0).permute(0, 2, 3, 1))
    # Rows of sub-chunk a against all earlier columns, scaled relative to a's first position: factors <= 1.
    for a in range(1, ns):
        lo, hi = a * s, (a + 1) * s
        ref = gc[:, lo: lo + 1]
        row = (gc[:, lo:hi] - ref).clamp_min(MIN_LOG_FACTOR).exp()
        cols = (k[:, :lo] * (ref - gc[:, :lo]).clamp_min(MIN_LOG_FACTOR).exp()).transpose(-1, -2)
        a_kk[:, lo:hi, :lo] = (k[:, lo:hi] * row) @ cols
        a_qk[:, lo:hi, :lo] = (q[:, lo:hi] * row) @ cols
    return a_kk, a_qk


def chunk_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
              chunk_size: int = 64, block_tokens: int = 2048, sub_chunk: int = 16
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prefill / training: the chunked form (module docstring); same contract as the oracle."""
    groups = _check(q, k, v, g, beta)
    b, _, _, dk = k.shape
    hv, dv = v.shape[-2:]
    c = chunk_size
    scale = dk**-0.5 if scale is None else scale

    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
        # per value head: [N, B, HV, C, *] flattened to rows R = N B HV
        qc = to_chunks((q.float() * scale).repeat_interleave(groups, dim=2), c)
        n = qc.shape[0]
        kc = to_chunks(k.float().repeat_interleave(groups, dim=2), c).view(-1, c, dk)
        qc = qc.view(-1, c, dk)
        vc = to_chunks(v.float(), c).view(-1, c, dv)
        gc = to_chunks(g.float(), c).view(-1, c, dk).cumsum(1)  # log Gamma, per channel
        bc = to_chunks(beta.float(), c).view(-1, c)
        a_kk, a_qk = intra_chunk_scores(qc, kc, gc, sub_chunk)
        t_beta = unit_lower_inverse(a_kk.tril(-1) * bc[:, :, None]) * bc[:, None, :]  # T diag(beta)
        gamma = gc.clamp_min(MIN_LOG_FACTOR).exp()
        u = t_beta @ vc
        w = t_beta @ (kc * gamma)
        k_to_end = kc * (gc[:, -1:] - gc).clamp_min(MIN_LOG_FACTOR).exp()
        m = b * hv
        return (u.view(n, m, c, dv), w.view(n, m, c, dk), (qc * gamma).view(n, m, c, dk), k_to_end.view(n, m, c, dk),
                a_qk.view(n, m, c, c), gamma[:, -1].reshape(n, m, dk, 1))

    state = (q.new_zeros(b * hv, dk, dv, dtype=torch.float32) if initial_state is None
             else initial_state.float().reshape(b * hv, dk, dv))
    out, state = blockwise_scan(prepare, (q, k, v, g, beta), c, hv, dv, state, block_tokens)
    return out, (state.view(b, hv, dk, dv) if output_final_state else None)


def fla_kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
            recurrent: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flash-linear-attention's kernels (GPU only): `chunk_kda`, or `fused_recurrent_kda` for decoding."""
    from fla.ops.kda import chunk_kda as fla_chunk
    from fla.ops.kda import fused_recurrent_kda as fla_recurrent

    fn = fla_recurrent if recurrent else fla_chunk
    out, state = fn(q, k, v, g=g.float(), beta=beta, scale=scale,
                    initial_state=None if initial_state is None else initial_state.float(),
                    output_final_state=output_final_state, use_qk_l2norm_in_kernel=True)
    return out.float(), state


RULES = {"naive": naive_recurrent_kda, "chunk": chunk_kda, "recurrent": recurrent_kda}


def kda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, mode: str,
        scale: float | None = None, initial_state: torch.Tensor | None = None, output_final_state: bool = False,
        chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to one of the paths (`mode` already resolved by `pick_mode`). Returns fp32 outputs. Except on the
    fla path (which normalises them itself), q and k must already be L2-normalised."""
    report_path("KDA", {"fla": "flash-linear-attention (GPU)", "chunk": "chunked torch",
                        "recurrent": "recurrent torch", "naive": "naive reference"}[mode])
    if mode == "fla":
        return fla_kda(q, k, v, g, beta, scale, initial_state, output_final_state,
                       recurrent=q.shape[1] == 1 and initial_state is not None)
    kwargs = {"chunk_size": chunk_size} if mode == "chunk" else {}
    return RULES[mode](q, k, v, g, beta, scale, initial_state, output_final_state, **kwargs)


def l2norm_div(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(sum x^2 + eps)` (flash-linear-attention's KDA; the order of transformers' Kimi Linear)."""
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


class KimiDeltaAttention(nn.Module):
    """KDA token mixer from explicit sizes; parameter names are the release's (`model.layers.N.self_attn.*`).

    - `q_proj`, `k_proj`, `v_proj` [heads * head_dim, hidden]; each followed by its own short convolution
      (`q_conv1d`, `k_conv1d`, `v_conv1d`, SiLU), run as one convolution over `[q | k | v]` (one cached state).
    - Forget gate, per channel: g = -exp(A_log[head]) softplus(f_b_proj(f_a_proj(x)) + dt_bias), `A_log`
      [1, 1, heads, 1], `dt_bias` [heads * head_dim], `f_a_proj` [head_dim, hidden] (low rank), `f_b_proj`.
    - beta = sigmoid(b_proj(x)) per head.
    - Output: `o_norm` (RMSNorm over head_dim, times sigmoid of `g_b_proj(g_a_proj(x))`, all in fp32), `o_proj`.
    Cache, padding, packing and `mode`: as `GatedDeltaNet`.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, layer_idx: int, conv_kernel_size: int = 4,
                 norm_eps: float = 1e-6, chunk_size: int = 64, mode: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.layer_idx, self.mode, self.chunk_size = layer_idx, mode, chunk_size
        self.num_heads, self.head_dim = num_heads, head_dim
        dim = num_heads * head_dim
        self.q_proj = Linear(hidden_size, dim, bias=False)
        self.k_proj = Linear(hidden_size, dim, bias=False)
        self.v_proj = Linear(hidden_size, dim, bias=False)
        self.q_conv1d = ShortConvolution(dim, conv_kernel_size)
        self.k_conv1d = ShortConvolution(dim, conv_kernel_size)
        self.v_conv1d = ShortConvolution(dim, conv_kernel_size)
        self.f_a_proj = Linear(hidden_size, head_dim, bias=False)
        self.f_b_proj = Linear(head_dim, dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, num_heads, 1).uniform_(1, 16).log())
        dt = torch.empty(dim).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.b_proj = Linear(hidden_size, num_heads, bias=False)
        self.g_a_proj = Linear(hidden_size, head_dim, bias=False)
        self.g_b_proj = Linear(head_dim, dim, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps, activation="sigmoid", weight_in_fp32=True)
        self.o_proj = Linear(dim, hidden_size, bias=False)
        self.silu = ACT2FN["silu"]

    def forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel log decay [b, t, heads, head_dim] in fp32 (transformers' op order; softplus = x above 20)."""
        g = (self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()).view(*x.shape[:2], -1, self.head_dim)
        softplus = torch.where(g > 20.0, g, torch.log(1.0 + torch.exp(g)))
        return -torch.exp(self.A_log.float()) * softplus

    def mix(self, x: torch.Tensor, conv_context: torch.Tensor | None, state: torch.Tensor | None,
            want_state: bool, lengths: list[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [b, t, hidden] continuing (conv_context, state) -> (output, conv state, recurrent state)."""
        bsz, t, _ = x.shape
        shape = (bsz, t, self.num_heads, self.head_dim)
        mixed = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1).transpose(1, 2)
        weight = torch.cat((self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight))
        q, k, v = causal_depthwise_conv(mixed, weight, None, self.silu, conv_context).transpose(1, 2).chunk(3, dim=-1)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        g = self.forget_gate(x)
        beta = torch.sigmoid(self.b_proj(x))
        if lengths is not None:  # right-padded documents: the padding must leave the state as it is
            valid = valid_positions(lengths, t, x.device)[..., None]
            beta, g = beta * valid.to(beta.dtype), g * valid[..., None]
        mode = pick_mode(self.mode, x, t, state is not None)
        if mode != "fla":  # the fla kernels normalise q and k themselves
            q, k = l2norm_div(q.float()), l2norm_div(k.float())
        out, new_state = kda(q, k, v, g, beta, mode, initial_state=state, output_final_state=want_state,
                             chunk_size=self.chunk_size)
        new_conv = None
        if want_state:
            kernel = weight.shape[-1]
            new_conv = (conv_state(mixed, kernel, conv_context) if lengths is None
                        else conv_state_at(mixed, kernel, lengths))
        gate = self.g_b_proj(self.g_a_proj(x)).view(shape)
        out = self.o_norm(out.to(x.dtype), gate).reshape(bsz, t, -1)
        return self.o_proj(out), new_conv, new_state

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                position_ids: torch.Tensor | None = None, cu_seq_lens_q: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        return linear_mixer_forward(self, hidden_states, attention_mask, cache, position_ids, cu_seq_lens_q)


__all__ = ["KimiDeltaAttention", "chunk_kda", "intra_chunk_scores", "kda", "l2norm_div", "naive_recurrent_kda",
           "recurrent_kda"]
