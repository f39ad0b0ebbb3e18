"""Release formats that are not HF layout: a tiny synthetic release in the publisher's exact layout, built from a
reference model with random weights, loads with the reference's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import hf_archs
from cases import BY_NAME
from helpers import max_rel_diff, reference, tokens


def _to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Mistral's native interleaved pairs (the inverse of the converter's permute)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_mistral_native(ref: torch.nn.Module, text: dict, root) -> None:
    renames = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2"}
    out = {}
    for key, value in ref.state_dict().items():
        if key in renames:
            out[renames[key]] = value
            continue
        _, _, i, rest = key.split(".", 3)
        module, leaf = rest.rsplit(".", 1)
        if module == "self_attn.q_proj":
            value = _to_interleaved(value, text["num_attention_heads"])
        elif module == "self_attn.k_proj":
            value = _to_interleaved(value, text["num_key_value_heads"])
        out[f"layers.{i}.{layer[module]}.{leaf}"] = value
    # The vision tower and adapter of the multimodal release (skipped by the declared rule).
    out["vision_encoder.patch_conv.weight"] = torch.randn(8, 3, 2, 2)
    out["vision_encoder.transformer.layers.0.attention.wq.weight"] = torch.randn(8, 8)
    out["vision_language_adapter.w_in.weight"] = torch.randn(64, 8)
    out["pre_mm_projector_norm.weight"] = torch.ones(8)
    save_file({k: v.contiguous() for k, v in out.items()}, root / "consolidated.safetensors")
    params = {"dim": text["hidden_size"], "n_layers": text["num_hidden_layers"], "head_dim": text["head_dim"],
              "hidden_dim": text["intermediate_size"], "n_heads": text["num_attention_heads"],
              "n_kv_heads": text["num_key_value_heads"], "rope_theta": text["rope_theta"],
              "norm_eps": text["rms_norm_eps"], "vocab_size": text["vocab_size"],
              "sliding_window": text.get("sliding_window"),
              "vision_encoder": {"hidden_size": 8, "num_hidden_layers": 1, "image_token_id": 10}}
    (root / "params.json").write_text(json.dumps(params))


def test_mistral_native_layout_loads_with_the_rope_permutation(tmp_path):
    case = BY_NAME["mistral3"]
    ref = reference(case)
    text = case.official_config()["text_config"]
    write_mistral_native(ref, text, tmp_path)
    model = hf_archs.from_official(tmp_path, attn_implementation="eager")
    assert type(model) is hf_archs.ARCHITECTURES["mistral3"].causal_lm_class
    assert not any("vision" in n for n, _ in model.named_parameters())
    ids = tokens(case)
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5


def test_mistral_native_unknown_tensor_is_named(tmp_path):
    case = BY_NAME["mistral3"]
    text = case.official_config()["text_config"]
    write_mistral_native(reference(case), text, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "consolidated.safetensors")
    tensors["layers.0.attention.wz.weight"] = torch.zeros(2, 2)
    save_file(tensors, tmp_path / "consolidated.safetensors")
    with pytest.raises(hf_archs.CheckpointError, match=r"unexpected tensors: \['layers\.0\.attention\.wz\.weight'\]"):
        hf_archs.from_official(tmp_path)


def test_format_override_and_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown release format 'banana'"):
        hf_archs.from_official(tmp_path, format="banana")
    with pytest.raises(hf_archs.CheckpointError, match="no known release format"):
        hf_archs.from_official(tmp_path)
