"""The band builder: one streaming pass over the deltas, scheduled with Dask.

A task per parameter chunk (and per tile of rows when there are few chunks)
reads its column range of the delta rows a block of rows at a time into a
ring on the computing device (:mod:`~spectral_analyzer.gram.ring`), keeps the
last L rows as a halo, and computes the per-tensor products of each block of
new rows with :func:`~spectral_analyzer.gram.kernel.band_products` (torch,
float64 accumulation, a few large operations per block whatever the number
of tensors in the chunk). The products stay on the device and come back to
the host once per task. Task results are tree-summed per tensor. The band is
cached in the store and extended, not rebuilt, when deltas are appended.

Each task resolves its device where it runs (:mod:`~spectral_analyzer.devices`).

Memory: on cpu each task holds ``L + 2 BLOCK_ROWS`` float32 rows of one
chunk (``L + BLOCK_ROWS`` from object storage, which reads ahead its own
way) plus a float64 column block of them, and the local scheduler runs as
many tasks at once as ``memory_limit`` (default 1.25 GiB) allows, at most
one per core, so peak memory does not depend on p. On cuda a task holds its ring in
device memory and two pinned blocks of ``BLOCK_ROWS`` rows on the host; the
default ``memory_limit`` is then a quarter of the host's available memory,
and tasks are also limited by half the free device memory.
"""

from __future__ import annotations

import math
import os

import dask
import numpy as np
import torch
from dask.base import tokenize
from dask.callbacks import Callback

from .._version import __version__
from ..devices import check_device, resolve_device
from ..errors import SchedulerError, StoreError, WindowError
from ..store import Store
from ..threads import torch_threads
from .kernel import COL_BLOCK, GROUP, BandPlan, band_entries, band_products, ring_width
from .ring import HostRing, StagedRing, staged_slots
from ..progress import progress_bar

__all__ = ["BLOCK_ROWS", "DEFAULT_MAX_LAG", "build_band"]

