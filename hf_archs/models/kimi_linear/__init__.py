from .configuration_kimi_linear import HfaKimiLinearConfig
from .modeling_kimi_linear import HfaKimiLinearForCausalLM, HfaKimiLinearModel

__all__ = ["HfaKimiLinearConfig", "HfaKimiLinearForCausalLM", "HfaKimiLinearModel"]
