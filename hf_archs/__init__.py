"""hf_archs: the open-weight LLM architectures of 2025 as transformers plugins.

`import hf_archs` registers every architecture with AutoConfig / AutoModel / AutoModelForCausalLM under
`hfa_<name>`; `hf_archs.from_official(path)` loads an official release directory strictly.
"""

from .errors import CheckpointError, ConfigError, InputError
from .official import config_from_official, from_official
from .presets import preset
from .registry import ARCHITECTURES, Architecture, by_official_model_type, register_all

__version__ = "0.1.0"

_registration_failures = register_all()

try:  # also registers the experts LoRA layer and the hfa_* default targets with PEFT
    from .lora import lora_targets
except ImportError:  # peft is an optional dependency ([train])
    lora_targets = None

__all__ = ["ARCHITECTURES", "Architecture", "CheckpointError", "ConfigError", "InputError", "__version__",
           "by_official_model_type", "config_from_official", "from_official", "lora_targets", "preset", "register_all"]
