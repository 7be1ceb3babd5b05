"""Content identity of the committed rows: a hash chain.

``c_0 = H("base", manifest, chunk size, base step, crc32c of each base chunk)``
and ``c_i = H(c_{i-1}, step_i, crc32c of each chunk of delta row i)``, with H
an 8-byte BLAKE2b. The commit record holds ``c_n``; caches record the chain
value of every row they were computed from. Equal chains at row i mean the
first i rows have the same steps and the same crc32c in every chunk; a cache
whose chain stops matching at row i is reused before i and recomputed from i.
The crc32c values are the ones recorded when each chunk was written, so the
chain costs no read of the data.

How strong that is: BLAKE2b makes different crc32c values collide with
probability 2^-64, but a row rewritten with other values keeps its link only
if the crc32c of every chunk whose values changed collides, by accident with
probability 2^-32 per such chunk (a small model's row is one chunk: 2^-32 a
rewrite). crc32c is no cryptographic hash: values chosen to keep it (an
adversary's, not a training's) would keep the chain and the caches with it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from .crc import crc32c

__all__ = ["base_link", "chain", "chunk_crc", "zero_crc"]

_ZERO_CRC: dict[int, int] = {}


def chunk_crc(data: np.ndarray) -> int:
    """crc32c of a chunk's float32 values as stored (little-endian bytes)."""
    return crc32c(np.ascontiguousarray(data, dtype="<f4"))


def zero_crc(n: int) -> int:
    """crc32c of *n* float32 zeros: the value of a chunk Zarr leaves unwritten."""
    if n not in _ZERO_CRC:
        _ZERO_CRC[n] = chunk_crc(np.zeros(n, dtype=np.float32))
    return _ZERO_CRC[n]


def _h(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part)
    return int.from_bytes(h.digest(), "little")


def base_link(tensors: list, chunk_size: int, base_step: int, crcs: Sequence[int]) -> int:
    """c_0: the manifest, the chunking, the base's step and chunks."""
    head = json.dumps([tensors, int(chunk_size), int(base_step)], sort_keys=True).encode()
    return _h(b"spectral-analyzer/base", head, np.asarray(crcs, dtype="<u4").tobytes())


def chain(c0: int, steps: np.ndarray, crcs: np.ndarray) -> np.ndarray:
    """``c_1..c_n`` (uint64) from c_0, the rows' steps and their chunks' crc32c (n, n_chunks)."""
    out = np.empty(len(steps), dtype=np.uint64)
    prev = int(c0)
    for i, (step, row) in enumerate(zip(np.asarray(steps, dtype="<i8"), np.asarray(crcs, dtype="<u4"))):
        prev = _h(prev.to_bytes(8, "little"), step.tobytes(), row.tobytes())
        out[i] = prev
    return out


def hex_of(value: int) -> str:
    return f"{int(value):016x}"
