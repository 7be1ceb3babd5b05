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
import torch
import zarr

import spectral_analyzer as sa
from spectral_analyzer.store import Location, Store, writer_lock
from spectral_analyzer.store import caches

WINDOW = 4


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _walk(model: torch.nn.Module, rec: sa.Recorder, steps, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for s in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01 * (1 + (s % 5)))
        rec.step(s)


def _dense_sigma(store: Path, window: int) -> np.ndarray:
    """sigma of every window from a float64 SVD of the deltas in the store."""
    d = sa.open_run(store).deltas.values.astype(np.float64)
    return np.stack([np.linalg.svd(d[i - window + 1 : i + 1], compute_uv=False) for i in range(window - 1, len(d))])


def _resumed_store(path: Path) -> None:
    """Steps 0..20 recorded, then training resumed at 10 along another trajectory."""
    model = _model(0)
    rec = sa.Recorder(path, model)
    rec.record(0)
    _walk(model, rec, range(1, 21), seed=1)
    sa.open_run(path).spectra(window=WINDOW)  # caches the band and the result
    model2 = _model(0)
    rec0 = sa.Recorder(path.parent / "tmp.zarr", model2)  # replay steps 0..10 to get step 10's weights
    rec0.record(0)
    _walk(model2, rec0, range(1, 11), seed=1)
    again = sa.Recorder(path, model2)
    with pytest.warns(sa.RecordingWarning):
        again.resume(10)
    _walk(model2, again, range(11, 21), seed=2)


def test_resumed_recording_never_serves_the_old_spectra(tmp_path):
    path = tmp_path / "r.zarr"
    _resumed_store(path)
    ds = sa.open_run(path).spectra(window=WINDOW)
    dense = _dense_sigma(path, WINDOW)
    np.testing.assert_allclose(ds.sigma.values, dense, rtol=1e-9, atol=1e-12 * dense.max())


def test_every_result_equals_a_fresh_store_of_the_same_rows(tmp_path):
    path = tmp_path / "r.zarr"
    _resumed_store(path)
    run = sa.open_run(path)
    fresh_path = tmp_path / "fresh.zarr"
    model = _model(0)
    rec = sa.Recorder(fresh_path, model)
    rec.record(0)
    _walk(model, rec, range(1, 11), seed=1)
    _walk(model, rec, range(11, 21), seed=2)
    fresh = sa.open_run(fresh_path)
    np.testing.assert_array_equal(run.deltas.values, fresh.deltas.values)
    np.testing.assert_array_equal(run.band(max_lag=16).values, fresh.band(max_lag=16).values)  # same L: same blocks
    for name, call in [("spectra", lambda r: r.spectra(window=WINDOW)),
                       ("dynamics", lambda r: r.dynamics(window=WINDOW, lr=0.1)),
                       ("weights", lambda r: r.weight_spectra())]:
        a, b = call(run), call(fresh)
        for var in b.data_vars:
            if b[var].dtype.kind == "f":
                np.testing.assert_allclose(a[var].values, b[var].values, rtol=1e-9, equal_nan=True, err_msg=name)
    # the store's own cache is now the new generation's: a second call is the same
    np.testing.assert_array_equal(run.spectra(window=WINDOW).sigma.values, fresh.spectra(window=WINDOW).sigma.values)


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


def test_a_reader_caches_nothing_while_a_writer_holds_the_lock(tmp_path):
    import shutil
    import threading

    path = _small_run(tmp_path)
    shutil.copytree(path, tmp_path / "copy.zarr")
    expected = sa.open_run(tmp_path / "copy.zarr").spectra(window=WINDOW)
    with writer_lock(Location.of(path)):
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("ds", sa.open_run(path).spectra(window=WINDOW)))
        t.start()
        t.join(60)
    np.testing.assert_array_equal(out["ds"].sigma.values, expected.sigma.values)
    assert not (path / "gram").exists() and not (path / "results").exists()
