"""DeepSeek's complementary sequence-wise balance loss (DeepSeek-V3 report section 2.1.2, eq. 17-20).

The oracle is a plain loop over sequences, tokens and experts written from the equations (sigmoid affinities, top-k
over the plain affinities, s' normalised over all routed experts, f_i = N / (K T) * hits, P_i = mean s'), not from
`hf_archs.balancing`. The model tests check how DeepSeek V3 / Kimi K2 use it: only in training mode, only with
`output_router_logits=True`, weighted by the release's `aux_loss_alpha`.
"""

from __future__ import annotations

import pytest
import torch

import hf_archs
from cases import BY_NAME
from hf_archs.balancing import sequence_balance_loss
from hf_archs.errors import ConfigError
from hf_archs.layers.moe import TopKRouter, load_balancing_loss
from helpers import randomize, tokens


def loop_balance_loss(layer_logits, batch: int, top_k: int, mask=None) -> torch.Tensor:
    """Eq. 17-20 per sequence, then the mean over sequences and the sum over layers; float64 scalar ops, so the
    gradient with respect to the logits can be compared too. Sequences without a kept token are left out."""
    total = torch.zeros((), dtype=torch.float64)
    for logits in layer_logits:
        n = logits.shape[-1]
        per_seq = logits.reshape(batch, -1, n).double()
        losses = []
        for b in range(batch):
            kept = [t for t in range(per_seq.shape[1]) if mask is None or bool(mask[b, t])]
            if not kept:
                continue
            T = len(kept)
            f = [0.0] * n
            P = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
            for t in kept:
                s = [torch.sigmoid(per_seq[b, t, i]) for i in range(n)]
                for i in sorted(range(n), key=lambda i: -float(s[i].detach()))[:top_k]:
                    f[i] += n / (top_k * T)
                z = sum(s)
                for i in range(n):
                    P[i] = P[i] + s[i] / z / T
            losses.append(sum(f[i] * P[i] for i in range(n)))
        total = total + sum(losses) / len(losses)
    return total


def hand_made_logits() -> list[torch.Tensor]:
    """Two MoE layers, a batch of two 4-token sequences, 4 experts. Sequence 0 routes (top-2) to experts 0 / 1 and
    sequence 1 to experts 2 / 3: each sequence alone is unbalanced, the batch as a whole is balanced."""
    layer0 = torch.tensor([[2.0, 1.5, -1.0, -2.0], [1.2, 2.2, -0.5, -1.5], [2.5, 0.9, 0.1, -1.0],
                           [0.8, 1.9, -2.0, 0.3],
                           [-1.0, -2.0, 2.0, 1.5], [-0.5, -1.5, 1.2, 2.2], [0.1, -1.0, 2.5, 0.9],
                           [-2.0, 0.3, 0.8, 1.9]])
    layer1 = torch.tensor([[1.0, -1.0, 0.5, -0.2], [-0.3, 1.4, 0.9, -1.1], [0.7, 0.2, -0.6, 1.3],
                           [1.6, -0.4, 0.0, 0.35],
                           [-0.8, 0.6, 1.1, 0.05], [0.45, -1.2, 0.25, 1.7], [1.05, 0.15, -0.9, -0.25],
                           [-0.1, 0.95, 1.25, -1.3]])
    return [layer0, layer1]


