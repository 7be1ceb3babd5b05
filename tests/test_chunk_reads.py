"""Chunk reads: the crc32c that releases the GIL, and read-ahead advice that covers whole chunk files."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_analyzer.store import chunks, direct_io
from spectral_analyzer.store.crc import crc32c, releases_gil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_ingest import drop_cache, resident_fraction  # noqa: E402


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=5000), st.integers(0, 5000), st.integers(0, 2**32 - 1))
def test_crc32c_matches_google_crc32c(data, cut, seed):
    buf = np.frombuffer(data, dtype=np.uint8)
    cut = min(cut, buf.size)
    assert crc32c(buf) == google_crc32c.value(data)
    assert crc32c(buf[cut:], crc32c(buf[:cut])) == google_crc32c.value(data)
    assert crc32c(buf, seed & 0xFFFFFFFF) == google_crc32c.extend(seed & 0xFFFFFFFF, data)


def test_crc32c_of_float32_rows_and_strided_views():
    x = np.random.default_rng(0).standard_normal((3, 5000)).astype(np.float32)
    assert crc32c(x) == google_crc32c.value(x.tobytes())
    assert crc32c(x[:, ::2]) == google_crc32c.value(np.ascontiguousarray(x[:, ::2]).tobytes())


@pytest.mark.skipif(sys.platform != "linux", reason="the manylinux wheel layout is the one checked here")
def test_crc32c_releases_the_gil_on_linux():
    assert releases_gil()


def test_prefetch_brings_the_whole_chunk_file_into_the_page_cache(tmp_path):
    """Linux honours one read-ahead window per WILLNEED call: a chunk larger than it must be advised in pieces."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise")
    n = 4 * 1024 * 1024  # 16 MiB of float32: larger than the usual 128 KiB - 8 MiB window
    folder = tmp_path / "c"
    (folder / "0").mkdir(parents=True)
    path = folder / "0" / "0"
    path.write_bytes(np.ones(n, dtype=np.float32).tobytes() + b"\0\0\0\0")
    drop_cache([path])
    before = resident_fraction([path])
    if before is None or before > 0.1:
        pytest.skip(f"this file system keeps the file cached ({before})")
    chunks.DirectChunks(str(folder), n).prefetch(range(1), 0)
    deadline = time.monotonic() + 20
    while (now := resident_fraction([path])) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now == 1.0


def test_prefetch_of_absent_chunks_is_ignored(tmp_path):
    chunks.DirectChunks(str(tmp_path), 16).prefetch(range(3), 0)  # unwritten chunks: the read reports them


