"""`hf-archs convert` and `hf-archs export`: official release -> this package's layout, and back.

convert: the same checked plan as `from_official` (conversion/), then tensors are produced one at a time (quantized
ones dequantized straight into the output dtype) and written into safetensors shards by a writer thread while the
next is produced (peak memory near two of the largest tensors), with a manifest of SHA-256 hashes of every file
read (hashed on a thread of their own from the start) and written, provenance in every shard's metadata, the
release's tokenizer files, and a model card.
Everything is written to a temporary directory beside DST and renamed into place only after the strict reload
check passes; SRC is never modified.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
DEFAULT_SHARD_BYTES = 5 * 2**30
FULL_RELOAD_LIMIT = 2 * 2**30  # below this many bytes the reload check also loads the model for real


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"hf_archs": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def convert(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None, overwrite: bool = False,
            allow_pickle: bool = False, format: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: bool = True) -> dict[str, Any]:
    """Convert an official release directory into this package's layout at `dst`. Returns the manifest."""
    from tqdm.auto import tqdm

    from conversion.io import Reader, SafetensorsWriter, atomic_directory, sha256

    from .official import prepare

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"the destination {dst} must not be the source or inside it")
    start = time.perf_counter()
    prep = prepare(src, format, allow_pickle)  # every check before any data is read or anything is written
    dtype = prep.dtype(dtype)
    state = prep.model.state_dict()
    tied = bool(getattr(prep.config, "tie_word_embeddings", False))
    names = [n for n in state if not (tied and n == "lm_head.weight")]
    from .official import fp32_names

    keep = fp32_names(prep.model, names, dtype)
    entries = [(n, tuple(state[n].shape), (torch.float32 if n in keep else dtype) if state[n].is_floating_point()
                else state[n].dtype) for n in names]
    for name, _shape, _dt in entries:
        if name not in prep.plan:
            raise CheckpointError(f"internal: no plan for {name}")
    shards = _split(entries, max_shard_bytes)
    versions = _versions()
    metadata = {"format": "pt", "source_format": prep.format, "converter": f"hf_archs {versions['hf_archs']}",
                "source": src.name}
    total_bytes = sum(_nbytes(s, d) for _, s, d in entries)

    # The sources are hashed on a worker thread from the start (hashlib releases the GIL), overlapping the
    # conversion instead of a second pass over the release at the end.
    hashing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sha256-sources")
    source_hashes = {str(p.relative_to(src)): hashing.submit(sha256, p) for p in _sources(prep)}
    try:
        with atomic_directory(dst, overwrite) as tmp:
            outputs: dict[str, str] = {}
            weight_map: dict[str, str] = {}
            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"convert {src.name}",
                       disable=not progress)
            with Reader() as reader, _intra_op_threads(max(1, _cores() - 2)):
                for k, shard in enumerate(shards):
                    fname = (f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                             else "model.safetensors")
                    with SafetensorsWriter(tmp / fname, shard, metadata) as writer:
                        for name, shape, dt in shard:
                            # Produced straight in the output dtype (dequantization rounds once per chunk); written
                            # and hashed on the writer's thread while the next tensor is produced.
                            writer.add(name, prep.plan[name].produce(reader, dt))
                            weight_map[name] = fname
                            bar.update(_nbytes(shape, dt))
                        outputs[fname] = writer.close()
            bar.close()
            index = {"metadata": {"total_size": total_bytes, **metadata}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            prep.config.dtype = dtype
            prep.config.architectures = [prep.arch.causal_lm_class.__name__]
            prep.config.save_pretrained(tmp)
            carried, missing = _carry_tokenizer(src, tmp)
            _reload_check(tmp, entries, total_bytes)
            for f in ("model.safetensors.index.json", "config.json", *carried):
                outputs[f] = sha256(tmp / f)
            manifest = {
                "source": str(src), "source_format": prep.format, "architecture": prep.arch.name,
                "model_type": prep.arch.model_type, "dtype": str(dtype).replace("torch.", ""),
                "converter": versions, "notes": prep.notes,
                "skipped": prep.skipped, "tokenizer": {"carried": carried, "missing": missing},
                "source_files": {name: fut.result() for name, fut in source_hashes.items()},
                "output_files": outputs, "tensors": len(entries), "bytes": total_bytes,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
            (tmp / "README.md").write_text(model_card(prep, manifest))
    finally:
        hashing.shutdown(wait=False, cancel_futures=True)  # after a failure: drop the hashes not yet started
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    return manifest


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """torch's intra-op threads for the dequantization while converting: the cores the writer's and the source
    hashing threads leave. More only oversubscribes (on 2 busy cores, 2 threads decoded FP8 3x slower than 1:
    bench/results/convert-cpu.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(n, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sources(prep) -> list[Path]:
    files = list(dict.fromkeys(p for p in prep.sources if p.is_file()))
    config = prep.root / "config.json"
    return files + ([config] if config.is_file() and config not in files else [])


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def _split(entries, max_bytes: int):
    shards, current, size = [], [], 0
    for entry in entries:
        n = _nbytes(entry[1], entry[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    return shards + [current] if current else shards


def _carry_tokenizer(src: Path, dst: Path) -> tuple[list[str], list[str]]:
    carried = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            carried.append(name)
    if "tokenizer.json" in carried:
        return carried, []
    # The release's own format (Mistral's tekken.json, Llama 4's tiktoken model), converted where faithful.
    from conversion.tokenizer import convert_release_tokenizer

    written, missing = convert_release_tokenizer(src, dst)
    return carried + [n for n in written if n not in carried], missing


def _reload_check(root: Path, entries, total_bytes: int) -> None:
    """Strict check of what was written: names, shapes and dtypes from the headers; for small models also a real
    `AutoModelForCausalLM.from_pretrained` with no missing, unexpected or mismatched keys."""
    from conversion.io import Release

    written = Release(root).tensors
    want = {n: (s, d) for n, s, d in entries}
    from conversion.io import _ST_DTYPES

    bad = [n for n in want if n not in written or written[n].shape != want[n][0]
           or _ST_DTYPES[written[n].dtype] != want[n][1]] + [n for n in written if n not in want]
    if bad:
        raise CheckpointError(f"reload check failed for {bad[:20]}")
    if total_bytes <= FULL_RELOAD_LIMIT:
        from transformers import AutoModelForCausalLM

        _, info = AutoModelForCausalLM.from_pretrained(root, output_loading_info=True)
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise CheckpointError(f"reload check failed: {problems}")


def model_card(prep, manifest: dict[str, Any]) -> str:
    versions = manifest["converter"]
    official = prep.official.get("_name_or_path") or prep.root.name
    return f"""---
library_name: transformers
tags:
- hf_archs
- {prep.arch.name}
- converted
base_model: {official}
---

# {prep.root.name} ({prep.arch.model_type})

Converted from the official `{prep.format}` release `{prep.root.name}` by hf_archs {versions['hf_archs']}.

```python
import hf_archs  # registers {prep.arch.model_type}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
```

Needs hf_archs >= {versions['hf_archs']} and transformers {versions['transformers']}.

## Provenance

- source format: `{prep.format}`; dtype: `{manifest['dtype']}`; tensors: {manifest['tensors']}
- notes: {'; '.join(manifest['notes']) or 'none'}
- skipped by declared rules: {manifest['skipped'] or 'nothing'}
- SHA-256 of every file read and written: `manifest.json`
"""


def export(src: str | Path, dst: str | Path, overwrite: bool = False) -> Path:
    """Write a model saved by this package (or a converted one) in the official HF layout of its release:
    config.json with the official model_type, per-expert tensors as the publisher ships them."""
    from transformers import AutoModelForCausalLM

    from conversion.io import atomic_directory

    from .registry import by_official_model_type

    model = AutoModelForCausalLM.from_pretrained(src)
    arch = by_official_model_type(model.config.model_type)
    with atomic_directory(dst, overwrite) as tmp:
        model.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["model_type"] = arch.export_model_type
        cfg["architectures"] = [arch.export_architecture]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(Path(src) / name, tmp / name)
    return Path(dst)


def add_parser(sub) -> None:
    from conversion.formats import formats

    names = ", ".join(f"{f.name} ({f.description})" for f in formats().values())
    p = sub.add_parser("convert", help="convert an official release directory into this package's layout",
                       description="Convert an official release directory (as its publisher ships it) into this "
                                   "package's layout: safetensors shards with an index, config.json with our "
                                   "model_type, manifest.json (SHA-256 of every file read and written), the "
                                   "tokenizer files and a model card. Atomic: a failed run leaves no DST.")
    p.add_argument("src", help="official release directory")
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="output dtype (default: the release's; dequantized releases give bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read .bin/.pth weights with torch.load(weights_only=True) (never by default)")
    p.add_argument("--format", default=None, help=f"override the detected release format; one of: {names}")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="maximum shard size in GiB (default: 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_convert)

    e = sub.add_parser("export", help="write a converted model back in its release's official HF layout",
                       description="Write a model saved by hf_archs in the official HF layout of its release "
                                   "(official model_type, per-expert tensors), for vLLM, SGLang or llama.cpp.")
    e.add_argument("src", help="a directory written by save_pretrained or hf-archs convert")
    e.add_argument("dst", help="output directory")
    e.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    e.set_defaults(func=_cmd_export)


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        m = convert(args.src, args.dst, args.dtype, args.overwrite, args.allow_pickle, args.format,
                    int(args.max_shard_size * 2**30), progress=not args.quiet)
    except (CheckpointError, FileExistsError, ValueError) as err:
        print(f"hf-archs convert: {err}", file=sys.stderr)
        return 2
    print(f"converted {m['tensors']} tensors, {m['bytes'] / 2**30:.2f} GiB, {m['dtype']}, in {m['seconds']} s "
          f"({m['source_format']} -> {m['model_type']}); manifest: {Path(args.dst) / 'manifest.json'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        out = export(args.src, args.dst, args.overwrite)
    except (CheckpointError, FileExistsError, ValueError) as err:
        print(f"hf-archs export: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0
