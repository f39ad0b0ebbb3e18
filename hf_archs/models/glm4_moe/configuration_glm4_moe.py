"""GLM-4.5 configuration: field names and defaults of zai-org/GLM-4.5's config.json.

Source: https://huggingface.co/zai-org/GLM-4.5/blob/main/config.json (GLM-4.5-Air: the same fields with
hidden 4096, 46 layers, intermediate 10944, moe 1408, 128 experts, first_k_dense_replace 1,
routed_scaling_factor 1.0, use_qk_norm false).
`head_dim` is read from the release (128): transformers' Glm4MoeConfig has no such field and derives
hidden_size // num_attention_heads (42 for Air, 53 for GLM-4.5), which matches no release.
"""

from __future__ import annotations

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin, fused_experts_ep_plan
from ...errors import ConfigError


@strict
class HfaGlm4MoeConfig(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_glm4_moe"
    # transformers >= 5 writes these under its own names; the release says n_routed_experts / num_nextn_predict_layers.
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
    keys_to_ignore_at_inference = ["cache"]
    # transformers' plans for GLM-4.5 (QK-norm is per head, so colwise q/k shards keep whole heads).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
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

    vocab_size: int = 151552
    hidden_size: int = 5120
    intermediate_size: int = 12288  # the dense prefix's MLP
    num_hidden_layers: int = 92
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = True  # on q/k/v; o_proj never has one
    attention_dropout: float | int = 0.0
    use_qk_norm: bool = True
    moe_intermediate_size: int = 1536
    num_experts_per_tok: int = 8
    n_routed_experts: int = 160
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 1  # MTP layers stored after the decoder's (model.layers.<num_hidden_layers>)
    # Ours, not in the release: the MTP loss weight in training (GLM-4.5's is not published; DeepSeek-V3's value
    # for the end of its training).
    mtp_loss_weight: float | int = 0.1
    output_router_logits: bool = False
    # GLM-4.5 balances its experts without an auxiliary loss (the correction bias); the Switch loss is reported
    # with output_router_logits but adds nothing to the training loss unless this is set. The release's config.json
    # has none of DeepSeek's balance-loss fields (`aux_loss_alpha`, `seq_aux`), so DeepSeek's sequence-wise loss is
    # not selected here (`hf_archs.balancing.sequence_balance_loss` can be applied to the router logits by hand).
    router_aux_loss_coef: float = 0.0
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    pad_token_id: int | None = 151329
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [151329, 151336, 151338])

    default_theta = 1_000_000.0

    def __post_init__(self, **kwargs):
        # The release states partial_rotary_factor at the top level; RoPE turns the first half of each head.
        kwargs.setdefault("partial_rotary_factor", 0.5)
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.mlp_layer_types is None:
            # The release's rule: the first `first_k_dense_replace` layers keep a dense MLP.
            k = self.first_k_dense_replace
            self.mlp_layer_types = ["dense" if i < k else "sparse" for i in range(self.num_hidden_layers)]
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"sparse", "dense"}:
            raise ConfigError(f"mlp_layer_types must list 'sparse' or 'dense' for each of the "
                              f"{self.num_hidden_layers} layers, got {self.mlp_layer_types}")
        self.check_mtp()
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                              f"({self.n_routed_experts})")
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) must split into n_group ({self.n_group}) "
                              "equal groups")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})")
        if self.n_routed_experts // self.n_group < 2:
            raise ConfigError(f"each expert group needs at least 2 experts (a group scores by its best two), got "
                              f"n_routed_experts {self.n_routed_experts} / n_group {self.n_group}")
        self.check_decoder()
        super().__post_init__(**kwargs)
        factor = self.rope_parameters.get("partial_rotary_factor", 1.0)
        if not 0 < factor <= 1 or int(self.head_dim * factor) % 2:
            raise ConfigError(f"partial_rotary_factor ({factor}) must rotate an even number of the head_dim "
                              f"({self.head_dim}) dimensions")

    def mlp_layer_type(self, layer_idx: int) -> str:
        """The plan's entry; the MTP layers after the decoder follow the release's rule (routed)."""
        if layer_idx < self.num_hidden_layers:
            return self.mlp_layer_types[layer_idx]
        return "sparse" if layer_idx >= self.first_k_dense_replace else "dense"


__all__ = ["HfaGlm4MoeConfig"]
