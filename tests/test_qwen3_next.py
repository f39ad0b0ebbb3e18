"""Qwen3-Next beyond the contract: the release's plans and defaults, its MTP layer, decoding after a prefill of many
chunks, packed documents, and bf16 bit-exactness with transformers everywhere outside the DeltaNet kernel."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cases import BY_NAME  # first: importing cases imports every case module
from case_qwen3_next import MTP_NAMES, bf16_reference_kernels, write_release  # noqa: I001
from helpers import max_rel_diff, ours_from, reference, tokens

import hf_archs

CASE = BY_NAME["qwen3_next"]


def test_defaults_are_the_80b_release():
    c = hf_archs.ARCHITECTURES["qwen3_next"].config_class()
    assert c.layer_types == ["linear_attention"] * 3 + ["full_attention"] + c.layer_types[4:]
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == list(range(3, 48, 4))
    assert c.mlp_layer_types == ["sparse"] * 48
    assert c.rope_parameters["rope_theta"] == 1e7 and c.rope_parameters["partial_rotary_factor"] == 0.25
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.shared_expert_intermediate_size) == (
        512, 10, 512, 512)
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_conv_kernel_dim) == (
        16, 32, 128, 4)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2048, 16, 2, 256)
    with torch.device("meta"):
        model = hf_archs.ARCHITECTURES["qwen3_next"].causal_lm_class(c)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # the release's shapes (../shared/docs/official-releases.md section 13)
    assert shapes["model.layers.0.linear_attn.in_proj_qkvz.weight"] == (12288, 2048)
    assert shapes["model.layers.0.linear_attn.in_proj_ba.weight"] == (64, 2048)
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == (8192, 1, 4)
    assert shapes["model.layers.0.linear_attn.norm.weight"] == (128,)
    assert shapes["model.layers.0.linear_attn.out_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (8192, 2048)
    assert shapes["model.layers.3.self_attn.o_proj.weight"] == (2048, 4096)
    assert shapes["model.layers.3.mlp.shared_expert_gate.weight"] == (1, 2048)
    assert shapes["mtp.layers.0.eh_proj.weight"] == (2048, 4096)


def test_plans_from_the_release_fields():
    base = {k: v for k, v in CASE.official_config().items() if k not in ("model_type", "architectures")}
    c = hf_archs.config_from_official(dict(CASE.official_config(), num_hidden_layers=8, full_attention_interval=2))
    assert c.layer_types == ["linear_attention", "full_attention"] * 4
    assert c.mlp_layer_types[:3] == ["sparse", "dense", "sparse"]  # mlp_only_layers [1]
    config_class = hf_archs.ARCHITECTURES["qwen3_next"].config_class
    with pytest.raises(hf_archs.ConfigError, match=r"linear_num_value_heads \(3\) must be a multiple"):
        config_class(**dict(base, linear_num_value_heads=3))
    with pytest.raises(hf_archs.ConfigError, match="linear_attn_mode must be one of"):
        config_class(**dict(base, linear_attn_mode="fast"))
    with pytest.raises(hf_archs.ConfigError, match="full_attention_interval must be a positive integer"):
        config_class(**dict(base, full_attention_interval=0))


def test_release_mtp_tensors_load_into_the_mtp_layer(tmp_path):
    ref = reference(CASE)
    write_release(ref, CASE.official_config(), tmp_path)
    release = load_file(tmp_path / "model.safetensors")
    model = hf_archs.from_official(tmp_path, attn_implementation="eager")
    state = model.state_dict()
    for name, ours in MTP_NAMES.items():
        assert torch.equal(state[f"mtp.{ours}"], release[f"mtp.{name}"]), name
    assert torch.equal(state["mtp.layers.0.self_attn.q_proj.weight"], release["mtp.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(state["mtp.layers.0.mlp.experts.gate_up_proj"][3, :32],
                       release["mtp.layers.0.mlp.experts.3.gate_proj.weight"])
    assert not any(k.startswith("model.layers.4") for k in state)  # the decoder keeps its 4 layers


def test_mtp_loss_trains_the_mtp_layer():
    model = ours_from(CASE, reference(CASE)).train()
    ids = tokens(CASE, batch=2)
    out = model(ids, labels=ids)
    plain = model(ids, labels=ids, mtp_loss_weight=0.0)
    assert out.mtp_loss is not None and torch.isfinite(out.mtp_loss)
    torch.testing.assert_close(out.loss, plain.loss + model.config.mtp_loss_weight * out.mtp_loss)
    out.loss.backward()
    assert model.mtp.layers[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.mtp.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match="use_mtp=True"):
        model.generate(ids[:, :4], max_new_tokens=2, use_mtp=True)


def test_decoding_after_a_prefill_of_many_chunks():
    """Prefill 100 tokens (12.5 chunks of 8, through the chunked path from a fresh state), then decode one token at a
    time (the recurrent path) and in a 5-token chunk: equal to one full forward and to transformers'."""
    ref = reference(CASE)
    ours = ours_from(CASE, ref)
    ids = tokens(CASE, length=116, seed=5)
    with torch.no_grad():
        full = ours(ids).logits
        theirs = ref(ids).logits
        out = ours(ids[:, :100], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(100, 111):
            out = ours(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        steps.append(ours(ids[:, 111:], cache=cache, use_cache=True).logits)
    assert max_rel_diff(full, theirs) <= 1e-5
    assert max_rel_diff(torch.cat(steps, dim=1), full) <= 1e-5
    linear = [i for i, t in enumerate(ours.config.layer_types) if t == "linear_attention"]
    assert all(cache.layers[i].conv_states[0].shape[-1] == 4 for i in linear)


def test_packed_documents_equal_each_alone():
    ours = ours_from(CASE, reference(CASE))
    lengths = [7, 12, 9]
    ids = tokens(CASE, length=sum(lengths), seed=6)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = ours(ids, position_ids=position_ids)
        alone = torch.cat([ours(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    assert packed.cache is None  # a packed batch runs without a cache
    assert max_rel_diff(packed.logits, alone) <= 1e-5
    with torch.no_grad():
        cache = ours(ids[:, :5], use_cache=True).cache
        with pytest.raises(hf_archs.InputError, match="packed sequences"):
            ours(ids, position_ids=position_ids, cache=cache)


def test_bf16_bit_exact_outside_the_deltanet_kernel():
    """transformers' torch DeltaNet kernels run the same math in another order, so bf16 logits may differ in a last
    bit (the contract's bf16 test cannot hold for a faster kernel). With both models on our kernel, everything else
    (projections, conv, gates, norms, gated attention, MoE) must match bit for bit."""
    ref = reference(CASE).to(torch.bfloat16)
    ours = ours_from(CASE, ref).to(torch.bfloat16)
    ids = tokens(CASE, length=40)
    with bf16_reference_kernels(), torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
