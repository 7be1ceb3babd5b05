"""A fault sweep: the k-th write-like OS call of an operation fails with ENOSPC, or EIO, for k = 1..N.

Every writer must assume a full disk at any instruction. For each operation
(ingest into a new store, ingest appending 2 checkpoints, a Recorder's record
into a new store and appending, the band and result caches of ``spectra``,
the cache of ``weight_spectra``, a metrics append, ``overwrite`` of an
existing store, and the CSV, JSON and HTML exports over an existing file) the
calls it makes under the test's folder are counted in a clean run (N), then
the operation is run again with call k failing, and:

1. it fails with a one-line package error naming the path (a cache that
   cannot be written: the right numbers and a one-line CacheWarning);
2. the store reads back exactly as before (every committed row, the base,
   ``last_theta``, the weight record, the metrics, the root attributes);
   a cache is absent or right, never partial;
3. run again without the fault, it ends equal to an uninterrupted run.

Calls counted (see :class:`Faults`): ``os.open`` for writing, ``os.write``,
``writev``, ``pwrite``, ``ftruncate``, ``fsync``, ``replace``, ``rename``,
``link``, ``mkdir``, ``open(..., "w")`` and each ``write`` / ``flush`` /
``close`` of the file it returns (Zarr's local store writes through those).
N is 100 to 900 here: each test runs a seeded sample of k (the first and last
calls always among them, ``SAMPLES`` in all, per error: about a minute for the file); set
``SPECTRAL_FAULT_SWEEP=all`` to run every k (minutes).

Read faults: EIO on a checkpoint file in the middle of an ingest, and on a
store chunk during ``spectra``: one line, and nothing written that is wrong.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from adversary_procs import assert_identical, assert_same_contents, contents, toy_model
from click.testing import CliRunner
from conftest import snapshot, write_run

import spectral_analyzer as sa
from spectral_analyzer import report
from spectral_analyzer.store import location
from spectral_analyzer.cli import main
from spectral_analyzer.store import Store, StoreWriter

SIZES = {"a.w": (10, 7), "b.b": (30,)}
CHUNK = 64  # two chunks per row
WINDOW, MAX_LAG = 3, 16
SAMPLES = 4
ERRORS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO}


# -- the injector ------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _fd_path(fd) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{int(fd)}")
    except (OSError, TypeError, ValueError):
        return ""


class Faults:
    """Counts write-like calls on paths under *root* (``calls``, their names); fails call *fail_at* (1-based).

    *mode* ``"once"`` fails that call only; ``"from"`` it and every later one (a disk that stays full).
    *reads*: count read-like calls instead, on paths that contain *reads* (a file name). *linger*: once a
    call has failed, each call from a thread other than the main one waits that long first (the other writes
    of a batch, still under way in Zarr's threads when the failure is reported, land late). *only*: count
    only the calls named so (``"os.replace <path>"``).
    """

    def __init__(self, root: Path, fail_at: int | None = None, err: int = errno.ENOSPC, mode: str = "once",
                 reads: str | None = None, linger: float = 0.0, only: str | None = None):
        self.root = str(Path(root).resolve())
        self.fail_at, self.err, self.mode, self.reads, self.linger = fail_at, err, mode, reads, linger
        self.only = only
        self.calls: list[str] = []
        self.failed: list[str] = []
        self._guard = threading.Lock()

    def _mine(self, path) -> bool:
        text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
        if not text:
            return False
        if not os.path.isabs(text):
            text = os.path.join(os.getcwd(), text)
        text = os.path.normpath(text)
        if self.reads is not None:
            return self.reads in text and text.startswith(self.root)
        return text == self.root or text.startswith(self.root + os.sep)

    def hit(self, call: str, path, reading: bool = False) -> None:
        """Count *call* on *path*; raise where it is the one to fail."""
        if reading != (self.reads is not None) or not self._mine(path):
            return
        if self.failed and self.linger and threading.current_thread() is not threading.main_thread():
            time.sleep(self.linger)
        if self.only is not None and f"{call} {os.fsdecode(path)}" != self.only:
            return
        with self._guard:
            self.calls.append(f"{call} {os.fsdecode(path)}")
            n = len(self.calls)
            fail = self.fail_at is not None and (n == self.fail_at or (self.mode == "from" and n > self.fail_at))
            if fail:
                self.failed.append(self.calls[-1])
        if fail:
            raise OSError(self.err, os.strerror(self.err), os.fsdecode(path))


class _File:
    """A file object whose writes (or reads) count as calls."""

    def __init__(self, f, faults: Faults, path, reading: bool):
        self._f, self._faults, self._path, self._reading = f, faults, path, reading

    def _hit(self, call: str) -> None:
        self._faults.hit(call, self._path, self._reading)

    def write(self, data):
        self._hit("file.write")
        return self._f.write(data)

    def writelines(self, lines):
        self._hit("file.write")
        return self._f.writelines(lines)

    def flush(self):
        if not self._reading:
            self._hit("file.flush")
        return self._f.flush()

    def close(self):
        if self._f.closed:
            return None
        try:
            if not self._reading:
                self._hit("file.close")
        except OSError:
            self._f.close()  # the bytes not written; the descriptor released as Python releases it
            raise
        return self._f.close()

    def read(self, *args):
        self._hit("file.read")
        return self._f.read(*args)

    def readinto(self, b):
        self._hit("file.read")
        return self._f.readinto(b)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextmanager
def injected(faults: Faults):
    """Route the calls of this process through *faults* for the ``with`` block."""
    real = {name: getattr(os, name) for name in ("open", "write", "writev", "pwrite", "ftruncate", "fsync", "replace",
                                                 "rename", "link", "mkdir", "preadv", "pread", "read")}
    real_open = io.open

    def os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            faults.hit("os.open", path)
        else:
            faults.hit("os.open", path, reading=True)
        return real["open"](path, flags, *args, **kwargs)

    def on_fd(name):
        def call(fd, *args, **kwargs):
            faults.hit(f"os.{name}", _fd_path(fd))
            return real[name](fd, *args, **kwargs)
        return call

    def on_read_fd(name):
        def call(fd, *args, **kwargs):
            faults.hit(f"os.{name}", _fd_path(fd), reading=True)
            return real[name](fd, *args, **kwargs)
        return call

    def on_paths(name):
        def call(src, dst, *args, **kwargs):
            faults.hit(f"os.{name}", dst)
            return real[name](src, dst, *args, **kwargs)
        return call

    def mkdir(path, *args, **kwargs):
        faults.hit("os.mkdir", path)
        return real["mkdir"](path, *args, **kwargs)

    def opened(file, mode="r", *args, **kwargs):
        if isinstance(file, int):
            return real_open(file, mode, *args, **kwargs)
        reading = not set(mode) & set("wax+")
        faults.hit("open", file, reading)
        f = real_open(file, mode, *args, **kwargs)
        return _File(f, faults, file, reading)

    patched = {"open": os_open, "write": on_fd("write"), "writev": on_fd("writev"), "pwrite": on_fd("pwrite"),
               "ftruncate": on_fd("ftruncate"), "fsync": on_fd("fsync"), "replace": on_paths("replace"),
               "rename": on_paths("rename"), "link": on_paths("link"), "mkdir": mkdir,
               "preadv": on_read_fd("preadv"), "pread": on_read_fd("pread"), "read": on_read_fd("read")}
    for name, fn in patched.items():
        setattr(os, name, fn)
    builtins.open = io.open = opened
    try:
        yield faults
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
        builtins.open = io.open = real_open


def _ks(n: int, seed: int) -> list[int]:
    """The calls to fail: every one with SPECTRAL_FAULT_SWEEP=all, else the first, the last and a seeded sample."""
    if os.environ.get("SPECTRAL_FAULT_SWEEP") == "all" or n <= SAMPLES:
        return list(range(1, n + 1))
    rng = np.random.default_rng(seed)
    return sorted({1, n, *(int(k) for k in rng.choice(np.arange(2, n), SAMPLES - 2, replace=False))})


def _assert_one_line(message: str, path: Path, err: int) -> None:
    assert "\n" not in message and str(path) in message and os.strerror(err) in message, message


# -- runs and stores -----------------------------------------------------------------


def _model_at(step: int) -> torch.nn.Module:
    """The toy model after *step* seeded moves: the same weights at the same step, in every recording."""
    model = toy_model(0)
    with torch.no_grad():
        for s in range(1, step + 1):
            for i, p in enumerate(model.parameters()):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * s + i)) * 0.01)
    return model


def _record(path: Path, steps: range, resume: int | None = None) -> None:
    rec = sa.Recorder(path, _model_at(steps[0] if resume is None else resume), chunk_size=CHUNK)
    if resume is not None:
        rec.resume(resume)
    for s in steps:
        rec.model = _model_at(s)
        rec.step(s, loss=1.0 / (1 + s), **({"acc": 0.5} if s == 3 else {}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    files = write_run(root / "all", 5, SIZES, seed=4)
    (root / "first").mkdir()
    for f in files[:3]:
        shutil.copy2(f, root / "first")
    (root / "metrics.csv").write_text("step,loss\n" + "".join(f"{10 * i},{1 / (1 + i)}\n" for i in range(5)))
    r = SimpleNamespace(root=root, all=root / "all", first=root / "first", metrics=root / "metrics.csv")
    r.first_store = sa.ingest(r.first, root / "first.zarr", chunk_size=CHUNK, weights="a.w").path
    r.full = sa.ingest(r.all, root / "full.zarr", chunk_size=CHUNK, weights="a.w", metrics=r.metrics).path
    r.recorded = root / "recorded.zarr"
    _record(r.recorded, range(3))
    return r


def _copy(src: Path | None, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src is not None:
        shutil.copytree(src, dst)
    return dst


# -- operations on a store: fail, as before; again, as uninterrupted -------------------------------------------------


def _ingest_new(runs, path):
    sa.ingest(runs.all, path, chunk_size=CHUNK, weights="a.w")


def _ingest_append(runs, path):
    sa.ingest(runs.all, path, weights="a.w")


def _overwrite(runs, path):
    sa.ingest(runs.all, path, chunk_size=32, overwrite=True)


def _record_new(runs, path):
    _record(path, range(1))


def _record_append(runs, path):
    _record(path, range(3, 4), resume=2)


def _append_metrics(runs, path):
    with StoreWriter(path) as writer:
        writer.existing.append_metrics(np.array([50, 60]), {"loss": np.array([0.1, 0.2]), "acc": np.array([0.5, 0.6])})


STORE_OPERATIONS = {  # the operation and the store it starts from (None: no store)
    "ingest new": (_ingest_new, None),
    "ingest append 2": (_ingest_append, "first_store"),
    "overwrite": (_overwrite, "first_store"),
    "record new": (_record_new, None),
    "record append": (_record_append, "recorded"),
    "metrics append": (_append_metrics, "full"),
}


def _counted(folder: Path, call) -> list[str]:
    with injected(Faults(folder)) as faults:
        call()
    return faults.calls


@pytest.mark.parametrize("error", sorted(ERRORS))
@pytest.mark.parametrize("name", list(STORE_OPERATIONS))
def test_a_write_that_fails_leaves_the_store_as_it_was(runs, tmp_path, name, error):
    operation, start = STORE_OPERATIONS[name]
    pristine = getattr(runs, start) if start else None
    clean = _copy(pristine, tmp_path / "clean" / "r.zarr")
    n = len(_counted(clean.parent, lambda: operation(runs, clean)))
    want = contents(clean)
    before = contents(pristine) if pristine is not None else None
    err = ERRORS[error]
    for k in _ks(n, seed=n):
        path = _copy(pristine, tmp_path / f"{k}" / "r.zarr")
        with injected(Faults(path.parent, k, err)) as faults, warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.RecordingWarning)
            try:
                operation(runs, path)
                failure = None
            except sa.SpectralAnalyzerError as exc:
                failure = str(exc)
        what = f"{name}: {error} at call {k} of {n} ({faults.failed})"
        if failure is not None:
            _assert_one_line(failure, path, err)
            if before is None:
                assert not path.exists() or os.listdir(path) in ([], [".lock"]), f"{what}: {os.listdir(path)}"
            else:
                assert_same_contents(contents(path), before, what)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                operation(runs, path)
            caught = [str(w.message) for w in caught if not issubclass(w.category, sa.RecordingWarning)]
            assert not caught, f"{what}, then again: {caught}"  # nothing a failed write left is a warning
        # else a call whose failure does not matter (the lock file's clearing after the commit)
        assert_same_contents(contents(path), want, f"{what}, then again")
        assert os.listdir(path.parent) == ["r.zarr"], f"{what}, then again: {os.listdir(path.parent)}"
        shutil.rmtree(path.parent)


# -- caches: the right numbers, a one-line warning, never a partial cache --------------------------------------------


def _cached(path: Path) -> tuple:
    """What the caches serve: the band rows and their lags, and each readable result."""
    store = Store.open(path)
    band = store.band_cache.lookup(WINDOW)
    results = {p.name: store.read_result(p.name) for p in sorted((path / "results").glob("*")) if p.is_dir()}
    return band, {k: v for k, v in results.items() if v is not None}


def _assert_right_caches(got: tuple, want: tuple, what: str) -> None:
    """Every cache served is the uninterrupted one's (a band of fewer rows is a prefix of it)."""
    (band, results), (full, reference) = got, want
    if band is not None:
        np.testing.assert_array_equal(band[0], full[0][:, : band[0].shape[1]], err_msg=what)
        assert band[1] == full[1], what
    for key, ds in results.items():
        assert_identical(ds, reference[key], f"{what}: result {key}")


CACHE_OPERATIONS = {
    "spectra": lambda path: sa.open_run(path).spectra(window=WINDOW),
    "weight_spectra": lambda path: sa.open_run(path).weight_spectra("a.w"),
}


@pytest.mark.parametrize("error", sorted(ERRORS))
@pytest.mark.parametrize("name", list(CACHE_OPERATIONS))
def test_a_cache_write_that_fails(runs, tmp_path, name, error):
    operation = CACHE_OPERATIONS[name]
    clean = _copy(runs.full, tmp_path / "clean" / "r.zarr")
    reference = operation(_copy(runs.full, tmp_path / "plain" / "r.zarr"))
    n = len(_counted(clean.parent, lambda: operation(clean)))
    want, want_cached = contents(clean), _cached(clean)
    assert want_cached[1], "the uninterrupted run caches its result"
    err = ERRORS[error]
    for k in _ks(n, seed=n):
        path = _copy(runs.full, tmp_path / f"{k}" / "r.zarr")
        with injected(Faults(path.parent, k, err)) as faults, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = operation(path)
        what = f"{name}: {error} at call {k} of {n} ({faults.failed})"
        assert_identical(got, reference, what)
        for w in caught:
            assert issubclass(w.category, sa.CacheWarning), f"{what}: {w.message}"
            _assert_one_line(str(w.message), path, err)
        assert_same_contents(contents(path), want, what)
        _assert_right_caches(_cached(path), want_cached, what)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert_identical(operation(path), reference, f"{what}, then again")
        assert not caught, f"{what}, then again: {[str(w.message) for w in caught]}"
        band, results = _cached(path)
        assert results.keys() == want_cached[1].keys(), what
        _assert_right_caches((band, results), want_cached, f"{what}, then again")
        shutil.rmtree(path.parent)


# -- exports over an existing file ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """The spectra of the run, an earlier (shorter) version of them, and a store whose caches a report reads."""
    store = _copy(runs.full, tmp_path_factory.mktemp("exports") / "r.zarr")
    run = sa.open_run(store)
    return SimpleNamespace(run=run, ds=run.spectra(window=WINDOW), earlier=run.spectra(window=WINDOW).isel(step=[0]))


def _write_report(run, out: Path, overwrite: bool) -> None:
    report.write_report(run, out, window=WINDOW, overwrite=overwrite)


@pytest.mark.parametrize("error", sorted(ERRORS))
@pytest.mark.parametrize("name", ["s.csv", "s.json", "r.html"])
def test_an_export_that_fails_leaves_the_earlier_file(exported, tmp_path, monkeypatch, name, error):
    monkeypatch.setattr(report, "_png", lambda *args, **kwargs: "")  # the page's writes, without drawing

    def write(folder: Path, ds, overwrite: bool = True) -> None:
        if name.endswith(".html") and ds is exported.earlier:
            (folder / name).write_text("<html>an earlier report</html>")
        elif name.endswith(".html"):
            _write_report(exported.run, folder / name, overwrite)
        else:
            sa.export(ds, folder / name, overwrite=overwrite)

    clean = tmp_path / "clean"
    clean.mkdir()
    write(clean, exported.earlier, overwrite=False)
    n = len(_counted(clean, lambda: write(clean, exported.ds)))
    want = snapshot(clean)
    err = ERRORS[error]
    for k in _ks(n, seed=n):
        folder = tmp_path / f"{k}"
        folder.mkdir()
        write(folder, exported.earlier, overwrite=False)
        before = snapshot(folder)
        with injected(Faults(folder, k, err)) as faults:
            try:
                write(folder, exported.ds)
                failure = None
            except sa.ExportError as exc:
                failure = str(exc)
        what = f"{name}: {error} at call {k} of {n} ({faults.failed})"
        if failure is None:  # the folder's fsync, after the rename
            assert snapshot(folder) == want, what
        else:
            _assert_one_line(failure, folder / name, err)
            assert snapshot(folder) == before, what
        write(folder, exported.ds)
        assert snapshot(folder) == want, f"{what}, then again"


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_an_overwrite_whose_last_rename_fails_keeps_the_old_store(runs, tmp_path, error, monkeypatch):
    """Where the two folders cannot be exchanged in one step, the finished store cannot be renamed into place
    (the old one already renamed aside): the old one is put back. Before, the path held no store and the
    next writer removed the old one as a leftover."""
    monkeypatch.setattr(location, "exchange", lambda a, b: False)
    path = _copy(runs.first_store, tmp_path / "x" / "r.zarr")
    before = contents(path)
    with injected(Faults(path.parent, 1, ERRORS[error], only=f"os.replace {path}")) as faults:
        with pytest.raises(sa.StoreError) as caught:
            _overwrite(runs, path)
    assert faults.failed, "the rename of the finished store was made"
    _assert_one_line(str(caught.value), path, ERRORS[error])
    assert_same_contents(contents(path), before)
    sa.ingest(runs.first, path, weights="a.w")  # the next writer keeps it
    assert_same_contents(contents(path), before)


def test_an_overwrite_killed_right_after_its_exchange_leaves_the_new_store(runs, tmp_path, monkeypatch):
    """The old and the finished store are exchanged in one step: killed just after it (before the old store,
    now beside, is removed), the path holds the new store and the next writer removes the old one."""
    path = _copy(runs.first_store, tmp_path / "x" / "r.zarr")
    want = _copy(None, tmp_path / "want" / "r.zarr")
    _overwrite(runs, want)
    swapped = []

    def exchange(a, b):
        swapped.append(location.exchange.__wrapped__(a, b))
        if swapped[-1]:
            raise KeyboardInterrupt  # the process ends here
        return False

    exchange.__wrapped__ = location.exchange
    monkeypatch.setattr(location, "exchange", exchange)
    with pytest.raises(KeyboardInterrupt):
        _overwrite(runs, path)
    if not swapped[0]:
        pytest.skip("this system or filesystem has no atomic exchange of two folders")
    monkeypatch.undo()
    assert_same_contents(contents(path), contents(want))
    assert (tmp_path / "x" / "r.zarr.overwrite-partial").exists()
    _overwrite(runs, path)  # the next writer removes the leftover
    assert not (tmp_path / "x" / "r.zarr.overwrite-partial").exists()
    assert_same_contents(contents(path), contents(want))


def test_an_overwrite_killed_between_its_two_renames_keeps_both_stores(runs, tmp_path, monkeypatch):
    """Where the folders cannot be exchanged in one step, a kill between the renames leaves no store at the
    path: the next writer removes neither the old store nor the new one and says where they are. Before, it
    removed both as leftovers."""
    monkeypatch.setattr(location, "exchange", lambda a, b: False)
    path = _copy(runs.first_store, tmp_path / "x" / "r.zarr")
    before = contents(path)
    real, calls = os.replace, []
    old = tmp_path / "x" / "r.zarr.overwrite-old"

    def replace(src, dst, *args, **kwargs):
        if str(dst) in (str(old), str(path)):  # the overwrite's renames (not the chunk files' own)
            calls.append(str(dst))
            if len(calls) == 2:
                raise KeyboardInterrupt  # the process ends here
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            _overwrite(runs, path)
    assert calls[0] == str(old) and not (path / "zarr.json").exists()
    with pytest.raises(sa.StoreError) as refused:
        sa.ingest(runs.first, path, weights="a.w")
    message = str(refused.value)
    assert "\n" not in message and f"the earlier store is at {old} and the new one at {path}.overwrite-partial" in message, message
    shutil.rmtree(path)
    os.rename(old, path)
    assert_same_contents(contents(path), before)


def test_a_metrics_append_whose_new_series_is_begun_only(runs, tmp_path):
    """The metadata of a series new in this append cannot be written (its folder made): the next append
    removes what was begun without a warning from Zarr about a folder that is not an array."""
    path = _copy(runs.full, tmp_path / "x" / "r.zarr")
    before = contents(path)
    with injected(Faults(path.parent, 1, only=f"os.replace {path}/metrics/acc/zarr.json")) as faults:
        with pytest.raises(sa.StoreError) as caught:
            _append_metrics(runs, path)
    assert faults.failed and (path / "metrics" / "acc").is_dir()
    _assert_one_line(str(caught.value), path, errno.ENOSPC)
    assert_same_contents(contents(path), before)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _append_metrics(runs, path)
    assert not warned, [str(w.message) for w in warned]
    np.testing.assert_array_equal(sa.open_run(path).metrics["acc"].values[-2:], [0.5, 0.6])


def test_a_failed_create_waits_for_the_rest_of_its_batch(runs, tmp_path):
    """A write of a new store's metadata fails while Zarr's other writes of the same batch (the array's
    parents' ``zarr.json``, the root's among them) are still under way in its threads: the rollback comes
    after them. Before, one that landed after the rollback left a folder the next ingest refused as not a
    store, or a root with no arrays."""
    clean = _copy(None, tmp_path / "clean" / "r.zarr")
    calls = _counted(clean.parent, lambda: _ingest_new(runs, clean))
    created = next(i for i, c in enumerate(calls) if "/c/" in c)  # the calls before the first chunk
    batch = [i + 1 for i, c in enumerate(calls[:created]) if "/" in c.split("r.zarr/", 1)[-1]]  # arrays' metadata
    failed = 0
    for k in batch[:: max(1, len(batch) // 5)]:
        path = _copy(None, tmp_path / f"{k}" / "r.zarr")
        with injected(Faults(path.parent, k, linger=0.03)) as faults:
            try:
                _ingest_new(runs, path)
                continue  # a call whose failure does not matter (a folder's mkdir where it exists)
            except sa.StoreError as exc:
                message = str(exc)
        failed += 1
        time.sleep(0.2)  # what was still under way has landed
        what = f"no space at call {k} ({faults.failed})"
        _assert_one_line(message, path, errno.ENOSPC)
        assert not path.exists() or os.listdir(path) in ([], [".lock"]), f"{what}: {os.listdir(path)}"
        _ingest_new(runs, path)
        assert_same_contents(contents(path), contents(clean), f"{what}, then again")
    assert failed >= 3, f"only {failed} of the sampled calls failed the ingest"


# -- the command line ----------------------------------------------------------------------------------------


def _cli_error(result, *named: Path, err: int = errno.ENOSPC) -> str:
    """The one ``Error:`` line of a failed command, naming *named*, with no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output and os.strerror(err) in lines[0], lines[0]
    assert all(str(p) in lines[0] for p in named), lines[0]
    return lines[0]


@pytest.mark.parametrize("error", sorted(ERRORS))
def test_the_command_line_on_a_failed_write(runs, tmp_path, error):
    """``ingest`` (an append) and ``spectra -o`` (an export over an earlier one): exit 1, one line."""
    err = ERRORS[error]
    clean = _copy(runs.first_store, tmp_path / "clean" / "r.zarr")
    args = ["ingest", str(runs.all), "-o", "{store}", "--no-progress", "--weights", "a.w"]
    n = len(_counted(clean.parent, lambda: CliRunner().invoke(main, [a.format(store=clean) for a in args])))
    failed = 0
    for k in _ks(n, seed=n):
        path = _copy(runs.first_store, tmp_path / f"{k}" / "r.zarr")
        with injected(Faults(path.parent, k, err)):
            result = CliRunner().invoke(main, [a.format(store=path) for a in args])
        if result.exit_code:  # else a call whose failure does not matter (a folder's mkdir where it exists)
            _cli_error(result, path, err=err)
            failed += 1
    assert failed, "no sampled call failed the ingest"
    out = tmp_path / "out"
    out.mkdir()
    args = ["spectra", str(clean), "-w", str(WINDOW), "-q", "--no-progress", "-o", str(out / "s.csv")]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = snapshot(out)
    for k in (1, 3):
        with injected(Faults(out, k, err)):
            result = CliRunner().invoke(main, [*args, "--overwrite"])
        _cli_error(result, out / "s.csv", err=err)
        assert snapshot(out) == before


# -- read faults ---------------------------------------------------------------------------------------------


def test_a_checkpoint_that_cannot_be_read_mid_ingest(runs, tmp_path):
    """EIO on reads of the last checkpoint of an append (its hash, header, tensors): one line naming it; the
    store holds committed rows of the uninterrupted ingest only; the next ingest ends equal to one."""
    clean = _copy(runs.first_store, tmp_path / "clean" / "r.zarr")
    victim = sorted(runs.all.iterdir())[-1]
    with injected(Faults(runs.all, reads=victim.name)) as faults:
        _ingest_append(runs, clean)
    want = contents(clean)
    for k in range(1, len(faults.calls) + 1):
        path = _copy(runs.first_store, tmp_path / f"{k}" / "r.zarr")
        with injected(Faults(runs.all, k, errno.EIO, reads=victim.name)) as faults:
            try:
                _ingest_append(runs, path)
                failure = None
            except sa.SpectralAnalyzerError as exc:
                failure = str(exc)
        what = f"EIO at read {k} ({faults.failed})"
        if failure is not None:  # a read the library retries, or does without, need not fail
            _assert_one_line(failure, victim, errno.EIO)
            got = contents(path)
            n = len(got["step"])
            for key in ("deltas", "step", "chunk_crc", "base"):
                np.testing.assert_array_equal(got[key], want[key][:n] if key != "base" else want[key], err_msg=what)
        _ingest_append(runs, path)
        assert_same_contents(contents(path), want, f"{what}, then again")
        shutil.rmtree(path.parent)
    result = None
    with injected(Faults(runs.all, 1, errno.EIO, reads=victim.name)):
        result = CliRunner().invoke(main, ["ingest", str(runs.all), "-o", str(tmp_path / "cli.zarr"), "--no-progress"])
    _cli_error(result, victim, err=errno.EIO)


def test_a_chunk_that_cannot_be_read_during_spectra(runs, tmp_path):
    """EIO on a delta chunk while the band is built: one line naming the store; no cache, or a right one."""
    clean = _copy(runs.full, tmp_path / "clean" / "r.zarr")
    reference = sa.open_run(_copy(runs.full, tmp_path / "plain" / "r.zarr")).spectra(window=WINDOW, cache=False)
    with injected(Faults(clean, reads="deltas/c")) as faults:
        sa.open_run(clean).spectra(window=WINDOW)
    want_cached = _cached(clean)
    n = len(faults.calls)
    assert n, "the band build reads the delta chunks"
    for k in _ks(n, seed=n):
        path = _copy(runs.full, tmp_path / f"{k}" / "r.zarr")
        with injected(Faults(path, k, errno.EIO, reads="deltas/c")) as faults:
            with pytest.raises(sa.StoreError) as caught:
                sa.open_run(path).spectra(window=WINDOW)
        what = f"EIO at read {k} of {n} ({faults.failed})"
        _assert_one_line(str(caught.value), path, errno.EIO)
        assert not (path / "results").exists() or not _cached(path)[1], what
        _assert_right_caches(_cached(path), want_cached, what)
        assert_identical(sa.open_run(path).spectra(window=WINDOW), reference, f"{what}, then again")
        shutil.rmtree(path.parent)
    path = _copy(runs.full, tmp_path / "cli" / "r.zarr")
    with injected(Faults(path, 1, errno.EIO, reads="deltas/c")):
        result = CliRunner().invoke(main, ["spectra", str(path), "-w", str(WINDOW), "-q", "--no-progress"])
    _cli_error(result, path, err=errno.EIO)
