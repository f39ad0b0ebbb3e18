"""What every routed (MoE) architecture adds to the contract: router logits, the auxiliary loss, expert load."""

from __future__ import annotations

import pytest
import torch

import hf_archs
from cases import CASES
from helpers import max_rel_diff, ours_from, reference, tokens
from hf_archs.modeling_base import MoECausalLM

MOE = [c for c in CASES if issubclass(hf_archs.ARCHITECTURES[c.name].causal_lm_class, MoECausalLM)]
params = pytest.mark.parametrize("case", MOE, ids=[c.name for c in MOE])


@params
def test_router_logits_and_aux_loss_match_the_reference(case):
    ref = reference(case)
    ours = ours_from(case, ref)
    ids = tokens(case, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        b = ref(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    sparse = sum(t == "sparse" for t in ours.config.mlp_layer_types)
    assert len(a.router_logits) == sparse > 0
    for x, y in zip(a.router_logits, b.router_logits):
        assert max_rel_diff(x, y) <= 1e-5
    if getattr(b, "aux_loss", None) is not None:
        torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    else:
        assert a.aux_loss is not None and torch.isfinite(a.aux_loss)


@params
def test_aux_loss_is_added_to_the_training_loss(case):
    ours = ours_from(case, reference(case)).train()
    ids = tokens(case, batch=2)
    plain = ours(ids, labels=ids, output_router_logits=False)
    routed = ours(ids, labels=ids, output_router_logits=True)
    assert plain.aux_loss is None and plain.router_logits is None
    coef = ours.config.router_aux_loss_coef
    torch.testing.assert_close(routed.loss, plain.loss + coef * routed.aux_loss, rtol=1e-5, atol=1e-6)
    routed.loss.backward()
    router = next(m for m in ours.modules() if isinstance(m, hf_archs.layers.moe.TopKRouter))
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
