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

from spectral_analyzer.store import chunks
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
