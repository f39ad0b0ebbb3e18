"""Mistral Small 3.1 text decoder configuration: the field names of transformers' `MistralConfig` (the release's
`text_config`, model_type "mistral") with the defaults of Mistral-Small-3.1-24B's text_config.

Source: https://huggingface.co/mistralai/Mistral-Small-3.1-24B-Base-2503/blob/main/config.json (`text_config`)
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin
from ...errors import ConfigError


@strict
class HfaMistral3Config(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_mistral3"
    allowed_layer_types = ("full_attention", "sliding_attention")
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 131072
    hidden_size: int = 5120
    intermediate_size: int = 32768
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = 128  # 32 * 128 = 4096 != hidden_size 5120: never derive it
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    sliding_window: int | None = None  # the 24B release has none
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    default_theta = 1_000_000_000.0

    def __post_init__(self, **kwargs):
        head_dim_given = self.head_dim is not None
        if not head_dim_given:  # MistralConfig's fallback, for text configs that omit it
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # transformers' Mistral has no per-layer plan: a set `sliding_window` applies to every layer (its mask,
        # its kernel argument and its cache layers all read the one field).
        expected = ["sliding_attention" if self.sliding_window is not None else "full_attention"] \
            * self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = expected
        self.check_decoder(head_dim_given=head_dim_given)
        if self.layer_types != expected:
            raise ConfigError(
                f"layer_types must be {expected[0]!r} on every layer when sliding_window is {self.sliding_window!r} "
                f"(Mistral applies one window to all layers), got {self.layer_types}")
        super().__post_init__(**kwargs)


__all__ = ["HfaMistral3Config"]
