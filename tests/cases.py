"""One tiny case per architecture: an official-layout config.json dict, and how to build transformers' reference.

A new architecture joins the contract suite by adding one `Case` here. Each tiny config keeps every layer type
of the real model and windows / chunks shorter than `SEQ_LEN`, so parity covers positions past them.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SEQ_LEN = 24  # longer than every tiny window below


@dataclass
class Case:
    name: str  # registry name
    official: dict[str, Any]  # config.json of a tiny release, official model_type and field names
    reference: Callable[[dict[str, Any]], torch.nn.Module]  # transformers' own CausalLM from `official`
    # Writes the release in its publisher's layout from the reference model (default: save_pretrained).
    write_release: Callable[[torch.nn.Module, dict[str, Any], Path], None] | None = None
    # Reference state_dict -> ours, where transformers' in-memory names differ from the release's (which ours
    # keep): e.g. transformers renames MiniMax-M2's `block_sparse_moe` to `mlp`. Default: the same names.
    to_ours: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    # For the bf16 bit-exactness test: a context manager under which the reference runs this package's
    # linear-attention kernels (the reference's own torch fallback sums in another order).
    bf16_reference_kernels: Callable[[], Any] | None = None
    head_dim_given: bool = True
    layer_types_field: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def official_config(self) -> dict[str, Any]:
        return copy.deepcopy(self.official)


def _from_transformers(config_cls: str, model_cls: str) -> Callable[[dict[str, Any]], torch.nn.Module]:
    def build(official: dict[str, Any]) -> torch.nn.Module:
        import transformers

        cfg = {k: v for k, v in official.items() if k not in ("model_type", "architectures")}
        config = getattr(transformers, config_cls)(**cfg)
        config._attn_implementation = "eager"
        return getattr(transformers, model_cls)(config).eval()

    return build


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)

CASES: list[Case] = [
    Case(
        name="qwen3",
        official=dict(TINY, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16, rope_theta=10000.0,
                      use_sliding_window=True, sliding_window=8, max_window_layers=2, tie_word_embeddings=False),
        reference=_from_transformers("Qwen3Config", "Qwen3ForCausalLM"),
    ),
]

# Each other architecture adds its case in tests/case_<name>.py (a module-level `CASE`).
for _path in sorted(Path(__file__).parent.glob("case_*.py")):
    CASES.append(importlib.import_module(_path.stem).CASE)

BY_NAME = {c.name: c for c in CASES}
