"""Checkpoint file formats: safetensors and torch pickles (state dicts, Lightning).

With :mod:`.dcp` (torch.distributed.checkpoint folders) and :mod:`.deepspeed`
(DeepSpeed model states), the only code that touches checkpoint formats. A
:class:`CheckpointReader`
lists a checkpoint's floating tensors under canonical names without loading
them, and loads one tensor at a time. Pickle-based files are opened only with
``torch.load(weights_only=True)``; safetensors is preferred where both exist.
A torch zip is memory-mapped only once each storage record is found to hold
its storage's bytes (see :func:`_mmap_load`).

Every input is refused unless it is a regular file (a FIFO would block the
reader, ``/dev/zero`` never ends), and paths named by a shard index must
stay inside the checkpoint's folder. float8 tensors are read upcast to
float32, which holds every float8 value exactly.

Remote files (:class:`~.sources.RemoteFile`, from an fsspec URL or a hub
revision): a safetensors file is read by byte range, its header first
(checked here as the safetensors library checks a local one: size limit,
dtypes, shapes, contiguous spans that end at the end of the file), then each
selected tensor's span when it is read; a pickle is read from a local copy
(:meth:`~.sources.RemoteFile.local_copy`); a shard index may name only files
beside it.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import struct
import weakref
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, InconsistentCheckpointsError, StepError, UnsafeCheckpointError, printable
from ..groups import name_matches, natural_key
from .sources import AHEAD_BYTES, RemoteFile, is_remote

__all__ = [
    "CheckpointReader",
    "KeyOptions",
    "add_state_dict",
    "TensorInfo",
    "needs_download",
    "open_checkpoint",
    "require_regular_file",
    "shard_files",
]

# Every float8 format this torch has. torch implements few operations for
# them (no isfinite for e4m3fn), so they are read upcast to float32.
_FLOAT8 = frozenset(
    getattr(torch, n) for n in dir(torch) if n.startswith("float8_") and isinstance(getattr(torch, n), torch.dtype)
)
# The floating dtypes read as parameters; others (float4_e2m1fn_x2, two values
# packed in a byte) cannot be converted to float32 and are refused.
_READABLE = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16}) | _FLOAT8

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    **{
        name: getattr(torch, attr)
        for name, attr in [
            ("F8_E4M3", "float8_e4m3fn"),
            ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
            ("F8_E5M2", "float8_e5m2"),
            ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
            ("F8_E8M0", "float8_e8m0fnu"),
        ]
        if hasattr(torch, attr)
    },
}

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """*value* as a tuple of patterns (globs, prefixes): one string is one pattern, not its characters
    (``exclude="ema*"`` had excluded every tensor by its ``*``; ``strip_prefix="model."`` stripped the letters
    m, o, d, e, l and dots from the front of every name)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


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

    def unmatched(self, names: Iterable[str]) -> tuple[str, str] | None:
        """``(option, pattern)`` of the first include or exclude pattern that matches none of *names* (a typo
        would narrow, or fail to narrow, the selection in silence), else None."""
        names = list(names)
        for option, globs in (("include", self.include), ("exclude", self.exclude)):
            for glob in globs:
                if not any(name_matches(n, glob) for n in names):
                    return option, glob
        return None

    def ambiguous(self, names: Iterable[str]) -> str | None:
        """A pattern that is the exact name of one tensor and, as a glob, matches others too (``w[1]``: the
        tensor ``w[1]``, and ``w1``), said in a phrase; the analysis takes such a pattern as the name, and a
        selection made when the checkpoints are read cannot know the names yet: refused, else None."""
        names = set(names)
        for option, globs in (("include", self.include), ("exclude", self.exclude)):
            for glob in globs:
                others = sorted(n for n in names if n != glob and name_matches(n, glob))
                if glob in names and others:
                    return (f"the {option} pattern {glob!r} is the name of a tensor and, as a glob, matches "
                            f"{others[0]!r} too; write [[] for a literal [ or name the tensors one by one")
        return None

    def selected(self, name: str) -> bool:
        """*name* kept: matched by an include pattern (if any) and by no exclude pattern, each pattern its exact
        name, a glob, or a glob with ``[`` taken literally, as the analysis matches them."""
        if self.include and not any(name_matches(name, g) for g in self.include):
            return False
        return not any(name_matches(name, g) for g in self.exclude)


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
    _spans: _Spans | None = field(default=None, repr=False)  # a remote safetensors checkpoint's byte spans
    _sources: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)  # name: (name in file, file)
    considered: set[str] = field(default_factory=set, repr=False)  # every tensor's name, selected or not
    unread: dict[str, str] = field(default_factory=dict, repr=False)  # selected weights of no float dtype: name: dtype
    # weights a pickle holds outside the state dict read (an EMA copy, a teacher): (file name, key path): how many
    beside: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def read_on_into(self, following: CheckpointReader) -> None:
        """Let this checkpoint's read-ahead go on into the first tensors of *following* (the next
        checkpoint), so a remote transfer does not stop between checkpoints. Remote safetensors
        checkpoints only; others are read as they are asked for."""
        if self._spans is not None and following._spans is not None:
            self._spans.then = following._spans

    def read_once(self) -> None:
        """Each tensor will be read once only (a checkpoint opened again as the previous one of an append):
        a remote one keeps nothing it fetched for a second read."""
        if self._spans is not None:
            self._spans.keep = False

    def read(self, name: str) -> torch.Tensor:
        """Load tensor *name* (canonical) on the CPU, in its source dtype (float8: upcast to float32)."""
        loader = self._loaders[name]
        try:
            t = loader() if callable(loader) else loader
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{self.label}: cannot read tensor {name!r} ({_one_line(exc)})") from None
        if t.dtype in _FLOAT8:
            t = t.to(torch.float32)
        return t.detach().reshape(self.tensors[name].shape)  # a saved Parameter may require grad


