"""One conformance suite for every store backend: a folder, a ``file://`` URL, fsspec's memory filesystem, S3.

After every operation that changes a store's rows (an append by ingest or by
a recorder, a truncation by ``Recorder.resume``, the rollback of an ingest
that failed part-way, an overwrite), every analysis the public API offers
equals the same analysis of a fresh local store built from the same rows:
the deltas and the band bit for bit, the Datasets identical. Along the way
the caches are checked to be reused while they describe the rows, and
recomputed (only the band rows that changed, from the start of their block)
once they do not. A backend passes every test here, or it is not done.

S3 is moto's server on loopback, reached through s3fs: some 25 ms a request
on a 2-core machine, and a lifecycle below makes thousands of requests (every
variable of every cached result is an object), so the S3 runs take minutes
and are marked slow: ``pytest --runslow tests/test_conformance.py``.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import xarray as xr
from conftest import FIXTURES, write_run
from safetensors.torch import load_file, save_file

import spectral_analyzer as sa
from spectral_analyzer.gram import build
from spectral_analyzer.store import Location, Store, writer_lock
from spectral_analyzer.store.location import LOCK_NAME

WINDOW = 4
CHUNK = 4096  # four chunks per row of the grokking model (16288 parameters)
INGEST = {"chunk_size": CHUNK, "weights": "*in_proj_weight*"}  # the weight record rolls back with the rows
WD1, WD0 = FIXTURES / "grokking" / "wd1", FIXTURES / "grokking" / "wd0"
FIRST, APPENDED = range(24, 34), range(24, 38)  # checkpoint indices: steps 960..1320, then ..1480
ALL_RESULTS = ["dynamics", "spectra", "weights"]
_names = count()


# -- backends -------------------------------------------------------------------


@dataclass
class Backend:
    """Where the stores of one test live, and how to read every byte of one."""

    root: str
    options: dict | None = None

    def url(self, name: str) -> str:
        return f"{self.root}/{name}.zarr"

    def _fs(self, url: str):
        fs, path = fsspec.core.url_to_fs(url, **(self.options or {}))
        fs.invalidate_cache()
        return fs, path.rstrip("/")

    def objects(self, url: str) -> dict[str, bytes]:
        """Every file or object of the store at *url* but the writer lock, by its key inside the store."""
        fs, path = self._fs(url)
        return {p[len(path) + 1 :]: fs.cat_file(p) for p in sorted(fs.find(path)) if p != f"{path}/{LOCK_NAME}"}

    def committed(self, url: str) -> dict[str, bytes]:
        """:meth:`objects` less the idle slot of ``last_theta``, where the next append writes before it commits."""
        idle = 1 - Store.open(url, storage_options=self.options).commit_record["last_slot"]
        return {k: v for k, v in self.objects(url).items() if not k.startswith(f"last_theta/c/{idle}/")}

    def beside(self, url: str) -> list[str]:
        """What lies beside the store (``<store>.<anything>``): leftovers of a writer."""
        fs, path = self._fs(url)
        return fs.glob(f"{path}.*")


def _clear_memory() -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]


def _backend(request, tmp_path):
    kind = request.param
    if kind == "folder":
        yield Backend(str(tmp_path / "stores"))
    elif kind == "file-url":
        yield Backend(f"file://{tmp_path}/stores")
    elif kind == "memory":
        _clear_memory()
        yield Backend("memory://conformance")
        _clear_memory()
    else:
        options, fs = request.getfixturevalue("s3")
        prefix = f"runs/conformance-{next(_names)}"
        yield Backend(f"s3://{prefix}", options)
        fs.invalidate_cache()
        if fs.find(prefix):
            fs.rm(prefix, recursive=True)


# The lifecycles make thousands of requests, about 25 ms each against moto: on S3 they run with --runslow.
backend = pytest.fixture(params=["folder", "file-url", "memory", pytest.param("s3", marks=pytest.mark.slow)])(_backend)
every_backend = pytest.fixture(params=["folder", "file-url", "memory", "s3"])(_backend)


# -- what is compared -------------------------------------------------------------


def analyses(run: sa.Run, cache: bool = True) -> dict:
    """Everything the public API computes from a store's rows.

    The weight spectra are those of W_Q, the matrix the grokking summary
    reads (from its cached result, as a later call would).
    """
    grokking = run.grokking(window=WINDOW)
    wq = grokking.attrs["wq"]
    assert wq.endswith("in_proj_weight[q]")
    grokking.attrs.pop("store")  # the store's path
    return {
        "checkpoint_steps": run.checkpoint_steps,
        "deltas": run.deltas.values,
        "base": run.base.values,
        "metrics": run.metrics,
        "band": run.band().values,
        "spectra": run.spectra(window=WINDOW, cache=cache),
        "dynamics": run.dynamics(window=WINDOW, cache=cache),
        "weight_spectra": run.weight_spectra(wq, cache=cache),
        "grokking": grokking,
    }


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        if isinstance(value, xr.Dataset):
            xr.testing.assert_identical(got[name], value)
        else:  # bit for bit
            assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
            assert np.array_equal(got[name].view(np.uint8), value.view(np.uint8)), name


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The analyses of a fresh local store, built once per set of rows: ``fresh(name, build)``."""
    folder = tmp_path_factory.mktemp("fresh")
    made: dict[str, dict] = {}

    def of(name: str, make) -> dict:
        if name not in made:
            path = folder / f"{name}.zarr"
            make(path)
            made[name] = analyses(sa.open_run(path), cache=False)
        return made[name]

    return of


