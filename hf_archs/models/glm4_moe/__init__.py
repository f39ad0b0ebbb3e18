from .configuration_glm4_moe import HfaGlm4MoeConfig
from .modeling_glm4_moe import HfaGlm4MoeForCausalLM, HfaGlm4MoeModel

__all__ = ["HfaGlm4MoeConfig", "HfaGlm4MoeForCausalLM", "HfaGlm4MoeModel"]
