from .configuration_gemma3 import HfaGemma3Config
from .modeling_gemma3 import HfaGemma3ForCausalLM, HfaGemma3Model

__all__ = ["HfaGemma3Config", "HfaGemma3ForCausalLM", "HfaGemma3Model"]
