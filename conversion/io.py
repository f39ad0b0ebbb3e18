"""Safe, streaming access to release files, and atomic, hashed output.

Reading: safetensors only unless `allow_pickle` (then `torch.load(weights_only=True)`, never a fallback); index
entries must be plain file names inside the release (files that are themselves symlinks, as in the Hugging Face
cache's snapshot folders, are followed); headers over a size limit or with an absurd tensor count are refused;
truncated or corrupt files are reported with their path. Tensors are read one at a time.
Writing: everything goes to a temporary directory beside the destination and is renamed into place at the end;
safetensors files are written tensor by tensor (header first, from the planned shapes) while hashing.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_archs.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20
MAX_TENSORS = 2_000_000
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
WRITE_CHUNK = 2**22  # bytes per write() and hash update (4 MiB: still in cache when hashed)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name ("BF16", "F8_E4M3", ...)


def read_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, validated against the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file (a header of {n} bytes is over "
                                      f"the {MAX_HEADER_BYTES}-byte limit)")
            if 8 + n > size:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file (header runs past the end)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) > MAX_TENSORS:
        raise CheckpointError(f"{file}: {len(tensors)} tensors in one file is over the {MAX_TENSORS} limit")
    end = max((v.get("data_offsets", [0, 0])[1] for v in tensors.values() if isinstance(v, dict)), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file (data ends at byte {8 + n + end}, "
                              f"the file has {size})")
    return header


class Release:
    """The weight files of a release directory and every tensor's name, shape and dtype (headers only)."""

    def __init__(self, root: str | os.PathLike, allow_pickle: bool = False,
                 index_name: str = "model.safetensors.index.json", pattern: str = "*.safetensors") -> None:
        self.root = Path(root)
        self.allow_pickle = allow_pickle
        self.files = self._files(index_name, pattern)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for info in self._list(file):
                if info.name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {info.name} also appears in "
                                          f"{self.tensors[info.name].file.name}")
                self.tensors[info.name] = info

    def _files(self, index_name: str, pattern: str) -> list[Path]:
        index = self.root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
            files = []
            for name in names:
                if not isinstance(name, str) or os.path.isabs(name) or Path(name).name != name or name in (".", ".."):
                    raise CheckpointError(f"{index}: entry {name!r} points outside the release directory "
                                          f"(shard names must be plain file names)")
                file = self.root / name  # a symlink (HF cache snapshot) is followed when opened
                if not file.is_file():
                    raise CheckpointError(f"{index}: shard {name!r} is listed but missing")
                files.append(file)
            return files
        files = sorted(self.root.glob(pattern))
        if files:
            return files
        pickles = sorted(p.name for p in self.root.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and self.allow_pickle:
            return [self.root / p for p in pickles]
        extra = (f" (found {pickles}: pickle files are never loaded; pass allow_pickle / --allow-pickle to read "
                 f"them with torch.load(weights_only=True))") if pickles else ""
        raise CheckpointError(f"{self.root}: no safetensors weights{extra}")

    def _list(self, file: Path) -> Iterator[TensorInfo]:
        if file.suffix in PICKLE_SUFFIXES:
            for name, t in _load_pickle(file).items():
                yield TensorInfo(file, name, tuple(t.shape), _ST_NAMES.get(t.dtype, str(t.dtype)))
            return
        header = read_header(file)
        for name, meta in header.items():
            if name != "__metadata__":
                yield TensorInfo(file, name, tuple(meta["shape"]), meta["dtype"])

    def source_files(self) -> list[Path]:
        """Every file read for the weights, plus the index if there is one."""
        index = self.root / "model.safetensors.index.json"
        return self.files + ([index] if index.is_file() else [])


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure of an untrusted file is a checkpoint error
        raise CheckpointError(f"{file}: cannot be read with torch.load(weights_only=True) ({err})") from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{file}: not a flat dict of tensors")
    return state


class Reader:
    """Reads tensors one at a time; keeps each file open while in use."""

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._open.clear()

    def get(self, file: Path, name: str) -> torch.Tensor:
        if file.suffix in PICKLE_SUFFIXES:
            if file not in self._open:
                self._open[file] = _load_pickle(file)
            try:
                return self._open[file][name]
            except KeyError as err:
                raise CheckpointError(f"{file}: no tensor {name}") from err
        return self._read_safetensors(file, name)

    def _read_safetensors(self, file: Path, name: str) -> torch.Tensor:
        """One positioned read into a fresh tensor (no memory map: mapped pages of every open file would stay
        resident and RSS would grow towards the size of the release)."""
        if file not in self._open:
            header = read_header(file)
            with open(file, "rb") as f:
                base = 8 + struct.unpack("<Q", f.read(8))[0]
            self._open[file] = (header, base)
        header, base = self._open[file]
        meta = header.get(name)
        if not isinstance(meta, dict) or meta.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{file}: cannot read tensor {name} (absent or of an unknown dtype)")
        begin, end = meta["data_offsets"]
        out = torch.empty(meta["shape"], dtype=_ST_DTYPES[meta["dtype"]])
        if end - begin != out.numel() * out.element_size():
            raise CheckpointError(f"{file}: corrupt safetensors file (tensor {name} has {end - begin} bytes for "
                                  f"shape {meta['shape']})")
        if end > begin:
            view = memoryview(out.view(torch.uint8).numpy()).cast("B")
            with open(file, "rb", buffering=0) as f:
                if os.preadv(f.fileno(), [view], base + begin) != end - begin:
                    raise CheckpointError(f"{file}: corrupt or truncated safetensors file (tensor {name})")
        return out


def sha256(file: Path, chunk: int = 2**24) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers: callers may hash files in threads
    return h.hexdigest()


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor: the header (from the planned names, shapes and dtypes) first,
    then each tensor's bytes as it comes. Hashes what it writes.

    Writing and hashing a tensor run on a worker thread (file writes and hashlib release the GIL) while the caller
    produces the next one; at most one tensor waits, so memory stays near two tensors. A failure on the worker is
    raised by the next `add` or by `close`. Use as a context manager (or call `close`) so the file is closed.
    """

    def __init__(self, file: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.file, self.order = file, [name for name, _, _ in entries]
        header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
        offset = 0
        self.expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shape, dtype in entries:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected[name] = (tuple(shape), dtype)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.hash = hashlib.sha256()
        self.f = open(file, "wb", buffering=0)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="safetensors-writer")
        self._pending: concurrent.futures.Future | None = None
        self._write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.f.closed:
            return
        if exc[0] is None:
            self.close()
        else:
            self.abort()

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), WRITE_CHUNK):  # large sequential writes, the hash over the same bytes
            part = view[i:i + WRITE_CHUNK]
            while part:
                part = part[self.f.write(part):]
            self.hash.update(view[i:i + WRITE_CHUNK])

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise RuntimeError(f"tensor {name} written out of the planned order")
        shape, dtype = self.expected[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(f"{name}: produced {list(tensor.shape)} {tensor.dtype}, planned {list(shape)} {dtype}")
        data = tensor.detach().contiguous().cpu()
        self._wait()  # the previous tensor is on disk and hashed before this one is queued
        if data.numel():
            self._pending = self._pool.submit(self._write, memoryview(data.view(torch.uint8).numpy()))
        self.next += 1

    def close(self) -> str:
        self._wait()
        if self.next != len(self.order):
            self.abort()
            raise RuntimeError(f"{self.file}: {len(self.order) - self.next} planned tensors were not written")
        self._pool.shutdown()
        self.f.close()
        return self.hash.hexdigest()

    def abort(self) -> None:
        """Stop after the write in flight and close the file (its contents are then incomplete)."""
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - the caller is already handling the failure that led here
            pass
        self._pool.shutdown()
        self.f.close()


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `dst`; on success it replaces `dst`, on any failure it is removed.

    An existing `dst` is refused unless `overwrite`; then it is replaced only after everything else succeeded.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True / --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
