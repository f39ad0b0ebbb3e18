"""From the tensors a release holds to the tensors our model needs: a checked plan, before any data is read.

Stage 1 (`logical_tensors`): quantized storage is grouped into logical weights (an FP8 weight and its
`weight_scale_inv`, compressed-tensors' packed INT4 triples, MXFP4 blocks and scales), each a `Producer` that
dequantizes when called. Stage 2 (`plan_tensors`): logical names are mapped to ours by the architecture's declared
rules (skip with a reason, rename, fuse per-expert tensors) and checked against the model's state_dict: every
missing, unexpected or mis-shaped tensor is named in one error.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_archs.errors import CheckpointError
from hf_archs.registry import Architecture, FuseExperts

from . import dequant
from .io import Reader, Release, TensorInfo

logger = logging.getLogger(__name__)


@dataclass
class Producer:
    """One tensor of ours (or of the release's logical view): its shape, what it reads, how to make it."""

    shape: tuple[int, ...]
    sources: list[tuple[Path, str]]
    make: Callable[[Reader], torch.Tensor]
    dequantized: bool = False
    dtype: str | None = None  # the stored dtype (safetensors name) of a tensor read as is
    # (reader, dtype) -> the tensor in dtype, bit for bit `make(reader).to(dtype)`, where producing it straight in
    # dtype saves a pass and a full-size fp32 copy (dequantization rounds each fp32 chunk once into the output).
    make_as: Callable[[Reader, torch.dtype], torch.Tensor] | None = None

    def produce(self, reader: Reader, dtype: torch.dtype) -> torch.Tensor:
        """The tensor in `dtype`."""
        return self.make(reader).to(dtype) if self.make_as is None else self.make_as(reader, dtype)


def _direct(info: TensorInfo) -> Producer:
    return Producer(info.shape, [(info.file, info.name)], lambda r, i=info: r.get(i.file, i.name), dtype=info.dtype)


def _some(names: list[str], limit: int = 20) -> str:
    shown = str(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def quantization(official: dict[str, Any], text_config_key: str | None = None) -> dict[str, Any] | None:
    quant = official.get("quantization_config")
    if quant is None and text_config_key:
        quant = (official.get(text_config_key) or {}).get("quantization_config")
    return quant


def logical_tensors(release: Release, quant: dict[str, Any] | None) -> tuple[dict[str, Producer], list[str]]:
    """Group quantized storage into logical weights. Returns (name -> producer, notes on what was dequantized)."""
    tensors = dict(release.tensors)
    out: dict[str, Producer] = {}
    notes: list[str] = []
    method = (quant or {}).get("quant_method")
    if method == "fp8":
        block = tuple(quant.get("weight_block_size") or (dequant.FP8_BLOCK, dequant.FP8_BLOCK))
        for name in [n for n in tensors if n.endswith("_scale_inv")]:
            weight = tensors.get(name[: -len("_scale_inv")])
            if weight is None:
                continue
            scale = tensors.pop(name)
            del tensors[weight.name]
            make_as = (lambda r, dt, w=weight, s=scale: dequant.fp8_block(
                r.get(w.file, w.name), r.get(s.file, s.name), block, dtype=dt))
            out[weight.name] = Producer(weight.shape, [(weight.file, weight.name), (scale.file, scale.name)],
                                        lambda r, f=make_as: f(r, torch.float32), make_as=make_as)
        notes.append(f"fp8 e4m3 with {list(block)} block scales dequantized")
    elif method == "compressed-tensors":
        for name in [n for n in tensors if n.endswith(".weight_packed")]:
            base = name[: -len(".weight_packed")]
            parts = [tensors.pop(f"{base}.{p}", None) for p in ("weight_packed", "weight_scale", "weight_shape")]
            if None in parts:
                raise CheckpointError(f"{base}: pack-quantized weight without its weight_scale / weight_shape")
            packed, scale, shape_t = parts
            group = _group_size(quant, base)
            out[f"{base}.weight"] = Producer(
                (packed.shape[0], scale.shape[1] * group), [(p.file, p.name) for p in parts],
                lambda r, p=packed, s=scale, t=shape_t, g=group: dequant.int4_pack(
                    r.get(p.file, p.name), r.get(s.file, s.name), r.get(t.file, t.name), g))
            out[f"{base}.weight"].shape = None  # the exact width comes from weight_shape; resolved below
        for name in [n for n in tensors if n.endswith(".weight_scale")]:
            base = name[: -len(".weight_scale")]
            weight = tensors.get(f"{base}.weight")
            if weight is None or not weight.dtype.startswith("F8"):
                continue
            scale = tensors.pop(name)
            del tensors[weight.name]
            tensors.pop(f"{base}.input_scale", None)  # a static activation scale: unused once weights are dequantized
            make_as = (lambda r, dt, w=weight, s=scale: dequant.fp8_scaled(
                r.get(w.file, w.name), r.get(s.file, s.name), dtype=dt))
            out[weight.name] = Producer(weight.shape, [(weight.file, weight.name), (scale.file, scale.name)],
                                        lambda r, f=make_as: f(r, torch.float32), make_as=make_as)
        notes.append("compressed-tensors weights dequantized")
    elif method == "mxfp4":
        for name in [n for n in tensors if n.endswith("_blocks")]:
            base = name[: -len("_blocks")]
            scales = tensors.pop(f"{base}_scales", None)
            if scales is None:
                raise CheckpointError(f"{name}: mxfp4 blocks without {base}_scales")
            blocks = tensors.pop(name)
            out[base] = Producer((*blocks.shape[:-2], blocks.shape[-2] * 32),
                                 [(blocks.file, blocks.name), (scales.file, scales.name)],
                                 lambda r, b=blocks, s=scales: dequant.mxfp4(r.get(b.file, b.name),
                                                                             r.get(s.file, s.name)))
        notes.append("mxfp4 blocks dequantized")
    elif method is not None:
        raise CheckpointError(f"{release.root}: quantization method {method!r} is not supported "
                              f"(supported: fp8, compressed-tensors, mxfp4)")
    for prod in out.values():
        prod.dequantized = True
    for name, info in tensors.items():
        out[name] = _direct(info)
    # Resolve int4 widths from the small weight_shape tensors (read now: two ints each).
    pending = [(n, p) for n, p in out.items() if p.shape is None]
    if pending:
        with Reader() as r:
            for n, p in pending:
                f, t = p.sources[2]
                p.shape = tuple(int(v) for v in r.get(f, t).tolist())
    return out, notes


def _group_size(quant: dict[str, Any], base: str) -> int:
    for group in (quant.get("config_groups") or {}).values():
        weights = (group or {}).get("weights") or {}
        if weights.get("group_size"):
            return int(weights["group_size"])
    return 32


_EXPERT = re.compile(r"^(?P<module>.*\.experts)\.(?P<e>\d+)\.(?P<rest>.+)$")


@functools.cache
def _prefix_pattern(prefix: str) -> re.Pattern[str]:
    """A `skip_keys` prefix as a regex: literal, except that a `*` component matches any one name component."""
    return re.compile(r"[^.]+".join(re.escape(part) for part in prefix.split("*")))


def skip_reason(arch: Architecture, name: str, decoder_layers: int | None = None) -> str | None:
    """The reason of the declared rule that skips an official tensor name, or None.

    With `decoder_layers` (the config's `num_hidden_layers`) and an architecture with MTP modules after its
    decoder (`optional_mtp`), a rule never skips a name under one of the decoder's own layers: those rules are for
    the MTP layers (MiniMax-M2's embedding copy), and such a tensor under a decoder layer is unexpected.
    """
    for prefix, reason in arch.skip_keys:
        if name.startswith(prefix) if "*" not in prefix else _prefix_pattern(prefix).match(name):
            if decoder_layers is not None and arch.optional_mtp is not None:
                index = layer_index(name, arch.optional_mtp[0])
                if index is not None and index < decoder_layers:
                    continue
            return reason
    return None


def layer_index(name: str, prefix: str) -> int | None:
    """i of a tensor name under `<prefix><i>.` (`model.layers.` say), or None."""
    if not name.startswith(prefix):
        return None
    index = name[len(prefix):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def map_name(arch: Architecture, name: str, decoder_layers: int | None = None) -> str | None:
    """Our tensor name for an official one, or None when a declared rule skips it (`skip_reason`)."""
    if skip_reason(arch, name, decoder_layers) is not None:
        return None
    for pattern, repl in arch.key_renames:
        new, n = re.subn(pattern, repl, name, count=1)
        if n:
            return new
    return name


def plan_tensors(arch: Architecture, expected: dict[str, tuple[int, ...]], logical: dict[str, Producer],
                 optional: Iterable[str] = (), model_name: str = "the model", decoder_layers: int | None = None
                 ) -> tuple[dict[str, Producer], dict[str, int]]:
    """Map the release's logical tensors onto `expected` (our name -> shape). Raises on any problem.
    Returns the plan and the count of tensors skipped per declared reason. `decoder_layers`: see `skip_reason`."""
    def fusion(module: str, rest: str) -> tuple[int, FuseExperts] | None:
        """(source index, rule) of a per-expert tensor `<module>.<e>.<rest>`: the rule's module must end the name."""
        for rule in arch.fuse_experts:
            if rest in rule.sources and (module == rule.module or module.endswith("." + rule.module)):
                return rule.sources.index(rest), rule
        return None

    transposed = set(arch.dequant_transposed)
    plan: dict[str, Producer] = {}
    grids: dict[str, dict[int, dict[int, Producer]]] = {}
    unexpected, mis_shaped, missing_experts = [], [], []
    skipped: dict[str, int] = {}
    names: dict[int, str] = {}  # id(producer) -> official name, for per-expert messages
    for name, prod in logical.items():
        reason = skip_reason(arch, name, decoder_layers)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        ours = map_name(arch, name, decoder_layers)
        if prod.dequantized and ours.rsplit(".", 1)[-1] in transposed:
            # Quantized storage is [.., out, in]; this architecture keeps the tensor as [.., in, out].
            prod = Producer((*prod.shape[:-2], prod.shape[-1], prod.shape[-2]), prod.sources,
                            lambda r, p=prod: p.make(r).transpose(-1, -2).contiguous(), dequantized=True,
                            make_as=lambda r, dt, p=prod: p.produce(r, dt).transpose(-1, -2).contiguous())
        m = _EXPERT.match(ours)
        fused = fusion(m["module"], m["rest"]) if m and ours not in expected else None
        if fused is not None:
            i, rule = fused
            grids.setdefault(f"{m['module']}.{rule.target}", {}).setdefault(int(m["e"]), {})[i] = prod
            names[id(prod)] = name
        elif ours not in expected:
            unexpected.append(name)
        elif expected[ours] != prod.shape:
            mis_shaped.append(f"{name}: checkpoint {list(prod.shape)}, model {list(expected[ours])}")
        else:
            plan[ours] = prod
    for target, grid in grids.items():
        rule = next(r for r in arch.fuse_experts if target.endswith(f".{r.module}.{r.target}")
                    or target == f"{r.module}.{r.target}")
        if target not in expected:
            unexpected.extend(f"{target[: -len(rule.target) - 1]}.{e}.*" for e in grid)
            continue
        num_experts = expected[target][0]
        module = target[: -len(rule.target) - 1]
        holes = [f"{module}.{e}.{src}" for e in range(num_experts) for i, src in enumerate(rule.sources)
                 if i not in grid.get(e, {})]
        extra = [f"{module}.{e}.*" for e in grid if e >= num_experts]
        if holes or extra:
            missing_experts.extend(holes)
            unexpected.extend(extra)
            continue
        rows = [[grid[e][i] for i in range(len(rule.sources))] for e in range(num_experts)]
        in_dim = rows[0][0].shape[1]
        out_dim = sum(p.shape[0] for p in rows[0])
        fused = (num_experts, in_dim, out_dim) if rule.transposed else (num_experts, out_dim, in_dim)
        if fused != expected[target] or any(len(p.shape) != 2 or p.shape[1] != in_dim for row in rows for p in row):
            # Name each per-expert tensor off the shape the model needs (the sources split the rows evenly).
            want_out, want_in = expected[target][:0:-1] if rule.transposed else expected[target][1:]
            want = (want_out // len(rule.sources), want_in)
            odd = [f"{names[id(p)]}: checkpoint {list(p.shape)}, model {list(want)} (into {target})"
                   for row in rows for p in row if tuple(p.shape) != want]
            mis_shaped.extend(odd or [f"{target} (from {len(rows)} experts x {list(rule.sources)}): checkpoint "
                                      f"{list(fused)}, model {list(expected[target])}"])
            continue

        def make_as(r: Reader, dtype: torch.dtype | None, rows=rows, rule=rule, shape=expected[target]
                    ) -> torch.Tensor:
            # Each expert's sources straight into their rows of the fused tensor: peak memory the fused tensor and
            # one source, not every expert twice (a list, then the stack). dtype None: the sources' (promoted).
            out = None if dtype is None else torch.empty(shape, dtype=dtype)
            for e, row in enumerate(rows):
                o0 = 0
                for p in row:
                    w = p.make(r) if dtype is None else p.produce(r, dtype)  # [out_i, in]
                    if out is None or torch.promote_types(out.dtype, w.dtype) != out.dtype:
                        out = (torch.empty(shape, dtype=w.dtype) if out is None
                               else out.to(torch.promote_types(out.dtype, w.dtype)))
                    rows_of = slice(o0, o0 + w.shape[0])
                    (out[e, :, rows_of] if rule.transposed else out[e, rows_of]).copy_(w.T if rule.transposed else w)
                    o0 += w.shape[0]
                    del w
            return out

        plan[target] = Producer(expected[target], [s for row in rows for p in row for s in p.sources],
                                lambda r, f=make_as: f(r, None), make_as=make_as)
    missing = sorted(set(expected) - set(plan) - set(optional) - set(grids))
    problems = []
    if missing or missing_experts:
        problems.append(f"missing tensors: {_some(missing_experts + missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_some(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors: {_some(mis_shaped)}")
    if problems:
        raise CheckpointError(f"cannot load the release into {model_name}: " + "; ".join(problems))
    for reason, count in skipped.items():
        logger.info("hf_archs: skipped %d tensors of the release (%s)", count, reason)
    return plan, skipped
