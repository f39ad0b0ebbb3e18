from .configuration_qwen3_moe import HfaQwen3MoeConfig
from .modeling_qwen3_moe import HfaQwen3MoeForCausalLM, HfaQwen3MoeModel

__all__ = ["HfaQwen3MoeConfig", "HfaQwen3MoeForCausalLM", "HfaQwen3MoeModel"]
