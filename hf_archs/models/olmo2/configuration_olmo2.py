"""OLMo 2 configuration: field names of transformers' `Olmo2Config`, defaults of allenai/OLMo-2-1124-7B.

Source: https://huggingface.co/allenai/OLMo-2-1124-7B/blob/main/config.json
Reference: https://github.com/huggingface/transformers/blob/main/src/transformers/models/olmo2/configuration_olmo2.py
The release has no `head_dim` field: it is `hidden_size // num_attention_heads` (128), a read-only property here.
The release has no `layer_types` either; every layer is full attention, and the plan is built here.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin
from ...errors import ConfigError


@strict
class HfaOlmo2Config(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_olmo2"
    keys_to_ignore_at_inference = ["cache"]
    # transformers' plans for OLMo 2. q_norm / k_norm normalise the whole projected q / k vector, so a colwise
    # shard of q_proj / k_proj would see only part of it: the projections gather their output (the norms then act
    # on the full vector, replicated on every rank) and o_proj splits its replicated input.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise_gather_output",
        "layers.*.self_attn.k_proj": "colwise_gather_output",
        "layers.*.self_attn.v_proj": "colwise_gather_output",
        "layers.*.self_attn.o_proj": "rowwise_split_input",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 100352
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as num_attention_heads (the 7B has 32)
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = 100277
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 100257
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    rms_norm_eps: float = 1e-6
    layer_types: list[str] | None = None

    default_theta = 500_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        self.check_decoder(head_dim_given=False)
        # head_dim is derived; a config.json that states it anyway must agree (a different value cannot load).
        given = kwargs.pop("head_dim", None)
        if given is not None and given != self.head_dim:
            raise ConfigError(f"head_dim ({given}) must equal hidden_size // num_attention_heads ({self.head_dim}): "
                              "this architecture derives it")
        super().__post_init__(**kwargs)


__all__ = ["HfaOlmo2Config"]