@dataclass
class Computed:
    """Band rows and results computed (not read from a cache) since the last ``clear``."""

    band: list[tuple[int, int]] = field(default_factory=list)
    results: set[str] = field(default_factory=set)

    def clear(self) -> None:
        self.band.clear()
        self.results.clear()


@pytest.fixture
def computed(monkeypatch) -> Computed:
    log = Computed()
    compute_rows, cache_result = build._compute_rows, Store.cache_result

    def rows(store, lag, start, n, *args, **kwargs):
        log.band.append((start, n))
        return compute_rows(store, lag, start, n, *args, **kwargs)

    def result(self, name, ds):
        log.results.add(name.split("-")[0])
        return cache_result(self, name, ds)

    monkeypatch.setattr(build, "_compute_rows", rows)
    monkeypatch.setattr(Store, "cache_result", result)
    return log


def check(run: sa.Run, want: dict, computed: Computed, band: list[tuple[int, int]], results: list[str]) -> None:
    """*run*'s analyses equal *want*, computing exactly *band* (start, stop) rows and *results*."""
    computed.clear()
    got = analyses(run)
    assert computed.band == band
    assert sorted(computed.results) == results
    assert_same(got, want)


# -- ingest: create, append, rollback, overwrite ------------------------------------------


def _folder(path: Path, run: Path, indices) -> Path:
    """*path* holding the checkpoints *indices* of a grokking run and its metrics."""
    path.mkdir(parents=True, exist_ok=True)
    files = sorted(run.glob("step_*.safetensors"))
    for i in indices:
        shutil.copy(files[i], path)
    shutil.copy(run / "metrics.csv", path)
    return path


def _ingested(run: Path, indices):
    def make(path: Path) -> None:
        sa.ingest(_folder(path.with_suffix(".src"), run, indices), path, **INGEST)

    return make


