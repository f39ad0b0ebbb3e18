"""Aux-loss-free load balancing (DeepSeek-V3 report section 2.1.2; arXiv:2408.15664) and expert load statistics.

Routers with a correction bias (`TopKRouter(correction_bias=True)`: DeepSeek V3, Kimi K2, GLM-4.5, MiniMax-M2) choose
experts by `score + bias` but weight them by the unbiased score. After each training step the bias of an overloaded
expert goes down by `rate` and that of an underloaded one up by `rate` (`b_i += rate * sign(mean load - load_i)`),
which moves the load toward balance without a loss term. Opt-in:

    tracker = ExpertLoadTracker(model)        # counts each router's chosen experts during forward
    for batch in data:
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
        update_correction_bias(tracker, rate=1e-3)   # uses and resets the counts
    tracker.remove()

Under activation checkpointing a recomputed forward routes the same tokens again, doubling every count alike: the
statistics double, the sign update does not change.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers.moe import TopKRouter, expert_load


class ExpertLoadTracker:
    """Counts, per router of `model`, how many token assignments each expert received since the last reset.

    `routers="biased"` (default) tracks the routers that have a correction bias; `"all"` every `TopKRouter`.
    Counting runs in forward hooks on the routers (their third output is the chosen indices) and adds no
    autograd work.
    """

    def __init__(self, model: nn.Module, routers: str = "biased") -> None:
        if routers not in ("biased", "all"):
            raise ValueError(f"routers must be 'biased' or 'all', got {routers!r}")
        self.routers = {name: m for name, m in model.named_modules() if isinstance(m, TopKRouter)
                        and (routers == "all" or m.e_score_correction_bias is not None)}
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
    for name, router in tracker.routers.items():
        load = loads[name]
        bias = router.e_score_correction_bias
        if bias is None or not load.sum():
            continue
        step = torch.sign(load.float().mean() - load.float()).to(bias.device)
        bias.add_(rate * step.to(bias.dtype))
    if reset:
        tracker.reset()
    return loads


__all__ = ["ExpertLoadTracker", "update_correction_bias"]
