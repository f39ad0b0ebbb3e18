"""Llama 4 beyond the contract: sparse experts vs a dense computation, chunked attention and its cache, the NoPE
attention temperature at positions past a small floor_scale, and the config plans against transformers'."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import hf_archs
from cases import BY_NAME, SEQ_LEN, Case
from case_llama4 import text_config
from helpers import max_rel_diff, ours_from, randomize, reference, tokens
from hf_archs.models.llama4 import HfaLlama4Config
from hf_archs.models.llama4.modeling_llama4 import Llama4MoE

CASE = BY_NAME["llama4"]

def variant(**text_overrides) -> Case:
    """The contract's case with some text_config fields changed."""
    official = copy.deepcopy(CASE.official)
    official["text_config"].update(text_overrides)
    return dataclasses.replace(CASE, official=official)


# A NoPE temperature that changes every 4 positions: 1 + 0.1 * log(1 + floor((pos + 1) / 4)).
TEMPERATURE = variant(floor_scale=4)


def _moe(num_experts: int, top_k: int) -> Llama4MoE:
    config = HfaLlama4Config(vocab_size=32, hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             num_local_experts=num_experts, num_experts_per_tok=top_k)
    torch.manual_seed(0)
    return randomize(Llama4MoE(config)).eval()


def _dense_moe(moe: Llama4MoE, x: torch.Tensor) -> torch.Tensor:
    """Every token through every expert, its input scaled by its routing score (0 where not routed)."""
    logits = x @ moe.router.weight.T  # [T, E]
    top, idx = logits.topk(moe.router.rule.keywords["top_k"], dim=-1)
    score = torch.zeros_like(logits).scatter(1, idx, torch.sigmoid(top))  # [T, E]
    out = moe.shared_expert.down_proj(F.silu(moe.shared_expert.gate_proj(x)) * moe.shared_expert.up_proj(x))
    for e in range(logits.shape[1]):
        gate, up = ((x * score[:, e:e + 1]) @ moe.experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = out + (F.silu(gate) * up) @ moe.experts.down_proj[e]
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_sparse_experts_equal_a_dense_computation(top_k, monkeypatch):
    moe = _moe(num_experts=8, top_k=top_k)
    x = torch.randn(3, 10, 32)
    rows = []
    forward = moe.experts.expert_forward
    monkeypatch.setattr(moe.experts, "expert_forward", lambda h, e: rows.append((e, h.shape[0])) or forward(h, e))
    with torch.no_grad():
        sparse = moe(x).reshape(-1, 32)
        dense = _dense_moe(moe, x.reshape(-1, 32))
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    # Only the routed tokens went through each expert: one row per (token, choice), none for the others.
    _, _, idx = moe.router(x.reshape(-1, 32))
    counts = torch.bincount(idx.reshape(-1), minlength=8).tolist()
    assert sum(n for _, n in rows) == 30 * top_k
    assert dict(rows) == {e: n for e, n in enumerate(counts) if n}


def test_moe_block_equals_transformers():
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    moe = _moe(num_experts=8, top_k=1)
    ref = Llama4TextMoe(text_config(dict(text_config=dict(CASE.official["text_config"], hidden_size=32,
                                                          intermediate_size=16, num_local_experts=8)))).eval()
    ref.load_state_dict(moe.state_dict(), strict=True)
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), ref(x)[0].reshape(2, 12, 32), rtol=1e-5, atol=1e-6)


def test_chunked_layers_see_only_their_chunk():
    # All layers chunked: a token changes nothing in later chunks.
    case = variant(no_rope_layers=[1, 1, 1, 1])
    ours = ours_from(case, reference(case))
    assert set(ours.config.layer_types) == {"chunked_attention"}
    ids = tokens(case)
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 100 + 3
    with torch.no_grad():
        a, b = ours(ids).logits, ours(changed).logits
    chunk = ours.config.attention_chunk_size
    assert not torch.equal(a[:, 2:chunk], b[:, 2:chunk])
    assert torch.equal(a[:, chunk:], b[:, chunk:])


@pytest.mark.parametrize("case", [CASE, TEMPERATURE], ids=["floor_scale_25", "floor_scale_4"])
def test_greedy_generation_past_chunk_boundaries_equals_the_full_forward(case):
    ours = ours_from(case, reference(case))
    ours.generation_config.eos_token_id = None  # no stopping and no min-length suppression: plain argmax
    chunk = ours.config.attention_chunk_size
    out = ours.generate(tokens(case, length=5), max_new_tokens=3 * chunk, do_sample=False, pad_token_id=0,
                        return_dict_in_generate=True)
    seq = out.sequences
    with torch.no_grad():
        full = ours(seq).logits
    assert torch.equal(full[0, 4:-1].argmax(-1), seq[0, 5:])
    # The chunked layers' cache keeps only the chunk window; the global (NoPE) layers keep everything.
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    for kind, layer in zip(ours.config.layer_types, cache.layers):
        kept = layer.keys.shape[-2]
        assert kept == (chunk - 1 if kind == "chunked_attention" else seq.shape[1] - 1)


def test_temperature_tuning_matches_transformers_past_floor_scale():
    ref = reference(TEMPERATURE)
    ours = ours_from(TEMPERATURE, ref)
    ids = tokens(TEMPERATURE, batch=2)  # positions 0..23: six temperature steps
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
        assert max_rel_diff(a, b) <= 1e-5
        # Not vacuous: without the temperature the logits differ.
        untuned = ours_from(variant(floor_scale=4, attn_temperature_tuning=False), ref)(ids).logits
        assert max_rel_diff(untuned, b) > 1e-3
    ref16, ours16 = ref.to(torch.bfloat16), ours_from(TEMPERATURE, ref).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours16(ids).logits, ref16(ids).logits)


