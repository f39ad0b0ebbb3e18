"""Qwen3-Next configuration: field names and defaults of Qwen/Qwen3-Next-80B-A3B-Instruct's config.json.

Source: https://huggingface.co/Qwen/Qwen3-Next-80B-A3B-Instruct/blob/main/config.json (values as transcribed in
../shared/docs/official-releases.md section 13: rope_theta 1e7, partial_rotary_factor 0.25, 512 experts top-10, a
512-wide shared expert, linear attention 16 key / 32 value heads of 128). The release writes `rope_theta` and
`partial_rotary_factor` at the top level (legacy names); they become `rope_parameters`. `full_attention_interval`
(every 4th layer is full attention) becomes the plan `layer_types`; `decoder_sparse_step` / `mlp_only_layers`
become `mlp_layer_types`.
Ours, not in the release: `layer_types`, `mlp_layer_types` (plans); `num_nextn_predict_layers` (vLLM's name, default
1: the release ships one MTP layer under `mtp.`), `mtp_loss_weight`; `linear_chunk_size` and `linear_attn_mode`
(how the Gated DeltaNet layers run, see hf_archs/layers/gated_deltanet.py).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin, fused_experts_ep_plan
from ...errors import ConfigError
from ...layers.gated_deltanet import MODES


@strict
class HfaQwen3NextConfig(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_qwen3_next"
    # transformers >= 5 writes the expert count as `num_local_experts`; the release says `num_experts`.
    attribute_map = {"num_local_experts": "num_experts"}
    allowed_layer_types = ("full_attention", "linear_attention")
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
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = fused_experts_ep_plan("layers.*.mlp.experts")

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5120  # dense MLP width; unused by the release (every layer is MoE)
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: list[int] | None = None
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    num_nextn_predict_layers: int = 1
    mtp_loss_weight: float | int = 0.1  # not published by Qwen; DeepSeek-V3's final value
    linear_chunk_size: int = 64
    linear_attn_mode: str = "auto"
    pad_token_id: int | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645

    default_theta = 10_000_000.0

    def __post_init__(self, **kwargs):
        if "num_local_experts" in kwargs:
            self.num_experts = kwargs.pop("num_local_experts")
        kwargs.setdefault("partial_rotary_factor", 0.25)  # the release's value, at the top level of its config.json
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.mlp_only_layers = [] if self.mlp_only_layers is None else list(self.mlp_only_layers)
        if not isinstance(self.full_attention_interval, int) or self.full_attention_interval <= 0:
            raise ConfigError(f"full_attention_interval must be a positive integer, got {self.full_attention_interval!r}")
        if self.layer_types is None:  # the release's rule: every full_attention_interval-th layer is full attention
            self.layer_types = ["full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                                for i in range(self.num_hidden_layers)]
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [self.mlp_layer_type(i) for i in range(self.num_hidden_layers)]
        self.check_decoder()
        self.check_qwen3_next()
        super().__post_init__(**kwargs)

    def mlp_layer_type(self, layer_idx: int) -> str:
        """The release's rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th layer; also for
        the MTP layers after the decoder."""
        if layer_idx < self.num_hidden_layers and self.mlp_layer_types is not None:
            return self.mlp_layer_types[layer_idx]
        sparse = (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                  and (layer_idx + 1) % self.decoder_sparse_step == 0)
        return "sparse" if sparse else "dense"

    def check_qwen3_next(self) -> None:
        """Raise `ConfigError` naming the field for values this architecture cannot build."""
        for name in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                     "linear_num_value_heads", "linear_chunk_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                              f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.linear_attn_mode not in MODES:
            raise ConfigError(f"linear_attn_mode must be one of {list(MODES)}, got {self.linear_attn_mode!r}")
        if len(self.mlp_layer_types) != self.num_hidden_layers or set(self.mlp_layer_types) - {"sparse", "dense"}:
            raise ConfigError(f"mlp_layer_types must list 'sparse' or 'dense' for each of the "
                              f"{self.num_hidden_layers} layers, got {self.mlp_layer_types}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts "
                              f"({self.num_experts})")
        self.check_mtp()


__all__ = ["HfaQwen3NextConfig"]
