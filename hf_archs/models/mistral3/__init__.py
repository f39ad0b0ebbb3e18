from .configuration_mistral3 import HfaMistral3Config
from .modeling_mistral3 import HfaMistral3ForCausalLM, HfaMistral3Model

__all__ = ["HfaMistral3Config", "HfaMistral3ForCausalLM", "HfaMistral3Model"]
