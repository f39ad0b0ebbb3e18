"""MoE blocks against plain references: routing rules on hand-made logits, fused experts vs a dense loop."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import max_rel_diff

from hf_archs.layers.moe import (
    Experts,
    TopKRouter,
    act_glu,
    clamped_swiglu,
    expert_load,
    load_balancing_loss,
    sigmoid_grouped_topk,
    sigmoid_top1_input_scale,
    softcapped_softmax_topk,
    softmax_topk,
)


def test_softmax_topk_on_hand_made_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    w, i = softmax_topk(logits, 2, norm_topk_prob=False)
    p = torch.softmax(logits, -1)[0]
    assert i.tolist() == [[1, 2]]
    torch.testing.assert_close(w[0], p[[1, 2]])
    w, _ = softmax_topk(logits, 2, norm_topk_prob=True)
    torch.testing.assert_close(w[0], p[[1, 2]] / p[[1, 2]].sum())


def test_sigmoid_grouped_topk_uses_bias_for_choice_only_and_groups():
    logits = torch.tensor([[3.0, 2.9, -1.0, -2.0, 0.5, 0.4, 0.3, 0.2]])
    # Without bias and groups: the two best are experts 0, 1.
    w, i = sigmoid_grouped_topk(logits, 2, norm_topk_prob=False)
    assert sorted(i[0].tolist()) == [0, 1]
    # A large bias on expert 7 changes the choice but not its weight (the unbiased sigmoid score).
    bias = torch.zeros(8)
    bias[7] = 10.0
    w, i = sigmoid_grouped_topk(logits, 2, correction_bias=bias, norm_topk_prob=False)
    chosen = dict(zip(i[0].tolist(), w[0].tolist()))
    assert set(chosen) == {0, 7}
    assert chosen[7] == pytest.approx(torch.sigmoid(torch.tensor(0.2)).item())
    # Groups of 4: group 0 = {0,1,2,3} scores sig(3)+sig(2.9); group 1 = {4..7} scores sig(.5)+sig(.4).
    # Keeping only the best group forbids experts 4..7 even with top_k = 3.
    w, i = sigmoid_grouped_topk(logits, 3, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5)
    assert sorted(i[0].tolist()) == [0, 1, 2]
    assert w.sum().item() == pytest.approx(2.5)


def test_sigmoid_top1_and_softcapped_rules():
    logits = torch.tensor([[0.1, 1.5, -0.3]])
    w, i = sigmoid_top1_input_scale(logits)
    assert i.tolist() == [[1]] and w.item() == pytest.approx(torch.sigmoid(torch.tensor(1.5)).item())
    capped = 30 * torch.tanh(torch.tensor([[60.0, 0.0, -60.0]]) / 30)
    w, i = softcapped_softmax_topk(torch.tensor([[60.0, 0.0, -60.0]]), 2, softcap=30.0)
    torch.testing.assert_close(w, torch.softmax(capped, -1)[:, :2])  # no renormalisation


def test_clamped_swiglu():
    gate, up = torch.tensor([10.0, -3.0]), torch.tensor([-9.0, 0.5])
    out = clamped_swiglu(alpha=1.702, limit=7.0)(gate, up)
    g = torch.tensor([7.0, -3.0])
    torch.testing.assert_close(out, g * torch.sigmoid(1.702 * g) * (torch.tensor([-7.0, 0.5]) + 1))


@pytest.mark.parametrize("transposed,interleaved,bias", [(False, False, False), (True, True, True),
                                                         (True, False, False)])
def test_fused_experts_equal_a_dense_loop(transposed, interleaved, bias):
    torch.manual_seed(0)
    e, h, i, t, k = 6, 8, 5, 11, 2
    glu = clamped_swiglu() if interleaved else act_glu("silu")
    experts = Experts(e, h, i, glu=glu, transposed=transposed, interleaved=interleaved, bias=bias)
    if bias:
        torch.nn.init.normal_(experts.gate_up_proj_bias), torch.nn.init.normal_(experts.down_proj_bias)
    x = torch.randn(t, h, requires_grad=True)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    idx[0] = torch.tensor([5, 5 - 1])  # expert 0 may get no token: fine
    w = torch.rand(t, k)
    out = experts(x, idx, w)
    # Dense reference: every expert on every token, weighted by a one-hot routing matrix.
    dense = torch.stack([experts.expert_forward(x, j) for j in range(e)], 1)  # [t, e, h]
    route = torch.zeros(t, e).scatter_add_(1, idx, w)
    ref = (route[..., None] * dense).sum(1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g_out = torch.autograd.grad(out.sum(), [x, experts.gate_up_proj])
    g_ref = torch.autograd.grad(ref.sum(), [x, experts.gate_up_proj])
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_matches_transformers():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (
        load_balancing_loss_func,
    )

    torch.manual_seed(0)
    logits = tuple(torch.randn(10, 6) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    for m in (None, mask):
        ours = load_balancing_loss(logits, 6, 2, m)
        torch.testing.assert_close(ours, load_balancing_loss_func(logits, 6, 2, m))
    uniform = (torch.zeros(8, 4),)
    assert load_balancing_loss(uniform, 4, 1).item() == pytest.approx(1.0)


def test_expert_load_and_router_module():
    assert expert_load(torch.tensor([[0, 1], [1, 3]]), 4).tolist() == [1, 2, 0, 1]
    router = TopKRouter(8, 4, functools.partial(sigmoid_grouped_topk, top_k=2), correction_bias=True)
    assert "e_score_correction_bias" in router.state_dict()
    router.e_score_correction_bias[3] = 100.0
    logits, w, i = router(torch.randn(2, 5, 8))
    assert logits.shape == (10, 4) and (i == 3).any(dim=-1).all()


def _seeded_experts(dtype: torch.dtype, transposed: bool, interleaved: bool, bias: bool) -> Experts:
    """16 experts, hidden 64, width 32 (seed 0); gpt-oss' clamped SwiGLU when interleaved; random biases."""
    torch.manual_seed(0)
    glu = clamped_swiglu() if interleaved else act_glu("silu")
    experts = Experts(16, 64, 32, glu=glu, transposed=transposed, interleaved=interleaved, bias=bias).to(dtype)
    if bias:
        torch.nn.init.normal_(experts.gate_up_proj_bias), torch.nn.init.normal_(experts.down_proj_bias)
    return experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed,interleaved,bias", [(False, False, False), (True, True, True)])
