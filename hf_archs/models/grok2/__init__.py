from .configuration_grok2 import HfaGrok2Config
from .modeling_grok2 import HfaGrok2ForCausalLM, HfaGrok2Model

__all__ = ["HfaGrok2Config", "HfaGrok2ForCausalLM", "HfaGrok2Model"]
