"""DeepSeek-style load balancing: aux-loss-free bias updates (DeepSeek-V3 report section 2.1.2; arXiv:2408.15664),
expert load statistics, and DeepSeek's complementary sequence-wise balance loss.

Routers with a correction bias (`TopKRouter(correction_bias=True)`: DeepSeek V3, Kimi K2, GLM-4.5; MiniMax-M2 keeps
it on the MoE block beside its router) choose experts by `score + bias` but weight them by the unbiased score. After
each training step the bias of an overloaded expert goes down by `rate` and that of an underloaded one up by `rate`
(`b_i += rate * sign(mean load - load_i)`), which moves the load toward balance without a loss term. Opt-in:

    tracker = ExpertLoadTracker(model)        # counts each router's chosen experts during forward
    for batch in data:
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        update_correction_bias(tracker, rate=1e-3)   # uses and resets the counts
    tracker.remove()

Under activation checkpointing a recomputed forward routes the same tokens again, doubling every count alike: the
statistics double, the sign update does not change.

The complementary sequence-wise balance loss (`sequence_balance_loss`, report section 2.1.2, eq. 17-20) is what
`MoECausalLM` returns as `aux_loss` for configs that carry DeepSeek's `seq_aux` field (DeepSeek V3, Kimi K2) when
trained with `output_router_logits=True`; `aux_loss_alpha` is its weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers.moe import TopKRouter, expert_load


def _bias_owner(modules: dict[str, nn.Module], name: str, router: TopKRouter) -> nn.Module | None:
    """The module holding router `name`'s correction bias: the router itself (`TopKRouter(correction_bias=True)`:
    DeepSeek V3, Kimi K2, GLM-4.5) or the MoE block around it, where the release keeps the bias beside the router
    (MiniMax-M2's `block_sparse_moe.e_score_correction_bias`, passed to its `gate` at call time)."""
    if router.e_score_correction_bias is not None:
        return router
    parent = modules.get(name.rpartition(".")[0])
    return parent if isinstance(getattr(parent, "e_score_correction_bias", None), torch.Tensor) else None


class ExpertLoadTracker:
    """Counts, per router of `model`, how many token assignments each expert received since the last reset.

    `routers="biased"` (default) tracks the routers that have a correction bias (their own, or their MoE block's);
    `"all"` every `TopKRouter`. Counting runs in forward hooks on the routers (their third output is the chosen
    indices) and adds no autograd work.
    """

    def __init__(self, model: nn.Module, routers: str = "biased") -> None:
        if routers not in ("biased", "all"):
            raise ValueError(f"routers must be 'biased' or 'all', got {routers!r}")
        modules = dict(model.named_modules())
        # Router name -> the module whose `e_score_correction_bias` it uses (read at update time: `.to()` replaces
        # buffer tensors).
        self.bias_owners = {name: _bias_owner(modules, name, m) for name, m in modules.items()
                            if isinstance(m, TopKRouter)}
        self.routers = {name: modules[name] for name, owner in self.bias_owners.items()
                        if routers == "all" or owner is not None}
        self.bias_owners = {name: self.bias_owners[name] for name in self.routers}
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no {'' if routers == 'all' else 'biased '}TopKRouter")
        self.counts = {name: torch.zeros(m.num_experts, dtype=torch.long, device=m.weight.device)
                       for name, m in self.routers.items()}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.routers.items()]

    def _hook(self, name: str):
        def count(module: TopKRouter, args, output) -> None:
            indices = output[2]
            self.counts[name] += expert_load(indices.detach(), module.num_experts).to(self.counts[name].device)
        return count

    def load(self) -> dict[str, torch.Tensor]:
        """Router name -> assignments per expert `[E]` since the last reset."""
        return {name: c.clone() for name, c in self.counts.items()}

    def imbalance(self) -> dict[str, float]:
        """Router name -> max load / mean load (1.0 is perfect balance; nan before any token)."""
        return {name: (c.max() / c.float().mean()).item() if c.sum() else float("nan")
                for name, c in self.counts.items()}

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def remove(self) -> None:
        """Stop counting (removes the hooks)."""
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def update_correction_bias(tracker: ExpertLoadTracker, rate: float = 1e-3,
                           reset: bool = True) -> dict[str, torch.Tensor]:
    """One aux-loss-free balancing step: `bias += rate * sign(mean load - load)` for each tracked router with a
    correction bias and at least one counted token. Returns the loads used; resets the counts unless `reset=False`."""
    loads = tracker.load()
    for name in tracker.routers:
        load = loads[name]
        owner = tracker.bias_owners[name]
        bias = None if owner is None else owner.e_score_correction_bias
        if bias is None or not load.sum():
            continue
        step = torch.sign(load.float().mean() - load.float()).to(bias.device)
        bias.add_(rate * step.to(bias.dtype))
    if reset:
        tracker.reset()
    return loads


