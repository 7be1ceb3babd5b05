"""Weights rebuilt checkpoint by checkpoint from the store, a group of tensors at a time.

``theta_i = base + sum_{k<=i} d_k``, accumulated in float64 from the
float32 deltas. A group is a run of tensors adjacent in the store (so a
chunk is read by at most the two groups it straddles), at most
:data:`GROUP_BYTES` of float64 parameters unless one tensor alone is
larger: memory is bounded by the group, not by the model. While the caller
computes on checkpoint i, a background thread reads the delta row of
checkpoint i + 1 (once row i has been added: one delta row in memory) (the store's reads release the GIL, as torch's kernels do).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..store import Store, TensorEntry
from ..store.direct_io import aligned_zeros

__all__ = ["GROUP_BYTES", "Scratch", "tensor_groups", "thetas"]

GROUP_BYTES = 256 << 20


def tensor_groups(entries: Sequence[TensorEntry], limit: int | None = None) -> list[list[int]]:
    """Indices of *entries* (in store order) in runs of at most *limit* bytes of float64 (default
    :data:`GROUP_BYTES`), a larger tensor alone."""
    limit = GROUP_BYTES if limit is None else limit
    order = sorted(range(len(entries)), key=lambda i: entries[i].offset)
    groups: list[list[int]] = []
    size = 0
    for i in order:
        nbytes = 8 * entries[i].size
        if not groups or size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return groups


def _spans(entries: Sequence[TensorEntry], chunk: int) -> list[tuple[int, int, list[int]]]:
    """Entries (sorted by offset) that share a chunk merged into one read span: (start, stop, entry indices)."""
    spans: list[tuple[int, int, list[int]]] = []
    for i, t in enumerate(entries):
        a, b = t.offset, t.offset + t.size
        if spans and a // chunk <= (spans[-1][1] - 1) // chunk:
            s = spans[-1]
            spans[-1] = (s[0], max(s[1], b), s[2] + [i])
        else:
            spans.append((a, b, [i]))
    return spans


class Scratch:
    """Buffers kept from one group of tensors to the next, each grown to the largest asked for.

    Fresh pages cost their first touch (a fault and zeroing per 4 KiB page:
    about 2 s a GB on a virtual machine, against 0.15 s to write them again);
    a new theta and delta row per group and per checkpoint cost a GPT-2-small
    run about a second a checkpoint of the reader's and the main thread's time.
    """

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}

    def take(self, key: str, n: int, dtype) -> np.ndarray:
        """*n* elements of *dtype* (contents undefined): the buffer named *key*, grown if it is smaller."""
        buf = self._buffers.get(key)
        if buf is None or buf.size < n or buf.dtype != dtype:
            self._buffers.pop(key, None)  # released before the larger one is allocated
            # on a 64-byte boundary (numpy's start 16 bytes past one): the matrices in it are decomposed where
            # they lie when their offsets are whole lines (kernel.aligned copies the others)
            buf = self._buffers[key] = aligned_zeros((n,), dtype)
        return buf[:n]


def _split(buf: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(buf, np.cumsum(sizes)[:-1]) if sizes else []


def thetas(store: Store, entries: Sequence[TensorEntry], scratch: Scratch | None = None) -> Iterator[list[np.ndarray]]:
    """theta_i of each entry, flat float64, for the checkpoints i = 0 .. n_deltas in order.

    The same arrays are yielded each time, updated in place: copy what must
    outlive the next step. They are views of *scratch*'s buffers when given
    (which the next call with the same *scratch* overwrites). *entries* must
    be sorted by offset.

    Memory: 8 bytes per parameter of *entries*, plus one delta row of their
    spans in float32 (the one being added, then the one being read into the
    same buffer).
    """
    scratch = Scratch() if scratch is None else scratch
    spans = _spans(entries, store.chunk_size)
    theta = _split(scratch.take("theta", sum(t.size for t in entries), np.float64), [t.size for t in entries])
    pieces = _split(scratch.take("row", sum(b - a for a, b, _ in spans), np.float32), [b - a for a, b, _ in spans])
    n = store.n_deltas

    def members(values: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(theta of an entry, its part of the row just read), for every entry."""
        for (a, _, idx), piece in zip(spans, values):
            for i in idx:
                t = entries[i]
                yield theta[i], piece[t.offset - a : t.offset - a + t.size]

    def read(row: int) -> list[np.ndarray]:
        return [store.read_delta_row(row, a, b, piece) for (a, b, _), piece in zip(spans, pieces)]

    for (a, b, _), piece in zip(spans, pieces):
        store.read_base(a, b, piece)
    for th, part in members(pieces):
        th[:] = part
    with ThreadPoolExecutor(1, thread_name_prefix="spectral-analyzer-weights") as pool:
        ahead = pool.submit(read, 0) if n else None
        yield theta
        for row in range(n):
            for th, part in members(ahead.result()):
                th += part
            ahead = pool.submit(read, row + 1) if row + 1 < n else None  # into the same buffer, now added
            yield theta
