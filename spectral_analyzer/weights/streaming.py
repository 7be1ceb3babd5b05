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

__all__ = ["GROUP_BYTES", "tensor_groups", "thetas"]

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


def thetas(store: Store, entries: Sequence[TensorEntry]) -> Iterator[list[np.ndarray]]:
    """theta_i of each entry, flat float64, for the checkpoints i = 0 .. n_deltas in order.

    The same arrays are yielded each time, updated in place: copy what must
    outlive the next step. *entries* must be sorted by offset.

    Memory: 8 bytes per parameter of *entries*, plus one delta row of their
    spans in float32 (the one being added, then the one being read).
    """
    spans = _spans(entries, store.chunk_size)
    theta = [store.read_base(t.offset, t.offset + t.size).astype(np.float64) for t in entries]
    n = store.n_deltas

    def read(row: int) -> list[np.ndarray]:
        return [store.read_delta_row(row, a, b) for a, b, _ in spans]

    with ThreadPoolExecutor(1, thread_name_prefix="spectral-analyzer-weights") as pool:
        ahead = pool.submit(read, 0) if n else None
        yield theta
        for row in range(n):
            deltas = ahead.result()
            for (a, _, members), d in zip(spans, deltas):
                for i in members:
                    t = entries[i]
                    theta[i] += d[t.offset - a : t.offset - a + t.size]
            del deltas  # before the next row is read: one delta row in memory at a time
            ahead = pool.submit(read, row + 1) if row + 1 < n else None
            yield theta