def test_ingest_create_append_rollback_overwrite(backend, tmp_path, fresh, computed, monkeypatch):
    url, options = backend.url("run"), backend.options
    src = _folder(tmp_path / "src", WD1, FIRST)

    # create
    run = sa.ingest(src, url, storage_options=options, **INGEST)
    check(run, fresh("wd1-first", _ingested(WD1, FIRST)), computed, band=[(0, 9)], results=ALL_RESULTS)
    assert run.store.size_on_disk() == sum(map(len, backend.objects(url).values()))  # the lock at rest: empty or gone

    # append: the rows already stored are not rewritten; the band is extended from the block of row 9
    before = backend.objects(url)
    _folder(src, WD1, APPENDED)
    run = sa.ingest(src, url, storage_options=options, **INGEST)
    assert run.n_deltas == 13
    after = backend.objects(url)
    kept = [k for k in before if k.startswith("base/") or (k.startswith("deltas/c/") and int(k.split("/")[2]) < 9)]
    assert len(kept) > 9 and all(after[k] == before[k] for k in kept)
    want = fresh("wd1-appended", _ingested(WD1, APPENDED))
    check(run, want, computed, band=[(8, 13)], results=ALL_RESULTS)

    # rollback: two good checkpoints are committed, the third holds a NaN in its last tensor
    before = backend.committed(url)
    files = sorted(WD1.glob("step_*.safetensors"))
    for f in files[38:40]:
        shutil.copy(f, src)
    bad = load_file(str(files[40]))
    bad["unembed.weight"][3, 5] = float("nan")
    save_file(bad, str(src / files[40].name))
    commits, commit_rows = [], Store.commit_rows
    with monkeypatch.context() as m, pytest.raises(
            sa.NonFiniteError, match=r"tensor 'unembed.weight' at step 1600 .* holds 1 NaN/Inf values"):
        m.setattr(Store, "commit_rows", lambda self, record, *a, **k: (
            commits.append(record["n_deltas"]), commit_rows(self, record, *a, **k))[1])
        sa.ingest(src, url, storage_options=options, **INGEST)
    assert commits == [14, 15]  # rows 13 and 14 were committed, then rolled back
    assert backend.committed(url) == before  # bit for bit: rows, weight record, metrics, caches
    check(sa.open_run(url, storage_options=options), want, computed, band=[], results=[])  # all served from the caches

    # overwrite: another run at the same steps (same base, other rows) replaces it whole
    other = _folder(tmp_path / "other", WD0, APPENDED)
    with pytest.raises(sa.StoreExistsError, match="holds a different run"):
        sa.ingest(other, url, storage_options=options, **INGEST)
    assert backend.committed(url) == before
    run = sa.ingest(other, url, overwrite=True, storage_options=options, **INGEST)
    assert backend.beside(url) == []
    check(run, fresh("wd0-appended", _ingested(WD0, APPENDED)), computed, band=[(0, 13)], results=ALL_RESULTS)


# -- live recording: create, append by another recorder, resume -----------------------------


def _model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"attn": torch.nn.MultiheadAttention(8, 2), "head": torch.nn.Linear(8, 3)})


