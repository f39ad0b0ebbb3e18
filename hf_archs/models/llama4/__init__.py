from .configuration_llama4 import HfaLlama4Config
from .modeling_llama4 import HfaLlama4ForCausalLM, HfaLlama4Model

__all__ = ["HfaLlama4Config", "HfaLlama4ForCausalLM", "HfaLlama4Model"]
