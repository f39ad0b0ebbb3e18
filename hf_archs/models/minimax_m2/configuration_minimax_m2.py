"""MiniMax-M2 configuration: field names and defaults of MiniMaxAI/MiniMax-M2's config.json.

Source: https://huggingface.co/MiniMaxAI/MiniMax-M2/blob/main/config.json (M2.1 / M2.5 share the architecture).
The release names partial RoPE by `rotary_dim` (64 of head_dim 128); here it becomes
`rope_parameters["partial_rotary_factor"]`, as transformers' MiniMaxM2Config converts it. Fields that describe a
variant this architecture does not implement (lightning attention in `attn_type_list`, softmax scoring, per-head
QK-norm, a shared expert, MTP modules of more than one decoder layer) are refused by name rather than ignored.
`num_mtp_modules` MTP modules are built after the decoder's layers (the release's 3 by default, as DeepSeek V3's
config builds its 1); MiniMax publishes no trained MTP weights, so `from_official` loads the official release with
num_mtp_modules=0. Ours, not in the release: `layer_types`, `mlp_layer_types` (plans), `mtp_loss_weight`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ...configuration_base import DecoderConfigMixin, fused_experts_ep_plan
from ...errors import ConfigError


@strict
class HfaMiniMaxM2Config(DecoderConfigMixin, PreTrainedConfig):
    model_type = "hfa_minimax_m2"
    attribute_map = {"num_experts": "num_local_experts"}
    keys_to_ignore_at_inference = ["cache"]
    # QK-norm normalises the whole projected q / k vector (all heads at once): a colwise shard of q_proj / k_proj
    # would see only its heads, so the projections gather their output and o_proj splits its replicated input
    # (transformers' plan; vLLM instead all-reduces the sum of squares across ranks).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise_gather_output",
        "layers.*.self_attn.k_proj": "colwise_gather_output",
        "layers.*.self_attn.v_proj": "colwise_gather_output",
        "layers.*.self_attn.o_proj": "rowwise_split_input",
        "layers.*.block_sparse_moe.experts.gate_up_proj": "packed_colwise",
        "layers.*.block_sparse_moe.experts.down_proj": "rowwise",
        "layers.*.block_sparse_moe.experts": "moe_tp_experts",
    }
    base_model_ep_plan = fused_experts_ep_plan("layers.*.block_sparse_moe.experts")

    vocab_size: int = 200064
    hidden_size: int = 3072
    intermediate_size: int = 1536  # per expert (every layer routes; there is no dense MLP)
    num_hidden_layers: int = 62
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    head_dim: int = 128
    rotary_dim: int | None = None  # None: half of head_dim (the release states 64)
    hidden_act: str = "silu"
    max_position_embeddings: int = 196608
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_dropout: float | int = 0.0
    attn_type_list: list[int] | None = None  # 1 = softmax attention in every layer (0 was M1's lightning attention)
    use_qk_norm: bool = True
    qk_norm_type: str = "per_layer"  # one RMSNorm over all heads of a layer
    num_local_experts: int = 256
    num_experts_per_tok: int = 8
    scoring_func: str = "sigmoid"
    use_routing_bias: bool = True  # `block_sparse_moe.e_score_correction_bias`
    shared_intermediate_size: int = 0
    # MTP modules after the decoder's layers, as model.layers.<num_hidden_layers + k> (hf_archs/mtp.py; inner
    # names from RBLN-SW/vllm-rbln's minimax_m2_mtp.py). The official files store none: from_official sets 0 then.
    num_mtp_modules: int = 3
    mtp_transformer_layers: int = 1  # decoder layers per MTP module (vllm-rbln builds one; only 1 is supported)
    # Ours, not in the release: the MTP loss weight in training (MiniMax's is not published; DeepSeek-V3's value
    # for the end of its training).
    mtp_loss_weight: float | int = 0.1
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001  # not in the release; transformers' default, so losses compare
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None  # every layer routes
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    default_theta = 5_000_000.0

    def __post_init__(self, **kwargs):
        # The release's `use_mtp` says MTP modules are declared (num_mtp_modules keeps that). It is not kept as a
        # field: transformers' generate reads a config's `use_mtp` as "decode with transformers' own MTP path" for
        # every call; ours is asked for per call, `generate(..., use_mtp=True)` (hf_archs/mtp.py).
        kwargs.pop("use_mtp", None)
        if self.attn_type_list is None:
            self.attn_type_list = [1] * self.num_hidden_layers
        if len(self.attn_type_list) != self.num_hidden_layers or set(self.attn_type_list) - {1}:
            raise ConfigError(f"attn_type_list must hold 1 (softmax attention) for each of the {self.num_hidden_layers} "
                              f"layers, got {self.attn_type_list}: lightning attention (0) is not implemented")
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        if self.mlp_layer_types != ["sparse"] * self.num_hidden_layers:
            raise ConfigError(f"mlp_layer_types must be 'sparse' for each of the {self.num_hidden_layers} layers "
                              f"(MiniMax-M2 has no dense MLP), got {self.mlp_layer_types}")
        if self.scoring_func != "sigmoid":
            raise ConfigError(f"scoring_func must be 'sigmoid', got {self.scoring_func!r}")
        if self.qk_norm_type != "per_layer":
            raise ConfigError(f"qk_norm_type must be 'per_layer' (one norm over all heads), got {self.qk_norm_type!r}")
        if self.shared_intermediate_size:
            raise ConfigError(f"shared_intermediate_size must be 0 (MiniMax-M2 has no shared expert), got "
                              f"{self.shared_intermediate_size}")
        self.check_mtp("num_mtp_modules")
        if self.num_mtp_modules and self.mtp_transformer_layers != 1:
            raise ConfigError(f"mtp_transformer_layers must be 1 (one decoder layer per MTP module, as vllm-rbln's "
                              f"minimax_m2_mtp.py builds it), got {self.mtp_transformer_layers}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                              f"({self.num_local_experts})")
        if self.rotary_dim is not None:
            kwargs.setdefault("partial_rotary_factor", self.rotary_dim / self.head_dim)
        elif not (self.rope_parameters or {}).get("partial_rotary_factor"):
            kwargs.setdefault("partial_rotary_factor", 0.5)
        self.check_decoder()
        super().__post_init__(**kwargs)
        rotary = self.head_dim * self.rope_parameters.get("partial_rotary_factor", 1.0)
        if self.rotary_dim is None:
            self.rotary_dim = int(rotary)
        if self.rotary_dim != rotary or not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"rotary_dim ({self.rotary_dim}) must be even, at most head_dim ({self.head_dim}) and "
                              f"agree with rope_parameters' partial_rotary_factor "
                              f"({self.rope_parameters.get('partial_rotary_factor', 1.0)})")


__all__ = ["HfaMiniMaxM2Config"]
