from .configuration_deepseek_v3 import HfaDeepseekV3Config
from .modeling_deepseek_v3 import HfaDeepseekV3ForCausalLM, HfaDeepseekV3Model

__all__ = ["HfaDeepseekV3Config", "HfaDeepseekV3ForCausalLM", "HfaDeepseekV3Model"]
