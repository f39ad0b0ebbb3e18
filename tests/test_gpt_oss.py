"""gpt-oss checks the contract suite does not make: the config against the published one and transformers', the
router rule's numerics, the experts' layout against transformers' GptOssExperts, sdpa against transformers' eager
model, a bf16 release, and an MXFP4 release (the Hub root's format) loaded as its dequantized values."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

import hf_archs
from cases import BY_NAME, SEQ_LEN
from helpers import max_rel_diff, ours_from, reference, tokens
from hf_archs.layers.moe import Experts, clamped_swiglu, softmax_topk
from hf_archs.models.gpt_oss.modeling_gpt_oss import GptOssSparseBlock, topk_softmax

CASE = BY_NAME["gpt_oss"]
ARCH = hf_archs.ARCHITECTURES["gpt_oss"]

# openai/gpt-oss-120b config.json at the repo root (the HF release), less quantization_config.
HUB_120B = dict(
    architectures=["GptOssForCausalLM"], attention_bias=True, attention_dropout=0.0, eos_token_id=200002,
    experts_per_token=4, head_dim=64, hidden_act="silu", hidden_size=2880, initial_context_length=4096,
    initializer_range=0.02, intermediate_size=2880, max_position_embeddings=131072, model_type="gpt_oss",
    num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=36, num_key_value_heads=8,
    num_local_experts=128, output_router_logits=False, pad_token_id=199999, rms_norm_eps=1e-05,
    rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                  "rope_type": "yarn", "truncate": False},
    rope_theta=150000, router_aux_loss_coef=0.9, sliding_window=128, swiglu_limit=7.0, tie_word_embeddings=False,
    use_cache=True, vocab_size=201088)
MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}


def _fields(cfg: dict) -> dict:
    return {k: v for k, v in copy.deepcopy(cfg).items() if k not in ("model_type", "architectures")}


@pytest.mark.parametrize("layers,experts", [(36, 128), (24, 32)], ids=["120b", "20b"])
def test_hub_config_converts_as_transformers_does(layers, experts):
    cfg = _fields(dict(HUB_120B, num_hidden_layers=layers, num_local_experts=experts))
    ours, theirs = ARCH.config_class(**copy.deepcopy(cfg)), GptOssConfig(**copy.deepcopy(cfg))
    assert ours.rope_parameters == theirs.rope_parameters
    assert ours.layer_types == theirs.layer_types
    assert ours.layer_types[:2] == ["sliding_attention", "full_attention"]
    for name in ("sliding_window", "head_dim", "num_local_experts", "num_experts_per_tok", "swiglu_limit",
                 "swiglu_alpha", "rms_norm_eps", "attention_bias", "tie_word_embeddings", "router_aux_loss_coef"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.mlp_layer_types == ["sparse"] * layers
    again = ARCH.config_class(**_fields(json.loads(ours.to_json_string())))  # what save_pretrained writes
    assert again.rope_parameters == ours.rope_parameters and again.layer_types == ours.layer_types


def test_defaults_are_gpt_oss_120b():
    ours, hub = ARCH.config_class(), ARCH.config_class(**_fields(HUB_120B))
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok", "sliding_window",
                 "layer_types", "rope_parameters", "rms_norm_eps", "max_position_embeddings", "attention_bias",
                 "tie_word_embeddings", "swiglu_limit", "router_aux_loss_coef", "eos_token_id", "pad_token_id"):
        assert getattr(ours, name) == getattr(hub, name), name
    assert ours.rope_parameters == {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                    "truncate": False, "original_max_position_embeddings": 4096,
                                    "rope_theta": 150000.0}


def test_gpt_oss_specific_configs_are_refused():
    base = _fields(CASE.official)
    with pytest.raises(hf_archs.ConfigError, match="sliding_window must be a positive integer"):
        ARCH.config_class(**dict(base, sliding_window=None))
    with pytest.raises(hf_archs.ConfigError, match=r"num_experts_per_tok \(9\) must be in \[1, num_local_experts"):
        ARCH.config_class(**dict(base, num_experts_per_tok=9))
    with pytest.raises(hf_archs.ConfigError, match="mlp_layer_types must be 'sparse'"):
        ARCH.config_class(**dict(base, mlp_layer_types=["dense"] * 4))


def test_topk_then_softmax_equals_softmax_then_renormalised_topk():
    torch.manual_seed(0)
    logits = torch.randn(200, 32) * 4
    w, i = topk_softmax(logits, 4)
    w2, i2 = softmax_topk(logits, 4, norm_topk_prob=True)
    assert torch.equal(i, i2)
    torch.testing.assert_close(w, w2, rtol=1e-6, atol=1e-7)
    # Hand-made: top 2 of [0, 2, 1, -1] are experts 1, 2 with weights softmax([2, 1]).
    w, i = topk_softmax(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), 2)
    assert i.tolist() == [[1, 2]]
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))
    # bf16 weights stay bf16, as the reference runtime computes them.
    assert topk_softmax(logits.bfloat16(), 4)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_block_equals_transformers_router_and_experts(dtype):
    config = hf_archs.config_from_official(CASE.official_config())
    theirs_cfg = GptOssConfig(**_fields(CASE.official))
    torch.manual_seed(0)
    ours = GptOssSparseBlock(config).to(dtype)
    router, experts = GptOssTopKRouter(theirs_cfg).to(dtype), GptOssExperts(theirs_cfg).to(dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.3)
        router.load_state_dict(ours.router.state_dict())
        experts.load_state_dict(ours.experts.state_dict())  # the same layout: [E, H, 2I] interleaved, [E, I, H]
    x = torch.randn(2, 11, config.hidden_size, dtype=dtype) * 2
    flat = x.reshape(-1, config.hidden_size)
    logits, scores, indices = router(flat)
    theirs = experts(flat, indices, scores).reshape(x.shape)
    out = ours(x)
    assert torch.equal(ours.router(flat)[0], logits)
    if dtype == torch.bfloat16:
        assert torch.equal(out, theirs)
    else:
        torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-6)


def test_clamped_swiglu_is_active_and_matches_a_per_expert_loop():
    torch.manual_seed(0)
    experts = Experts(4, 8, 6, glu=clamped_swiglu(1.702, 7.0), transposed=True, interleaved=True, bias=True)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=3.0)  # large enough that both clamps bite
        experts.gate_up_proj_bias.normal_()
        experts.down_proj_bias.normal_()
    x = torch.randn(10, 8) * 2
    gate_up = x @ experts.gate_up_proj[1] + experts.gate_up_proj_bias[1]
    assert (gate_up[:, 0::2] > 7).any() and (gate_up[:, 1::2].abs() > 7).any()
    gate, up = gate_up[:, 0::2].clamp(max=7.0), gate_up[:, 1::2].clamp(-7.0, 7.0)
    ref = (gate * torch.sigmoid(1.702 * gate) * (up + 1)) @ experts.down_proj[1] + experts.down_proj_bias[1]
    torch.testing.assert_close(experts.expert_forward(x, 1), ref, rtol=1e-5, atol=1e-5)


def test_sdpa_matches_transformers_eager_model():
    # transformers refuses sdpa for gpt-oss; ours runs it, equal to transformers' eager model.
    ref = reference(CASE)
    ours = ours_from(CASE, ref, "sdpa")
    ids = tokens(CASE, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        assert max_rel_diff(ours(ids).logits, ref(ids).logits) <= 1e-5
        a = ours(ids, attention_mask=mask).logits[1, 5:]
        b = ref(ids, attention_mask=mask).logits[1, 5:]
        assert max_rel_diff(a, b) <= 1e-5
        kw = dict(max_new_tokens=SEQ_LEN, min_new_tokens=SEQ_LEN, do_sample=False, pad_token_id=0)
        short = tokens(CASE, length=6)
        assert torch.equal(ours.generate(short, **kw), ref.generate(short, **kw))


def test_bf16_release_loads_bit_exact(tmp_path):
    reference(CASE).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt_oss"
    model = hf_archs.from_official(tmp_path, attn_implementation="eager")
    assert type(model) is ARCH.causal_lm_class and model.dtype == torch.bfloat16
    # transformers loading the same release (RoPE frequencies in fp32, as ours after loading).
    ref = GptOssForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ids = tokens(CASE)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _mxfp4(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random MXFP4 storage for a weight [E, out, in]: blocks uint8 [E, out, in / 32, 16] (low nibble = even
    element), scales uint8 [E, out, in / 32] (E8M0), and the exact values they encode, [E, out, in]."""
    codes = torch.randint(0, 16, shape, generator=gen)
    scales = torch.randint(121, 124, (*shape[:-1], shape[-1] // 32), generator=gen)
    values = FP4[codes] * torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    pairs = codes.unflatten(-1, (-1, 16, 2))
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks, scales.to(torch.uint8), values


def test_mxfp4_release_loads_as_its_dequantized_values(tmp_path):
    # The Hub root's layout: experts as `*_blocks` / `*_scales` along the input dimension, quantization_config mxfp4.
    ref = reference(CASE)
    gen = torch.Generator().manual_seed(0)
    e, h, i = 8, CASE.official["hidden_size"], CASE.official["intermediate_size"]
    ref.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    with torch.no_grad():
        for n, layer in enumerate(ref.model.layers):
            for name, (out_dim, in_dim) in {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}.items():
                blocks, scales, values = _mxfp4((e, out_dim, in_dim), gen)
                getattr(layer.mlp.experts, name).copy_(values.transpose(1, 2))  # transformers: [E, in, out]
                key = f"model.layers.{n}.mlp.experts.{name}"
                del tensors[key]
                tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    official = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(official, quantization_config=MXFP4)))
    model = hf_archs.from_official(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ids = tokens(CASE, batch=2)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5