def test_cpu_grouped_experts_give_the_loop_bits_in_inference(dtype, transposed, interleaved, bias):
    """Without autograd the CPU path runs torch's grouped matmul (when enough experts have tokens): the same bits
    as the per-expert loop; with few experts used, or with gradients, the loop runs."""
    e, h, t, k = 16, 64, 40, 4
    experts = _seeded_experts(dtype, transposed, interleaved, bias)
    x = torch.randn(t, h, dtype=dtype)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    w = torch.rand(t, k, dtype=dtype)
    calls = []
    grouped = experts._grouped
    experts._grouped = lambda *a: calls.append(1) or grouped(*a)  # noqa: E731 (counts the grouped calls)
    with torch.inference_mode():
        fast = experts(x, idx, w)
    assert calls, "the grouped path did not run"
    del experts._grouped
    with torch.inference_mode():
        experts.expert_forward = functools.partial(Experts.expert_forward, experts)  # forces the loop
        loop = experts(x, idx, w)
        del experts.expert_forward
    assert torch.equal(fast, loop)
    calls.clear()
    experts._grouped = lambda *a: calls.append(1) or grouped(*a)  # noqa: E731
    with torch.inference_mode():
        experts(x[:1], idx[:1, :1], w[:1, :1])  # one expert of 16 used: the loop is cheaper
    x.requires_grad_(True)
    experts(x, idx, w).float().sum().backward()  # with autograd: the loop (torch's CPU backward is not used)
    assert not calls and x.grad is not None


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed,interleaved,bias", [(False, False, False), (True, True, True)])
def test_cpu_decoding_rows_go_through_matvec_and_equal_the_loop(transposed, interleaved, bias, dtype, weighted):
    """Decoding in inference (every routed row has its expert to itself): each row through its expert as two
    matrix-vector products, equal to the per-expert loop (to rounding in fp32); not taken when an expert gets two
    rows, past `matvec_rows` rows, or with autograd."""
    e, h, t, k = 16, 64, 3, 4
    experts = _seeded_experts(dtype, transposed, interleaved, bias)
    x = torch.randn(t, h, dtype=dtype)
    idx = torch.randperm(e)[: t * k].view(t, k)  # three tokens, no expert shared
    w = torch.rand(t, k, dtype=dtype) if weighted else None
    calls = []
    matvec = experts.rows_by_matvec

    def recorded(*args):  # whether the matrix-vector path gave the result
        out = matvec(*args)
        calls.append(out is not None)
        return out

    experts.rows_by_matvec = recorded
    with torch.inference_mode():
        fast = experts(x, idx, w)
    assert calls == [True]  # the matrix-vector path gave the result
    with torch.inference_mode():
        experts.expert_forward = functools.partial(Experts.expert_forward, experts)  # forces the loop
        loop = experts(x, idx, w)
        del experts.expert_forward
    assert max_rel_diff(fast.float(), loop.float()) <= (1e-6 if dtype == torch.float32 else 1e-2)
    calls.clear()
    shared = idx.clone()
    shared[1, 0] = shared[0, 0]  # one expert gets two rows: grouped or looped as before
    with torch.inference_mode():
        experts(x, shared, w)
        experts.matvec_rows = t * k - 1
        experts(x, idx, w)  # more rows than matvec_rows
        del experts.matvec_rows
    experts(x.requires_grad_(True), idx, w).float().sum().backward()  # autograd: the loop
    assert not any(calls) and x.grad is not None


@pytest.mark.parametrize("transposed,interleaved", [(False, False), (True, True)])
@pytest.mark.parametrize("routing", ["matvec", "loop"])
def test_weights_in_another_dtype_are_cast_as_the_grouped_path_does(transposed, interleaved, routing):
    """fp32 experts fed bf16 activations (prefill's grouped path casts the weights to the activations' dtype): a
    decoded token (matrix-vector path) and two tokens sharing one expert of 16 (the loop) give the bits of the
    experts cast to bf16, and its dtype, instead of a dtype error."""
    experts = _seeded_experts(torch.float32, transposed, interleaved, bias=False)
    if routing == "matvec":
        x, idx = torch.randn(1, 64, dtype=torch.bfloat16), torch.randperm(16)[:4][None]
    else:
        x, idx = torch.randn(2, 64, dtype=torch.bfloat16), torch.tensor([[5], [5]])
    w = torch.rand(*idx.shape, dtype=torch.bfloat16)
    with torch.inference_mode():
        mixed = experts(x, idx, w)
        cast = _seeded_experts(torch.bfloat16, transposed, interleaved, bias=False)(x, idx, w)
    assert mixed.dtype == torch.bfloat16
    assert torch.equal(mixed, cast)
