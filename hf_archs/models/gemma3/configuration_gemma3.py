"""Gemma 3 text decoder configuration: field names of transformers' `Gemma3TextConfig`, defaults of google/gemma-3-27b.

Sources: https://huggingface.co/google/gemma-3-27b-pt/blob/main/config.json (`text_config`, sparse; the rest are
`Gemma3TextConfig` defaults) and
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma3/configuration_gemma3.py

Hub configs use the legacy names `rope_theta` (global base), `rope_local_base_freq` (local base), `rope_scaling`
(global layers only) and `sliding_window_pattern` (layer i is global iff `(i + 1) % pattern == 0`); they are
converted here exactly as transformers does, into `layer_types` and `rope_parameters` keyed by layer type.
"""

from __future__ import annotations

import copy
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin
from ...errors import ConfigError

_LEGACY_ROPE_KEYS = ("rope_theta", "rope_local_base_freq", "rope_scaling")

# 27B: global layers base 1e6 with linear x8 (rope_scaling in the Hub config), local layers base 1e4.
_DEFAULT_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


@strict
class HfaGemma3Config(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_gemma3"
    allowed_layer_types = ("full_attention", "sliding_attention")
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 262_208
    hidden_size: int = 5376
    intermediate_size: int = 21504
    num_hidden_layers: int = 62
    num_attention_heads: int = 32
    num_key_value_heads: int = 16
    head_dim: int = 128
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    query_pre_attn_scalar: int | float = 168
    sliding_window: int | None = 1024
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False

    def __post_init__(self, **kwargs):
        if self.use_bidirectional_attention:
            raise ConfigError("use_bidirectional_attention=True (EmbeddingGemma) is not supported: hf_archs builds "
                              "the causal decoder only")
        # Hub configs still carry the pattern as an int; it is not a field (transformers keeps it as an extra).
        pattern = kwargs.get("sliding_window_pattern", 6)
        if self.layer_types is None:
            if not isinstance(pattern, int) or pattern <= 0:
                raise ConfigError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
            self.layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                                for i in range(self.num_hidden_layers)]
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ConfigError("sliding_window must be set: layer_types has sliding_attention layers")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.query_pre_attn_scalar <= 0:
            raise ConfigError(f"query_pre_attn_scalar must be positive, got {self.query_pre_attn_scalar!r}")
        self.check_decoder()
        super().__post_init__(**kwargs)

    def convert_rope_params_to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """Build `rope_parameters` keyed by layer type; called by `PreTrainedConfig.__post_init__`.

        Same as `Gemma3TextConfig.convert_rope_params_to_dict` except: with no RoPE field at all (neither
        `rope_parameters` nor a legacy key), the 27B values are used instead of plain RoPE on both layer types;
        a flat (not per-layer-type) `rope_parameters` is refused; the caller's dict is never modified.
        """
        if self.rope_parameters is None and not any(k in kwargs for k in _LEGACY_ROPE_KEYS):
            self.rope_parameters = _DEFAULT_ROPE
        return sliding_global_rope_parameters(self, kwargs)


def sliding_global_rope_parameters(config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`config.rope_parameters` keyed by layer type (a copy: never the caller's dict) for Gemma's sliding / global
    layers: "default" RoPE where a type has none, the legacy `rope_scaling` on the global layers, `rope_theta` /
    `rope_local_base_freq` as their thetas; a flat (not per-layer-type) dict is refused. Returns the kwargs left."""
    config.rope_parameters = copy.deepcopy(config.rope_parameters)
    rope_scaling = kwargs.pop("rope_scaling", None)
    if config.rope_parameters is None:
        config.rope_parameters = {"sliding_attention": {"rope_type": "default"},
                                  "full_attention": {"rope_type": "default"}}
    elif not config._rope_nested():
        raise ConfigError("rope_parameters must be keyed by layer type ({'full_attention': {...}, "
                          f"'sliding_attention': {{...}}}}), got {config.rope_parameters!r}")
    if config.rope_parameters.get("full_attention") is None:
        config.rope_parameters["full_attention"] = {"rope_type": "default"}
    if rope_scaling is not None:  # the legacy scaling applies to the global layers only
        config.rope_parameters["full_attention"].update(rope_scaling)
    config.rope_parameters["full_attention"].setdefault("rope_theta", kwargs.pop("rope_theta", 1_000_000.0))
    if config.rope_parameters.get("sliding_attention") is None:
        config.rope_parameters["sliding_attention"] = {"rope_type": "default"}
    config.rope_parameters["sliding_attention"].setdefault(
        "rope_theta", kwargs.pop("rope_local_base_freq", 10_000.0))
    config.standardize_rope_params()
    return kwargs

__all__ = ["HfaGemma3Config", "sliding_global_rope_parameters"]
