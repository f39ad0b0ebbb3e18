"""Kimi Linear beyond the contract: the release's 1-based layer lists, NoPE, decoding after a prefill of many
chunks, packed documents, and bf16 bit-exactness with transformers everywhere outside the KDA kernel."""

from __future__ import annotations

import pytest
import torch

import hf_archs
from cases import BY_NAME  # first: importing cases imports every case module
from case_kimi_linear import bf16_reference_kernels  # noqa: I001
from helpers import max_rel_diff, ours_from, reference, tokens

CASE = BY_NAME["kimi_linear"]
CONFIG = hf_archs.ARCHITECTURES["kimi_linear"].config_class


def _base() -> dict:
    return {k: v for k, v in CASE.official_config().items() if k not in ("model_type", "architectures")}


def test_release_lists_are_one_based():
    c = CONFIG()  # the 48B-A3B release: full_attn_layers [4, 8, ..., 24, 27] (1-based)
    full = [i for i, t in enumerate(c.layer_types) if t == "full_attention"]
    assert full == [3, 7, 11, 15, 19, 23, 26]
    assert c.layer_types.count("linear_attention") == 20
    assert c.mlp_layer_types == ["dense"] + ["sparse"] * 26
    # transformers' default plan (no lists) would put full attention on layers 4, 8, ... (0-based): not the release
    import transformers

    default = transformers.KimiLinearConfig(num_hidden_layers=27).layer_types
    assert [i for i, t in enumerate(default) if t == "full_attention"] != full
    tiny = hf_archs.config_from_official(CASE.official_config())
    assert tiny.layer_types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def test_bad_layer_lists_are_refused():
    lac = _base()["linear_attn_config"]
    with pytest.raises(hf_archs.ConfigError, match=r"out of range: \[5\]"):
        CONFIG(**dict(_base(), linear_attn_config=dict(lac, kda_layers=[1, 3, 5])))
    with pytest.raises(hf_archs.ConfigError, match=r"in both: \[3\]"):
        CONFIG(**dict(_base(), linear_attn_config=dict(lac, full_attn_layers=[2, 3, 4])))
    with pytest.raises(hf_archs.ConfigError, match=r"in neither: \[3\]"):
        CONFIG(**dict(_base(), linear_attn_config=dict(lac, kda_layers=[1])))
    with pytest.raises(hf_archs.ConfigError, match="layer_types disagrees with linear_attn_config"):
        CONFIG(**dict(_base(), layer_types=["linear_attention"] * 4))
    with pytest.raises(hf_archs.ConfigError, match="mla_use_nope=False"):
        CONFIG(**dict(_base(), mla_use_nope=False))
    with pytest.raises(hf_archs.ConfigError, match="moe_router_activation_func='softmax'"):
        CONFIG(**dict(_base(), moe_router_activation_func="softmax"))
    # the release's 27-layer lists do not fit a 4-layer model: refused, never guessed
    with pytest.raises(hf_archs.ConfigError, match="linear_attn_config must list each layer 1..4"):
        CONFIG(**{k: v for k, v in _base().items() if k != "linear_attn_config"})


def test_defaults_have_the_release_shapes():
    with torch.device("meta"):
        model = hf_archs.ARCHITECTURES["kimi_linear"].causal_lm_class(CONFIG())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kda_layer_, mla = "model.layers.0.self_attn.", "model.layers.3.self_attn."
    assert shapes[kda_layer_ + "q_proj.weight"] == (4096, 2304)
    assert shapes[kda_layer_ + "q_conv1d.weight"] == (4096, 1, 4)
    assert shapes[kda_layer_ + "f_a_proj.weight"] == (128, 2304)
    assert shapes[kda_layer_ + "f_b_proj.weight"] == (4096, 128)
    assert shapes[kda_layer_ + "dt_bias"] == (4096,)
    assert shapes[kda_layer_ + "A_log"] == (1, 1, 32, 1)
    assert shapes[kda_layer_ + "b_proj.weight"] == (32, 2304)
    assert shapes[kda_layer_ + "g_b_proj.weight"] == (4096, 128)
    assert shapes[kda_layer_ + "o_norm.weight"] == (128,)
    assert shapes[mla + "q_proj.weight"] == (6144, 2304)
    assert shapes[mla + "kv_a_proj_with_mqa.weight"] == (576, 2304)
    assert shapes[mla + "kv_b_proj.weight"] == (8192, 512)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (9216, 2304)
    assert shapes["model.layers.1.block_sparse_moe.gate.weight"] == (256, 2304)
    assert shapes["model.layers.1.block_sparse_moe.gate.e_score_correction_bias"] == (256,)
    assert shapes["model.layers.1.block_sparse_moe.shared_experts.down_proj.weight"] == (2304, 1024)


def test_no_positional_embedding_anywhere():
    """Logits depend on token order only: shifting every position id changes nothing (the MLA layers are NoPE)."""
    ref = reference(CASE)
    ours = ours_from(CASE, ref)
    ids = tokens(CASE)
    shifted = torch.arange(ids.shape[1])[None] + 1000
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ours(ids, position_ids=shifted).logits)
        assert max_rel_diff(ours(ids, position_ids=shifted).logits, ref(ids).logits) <= 1e-5
    assert len(ours.model.rotary_emb) == 0


def test_decoding_after_a_prefill_of_many_chunks():
    """Prefill 100 tokens (12.5 chunks of 8), then decode one token at a time (recurrent KDA, absorbed MLA) and a
    5-token chunk: equal to one full forward and to transformers'."""
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
    assert cache.layers[0].conv_states[0].shape == (1, 3 * 64, 4)  # [q | k | v] channels, kernel 4


def test_packed_documents_equal_each_alone():
    ours = ours_from(CASE, reference(CASE))
    lengths = [7, 12, 9]
    ids = tokens(CASE, length=sum(lengths), seed=6)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = ours(ids, position_ids=position_ids)
        alone = torch.cat([ours(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    assert packed.cache is None
    assert max_rel_diff(packed.logits, alone) <= 1e-5


def test_bf16_bit_exact_outside_the_kda_kernel():
    """transformers' torch KDA kernels run the same math in another order, so bf16 logits may differ in a last bit
    (the contract's bf16 test cannot hold for a faster kernel). With both models on our kernel, everything else
    (projections, convolutions, gates, norms, NoPE MLA, MoE) must match bit for bit."""
    ref = reference(CASE).to(torch.bfloat16)
    ours = ours_from(CASE, ref).to(torch.bfloat16)
    ids = tokens(CASE, length=40)
    with bf16_reference_kernels(), torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
