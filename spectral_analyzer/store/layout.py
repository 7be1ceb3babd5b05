"""The layout of a store: format constants, the tensor manifest, the arrays.

::

    run.zarr/
      deltas      float32 (delta, param)      chunks (1, C), crc32c
      base        float32 (param,)            theta at the first checkpoint
      last_theta  float32 (slot, param)       theta at the last committed checkpoint
      step        int64   (delta,)            end step of each delta, crc32c
      chunk_crc   uint32  (delta, chunk)      crc32c of each chunk's values, as written
      sources     string  (checkpoint,)       each checkpoint's provenance (JSON), base first, crc32c
      metrics/    step-indexed float64 series (metrics.py)
      weights/    singular values recorded at ingest (weight_record.py)
      gram/       the cached band (caches.py)
      results/    cached analysis Datasets (caches.py)
      .lock       the writer lock (lock.py)

Root attributes: the format, the manifest, ``n_params``, ``chunk_size``,
``base_step``, ``base_crc`` (the base's chunk crc32c values) and the commit
record (see core.py): a fixed size, however many rows the store holds, so a
commit writes O(1) metadata. Everything that grows with the run (steps,
checksums, sources, metrics) is an array an append extends at its end.
"""

from __future__ import annotations

import math
import operator
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import StoreError, StoreVersionError

__all__ = ["DEFAULT_CHUNK_SIZE", "FORMAT_NAME", "FORMAT_VERSION", "TensorEntry", "check_chunk_size", "check_format", "check_manifest",
           "create_arrays", "damaged", "no_store"]

FORMAT_NAME = "spectral-analyzer"
FORMAT_VERSION = 3  # 3: sources in an array; 2: chunk crc32c and the generation chain; 1 had neither
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024  # elements per chunk of a delta row (16 MiB)
CRC_ROWS = 256  # rows per chunk of ``chunk_crc``
SOURCE_ROWS = 64  # checkpoints per chunk of ``sources``


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's slice of the flattened parameter vector."""

    name: str
    offset: int
    size: int
    shape: tuple[int, ...]
    dtype: str  # dtype in the source checkpoint, e.g. "bfloat16"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorEntry:
        return cls(str(d["name"]), int(d["offset"]), int(d["size"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


def check_manifest(path: str, tensors: Any, n_params: Any, chunk_size: Any) -> list[TensorEntry]:
    """The manifest, checked: offsets contiguous from 0, sizes = prod(shape), summing to n_params."""
    try:
        entries = [TensorEntry.from_json(t) for t in tensors]
        p, c = int(n_params), int(chunk_size)
    except (TypeError, KeyError, ValueError) as exc:
        raise StoreError(f"{path}: the store is damaged: unreadable tensor manifest ({exc!r})") from None
    offset = 0
    for t in entries:
        if t.offset != offset or t.size != math.prod(t.shape) or t.size < 0:
            raise StoreError(
                f"{path}: the store is damaged: tensor {t.name!r} has offset {t.offset}, size {t.size} and "
                f"shape {t.shape}; expected offset {offset} and size {math.prod(t.shape)}"
            )
        offset += t.size
    if offset != p or p <= 0 or c <= 0:
        raise StoreError(f"{path}: the store is damaged: the manifest sums to {offset} parameters, n_params is {p}")
    return entries


def check_format(where: str, attrs: Mapping[str, Any]) -> None:
    """Refuse root attributes that are not a store of this format version."""
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{where}: not a spectral-analyzer store (no '{FORMAT_NAME}' format attribute)")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        hint = ("ingest the run again with this version" if isinstance(version, int) and version < FORMAT_VERSION
                else "upgrade the package")
        raise StoreVersionError(
            f"{where}: store format version {version!r} is not one this version of "
            f"spectral-analyzer reads (it reads version {FORMAT_VERSION}); {hint}"
        )


def no_store(where: str) -> StoreError:
    """The error of a path that holds no store yet."""
    return StoreError(f"{where}: no store here (run `spectral-analyze ingest CKPT_DIR -o {shlex.quote(where)}` first)")


def damaged(path: str, what: str) -> StoreError:
    """The error of a store whose bytes are not what was committed."""
    return StoreError(f"{path}: the store is damaged: {what}; ingest the run again (or restore it from a copy)")


def check_chunk_size(chunk_size: Any) -> int:
    """*chunk_size* as an int: a positive integer (not a bool, not a float), else a one-line ValueError."""
    try:
        n = operator.index(chunk_size)  # int, numpy integers; not float
    except TypeError:
        n = 0
    if isinstance(chunk_size, bool) or n < 1:
        raise ValueError(f"chunk_size must be a positive integer (parameters per chunk), got {chunk_size!r}")
    return n


def n_chunks(n_params: int, chunk_size: int) -> int:
    return -(-n_params // chunk_size)


def create_arrays(group, n_params: int, chunk: int) -> None:
    """The empty arrays of a new store (a ``zarr.Group``): sized for no deltas."""
    from zarr.codecs import Crc32cCodec  # here: the constants above are read without Zarr

    def data(name, shape, chunks, dims):
        group.create_array(name, shape=shape, chunks=chunks, dtype="float32", fill_value=0.0,
                           compressors=[Crc32cCodec()], dimension_names=dims)

    data("deltas", (0, n_params), (1, chunk), ("delta", "param"))
    data("base", (n_params,), (chunk,), ("param",))
    data("last_theta", (2, n_params), (1, chunk), ("slot", "param"))
    group.create_array("step", shape=(0,), chunks=(4096,), dtype="int64", fill_value=-1,
                       compressors=[Crc32cCodec()], dimension_names=("delta",))
    k = n_chunks(n_params, chunk)
    group.create_array("chunk_crc", shape=(0, k), chunks=(CRC_ROWS, k), dtype="uint32", fill_value=0,
                       compressors=[Crc32cCodec()], dimension_names=("delta", "chunk"))
    group.create_array("sources", shape=(0,), chunks=(SOURCE_ROWS,), dtype=str, compressors=[Crc32cCodec()],
                       dimension_names=("checkpoint",))


def chunk_lengths(n_params: int, chunk: int) -> Sequence[int]:
    return [min(chunk, n_params - s) for s in range(0, n_params, chunk)]