def sequence_balance_loss(router_logits: Sequence[torch.Tensor], top_k: int, batch_size: int,
                          attention_mask: torch.Tensor | None = None, per_sequence: bool = True) -> torch.Tensor:
    """DeepSeek-V3's complementary balance loss (report section 2.1.2, eq. 17-20), summed over the MoE layers and
    without the weight alpha (`aux_loss_alpha`). For each sequence of T tokens and each of the N routed experts:

        s_{i,t}  = sigmoid(router logit)                       the affinities, without the correction bias
        s'_{i,t} = s_{i,t} / sum_j s_{j,t}                     normalised over all routed experts     (eq. 20)
        f_i = N / (K T) * sum_t 1(s_{i,t} in TopK({s_{j,t}}, K))                                     (eq. 18)
        P_i = (1 / T) * sum_t s'_{i,t}                                                               (eq. 19)
        L   = sum_i f_i P_i                                                                          (eq. 17)

    then the mean of L over the sequences (DeepSeek-V2's `MoEGate`, the release code that computes this loss:
    `(ce * scores.mean(dim=1)).sum(dim=1).mean()`; the V3 release's gate asserts `not self.training` and computes
    none). The top-k of eq. 18 is taken over the plain affinities: no correction bias and no group limit, as the
    equation writes it and as Megatron-Core's `compute_routing_scores_for_aux_loss` does, so it may differ from
    the experts the router actually chose. Only P carries a gradient.

    `router_logits`: one `[batch_size * T, N]` tensor per MoE layer (batch-major, as the routers see the tokens).
    `attention_mask` `[batch_size, T]`: padding tokens are left out of T, f and P; a sequence without tokens is left
    out of the mean. `per_sequence=False` (`seq_aux: false`): the whole batch counts as one sequence (V2's batch-wise
    variant of the same loss).
    """
    if not router_logits:
        raise ValueError("sequence_balance_loss needs the router logits of at least one MoE layer")
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    for logits in router_logits:
        tokens, num_experts = logits.shape
        if batch_size <= 0 or tokens % batch_size:
            raise ValueError(f"router logits for {tokens} tokens do not split into batch_size={batch_size} sequences")
        seq_len = tokens // batch_size
        scores = torch.sigmoid(logits.float())  # [B * T, N]
        normed = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)  # s' (eq. 20)
        chosen = scores.detach().topk(top_k, dim=-1).indices  # [B * T, K]: eq. 18's top-k
        hits = torch.zeros_like(normed).scatter_(1, chosen, 1.0)  # [B * T, N]: 1 where expert i is in the top-k
        if attention_mask is None:
            keep = normed.new_ones(batch_size, seq_len)
        else:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, seq_len):
                raise ValueError(f"attention_mask must have shape [batch, seq] = {(batch_size, seq_len)} to match "
                                 f"the router logits, got {tuple(attention_mask.shape)}")
            keep = attention_mask.to(normed.device, torch.float32)
        rows = batch_size if per_sequence else 1
        keep = keep.reshape(rows, -1, 1)  # [S, T, 1]
        hits, normed = hits.reshape(rows, -1, num_experts), normed.reshape(rows, -1, num_experts)
        count = keep.sum(dim=1)  # [S, 1]: tokens per sequence
        tokens_per_seq = count.clamp_min(1)
        f = (hits * keep).sum(dim=1) * num_experts / (top_k * tokens_per_seq)  # [S, N]
        p = (normed * keep).sum(dim=1) / tokens_per_seq  # [S, N]
        loss = (f * p).sum(dim=-1)  # [S]
        valid = count[:, 0] > 0
        total = total + (loss * valid).sum() / valid.sum().clamp_min(1)
    return total


__all__ = ["ExpertLoadTracker", "sequence_balance_loss", "update_correction_bias"]
