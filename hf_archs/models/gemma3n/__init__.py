from .configuration_gemma3n import HfaGemma3nConfig
from .modeling_gemma3n import HfaGemma3nForCausalLM, HfaGemma3nModel

__all__ = ["HfaGemma3nConfig", "HfaGemma3nForCausalLM", "HfaGemma3nModel"]
