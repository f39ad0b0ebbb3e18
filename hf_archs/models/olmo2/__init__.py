from .configuration_olmo2 import HfaOlmo2Config
from .modeling_olmo2 import HfaOlmo2ForCausalLM, HfaOlmo2Model

__all__ = ["HfaOlmo2Config", "HfaOlmo2ForCausalLM", "HfaOlmo2Model"]
