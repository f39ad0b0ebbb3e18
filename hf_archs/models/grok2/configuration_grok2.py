"""Grok 2 / 2.5 configuration: field names and defaults of xai-org/grok-2's config.json.

Sources: https://huggingface.co/xai-org/grok-2 (config.json; the field set as copied by sglang-jax's Grok test
configs [3P]) and the official runtime, SGLang's `python/sglang/srt/models/grok.py`; see
../shared/docs/official-releases.md §11. The release's `model_type` is "git" and `architectures` is
["Grok1ForCausalLM"]; neither is a field here.

RoPE is described by top-level fields (`rope_theta`, `rope_type`, `original_max_position_embeddings`,
`scaling_factor`, `extrapolation_factor`, `attn_factor`, `beta_fast`, `beta_slow`). The release's
`rope_type: "original"` means, in SGLang, plain RoPE at `rope_theta` with no scaling and no magnitude correction
(the scaling fields are then unused); other rope types are refused. The release's `sliding_window_size: -1` and
`global_attn_every_n: 1` mean full attention in every layer, the only layout the runtime runs.
Not in the release but read by the MoE output code: `router_aux_loss_coef` (Grok-1's 0.001) and
`output_router_logits`.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin, fused_experts_ep_plan
from ...errors import ConfigError


@strict
class HfaGrok2Config(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_grok2"
    attribute_map = {"num_experts": "num_local_experts"}
    allowed_layer_types = ("full_attention",)
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.block_sparse_moe.experts.gate_up_proj": "packed_colwise",
        "layers.*.block_sparse_moe.experts.down_proj": "rowwise",
        "layers.*.block_sparse_moe.experts": "moe_tp_experts",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = fused_experts_ep_plan("layers.*.block_sparse_moe.experts")

    vocab_size: int = 131072
    hidden_size: int = 8192
    intermediate_size: int = 32768  # the dense residual MLP
    moe_intermediate_size: int = 16384  # each expert
    num_hidden_layers: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    residual_moe: bool = True
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_theta: float = 208533496.0
    rope_type: str | None = "original"
    original_max_position_embeddings: int | None = 8192
    scaling_factor: float | None = 16.0
    extrapolation_factor: float = 1.0
    attn_factor: float = 1.0
    beta_fast: float = 8
    beta_slow: float = 1
    attn_logit_softcapping: float | None = 30.0
    router_logit_softcapping: float | None = 30.0
    final_logit_softcapping: float | None = 50.0
    attn_temperature_len: int = 1024
    embedding_multiplier_scale: float = 90.50966799187809  # sqrt(8192)
    output_multiplier_scale: float = 0.5
    sliding_window_size: int | None = -1
    global_attn_every_n: int = 1
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if "num_experts" in kwargs:
            self.num_local_experts = kwargs.pop("num_experts")
        if self.rope_type not in (None, "original"):
            raise ConfigError(f"rope_type {self.rope_type!r} is not supported: Grok 2.5's runtime (SGLang) runs "
                              "'original' (plain RoPE at rope_theta), the release's value")
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.sliding_window_size is not None and self.sliding_window_size > 0:
            raise ConfigError(f"sliding_window_size={self.sliding_window_size} is not supported: the official "
                              "runtime runs full attention in every layer (the release says -1)")
        if not isinstance(self.attn_temperature_len, int) or self.attn_temperature_len == 1:
            # log2(1) = 0 would divide by zero; <= 0 switches the temperature off, as in the runtime.
            raise ConfigError(f"attn_temperature_len must be an integer > 1 (or <= 0: no temperature), got "
                              f"{self.attn_temperature_len!r}")
        for name in ("attn_logit_softcapping", "router_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be positive (or 0 / None: no cap), got {value!r}")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_local_experts "
                              f"({self.num_local_experts})]")
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        self.check_decoder()
        super().__post_init__(**kwargs)

    def rope_variants(self) -> dict[str, dict[str, Any]]:
        """Same as DecoderConfigMixin.rope_variants except: built from the release's top-level RoPE fields
        ("original" = plain RoPE at `rope_theta`)."""
        return {"default": {"rope_type": "default", "rope_theta": float(self.rope_theta)}}

    def rope_variant_of_layer(self, layer_idx: int) -> str | None:
        """Every layer uses the one RoPE (there is no `rope_parameters` field to nest)."""
        return "default"


__all__ = ["HfaGrok2Config"]
