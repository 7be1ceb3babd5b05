"""The staged band path: a ring on the device filled through double-buffered host staging.

On cpu the staged ring's stream and event operations do nothing, so these
tests run its bookkeeping everywhere; the ones marked ``cuda`` compare the
device to the cpu where a GPU is visible.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
import torch
from conftest import write_run
from test_band import ODD

import spectral_analyzer as sa
from spectral_analyzer.gram import build
from spectral_analyzer.gram.kernel import band_rows
from spectral_analyzer.gram.ring import HostRing, StagedRing
from spectral_analyzer.store import Store

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a cuda device")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """39 deltas of the odd-sized tensors, in chunks that cut tensors (333) and in one chunk (2000)."""
    root = tmp_path_factory.mktemp("gpu_path")
    write_run(root / "src", 40, ODD, seed=11)
    return {c: sa.ingest(root / "src", root / f"r{c}.zarr", chunk_size=c) for c in (333, 2000)}


@pytest.fixture(scope="module")
def x(runs) -> np.ndarray:
    """The deltas of every store in *runs*, float64."""
    return runs[333].deltas.values.astype(np.float64)


def ring_band(store: Store, chunk, r0: int, r1: int, max_lag: int, device: torch.device | None):
    """Band rows r0..r1-1 of one chunk's pieces: a HostRing when *device* is None, else a StagedRing there."""
    start, stop, pieces = chunk
    segments = [(a - start, b - start) for _, a, b in pieces]
    if device is None:
        ring = HostRing(store, start, stop, max_lag, build.BLOCK_ROWS, segments=segments)
    else:
        ring = StagedRing(store, start, stop, max_lag, build.BLOCK_ROWS, device, segments=segments)
    return build._ring_band(ring, r0, r1, max_lag)


def reference(x: np.ndarray, chunk, r0: int, r1: int, max_lag: int) -> np.ndarray:
    """Plain float64 ``<x_i[piece], x_{i-l}[piece]>`` for the chunk's pieces, rows r0..r1-1."""
    out = np.full((len(chunk[2]), x.shape[0], max_lag + 1), np.nan)
    for lag in range(max_lag + 1):
        products = x[lag:] * x[: x.shape[0] - lag]
        for s, (_, a, b) in enumerate(chunk[2]):
            out[s, lag:, lag] = products[:, a:b].sum(axis=1)
    return out[:, r0:r1]


def close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-12) -> None:
    """Equal to *rtol* relative to the largest entry, with NaN in the same places."""
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.nanmax(np.abs(want)))


@pytest.mark.parametrize("chunk_size", [333, 2000])
@pytest.mark.parametrize("max_lag", [3, 8, 13])
@pytest.mark.parametrize("rows", [(0, 39), (17, 30), (38, 39)])
def test_staged_ring_on_cpu_equals_host_ring(runs, x, chunk_size, max_lag, rows):
    """Blocks wrap round the ring when L is not a multiple of 8; the staged ring, which lands a block ahead,
    holds 8 rows more, so its products have another shape and may round differently (within 1e-12)."""
    run = runs[chunk_size]
    store = Store.open(run.path)
    r0, r1 = rows
    for chunk in build._chunk_segments(store):
        host = ring_band(store, chunk, r0, r1, max_lag, None)
        staged = ring_band(store, chunk, r0, r1, max_lag, CPU)
        close(staged, host)
        close(staged, reference(x, chunk, r0, r1, max_lag))


def build_rows(store: Store, max_lag: int, device: torch.device) -> np.ndarray:
    """Every band row of *store*, computed (the cached band is neither read nor written)."""
    return build._compute_rows(store, max_lag, 0, store.n_deltas, device, None, build.DEFAULT_MEMORY_LIMIT, False)


def test_build_through_staged_ring_on_cpu(runs, monkeypatch):
    """The whole build (row tiles with halos, several chunks, the dask tree sum) with every task staging its rows."""
    store = Store.open(runs[333].path)
    monkeypatch.setattr(build, "_row_tiles", lambda r0, r1, *a: [(r0, 11), (11, 30), (30, r1)])
    want = build_rows(store, 5, CPU)

    def staged(store, start, stop, max_lag, block_rows, segments):
        return StagedRing(store, start, stop, max_lag, block_rows, CPU, segments=segments)

    monkeypatch.setattr(build, "HostRing", staged)
    close(build_rows(store, 5, CPU), want)


