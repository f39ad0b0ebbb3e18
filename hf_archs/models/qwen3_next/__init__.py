from .configuration_qwen3_next import HfaQwen3NextConfig
from .modeling_qwen3_next import HfaQwen3NextForCausalLM, HfaQwen3NextModel

__all__ = ["HfaQwen3NextConfig", "HfaQwen3NextForCausalLM", "HfaQwen3NextModel"]
