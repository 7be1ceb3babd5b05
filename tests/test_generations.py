"""Caches know which rows they describe: generations and committed caches.

Kills at every write of a cache, and a second writer, are in test_adversary_faults.py and test_conformance.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import zarr

import spectral_analyzer as sa
from spectral_analyzer.store import caches

WINDOW = 4


def _small_run(tmp_path: Path) -> Path:
    from conftest import write_run

    write_run(tmp_path / "src", 12, {"a.w": (20, 9), "b.w": (33,)}, seed=3)
    sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=64)
    return tmp_path / "r.zarr"


def test_a_result_that_cannot_be_cached_warns_and_leaves_nothing(tmp_path, monkeypatch):
    path = _small_run(tmp_path)
    expected = sa.open_run(path).spectra(window=WINDOW, cache=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(caches.coding, "checksums", full)  # after the data, before the marker
        with pytest.warns(sa.CacheWarning, match="No space left"):
            ds = sa.open_run(path).spectra(window=WINDOW)
    np.testing.assert_array_equal(ds.sigma.values, expected.sigma.values)
    run = sa.open_run(path)
    assert run.store.read_result(next(iter(_result_names(path)))) is None  # partial: not a result
    np.testing.assert_array_equal(run.spectra(window=WINDOW).sigma.values, expected.sigma.values)
    assert all(_committed(path, n) for n in _result_names(path))  # the partial one was replaced


def _result_names(path: Path) -> list[str]:
    g = zarr.open_group(str(path / "results"), mode="r", use_consolidated=False)
    return sorted(g.group_keys())


def _committed(path: Path, name: str) -> bool:
    return "committed" in zarr.open_group(str(path / "results" / name), mode="r").attrs


def test_missing_or_flipped_result_chunk_is_recomputed(tmp_path):
    path = _small_run(tmp_path)
    first = sa.open_run(path).spectra(window=WINDOW)
    name = _result_names(path)[0]
    chunk = next(p for p in (path / "results" / name / "sigma").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.unlink()
    np.testing.assert_array_equal(sa.open_run(path).spectra(window=WINDOW).sigma.values, first.sigma.values)
    chunk = next(p for p in (path / "results" / name / "gap_ratio").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    chunk.write_bytes(bytes(raw))
    np.testing.assert_array_equal(sa.open_run(path).spectra(window=WINDOW).gap_ratio.values, first.gap_ratio.values)


def test_an_older_snapshot_never_shrinks_the_band(tmp_path):
    from conftest import write_run

    write_run(tmp_path / "src", 8, {"w": (40,)}, seed=5)
    path = tmp_path / "r.zarr"
    sa.ingest(tmp_path / "src", path)
    old = sa.open_run(path)
    write_run(tmp_path / "src2", 16, {"w": (40,)}, seed=5)  # the same 8 checkpoints and 8 more
    sa.ingest(tmp_path / "src2", path)
    new = sa.open_run(path)
    assert new.n_deltas > old.n_deltas
    long_band = new.band(max_lag=4).values
    short = old.band(max_lag=4).values  # the older commit: served from the longer cache
    np.testing.assert_array_equal(short, long_band[:, : old.n_deltas])
    gram = zarr.open_group(str(path / "gram"), mode="r")
    assert gram.attrs["n_rows"] == new.n_deltas


def test_band_asked_with_a_smaller_lag_has_that_many_lags(tmp_path):
    path = _small_run(tmp_path)
    run = sa.open_run(path)
    assert run.band(max_lag=8).sizes["lag"] == 9
    assert run.band(max_lag=3).sizes["lag"] == 4