def test_staged_ring_on_cpu_requests_no_pinned_memory(runs):
    """Pinned buffers only stage rows for a cuda ring, even where cuda is available."""
    store = Store.open(runs[333].path)
    ring = StagedRing(store, 0, 333, 4, build.BLOCK_ROWS, CPU, segments=[(0, 333)])
    assert not any(buf.is_pinned() for buf in ring._staging)
    assert ring.rows.device == CPU and ring.rows.dtype == torch.float64


class _Event:
    log: list | None = None  # the timeline of the test that records one

    def __init__(self):
        self.version = 0  # times recorded
        self.synced = 0  # the version the host has waited for

    def record(self, stream=None):
        self.version += 1

    def synchronize(self):
        self.synced = self.version
        if _Event.log is not None:
            _Event.log.append(("wait", self))


class _Stream:
    made = 0

    def __init__(self):
        _Stream.made += 1
        self.waited: dict[_Event, int] = {}

    def wait_event(self, event):
        self.waited[event] = event.version


class _Device:
    """Streams and events that run nothing and remember what waited for what."""

    Event = _Event
    Stream = _Stream

    def __init__(self):
        self.current = None

    @contextlib.contextmanager
    def stream(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before


def test_staged_ring_orders_reads_copies_and_kernels(runs, x, monkeypatch):
    """What makes the overlap safe on a GPU, and what makes it an overlap, at every step of a task with L = 5:

    a staging buffer is refilled only after the host waited for its last copy;
    the kernel of block k runs on the compute stream after that stream waited
    for block k's copy, while block k + 1's copy is already queued (it is not
    waited for); a copy into the ring is issued after the copy stream waited
    for the last kernel issued, and never overwrites a row a later kernel
    reads; the host reads block k + 2 from the store after launching kernel k
    and before launching kernel k + 1, without waiting for any kernel first;
    the products come back to the host once, after the last kernel.
    """
    fake = _Device()
    monkeypatch.setattr(torch, "get_device_module", lambda device=None: fake)
    log: list = []
    monkeypatch.setattr(_Event, "log", log)
    run = runs[333]
    store = Store.open(run.path)
    start, stop, pieces = build._chunk_segments(store)[1]
    max_lag, r0, r1 = 5, 12, 39
    ring = StagedRing(store, start, stop, max_lag, build.BLOCK_ROWS, CPU,
                      segments=[(a - start, b - start) for _, a, b in pieces])
    copies: list[tuple[_Event, int]] = []  # (event, version) recorded by each block's copy, in block order
    calls = {"reads": 0, "kernels": 0}

    real_read = Store.read_delta_chunk

    def read(self, row, a, out):
        for buf, event in zip(ring._host, ring._copied):
            if np.shares_memory(out, buf):
                assert event.synced == event.version, "staging buffer refilled before its copy finished"
        calls["reads"] += 1
        log.append(("read", row))
        return real_read(self, row, a, out)

    real_kernel = build.band_products

    def kernel(rows, new, *args, **kwargs):
        block = 1 + calls["kernels"]  # block 0 is the halo
        assert fake.current is ring._compute_stream
        event, version = copies[block]
        assert ring._compute_stream.waited.get(event, 0) >= version, "kernel ran before its block's copy landed"
        if block + 1 < n_blocks:
            assert len(copies) == block + 2, "the next block's copy is not queued while this block computes"
            after, after_version = copies[block + 1]
            assert ring._compute_stream.waited.get(after, 0) < after_version, "the kernel waits for the next copy"
        first = r0 + (block - 1) * build.BLOCK_ROWS
        logical = ring.logical
        held = set(logical[logical >= 0].tolist())
        assert set(range(max(0, first - max_lag), first + len(new))) <= held, "a row it needs was overwritten"
        calls["kernels"] += 1
        log.append(("kernel", block))
        return real_kernel(rows, new, *args, **kwargs)

    real_record = _Event.record

    def record(event, stream=None):
        if any(event is e for e in ring._copied):
            assert stream is ring._copy_stream
            computed = ring._computed
            assert computed.version == 1 + calls["kernels"], "the kernel's read of the ring was not recorded"
            assert ring._copy_stream.waited.get(computed) == computed.version, "copy issued before the kernel's read"
            copies.append((event, event.version + 1))
        real_record(event, stream)

    real_flush = build._HeldProducts._flush

    def flush(self):
        log.append(("flush",))
        return real_flush(self)

    monkeypatch.setattr(Store, "read_delta_chunk", read)
    monkeypatch.setattr(build, "band_products", kernel)
    monkeypatch.setattr(_Event, "record", record)
    monkeypatch.setattr(build._HeldProducts, "_flush", flush)
    blocks = [range(r0 - max_lag, r0), *(range(k, min(r1, k + 8)) for k in range(r0, r1, 8))]
    n_blocks = len(blocks)
    got = build._ring_band(ring, r0, r1, max_lag)
    assert calls == {"reads": r1 - (r0 - max_lag), "kernels": n_blocks - 1}
    assert len(copies) == n_blocks
    close(got, reference(x, (start, stop, pieces), r0, r1, max_lag))

    where = {entry: i for i, entry in enumerate(log) if entry[0] in ("kernel", "read")}
    for k in range(1, n_blocks - 2):  # a read of block k + 2 in flight while kernel k runs
        launched = where[("kernel", k)]
        reads = [where[("read", row)] for row in blocks[k + 2]]
        assert launched < min(reads) and max(reads) < where[("kernel", k + 1)], f"block {k + 2} not read during kernel {k}"
        between = log[launched : min(reads)]
        assert not any(e[0] == "wait" and e[1] is ring._computed for e in between), "the host waited for a kernel"
        assert ("flush",) not in between
    assert [e for e in log if e[0] == "flush"] == [("flush",)] and log.index(("flush",)) > where[("kernel", n_blocks - 1)]


def test_streams_are_made_once_per_worker_thread(runs, monkeypatch):
    """Two tasks in one thread use the same two streams; a task in another thread makes its own two."""
    fake = _Device()
    monkeypatch.setattr(torch, "get_device_module", lambda device=None: fake)
    store = Store.open(runs[333].path)
    made = _Stream.made
    used = []

    def task():
        ring = StagedRing(store, 0, 333, 3, build.BLOCK_ROWS, CPU, segments=[(0, 333)])
        build._ring_band(ring, 0, store.n_deltas, 3)
        used.append((ring._copy_stream, ring._compute_stream))

    task()
    task()
    thread = threading.Thread(target=task)
    thread.start()
    thread.join()
    assert used[0][0] is used[1][0] and used[0][1] is used[1][1] and used[0][0] is not used[0][1]
    assert used[2][0] is not used[0][0] and used[2][1] is not used[0][1]
    assert _Stream.made - made == 4


def _profiled_operations(fn) -> int:
    """Top-level torch operators of one call that write memory: each is a kernel launch on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    views = {"aten::slice", "aten::select", "aten::alias", "aten::view", "aten::transpose", "aten::t",
             "aten::numpy_T", "aten::permute", "aten::as_strided", "aten::empty", "aten::to", "aten::_to_copy"}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")
               and e.name not in views)


@pytest.mark.parametrize("layout", ["compact", "in place"])
def test_operations_per_block_do_not_grow_with_the_tensors_in_a_chunk(layout):
    """A chunk of 65,536 columns cut into 1 to 4,096 tensors (equal and random widths): the operations of one
    block stay a handful on the device's compact float64 ring, and on the cpu's float32 ring a tensor costs
    an operation of its own only when it is at least IN_PLACE_WIDTH wide. The products equal plain float64."""
    from spectral_analyzer.gram.kernel import IN_PLACE_WIDTH, band_entries, band_plan, band_products
    from spectral_analyzer.gram.ring import staged_slots

    n_cols, max_lag = 1 << 16, 16
    compact = layout == "compact"
    n_slots = staged_slots(max_lag, 8) if compact else max_lag + 8
    gen = torch.Generator().manual_seed(9)
    data = torch.randn(n_slots, n_cols, generator=gen)
    rng = np.random.default_rng(9)
    new = list(range(n_slots - 8, n_slots))
    counts = {}
    for n in (1, 64, 512, 4096):
        equal = np.linspace(0, n_cols, n + 1).astype(int)
        cuts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, n_cols), n - 1, replace=False)), [n_cols]])
        for kind, edges in (("equal", equal), ("random", cuts)):
            segments = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
            plan = band_plan(segments, n_cols, compact=compact)
            ring = torch.zeros((n_slots, plan.width), dtype=torch.float64 if compact else torch.float32)
            if compact:
                plan.land(ring, torch.cat([data, torch.zeros(n_slots, 1)], dim=1))
            else:
                ring[:, :n_cols] = data
                plan.spread(ring.numpy())
            out = torch.zeros((n, 8, n_slots), dtype=torch.float64)
            counts[kind, n] = _profiled_operations(lambda: band_products(ring, new, plan, out))
            widths = np.diff(edges)
            if compact:
                assert counts[kind, n] <= 3 + 2 * 13, (kind, n, counts[kind, n])  # pieces, and two per group
            else:  # three per 32,768 columns of a wide tensor (copy, product, add), three per group of small ones
                wide = sum(-(-int(w) // 32768) for w in widths if w >= IN_PLACE_WIDTH)
                assert counts[kind, n] <= 3 * wide + 3 * 13, (kind, n, counts[kind, n])
            got = band_entries(out.numpy(), new, np.arange(n_slots), max_lag)
            x = data.double().numpy()
            rows = np.array(new)
            for s in range(0, n, max(1, n // 16)):
                a, b = segments[s]
                want = np.stack([(x[rows, a:b] * x[rows - lag, a:b]).sum(axis=1) for lag in range(max_lag + 1)], 1)
                np.testing.assert_allclose(got[s], want, rtol=1e-13, atol=1e-13 * np.abs(want).max())
    if compact:
        assert max(counts.values()) <= 3 + 2 * 13 and counts["equal", 4096] <= counts["equal", 1] + 2
    else:
        assert counts["equal", 4096] <= counts["equal", 1] + 3 and counts["random", 4096] < 4096 // 8


@cuda
def test_kernel_on_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(3)
    ring = torch.randn(21, 70_001, generator=gen)
    logical = np.array([*range(29, 34), *range(13, 29)])  # rows 29..33 wrapped round to the front
    segs = [(0, 5), (5, 40_000), (40_000, 70_001)]
    want = band_rows(ring, [0, 1, 2, 3, 4], logical, segs, 13)
    got = band_rows(ring.cuda(), [0, 1, 2, 3, 4], logical, segs, 13)
    close(got, want)
    got = band_rows(ring.cuda(), [19, 20, 0, 1], logical, segs, 13, col_block=4096)  # a block that wraps
    close(got, band_rows(ring, [19, 20, 0, 1], logical, segs, 13))
    close(band_rows(ring.cuda().double(), [0, 1, 2, 3, 4], logical, segs, 13), want)  # the compact layout


@cuda
@pytest.mark.parametrize("max_lag", [3, 8, 13])
def test_staged_ring_on_cuda_equals_cpu(runs, max_lag):
    run = runs[333]
    store = Store.open(run.path)
    cuda_dev = torch.device("cuda")
    for r0, r1 in [(0, 39), (17, 30)]:
        for chunk in build._chunk_segments(store):
            want = ring_band(store, chunk, r0, r1, max_lag, None)
            close(ring_band(store, chunk, r0, r1, max_lag, cuda_dev), want)


@cuda
def test_staged_ring_on_cuda_pins_its_staging(runs):
    store = Store.open(runs[333].path)
    ring = StagedRing(store, 0, 333, 4, build.BLOCK_ROWS, torch.device("cuda"), segments=[(0, 100), (100, 333)])
    assert all(buf.is_pinned() for buf in ring._staging)
    assert ring.rows.is_cuda and ring.rows.dtype == torch.float64 and ring.plan.compact


@cuda
def test_build_on_cuda_equals_cpu(runs):
    for run in runs.values():
        store = Store.open(run.path)
        close(build_rows(store, 6, torch.device("cuda")), build_rows(store, 6, CPU))
    workers, _ = build.local_workers(store.chunk_size, 6, None, "cuda")
    assert workers >= 1


def test_cuda_tasks_are_sized_from_host_memory_cores_and_device_memory(monkeypatch):
    """A 16-core, 128 GB host with an H200 runs a task per core (not 4 from a 1 GiB limit); a 16 GB card
    runs as many as half its free memory holds; an explicit memory_limit still caps them; cpu is unchanged."""
    GB = 10**9
    monkeypatch.setattr(build.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(build, "_available_memory", lambda: 120 * GB)
    chunk, lag = 4 * 2**20, 16

    def card(free):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, free))

    card(140 * GB)
    assert build.local_workers(chunk, lag, None, "cuda:0") == (16, 1)
    card(15 * GB)
    ring = build.staged_slots(lag, build.BLOCK_ROWS) * chunk * 8 + build.BLOCK_ROWS * chunk * 4 + build.PRODUCTS_BYTES
    assert build.local_workers(chunk, lag, None, "cuda:0") == (15 * GB // 2 // ring, 1) == (5, 1)
    card(140 * GB)
    assert build.local_workers(chunk, lag, 1 << 30, "cuda:0") == (4, 1)  # 256 MiB of pinned buffers a task
    assert build.local_workers(chunk, lag, None, "cpu") == (2, 1)  # 1 GiB of rings
    assert build.local_workers(chunk, lag, None, "cpu", ring_cols=2 * chunk) == (1, 16)
