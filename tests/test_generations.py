"""Caches know which rows they describe: generations, committed caches, one writer."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import spectral_analyzer as sa
from spectral_analyzer.store import Location, Store, writer_lock
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


@pytest.mark.parametrize("what", ["result", "band"])
def test_killed_at_any_write_of_a_cache(tmp_path, monkeypatch, what):
    """A crash after any of the cache's writes (20 points): the next call equals a fresh computation."""
    import shutil

    path = _small_run(tmp_path)
    expected = sa.open_run(path).spectra(window=WINDOW, cache=False)
    caches_made = ("results", "gram") if what == "band" else ("results",)

    def reset():
        for sub in caches_made:
            shutil.rmtree(path / sub, ignore_errors=True)
        if what == "result":
            sa.open_run(path).band(max_lag=16)  # the band cached: only the result is written below

    original = zarr.storage.LocalStore.set

    class Killed(BaseException):
        pass

    def run_with_kill(at: int | None) -> int:
        count = [0]

        async def dying(self, key, value, *a, **k):
            count[0] += 1
            if at is not None and count[0] > at:
                raise Killed
            return await original(self, key, value, *a, **k)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", dying)
        try:
            sa.open_run(path).spectra(window=WINDOW)
        except Killed:
            pass
        finally:
            monkeypatch.setattr(zarr.storage.LocalStore, "set", original)
        return count[0]

    reset()
    total = run_with_kill(None)
    assert total > 5
    points = sorted(set(np.random.default_rng(0).integers(0, total, 20).tolist()))
    for at in points:
        reset()
        run_with_kill(at)
        ds = sa.open_run(path).spectra(window=WINDOW)  # never the partial cache
        np.testing.assert_array_equal(ds.sigma.values, expected.sigma.values)
        np.testing.assert_array_equal(ds.k_star.values, expected.k_star.values)
        again = sa.open_run(path).spectra(window=WINDOW)  # the cache the call above committed
        np.testing.assert_array_equal(again.sigma.values, expected.sigma.values)


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


def test_a_second_writer_is_refused_in_one_line_or_waits(tmp_path):
    from conftest import write_run

    write_run(tmp_path / "src", 4, {"w": (40,)}, seed=5)
    path = tmp_path / "r.zarr"
    cmd = [sys.executable, "-m", "spectral_analyzer.cli", "ingest", str(tmp_path / "src"), "-o", str(path), "--no-progress"]
    with writer_lock(Location.of(path)):
        busy = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert busy.returncode != 0
    err = busy.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert f"being written by pid {os.getpid()}" in err and "--wait" in err
    assert not Store.exists(path)
    lock = writer_lock(Location.of(path))
    lock.__enter__()
    child = subprocess.Popen([*cmd, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    assert child.poll() is None  # waiting
    lock.__exit__(None, None, None)
    assert child.wait(timeout=120) == 0
    reference = sa.ingest(tmp_path / "src", tmp_path / "ref.zarr")
    np.testing.assert_array_equal(sa.open_run(path).deltas.values, reference.deltas.values)
