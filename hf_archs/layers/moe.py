"""Mixture-of-experts blocks: fused 3-D experts computed sparsely, and the routing rules of the 2025 releases.

Routing rules are plain functions of the router logits (so each architecture's router module can keep its
release's parameter names); `Experts` runs only the routed tokens through each expert: tokens are sorted by
expert and each expert multiplies one contiguous slice (grouped matmul; `torch.nn.functional.grouped_mm` on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


# ----------------------------------------------------------------------------------------------------------------
# Routing rules. Each returns (weights [tokens, k], indices [tokens, k]); weights are in fp32.
# ----------------------------------------------------------------------------------------------------------------
def softmax_topk(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the top k, optionally renormalise them to sum to 1 (Qwen3-MoE, gpt-oss)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def sigmoid_grouped_topk(logits: torch.Tensor, top_k: int, correction_bias: torch.Tensor | None = None,
                         n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                         routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek V3's rule (also Kimi K2, GLM-4.5, MiniMax-M2, Kimi Linear).

    Scores are sigmoid(logits). The choice uses scores + correction_bias (the aux-loss-free balancing bias),
    restricted to the `topk_group` best of `n_group` expert groups (a group's score is the sum of its two best);
    the weights are the unbiased scores of the chosen experts, renormalised, times `routed_scaling_factor`.
    """
    scores = logits.float().sigmoid()  # [tokens, experts]
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        grouped = choice.unflatten(-1, (n_group, -1))  # [tokens, groups, experts / group]
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(
            1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    indices = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


def sigmoid_top1_input_scale(logits: torch.Tensor, top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4: top-k on the raw logits, weight = sigmoid(logit); the weight scales the expert's *input*."""
    top, indices = torch.topk(logits, top_k, dim=-1)
    return torch.sigmoid(top.float()), indices


def softcapped_softmax_topk(logits: torch.Tensor, top_k: int, softcap: float | None) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Grok: fp32 logits, optional tanh soft-cap, softmax over all experts, top-k with no renormalisation."""
    logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return softmax_topk(logits, top_k, norm_topk_prob=False)


# ----------------------------------------------------------------------------------------------------------------
# GLU variants for the experts: (gate, up) -> hidden.
# ----------------------------------------------------------------------------------------------------------------
def act_glu(act: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    fn = ACT2FN[act]
    return lambda gate, up: fn(gate) * up


def clamped_swiglu(alpha: float = 1.702, limit: float = 7.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """gpt-oss: gate clamped above at `limit`, up clamped to [-limit, limit], `gate * sigmoid(alpha * gate) * (up + 1)`."""
    def glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
        return gate * torch.sigmoid(gate * alpha) * (up + 1)
    return glu


_GROUPED_MM_REFUSED: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) torch's grouped_mm refused


class Experts(nn.Module):
    """`num_experts` gated MLPs stored as fused 3-D parameters `gate_up_proj` and `down_proj`.

    Layout options (each one branch), matching the releases' fused layouts:
    - `transposed=False`: `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I] (rows = outputs, as nn.Linear);
      `transposed=True`: [E, H, 2I] and [E, I, H] (gpt-oss, Llama 4).
    - `interleaved=False`: gate = first I columns, up = last I; `True`: gate = even, up = odd (gpt-oss).
    - `bias`: `gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, H].
    `glu(gate, up)` is the activation (`act_glu("silu")` = SwiGLU).
    How a token's k weighted outputs are added (`combine`), which decides the bf16 bits:
    - `slot_sum=False`: weights cast to the activations' dtype, outputs accumulated in it (index_add).
    - `slot_sum=True`: `output * weight` kept in the weights' dtype (fp32 for DeepSeek-style fp32 routers), the k
      slots summed in top-k order and rounded once: transformers' grouped_mm combine (DeepSeek V3, Kimi K2,
      GLM-4.5, MiniMax-M2, Kimi Linear).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, transposed: bool = False,
                 interleaved: bool = False, bias: bool = False, slot_sum: bool = False) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.transposed, self.interleaved, self.slot_sum = transposed, interleaved, slot_sum
        self.glu = glu or act_glu("silu")
        e, h, i = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i) if transposed else torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, i, h) if transposed else torch.empty(e, h, i))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * i))
            self.down_proj_bias = nn.Parameter(torch.zeros(e, h))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = weight if weight.dtype == x.dtype else weight.to(x.dtype)  # as `_grouped` casts them
        return (x @ weight if self.transposed else F.linear(x, weight)) + (0 if bias is None else bias)

    def expert_forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """One expert on `x` [n, H] (the plain reference the fused path is checked against)."""
        gb = None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[e]
        db = None if self.down_proj_bias is None else self.down_proj_bias[e]
        gate_up = self._linear(x, self.gate_up_proj[e], gb)
        gate, up = (gate_up[..., 0::2], gate_up[..., 1::2]) if self.interleaved else gate_up.chunk(2, dim=-1)
        return self._linear(self.glu(gate, up), self.down_proj[e], db)

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor | None) -> torch.Tensor:
        """x [T, H]; top_k_index / top_k_weights [T, k]. Returns sum_k w_k * expert_{i_k}(x) as [T, H].

        With `top_k_weights=None` the outputs are summed unweighted (Llama 4 scales the inputs instead).
        """
        fast = self.rows_by_matvec(x, top_k_index, top_k_weights)
        if fast is not None:
            return fast
        k = top_k_index.shape[1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        token_of = order // k
        routed = x.index_select(0, token_of)  # [T * k, H], contiguous per expert (index_select: a row copy)
        counts = torch.bincount(flat, minlength=self.num_experts)
        out = self.grouped_or_none(routed, counts, flat[order])
        if out is None:
            out = torch.empty_like(routed)
            start = 0
            for e, n in enumerate(counts.tolist()):  # one host sync; only experts with tokens run
                if n:
                    out[start:start + n] = self.expert_forward(routed[start:start + n], e).to(out.dtype)
                    start += n
        return self.combine(out, x, top_k_weights, order, token_of)

    def combine(self, out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor | None, order: torch.Tensor,
                token_of: torch.Tensor) -> torch.Tensor:
        """`out` [T * k, H]: the expert outputs of the assignments in expert order (`order`, the argsort of the
        flat top-k indices; `token_of = order // k`). Returns each token's weighted sum [T, H] (see `slot_sum`)."""
        if top_k_weights is None:
            return torch.zeros_like(x).index_add_(0, token_of, out)
        if self.slot_sum:
            slot_of = torch.empty_like(order)
            slot_of[order] = torch.arange(order.numel(), device=order.device)  # row of each [token, slot]
            unsorted = out.index_select(0, slot_of)  # back to [token, slot] order
            weighted = unsorted * top_k_weights.reshape(-1, 1)  # promotes to the weights' dtype
            return weighted.view(x.shape[0], top_k_weights.shape[-1], -1).sum(dim=1).to(x.dtype)
        out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, out)

    def grouped_mm_ok(self) -> bool:
        """torch's grouped matmul needs 16-byte aligned strides: hidden and intermediate sizes multiples of 8."""
        return hasattr(F, "grouped_mm") and self.hidden_size % 8 == 0 and self.intermediate_size % 8 == 0

    matvec_rows = 16  # `rows_by_matvec` up to this many routed rows

    def _no_autograd(self, routed: torch.Tensor) -> bool:
        """Nothing here is tracked by autograd (inference, generate)."""
        return not (torch.is_grad_enabled() and (routed.requires_grad
                                                 or any(p.requires_grad for p in self.parameters())))

    def rows_by_matvec(self, x: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor | None) -> torch.Tensor | None:
        """Decoding on CPU: when every routed row has its expert to itself (one token; a few tokens sharing no
        expert), `forward`'s result with each row through its expert as two matrix-vector products; None
        otherwise.

        For one row torch's CPU `mm` takes a slower path than `mv`, and the grouped kernel visits every expert,
        empty or not (one token, top-8 of 32, H 512, I 256: grouped 1.16 ms, this 0.89 ms in fp32; bf16 1.96 ->
        1.37 ms, the same bits; fp32 differs from `mm` in the last bits, ~1e-7 relative). The routing is read once
        to the host and sorted there (no argsort / bincount / gather kernels); the products write into one buffer
        each, so the activation and biases run once over all rows; rows are in `forward`'s expert order, so
        `combine` adds them in the same order.
        """
        n, k = top_k_index.numel(), top_k_index.shape[-1]
        if (n > self.matvec_rows or x.device.type != "cpu" or "expert_forward" in self.__dict__
                or type(self).expert_forward is not Experts.expert_forward or not self._no_autograd(x)):
            return None
        flat = top_k_index.reshape(-1).tolist()
        if len(set(flat)) < n:  # an expert with two rows: the grouped kernel or the loop
            return None
        order = sorted(range(n), key=flat.__getitem__)  # stable: forward's argsort order
        gate_up_w = self.gate_up_proj.transpose(1, 2) if self.transposed else self.gate_up_proj  # [E, 2I, H]
        down_w = self.down_proj.transpose(1, 2) if self.transposed else self.down_proj  # [E, H, I]
        same = gate_up_w.dtype == x.dtype  # else each used expert cast to the activations' dtype, as `_grouped` does

        def weight(w: torch.Tensor, e: int) -> torch.Tensor:
            return w[e] if same else w[e].to(x.dtype)

        experts = [flat[j] for j in order]  # of each row
        gate_up = x.new_empty(n, gate_up_w.shape[1])
        for row, (j, e) in enumerate(zip(order, experts)):
            torch.mv(weight(gate_up_w, e), x[j // k], out=gate_up[row])
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[experts]
        gate, up = (gate_up[:, 0::2], gate_up[:, 1::2]) if self.interleaved else gate_up.chunk(2, dim=-1)
        hidden = self.glu(gate, up).to(x.dtype)
        out = x.new_empty(n, down_w.shape[1])
        for row, e in enumerate(experts):
            torch.mv(weight(down_w, e), hidden[row], out=out[row])
        if self.down_proj_bias is not None:
            out = out + self.down_proj_bias[experts]
        order_t = torch.tensor(order)
        return self.combine(out.to(x.dtype), x, top_k_weights, order_t, order_t // k)

    def grouped_or_none(self, routed: torch.Tensor, counts: torch.Tensor,
                        expert_of_row: torch.Tensor) -> torch.Tensor | None:
        """Every expert's rows of `routed` through `_grouped` where torch's grouped matmul applies; None where the
        per-expert loop (`expert_forward`) must run instead.

        CUDA: whenever the sizes allow. CPU: without autograd only (inference, generate), and when at least one
        expert in 8 has rows. torch's CPU kernel gives the loop's bits (fp32, bf16) and saves the loop's ~6 small
        ops per expert (H 512, I 256, bf16: 32 experts x 512 tokens 27 -> 14 ms; one token, top-8 of 32: 1.28 ->
        1.14 ms), but it visits every expert, empty or not (one token, top-1 of 128: 0.27 ms looped, 0.60 grouped),
        and its backward fails on some routings (torch 2.13). Never while `expert_forward` is replaced on the
        instance (LoRA adapters on a subclass): the loop runs it.
        """
        if not self.grouped_mm_ok() or "expert_forward" in self.__dict__:
            return None
        if not routed.is_cuda:
            if (routed.device.type, routed.dtype) in _GROUPED_MM_REFUSED or not self._no_autograd(routed):
                return None
            if 8 * int((counts > 0).sum()) < self.num_experts:  # few experts used: looping over them is cheaper
                return None
            try:
                return self._grouped(routed, counts, expert_of_row)
            except (RuntimeError, NotImplementedError):  # a torch without a CPU kernel for this dtype: the loop
                _GROUPED_MM_REFUSED.add((routed.device.type, routed.dtype))
                return None
        return self._grouped(routed, counts, expert_of_row)

    def _grouped(self, routed: torch.Tensor, counts: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """All experts in two grouped matmuls, no host sync (CUDA). Same math as `expert_forward` per row."""
        offs = counts.cumsum(0).to(torch.int32)
        gate_up_w = self.gate_up_proj if self.transposed else self.gate_up_proj.transpose(1, 2)  # [E, H, 2I]
        down_w = self.down_proj if self.transposed else self.down_proj.transpose(1, 2)  # [E, I, H]
        gate_up = F.grouped_mm(routed, gate_up_w.to(routed.dtype), offs=offs)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[expert_of_row]
        gate, up = (gate_up[..., 0::2], gate_up[..., 1::2]) if self.interleaved else gate_up.chunk(2, dim=-1)
        out = F.grouped_mm(self.glu(gate, up).contiguous(), down_w.to(routed.dtype), offs=offs)
        if self.down_proj_bias is not None:
            out = out + self.down_proj_bias[expert_of_row]
        return out


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss over all MoE layers, transformers' convention (so losses compare):
    E * sum_e f_e * P_e, with P_e the mean softmax probability of expert e and f_e the fraction of the softmax
    top-k assignments that go to e, over the tokens `attention_mask` keeps. `router_logits`: one [T, E] per layer.
    """
    device = router_logits[0].device
    keep = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    hits = torch.zeros(num_experts, device=device)
    prob = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        p = torch.softmax(logits.float(), dim=-1)  # [T, E]
        chosen = p.topk(top_k, dim=-1).indices
        w = torch.ones(p.shape[0], device=device) if keep is None else keep
        hits = hits.scatter_add(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        prob = prob + (p * w[:, None]).sum(0)
        rows = rows + w.sum()
    return num_experts * ((hits / rows) * (prob / rows)).sum()


class TopKRouter(nn.Module):
    """Router logits `x W^T (+ b)` [T, E] and a routing rule applied to them.

    `rule(logits, **extra) -> (weights, indices)`, e.g. `functools.partial(softmax_topk, top_k=8, norm_topk_prob=True)`.
    `correction_bias=True` adds the persistent buffer `e_score_correction_bias` [E] (DeepSeek's aux-loss-free
    balancing bias), passed to the rule as `correction_bias`. `fp32=True` computes the logits in fp32.
    Returns (logits, weights, indices); model outputs record the logits (`output_router_logits=True`).
    """

    def __init__(self, hidden_size: int, num_experts: int, rule: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                 bias: bool = False, correction_bias: bool = False, fp32: bool = False) -> None:
        super().__init__()
        self.num_experts, self.rule, self.fp32 = num_experts, rule, fp32
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        if correction_bias:
            self.e_score_correction_bias = nn.Buffer(torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.reshape(-1, x.shape[-1])
        if self.fp32:
            logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        else:
            logits = F.linear(x, self.weight, self.bias)
        extra = {} if self.e_score_correction_bias is None else {"correction_bias": self.e_score_correction_bias}
        weights, indices = self.rule(logits, **extra)
        return logits, weights, indices


def expert_load(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Number of routed assignments per expert, [E] (for load statistics and bias updates)."""
    return torch.bincount(top_k_index.reshape(-1), minlength=num_experts)
