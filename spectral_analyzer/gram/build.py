"""The band builder: one streaming pass over the deltas, scheduled with Dask.

A task per parameter chunk (and per tile of rows when there are few chunks)
reads its column range of the delta rows a block of rows at a time into a
ring on the computing device (:mod:`~spectral_analyzer.gram.ring`), keeps the
last L rows as a halo, and computes the per-tensor band of each block of new
rows with :func:`~spectral_analyzer.gram.kernel.band_rows` (torch, float64
accumulation). Task results are tree-summed per tensor. The band is cached in
the store and extended, not rebuilt, when deltas are appended.

Memory: each task holds ``(L + BLOCK_ROWS)`` rows of one chunk in float32 (on
cuda in device memory, with two pinned blocks of ``BLOCK_ROWS`` rows on the
host); the local scheduler runs as many tasks at once as ``memory_limit``
allows (at most one per core), so peak memory does not depend on p.
"""

from __future__ import annotations

import math
import os
from collections import deque

import dask
import numpy as np
import torch
from dask.base import tokenize
from dask.callbacks import Callback

from .._version import __version__
from ..errors import DeviceError, SchedulerError, StoreError, WindowError
from ..store import Store
from .kernel import COL_BLOCK, DEVICE_COL_BLOCK, band_rows
from .ring import HostRing, StagedRing
from ..progress import progress_bar

__all__ = ["BLOCK_ROWS", "DEFAULT_MAX_LAG", "build_band", "resolve_device"]

BLOCK_ROWS = 8  # new rows per kernel call
DEFAULT_MAX_LAG = 16
DEFAULT_MEMORY_LIMIT = 1 << 30  # bytes of delta rows held by running tasks at once
_MERGE_FAN_IN = 8


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is cuda when a GPU is visible, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("cuda requested but torch sees no CUDA device; use device='cpu'")
    return dev


