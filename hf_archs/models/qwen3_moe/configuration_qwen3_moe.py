"""Qwen3-MoE configuration: field names and defaults of Qwen/Qwen3-235B-A22B's config.json.

Source: https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin, fused_experts_ep_plan
from ...errors import ConfigError


@strict
class HfaQwen3MoeConfig(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_qwen3_moe"
    # transformers >= 5 writes the expert count as `num_local_experts`; the release says `num_experts`.
    attribute_map = {"num_local_experts": "num_experts"}
    allowed_layer_types = ("full_attention", "sliding_attention")
    keys_to_ignore_at_inference = ["cache"]
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
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = fused_experts_ep_plan("layers.*.mlp.experts")

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 94
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 94
    layer_types: list[str] | None = None
    attention_dropout: float | int = 0.0
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 1536
    num_experts_per_tok: int = 8
    num_experts: int = 128
    norm_topk_prob: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: list[int] | None = None
    mlp_layer_types: list[str] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645

    default_theta = 1_000_000.0

    def __post_init__(self, **kwargs):
        if "num_local_experts" in kwargs:
            self.num_experts = kwargs.pop("num_local_experts")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if not self.use_sliding_window:
            self.sliding_window = None
        self.mlp_only_layers = [] if self.mlp_only_layers is None else list(self.mlp_only_layers)
        if self.layer_types is None:
            # transformers' Qwen3-MoE applies the window to every layer when it is on.
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if self.mlp_layer_types is None:
            # The release's rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer.
            self.mlp_layer_types = [
                "sparse" if i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0 else "dense"
                for i in range(self.num_hidden_layers)]
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"sparse", "dense"}:
            raise ConfigError(f"mlp_layer_types must list 'sparse' or 'dense' for each of the "
                              f"{self.num_hidden_layers} layers, got {self.mlp_layer_types}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                              f"({self.num_experts})")
        self.check_decoder()
        super().__post_init__(**kwargs)


__all__ = ["HfaQwen3MoeConfig"]