def test_sequence_loss_matches_the_loop_and_differs_from_the_batch_loss():
    logits = hand_made_logits()
    ours = sequence_balance_loss(logits, top_k=2, batch_size=2)
    torch.testing.assert_close(ours.double(), loop_balance_loss(logits, batch=2, top_k=2), rtol=1e-6, atol=1e-7)
    # seq_aux false: the batch is one sequence (DeepSeek-V2's batch-wise branch).
    batch = sequence_balance_loss(logits, top_k=2, batch_size=2, per_sequence=False)
    torch.testing.assert_close(batch.double(), loop_balance_loss(logits, batch=1, top_k=2), rtol=1e-6, atol=1e-7)
    # Layer 0: each sequence sends all its tokens to two of the four experts (f = 2 for them, 0 for the others);
    # over the batch every expert gets the same share (f = 1, so the loss is sum_i P_i = 1 exactly). Per sequence
    # the loss is 2 * (P_0 + P_1) for sequence 0, well above 1.
    first_seq = sequence_balance_loss(logits[:1], top_k=2, batch_size=2)
    first_batch = sequence_balance_loss(logits[:1], top_k=2, batch_size=2, per_sequence=False)
    torch.testing.assert_close(first_batch, torch.tensor(1.0))
    assert first_seq > 1.4
    assert not torch.allclose(ours, batch)


def test_gradient_matches_the_loop():
    a = [t.clone().requires_grad_(True) for t in hand_made_logits()]
    b = [t.double().clone().requires_grad_(True) for t in hand_made_logits()]
    sequence_balance_loss(a, top_k=2, batch_size=2).backward()
    loop_balance_loss(b, batch=2, top_k=2).backward()
    for x, y in zip(a, b):
        assert x.grad is not None and x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-7)


