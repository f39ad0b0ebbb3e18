from .configuration_smollm3 import HfaSmolLM3Config
from .modeling_smollm3 import HfaSmolLM3ForCausalLM, HfaSmolLM3Model

__all__ = ["HfaSmolLM3Config", "HfaSmolLM3ForCausalLM", "HfaSmolLM3Model"]
