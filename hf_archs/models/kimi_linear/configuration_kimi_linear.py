"""Kimi Linear configuration: field names and defaults of moonshotai/Kimi-Linear-48B-A3B-Instruct's config.json.

Source: https://huggingface.co/moonshotai/Kimi-Linear-48B-A3B-Instruct/blob/main/config.json and its
configuration_kimi.py (values as transcribed in ../shared/docs/official-releases.md section 15). The layer plan comes
from `linear_attn_config`: `kda_layers` and `full_attn_layers` are **1-based** (layer index i is KDA iff i + 1 is in
`kda_layers`; the 27-layer release ends with an MLA layer, so the pattern is not a plain 3:1). Without those lists the
release's code has no KDA layer; transformers' own default (`i % 4 == 0` full, for i > 0) matches no release.
MoE: sigmoid scores with `e_score_correction_bias`, top `num_experts_per_token`, renormalised (`moe_renormalize`),
times `routed_scaling_factor`, plus `num_shared_experts` always-on experts; layers from `first_k_dense_replace` on
(every `moe_layer_freq`-th) are MoE.
transformers' names for the same fields (`num_local_experts`, `num_experts_per_tok`, `n_shared_experts`, `n_group`,
`norm_topk_prob`, `max_position_embeddings`) are accepted as aliases.
Ours, not in the release: `layer_types`, `mlp_layer_types` (plans), `router_aux_loss_coef`, `linear_chunk_size` and
`linear_attn_mode` (how the KDA layers run, see hf_archs/layers/kda.py).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin
from ...errors import ConfigError
from ...layers.gated_deltanet import MODES

KIMI_LINEAR_48B = {"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
                   "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
                   "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26]}
ALIASES = {"num_local_experts": "num_experts", "num_experts_per_tok": "num_experts_per_token",
           "n_shared_experts": "num_shared_experts", "n_group": "num_expert_group", "norm_topk_prob": "moe_renormalize",
           "max_position_embeddings": "model_max_length"}


@strict
class HfaKimiLinearConfig(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_kimi_linear"
    attribute_map = dict(ALIASES)
    allowed_layer_types = ("full_attention", "linear_attention")
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.block_sparse_moe.experts.gate_up_proj": "packed_colwise",
        "layers.*.block_sparse_moe.experts.down_proj": "rowwise",
        "layers.*.block_sparse_moe.experts": "moe_tp_experts",
        "layers.*.block_sparse_moe.shared_experts.gate_proj": "colwise",
        "layers.*.block_sparse_moe.shared_experts.up_proj": "colwise",
        "layers.*.block_sparse_moe.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 163840
    hidden_size: int = 2304
    head_dim: int | None = 72  # in the release's config.json, unused (MLA and KDA have their own head sizes)
    intermediate_size: int = 9216
    num_hidden_layers: int = 27
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 163839
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163586
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None  # the release has rope_theta / rope_scaling, unused: its MLA is NoPE
    model_max_length: int = 1048576
    moe_intermediate_size: int = 1024
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    num_experts: int | None = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    routed_scaling_factor: float | int = 2.446
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    use_grouped_topk: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    num_nextn_predict_layers: int = 0
    linear_attn_config: dict | None = None
    attention_dropout: float | int = 0.0
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    linear_chunk_size: int = 64
    linear_attn_mode: str = "auto"

    def __post_init__(self, **kwargs: Any):
        for alias, name in ALIASES.items():
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        for name in ("qk_head_dim", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim"):
            kwargs.pop(name, None)  # derived here; transformers' config writes them
        if self.linear_attn_config is None:
            self.linear_attn_config = dict(KIMI_LINEAR_48B)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = self.layer_types_from_lists()
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse" if self.num_experts and i >= self.first_k_dense_replace
                                    and i % self.moe_layer_freq == 0 else "dense" for i in range(self.num_hidden_layers)]
        self.check_decoder()
        self.check_kimi_linear()
        super().__post_init__(**kwargs)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def linear_head_dim(self) -> int:
        return self.linear_attn_config["head_dim"]

    @property
    def linear_num_heads(self) -> int:
        return self.linear_attn_config["num_heads"]

    @property
    def linear_conv_kernel_dim(self) -> int:
        return self.linear_attn_config.get("short_conv_kernel_size", 4)

    def layer_uses_rope(self, layer_idx: int) -> bool:
        return False  # NoPE: the MLA layers' 64 "rope" dimensions are used unrotated

    def layer_types_from_lists(self) -> list[str]:
        """`linear_attn_config`'s 1-based `kda_layers` / `full_attn_layers` -> one type per 0-based layer."""
        lac = self.linear_attn_config
        for key in ("kda_layers", "full_attn_layers"):
            if not isinstance(lac.get(key), list):
                raise ConfigError(f"linear_attn_config.{key} must be a list of 1-based layer numbers, got "
                                  f"{lac.get(key)!r}")
        n = self.num_hidden_layers
        kda, full = lac["kda_layers"], lac["full_attn_layers"]
        bad = sorted(x for x in kda + full if not isinstance(x, int) or not 1 <= x <= n)
        both = sorted(set(kda) & set(full))
        missing = sorted(set(range(1, n + 1)) - set(kda) - set(full))
        if bad or both or missing:
            raise ConfigError(f"linear_attn_config must list each layer 1..{n} (1-based) in exactly one of kda_layers "
                              f"and full_attn_layers; out of range: {bad}, in both: {both}, in neither: {missing}")
        return ["linear_attention" if i + 1 in kda else "full_attention" for i in range(n)]

    def check_kimi_linear(self) -> None:
        """Raise `ConfigError` naming the field for values this architecture cannot build."""
        for key in ("head_dim", "num_heads"):
            value = self.linear_attn_config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"linear_attn_config.{key} must be a positive integer, got {value!r}")
        if self.layer_types != self.layer_types_from_lists():
            raise ConfigError("layer_types disagrees with linear_attn_config's 1-based kda_layers / full_attn_layers "
                              "(the release's plan, which decides); change those lists instead")
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_layer_freq",
                     "linear_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.mla_use_nope:
            raise ConfigError("mla_use_nope=False (RoPE in the MLA layers) is not supported: every Kimi Linear release "
                              "is NoPE, and the release's code asserts it")
        if self.q_lora_rank is not None:
            raise ConfigError(f"q_lora_rank must be null (Kimi Linear's MLA has a full q_proj), got {self.q_lora_rank}")
        if self.linear_attn_mode not in MODES:
            raise ConfigError(f"linear_attn_mode must be one of {list(MODES)}, got {self.linear_attn_mode!r}")
        if self.num_nextn_predict_layers:
            raise ConfigError(f"num_nextn_predict_layers={self.num_nextn_predict_layers}: Kimi Linear releases have no "
                              f"MTP layer and none is supported")
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"sparse", "dense"}:
            raise ConfigError(f"mlp_layer_types must list 'sparse' or 'dense' for each of the "
                              f"{self.num_hidden_layers} layers, got {self.mlp_layer_types}")
        if "sparse" not in self.mlp_layer_types:
            return
        if self.moe_router_activation_func != "sigmoid":
            raise ConfigError(f"moe_router_activation_func={self.moe_router_activation_func!r} is not supported "
                              f"(Kimi Linear routes with 'sigmoid' scores and a correction bias)")
        if not isinstance(self.num_experts, int) or self.num_experts <= 0:
            raise ConfigError(f"num_experts must be a positive integer, got {self.num_experts!r}")
        groups = self.num_expert_group if self.use_grouped_topk else 1
        if groups <= 0 or self.num_experts % groups:
            raise ConfigError(f"num_experts ({self.num_experts}) must be divisible by num_expert_group ({groups})")
        if not 0 < self.topk_group <= groups:
            raise ConfigError(f"topk_group ({self.topk_group}) must be in [1, num_expert_group ({groups})]")
        if not 0 < self.num_experts_per_token <= self.num_experts:
            raise ConfigError(f"num_experts_per_token ({self.num_experts_per_token}) must be in [1, num_experts "
                              f"({self.num_experts})]")


__all__ = ["KIMI_LINEAR_48B", "HfaKimiLinearConfig"]
