"""Devices resolved where the work runs, and refused on one line where they are not there."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import torch
from conftest import write_run
from test_band import ODD

import spectral_analyzer as sa
from spectral_analyzer.devices import check_device, resolve_device
from spectral_analyzer.errors import DeviceError
from spectral_analyzer.gram import build
from spectral_analyzer.gram.ring import StagedRing
from spectral_analyzer.store import Store
from spectral_analyzer.weights.kernel import singular_values


def see_gpus(monkeypatch, count: int, current: int = 0) -> None:
    """Make torch report *count* CUDA devices (0: none) and *current* as the calling thread's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and type(exc.value) is DeviceError
    return message


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    write_run(root / "src", 20, ODD, seed=5)
    return sa.ingest(root / "src", root / "r.zarr", chunk_size=300)


def test_auto_is_cuda_at_the_current_index_where_a_gpu_is_seen(monkeypatch):
    see_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    see_gpus(monkeypatch, 2, current=1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)  # the thread's current device, not always 0
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_unavailable_or_unknown_devices_are_refused_on_one_line(monkeypatch):
    see_gpus(monkeypatch, 0)
    with pytest.raises(DeviceError) as exc:
        resolve_device("cuda")
    assert one_line(exc).startswith("cuda requested but torch") and "sees no CUDA device on " in str(exc.value)
    see_gpus(monkeypatch, 2)
    with pytest.raises(DeviceError) as exc:
        resolve_device("cuda:2")
    assert one_line(exc).startswith("cuda:2 requested but torch sees 2 CUDA device(s) on ")
    for bad, start in (("gpu", "unknown device 'gpu'"), ("meta", "device 'meta' is not supported")):
        with pytest.raises(DeviceError) as exc:
            check_device(bad)
        assert one_line(exc).startswith(start)
    assert check_device("cuda:7") == "cuda:7"  # no availability check: a worker resolves it


def test_band_and_weights_refuse_cuda_without_a_gpu(run, monkeypatch):
    see_gpus(monkeypatch, 0)
    store = Store.open(run.path)
    for call in (lambda: build.build_band(store, 4, device="cuda"),
                 lambda: run.band(max_lag=4, device="cuda:0"),
                 lambda: singular_values([np.eye(3)], "cuda"),
                 lambda: run.weight_spectra(device="cuda", cache=False),
                 lambda: build._band_task(run.path, None, 0, 300, ((0, 0, 300),), 0, 8, 4, "cuda", 1,
                                          store.crcs[:8, 0].copy())):
        with pytest.raises(DeviceError) as exc:
            call()
        one_line(exc)
    assert store.band_cache.lookup(4) is None  # nothing cached


def test_a_task_resolves_auto_on_its_worker(run, monkeypatch):
    """With a cluster, "auto" travels as "auto": a client that sees a GPU does not send cuda to workers that
    have none, and a client without one does not send cpu to workers that have one."""
    store = Store.open(run.path)
    want = build._compute_rows(store, 4, 0, store.n_deltas, "cpu", None, None, False)

    def workers_without_gpus(dsk, keys, **kwargs):
        see_gpus(monkeypatch, 0)
        return dask.get(dsk, keys, **kwargs)

    see_gpus(monkeypatch, 1)  # the client sees one
    got = build._compute_rows(store, 4, 0, store.n_deltas, "auto", workers_without_gpus, None, False)
    np.testing.assert_array_equal(got, want)

    rings = []

    def on_the_gpu(store, start, stop, max_lag, block_rows, device, segments):
        rings.append(device)  # the device the task resolved; the ring itself computes on the cpu here
        return StagedRing(store, start, stop, max_lag, block_rows, torch.device("cpu"), segments=segments)

    def workers_with_gpus(dsk, keys, **kwargs):
        see_gpus(monkeypatch, 1)
        monkeypatch.setattr(build, "StagedRing", on_the_gpu)
        return dask.get(dsk, keys, **kwargs)

    see_gpus(monkeypatch, 0)  # the client sees none
    got = build._compute_rows(store, 4, 0, store.n_deltas, "auto", workers_with_gpus, None, False)
    assert rings and set(rings) == {torch.device("cuda", 0)}
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.nanmax(np.abs(want)))
