"""Multi-head latent attention: absorbed decoding against the decompressed reference, the RoPE layout against
transformers' interleaved RoPE, and the cache holding only the latent."""

from __future__ import annotations

import pytest
import torch
from cases import BY_NAME
from helpers import max_rel_diff, ours_from, reference, tokens
from transformers.cache_utils import DynamicCache

from hf_archs.layers import RotaryEmbedding
from hf_archs.layers.attention import eager_attention
from hf_archs.layers.mla import (
    LatentCacheLayer,
    MultiHeadLatentAttention,
    deinterleave,
    joint_view,
)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def _block(q_lora_rank: int | None, seed: int = 0) -> tuple[MultiHeadLatentAttention, RotaryEmbedding]:
    torch.manual_seed(seed)
    attn = MultiHeadLatentAttention(hidden_size=48, num_heads=3, kv_lora_rank=20, qk_nope_head_dim=12,
                                    qk_rope_head_dim=8, v_head_dim=10, layer_idx=0, q_lora_rank=q_lora_rank)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if p.dim() == 1 else 0.0))
    return attn.eval(), RotaryEmbedding(8, YARN)


def _causal(q_len: int, kv_len: int) -> torch.Tensor:
    """Additive mask [1, 1, q, kv] for queries that are the last q_len of kv_len positions."""
    keep = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    return torch.zeros(q_len, kv_len).masked_fill(~keep, torch.finfo(torch.float32).min)[None, None]


def _run(attn, rope, x, positions, absorb, cache=None, mask="causal"):
    past = 0 if cache is None else cache.get_seq_length(0)
    m = _causal(x.shape[1], past + x.shape[1]) if mask == "causal" else mask
    return attn(x, rope(x, positions), m, cache=cache, attention_fn=eager_attention, mla_absorb=absorb)


@pytest.mark.parametrize("q_lora_rank", [None, 16], ids=["no_q_lora", "q_lora"])
def test_absorbed_equals_decompressed_prefill_and_decode(q_lora_rank):
    attn, rope = _block(q_lora_rank)
    x = torch.randn(2, 11, 48)
    pos = torch.arange(11)[None].expand(2, -1)
    with torch.no_grad():
        full = _run(attn, rope, x, pos, absorb=False)
        assert max_rel_diff(_run(attn, rope, x, pos, absorb=True), full) <= 1e-5
        # absorbed with no mask builds its own causal mask (sdpa masks are skipped for plain causal prompts)
        assert max_rel_diff(_run(attn, rope, x, pos, absorb=True, mask=None), full) <= 1e-5
        for absorb in (True, False):  # prompt of 4, then one token, then a chunk of 3, then single tokens
            cache, outs, t = DynamicCache(), [], 0
            for n in (4, 1, 3, 1, 1, 1):
                outs.append(_run(attn, rope, x[:, t:t + n], pos[:, t:t + n], absorb, cache=cache))
                t += n
            assert max_rel_diff(torch.cat(outs, dim=1), full) <= 1e-5, f"absorb={absorb}"


def test_absorbed_decoding_never_expands_the_history():
    attn, rope = _block(16)
    calls = []
    attn.kv_b_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    cache, x = DynamicCache(), torch.randn(1, 9, 48)
    with torch.no_grad():
        _run(attn, rope, x[:, :8], torch.arange(8)[None], absorb="auto", cache=cache)  # prompt: decompressed
        assert calls == [torch.Size([1, 1, 8, 20])]
        _run(attn, rope, x[:, 8:], torch.tensor([[8]]), absorb="auto", cache=cache)  # decode: absorbed
    assert len(calls) == 1, "kv_b_proj ran on the cached latents during decoding"
    assert attn.use_absorbed(past=8, q_len=1) and not attn.use_absorbed(past=0, q_len=8)


def test_rope_layout_matches_transformers_interleaved_rope():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        apply_rotary_pos_emb_interleave,
    )

    rope = RotaryEmbedding(8, YARN)
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
    cos, sin = rope(q, torch.arange(5)[None].expand(2, -1))
    ref_q, ref_k = apply_rotary_pos_emb_interleave(q, k, cos, sin)
    attn, _ = _block(None)
    assert torch.equal(attn._rope(q, cos, sin), ref_q) and torch.equal(attn._rope(k, cos, sin), ref_k)
    assert torch.equal(deinterleave(torch.arange(6.0)), torch.tensor([0.0, 2, 4, 1, 3, 5]))


