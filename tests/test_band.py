from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FIXTURES, write_run

import spectral_analyzer as sa
from spectral_analyzer.gram import build
from spectral_analyzer.gram.kernel import band_rows
from spectral_analyzer.store import Store

ODD = {"a.w": (37, 29), "b": (101,), "layers.2.c": (13, 7, 3), "layers.10.d": (211,), "z": (5,)}


def dense_band(x: np.ndarray, segments, max_lag: int) -> np.ndarray:
    """(n_segments, n, L + 1) by plain float64 dot products."""
    n = x.shape[0]
    out = np.full((len(segments), n, max_lag + 1), np.nan)
    for s, (a, b) in enumerate(segments):
        for i in range(n):
            for l in range(min(i, max_lag) + 1):
                out[s, i, l] = x[i, a:b] @ x[i - l, a:b]
    return out


def test_kernel_matches_dense():
    """Rows 0..8 of x held in a ring of 9 slots in shuffled physical order; rows 4..8 are new."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1000, generator=gen)
    perm = np.array([3, 7, 0, 8, 1, 5, 2, 6, 4])  # physical slot -> logical row
    ring = x[perm].clone()
    logical = perm.copy()
    new = [int(np.flatnonzero(perm == i)[0]) for i in range(4, 9)]
    segs = [(0, 7), (7, 700), (700, 1000)]
    got = band_rows(ring, new, logical, segs, 4, col_block=64)
    want = dense_band(x.double().numpy(), segs, 4)[:, 4:]
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    logical[perm == 0] = -1  # an empty slot gives NaN
    assert np.isnan(band_rows(ring, new, logical, segs, 4)[:, 0, 4]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_window_takes_products_with_its_runs_only(dtype):
    """A window of two runs that wraps around the ring: products with its rows, in their order, and no others."""
    from spectral_analyzer.gram.kernel import band_plan, band_products

    gen = torch.Generator().manual_seed(1)
    ring = torch.randn(12, 3000, generator=gen).to(dtype)
    segs = [(0, 5), (5, 2600), (2600, 3000)]
    plan = band_plan(segs, 3000)
    if plan.width > 3000:
        laid = torch.zeros((12, plan.width), dtype=dtype)
        laid[:, :3000] = ring
        plan.spread(laid.numpy())
        ring = laid
    window = [(9, 12), (0, 3)]  # slots 9, 10, 11, 0, 1, 2
    new = [1, 2]
    out = torch.zeros((3, 2, 6), dtype=torch.float64)
    band_products(ring, new, plan, out, window)
    x = ring[:, :3000].double()[[9, 10, 11, 0, 1, 2]]
    want = torch.stack([x[[4, 5], a:b] @ x[:, a:b].T for a, b in segs])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not all in the window"):
        band_products(ring, [5], plan, out, window)


@pytest.mark.parametrize("chunk", [50, 333, 10_000])
def test_band_matches_dense_per_tensor(tmp_path, chunk):
    write_run(tmp_path / "src", 40, ODD, seed=2)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=chunk)
    band = run.band(max_lag=6)
    x = run.deltas.values.astype(np.float64)
    t = run.tensors
    segs = [(int(o), int(o + s)) for o, s in zip(t["offset"].values, t["size"].values)]
    want = dense_band(x, segs, 6)
    assert band.dims == ("tensor", "step", "lag")
    np.testing.assert_allclose(band.values, want, rtol=1e-12, atol=1e-12 * np.nanmax(np.abs(want)))
    assert np.array_equal(np.isnan(band.values), np.isnan(want))


def test_row_tiles_with_halo(tmp_path):
    """Few chunks and many rows: rows are split into tiles that re-read an L-row halo."""
    write_run(tmp_path / "src", 90, {"w": (300,)}, seed=4)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr")
    tiles = build._row_tiles(0, 89, n_chunks=1, workers=2, max_lag=5)
    assert len(tiles) > 1
    band = run.band(max_lag=5).values[0]
    x = run.deltas.values.astype(np.float64)
    np.testing.assert_allclose(band, dense_band(x, [(0, 300)], 5)[0], rtol=1e-12)


@pytest.mark.parametrize("r0, r1, n_chunks, workers, max_lag", [
    (0, 96, 1, 2, 16), (0, 160, 3, 2, 16), (40, 200, 1, 2, 16), (0, 1000, 3, 16, 16), (0, 500, 1, 8, 4)])
def test_row_tiles_are_balanced_and_block_aligned(r0, r1, n_chunks, workers, max_lag):
    tiles = build._row_tiles(r0, r1, n_chunks, workers, max_lag)
    assert tiles[0][0] == r0 and tiles[-1][1] == r1 and all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
    assert all(a % build.BLOCK_ROWS == 0 for a, _ in tiles[1:])
    assert (n_chunks * len(tiles)) % workers == 0  # every worker gets the same number of tasks
    cost = [b - a + min(max_lag, a) for a, b in tiles]  # rows + the halo each tile re-reads
    assert max(cost) - min(cost) <= build.BLOCK_ROWS


def test_second_call_reads_no_delta(tmp_path, monkeypatch):
    run = sa.ingest(FIXTURES / "planted", tmp_path / "r.zarr", chunk_size=4096)
    first = run.spectra(window=10)
    run.band(max_lag=16)

    def no_reads(*args, **kwargs):
        raise AssertionError("a delta was read")

    monkeypatch.setattr(Store, "read_delta_row", no_reads)
    monkeypatch.setattr(Store, "read_delta_chunk", no_reads)
    run = sa.open_run(tmp_path / "r.zarr")
    assert run.spectra(window=10).identical(first)
    for window in (2, 5, 16):  # any W <= L, from the cached band
        run.spectra(window=window, cache=False)
    run.spectra(window=7, params="blocks.*", group_by="layer")


def test_append_computes_only_new_band_rows(tmp_path, monkeypatch):
    src = tmp_path / "src"
    paths = write_run(src, 30, ODD, seed=8)
    for p in paths[20:]:
        p.rename(tmp_path / p.name)
    run = sa.ingest(src, tmp_path / "r.zarr", chunk_size=500)
    run.band(max_lag=4)
    for p in paths[20:]:
        (tmp_path / p.name).rename(p)
    run = sa.ingest(src, tmp_path / "r.zarr")
    read_rows, new_rows = [], []
    real_read, real_kernel = Store.read_delta_chunk, build.band_products
    monkeypatch.setattr(Store, "read_delta_chunk", lambda self, r, a, out, **kw: read_rows.append(r) or real_read(self, r, a, out, **kw))
    monkeypatch.setattr(build, "band_products", lambda ring, new, *a, **k: new_rows.append(len(new)) or real_kernel(ring, new, *a, **k))
    band = run.band(max_lag=4).values
    n_chunks = -(-run.n_params // 500)
    # rows 19..28 are new; they are computed from the start of row 19's block of 8 (row 16), in
    # the same blocks as a build from scratch, so the band is bit-identical to one; 12..15 the halo
    assert sum(new_rows) == 13 * n_chunks
    assert min(read_rows) == 16 - 4 and max(read_rows) == 28
    fresh = sa.ingest(src, tmp_path / "fresh.zarr", chunk_size=500).band(max_lag=4).values
    np.testing.assert_array_equal(band, fresh)


def test_larger_lag_rebuilds(tmp_path, monkeypatch):
    run = sa.ingest(FIXTURES / "layouts" / "hf_trainer", tmp_path / "r.zarr")
    assert run.band(max_lag=1).sizes["lag"] == 2
    full = run.band(max_lag=3)
    assert full.sizes["lag"] == 4

    def no_reads(*args, **kwargs):
        raise AssertionError("the cached L=3 band should serve L=2")

    monkeypatch.setattr(Store, "read_delta_chunk", no_reads)
    sliced = run.band(max_lag=2)
    assert sliced.sizes["lag"] == 3  # L + 1 lags, as asked, from the cached L=3 band
    np.testing.assert_array_equal(sliced.values, full.values[..., :3])


def test_frozen_tensor_band_is_zero(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    frozen = torch.randn(64, generator=gen)
    for i in range(6):
        save_file({"frozen": frozen, "live": torch.randn(50, generator=gen)}, str(src / f"s_{i}.safetensors"))
    run = sa.ingest(src, tmp_path / "r.zarr", chunk_size=32)
    band = run.band(max_lag=3).sel(tensor="frozen").values
    assert np.all(band[~np.isnan(band)] == 0)


@pytest.mark.parametrize("compact", [False, True])
def test_plan_layout_holds_every_column_once_and_zero_padding(compact):
    """Every chunk column lands where the plan says, padding stays zero, and ring_width is the plan's width."""
    from spectral_analyzer.gram.kernel import band_plan, ring_width

    rng = np.random.default_rng(4)
    n_cols = 200_000
    cuts = np.concatenate([[0, 50_001], np.sort(rng.choice(np.arange(50_002, n_cols), 300, replace=False)), [n_cols]])
    segments = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    plan = band_plan(segments, n_cols, compact=compact, col_block=4096)
    assert ring_width(segments, n_cols, compact) == band_plan(segments, n_cols, compact=compact).width
    row = np.arange(1, n_cols + 1, dtype=np.float64)  # column j holds j + 1: zero only in padding
    ring = torch.zeros((1, plan.width), dtype=torch.float64)
    if compact:
        plan.land(ring, torch.from_numpy(np.append(row, 0.0))[None])
    else:
        ring[0, :n_cols] = torch.from_numpy(row)
        plan.spread(ring.numpy())
    got = ring[0].numpy()
    covered = np.zeros(plan.width, dtype=bool)
    seen: dict[int, int] = {}
    for s, a, w in plan.pieces:
        j = seen[s] = seen.get(s, -1) + 1  # the j-th piece of tensor s
        first = segments[s][0] + j * 4096 if compact else a
        np.testing.assert_array_equal(got[a : a + w] - 1, np.arange(first, first + w))
        covered[a : a + w] = True
    assert seen[0] == 50_001 // 4096 - 1  # a tensor of 50,001 columns: 12 whole pieces, its rest grouped
    for group in plan.groups:
        area = got[group.start : group.start + len(group.segments) * group.width].reshape(-1, group.width)
        for seg, cols in zip(group.segments.tolist(), area):
            a, b = segments[seg]
            tail = cols[cols > 0] - 1
            assert tail.size <= group.width and tail[-1] == b - 1 and (cols[tail.size :] == 0).all()
        covered[group.start : group.start + area.size] = True
    assert covered[n_cols if not compact else 0 :].all()