def _one_line(exc: BaseException) -> str:
    """The first line of *exc*'s message, escaped: it may quote a name read from the file."""
    text = str(exc).strip().splitlines()
    return printable(text[0]) if text else type(exc).__name__


def require_regular_file(path: Path, error: type[Exception] = CheckpointError) -> None:
    """Raise *error* unless *path* is a regular file (symlinks followed).

    Checked before any input is opened: a FIFO blocks its reader until a
    writer comes, and a device such as ``/dev/zero`` never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
        kind = next((k for test, k in kinds if test(mode)), "special")
        raise error(f"{path}: not a regular file ({kind}); give the path of a file")


# The names of safetensors' dtypes of weights that are not floating point, as torch names them: quantised
# (int8, packed 4-bit in uint8 or int32) and complex.
_UNREAD = {"I8": "int8", "U8": "uint8", "I32": "int32", "C64": "complex64", "C128": "complex128",
           **{str(d).removeprefix("torch."): str(d).removeprefix("torch.")
              for d in (torch.int8, torch.uint8, torch.int32, torch.complex64, torch.complex128)}}


def skip_unread(reader: CheckpointReader, name: str, dtype, keys: KeyOptions) -> None:
    """Note *name*, a tensor left out for its dtype, where it is a weight (``weight``, GPTQ's ``qweight``,
    compressed-tensors' ``weight_packed``, HQQ's ``W_q``) of any dtype but bool; masks (GPT-2's uint8
    ``attn.bias``) and tables (``freqs_cis``) pass."""
    kind = str(dtype).removeprefix("torch.")
    last = name.rsplit(".", 1)[-1]
    if kind.lower() not in ("bool", "") and ("weight" in last or last == "W_q") and keys.selected(name):
        reader.unread[name] = _UNREAD.get(kind, kind.lower())


def _add(reader: CheckpointReader, raw: str, info_shape, dtype, loader, keys: KeyOptions, origin: str,
         dtype_name: str = "") -> None:
    """Add a tensor to *reader* if it is floating and selected.

    *dtype* is a torch dtype, ``None`` for a non-floating one torch lacks
    (*dtype_name*: the file's), or the file's name (a str) for a floating
    dtype torch lacks.
    """
    name = keys.canonical(raw)
    reader.considered.add(name)
    if dtype is None or (isinstance(dtype, torch.dtype) and not dtype.is_floating_point):
        skip_unread(reader, name, dtype_name if dtype is None else dtype, keys)
        return
    if not keys.selected(name):
        return
    if name.endswith(("weight", "bias")) and tuple(info_shape) == (0,):  # a placeholder: DeepSpeed ZeRO-3's
        reader.unread[name] = f"no values, shape {tuple(info_shape)}"  # save_pretrained without gathering (an
        # empty dimension of a matrix, shape (0, 4), is a layer of that shape)
    if dtype not in _READABLE:
        raise CheckpointError(
            f"{origin}: tensor {name!r} has dtype {str(dtype).removeprefix('torch.')}, which cannot be read as "
            f"float32; leave it out with exclude={name!r}"
        )
    if name in reader.tensors:
        first_raw, first_origin = reader._sources[name]
        if first_raw == raw:
            raise CheckpointError(
                f"{origin}: tensor {raw!r} is also in {first_origin}; each tensor of a checkpoint must be saved "
                "in one of its files only"
            )
        raise InconsistentCheckpointsError(
            f"{origin}: tensors {first_raw!r} and {raw!r} both map to the name {name!r} after stripping prefixes "
            f"{keys.strip}"
        )
    reader.tensors[name] = TensorInfo(name, tuple(int(s) for s in info_shape), dtype)
    reader._loaders[name] = loader
    reader._sources[name] = (raw, origin)


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
    headers = []
    for path in files:
        require_regular_file(path)
        try:
            with open(path, "rb"):  # safe_open calls a file it may not open "No such file or directory"
                pass
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                entries = [(k, handle.get_slice(k)) for k in handle.keys()]
                entries = [(k, sl.get_dtype(), sl.get_shape()) for k, sl in entries]
            data_start, spans = _safetensors_offsets(path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({_one_line(exc)})") from None
        headers.append((path, metadata, entries, data_start, spans))
    _check_shard_index(files, [[k for k, _, _ in entries] for _, _, entries, _, _ in headers])
    for path, metadata, entries, data_start, spans in headers:
        for step_key in ("step", "global_step"):
            step = _stored_step(metadata.get(step_key), step_key, path)
            reader.step_hint = step if step is not None else reader.step_hint
        for key, dtype_name, shape in entries:
            # names of floating dtypes start with F (F8_E4M3, F4); torch lacks some of them
            dtype = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name if dtype_name.startswith("F") else None)
            begin, end = spans[key]
            loader = _span_loader(path, data_start + begin, data_start + end, dtype)
            _add(reader, key, shape, dtype, loader, keys, str(path), dtype_name)
    return reader


def _span_loader(path: Path, start: int, stop: int, dtype: torch.dtype | None):
    if start == stop:  # a zero-size tensor: nothing to read (and numpy cannot view an empty buffer as another dtype)
        return lambda: torch.empty(0, dtype=dtype)
    return lambda: torch.from_numpy(_read_span(path, start, stop)).view(dtype)


# -- remote safetensors: the header by range, checked as the safetensors library checks it ---------

_HEADER_LIMIT = 100_000_000  # the safetensors library's limit on a header's size
# Bits per element of every safetensors dtype (F4 and F6 pack elements into bytes).
_SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
    "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


def _safetensors_header(f: RemoteFile) -> tuple[int, dict, dict]:
    """Start of the data section, the tensor entries and the metadata of a remote safetensors file.

    Fetched once per file (then kept in ``f.memo``). Refused as the
    safetensors library refuses a local file: a header past its size limit
    or past the file's end, not a JSON object, an unknown dtype, a shape or
    span that is not a list of non-negative integers, spans that do not
    follow one another from the start of the data section to the end of the
    file, or a span whose length is not its shape's.
    """
    if "safetensors" not in f.memo:
        f.memo["safetensors"] = _fetch_safetensors_header(f)
    return f.memo["safetensors"]


def _fetch_safetensors_header(f: RemoteFile) -> tuple[int, dict, dict]:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{f.label}: unreadable safetensors file ({why})")

    if f.size < 8:
        raise bad(f"{f.size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(f.read(0, 8, keep=False).tobytes(), "little")
    if n > _HEADER_LIMIT or 8 + n > f.size:
        raise bad(f"header of {n} bytes in a file of {f.size}")
    try:
        header = json.loads(f.read(8, 8 + n, keep=False).tobytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not JSON: {_one_line(exc)}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # 0, "" or [] refused, as the safetensors library refuses them
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not an object of strings")

    def ints(value, length=None) -> bool:
        return (isinstance(value, list) and (length is None or len(value) == length)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))

    spans = []
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        if not isinstance(entry, dict) or not isinstance(dtype, str) or dtype not in _SAFETENSORS_BITS:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not ints(entry.get("shape")) or not ints(entry.get("data_offsets"), 2):
            raise bad(f"tensor {name!r}: shape and data_offsets must be lists of non-negative integers")
        begin, end = entry["data_offsets"]
        bits = _SAFETENSORS_BITS[entry["dtype"]] * math.prod(entry["shape"])
        if bits % 8 or end - begin != bits // 8:
            raise bad(f"tensor {name!r}: span {begin}..{end} does not hold its shape {entry['shape']}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"tensor {name!r}: span starts at {begin}, not {position}")
        position = end
    if 8 + n + position != f.size:
        raise bad(f"the tensors end at byte {8 + n + position} of a file of {f.size}")
    return 8 + n, header, metadata


class _Spans:
    """The byte spans of a remote checkpoint's tensors; reading one fetches the next ones ahead.

    "Next" in natural order of the canonical names: the order of the
    manifest, in which the ingest reads a checkpoint's tensors. The tensors
    up to ``AHEAD_BYTES`` past the one read (at least one) are asked for,
    going on into the next checkpoint's first tensors once this one's are
    all asked for (``then``, set by :meth:`CheckpointReader.read_on_into`).
    """

    def __init__(self):
        self.spans: dict[str, tuple[RemoteFile, int, int]] = {}
        self._names: list[str] = []  # in the order they are read, once the first is
        self._index: dict[str, int] = {}
        self._ends = np.zeros(0, dtype=np.int64)  # cumulative bytes along that order
        self._asked = 0  # tensors [0, _asked) of the order have been asked for
        self.then: _Spans | None = None  # the next checkpoint's, where the read-ahead goes on past this one
        self.keep = True  # each tensor kept after its read, for the next delta's (CheckpointReader.read_once)

    def _order(self) -> None:
        if not self._names:
            self._names = sorted(self.spans, key=natural_key)
            self._index = {n: i for i, n in enumerate(self._names)}
            self._ends = np.cumsum([self.spans[n][2] - self.spans[n][1] for n in self._names])

    def ahead(self, budget: int) -> None:
        """Fetch this checkpoint's first tensors ahead, up to *budget* bytes (at least one)."""
        self._order()
        while self._asked < len(self._names) and (self._asked == 0 or self._ends[self._asked - 1] < budget):
            f, start, stop = self.spans[self._names[self._asked]]
            f.fetch_ahead(start, stop)
            self._asked += 1

    def loader(self, name: str, f: RemoteFile, start: int, stop: int, dtype: torch.dtype | None):
        """The loader of tensor *name*, bytes [start, stop) of *f*; :meth:`add` it once the reader took it."""
        if start == stop:
            return lambda: torch.empty(0, dtype=dtype)
        return lambda: torch.from_numpy(self.read(name)).view(dtype)

    def add(self, name: str, f: RemoteFile, start: int, stop: int) -> None:
        """Tensor *name* is bytes [start, stop) of *f* (only a tensor the reader selected: another one, an
        integer tensor whose name is the same once prefixes are stripped, must not take its place)."""
        if start < stop:
            self.spans[name] = (f, start, stop)

    def read(self, name: str) -> np.ndarray:
        self._order()
        i = self._index[name]
        limit = self._ends[i] + AHEAD_BYTES
        self._asked = max(self._asked, i + 1)
        while self._asked < len(self._names) and (self._asked == i + 1 or self._ends[self._asked - 1] < limit):
            f, start, stop = self.spans[self._names[self._asked]]
            f.fetch_ahead(start, stop)
            self._asked += 1
        following = self.then
        if following is not None and self._asked == len(self._names) and limit > self._ends[-1]:
            following.ahead(int(limit - self._ends[-1]))
        f, start, stop = self.spans[name]
        return f.read(start, stop, keep=self.keep)


def _read_remote_safetensors(files: Sequence[RemoteFile], label: str, keys: KeyOptions) -> CheckpointReader:
    reader = CheckpointReader(label, {})
    spans = _Spans()
    _check_remote_shard_index(files, [list(_safetensors_header(f)[1]) for f in files])
    for f in files:
        data_start, header, metadata = _safetensors_header(f)
        for step_key in ("step", "global_step"):
            step = _stored_step(metadata.get(step_key), step_key, f.label)
            reader.step_hint = step if step is not None else reader.step_hint
        for key in sorted(header):
            dtype_name, shape = header[key]["dtype"], header[key]["shape"]
            dtype = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name if dtype_name.startswith("F") else None)
            begin, end = header[key]["data_offsets"]
            name = keys.canonical(key)
            loader = spans.loader(name, f, data_start + begin, data_start + end, dtype)
            _add(reader, key, shape, dtype, loader, keys, f.label, dtype_name)
            if reader._loaders.get(name) is loader:
                spans.add(name, f, data_start + begin, data_start + end)
    reader._spans = spans
    return reader