@pytest.mark.parametrize("name", ["deepseek_v3", "kimi_k2"])
def test_model_cache_holds_only_the_latent_and_decoding_absorbed_equals_decompressed(name):
    case = BY_NAME[name]
    ours = ours_from(case, reference(case))
    c = ours.config
    ids = tokens(case, batch=2)
    with torch.no_grad():
        out = ours(ids[:, :10], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(10, ids.shape[1]):
            out = ours(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        plain = ours(ids[:, :10], use_cache=True, mla_absorb=False)
        cache2, steps2 = plain.cache, [plain.logits]
        for t in range(10, ids.shape[1]):
            plain = ours(ids[:, t:t + 1], cache=cache2, use_cache=True, mla_absorb=False)
            steps2.append(plain.logits)
    assert max_rel_diff(torch.cat(steps, 1), torch.cat(steps2, 1)) <= 1e-5
    seq = ids.shape[1]
    assert len(cache.layers) == c.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == (2, 1, seq, c.kv_lora_rank) and layer.values.shape == (2, 1, seq, c.qk_rope_head_dim)
    used = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    analytic = c.num_hidden_layers * 2 * seq * (c.kv_lora_rank + c.qk_rope_head_dim) * 4  # fp32
    assert used == analytic
    # what is allocated: one [b, 1, capacity, r + d_rope] storage per layer, capacity = seq rounded up to a chunk
    assert all(isinstance(layer, LatentCacheLayer) for layer in cache.layers)
    chunk = LatentCacheLayer.chunk
    allocated = sum(layer.keys.untyped_storage().nbytes() for layer in cache.layers)
    assert allocated == analytic // seq * (-(-seq // chunk) * chunk)


def test_generate_decodes_absorbed_by_default():
    case = BY_NAME["deepseek_v3"]
    ours = ours_from(case, reference(case))
    seen = []
    for m in ours.modules():
        if isinstance(m, MultiHeadLatentAttention):
            def record(mod, args, kwargs, out):
                cache, q_len = args[3] if len(args) > 3 else kwargs["cache"], args[0].shape[1]
                seen.append(mod.use_absorbed(cache.get_seq_length(mod.layer_idx) - q_len, q_len))
            m.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        ours.generate(tokens(case, length=6), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    layers = ours.config.num_hidden_layers
    assert seen == [False] * layers + [True] * 3 * layers  # prompt decompressed, the 3 decoding steps absorbed


def test_latent_cache_layer_appends_in_place_and_adopts_reassigned_tensors():
    from transformers.cache_utils import DynamicLayer

    ours, plain = LatentCacheLayer(), DynamicLayer()
    gen = torch.Generator().manual_seed(0)

    def both(fn):
        for layer in (ours, plain):
            fn(layer)
        assert torch.equal(ours.keys, plain.keys) and torch.equal(ours.values, plain.values)

    steps = [(torch.randn(2, 1, n, 6, generator=gen), torch.randn(2, 1, n, 3, generator=gen)) for n in (5, 1, 3, 1)]
    both(lambda layer: layer.update(*steps[0]))
    storage = ours.keys.data_ptr()
    both(lambda layer: layer.update(*steps[1]))
    assert ours.keys.data_ptr() == storage  # appended in place, no concatenation
    assert joint_view(ours.keys, ours.values) is not None and joint_view(plain.keys, plain.values) is None
    both(lambda layer: layer.crop(-2))  # speculative decoding rolls back
    both(lambda layer: layer.update(*steps[2]))
    assert ours.keys.data_ptr() == storage and ours.get_seq_length() == 7
    both(lambda layer: layer.batch_select_indices(torch.tensor([1])))  # reassigns keys / values
    both(lambda layer: layer.update(steps[3][0][1:], steps[3][1][1:]))  # adopted into fresh storage
    assert ours.keys.shape == (1, 1, 8, 6)


@pytest.mark.parametrize("length", [300, 512, 600, 1030])
def test_blocked_scores_equal_one_matmul(length):
    from hf_archs.layers.mla import blocked_scores

    torch.manual_seed(0)
    q, keys = torch.randn(2, 16, 576), torch.randn(2, length, 576)
    torch.testing.assert_close(blocked_scores(q, keys), torch.bmm(q, keys.transpose(1, 2)), rtol=1e-5, atol=1e-4)
    strided = torch.randn(2, length, 600)[..., :576]  # a view with a row stride wider than its width (joint_view)
    torch.testing.assert_close(blocked_scores(q, strided), torch.bmm(q, strided.transpose(1, 2)), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_one_token_fused_pass_equals_two_pass(dtype, mask_kind):
    """A single decoded token attends its history in one sdpa pass over the joint cache rows; it must equal the
    two-pass form (scores, softmax, probabilities applied to the latents), padding masks and a batch whose rows sit
    in a storage wider than the cached length included."""
    attn, _ = _block(16)
    attn = attn.to(dtype)
    torch.manual_seed(1)
    b, h, T, r, d_rope = 2, 3, 300, 20, 8
    storage = torch.randn(b, 1, 512, r + d_rope, dtype=dtype)  # capacity 512 > T: strided like a LatentCacheLayer
    latent, k_rot = storage[..., :T, :r], storage[..., :T, r:]
    joint = joint_view(latent, k_rot)
    assert joint is not None and not joint.is_contiguous()
    q = torch.randn(b, h, r + d_rope, dtype=dtype)
    keep = torch.ones(b, 1, 1, T, dtype=torch.bool)
    keep[0, ..., :37] = False  # row 0 left-padded by 37 tokens
    mask = {"none": None, "bool": keep,
            "additive": torch.zeros(b, 1, 1, T, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)}[mask_kind]
    with torch.no_grad():
        fused = attn._one_token_fused(q, joint, mask)
        two = attn._two_pass(q, latent, k_rot, joint, mask, h, 1)
    assert fused.shape == two.shape == (b, h, r)
    assert max_rel_diff(fused.float(), two.float()) <= (1e-5 if dtype == torch.float32 else 2e-2)
    if mask_kind != "none":  # the padded positions really are ignored: changing them changes nothing
        storage[0, ..., :37, :] = 1e3
        with torch.no_grad():
            assert torch.equal(attn._one_token_fused(q, joint, mask), fused)
