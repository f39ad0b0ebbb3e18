"""Grok 2 / 2.5's release: safetensors pre-sharded for 8-way tensor parallelism (xai-org/grok-2).

Files are named `*-TP-common.safetensors` (whole tensors: embeddings, attention, norms, router, the dense residual
MLP, lm_head) and `*-TP-000.safetensors` ... `*-TP-007.safetensors` (one rank's slice each, under the unsharded
name). Only the routed experts are pre-sharded (SGLang: `load_presharded_moe` defaults to True, attention / MLP /
embedding presharding to False): rank r holds rows r*I/8 .. (r+1)*I/8 of `experts.E.w1` and `w3` ([I, H] each) and
the same columns of `experts.E.w2` ([H, I]); they are joined in rank order, w1 / w3 along rows, w2 along columns.
Names are otherwise the ones SGLang loads and the grok2 architecture keeps (its declared rule fuses the per-expert
w1 / w3 / w2). config.json says `model_type: "git"` (transformers' GIT captioner: never trusted) and
`architectures: ["Grok1ForCausalLM"]`, which is how the architecture is found.
Sources: sgl-project/sglang `python/sglang/srt/models/grok.py` (`_prepare_presharded_weights`: the rank's
`*-TP-{rank:03d}.safetensors` plus every `*-TP-common.safetensors`), llama.cpp's `GrokModel.modify_tensors`
(w1 / w3 joined along dim 0, w2 along dim 1); ../shared/docs/official-releases.md §11.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from hf_archs.errors import CheckpointError

from .io import TensorInfo, read_header
from .plan import Producer

_RANK_FILE = re.compile(r"^(?P<stem>.+)-TP-(?P<rank>\d{3})\.safetensors$")
_COMMON_FILE = re.compile(r"^.+-TP-common\.safetensors$")
# Pre-sharded tensors and the dimension their rank slices join along.
_JOIN = [(re.compile(r"\.experts\.\d+\.(w1|w3)\.weight$"), 0), (re.compile(r"\.experts\.\d+\.w2\.weight$"), 1)]


def _files(root: Path) -> tuple[list[Path], dict[int, list[Path]]]:
    common, ranks = [], {}
    for p in sorted(root.glob("*.safetensors")):
        if _COMMON_FILE.match(p.name):
            common.append(p)
        elif m := _RANK_FILE.match(p.name):
            ranks.setdefault(int(m["rank"]), []).append(p)
        else:
            raise CheckpointError(f"{p}: neither a *-TP-common nor a *-TP-NNN shard of a pre-sharded release")
    if not common or not ranks:
        raise CheckpointError(f"{root}: no *-TP-common.safetensors / *-TP-NNN.safetensors files")
    if sorted(ranks) != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(f"{root}: the files of tensor-parallel ranks {missing} are missing")
    return common, ranks


def _infos(file: Path) -> list[TensorInfo]:
    return [TensorInfo(file, name, tuple(meta["shape"]), meta["dtype"])
            for name, meta in read_header(file).items() if name != "__metadata__"]


def official_config(root: Path) -> dict[str, Any]:
    from .formats import read_json

    return read_json(root / "config.json")


def tensors(root: Path, official: dict[str, Any], allow_pickle: bool):
    common, ranks = _files(root)
    n = len(ranks)
    whole: dict[str, TensorInfo] = {}
    for f in common:
        for info in _infos(f):
            if info.name in whole:
                raise CheckpointError(f"{f}: tensor {info.name} also appears in {whole[info.name].file.name}")
            whole[info.name] = info
    sliced: dict[str, dict[int, TensorInfo]] = {}
    for rank, files in ranks.items():
        for f in files:
            for info in _infos(f):
                if info.name in whole:
                    raise CheckpointError(f"{f}: tensor {info.name} is both whole (in {whole[info.name].file.name}) "
                                          f"and a rank slice")
                if rank in sliced.setdefault(info.name, {}):
                    raise CheckpointError(f"{f}: tensor {info.name} appears twice for rank {rank}")
                sliced[info.name][rank] = info
    out: dict[str, Producer] = {}
    for name, info in whole.items():
        out[name] = Producer(info.shape, [(info.file, name)], lambda r, i=info: r.get(i.file, i.name), dtype=info.dtype)
    for name, parts in sliced.items():
        missing = sorted(set(range(n)) - set(parts))
        if missing:
            raise CheckpointError(f"{name}: no slice in the files of ranks {missing}")
        dim = next((d for pattern, d in _JOIN if pattern.search(name)), None)
        if dim is None:
            raise CheckpointError(f"{name}: split across the TP files, but no join rule is known for it "
                                  f"(only the experts' w1 / w3 / w2 are pre-sharded)")
        infos = [parts[r] for r in range(n)]
        shapes = [i.shape for i in infos]
        other = 1 - dim
        if any(len(s) != 2 or s[other] != shapes[0][other] for s in shapes) or len({i.dtype for i in infos}) > 1:
            raise CheckpointError(f"{name}: rank slices do not line up along dim {dim}: "
                                  f"{[(list(i.shape), i.dtype) for i in infos]}")
        shape = list(shapes[0])
        shape[dim] = sum(s[dim] for s in shapes)
        out[name] = Producer(tuple(shape), [(i.file, name) for i in infos],
                             lambda r, infos=infos, dim=dim: torch.cat([r.get(i.file, i.name) for i in infos], dim),
                             dtype=infos[0].dtype)
    files = common + [f for r in range(n) for f in ranks[r]]
    notes = [(f"{len(sliced)} expert tensors joined from {n} tensor-parallel ranks (w1 / w3 along rows, w2 along "
             f"columns)")]
    return out, files + [root / "config.json"], notes


def _detect(root: Path) -> bool:
    return (root / "config.json").is_file() and any(_COMMON_FILE.match(p.name) for p in root.glob("*.safetensors")) \
        and any(_RANK_FILE.match(p.name) for p in root.glob("*.safetensors"))


def _format():
    from .formats import Format

    return Format("grok_tp8", ("Grok 2.5's release pre-sharded for 8-way tensor parallelism: *-TP-common + "
                               "*-TP-000 ... 007.safetensors, experts split across the rank files"),
                  _detect, official_config, tensors, before_hf=True)


FORMAT = _format()