def _read_remote_torch(files: Sequence[RemoteFile], label: str, keys: KeyOptions) -> CheckpointReader:
    """Pickles read from local copies; messages name the remote files, not the copies."""
    copies = [f.local_copy(label) for f in files]
    try:  # the copies have no index beside them: the shards are checked against the remote one
        return _read_torch(copies, label, keys, lambda _, keys_in: _check_remote_shard_index(files, keys_in))
    except CheckpointError as exc:
        message = str(exc)
        for f, copy in zip(files, copies):
            message = message.replace(str(copy), f.label)
        raise type(exc)(message) from None


def needs_download(files: Sequence[Path | RemoteFile]) -> bool:
    """Whether opening the checkpoint in *files* reads them whole: remote pickles, downloaded first."""
    return is_remote(files) and not all(f.suffix == ".safetensors" for f in files)


_INT64 = range(-(2**63), 2**63)


def _stored_step(value, key: str, path: Path) -> int | None:
    """A step stored in a file: an int, or a string of digits in safetensors metadata.

    ``None`` when *value* is not one; a StepError when it does not fit int64.
    """
    too_big = f"{path}: stored {key} does not fit a 64-bit integer; name the file by its step or pass steps explicitly"
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value.lstrip("0")) > 19:  # int() of thousands of digits is slow, and refused past 4300
            raise StepError(too_big)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if value not in _INT64:
        raise StepError(too_big)
    return value


