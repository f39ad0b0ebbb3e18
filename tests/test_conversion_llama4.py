"""Llama 4's `original/` layout: a tiny synthetic release in Meta's exact model-parallel form (consolidated.NN.pth
shards split as llama-models' checkpoint.py splits them, params.json), built from the llama4 case's reference model,
loads with the reference's logits."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch
from cases import BY_NAME
from helpers import max_rel_diff, randomize, tokens

import hf_archs

# Per rank-count: heads / kv heads / head_dim. Meta's real releases have 8 ranks (8 kv heads, one per rank).
SHAPES = {2: (4, 2, 16), 8: (8, 8, 8)}


def official(tp: int, vocab: int | None = None) -> dict:
    """The llama4 case's config, in the forms params.json can express (NoPE every 4th layer, llama-models' fixed
    8192-token original context for the llama3 RoPE scaling)."""
    off = copy.deepcopy(BY_NAME["llama4"].official)
    heads, kv, head_dim = SHAPES[tp]
    off["text_config"].update(
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, no_rope_layers=[1, 1, 1, 0],
        floor_scale=4, attn_scale=0.1, attn_temperature_tuning=True, rms_norm_eps=1e-6,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    if vocab is not None:
        off["text_config"]["vocab_size"] = vocab
    return off


def params(text: dict) -> dict:
    """params.json (llama-models args.py names) whose size formulas give the case's 96 dense / 32 expert widths:
    dense 4*64 -> 170 -> x0.5 = 85 -> 96 (multiple_of 32); experts 170 -> 85 -> /(2+1) = 28 -> 32."""
    return {"dim": text["hidden_size"], "n_layers": text["num_hidden_layers"], "n_heads": text["num_attention_heads"],
            "n_kv_heads": text["num_key_value_heads"], "vocab_size": text["vocab_size"], "multiple_of": 32,
            "ffn_dim_multiplier": 0.5, "ffn_exp": 4.0, "norm_eps": text["rms_norm_eps"],
            "attention_chunk_size": text["attention_chunk_size"], "rope_theta": text["rope_theta"],
            "use_scaled_rope": True, "rope_scaling_factor": 8.0, "rope_high_freq_factor": 4.0,
            "nope_layer_interval": 4, "use_qk_norm": True, "attn_temperature_tuning": True,
            "floor_scale": text["floor_scale"], "attn_scale": text["attn_scale"],
            "moe_args": {"num_experts": text["num_local_experts"], "capacity_factor": 2.0, "auto_scale_F": True,
                         "top_k": 1, "interleave_moe_layer_step": text["interleave_moe_layer_step"]},
            "vision_args": {"image_size": {"height": 16, "width": 16}, "patch_size": {"height": 4, "width": 4},
                            "dim": 16, "n_layers": 1, "n_heads": 2, "mlp_ratio": 2.0, "output_dim": 16,
                            "pixel_shuffle_ratio": 0.5}}


def reference(tp: int, vocab: int | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(BY_NAME["llama4"].reference(official(tp, vocab)))


def meta_shards(ref: torch.nn.Module, text: dict, n: int) -> list[dict]:
    """The reference's weights as Meta's n model-parallel ranks hold them (llama-models checkpoint.py: column-
    parallel weights split along dim 0, row-parallel along the last dim, wqkv fused per rank, routed experts
    flattened input-major and split along F, the router [D, E] replicated), with the extras real shards carry."""
    sd = ref.state_dict()
    heads, kv, hd, dim = (text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"],
                          text["hidden_size"])
    E = text["num_local_experts"]
    gen = torch.Generator().manual_seed(5)
    vision = {"vision_embeddings.vision_encoder.conv1._linear.weight": torch.randn(16 * n, 48, generator=gen),
              "vision_embeddings.vision_encoder.class_embedding": torch.randn(16, generator=gen),
              "vision_projection.weight": torch.randn(64, 16, generator=gen)}
    shards = [{} for _ in range(n)]
    for r, out in enumerate(shards):
        def col(t: torch.Tensor, r: int = r) -> torch.Tensor:
            return t.chunk(n, dim=0)[r].clone()

        def row(t: torch.Tensor, r: int = r) -> torch.Tensor:
            return t.chunk(n, dim=-1)[r].clone()

        out["tok_embeddings.weight"] = col(sd["model.embed_tokens.weight"])
        out["output.weight"] = col(sd["lm_head.weight"])
        out["norm.weight"] = sd["model.norm.weight"].clone()
        out["rope.freqs"] = torch.randn(hd // 2, generator=gen)
        for i in range(text["num_hidden_layers"]):
            p, m = f"model.layers.{i}.", f"layers.{i}."
            q, k, v = (sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
            assert q.shape[0] == heads * hd and k.shape[0] == kv * hd
            out[m + "attention.wqkv.weight"] = torch.cat([col(q), col(k), col(v)])
            out[m + "attention.wo.weight"] = row(sd[p + "self_attn.o_proj.weight"])
            out[m + "attention.wqkv._extra_state"] = io.BytesIO(b"transformer-engine fp8 meta")
            norm_in, norm_post = sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"]
            if p + "feed_forward.experts.gate_up_proj" in sd:
                out[m + "attention.wqkv.layer_norm_weight"] = norm_in.clone()
                out[m + "feed_forward.norm.weight"] = norm_post.clone()
                gate_up = sd[p + "feed_forward.experts.gate_up_proj"]  # [E, D, 2F]
                F = gate_up.shape[-1] // 2
                gate, up = gate_up[..., :F], gate_up[..., F:]
                out[m + "feed_forward.experts.moe_w_in_eD_F"] = row(gate).reshape(E * dim, -1)
                out[m + "feed_forward.experts.moe_w_swiglu_eD_F"] = row(up).reshape(E * dim, -1)
                down = sd[p + "feed_forward.experts.down_proj"]  # [E, F, D]
                out[m + "feed_forward.experts.moe_w_out_eF_D"] = down.chunk(n, dim=1)[r].reshape(-1, dim).clone()
                out[m + "feed_forward.router_DE"] = sd[p + "feed_forward.router.weight"].t().contiguous()
                out[m + "feed_forward.w_in_shared_FD.weight"] = col(sd[p + "feed_forward.shared_expert.gate_proj.weight"])
                out[m + "feed_forward.w_swiglu_FD.weight"] = col(sd[p + "feed_forward.shared_expert.up_proj.weight"])
                out[m + "feed_forward.w_out_shared_DF.weight"] = row(sd[p + "feed_forward.shared_expert.down_proj.weight"])
                out[m + "feed_forward.global_gate_stats_3E"] = torch.randn(3, E, generator=gen)
            elif i == 0:  # the fused dense form: each rank's fc1 is [w1 slice; w3 slice]
                out[m + "attention.wqkv.layer_norm_weight"] = norm_in.clone()
                out[m + "feed_forward.mlp.layer_norm_weight"] = norm_post.clone()
                out[m + "feed_forward.mlp.fc1_weight"] = torch.cat(
                    [col(sd[p + "feed_forward.gate_proj.weight"]), col(sd[p + "feed_forward.up_proj.weight"])])
                out[m + "feed_forward.mlp.fc2_weight"] = row(sd[p + "feed_forward.down_proj.weight"])
            else:  # the unfused dense form with the plain norm names
                out[m + "attention_norm.weight"] = norm_in.clone()
                out[m + "ffn_norm.weight"] = norm_post.clone()
                out[m + "feed_forward.w1.weight"] = col(sd[p + "feed_forward.gate_proj.weight"])
                out[m + "feed_forward.w3.weight"] = col(sd[p + "feed_forward.up_proj.weight"])
                out[m + "feed_forward.w2.weight"] = row(sd[p + "feed_forward.down_proj.weight"])
        for key, value in vision.items():
            out[key] = value.clone() if value.dim() == 1 else (col(value) if "conv1" in key else value.clone())
    return shards


def write_original(root: Path, tp: int, ref: torch.nn.Module | None = None, vocab: int | None = None
                   ) -> torch.nn.Module:
    ref = ref if ref is not None else reference(tp, vocab)
    text = official(tp, vocab)["text_config"]
    root.mkdir(parents=True, exist_ok=True)
    for r, shard in enumerate(meta_shards(ref, text, tp)):
        torch.save(shard, root / f"consolidated.{r:02d}.pth")
    (root / "params.json").write_text(json.dumps(params(text)))
    return ref


@pytest.mark.parametrize("tp", [2, 8])
def test_original_layout_loads_with_the_reference_logits(tp, tmp_path):
    ref = write_original(tmp_path, tp)
    model = hf_archs.from_official(tmp_path, allow_pickle=True, attn_implementation="eager")
    assert type(model) is hf_archs.ARCHITECTURES["llama4"].causal_lm_class
    assert not any("vision" in n or "projector" in n for n, _ in model.named_parameters())
    cfg = model.config
    assert (cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.no_rope_layers) == (32, 96, [1, 1, 1, 0])
    assert cfg.mlp_layer_types == ["dense", "sparse", "dense", "sparse"]
    ids = tokens(BY_NAME["llama4"])
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.feed_forward.experts.gate_up_proj"],
                       ref.state_dict()["model.layers.1.feed_forward.experts.gate_up_proj"])
    assert torch.equal(sd["model.layers.1.feed_forward.router.weight"],
                       ref.state_dict()["model.layers.1.feed_forward.router.weight"])


def test_convert_original_layout(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_archs.convert import convert

    src = tmp_path / "original"
    ref = write_original(src, 2)
    manifest = convert(src, tmp_path / "out", allow_pickle=True, progress=False)
    assert manifest["source_format"] == "llama4_original"
    assert {"consolidated.00.pth", "consolidated.01.pth", "params.json"} <= set(manifest["source_files"])
    assert any("dropped" in n and "extra state" in n for n in manifest["notes"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = tokens(BY_NAME["llama4"])
    with torch.no_grad():
        assert max_rel_diff(model(ids).logits, ref(ids).logits) <= 1e-5


def test_original_layout_is_refused_when_unsafe_or_broken(tmp_path):
    ref = write_original(tmp_path, 2)
    with pytest.raises(hf_archs.CheckpointError, match="pickle files, never loaded by default"):
        hf_archs.from_official(tmp_path)
    shard1 = torch.load(tmp_path / "consolidated.01.pth", weights_only=False)

    # A replicated tensor that differs between ranks.
    bad = dict(shard1, **{"norm.weight": shard1["norm.weight"] + 1})
    torch.save(bad, tmp_path / "consolidated.01.pth")
    with pytest.raises(hf_archs.CheckpointError, match="norm.weight: replicated tensor differs"):
        hf_archs.from_official(tmp_path, allow_pickle=True)

    # An unknown tensor is named (in every rank, so the ranks agree).
    for r in range(2):
        shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=False) if r == 0 else dict(shard1)
        shard["layers.0.attention.wz.weight"] = torch.zeros(2, 2)
        torch.save(shard, tmp_path / f"consolidated.{r:02d}.pth")
    with pytest.raises(hf_archs.CheckpointError, match=r"unexpected tensors: \['layers\.0\.attention\.wz\.weight'\]"):
        hf_archs.from_official(tmp_path, allow_pickle=True)

    # Ranks that disagree on their tensors, and a missing rank.
    torch.save(shard1, tmp_path / "consolidated.01.pth")
    with pytest.raises(hf_archs.CheckpointError, match="consolidated.01.pth: holds different tensors"):
        hf_archs.from_official(tmp_path, allow_pickle=True)
    (tmp_path / "consolidated.01.pth").rename(tmp_path / "consolidated.02.pth")
    with pytest.raises(hf_archs.CheckpointError, match=r"shards \['consolidated.01.pth'\] are missing"):
        hf_archs.from_official(tmp_path, allow_pickle=True)

    # Anything pickled besides tensors and TransformerEngine's BytesIO blobs is refused by weights_only.
    write_original(tmp_path, 2, ref)
    (tmp_path / "consolidated.02.pth").unlink()
    shard0 = torch.load(tmp_path / "consolidated.00.pth", weights_only=False)
    shard0["layers.0.feed_forward.w1.weight"] = io.BytesIO(b"not extra state")
    torch.save(shard0, tmp_path / "consolidated.00.pth")
    with pytest.raises(hf_archs.CheckpointError, match="entries that are not tensors"):
        hf_archs.from_official(tmp_path, allow_pickle=True)
