"""Gemma 3n text decoder configuration: the field names of transformers' `Gemma3nTextConfig`, the defaults of
google/gemma-3n-E4B.

Sources: https://huggingface.co/google/gemma-3n-E4B/blob/main/config.json (`text_config`) and
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gemma3n/configuration_gemma3n.py

Per-layer plans built here, once, from the release's forms:
- `intermediate_size`: one int for every layer, or one per layer (MatFormer slices have mixed widths).
- `layer_types`: default four sliding-window layers then one full layer, repeated.
- `activation_sparsity_pattern`: one Gaussian top-k sparsity per layer (default 0.95 on the first 10 layers).
- `kv_sharing_modes` (derived, the name transformers' `DynamicCache` reads): the last `num_kv_shared_layers`
  layers "reuse" the keys and values of the last earlier layer of their type, which is marked "store".
Hub configs carry the legacy RoPE names `rope_theta` (full layers) and `rope_local_base_freq` (sliding layers);
they become `rope_parameters` keyed by layer type, as transformers converts them. `query_pre_attn_scalar` and
`altup_lr_multiplier` also appear in Hub configs; the runtime does not read them (the attention scale is 1: queries
and keys are RMS-normalised), and they are kept as extra attributes, as transformers keeps them.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin
from ...errors import ConfigError
from ..gemma3.configuration_gemma3 import sliding_global_rope_parameters

_LEGACY_ROPE_KEYS = ("rope_theta", "rope_local_base_freq", "rope_scaling")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@strict
class HfaGemma3nConfig(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_gemma3n"
    allowed_layer_types = ("full_attention", "sliding_attention")
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        # No MLP entries: the Gaussian top-k activation sparsity of the first layers takes the mean and standard
        # deviation over the whole intermediate vector, which a column-sharded gate_proj splits across ranks
        # (transformers' plan shards it and then disagrees with one process; checked in tests/test_distributed.py).
    }

    vocab_size: int = 262_400
    hidden_size: int = 2048
    intermediate_size: int | list[int] = 16_384
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768
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
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    altup_num_inputs: int = 4
    num_kv_shared_layers: int = 15
    laurel_rank: int = 64
    activation_sparsity_pattern: float | list[float] | None = None

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        if isinstance(self.intermediate_size, int):
            self.intermediate_size = [self.intermediate_size] * n if _positive_int(n) else []
        if self.layer_types is None and _positive_int(n):
            self.layer_types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]
        if self.activation_sparsity_pattern is None:
            sparse = 10 if n > 10 else 0
            self.activation_sparsity_pattern = [0.95] * sparse + [0.0] * (n - sparse)
        elif isinstance(self.activation_sparsity_pattern, (int, float)):
            self.activation_sparsity_pattern = [float(self.activation_sparsity_pattern)] * n
        self.check_decoder()
        self._check_gemma3n()
        super().__post_init__(**kwargs)

    def _check_gemma3n(self) -> None:
        n = self.num_hidden_layers
        for name in ("intermediate_size", "activation_sparsity_pattern"):
            values = list(getattr(self, name))
            if len(values) != n:
                raise ConfigError(f"{name} has {len(values)} entries but num_hidden_layers is {n}")
            setattr(self, name, values)
        bad = [(i, w) for i, w in enumerate(self.intermediate_size) if not _positive_int(w)]
        if bad:
            raise ConfigError(f"intermediate_size[{bad[0][0]}] must be a positive integer, got {bad[0][1]!r}")
        bad = [(i, s) for i, s in enumerate(self.activation_sparsity_pattern) if not 0.0 <= s < 1.0]
        if bad:
            raise ConfigError(f"activation_sparsity_pattern[{bad[0][0]}] must be in [0, 1), got {bad[0][1]!r}")
        for name in ("sliding_window", "altup_num_inputs", "laurel_rank", "hidden_size_per_layer_input",
                     "vocab_size_per_layer_input", "head_dim"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ConfigError(f"altup_active_idx ({self.altup_active_idx}) must be in [0, altup_num_inputs = "
                              f"{self.altup_num_inputs})")
        if not isinstance(self.num_kv_shared_layers, int) or not 0 <= self.num_kv_shared_layers < n:
            raise ConfigError(f"num_kv_shared_layers must be in [0, num_hidden_layers = {n}), got "
                              f"{self.num_kv_shared_layers!r}")
        first = n - self.num_kv_shared_layers
        missing = sorted(set(self.layer_types[first:]) - set(self.layer_types[:first]))
        if missing:
            raise ConfigError(f"num_kv_shared_layers ({self.num_kv_shared_layers}): the KV-shared layers {first}-"
                              f"{n - 1} include {missing} layers, but no earlier layer of that type computes keys "
                              "and values for them to reuse")

    def kv_sources(self) -> dict[int, int]:
        """KV-shared layer -> the layer whose keys and values it reuses: the last layer of the same type before
        the shared range (transformers' rule, `Gemma3nTextConfig.kv_sharing_modes`)."""
        first = self.num_hidden_layers - self.num_kv_shared_layers
        last_of_type = {t: i for i, t in enumerate(self.layer_types[:first])}
        return {i: last_of_type[self.layer_types[i]] for i in range(first, self.num_hidden_layers)}

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """Per layer: "reuse" (KV-shared: `DynamicCache` gives it a `DummyLayer`, it stores nothing), "store" (the
        last layer of its type before the shared range) or None. Same as `Gemma3nTextConfig.kv_sharing_modes`."""
        if self.num_kv_shared_layers == 0:
            return [None] * self.num_hidden_layers
        first = self.num_hidden_layers - self.num_kv_shared_layers
        modes: list[str | None] = [None if i < first else "reuse" for i in range(self.num_hidden_layers)]
        for t in set(self.layer_types):
            modes[max(i for i in range(first) if self.layer_types[i] == t)] = "store"
        return modes

    def convert_rope_params_to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """Build `rope_parameters` keyed by layer type; called by `PreTrainedConfig.__post_init__`.

        Same as `Gemma3nTextConfig.convert_rope_params_to_dict` except: a flat (not per-layer-type)
        `rope_parameters` is refused, and the caller's dict is never modified.
        """
        return sliding_global_rope_parameters(self, kwargs)

__all__ = ["HfaGemma3nConfig"]