def test_temperature_tuning_cached_and_generated_as_transformers():
    ref = reference(TEMPERATURE)
    ours = ours_from(TEMPERATURE, ref)
    ids = tokens(TEMPERATURE)
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :3], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(3, SEQ_LEN):
            out = ours(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    assert max_rel_diff(torch.cat(steps, dim=1), full) <= 1e-5
    kw = dict(max_new_tokens=SEQ_LEN, min_new_tokens=SEQ_LEN, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids[:, :6], **kw), ref.generate(ids[:, :6], **kw))


def test_temperature_follows_position_ids_in_left_padded_batches():
    # transformers takes the temperature from the unpadded index, so a left-padded row differs from the same
    # sequence alone; ours reads the position ids (as generate builds them from the mask) and does not.
    ours = ours_from(TEMPERATURE, reference(TEMPERATURE))
    long, short = tokens(TEMPERATURE, seed=2)[0], tokens(TEMPERATURE, length=SEQ_LEN - 7, seed=3)[0]
    pad = SEQ_LEN - short.numel()
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask, position_ids=position_ids).logits
        assert max_rel_diff(batch[0], ours(long[None]).logits[0]) <= 1e-5
        assert max_rel_diff(batch[1, pad:], ours(short[None]).logits[0]) <= 1e-5
    # Generation builds the position ids from the mask: each row of a left-padded batch as if alone.
    prompts = [tokens(TEMPERATURE, length=8, seed=4)[0], tokens(TEMPERATURE, length=5, seed=5)[0]]
    ids = torch.stack([prompts[0], torch.cat([torch.zeros(3, dtype=torch.long), prompts[1]])])
    mask = (torch.arange(8) >= torch.tensor([[0], [3]])).long()
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        together = ours.generate(ids, attention_mask=mask, **kw)[:, 8:]
        for row, prompt in enumerate(prompts):
            assert torch.equal(together[row], ours.generate(prompt[None], **kw)[0, prompt.numel():])


def test_maverick_layout_matches_transformers():
    # Maverick: no QK-norm, plain RoPE (rope_scaling null), dense layers between the MoE ones.
    case = variant(use_qk_norm=False, rope_scaling=None, no_rope_layers=[1, 0, 1, 0])
    ref = reference(case)
    ours = ours_from(case, ref)
    assert ours.config.rope_parameters["rope_type"] == "default"
    ids = tokens(case, batch=2)
    with torch.no_grad():
        assert max_rel_diff(ours(ids).logits, ref(ids).logits) <= 1e-5


def test_text_only_release_loads(tmp_path):
    ref = reference(CASE)
    ref.save_pretrained(tmp_path)  # model_type llama4_text, keys model.* / lm_head.*
    model = hf_archs.from_official(tmp_path, attn_implementation="eager")
    ids = tokens(CASE)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5


@pytest.mark.parametrize("fields", [
    {},  # Scout
    dict(interleave_moe_layer_step=2, use_qk_norm=False),  # Maverick
    dict(num_hidden_layers=6, no_rope_layer_interval=3, attention_chunk_size=None),
    dict(num_hidden_layers=5, moe_layers=[0, 4], no_rope_layers=[0, 1, 1, 1, 0]),
])
def test_layer_plans_match_transformers(fields):
    from transformers import Llama4TextConfig

    ours, theirs = HfaLlama4Config(**fields), Llama4TextConfig(**fields)
    assert ours.layer_types == theirs.layer_types
    assert ours.no_rope_layers == theirs.no_rope_layers
    assert ours.mlp_layer_types == ["sparse" if i in theirs.moe_layers else "dense"
                                    for i in range(theirs.num_hidden_layers)]
    rope_layers = [i for i in range(ours.num_hidden_layers) if ours.layer_uses_rope(i)]
    assert rope_layers == [i for i, r in enumerate(theirs.no_rope_layers[:theirs.num_hidden_layers]) if r]


def test_scout_defaults():
    c = HfaLlama4Config()
    assert c.layer_types[:4] == ["chunked_attention"] * 3 + ["full_attention"]
    assert c.mlp_layer_types == ["sparse"] * 48 and c.num_local_experts == 16
    assert c.rope_parameters["rope_type"] == "llama3" and c.rope_parameters["factor"] == 16.0
    assert c.eos_token_id == [200001, 200007, 200008]
    assert HfaLlama4Config(attn_temperature_tuning=4).attn_temperature_tuning == 4  # the releases' value


@pytest.mark.parametrize("fields, message", [
    (dict(num_hidden_layers=4, no_rope_layers=[1, 1, 0]), "no_rope_layers has 3 entries but num_hidden_layers is 4"),
    (dict(num_hidden_layers=2, no_rope_layers=[1, 2]), r"no_rope_layers entries must be 0 \(NoPE\) or 1"),
    (dict(num_hidden_layers=2, moe_layers=[0, 2]), r"moe_layers has indices \[2\] outside \[0, 2\)"),
    (dict(num_hidden_layers=2, mlp_layer_types=["dense", "dense"]), "mlp_layer_types .* disagrees with moe_layers"),
    (dict(num_hidden_layers=2, attention_chunk_size=None, layer_types=["chunked_attention"] * 2),
     "chunked_attention layers but attention_chunk_size is not set"),
    (dict(num_local_experts=4, num_experts_per_tok=5), r"num_experts_per_tok \(5\) must be between 1 and"),
    (dict(interleave_moe_layer_step=0), "interleave_moe_layer_step must be a positive integer"),
])
def test_bad_llama4_configs_are_refused(fields, message):
    with pytest.raises(hf_archs.ConfigError, match=message):
        HfaLlama4Config(**fields)
