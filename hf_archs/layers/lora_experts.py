"""LoRA on fused routed experts without the experts x in x out weight delta.

PEFT's `target_parameters` adapts a fused 3-D expert tensor by parametrizing it: every forward builds
`W + s * B A` for *all* experts (a tensor as large as the expert stack, and its gradient) before the routed
tokens see it. Here the low-rank path runs on the routed tokens only, per expert, next to the base matmul:

    routed tokens of expert e  x_e [n_e, in]
    base:  x_e W_e^T                        (the same per-expert loop as `Experts.forward`)
    LoRA:  s * (x_e A_e^T) B_e^T            A [E, r, in], B [E, out, r]: O(n_e * r * (in + out)) work, no delta

for both fused projections (`gate_up_proj`, `down_proj`). On CUDA the per-expert products run as one grouped
matmul (`torch.nn.functional.grouped_mm`) over the expert-sorted tokens; on the CPU as a loop (CPU grouped_mm
has no backward in torch 2.13).

`ExpertsLoraLayer` follows PEFT's conventions for LoRA layers (`lora_A` / `lora_B` ModuleDicts keyed by adapter,
`merge` / `unmerge` / `get_delta_weight`, `scaling`, `disable_adapters`), so PEFT's own `get_peft_model`,
`save_pretrained`, `PeftModel.from_pretrained`, `merge_and_unload` and `unload` handle it once it is registered
as the LoRA layer for `Experts` (`hf_archs.lora` does that). Saved keys look like
`...mlp.experts.lora_A.gate_up_proj` ([E, r, in]) and `...mlp.experts.lora_B.down_proj` ([E, out, r]).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts

try:  # PEFT is an optional dependency of hf_archs (the [train] extra)
    from peft.tuners.lora.layer import LoraLayer
except ImportError:  # pragma: no cover - exercised only without peft
    LoraLayer = None

ADAPTED = ("gate_up_proj", "down_proj")


def experts_lora_supported(module: nn.Module) -> bool:
    """True when `module` is an `Experts` whose per-expert function is `Experts.expert_forward` and whose forward
    is `Experts.forward` or calls `expert_forward` per expert (subclasses that only change how the k outputs are
    accumulated, say). Anything else is adapted PEFT's way (`target_parameters`)."""
    cls = type(module)
    if not isinstance(module, Experts) or cls.expert_forward is not Experts.expert_forward:
        return False
    if cls.forward is Experts.forward:
        return cls._linear is Experts._linear
    try:
        return "self.expert_forward(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _use_grouped_mm(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    if x.device.type != "cuda" or not hasattr(F, "grouped_mm"):
        return False
    # grouped_mm wants 16-byte aligned rows: every inner dimension times the element size.
    return all((t.shape[-1] * t.element_size()) % 16 == 0 and (t.shape[-2] * t.element_size()) % 16 == 0
               for t in (x, *weights))


_GROUPED_MM_REFUSED: set[tuple[str, torch.dtype]] = set()


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Expert-sorted rows `x` [N, in] times per-expert `weight` [E, in, out], rows `counts[e]` for expert e."""
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_REFUSED and _use_grouped_mm(x, weight):
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        try:
            return F.grouped_mm(x, weight.to(x.dtype), offs=offsets)
        except RuntimeError:  # a dtype / GPU generation the kernel does not support: the loop below
            _GROUPED_MM_REFUSED.add(key)
    out = x.new_empty(x.shape[0], weight.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = x[start:start + n] @ weight[e].to(x.dtype)
            start += n
    return out


class ExpertFactors(nn.Module):
    """One adapter's low-rank factors for the adapted fused tensors of an `Experts` module.

    In `lora_A`: `gate_up_proj` [E, r, H], `down_proj` [E, r, I]. In `lora_B`: `gate_up_proj` [E, 2I, r],
    `down_proj` [E, H, r]. The per-expert orientation is nn.Linear's (A_e maps in -> r, B_e maps r -> out),
    whatever the base layout (`Experts.transposed`).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


