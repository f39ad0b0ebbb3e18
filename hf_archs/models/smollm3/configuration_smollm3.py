"""SmolLM3 configuration: field names of transformers' `SmolLM3Config`, defaults of HuggingFaceTB/SmolLM3-3B.

Source: https://huggingface.co/HuggingFaceTB/SmolLM3-3B/blob/main/config.json
Reference:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/smollm3/configuration_smollm3.py
The release has no `head_dim` field: it is `hidden_size // num_attention_heads` (128), a read-only property here.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin
from ...errors import ConfigError


@strict
class HfaSmolLM3Config(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_smollm3"
    allowed_layer_types = ("full_attention", "sliding_attention")
    keys_to_ignore_at_inference = ["cache"]
    # transformers' plans for SmolLM3 (no QK-norm, so nothing to replicate).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    # Token ids as transcribed from the release's config.json (bos null, eos <|im_end|>); read them from the file.
    pad_token_id: int | None = 128004
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 128012
    rope_parameters: dict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = None
    # 1 = RoPE is applied in that layer, 0 = NoPE (the modeling code reads it as `use_rope`).
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    layer_types: list[str] | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    tie_word_embeddings: bool = True

    default_theta = 5_000_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.no_rope_layers is None:
            if not isinstance(self.no_rope_layer_interval, int) or self.no_rope_layer_interval <= 0:
                raise ConfigError(f"no_rope_layer_interval must be a positive integer, got "
                                  f"{self.no_rope_layer_interval!r}")
            # The release's rule: every `no_rope_layer_interval`-th layer (1-based) is NoPE.
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0)
                                   for i in range(self.num_hidden_layers)]
        if len(self.no_rope_layers) < self.num_hidden_layers:
            raise ConfigError(f"no_rope_layers has {len(self.no_rope_layers)} entries but num_hidden_layers is "
                              f"{self.num_hidden_layers}")
        bad = sorted(set(self.no_rope_layers) - {0, 1})
        if bad:
            raise ConfigError(f"no_rope_layers entries must be 0 (NoPE) or 1 (RoPE), got {bad}")
        if self.layer_types is None:
            # transformers' rule: with the sliding window on, the NoPE layers are the sliding ones.
            self.layer_types = ["sliding_attention" if self.use_sliding_window and self.sliding_window is not None
                                and not self.no_rope_layers[i] else "full_attention"
                                for i in range(self.num_hidden_layers)]
        self.check_decoder(head_dim_given=False)
        # head_dim is derived; a config.json that states it anyway must agree (a different value cannot load).
        given = kwargs.pop("head_dim", None)
        if given is not None and given != self.head_dim:
            raise ConfigError(f"head_dim ({given}) must equal hidden_size // num_attention_heads ({self.head_dim}): "
                              "this architecture derives it")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        super().__post_init__(**kwargs)

    def layer_uses_rope(self, layer_idx: int) -> bool:
        return bool(self.no_rope_layers[layer_idx])


__all__ = ["HfaSmolLM3Config"]
