"""Blocks named after the math, built from explicit keyword arguments (never a config object or model name)."""

from .attention import Attention, attend, attention_function, eager_attention
from .linear import Linear
from .mlp import GatedMLP
from .norms import RMSNorm
from .rope import RotaryEmbedding, apply_rope, rope_inv_freq

__all__ = ["Attention", "GatedMLP", "Linear", "RMSNorm", "RotaryEmbedding", "apply_rope", "attend", "attention_function",
           "eager_attention", "rope_inv_freq"]