if LoraLayer is not None:

    class ExpertsLoraLayer(nn.Module, LoraLayer):
        """PEFT LoRA layer for `hf_archs.layers.moe.Experts` (see the module docstring)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0,
                     lora_alpha: int = 1, **kwargs: Any) -> None:
            super().__init__()
            LoraLayer.__init__(self, base_layer, **{k: v for k, v in kwargs.items()
                                                    if k == "ephemeral_gpu_offload"})
            base = self.get_base_layer()
            if not experts_lora_supported(base):
                raise ValueError(f"{type(base).__name__} overrides Experts' forward: adapt its fused tensors with "
                                 "PEFT's target_parameters instead (hf_archs.lora_targets does this)")
            for option, bad in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias),
                                ("fan_in_fan_out", config.fan_in_fan_out)):
                if bad:
                    raise ValueError(f"LoRA on fused experts does not support {option}=True")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

        # --- PEFT hooks ------------------------------------------------------------------------------------
        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.hidden_size, module.hidden_size

        def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
            p = base_layer.gate_up_proj
            return p.device, p.dtype

        def _shapes(self, r: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
            base = self.get_base_layer()
            e, h, i = base.num_experts, base.hidden_size, base.intermediate_size
            a = {"gate_up_proj": (e, r, h), "down_proj": (e, r, i)}
            b = {"gate_up_proj": (e, 2 * i, r), "down_proj": (e, h, r)}
            return a, b

        def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
            if r <= 0:
                raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
            if self.resolve_lora_variant(config=config) is not None:
                raise ValueError("LoRA on fused experts does not support LoRA variants (DoRA, aLoRA, ...)")
            self.r[adapter_name] = r
            self.lora_alpha[adapter_name] = lora_alpha
            self.lora_dropout[adapter_name] = (nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0
                                               else nn.Identity())
            shapes_a, shapes_b = self._shapes(r)
            self.lora_A[adapter_name] = ExpertFactors(shapes_a)
            self.lora_B[adapter_name] = ExpertFactors(shapes_b)
            self.lora_bias[adapter_name] = False
            self.use_rslora[adapter_name] = config.use_rslora
            self.use_dora[adapter_name] = False
            self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
            self.reset_lora_parameters(adapter_name, config.init_lora_weights)
            self._move_adapter_to_device_of_base_layer(adapter_name)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

        def reset_lora_parameters(self, adapter_name: str, init_lora_weights: Any) -> None:
            """PEFT's initialisations for lora.Linear, per expert: A Kaiming-uniform (or N(0, 1/r) for "gaussian"),
            B zero so the adapter starts as the identity; `False` leaves both random (tests)."""
            if adapter_name not in self.lora_A:
                return
            a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
            with torch.no_grad():
                for name in ADAPTED:
                    wa, wb = getattr(a, name), getattr(b, name)
                    for e in range(wa.shape[0]):
                        if init_lora_weights == "gaussian":
                            nn.init.normal_(wa[e], std=1 / self.r[adapter_name])
                        else:
                            nn.init.kaiming_uniform_(wa[e], a=math.sqrt(5))
                        if init_lora_weights is False:
                            nn.init.kaiming_uniform_(wb[e], a=math.sqrt(5))
                    if init_lora_weights is not False:
                        wb.zero_()

        def get_delta_weight(self, adapter: str) -> dict[str, torch.Tensor]:
            """The full delta of each fused tensor, in the base tensor's layout: used only to merge / unmerge."""
            base = self.get_base_layer()
            a, b, s = self.lora_A[adapter], self.lora_B[adapter], self.scaling[adapter]
            out = {}
            for name in ADAPTED:
                param = getattr(base, name)
                delta = torch.bmm(getattr(b, name).float(), getattr(a, name).float()) * s  # [E, out, in]
                if base.transposed:
                    delta = delta.transpose(1, 2)
                out[name] = delta.to(param.device, param.dtype)
            return out

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            base = self.get_base_layer()
            for adapter in check_adapters_to_merge(self, adapter_names):
                if adapter not in self.lora_A:
                    continue
                for name, delta in self.get_delta_weight(adapter).items():
                    param = getattr(base, name)
                    merged = param.data + delta
                    if safe_merge and not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                    param.data = merged
                self.merged_adapters.append(adapter)

        def unmerge(self) -> None:
            base = self.get_base_layer()
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                if adapter in self.lora_A:
                    for name, delta in self.get_delta_weight(adapter).items():
                        getattr(base, name).data -= delta

        def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
            return False

        # --- forward -----------------------------------------------------------------------------------------
        def _project(self, x: torch.Tensor, name: str, counts: list[int], adapters: list[str]) -> torch.Tensor:
            """Expert-sorted rows through one fused projection plus each active adapter's low-rank path."""
            base = self.get_base_layer()
            weight = getattr(base, name)  # [E, out, in], or [E, in, out] when transposed
            bias = getattr(base, name + "_bias")
            y = grouped_matmul(x, weight if base.transposed else weight.transpose(1, 2), counts)
            if bias is not None:
                expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=x.device),
                                                        torch.tensor(counts, device=x.device))
                y = y + bias[expert_of_row].to(y.dtype)
            for adapter in adapters:
                a = getattr(self.lora_A[adapter], name)  # [E, r, in]
                b = getattr(self.lora_B[adapter], name)  # [E, out, r]
                xa = self.lora_dropout[adapter](self._cast_input_dtype(x, a.dtype))
                low = grouped_matmul(xa, a.transpose(1, 2), counts)  # [N, r]
                y = y + (grouped_matmul(low, b.transpose(1, 2), counts) * self.scaling[adapter]).to(y.dtype)
            return y

        def _lora_expert_forward(self, adapters: list[str]):
            """`Experts.expert_forward` plus each adapter's low-rank path, for subclasses with their own forward."""
            base = self.get_base_layer()

            def expert_forward(x: torch.Tensor, e: int) -> torch.Tensor:
                def low_rank(inp: torch.Tensor, name: str) -> torch.Tensor:
                    total = 0
                    for adapter in adapters:
                        a = getattr(self.lora_A[adapter], name)[e]  # [r, in]
                        b = getattr(self.lora_B[adapter], name)[e]  # [out, r]
                        xa = self.lora_dropout[adapter](self._cast_input_dtype(inp, a.dtype))
                        total = total + (xa @ a.t()) @ b.t() * self.scaling[adapter]
                    return total

                gb = None if base.gate_up_proj_bias is None else base.gate_up_proj_bias[e]
                db = None if base.down_proj_bias is None else base.down_proj_bias[e]
                gate_up = base._linear(x, base.gate_up_proj[e], gb)
                gate_up = gate_up + low_rank(x, "gate_up_proj").to(gate_up.dtype)
                gate, up = (gate_up[..., 0::2], gate_up[..., 1::2]) if base.interleaved else gate_up.chunk(2, dim=-1)
                h = base.glu(gate, up)
                out = base._linear(h, base.down_proj[e], db)
                return out + low_rank(h, "down_proj").to(out.dtype)

            return expert_forward

        def _touch_all(self, out: torch.Tensor, adapters: list[str]) -> torch.Tensor:
            """Adds 0 x every factor, so experts that got no token still take part in the graph (their gradient
            is a true zero; data-parallel wrappers need every trainable parameter in every backward)."""
            if not (torch.is_grad_enabled() and self.training):
                return out
            zero = sum(p.sum() for a in adapters for f in (self.lora_A[a], self.lora_B[a]) for p in f.parameters()
                       if p.requires_grad)
            return out if isinstance(zero, int) else out + (zero * 0).to(out.dtype)

        def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor | None,
                    *args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs.pop("adapter_names", None) is not None:
                raise ValueError("LoRA on fused experts does not support mixed adapter batches")
            base = self.get_base_layer()
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return base(x, top_k_index, top_k_weights, *args, **kwargs)
            adapters = [a for a in self.active_adapters if a in self.lora_A]
            if self.merged or not adapters:
                return base(x, top_k_index, top_k_weights, *args, **kwargs)
            if type(base).forward is not Experts.forward:
                # A subclass with its own accumulation: run its forward with the LoRA-augmented per-expert function.
                base.expert_forward = self._lora_expert_forward(adapters)
                try:
                    return self._touch_all(base(x, top_k_index, top_k_weights, *args, **kwargs), adapters)
                finally:
                    del base.expert_forward
            # Same routing bookkeeping as Experts.forward: assignments sorted by expert, contiguous per expert.
            tokens, k = top_k_index.shape
            flat = top_k_index.reshape(-1)
            order = torch.argsort(flat, stable=True)
            token_of = order // k
            counts = torch.bincount(flat, minlength=base.num_experts).tolist()
            routed = x[token_of]  # [T * k, H]
            gate_up = self._project(routed, "gate_up_proj", counts, adapters)  # [T * k, 2I]
            if base.interleaved:
                gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
            else:
                gate, up = gate_up.chunk(2, dim=-1)
            out = self._project(base.glu(gate, up), "down_proj", counts, adapters).to(x.dtype)  # [T * k, H]
            return self._touch_all(base.combine(out, x, top_k_weights, order, token_of), adapters)

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

else:  # pragma: no cover
    ExpertsLoraLayer = None