def _band_task(
    path: str,
    storage_options: dict | None,
    start: int,
    stop: int,
    segments: tuple[tuple[int, int, int], ...],
    r0: int,
    r1: int,
    max_lag: int,
    device: str,
    threads: int,
    crcs: np.ndarray,
) -> dict[tuple[int, int], np.ndarray]:
    """Band rows r0..r1-1 of the tensor pieces in columns [start, stop).

    Rows go into a ring of L + BLOCK_ROWS rows on the device (a
    :class:`~spectral_analyzer.gram.ring.HostRing` on cpu, a
    :class:`~spectral_analyzer.gram.ring.StagedRing` elsewhere): the last L
    rows are the halo of each new block.
    """
    # torch's intra-op thread count is per OS thread (OpenMP): set it in the worker's own thread.
    torch.set_num_threads(threads)
    store = Store.open(path, storage_options=storage_options, verify=False)
    store.expect_crcs(start // store.chunk_size, crcs)
    dev = torch.device(device)
    if dev.type == "cpu":
        ring = HostRing(store, start, stop, max_lag, BLOCK_ROWS)
    else:
        ring = StagedRing(store, start, stop, max_lag, BLOCK_ROWS, dev)
    rows = _ring_band(ring, [(a - start, b - start) for _, a, b in segments], r0, r1, max_lag)
    return {(t, r0): rows[s] for s, (t, _, _) in enumerate(segments)}


def _ring_band(
    ring: HostRing | StagedRing, segments: list[tuple[int, int]], r0: int, r1: int, max_lag: int
) -> np.ndarray:
    """Band rows r0..r1-1 of *segments* (columns of the ring's chunk), through *ring*.

    The L rows before r0 land first, then the rows r0..r1-1, BLOCK_ROWS at a
    time. Block k is computed once it and ``ring.ahead`` blocks after it have
    landed (on cuda: their copies are queued), and each landing stages the
    block after it: on cuda the copy of block k + 1 runs while the host reads
    block k + 2 and then while block k is computed (the operating system
    reading ahead the block after that).
    """
    halo = range(max(0, r0 - max_lag), r0)
    blocks = [halo[i : i + BLOCK_ROWS] for i in range(0, len(halo), BLOCK_ROWS)]
    blocks += [range(k, min(r1, k + BLOCK_ROWS)) for k in range(r0, r1, BLOCK_ROWS)]
    later = [*blocks, range(0), range(0)]  # nothing to stage after the last block
    parts = []
    landed: deque[list[int]] = deque()
    try:
        ring.stage(later[0], later[1])
        with ring.computing():
            for k, rows in enumerate(blocks):
                while len(landed) <= ring.ahead and k + len(landed) < len(blocks):
                    j = k + len(landed)
                    landed.append(ring.land(blocks[j]))
                    ring.stage(later[j + 1], later[j + 2])
                new = landed.popleft()
                ring.ready()
                if rows.start >= r0:
                    parts.append(band_rows(ring.rows, new, ring.logical, segments, max_lag))
                    ring.release()
    finally:
        ring.drain()
    return np.concatenate(parts, axis=1)


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = value if key not in out else out[key] + value
    return out


def _tree_sum(parts: list):
    while len(parts) > 1:
        parts = [
            dask.delayed(_merge, pure=True)(*parts[i : i + _MERGE_FAN_IN]) for i in range(0, len(parts), _MERGE_FAN_IN)
        ]
    return parts[0]


def _chunk_segments(store: Store) -> list[tuple[int, int, tuple[tuple[int, int, int], ...]]]:
    """Each parameter chunk with the (tensor index, start, stop) pieces inside it."""
    manifest = store.manifest
    out = []
    t = 0
    for start, stop in store.chunk_bounds():
        while manifest[t].offset + manifest[t].size <= start:
            t += 1
        pieces, u = [], t
        while u < len(manifest) and manifest[u].offset < stop:
            a = max(start, manifest[u].offset)
            b = min(stop, manifest[u].offset + manifest[u].size)
            if b > a:
                pieces.append((u, a, b))
            u += 1
        out.append((start, stop, tuple(pieces)))
    return out


def _row_tiles(r0: int, r1: int, n_chunks: int, workers: int, max_lag: int) -> list[tuple[int, int]]:
    """Rows r0..r1-1 in tiles of balanced cost, so that chunk columns x tiles keep every worker busy.

    Rows are split only when there are too few chunk columns to share evenly
    among the workers: into the fewest tiles that make the number of tasks a
    multiple of the workers, none shorter than 2 L rows. A tile reads the L
    rows before it as its halo (the first one only those after the start of
    the run), so tiles are balanced by rows + halo. Tiles start on
    BLOCK_ROWS boundaries: every row is computed in the same blocks as in a
    build from scratch (see build_band).
    """
    n = r1 - r0
    want = 1 if n_chunks >= 4 * workers else workers // math.gcd(n_chunks, workers)
    want = max(1, min(want, n // (2 * max(max_lag, BLOCK_ROWS))))
    if want == 1:
        return [(r0, r1)]
    first_halo = min(max_lag, r0)
    share = (n + first_halo + (want - 1) * max_lag) / want  # rows + halo per tile
    bounds = [r0]
    for i in range(1, want):
        end = r0 + share - first_halo + (i - 1) * (share - max_lag)
        end = int(round(end / BLOCK_ROWS)) * BLOCK_ROWS
        if bounds[-1] < end < r1:
            bounds.append(end)
    bounds.append(r1)
    return list(zip(bounds, bounds[1:]))


class _TaskProgress(Callback):
    def __init__(self, bar):
        super().__init__()
        self.bar = bar

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith("_band_task"):
            self.bar.update(1)


def local_workers(
    chunk_size: int, max_lag: int, memory_limit: int, device: str | torch.device = "cpu", remote: bool = False
) -> tuple[int, int]:
    """Tasks run at once by the local scheduler, and torch threads per task.

    On cpu a task holds ``L + BLOCK_ROWS`` float32 rows of one chunk plus a
    float64 column block of them. On cuda those live in device memory, and the
    task holds two pinned staging blocks of ``BLOCK_ROWS`` rows on the host.
    Reading from object storage adds the block of rows read ahead and Zarr's
    decoded copy of it (*remote*). As many tasks run as *memory_limit* allows
    of host memory (and half the free device memory allows, on cuda), at most
    one per core.
    """
    dev = torch.device(device)
    block = BLOCK_ROWS * chunk_size * 4
    ring = (max_lag + BLOCK_ROWS) * chunk_size * 4
    ahead = 2 * block if remote else 0
    cores = os.cpu_count() or 1
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        on_device = ring + block + (max_lag + 2 * BLOCK_ROWS) * DEVICE_COL_BLOCK * 8
        workers = min(memory_limit // (2 * block + ahead), free // 2 // on_device)
    else:
        workers = memory_limit // (ring + (max_lag + BLOCK_ROWS) * COL_BLOCK * 8 + ahead)
    workers = max(1, min(cores, workers))
    return workers, 1 if workers > 1 else cores


def _compute_rows(
    store: Store,
    max_lag: int,
    r0: int,
    r1: int,
    device: torch.device,
    scheduler,
    memory_limit: int,
    progress: bool,
) -> np.ndarray:
    chunks = _chunk_segments(store)
    if scheduler is None:
        workers, threads = local_workers(store.chunk_size, max_lag, memory_limit, device, store.is_remote)
    else:  # the cluster's workers size themselves; only the number of row tiles depends on this
        workers, threads = local_workers(store.chunk_size, max_lag, memory_limit)[0], 1
    tiles = _row_tiles(r0, r1, len(chunks), workers, max_lag)
    path = store.path if store.is_remote else os.path.abspath(store.path)  # workers may run elsewhere
    # names the tasks: the same generation of rows, columns and chunking give the same band
    crcs = store.crcs[:r1]
    c = store.chunk_size
    tasks = [
        dask.delayed(_band_task)(
            path, store.storage_options, a, b, segs, t0, t1, max_lag, str(device), threads, crcs[:t1, a // c].copy(),
            dask_key_name=f"_band_task-{tokenize(store.chain[t1 - 1], store.attrs['tensors'], c, a, t0, t1, max_lag)}",
        )
        for a, b, segs in chunks
        for t0, t1 in tiles
    ]
    total = _tree_sum(tasks)
    bar = None
    if progress:
        bar = progress_bar(total=len(tasks), desc="band", unit="task", leave=False)
    try:
        if scheduler is None:
            callbacks = [_TaskProgress(bar)] if bar is not None else []
            with dask.config.set(callbacks=callbacks):
                (parts,) = dask.compute(total, scheduler="threads", num_workers=workers)
        else:
            (parts,) = dask.compute(total, scheduler=scheduler)
            if bar is not None:
                bar.update(len(tasks))
    finally:
        if bar is not None:
            bar.close()
    n_tensors = len(store.manifest)
    out = np.zeros((n_tensors, r1 - r0, max_lag + 1))
    for (t, t0), rows in parts.items():
        out[t, t0 - r0 : t0 - r0 + rows.shape[0]] += rows
    lags = np.arange(max_lag + 1)
    rows_idx = np.arange(r0, r1)
    out[:, lags[None, :] > rows_idx[:, None]] = np.nan  # no delta i - l before the first
    return out


def _client(scheduler):
    if scheduler is None or not isinstance(scheduler, str):
        return scheduler, None
    from distributed import Client

    try:
        client = Client(scheduler, timeout=5, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        raise SchedulerError(f"cannot reach the dask scheduler at {scheduler} ({' '.join(str(exc).split())})") from None
    return client, client


def build_band(
    store: Store,
    max_lag: int = DEFAULT_MAX_LAG,
    *,
    device: str | torch.device = "auto",
    scheduler=None,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    progress: bool = False,
) -> tuple[np.ndarray, int]:
    """The per-tensor band ``b_T[i, l] = <d_i[T], d_{i-l}[T]>``, computing only what is not cached.

    Parameters
    ----------
    store : Store
    max_lag : int
        L, the largest lag needed; a cached band with a larger L is reused.
        The cache is used up to the first row whose generation differs from
        this snapshot's (rows rewritten since) and extended or recomputed
        from there.
    device : "auto", "cpu", "cuda" or a torch device
    scheduler : None, a dask.distributed address or Client
        None runs Dask's local threaded scheduler.
    memory_limit : int
        Bytes of delta rows that running tasks may hold at once (local scheduler).
    progress : bool

    Returns
    -------
    band : numpy.ndarray, float64, shape (n_tensors, n_deltas, L + 1)
        NaN where ``i - l < 0``.
    max_lag : int
        The L of the returned band (the one asked for; a cached band with a
        larger L is sliced).

    Cost: one read of the deltas not yet in the cache (plus L halo rows per
    task), ``~2 (L + 8)`` flops per element read.
    """
    if max_lag < 1:
        raise WindowError(f"max_lag must be >= 1, got {max_lag}")
    n = store.n_deltas
    if n == 0:
        raise StoreError(f"{store.path}: holds no deltas yet (ingest at least two checkpoints)")
    found = store.band_cache.lookup(max_lag)
    cached, lag = found if found is not None else (None, max_lag)
    # From the start of the block holding the first row not cached: every row is then computed in
    # the same blocks of BLOCK_ROWS as in a build from scratch, so the band is bit-identical to it.
    start = 0 if cached is None else min(cached.shape[1], n)
    if start < n:
        start = start // BLOCK_ROWS * BLOCK_ROWS
        cached = None if cached is None else cached[:, :start]
    if start < n:
        dev = resolve_device(device)
        client, owned = _client(scheduler)
        try:
            rows = _compute_rows(store, lag, start, n, dev, client, memory_limit, progress)
        except OSError as exc:  # the network, permissions (a corrupt chunk is a StoreError already)
            raise StoreError(f"{store.path}: cannot read the deltas ({' '.join(str(exc).split())})") from None
        finally:
            if owned is not None:
                owned.close()
        meta = {"precision": "float64", "version": __version__}
        store.cache(lambda current: current.band_cache.write(rows, start, lag, meta))
        band = rows if cached is None else np.concatenate([cached, rows], axis=1)
    else:
        band = cached[:, :n]
    return band[:, :, : max_lag + 1], max_lag
