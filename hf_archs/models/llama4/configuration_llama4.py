"""Llama 4 text decoder configuration: the field names of the release's `text_config` (transformers'
`Llama4TextConfig`), with the defaults of Llama-4-Scout-17B-16E.

Sources: https://huggingface.co/meta-llama/Llama-4-Scout-17B-16E-Instruct/blob/main/config.json (`text_config`),
https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama4/configuration_llama4.py and
meta-llama/llama-models `models/llama4/args.py` ("Only Llama-4-Scout uses scaled rope").

The release's quirky forms become two per-layer plans here, built once:
- `layer_types`: "chunked_attention" on RoPE layers (`no_rope_layers[i] == 1`, a 1 meaning RoPE is *on*),
  "full_attention" on the NoPE layers (every `no_rope_layer_interval`-th, 1-based) or everywhere when
  `attention_chunk_size` is None;
- `mlp_layer_types`: "sparse" for the layers in `moe_layers` (default: every `interleave_moe_layer_step`-th,
  1-based: Scout all 48, Maverick the odd ones), "dense" (`intermediate_size_mlp` SwiGLU) elsewhere.
"""

from __future__ import annotations

import copy
from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin
from ...errors import ConfigError

# Scout: llama3 scaling x16 over an 8k original context (args.py `rope_scaling_factor=16`,
# `rope_high_freq_factor=1`; the first Hub snapshot, transformers 4.51.0, said factor 8 / high_freq_factor 4).
# Maverick's release has `rope_scaling: null` (plain RoPE, base 5e5).
_SCOUT_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 16.0, "low_freq_factor": 1.0,
               "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}


@strict
class HfaLlama4Config(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_llama4"
    allowed_layer_types = ("full_attention", "chunked_attention")
    keys_to_ignore_at_inference = ["cache"]
    # transformers' plan for Llama 4 (the fused experts are input-major, hence the swapped row/col).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.feed_forward.shared_expert.gate_proj": "colwise",
        "layers.*.feed_forward.shared_expert.up_proj": "colwise",
        "layers.*.feed_forward.shared_expert.down_proj": "rowwise",
        "layers.*.feed_forward.experts.gate_up_proj": "packed_rowwise",
        "layers.*.feed_forward.experts.down_proj": "colwise",
        "layers.*.feed_forward.experts": "moe_tp_experts",
        "layers.*.feed_forward.gate_proj": "colwise",
        "layers.*.feed_forward.up_proj": "colwise",
        "layers.*.feed_forward.down_proj": "rowwise",
    }

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # each routed expert and the shared expert
    intermediate_size_mlp: int = 16384  # the dense layers (Maverick's even layers)
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 10_485_760  # 16E-Instruct; the base 16E says 262144
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 200018
    bos_token_id: int | None = 200000
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [200001, 200007, 200008])
    tie_word_embeddings: bool = False
    attention_dropout: float | int = 0.0
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True  # weightless L2 norm of q and k after RoPE, RoPE layers only (Maverick: false)
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0  # kept for the releases' configs; Llama 4's router adds no noise
    rope_parameters: dict | None = None
    no_rope_layers: list[int] | None = None  # 1 = RoPE on, 0 = NoPE
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    layer_types: list[str] | None = None
    # The releases write `4`, read as a truth value (transformers' own config refuses it: it wants a bool).
    attn_temperature_tuning: bool | int = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False
    mlp_layer_types: list[str] | None = None

    default_theta = 500_000.0

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        head_dim_given = self.head_dim is not None
        if not head_dim_given:  # Llama4TextConfig's fallback
            self.head_dim = self.hidden_size // self.num_attention_heads
        n = self.num_hidden_layers
        if not self.no_rope_layers:  # transformers treats an empty list as absent, too
            if not isinstance(self.no_rope_layer_interval, int) or self.no_rope_layer_interval <= 0:
                raise ConfigError(f"no_rope_layer_interval must be a positive integer, got "
                                  f"{self.no_rope_layer_interval!r}")
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0) for i in range(n)]
        if len(self.no_rope_layers) < n:
            raise ConfigError(f"no_rope_layers has {len(self.no_rope_layers)} entries but num_hidden_layers is {n}")
        bad = sorted(set(self.no_rope_layers) - {0, 1})
        if bad:
            raise ConfigError(f"no_rope_layers entries must be 0 (NoPE) or 1 (RoPE), got {bad}")
        if self.attention_chunk_size is not None and (not isinstance(self.attention_chunk_size, int)
                                                      or self.attention_chunk_size <= 0):
            raise ConfigError(f"attention_chunk_size must be a positive integer or None, got "
                              f"{self.attention_chunk_size!r}")
        if self.layer_types is None:
            self.layer_types = ["chunked_attention" if self.no_rope_layers[i] and self.attention_chunk_size is not None
                                else "full_attention" for i in range(n)]
        self.check_decoder(head_dim_given=head_dim_given)
        if "chunked_attention" in self.layer_types and self.attention_chunk_size is None:
            raise ConfigError("layer_types has chunked_attention layers but attention_chunk_size is not set")

        if self.moe_layers is None:
            step = self.interleave_moe_layer_step
            if not isinstance(step, int) or step <= 0:
                raise ConfigError(f"interleave_moe_layer_step must be a positive integer, got {step!r}")
            self.moe_layers = list(range(step - 1, n, step))
        outside = sorted(i for i in self.moe_layers if not 0 <= i < n)
        if outside:
            raise ConfigError(f"moe_layers has indices {outside} outside [0, {n})")
        plan = ["sparse" if i in self.moe_layers else "dense" for i in range(n)]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = plan
        elif self.mlp_layer_types != plan:
            raise ConfigError(f"mlp_layer_types {self.mlp_layer_types} disagrees with moe_layers {self.moe_layers}")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                              f"num_local_experts ({self.num_local_experts})")
        if self.attn_temperature_tuning and (not isinstance(self.floor_scale, int) or self.floor_scale <= 0):
            raise ConfigError(f"floor_scale must be a positive integer, got {self.floor_scale!r}")
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """Same as `PreTrainedConfig.convert_rope_params_to_dict` except: with no RoPE field at all (neither
        `rope_parameters` nor the Hub's legacy `rope_scaling` / `rope_theta`), Scout's llama3 scaling is the default
        (a release with `rope_scaling: null` gets plain RoPE, as Maverick's); the caller's dict is never modified."""
        if self.rope_parameters is None and not any(k in kwargs for k in ("rope_scaling", "rope_theta")):
            self.rope_parameters = _SCOUT_ROPE
        self.rope_parameters = copy.deepcopy(self.rope_parameters)
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = copy.deepcopy(kwargs["rope_scaling"])
        return super().convert_rope_params_to_dict(**kwargs)

    def layer_uses_rope(self, layer_idx: int) -> bool:
        return bool(self.no_rope_layers[layer_idx])


__all__ = ["HfaLlama4Config"]