def _zip_records(path: Path) -> dict[int, zipfile.ZipInfo] | None:
    """The storage records (``<archive>/data/<key>``) of a torch zip, by the file offset of their data.

    ``None`` when Python's zipfile cannot list the archive. The other records
    (the pickle that gives each tensor its storage, offset, shape and strides;
    torch's version records) are small, and are read whole here, which checks
    their CRC-32: torch checks none. Two records whose data would start at
    the same offset (a damaged name or extra-field length in a local header)
    are refused: a storage would be cut from another record's bytes, which
    match that record's size and CRC-32.
    """
    records, others = {}, []
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                parts = info.filename.split("/")
                if len(parts) != 3 or parts[1] != "data":
                    others.append(info)
                    continue
                f.seek(info.header_offset)
                header = f.read(30)  # the local header: its name and extra field come before the data
                if len(header) < 30 or header[:4] != b"PK\x03\x04":
                    return None
                name_len, extra_len = struct.unpack("<HH", header[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                if start in records:
                    raise CheckpointError(
                        f"{path}: records {records[start].filename!r} and {info.filename!r} both start at byte "
                        f"{start}; the file is damaged: save or copy the checkpoint again"
                    )
                records[start] = info
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    _check_record_crcs(path, others)
    return records


def _mapped_records(storages: dict[int, int], records: dict[int, zipfile.ZipInfo]) -> dict[int, zipfile.ZipInfo] | None:
    """The record each memory-mapped storage was cut from, by storage address.

    torch.load(mmap=True) maps the whole file at some base address and gives
    each storage the bytes at its record's data offset, so every address less
    the base is a record's offset. The base is the one shift that takes every
    address onto a record; ``None`` if none or several do.
    """
    if not storages:
        return {}
    low, high = min(storages), max(storages)
    bases = {low - offset for offset in records} & {high - offset for offset in records}
    bases = [b for b in bases if all(ptr - b in records for ptr in storages)]
    if len(bases) != 1:
        return None
    return {ptr: records[ptr - bases[0]] for ptr in storages}


def _walk(obj) -> Iterator[tuple[str, object]]:
    """Every tensor and container (dict, list, tuple) in a loaded checkpoint, with its key path
    (``state_dict.layer.weight``); a container held twice is visited once."""
    todo, seen = [("", obj)], set()
    while todo:  # no recursion: a pickle can nest containers deeper than Python's stack
        where, item = todo.pop()
        if isinstance(item, torch.Tensor):
            yield where, item
        elif isinstance(item, (dict, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            yield where, item
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            todo.extend((f"{where}.{k}" if where else str(k), v) for k, v in pairs)


def _tensors_in(obj) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a loaded checkpoint, with its key path (``state_dict.layer.weight``)."""
    return [(where, item) for where, item in _walk(obj) if isinstance(item, torch.Tensor)]


# Storages of memory-mapped torch zips whose bytes are not yet checked against their record's CRC-32, with the
# record: checked when a tensor on them is first read (:func:`_crc_checked`), so a checkpoint opened only for its
# header is not read whole. Weak keys: an entry goes with its storage.
_UNCHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mmap_load(path: Path):
    """``torch.load(mmap=True)`` with each storage's record checked, else a plain load.

    With mmap, torch gives a storage as many bytes from its record's offset as
    the pickle declares, without checking that the record holds them: a short
    record would be read from the bytes after it, and a compressed one read
    raw. Without mmap torch reads each record and checks its size, but holds
    the whole file in memory. So: map, find each storage's record, refuse a
    record whose size differs from its storage's (naming the tensors on it),
    and load without mmap where a record is compressed or the records cannot
    be told apart.

    torch checks no record's CRC-32. The small records (the pickle) are
    checked by :func:`_zip_records`; a mapped storage's when one
    of its tensors is first read (see ``_UNCHECKED``), in the pass that reads
    its bytes anyway; where the file is loaded without mmap, every record's
    is checked here, as Python's zipfile reads it (a second pass over a file
    that is already rare: compressed records).
    """
    storages: dict[int, int] = {}

    def note(storage, location):
        if storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
        return storage

    records = _zip_records(path)
    obj = torch.load(path, map_location=note, weights_only=True, mmap=True)
    mapped = None if records is None else _mapped_records(storages, records)
    if mapped is None or any(info.compress_type != zipfile.ZIP_STORED for info in mapped.values()):
        if records is not None:
            _check_record_crcs(path, records.values())
        return torch.load(path, map_location="cpu", weights_only=True)
    tensors = [(w, t) for w, t in _tensors_in(obj) if t.layout == torch.strided and not t.is_meta]
    for ptr, info in mapped.items():
        if info.file_size != storages[ptr]:
            names = [w for w, t in tensors if t.untyped_storage().data_ptr() == ptr]
            raise CheckpointError(
                f"{path}: tensor {' and '.join(map(repr, names)) or '(none)'} is stored in record "
                f"{info.filename!r} of {info.file_size} bytes, but its storage takes {storages[ptr]}; "
                "the file is damaged: save the checkpoint again"
            )
    for _, t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in mapped:
            _UNCHECKED[storage] = mapped[storage.data_ptr()]
    return obj


def _check_record_crcs(path: Path, records) -> None:
    """Read each zip record of *records* whole with Python's zipfile, which checks its CRC-32."""
    with zipfile.ZipFile(path) as archive:
        for info in records:
            try:
                with archive.open(info) as f:
                    while f.read(1 << 24):
                        pass
            except zipfile.BadZipFile as exc:
                raise CheckpointError(
                    f"{path}: record {info.filename!r} is damaged ({_one_line(exc)}); save or copy the checkpoint "
                    "again"
                ) from None


def _crc_checked(t: torch.Tensor, name: str, path: Path) -> torch.Tensor:
    """*t* (tensor *name* of *path*), once the bytes of its storage are found to match their record's CRC-32."""
    storage = t.untyped_storage()
    info = _UNCHECKED.pop(storage, None)
    if info is not None:
        data = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
        if zlib.crc32(data) != info.CRC:
            raise CheckpointError(
                f"{path}: tensor {name!r} is stored in record {info.filename!r}, whose bytes do not match the "
                "CRC-32 the zip recorded for them; the file is damaged: save or copy the checkpoint again"
            )
    return t


def _torch_load(path: Path):
    require_regular_file(path)
    try:
        try:
            return _mmap_load(path)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (non-zip) serialisation cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"a {found.group(1)}" if found else "objects"
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: torch.load(weights_only=True) found {what}, not only tensors and plain "
            "containers; save model.state_dict() or safetensors instead"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, LookupError, struct.error,
            AttributeError, TypeError, AssertionError) as exc:
        # bytes that are not a checkpoint can fail anywhere in the unpickler (IndexError: its stack), and
        # torch.load asserts on some (a persistent id that is not a tuple, a storage key it never loaded)
        raise CheckpointError(f"{path}: unreadable or truncated torch checkpoint ({_one_line(exc)})") from None


def _state_dict(obj, path: Path) -> tuple[dict, int | None, bool]:
    """The tensor mapping inside a loaded pickle, a step stored beside it, and
    whether it came from a Lightning checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    step = None
    for key in ("global_step", "step"):
        step = _stored_step(obj.get(key), key, path)
        if step is not None:
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


def _weights_beside(obj, state: dict) -> dict[str, int]:
    """The containers of weights in a loaded pickle *obj* outside *state*, the state dict read: each one's key
    path (``ema_state_dict``, ``model.encoder`` nested in the state dict) and how many floating tensors it holds.

    A container of weights holds a floating tensor under a name ending in ``weight`` (as a state dict names
    them), or is a list of floating tensors (``shadow_params`` of an EMA, a module's blocks); optimizer state
    (``exp_avg`` under a parameter's index) is none. A tensor on a storage of *state*'s (the same model saved
    under two keys) is no second copy.
    """
    taken = {t.untyped_storage().data_ptr() for t in state.values()
             if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta and t.numel()}
    found: dict[str, int] = {}
    for where, item in _walk(obj):
        if item is state or isinstance(item, torch.Tensor):
            continue
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        floating = [(k, v) for k, v in pairs if isinstance(v, torch.Tensor) and v.is_floating_point()
                    and not (v.layout == torch.strided and not v.is_meta and v.numel()
                             and v.untyped_storage().data_ptr() in taken)]
        if floating and (not isinstance(item, dict) or any(str(k).endswith("weight") for k, _ in floating)):
            found[where or "(top level)"] = len(floating)
    return dict(sorted(found.items()))


def _read_torch(files: Sequence[Path], label: str, keys: KeyOptions,
                check: Callable[[Sequence[Path], list[list[str]]], None] | None = None) -> CheckpointReader:
    """The tensors of pickles *files*, checked against their shard index (by *check*, default
    :func:`_check_shard_index`, given the files and each one's tensor names)."""
    reader = CheckpointReader(label, {})
    loaded = [_torch_load(path) for path in files]
    (check or _check_shard_index)(files, [
        [k for k, v in _state_dict(obj, path)[0].items() if isinstance(v, torch.Tensor)]
        for path, obj in zip(files, loaded)
    ])
    for path, obj in zip(files, loaded):
        add_state_dict(reader, obj, path, keys)
    return reader


def add_state_dict(reader: CheckpointReader, obj, path: Path, keys: KeyOptions) -> None:
    """Add the floating tensors of a loaded pickle *obj* (read from *path*) to *reader*.

    Tied weights (one storage saved under several names with the same
    offset, shape and strides) are one parameter: of the names selected by
    *keys* (include / exclude), the first in the state dict's order is kept,
    as ``save_pretrained`` keeps it. A name left out by the selection never
    hides its tied twin. Other views that share values (a packed
    ``in_proj_weight`` beside its q, k, v slices, a weight beside its
    transpose) are refused; disjoint views of one storage (FSDP's flat
    parameter) are separate parameters. A selected floating tensor that is sparse or on the
    meta device (which holds no values) is refused.
    """
    state, step, lightning = _state_dict(obj, path)
    reader.step_hint = step if step is not None else reader.step_hint
    reader.beside.update({(path.name, where): n for where, n in _weights_beside(obj, state).items()})
    names = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    prefix = keys.lightning_prefix
    strip_lightning = lightning and prefix and names and all(k.startswith(prefix) for k in names)
    seen_storage: set[tuple] = set()
    views: dict[int, list[tuple[torch.Tensor, str]]] = {}  # storage: the tensors read on it, with their names
    for key in names:
        t = state[key]
        raw = key[len(prefix) :] if strip_lightning else key
        name = keys.canonical(raw)
        reader.considered.add(name)
        if not t.is_floating_point() or not keys.selected(name):
            if not t.is_floating_point():
                skip_unread(reader, name, t.dtype, keys)
            continue
        if t.is_meta or t.is_nested or t.layout != torch.strided:
            what = ("on the meta device (it holds no values)" if t.is_meta else "a nested tensor" if t.is_nested
                    else f"{str(t.layout)[6:]}, not dense")
            raise CheckpointError(
                f"{path}: tensor {name!r} is {what}; save its values as a dense tensor or leave it out with "
                f"exclude={name!r}"
            )
        if t.numel() > 0:
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if ident in seen_storage:
                continue
            seen_storage.add(ident)
            views.setdefault(ident[0], []).append((t, name))
        loader = (lambda t=t, name=name: _crc_checked(t, name, path)) if t.untyped_storage() in _UNCHECKED else t
        _add(reader, raw, t.shape, t.dtype, loader, keys, str(path))
    for on_one in views.values():
        if (shared := _sharing(on_one)) is not None:
            raise CheckpointError(
                f"{path}: tensors {shared[0]!r} and {shared[1]!r} are views of the same values (a packed parameter "
                f"saved beside its slices?), which would be counted twice; leave one out with exclude={shared[1]!r}"
            )


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that view *t* spans, from its first element to its last."""
    size = t.element_size()
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return t.storage_offset() * size, (t.storage_offset() + last + 1) * size


def _sharing(views: list[tuple[torch.Tensor, str]]) -> tuple[str, str] | None:
    """Two names of *views* (tensors on one storage, in the state dict's order) whose values overlap, else None.

    Views are swept in order of their first byte; only those whose spans overlap are compared element by
    element, so the views of a flat storage (FSDP's, thousands of them) cost a sort."""
    spans = [_extent(t) for t, _ in views]
    open_: list[int] = []  # views whose span reaches past the current one's start
    for i in sorted(range(len(views)), key=spans.__getitem__):
        open_ = [j for j in open_ if spans[j][1] > spans[i][0]]
        for j in open_:
            if _overlap(views[j][0], views[i][0]):
                first, second = sorted((i, j))
                return views[first][1], views[second][1]
        open_.append(i)
    return None


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether views *a* and *b* of one storage share a byte."""
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    if a1 <= b0 or b1 <= a0:
        return False
    if a.element_size() != b.element_size() or a.is_contiguous() or b.is_contiguous():
        return True  # spans that overlap: a contiguous view holds every element of its span
    # interleaved strided views (columns of one matrix): compare the elements each one covers
    size, lo = a.element_size(), min(a0, b0) // a.element_size()
    covered = torch.zeros(max(a1, b1) // size - lo, dtype=torch.bool)
    covered.as_strided(a.shape, a.stride(), a.storage_offset() - lo).fill_(True)
    return bool(covered.as_strided(b.shape, b.stride(), b.storage_offset() - lo).any())


def open_checkpoint(files: Sequence[Path | RemoteFile], label: str, keys: KeyOptions) -> CheckpointReader:
    """Open the files of one checkpoint: all safetensors, all torch pickles (local or remote), a
    torch.distributed.checkpoint folder's (``.metadata`` first) or a DeepSpeed
    ``mp_rank_00_model_states.pt``."""
    from .dcp import METADATA, read_dcp
    from .deepspeed import is_model_states, read_deepspeed

    if is_remote(files):
        if all(f.suffix == ".safetensors" for f in files):
            return _read_remote_safetensors(files, label, keys)
        return _read_remote_torch(files, label, keys)
    if files and files[0].name == METADATA:
        return read_dcp(files, label, keys)
    if len(files) == 1 and is_model_states(files[0]):
        return read_deepspeed(files[0], label, keys)
    if all(f.suffix == ".safetensors" for f in files):
        return _read_safetensors(files, label, keys)
    return _read_torch(files, label, keys)


def shard_files(index: Path | RemoteFile, root: Path | None = None) -> list[Path | RemoteFile]:
    """The shard files named by a ``*.index.json`` weight map, in order of first use.

    Each shard must be named inside the index's folder and resolve (symlinks
    followed) to a file inside *root* (default: that folder): a weight map
    naming ``../other/model.safetensors`` or an absolute path would ingest
    another checkpoint's tensors. A hub cache's snapshot links its files into
    the repository's ``blobs/``, so its root is the repository folder. A
    remote index may name only files beside it.
    """
    if isinstance(index, RemoteFile):
        return _remote_shard_files(index)
    require_regular_file(index)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: unreadable shard index ({_one_line(exc)})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' is a {type(weight_map).__name__}, not an object of tensor: file")
    folder = index.parent.resolve()
    inside = folder if root is None else Path(root).resolve()
    shards: dict[Path, Path] = {}  # resolved: as named
    for tensor, name in weight_map.items():
        entry = f"weight_map entry {tensor!r}: {name!r}"
        if not isinstance(name, str) or not name or "\0" in name:
            raise CheckpointError(f"{index}: {entry} is not a file name")
        path = index.parent / name
        try:
            resolved = path.resolve()
            named = (folder / name).parent.resolve() / path.name  # the name's own folders, not the link's target
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop
            resolved = named = None
        if resolved is None or not (named.is_relative_to(folder) and resolved.is_relative_to(inside)):
            raise CheckpointError(f"{index}: {entry} is outside the checkpoint folder; shards must be in {folder}")
        shards.setdefault(resolved, path)
    for path in shards.values():
        if not path.exists():
            raise CheckpointError(f"{index}: names shard {path.name!r}, which is missing")
        require_regular_file(path)
    return list(shards.values())


# The shard index a checkpoint's files were listed from, by the suffix of its shards.
_INDEX_NAMES = {".safetensors": "model.safetensors.index.json", ".bin": "pytorch_model.bin.index.json"}


def _local_shard_index(files: Sequence[Path]) -> tuple[Path, dict[Path, str], dict[str, Path]] | None:
    """The shard index *files* were listed from (by :func:`shard_files`), if any.

    That is the index of their format in the nearest folder above them,
    provided its weight map names exactly these files (resolved). Returned
    with each file's name in the weight map and each tensor's file; ``None``
    for files not listed from an index (one ``model.safetensors``, a folder
    of unindexed files).
    """
    index_name = _INDEX_NAMES.get(files[0].suffix) if files else None
    if index_name is None:
        return None
    folder = Path(os.path.commonpath([os.path.abspath(f.parent) for f in files]))
    index = next((d / index_name for d in (folder, *folder.parents) if (d / index_name).is_file()), None)
    if index is None:
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
            return None
        resolved = {name: (index.parent / name).resolve() for name in set(weight_map.values())}
        ours = {f.resolve(): f for f in files}
    except (OSError, ValueError, KeyError, TypeError, RecursionError, RuntimeError):
        return None  # not the index the files were listed from: that one was read by shard_files
    if set(resolved.values()) != set(ours):
        return None
    name_of: dict[Path, str] = {}
    for name in sorted(resolved):
        name_of.setdefault(ours[resolved[name]], name)
    return index, name_of, {tensor: ours[resolved[name]] for tensor, name in weight_map.items()}


def _check_shard_index(files: Sequence[Path], keys_in: Sequence[Sequence[str]]) -> None:
    """Refuse shards that disagree with the index they were listed from.

    *keys_in* holds the tensor names of each of *files*. Every tensor the
    weight map lists must be in the shard it names, and every tensor of a
    shard must be listed there: otherwise a tensor would be silently left
    out, or read from a file the index does not vouch for.
    """
    found = _local_shard_index(files)
    if found is None:
        return
    index, name_of, shard_of = found
    _check_weight_map(str(index), {name_of[f]: keys for f, keys in zip(files, keys_in)},
                      {tensor: name_of[f] for tensor, f in shard_of.items()})


def _check_remote_shard_index(files: Sequence[RemoteFile], keys_in: Sequence[Sequence[str]]) -> None:
    """As :func:`_check_shard_index`, for shards named by a remote index beside them."""
    index_name = _INDEX_NAMES.get(files[0].suffix) if files else None
    folder = files[0].parent if files else None
    index = folder.children().get(index_name) if folder is not None and index_name is not None else None
    if not isinstance(index, RemoteFile) or any(f.parent is not folder for f in files):
        return
    weight_map = _weight_map(index)
    if not all(isinstance(v, str) for v in weight_map.values()) or {f.name for f in files} != set(weight_map.values()):
        return
    _check_weight_map(index.label, {f.name: keys for f, keys in zip(files, keys_in)}, weight_map)


def _check_weight_map(index: str, keys_in: dict[str, Sequence[str]], weight_map: dict[str, str]) -> None:
    """Tensors *keys_in* each shard (by its name in the index) against the index's *weight_map*."""
    where: dict[str, str] = {}
    for shard, keys in keys_in.items():
        for key in keys:
            if key in where:
                raise CheckpointError(f"{index}: tensor {key!r} is in two shards, {where[key]!r} and {shard!r}")
            where[key] = shard
    for key, shard in where.items():
        listed = weight_map.get(key)
        if listed is None:
            raise CheckpointError(
                f"{index}: shard {shard!r} holds tensor {key!r}, which the weight_map does not list; "
                "the index does not match its shards"
            )
        if listed != shard:
            raise CheckpointError(
                f"{index}: the weight_map puts tensor {key!r} in shard {listed!r}, but it is in {shard!r}"
            )
    for key, listed in weight_map.items():
        if key not in where:
            raise CheckpointError(
                f"{index}: the weight_map puts tensor {key!r} in shard {listed!r}, which does not hold it"
            )


def _weight_map(index: RemoteFile) -> dict:
    if "weight_map" in index.memo:
        return index.memo["weight_map"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{index.label}: unreadable shard index ({_one_line(exc)})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index.label}: 'weight_map' is a {type(weight_map).__name__}, not an object of tensor: file"
        )
    index.memo["weight_map"] = weight_map
    return weight_map


def _remote_shard_files(index: RemoteFile) -> list[RemoteFile]:
    siblings = index.parent.children()
    shards: dict[str, RemoteFile] = {}
    for tensor, name in _weight_map(index).items():
        entry = f"weight_map entry {tensor!r}: {name!r}"
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"{index.label}: {entry} is not the name of a file beside the index")
        shard = siblings.get(name)
        if not isinstance(shard, RemoteFile):
            raise CheckpointError(f"{index.label}: names shard {name!r}, which is missing")
        shards.setdefault(name, shard)
    return list(shards.values())
