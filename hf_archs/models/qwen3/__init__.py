from .configuration_qwen3 import HfaQwen3Config
from .modeling_qwen3 import HfaQwen3ForCausalLM, HfaQwen3Model

__all__ = ["HfaQwen3Config", "HfaQwen3ForCausalLM", "HfaQwen3Model"]
