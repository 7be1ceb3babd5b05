"""Checkpoint file formats: safetensors and torch pickles (state dicts, Lightning).

The only code that touches checkpoint formats. A :class:`CheckpointReader`
lists a checkpoint's floating tensors under canonical names without loading
them, and loads one tensor at a time. Pickle-based files are opened only with
``torch.load(weights_only=True)``; safetensors is preferred where both exist.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, InconsistentCheckpointsError, UnsafeCheckpointError

__all__ = [
    "CheckpointReader",
    "KeyOptions",
    "TensorInfo",
    "open_checkpoint",
]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


@dataclass(frozen=True)
class KeyOptions:
    """How tensor names are canonicalised and selected.

    Prefixes in ``strip`` are removed from the front of every name, repeatedly
    (``module.`` from DDP, ``_orig_mod.`` from torch.compile). In Lightning
    ``.ckpt`` files ``lightning_prefix`` is removed too when every key has it.
    ``include`` / ``exclude`` are globs on the canonical names.
    """

    strip: tuple[str, ...] = ("module.", "_orig_mod.")
    lightning_prefix: str | None = "model."
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def canonical(self, name: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in self.strip:
                if prefix and name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
        return name

    def selected(self, name: str) -> bool:
        if self.include and not any(fnmatch.fnmatchcase(name, g) for g in self.include):
            return False
        return not any(fnmatch.fnmatchcase(name, g) for g in self.exclude)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class CheckpointReader:
    """Floating tensors of one checkpoint (one or several files), loaded lazily."""

    label: str  # what error messages call this checkpoint
    tensors: dict[str, TensorInfo]
    step_hint: int | None = None  # a step stored inside the file, if any
    _loaders: dict[str, object] = field(default_factory=dict, repr=False)

    def read(self, name: str) -> torch.Tensor:
        """Load tensor *name* (canonical) on the CPU, in its source dtype."""
        loader = self._loaders[name]
        try:
            t = loader() if callable(loader) else loader
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.label}: cannot read tensor '{name}' ({_one_line(exc)})") from None
        return t.reshape(self.tensors[name].shape)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _add(reader: CheckpointReader, raw: str, info_shape, dtype, loader, keys: KeyOptions, origin: str) -> None:
    if dtype is None or not dtype.is_floating_point:
        return
    name = keys.canonical(raw)
    if not keys.selected(name):
        return
    if name in reader.tensors:
        raise InconsistentCheckpointsError(
            f"{origin}: two tensors map to the name '{name}' after stripping prefixes {keys.strip}"
        )
    reader.tensors[name] = TensorInfo(name, tuple(int(s) for s in info_shape), dtype)
    reader._loaders[name] = loader


def _safetensors_offsets(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Start of the data section and each tensor's byte span in it.

    Called after ``safe_open`` has validated the header (size limit, offsets,
    byte spans against the file size).
    """
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    spans = {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}
    return 8 + n, spans


def _read_span(path: Path, start: int, stop: int) -> np.ndarray:
    """Bytes [start, stop) of *path* into a fresh buffer with positioned reads.

    Reading instead of memory-mapping keeps the checkpoint's pages out of this
    process's resident set: only the tensor being processed is in memory.
    """
    buf = np.empty(stop - start, dtype=np.uint8)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < buf.size:
            got = os.preadv(fd, [view[pos : pos + _MAX_READ]], start + pos)
            if got == 0:
                raise CheckpointError(f"{path}: truncated (ends before byte {stop})")
            pos += got
    finally:
        os.close(fd)
    return buf


_MAX_READ = 1 << 30


def _read_safetensors(files: Sequence[Path], label: str, keys: KeyOptions) -> CheckpointReader:
    reader = CheckpointReader(label, {})
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                entries = [(k, handle.get_slice(k)) for k in handle.keys()]
                entries = [(k, sl.get_dtype(), sl.get_shape()) for k, sl in entries]
            data_start, spans = _safetensors_offsets(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({_one_line(exc)})") from None
        for step_key in ("step", "global_step"):
            if step_key in metadata and metadata[step_key].isdigit():
                reader.step_hint = int(metadata[step_key])
        for key, dtype_name, shape in entries:
            dtype = _SAFETENSORS_DTYPES.get(dtype_name)
            begin, end = spans[key]
            loader = _span_loader(path, data_start + begin, data_start + end, dtype)
            _add(reader, key, shape, dtype, loader, keys, str(path))
    return reader


def _span_loader(path: Path, start: int, stop: int, dtype: torch.dtype | None):
    return lambda: torch.from_numpy(_read_span(path, start, stop)).view(dtype)


def _torch_load(path: Path):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (non-zip) serialisation cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: torch.load(weights_only=True) found objects other than "
            f"tensors and plain containers ({_one_line(exc)}); save model.state_dict() or safetensors instead"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, LookupError, struct.error,
            AttributeError, TypeError) as exc:
        # bytes that are not a checkpoint can fail anywhere in the unpickler (IndexError: its stack)
        raise CheckpointError(f"{path}: unreadable or truncated torch checkpoint ({_one_line(exc)})") from None


def _state_dict(obj, path: Path) -> tuple[dict, int | None, bool]:
    """The tensor mapping inside a loaded pickle, a step stored beside it, and
    whether it came from a Lightning checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    step = None
    for key in ("global_step", "step"):
        if isinstance(obj.get(key), int):
            step = int(obj[key])
            break
    lightning = "pytorch-lightning_version" in obj or path.suffix == ".ckpt"
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner, step, lightning
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, step, lightning
    raise CheckpointError(
        f"{path}: no state dict found (looked for tensors at the top level and under "
        f"{', '.join(repr(k) for k in STATE_DICT_KEYS)})"
    )


def _read_torch(files: Sequence[Path], label: str, keys: KeyOptions) -> CheckpointReader:
    reader = CheckpointReader(label, {})
    for path in files:
        state, step, lightning = _state_dict(_torch_load(path), path)
        reader.step_hint = step if step is not None else reader.step_hint
        names = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
        prefix = keys.lightning_prefix
        strip_lightning = lightning and prefix and names and all(k.startswith(prefix) for k in names)
        seen_storage: dict[tuple, str] = {}
        for key in names:
            t = state[key]
            raw = key[len(prefix) :] if strip_lightning else key
            # Tied weights: the same storage saved under two names is one parameter.
            if t.is_floating_point() and t.numel() > 0:
                ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                if ident in seen_storage:
                    continue
                seen_storage[ident] = key
            _add(reader, raw, t.shape, t.dtype, t, keys, str(path))
    return reader


def open_checkpoint(files: Sequence[Path], label: str, keys: KeyOptions) -> CheckpointReader:
    """Open the files of one checkpoint (all safetensors, or all torch pickles)."""
    if all(f.suffix == ".safetensors" for f in files):
        return _read_safetensors(files, label, keys)
    return _read_torch(files, label, keys)


def shard_files(index: Path) -> list[Path]:
    """The shard files named by a ``*.index.json`` weight map, in order of first use."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: unreadable shard index ({_one_line(exc)})") from None
    shards: list[Path] = []
    for name in weight_map.values():
        path = index.parent / name
        if path not in shards:
            shards.append(path)
    for path in shards:
        if not path.is_file():
            raise CheckpointError(f"{index}: names shard {path.name}, which is missing")
    return shards