def _ring_store(tmp_path, n=37, chunk=2048):
    """A store whose chunks are whole 4 KiB pages (read past the page cache) plus a padded last chunk."""
    write_run(tmp_path / "src", n, {"a.w": (64, 64), "b": (1000,), "c": (3000,), "z": (7,)}, seed=11)
    return sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=chunk)


@pytest.mark.parametrize("r0", [0, 16])
def test_ring_reading_ahead_overlaps_and_never_reads_into_the_kernels_rows(tmp_path, monkeypatch, r0):
    """The read of block k + 1 is handed to the reader thread before block k is computed, into slots the
    kernel does not read; the band equals a ring that reads each block when it lands, bit for bit, and a
    float64 dense one. (Events of the reader thread are not ordered against the kernel's: the test orders
    the hand-over and the read's end, both seen from the task's thread.)"""
    from spectral_analyzer.gram.ring import HostRing

    run = _ring_store(tmp_path)
    store = Store.open(str(tmp_path / "r.zarr"))
    assert store.reads_chunk_files
    L, n = 6, store.n_deltas
    segs = [(0, 2048)]
    events = []
    real_read, real_stage, real_kernel = HostRing._read, HostRing.stage, build.band_products

    def read(self, rows):
        real_read(self, rows)
        events.append(("read end", rows))

    def stage(self, rows, then):  # on the task's thread: the read handed to the reader (it may start later)
        events.append(("read submitted", rows))
        real_stage(self, rows, then)

    holder = {}

    def kernel(rows, new, plan, out, window=None):
        delta_rows = [int(holder["ring"].logical[q]) for q in new]
        events.append(("kernel", delta_rows, [q for a, b in window for q in range(a, b)]))
        real_kernel(rows, new, plan, out, window)

    monkeypatch.setattr(HostRing, "_read", read)
    monkeypatch.setattr(HostRing, "stage", stage)
    monkeypatch.setattr(build, "band_products", kernel)
    got = {}
    for ahead in (True, False):
        ring = holder["ring"] = HostRing(store, 0, 2048, L, build.BLOCK_ROWS, segments=segs, read_ahead=ahead)
        assert ring.ahead == int(ahead) and ring.n_slots == L + build.BLOCK_ROWS * (2 if ahead else 1)
        events.clear()
        got[ahead] = build._ring_band(ring, r0, n, L)
        kernels = [e for e in events if e[0] == "kernel"]
        assert sum(len(e[1]) for e in kernels) == n - r0
        if ahead:
            for e in kernels:
                i = events.index(e)
                finished = {tuple(x[1]) for x in events[:i] if x[0] == "read end"}
                started = [x[1] for x in events[:i] if x[0] == "read submitted"]
                new_rows = e[1]
                assert tuple(range(new_rows[0], new_rows[-1] + 1)) in finished  # ready() waited for it
                if new_rows[-1] + 1 < n:  # the next block is being read meanwhile, outside the kernel's slots
                    nxt = next(r for r in started if r.start == new_rows[-1] + 1)
                    assert not set(ring.slots(nxt)) & set(e[2])
    np.testing.assert_array_equal(got[True], got[False])
    x = run.deltas.values.astype(np.float64)
    want = dense_band(x, segs, L)[:, r0:]
    np.testing.assert_allclose(got[True], want, rtol=1e-12, atol=1e-12 * np.nanmax(np.abs(want)))
    assert np.array_equal(np.isnan(got[True]), np.isnan(want))


def test_a_read_that_fails_ahead_is_reported_and_ends_the_reader(tmp_path):
    import threading

    _ring_store(tmp_path)
    chunk = tmp_path / "r.zarr" / "deltas" / "c" / "21" / "1"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(sa.StoreError, match=r"chunk 21/1 of deltas .*crc32c"):
        sa.open_run(tmp_path / "r.zarr").band(max_lag=4)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("spectral-analyzer-ring")]


def test_a_band_build_leaves_torch_threads_of_later_threads_as_they_were(tmp_path):
    """The band tasks set torch's thread count in their worker threads and restore it: the count set in a
    thread is also the default of threads started after, which a build must not leave lowered."""
    import threading

    write_run(tmp_path / "src", 12, {"a.w": (40, 30)}, seed=2)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=256)
    before = torch.get_num_threads()

    def in_a_new_thread() -> int:
        seen = []
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
        return seen[0]

    expected = in_a_new_thread()
    run.band(max_lag=3)
    assert torch.get_num_threads() == before and in_a_new_thread() == expected
