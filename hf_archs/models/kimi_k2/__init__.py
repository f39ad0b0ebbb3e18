from .configuration_kimi_k2 import HfaKimiK2Config
from .modeling_kimi_k2 import HfaKimiK2ForCausalLM, HfaKimiK2Model

__all__ = ["HfaKimiK2Config", "HfaKimiK2ForCausalLM", "HfaKimiK2Model"]
