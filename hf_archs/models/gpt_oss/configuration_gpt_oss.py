"""gpt-oss configuration: field names of openai/gpt-oss-120b's config.json (the HF-format repo root), its defaults.

Sources: https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json (HF extras marked [M] in
../shared/docs/official-releases.md §10: max_position_embeddings, layer_types, rms_norm_eps, eos / pad ids) and
OpenAI's `ModelConfig` defaults (= 120b) in https://github.com/openai/gpt-oss/blob/main/gpt_oss/torch/model.py.
gpt-oss-20b differs in `num_hidden_layers` (24) and `num_local_experts` (32) [M].

The Hub file keeps RoPE in the legacy form (`rope_theta` 150000 + `rope_scaling` {yarn, factor 32, beta_fast 32,
beta_slow 1, original_max_position_embeddings 4096, truncate false}); transformers' config machinery converts it to
`rope_parameters`. Its extra keys (`experts_per_token`, `initial_context_length`) duplicate fields here and are kept
as plain attributes. The root release's MoE weights are MXFP4 (`quantization_config.quant_method: mxfp4`).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin, fused_experts_ep_plan
from ...errors import ConfigError

_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


@strict
class HfaGptOssConfig(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_gpt_oss"
    attribute_map = {"num_experts": "num_local_experts"}
    allowed_layer_types = ("full_attention", "sliding_attention")
    keys_to_ignore_at_inference = ["cache"]
    default_theta = 150_000.0
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.sinks": "colwise",  # one logit per head: sharded with the heads,
        "layers.*.self_attn": "local_params",  # and read as this rank's local slice in the kernel
        "layers.*.self_attn.o_proj": "rowwise",
    }
    base_model_ep_plan = fused_experts_ep_plan("layers.*.mlp.experts", bias=True)

    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None  # every layer routed; kept as a plan like the other MoE configs
    hidden_act: str = "silu"  # published, unused: the experts' activation is the clamped SwiGLU below
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    attention_dropout: float | int = 0.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_parameters: dict | None = None
    initializer_range: float = 0.02
    router_aux_loss_coef: float = 0.9
    output_router_logits: bool = False
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 199999
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 200002

    def __post_init__(self, **kwargs):
        if "num_experts" in kwargs:
            self.num_local_experts = kwargs.pop("num_experts")
        if isinstance(kwargs.get("rope_scaling"), dict):
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])  # the base class fills it in: never the caller's
        if self.rope_parameters is None and "rope_scaling" not in kwargs:
            self.rope_parameters = dict(_DEFAULT_ROPE)
        elif self.rope_parameters is not None:
            self.rope_parameters = dict(self.rope_parameters)  # filled in by the base class: never the caller's
        if self.layer_types is None:
            # OpenAI's model.py: the window is on even layers (`layer_idx % 2 == 0`), starting with layer 0.
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if "sliding_attention" in self.layer_types and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer (layer_types has sliding_attention "
                              f"layers), got {self.sliding_window!r}")
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) != {"sparse"}:
            raise ConfigError(f"mlp_layer_types must be 'sparse' for each of the {self.num_hidden_layers} layers "
                              f"(every gpt-oss layer is routed), got {self.mlp_layer_types}")
        if not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_local_experts "
                              f"({self.num_local_experts})]")
        if self.swiglu_limit <= 0:
            raise ConfigError(f"swiglu_limit must be positive, got {self.swiglu_limit!r}")
        self.check_decoder()
        super().__post_init__(**kwargs)


__all__ = ["HfaGptOssConfig"]
