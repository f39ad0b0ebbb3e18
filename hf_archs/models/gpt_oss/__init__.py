from .configuration_gpt_oss import HfaGptOssConfig
from .modeling_gpt_oss import HfaGptOssForCausalLM, HfaGptOssModel

__all__ = ["HfaGptOssConfig", "HfaGptOssForCausalLM", "HfaGptOssModel"]
