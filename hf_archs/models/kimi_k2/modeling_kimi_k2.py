"""Kimi K2: the DeepSeek V3 architecture (MLA, sigmoid router with a balancing bias, a shared expert, dense first
layer) at K2's dimensions; only the config (model_type `kimi_k2`, K2's defaults) is its own.
See `hf_archs/models/deepseek_v3/modeling_deepseek_v3.py`.
"""

from __future__ import annotations

from ..deepseek_v3.modeling_deepseek_v3 import (
    HfaDeepseekV3ForCausalLM,
    HfaDeepseekV3Model,
    HfaDeepseekV3PreTrainedModel,
)
from .configuration_kimi_k2 import HfaKimiK2Config


class HfaKimiK2PreTrainedModel(HfaDeepseekV3PreTrainedModel):
    config_class = HfaKimiK2Config


class HfaKimiK2Model(HfaKimiK2PreTrainedModel, HfaDeepseekV3Model):
    pass


class HfaKimiK2ForCausalLM(HfaKimiK2PreTrainedModel, HfaDeepseekV3ForCausalLM):
    base_model_class = HfaKimiK2Model


__all__ = ["HfaKimiK2ForCausalLM", "HfaKimiK2Model", "HfaKimiK2PreTrainedModel"]
