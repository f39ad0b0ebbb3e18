"""DeepSeek V3 / R1 configuration: field names and defaults of deepseek-ai/DeepSeek-V3's config.json.

Source: https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (and inference/configs/config_671B.json
of https://github.com/deepseek-ai/DeepSeek-V3). `rope_theta` + `rope_scaling` (legacy names) become
`rope_parameters`. Fields the reference code ignores (`ep_size`, `pretraining_tp`) are kept as read.
`aux_loss_alpha` and `seq_aux` (the release's training fields) select the balance loss of training: with
`output_router_logits=True` in training mode, `aux_loss` is DeepSeek's complementary balance loss (per sequence when
`seq_aux`, over the batch otherwise; `hf_archs.balancing.sequence_balance_loss`), added to the loss times
`aux_loss_alpha` (0.001 in config.json; the V3 report, section 4.2, gives 0.0001 for its pre-training).
Ours, not in the release: `layer_types`, `mlp_layer_types` (plans), `mtp_loss_weight`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin, fused_experts_ep_plan
from ...errors import ConfigError

# DeepSeek-V3's `rope_scaling` (rope_theta 10000 comes from `default_theta`).
DEEPSEEK_V3_YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


@strict
class HfaDeepseekV3Config(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_deepseek_v3"
    # transformers >= 5 writes `num_local_experts` / `num_mtp_layers`; the release says `n_routed_experts` /
    # `num_nextn_predict_layers`. `router_aux_loss_coef` is what MoECausalLM reads as the balance loss's weight.
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers",
                     "router_aux_loss_coef": "aux_loss_alpha"}
    keys_to_ignore_at_inference = ["cache"]
    base_model_tp_plan = {
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = fused_experts_ep_plan("layers.*.mlp.experts")

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    ep_size: int = 1
    routed_scaling_factor: float | int = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float | int = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    output_router_logits: bool = False
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    mtp_loss_weight: float | int = 0.1  # DeepSeek-V3 report section 4.2: 0.3 for the first 10T tokens, then 0.1

    default_theta = 10000.0
    default_rope_scaling = DEEPSEEK_V3_YARN

    def __post_init__(self, **kwargs):
        for alias, name in (("num_local_experts", "n_routed_experts"), ("num_mtp_layers", "num_nextn_predict_layers"),
                            ("router_aux_loss_coef", "aux_loss_alpha")):
            if alias in kwargs:
                setattr(self, name, kwargs.pop(alias))
        if self.rope_parameters is None and "rope_scaling" not in kwargs:
            self.rope_parameters = dict(self.default_rope_scaling)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        kwargs.pop("qk_head_dim", None)  # derived (transformers writes it)
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [self.mlp_layer_type(i) for i in range(self.num_hidden_layers)]
        self.check_deepseek()
        self.check_decoder()
        super().__post_init__(**kwargs)

    def mlp_layer_type(self, layer_idx: int) -> str:
        """The release's rule (DeepSeek's modeling code), also for the MTP layers that follow the decoder."""
        if layer_idx < self.num_hidden_layers and self.mlp_layer_types is not None:
            return self.mlp_layer_types[layer_idx]
        sparse = (self.n_routed_experts and layer_idx >= self.first_k_dense_replace
                  and layer_idx % self.moe_layer_freq == 0)
        return "sparse" if sparse else "dense"

    def check_deepseek(self) -> None:
        """Raise `ConfigError` naming the field for values this architecture cannot build."""
        def positive(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")

        for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "moe_layer_freq"):
            positive(name)
        positive("q_lora_rank", allow_none=True)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        self.check_mtp()
        if self.aux_loss_alpha < 0:
            raise ConfigError(f"aux_loss_alpha (the balance loss's weight) must be >= 0, got {self.aux_loss_alpha}")
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"sparse", "dense"}:
            raise ConfigError(f"mlp_layer_types must list 'sparse' or 'dense' for each of the "
                              f"{self.num_hidden_layers} layers, got {self.mlp_layer_types}")
        mtp = range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers)
        if "sparse" not in self.mlp_layer_types and all(self.mlp_layer_type(i) == "dense" for i in mtp):
            return
        positive("n_routed_experts")
        if self.scoring_func != "sigmoid" or self.topk_method != "noaux_tc":
            raise ConfigError(f"scoring_func={self.scoring_func!r} with topk_method={self.topk_method!r} is not "
                              f"supported: DeepSeek V3's router is scoring_func='sigmoid', topk_method='noaux_tc' "
                              f"(DeepSeek V2's softmax routers are not)")
        if self.n_group <= 0 or self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group "
                              f"({self.n_group})")
        if not 0 < self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) must be in [1, n_group ({self.n_group})]")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ConfigError(f"n_group ({self.n_group}) leaves fewer than 2 experts per group: a group's score is the "
                              f"sum of its two best experts")
        if not 0 < self.num_experts_per_tok <= self.topk_group * per_group:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, topk_group x experts "
                              f"per group = {self.topk_group * per_group}]")


__all__ = ["DEEPSEEK_V3_YARN", "HfaDeepseekV3Config"]