BLOCK_ROWS = GROUP  # new rows per kernel call: as many as the kernel multiplies a block with at a time
DEFAULT_MAX_LAG = 16
DEFAULT_MEMORY_LIMIT = 5 << 28  # cpu: bytes of delta rows held by running tasks at once
HOST_SHARE = 4  # cuda: running tasks' pinned buffers take at most 1/HOST_SHARE of the available host memory
PRODUCTS_BYTES = 64 << 20  # products a task keeps on its device before copying them back
_MERGE_FAN_IN = 8


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
    commit: dict | None = None,
) -> dict[tuple[int, int], np.ndarray]:
    """Band rows r0..r1-1 of the tensor pieces in columns [start, stop).

    *device* is resolved here, on the worker that runs the task. Rows go into
    a ring of delta rows on that device (a
    :class:`~spectral_analyzer.gram.ring.HostRing` on cpu, a
    :class:`~spectral_analyzer.gram.ring.StagedRing` on cuda): the last L
    rows are the halo of each new block.
    """
    dev = resolve_device(device)
    # torch's intra-op thread count is set in the worker's own thread, and restored after: the value set
    # there is also the default of threads started later (a user's, another library's)
    with torch_threads(threads):
        store = Store.open(path, storage_options=storage_options, verify=False)
        if start % store.chunk_size or stop - start > store.chunk_size:
            raise StoreError(f"{path}: rewritten since this store was opened (its chunks now hold "
                             f"{store.chunk_size} parameters); open it again")
        store.expect_crcs(start // store.chunk_size, crcs)
        store.expect_commit(commit)  # a chunk that does not match: told as a store rewritten since, where it was
        pieces = [(a - start, b - start) for _, a, b in segments]
        if dev.type == "cpu":
            ring = HostRing(store, start, stop, max_lag, BLOCK_ROWS, segments=pieces)
        else:
            ring = StagedRing(store, start, stop, max_lag, BLOCK_ROWS, dev, segments=pieces)
        rows = _ring_band(ring, r0, r1, max_lag)
    return {(t, r0): rows[s] for s, (t, _, _) in enumerate(segments)}


def _ring_band(ring: HostRing | StagedRing, r0: int, r1: int, max_lag: int) -> np.ndarray:
    """Band rows r0..r1-1 of the ring's segments (tensor pieces of its chunk), through *ring*.

    The L rows before r0 land first, then the rows r0..r1-1, BLOCK_ROWS at a
    time, in the order of :mod:`~spectral_analyzer.gram.ring`: block k + A
    lands (A = ``ring.ahead``), block k is computed, then block k + A + 1 is
    staged. On cuda the host thus reads block k + 2 from the disk while the
    kernel of block k runs and block k + 1 is copied; the products stay on
    the device and are copied back once, at the end (or whenever
    :data:`PRODUCTS_BYTES` of them are held).
    """
    halo = range(max(0, r0 - max_lag), r0)
    blocks = [halo[i : i + BLOCK_ROWS] for i in range(0, len(halo), BLOCK_ROWS)]
    blocks += [range(k, min(r1, k + BLOCK_ROWS)) for k in range(r0, r1, BLOCK_ROWS)]

    def block(j: int) -> range:
        return blocks[j] if j < len(blocks) else range(0)

    ahead, plan = ring.ahead, ring.plan
    try:
        with ring.computing():
            held = _HeldProducts(plan.n_segments, ring.n_slots, r1 - r0, max_lag, ring.rows.device)
            ring.stage(range(0), then=block(0))
            ring.stage(block(0), then=block(1))
            for j in range(ahead):
                ring.land(block(j))
                ring.stage(block(j + 1), then=block(j + 2))
            for k, rows in enumerate(blocks):
                if k + ahead < len(blocks):
                    ring.land(blocks[k + ahead])
                ring.ready()
                if rows.start >= r0:
                    held.add(ring, rows, plan)
                    ring.release()
                ring.stage(block(k + ahead + 1), then=block(k + ahead + 2))
            return held.band()
    finally:
        ring.drain()


class _HeldProducts:
    """Products of a task's blocks kept on the device, turned into band entries on the host in one copy.

    Memory: ``n_segments * rows * n_slots * 8`` bytes on the device, at most
    :data:`PRODUCTS_BYTES` (or one block's): more rows are copied back when
    it is full.
    """

    def __init__(self, n_segments: int, n_slots: int, n_rows: int, max_lag: int, device: torch.device):
        per_row = 8 * n_segments * n_slots
        cap = max(BLOCK_ROWS, PRODUCTS_BYTES // per_row // BLOCK_ROWS * BLOCK_ROWS)
        self.products = torch.zeros((n_segments, min(cap, n_rows), n_slots), dtype=torch.float64, device=device)
        self.max_lag = max_lag
        self.used = 0
        # (first row in products, the new rows among the rows multiplied, the delta row of each of those)
        self.pending: list[tuple[int, list[int], np.ndarray]] = []
        self.parts: list[np.ndarray] = []

    def add(self, ring: HostRing | StagedRing, rows: range, plan: BandPlan) -> None:
        if self.used + len(rows) > self.products.shape[1]:
            self._flush()
        slots, window = ring.slots(rows), ring.window(rows)
        held = list(range(ring.n_slots)) if window is None else [q for a, b in window for q in range(a, b)]
        out = self.products[:, self.used : self.used + len(rows), : len(held)]
        band_products(ring.rows, slots, plan, out, window)
        self.pending.append((self.used, [held.index(q) for q in slots], ring.logical[held]))
        self.used += len(rows)

    def _flush(self) -> None:
        host = self.products[:, : self.used].cpu().numpy()  # waits for the kernels
        for first, new, logical in self.pending:
            part = host[:, first : first + len(new), : len(logical)]
            self.parts.append(band_entries(part, new, logical, self.max_lag))
        self.products[:, : self.used].zero_()
        self.used, self.pending = 0, []

    def band(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self.parts, axis=1)


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
    chunk_size: int,
    max_lag: int,
    memory_limit: int | None = None,
    device: str | torch.device = "cpu",
    remote: bool = False,
    ring_cols: int | None = None,
) -> tuple[int, int]:
    """Tasks run at once by the local scheduler, and torch threads per task.

    On cpu a task holds ``L + 2 BLOCK_ROWS`` float32 rows of one chunk (its
    ring reads a block ahead; ``L + BLOCK_ROWS`` from object storage) plus a
    float64 column block of ``L + BLOCK_ROWS`` of them, and the tasks share *memory_limit* (default
    :data:`DEFAULT_MEMORY_LIMIT`). On cuda a task's host memory is its two
    pinned staging blocks of ``BLOCK_ROWS`` rows, shared out of
    *memory_limit* (default: the host's available memory over
    :data:`HOST_SHARE`), and its device memory (the float64 ring, the landing
    block, gathered columns, held products) out of half the free device
    memory. Reading from object storage adds the block of rows read ahead
    and Zarr's decoded copy of it (*remote*). *ring_cols* is the widest ring
    row (:func:`~.kernel.ring_width`; default *chunk_size*). At most one
    task per core.
    """
    dev = torch.device(device)
    width = ring_cols or chunk_size
    block = BLOCK_ROWS * chunk_size * 4
    ahead = 2 * block if remote else 0
    cores = os.cpu_count() or 1
    if dev.type == "cuda":
        limit = memory_limit if memory_limit is not None else _available_memory() // HOST_SHARE
        free, _ = torch.cuda.mem_get_info(dev)
        spread = BLOCK_ROWS * (width - chunk_size) * 8  # narrow pieces of a landing block, gathered
        on_device = staged_slots(max_lag, BLOCK_ROWS) * width * 8 + block + spread + PRODUCTS_BYTES
        workers = min(limit // (2 * block + ahead), free // 2 // on_device)
    else:
        limit = memory_limit if memory_limit is not None else DEFAULT_MEMORY_LIMIT
        slots = max_lag + BLOCK_ROWS * (1 if remote else 2)  # a local store's ring reads a block ahead
        workers = limit // (slots * width * 4 + 2 * (max_lag + BLOCK_ROWS) * COL_BLOCK * 8 + ahead)
    workers = max(1, min(cores, workers))
    return workers, 1 if workers > 1 else cores


def _available_memory() -> int:
    """Bytes of host memory available to new allocations (``MemAvailable``; the physical memory where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return HOST_SHARE * DEFAULT_MEMORY_LIMIT


def _compute_rows(
    store: Store,
    max_lag: int,
    r0: int,
    r1: int,
    device: str | torch.device,
    scheduler,
    memory_limit: int | None,
    progress: bool,
) -> np.ndarray:
    chunks = _chunk_segments(store)
    if scheduler is None:  # the tasks run in this process: the device is resolved here once, to size them
        device = str(resolve_device(device))
        compact = torch.device(device).type != "cpu"  # the layout of a StagedRing's rows
        width = max(ring_width([(a - start, b - start) for _, a, b in segs], stop - start, compact)
                    for start, stop, segs in chunks)
        workers, threads = local_workers(store.chunk_size, max_lag, memory_limit, device, store.is_remote, width)
    else:  # each task resolves the device on its worker, whose hardware may differ from this client's
        device = check_device(device)
        # the cluster's workers size themselves; only the number of row tiles depends on this
        workers, threads = local_workers(store.chunk_size, max_lag, memory_limit)[0], 1
    tiles = _row_tiles(r0, r1, len(chunks), workers, max_lag)
    path = store.path if store.is_remote else os.path.abspath(store.path)  # workers may run elsewhere
    # names the tasks: the same generation of rows, columns and chunking give the same band
    crcs = store.crcs[:r1]
    c, tensors = store.chunk_size, store.attrs["tensors"]
    tasks = [
        [
            dask.delayed(_band_task)(
                path, store.storage_options, a, b, segs, t0, t1, max_lag, device, threads, crcs[:t1, a // c].copy(),
                store.commit_record,
                dask_key_name=f"_band_task-{tokenize(store.chain[t1 - 1], tensors, c, a, t0, t1, max_lag)}",
            )
            for a, b, segs in chunks
        ]
        for t0, t1 in tiles
    ]
    # each tile's rows summed over the chunks in one tree of their own, the same whatever the tiles (which
    # depend on L, memory_limit and the cores): a band built with other tiles, or extended, is bit-identical
    # where its tasks ran on as many torch threads each (1 wherever two tasks fit in memory; a lone task's
    # multi-threaded GEMM may round its sums otherwise, measured 8e-15 relative), whatever L: the kernel's
    # products take the ring's rows first, whose number does not change a product's bits (kernel.GROUP)
    total = _tree_sum([_tree_sum(tile) for tile in tasks])
    n_tasks = len(tiles) * len(chunks)
    bar = None
    if progress:
        bar = progress_bar(total=n_tasks, desc="band", unit="task", leave=False)
    try:
        if scheduler is None:
            callbacks = [_TaskProgress(bar)] if bar is not None else []
            with dask.config.set(callbacks=callbacks):
                (parts,) = dask.compute(total, scheduler="threads", num_workers=workers)
        else:
            (parts,) = dask.compute(total, scheduler=scheduler)
            if bar is not None:
                bar.update(n_tasks)
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
    memory_limit: int | None = None,
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
    device : "auto", "cpu", "cuda", "cuda:N" or a torch device
        Resolved by each task where it runs (:mod:`~spectral_analyzer.devices`):
        with a cluster, "auto" is cuda on the workers that see a GPU.
    scheduler : None, a dask.distributed address or Client
        None runs Dask's local threaded scheduler.
    memory_limit : int, optional
        Host bytes that running tasks may hold at once (local scheduler):
        default 1.25 GiB of delta rows on cpu (two tasks of L = 16 with
        the default chunks), and on cuda a quarter of the
        host's available memory for pinned staging buffers.
    progress : bool

    Returns
    -------
    band : numpy.ndarray, float64, shape (n_tensors, n_deltas, L + 1)
        NaN where ``i - l < 0``.
    max_lag : int
        The L of the returned band: the one asked for (a cached band with a
        larger L is sliced), but at most the larger of 16 and the run's
        deltas less one, since lags past the first delta hold no product.

    Cost: one read of the deltas not yet in the cache (plus L halo rows per
    task), ``~2 (L + 8)`` flops per element read.
    """
    if max_lag < 1:
        raise WindowError(f"max_lag must be >= 1, got {max_lag}")
    n = store.n_deltas
    if n == 0:
        raise StoreError(f"{store.path}: holds no deltas yet (ingest at least two checkpoints)")
    # lags past the last delta hold no product (all NaN): a lag asked far beyond them (1000 on a run of 39
    # deltas) would size every task's ring by it, and the band returned
    max_lag = min(max_lag, max(n - 1, DEFAULT_MAX_LAG))
    found = store.band_cache.lookup(max_lag)
    cached, lag = found if found is not None else (None, max_lag)
    # From the start of the block holding the first row not cached: every row is then computed in
    # the same blocks of BLOCK_ROWS (and ring slots) as in a build from scratch, so the band is bit-identical to it
    # (on as many torch threads per task: see _compute_rows).
    start = 0 if cached is None else min(cached.shape[1], n)
    if start < n:
        start = start // BLOCK_ROWS * BLOCK_ROWS
        cached = None if cached is None else cached[:, :start]
    if start < n:
        check_device(device)
        client, owned = _client(scheduler)
        try:
            rows = _compute_rows(store, lag, start, n, device, client, memory_limit, progress)
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
