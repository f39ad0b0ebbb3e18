"""What every config here shares: validation with messages naming the field, and the per-layer RoPE plan."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def fused_experts_ep_plan(prefix: str, bias: bool = False) -> dict[str, str]:
    """transformers' expert-parallel plan for fused `Experts` at `prefix` (e.g. "layers.*.mlp.experts"): each rank
    keeps its share of the experts, tokens are dispatched to them."""
    plan = {f"{prefix}.gate_up_proj": "grouped_gemm"}
    if bias:
        plan[f"{prefix}.gate_up_proj_bias"] = "grouped_gemm"
    plan[f"{prefix}.down_proj"] = "grouped_gemm"
    if bias:
        plan[f"{prefix}.down_proj_bias"] = "grouped_gemm"
    plan[prefix] = "ep_dispatch_experts"
    return plan


class DecoderConfigMixin:
    """Mixed into each architecture's `PreTrainedConfig` dataclass; adds methods only, never fields.

    `rope_parameters` is either one dict (every RoPE layer alike) or a dict keyed by layer type
    (Gemma 3: local and global layers have their own base). `allowed_layer_types` lists what `layer_types` may hold.
    """

    # Pipeline stages of every decoder here: embeddings, the layer stack, the final norm.
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    allowed_layer_types: tuple[str, ...] = ("full_attention",)

    def check_mtp(self, count_field: str = "num_nextn_predict_layers") -> None:
        """Raise `ConfigError` unless the MTP module count (`count_field`) and `mtp_loss_weight` are >= 0."""
        count = getattr(self, count_field)
        if count < 0 or self.mtp_loss_weight < 0:
            raise ConfigError(f"{count_field} ({count}) and mtp_loss_weight ({self.mtp_loss_weight}) must be >= 0")

    def check_decoder(self, head_dim_given: bool = True) -> None:
        """Raise `ConfigError` naming the field for shapes that cannot build a model."""
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not head_dim_given and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                              f"({self.num_attention_heads})")
        kv = getattr(self, "num_key_value_heads", None) or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) is not divisible by "
                              f"num_key_value_heads ({kv})")
        types = self.layer_types
        if len(types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(types)} entries but num_hidden_layers is "
                              f"{self.num_hidden_layers}")
        unknown = sorted(set(types) - set(self.allowed_layer_types))
        if unknown:
            raise ConfigError(f"layer_types has unknown entries {unknown}; allowed: {list(self.allowed_layer_types)}")

    def _rope_nested(self) -> bool:
        params = self.rope_parameters or {}
        return bool(params) and all(isinstance(v, dict) or v is None for v in params.values())

    def rope_variants(self) -> dict[str, dict[str, Any]]:
        """Name -> rope_parameters for each distinct RoPE used by some layer."""
        if self._rope_nested():
            used = {self.layer_types[i] for i in range(self.num_hidden_layers) if self.layer_uses_rope(i)}
            return {k: v for k, v in self.rope_parameters.items() if k in used and v is not None}
        return {"default": self.rope_parameters} if any(map(self.layer_uses_rope, range(self.num_hidden_layers))) else {}

    def layer_uses_rope(self, layer_idx: int) -> bool:
        return True

    def rope_variant_of_layer(self, layer_idx: int) -> str | None:
        if not self.layer_uses_rope(layer_idx):
            return None
        return self.layer_types[layer_idx] if self._rope_nested() else "default"