def _walk(start: dict[str, torch.Tensor], steps, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """The weights at each of *steps* of a random walk from *start*."""
    gen = torch.Generator().manual_seed(seed)
    state, out = dict(start), {}
    for s in steps:
        state = {k: v + 0.01 * (1 + s % 5) * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        out[s] = state
    return out


@functools.cache
def _trajectories() -> tuple[dict, dict]:
    """Weights at steps 0..11 of a run (A), and of the same run resumed at step 9 along another walk (B)."""
    a = {0: {k: v.detach().clone() for k, v in _model().state_dict().items()}}
    a.update(_walk(a[0], range(1, 12), seed=1))
    b = {s: a[s] for s in range(10)}
    b.update(_walk(a[9], range(10, 12), seed=2))
    return a, b


def _logged(states: dict, s: int) -> dict[str, float]:
    """What training logs at step *s*: a loss (here the weights' squared norm), the learning rate, an accuracy."""
    return {"loss": float(sum(v.double().square().sum() for v in states[s].values())), "lr": 0.1,
            "test_acc": min(1.0, s / 10)}


def _record(rec: sa.Recorder, model: torch.nn.Module, states: dict, steps) -> None:
    for s in steps:
        model.load_state_dict(states[s])
        rec.step(s, **_logged(states, s))


def _saved(states: dict, last: int):
    """A fresh store of the recorded rows: the states up to *last* saved as checkpoints and ingested."""
    def make(path: Path) -> None:
        src = path.with_suffix(".src")
        src.mkdir()
        rows = []
        for s in range(last + 1):
            save_file(states[s], str(src / f"step_{s}.safetensors"))
            rows.append(",".join([str(s), *(repr(v) for v in _logged(states, s).values())]))
        (src / "metrics.csv").write_text("\n".join(["step,loss,lr,test_acc", *rows]) + "\n")
        sa.ingest(src, path, chunk_size=64)

    return make


def test_recorder_create_append_resume(backend, fresh, computed):
    url, options = backend.url("live"), backend.options
    A, B = _trajectories()
    model = _model()

    _record(sa.Recorder(url, model, chunk_size=64, storage_options=options), model, A, range(10))
    check(sa.open_run(url, storage_options=options), fresh("A-9", _saved(A, 9)), computed,
          band=[(0, 9)], results=ALL_RESULTS)

    # another recorder (a new process) appends from the store's own copy of the last weights
    _record(sa.Recorder(url, model, chunk_size=64, storage_options=options), model, A, range(10, 12))
    check(sa.open_run(url, storage_options=options), fresh("A-11", _saved(A, 11)), computed,
          band=[(8, 11)], results=ALL_RESULTS)

    # training resumed at step 9: rows 10 and 11 are dropped and recorded again along the new walk
    model.load_state_dict(B[9])
    rec = sa.Recorder(url, model, chunk_size=64, storage_options=options)
    with pytest.warns(sa.RecordingWarning, match=r"dropping the 2 rows recorded after it \(steps 10\.\.11\)"):
        rec.resume(9)
    truncated = sa.open_run(url, storage_options=options)
    assert list(truncated.checkpoint_steps) == list(range(10))
    assert_same({"deltas": truncated.deltas.values}, {"deltas": fresh("A-9", _saved(A, 9))["deltas"]})
    _record(rec, model, B, range(10, 12))
    check(sa.open_run(url, storage_options=options), fresh("B-11", _saved(B, 11)), computed,
          band=[(8, 11)], results=ALL_RESULTS)


# -- one writer at a time ---------------------------------------------------------------------


def test_a_second_writer_is_refused_in_one_line_or_waits(every_backend, tmp_path):
    backend = every_backend
    url, options = backend.url("locked"), backend.options
    paths = write_run(tmp_path / "all", 6, {"layers.0.w": (20, 9), "head": (13,)}, seed=5)
    src = tmp_path / "src"
    src.mkdir()
    for p in paths[:4]:
        shutil.copy(p, src)
    sa.ingest(src, url, chunk_size=64, storage_options=options)
    first = sa.ingest(src, tmp_path / "first.zarr", chunk_size=64).spectra(window=2, cache=False)
    for p in paths[4:]:
        shutil.copy(p, src)
    before = backend.objects(url)

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with writer_lock(Location.of(url, options)):
            held.set()
            release.wait(60)

    owner = threading.Thread(target=holder)
    owner.start()
    try:
        assert held.wait(30)
        with pytest.raises(sa.StoreBusyError) as busy:
            sa.ingest(src, url, chunk_size=64, storage_options=options)
        message = str(busy.value)
        assert "\n" not in message
        assert message.startswith(f"{Location.of(url).path}: being written by pid {os.getpid()} on host ")
        assert message.endswith("; --wait (wait=True) to wait for it")
        # a reader neither waits nor writes its caches into a store being written
        xr.testing.assert_identical(sa.open_run(url, storage_options=options).spectra(window=2), first)
        assert backend.objects(url) == before

        waited: dict = {}
        waiter = threading.Thread(target=lambda: waited.setdefault(
            "run", sa.ingest(src, url, chunk_size=64, wait=True, storage_options=options)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive() and backend.objects(url) == before  # waiting, nothing written
    finally:
        release.set()
        owner.join(30)
    waiter.join(60)
    assert not waiter.is_alive()
    reference = sa.ingest(tmp_path / "all", tmp_path / "reference.zarr", chunk_size=64)
    assert waited["run"].n_deltas == 5
    assert_same({"deltas": waited["run"].deltas.values}, {"deltas": reference.deltas.values})
