from .configuration_minimax_m2 import HfaMiniMaxM2Config
from .modeling_minimax_m2 import HfaMiniMaxM2ForCausalLM, HfaMiniMaxM2Model

__all__ = ["HfaMiniMaxM2Config", "HfaMiniMaxM2ForCausalLM", "HfaMiniMaxM2Model"]