def _chunk_file(tmp_path: Path, n: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    """One chunk file as Zarr writes it (values, then their crc32c), under ``tmp_path/c/0/0``."""
    values = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    folder = tmp_path / "c"
    (folder / "0").mkdir(parents=True, exist_ok=True)
    path = folder / "0" / "0"
    path.write_bytes(values.tobytes() + crc32c(values).to_bytes(4, "little"))
    return path, values


N = 1 << 20  # 4 MiB of float32: a whole number of 4 KiB pages


def test_aligned_zeros_start_on_a_page():
    for shape in [(3, 1000), (1,), (7, 1024)]:
        a = direct_io.aligned_zeros(shape)
        assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous
        assert a.ctypes.data % direct_io.ALIGN == 0 and not a.any()


def test_cached_prefix_reads_nothing_and_counts_whole_pages(tmp_path):
    path, _ = _chunk_file(tmp_path, N, seed=5)
    size = path.stat().st_size
    drop_cache([path])
    fd = os.open(path, os.O_RDONLY)
    try:
        first = direct_io.cached_prefix(fd, size)
        if first is None or first > 0:
            pytest.skip(f"this file system keeps the file cached ({first})")
        assert direct_io.cached_prefix(fd, size) == 0  # asking read nothing
        os.pread(fd, 3 * 4096 + 10, 0)
        assert direct_io.cached_prefix(fd, size) >= 4 * 4096  # the cache's own read-ahead may add pages
        os.pread(fd, size, 0)
        assert direct_io.cached_prefix(fd, size) == size
    finally:
        os.close(fd)


def test_uncached_read_goes_past_the_page_cache(tmp_path):
    path, values = _chunk_file(tmp_path, N)
    reader = chunks.DirectChunks(str(tmp_path / "c"), N)
    drop_cache([path])
    before = resident_fraction([path])
    if before is None or before > 0.1:
        pytest.skip(f"this file system keeps the file cached ({before})")
    out = direct_io.aligned_zeros((N,))
    assert reader.read(0, 0, out, uncached=True) == crc32c(values)
    np.testing.assert_array_equal(out, values)
    if not reader._past_cache.direct:
        pytest.skip("this file system refuses O_DIRECT")
    assert resident_fraction([path]) < 0.1  # read from the disk, not through the cache
    out[:] = 0
    reader.read(0, 0, out)  # a buffered read fills the cache
    assert resident_fraction([path]) == 1.0
    out[:] = 0
    assert reader.read(0, 0, out, uncached=True) == crc32c(values)  # served by the cache now
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("cached_bytes", [4096, 3 * 4096 + 100, N * 2, N * 4])
def test_uncached_read_of_a_partly_cached_chunk(tmp_path, cached_bytes):
    """The cache's part is read from the cache; the rest from the disk, from the page where it stops."""
    path, values = _chunk_file(tmp_path, N, seed=1)
    drop_cache([path])
    with open(path, "rb") as f:
        f.read(cached_bytes)
    out = direct_io.aligned_zeros((N,))
    assert chunks.DirectChunks(str(tmp_path / "c"), N).read(0, 0, out, uncached=True) == crc32c(values)
    np.testing.assert_array_equal(out, values)


def test_uncached_read_where_o_direct_is_refused(tmp_path, monkeypatch):
    """tmpfs and some network file systems refuse O_DIRECT with EINVAL: the read goes through the cache, once and for all."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here")
    path, values = _chunk_file(tmp_path, N, seed=2)
    drop_cache([path])
    real_open, refused = os.open, []

    def refusing_open(p, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            refused.append(p)
            raise OSError(22, "Invalid argument", p)
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    reader = chunks.DirectChunks(str(tmp_path / "c"), N)
    for _ in range(2):
        out = direct_io.aligned_zeros((N,))
        assert reader.read(0, 0, out, uncached=True) == crc32c(values)
        np.testing.assert_array_equal(out, values)
        drop_cache([path])
    assert len(refused) <= 1 and not reader._past_cache.direct


def test_uncached_read_of_an_unaligned_or_partial_buffer_reads_as_usual(tmp_path):
    path, values = _chunk_file(tmp_path, N, seed=3)
    reader = chunks.DirectChunks(str(tmp_path / "c"), N)
    out = np.zeros(N + 1, dtype=np.float32)[1:]  # 4 bytes off a page
    assert reader.read(0, 0, out, uncached=True) == crc32c(values)
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "delete"])
def test_uncached_read_reports_damage(tmp_path, damage):
    path, values = _chunk_file(tmp_path, N, seed=4)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[12345] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-4096]))
    elif damage == "extend":
        path.write_bytes(bytes(data) + b"\0" * 10)
    else:
        path.unlink()
    drop_cache([path]) if path.exists() else None
    reader = chunks.DirectChunks(str(tmp_path / "c"), N)
    error = chunks._Missing if damage == "delete" else chunks._Corrupt
    with pytest.raises(error):
        reader.read(0, 0, direct_io.aligned_zeros((N,)), uncached=True)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A store of 6 checkpoints, 1,270 parameters in chunks of 300 (the last one partial)."""
    import spectral_analyzer as sa
    from conftest import write_run

    root = tmp_path_factory.mktemp("reads")
    write_run(root / "ckpts", 6, {"a.weight": (40, 24), "b.bias": (40,), "c.weight": (30, 10)}, seed=4, scale=0.2)
    return sa.ingest(root / "ckpts", root / "r.zarr", chunk_size=300, progress=False).path


SPANS = [(0, 1270), (0, 300), (300, 600), (7, 1270), (299, 301), (0, 1), (1200, 1270), (610, 890)]


@pytest.mark.parametrize("start, stop", SPANS)
def test_direct_reads_equal_zarr_reads_for_any_span(small_store, monkeypatch, start, stop):
    """base, last_theta and delta rows read from the chunk files themselves, into a caller's buffer or not,
    equal Zarr's reads of the same spans (whole chunks, parts of chunks, the partial last chunk)."""
    from spectral_analyzer.store import Store, reading

    direct = Store.open(small_store)
    assert direct._direct("base") is not None and direct.reads_chunk_files
    monkeypatch.setattr(reading, "direct_layout", lambda array: None)
    zarr_read = Store.open(small_store)
    assert zarr_read._direct("base") is None and not zarr_read.reads_chunk_files
    np.testing.assert_array_equal(direct.read_last_theta(start, stop), zarr_read.read_last_theta(start, stop))
    want = zarr_read.read_base(start, stop)
    np.testing.assert_array_equal(direct.read_base(start, stop), want)
    out = np.full(stop - start, np.nan, dtype=np.float32)
    assert direct.read_base(start, stop, out) is out
    np.testing.assert_array_equal(out, want)
    for row in range(direct.n_deltas):
        want = zarr_read.read_delta_row(row, start, stop)
        assert direct.read_delta_row(row, start, stop, out) is out
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(zarr_read.read_delta_row(row, start, stop, out), want)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
@pytest.mark.parametrize("direct", [True, False])
def test_damaged_base_chunk_is_named(small_store, tmp_path, monkeypatch, damage, direct):
    """A base chunk flipped, cut short, deleted or replaced by another chunk is an error naming it, read
    directly or through Zarr; the chunks around it still read."""
    import shutil

    import spectral_analyzer as sa
    from spectral_analyzer.store import Store, reading

    path = tmp_path / "r.zarr"
    shutil.copytree(small_store, path)
    victim = path / "base" / "c" / "1"
    raw = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(raw[:50] + bytes([raw[50] ^ 4]) + raw[51:])
    elif damage == "truncate":
        victim.write_bytes(raw[:-9])
    elif damage == "delete":
        victim.unlink()
    else:
        shutil.copy(path / "base" / "c" / "2", victim)
    if not direct:
        monkeypatch.setattr(reading, "direct_layout", lambda array: None)
    store = Store.open(str(path))
    np.testing.assert_array_equal(store.read_base(0, 300), Store.open(small_store).read_base(0, 300))
    with pytest.raises(sa.StoreError, match=r"chunk 1 of 'base' (fails its checksum|is missing or holds other)"):
        store.read_base(250, 700)
    with pytest.raises(sa.StoreError, match=r"chunk 1 of 'base'"):
        sa.open_run(str(path)).weight_spectra(cache=False)