def test_padding_tokens_are_left_out():
    logits = hand_made_logits()
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0]])  # left padding; the second sequence is all padding
    ours = sequence_balance_loss(logits, top_k=2, batch_size=2, attention_mask=mask)
    torch.testing.assert_close(ours.double(), loop_balance_loss(logits, batch=2, top_k=2, mask=mask),
                               rtol=1e-6, atol=1e-7)
    # Only the three real tokens of sequence 0 count: the same as routing them alone.
    alone = [x[1:4] for x in logits]
    torch.testing.assert_close(ours, sequence_balance_loss(alone, top_k=2, batch_size=1), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        sequence_balance_loss(logits, top_k=2, batch_size=2, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="do not split into batch_size=3"):
        sequence_balance_loss(logits, top_k=2, batch_size=3)


# ------------------------------------------------------------------------------------------------------------------
# In the models: DeepSeek V3 and Kimi K2 (their releases carry `aux_loss_alpha: 0.001`, `seq_aux: true`).
# ------------------------------------------------------------------------------------------------------------------
DEEPSEEK_FAMILY = ["deepseek_v3", "kimi_k2"]


def build(name: str, **overrides) -> torch.nn.Module:
    official = BY_NAME[name].official_config()
    official.update(overrides)
    model = hf_archs.ARCHITECTURES[name].causal_lm_class(hf_archs.config_from_official(official))
    randomize(model, seed=5)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # balancing biases large enough to change the routing
        for gate in routers(model):
            gate.e_score_correction_bias.copy_(torch.rand(gate.num_experts, generator=gen))
    return model


def routers(model: torch.nn.Module) -> list[TopKRouter]:
    layers = model.model.layers[:model.config.num_hidden_layers]  # the decoder's MoE layers, not the MTP layer
    return [m for layer in layers for m in layer.modules() if isinstance(m, TopKRouter)]


def test_release_fields_are_read_under_the_publishers_names():
    config = hf_archs.config_from_official(BY_NAME["deepseek_v3"].official_config())
    assert (config.aux_loss_alpha, config.seq_aux, config.router_aux_loss_coef) == (0.001, True, 0.001)
    assert config.output_router_logits is False  # the loss is opt-in
    saved = config.to_dict()
    assert saved["aux_loss_alpha"] == 0.001 and saved["seq_aux"] is True and "router_aux_loss_coef" not in saved
    assert hf_archs.config_from_official(BY_NAME["kimi_k2"].official_config()).seq_aux is True
    with pytest.raises(ConfigError, match="aux_loss_alpha"):
        hf_archs.config_from_official(dict(BY_NAME["deepseek_v3"].official_config(), aux_loss_alpha=-0.1))


@pytest.mark.parametrize("name", DEEPSEEK_FAMILY)
def test_training_loss_adds_alpha_times_the_sequence_loss(name):
    model = build(name).train()
    ids = tokens(BY_NAME[name], batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence
    chosen = []
    hooks = [g.register_forward_hook(lambda m, a, out: chosen.append(out[2])) for g in routers(model)]
    routed = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
    for h in hooks:
        h.remove()
    plain = model(ids, attention_mask=mask, labels=ids)
    assert plain.aux_loss is None
    logits = [x.detach() for x in routed.router_logits]
    assert len(logits) == len(routers(model)) > 0
    top_k = model.config.num_experts_per_tok
    expected = loop_balance_loss(logits, batch=2, top_k=top_k, mask=mask)
    torch.testing.assert_close(routed.aux_loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(routed.loss, plain.loss + model.config.aux_loss_alpha * routed.aux_loss,
                               rtol=1e-6, atol=1e-7)
    # Eq. 18's top-k ignores the balancing bias (and the group limit); the router chose otherwise for some tokens,
    # so the loss over the chosen experts would not be this one.
    plain_top = [x.topk(top_k, dim=-1).indices.sort(-1).values for x in logits]
    assert any(not torch.equal(c.sort(-1).values, p) for c, p in zip(chosen, plain_top))


@pytest.mark.parametrize("name", DEEPSEEK_FAMILY)
def test_gradient_flows_into_the_router_weights(name):
    model = build(name).train()
    ids = tokens(BY_NAME[name], batch=2)
    out = model(ids, output_router_logits=True)
    out.aux_loss.backward()
    for gate in routers(model):
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    # The head is not on the balance loss's path (only the router logits are).
    assert model.lm_head.weight.grad is None


@pytest.mark.parametrize("name", DEEPSEEK_FAMILY)
def test_no_balance_loss_in_eval_mode(name):
    model = build(name).eval()
    ids = tokens(BY_NAME[name], batch=2)
    with torch.no_grad():
        routed = model(ids, labels=ids, output_router_logits=True)
        plain = model(ids, labels=ids)
    assert routed.router_logits and routed.aux_loss is not None and float(routed.aux_loss) == 0.0
    torch.testing.assert_close(routed.loss, plain.loss)


def test_off_by_default_and_on_from_the_config():
    ids = tokens(BY_NAME["deepseek_v3"], batch=2)
    default = build("deepseek_v3").train()
    out = default(ids, labels=ids)
    assert out.aux_loss is None and out.router_logits is None
    on = build("deepseek_v3", output_router_logits=True).train()
    routed = on(ids, labels=ids)
    assert routed.aux_loss is not None and routed.aux_loss > 0
    torch.testing.assert_close(routed.loss, out.loss + 0.001 * routed.aux_loss, rtol=1e-6, atol=1e-7)


def test_seq_aux_false_balances_over_the_batch():
    model = build("deepseek_v3", seq_aux=False).train()
    ids = tokens(BY_NAME["deepseek_v3"], batch=2)
    out = model(ids, output_router_logits=True)
    expected = loop_balance_loss([x.detach() for x in out.router_logits], batch=1, top_k=2)
    torch.testing.assert_close(out.aux_loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_releases_without_the_fields_keep_the_switch_loss():
    """GLM-4.5's config.json carries neither `seq_aux` nor `aux_loss_alpha`: its aux_loss stays the Switch loss."""
    case = BY_NAME["glm4_moe"]
    config = hf_archs.config_from_official(case.official_config())
    assert not hasattr(config, "seq_aux")
    model = randomize(hf_archs.ARCHITECTURES["glm4_moe"].causal_lm_class(config)).train()
    ids = tokens(case, batch=2)
    out = model(ids, output_router_logits=True)
    expected = load_balancing_loss(out.router_logits, config.n_routed_experts, config.num_experts_per_tok)
    torch.testing.assert_close(out.aux_loss, expected)
