"""Separate processes for the adversarial tests, and what the tests compare stores with.

Children start from a fork server that has imported the package, torch,
zarr and dask once: each child is a fresh process, killed for real, for a
few milliseconds of start-up instead of seconds of imports.
A child reports through a JSON file; a child killed on purpose reports nothing.

The store's writes, as :func:`broken_writes` breaks them: every call of
zarr's local ``_put`` (one chunk or metadata document, written to a
temporary file and renamed into place) and of ``LocalStore.delete`` /
``delete_dir``. Every write of the package's data to a local store goes
through these, so counting them enumerates the points where a writer can
die or find the disk full; a full disk also refuses ``os.pwrite``, with
which the writer lock records its holder.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr
import zarr.storage._local as zarr_local

import spectral_analyzer as sa
import spectral_analyzer.store.chunk_writes as store_chunks
from spectral_analyzer.store import Store

WINDOW = 4
MAX_LAG = 16


# What the fork server imports once (distributed and xarray's zarr backend: dask and xarray import them on
# first use). Not this module itself: a fork server of Python < 3.12 does not see the test folder on its
# path (each child does, and imports this module, cheaply, from there).
# The package's own subpackages too: it imports them on first use, and a child importing them pays about a
# second (scipy, safetensors) that the server pays once.
_PRELOAD = ["numpy", "torch", "zarr", "xarray", "xarray.backends.zarr", "distributed", "dask.array", "click",
            "pytest", "spectral_analyzer", "spectral_analyzer.cli", "spectral_analyzer.run", "spectral_analyzer.ingest",
            "spectral_analyzer.ingest.recorder", "spectral_analyzer.gram.build", "spectral_analyzer.spectra",
            "spectral_analyzer.dynamics", "spectral_analyzer.weights"]


def context():
    """The multiprocessing context of every child: a fork server that has imported the package."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def start_fork_server() -> None:
    """Start the fork server now: it imports in the background while the tests prepare their stores."""
    context()
    multiprocessing.forkserver.ensure_running()


def run_child(target, *args, timeout: float = 60.0) -> int:
    """Run ``target(*args)`` in a child process and return its exit code (-9: killed)."""
    proc = context().Process(target=target, args=args)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"child {target.__name__}{args} did not finish in {timeout} s")
    return proc.exitcode


def report(out: str | os.PathLike, **data) -> None:
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, out)


def outcome(call) -> dict:
    """``{"ok": True, ...}``, or the package error a call raised (any other exception propagates)."""
    try:
        return {"ok": True, "value": call()}
    except sa.SpectralAnalyzerError as exc:
        return {"ok": False, "error": type(exc).__name__, "message": str(exc)}


# -- breaking the store's writes --------------------------------------------------


class _Writes:
    """The count of the store's writes in this process, and what to do at one of them."""

    def __init__(self, kill_at: int | None, torn: bool, enospc_after: int | None):
        self.kill_at, self.torn, self.enospc_after = kill_at, torn, enospc_after
        self.count = 0
        self.keys: list[str] = []
        self.guard = threading.Lock()

    def next(self, key: str) -> int:
        with self.guard:
            self.count += 1
            self.keys.append(key)
            return self.count

    def full(self, n: int) -> bool:
        return self.enospc_after is not None and n > self.enospc_after


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached: SIGKILL cannot be caught


def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextmanager
def broken_writes(kill_at: int | None = None, torn: bool = False, enospc_after: int | None = None):
    """Count the store's writes; SIGKILL this process at write *kill_at*, or fail every write after *enospc_after*.

    *torn*: die half-way through write *kill_at*: a chunk or metadata write
    leaves its temporary file with half of the bytes, a deletion removes the
    folder's own ``zarr.json`` and nothing else. A full disk (*enospc_after*)
    also refuses the writer lock's record of its holder.
    """
    writes = _Writes(kill_at, torn, enospc_after)
    put, delete, delete_dir, pwrite = zarr_local._put, zarr.storage.LocalStore.delete, \
        zarr.storage.LocalStore.delete_dir, os.pwrite
    put_chunk, remove_chunk = store_chunks.put_file, store_chunks.remove_file  # chunk files written directly

    def broken_put(path, value, exclusive=False):
        n = writes.next(f"put {path}")
        if writes.full(n):
            raise _no_space(path)
        if n == writes.kill_at:
            if writes.torn:
                raw = bytes(value.as_buffer_like())
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(f".{uuid.uuid4().hex}.partial").write_bytes(raw[: len(raw) // 2])
            _die()
        return put(path, value, exclusive=exclusive)

    def broken_put_chunk(path, buffers):
        n = writes.next(f"put {path}")
        if writes.full(n):
            raise _no_space(path)
        if n == writes.kill_at:
            if writes.torn:
                raw = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Path(f"{path}.{uuid.uuid4().hex}.partial").write_bytes(raw[: len(raw) // 2])
            _die()
        return put_chunk(path, buffers)

    def broken_remove_chunk(path):
        if writes.next(f"delete {path}") == writes.kill_at:
            _die()
        return remove_chunk(path)

    async def broken_delete(self, key):
        if writes.next(f"delete {key}") == writes.kill_at:
            _die()
        return await delete(self, key)

    async def broken_delete_dir(self, prefix):
        if writes.next(f"delete_dir {prefix}") == writes.kill_at:
            if writes.torn:
                Path(self.root, prefix, "zarr.json").unlink(missing_ok=True)
            _die()
        return await delete_dir(self, prefix)

    def broken_pwrite(fd, data, offset):
        if writes.enospc_after is not None and writes.count >= writes.enospc_after:
            raise _no_space(f"fd {fd}")
        return pwrite(fd, data, offset)

    zarr_local._put = broken_put
    store_chunks.put_file, store_chunks.remove_file = broken_put_chunk, broken_remove_chunk
    zarr.storage.LocalStore.delete = broken_delete
    zarr.storage.LocalStore.delete_dir = broken_delete_dir
    os.pwrite = broken_pwrite
    try:
        yield writes
    finally:
        zarr_local._put = put
        store_chunks.put_file, store_chunks.remove_file = put_chunk, remove_chunk
        zarr.storage.LocalStore.delete = delete
        zarr.storage.LocalStore.delete_dir = delete_dir
        os.pwrite = pwrite


def count_writes(call) -> list[str]:
    """The store's writes made by ``call()``, in order."""
    with broken_writes() as writes:
        call()
    return writes.keys


# -- children ---------------------------------------------------------------------


def spectra_child(path: str, windows: list[int], kill_at: int | None, torn: bool) -> None:
    """``open_run(path).spectra(window=w)`` for each w; killed at write *kill_at*."""
    with broken_writes(kill_at, torn):
        for w in windows:
            sa.open_run(path).spectra(window=w)


def ingest_child(src: str, store: str, chunk_size: int, kill_at: int | None, torn: bool,
                 weights: str | None = None) -> None:
    """``ingest(src, store)`` (recording the singular values of *weights*); killed at write *kill_at*."""
    with broken_writes(kill_at, torn):
        sa.ingest(src, store, chunk_size=chunk_size, **({"weights": weights} if weights else {}))


def hub_ingest_child(endpoint: str, src: str, store: str, revisions: str, chunk_size: int,
                     kill_at: int | None) -> None:
    """``ingest(src, store, revisions=revisions)`` from the loopback hub at *endpoint*; killed at write *kill_at*.

    The endpoint is set here: the fork server's environment is the one it started with.
    """
    from huggingface_hub import constants

    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    with broken_writes(kill_at), warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.DuplicateCheckpointWarning)
        sa.ingest(src, store, revisions=revisions, chunk_size=chunk_size)


def _holding(started, release):
    """Store.commit_rows that, at its first call (the writer lock held), sets *started* and waits for *release*."""
    commit_rows = Store.commit_rows

    def held(self, *args, **kwargs):
        if not started.is_set():
            started.set()
            release.wait(60)
        return commit_rows(self, *args, **kwargs)

    return held


def _signal_waiting(waiting) -> None:
    """Make the writer lock set *waiting* when it first has to wait for another writer (its first poll)."""
    from spectral_analyzer.store import lock

    real = lock.time

    class Clock:
        monotonic, time = staticmethod(real.monotonic), staticmethod(real.time)

        @staticmethod
        def sleep(seconds):
            waiting.set()
            real.sleep(seconds)

    lock.time = Clock


def ingest_reporting(src: str, store: str, out: str, wait: bool, started=None, release=None, waiting=None) -> None:
    """``ingest(src, store, wait=wait)``, its outcome reported.

    With *started* and *release*: once it holds the writer lock and has
    written its first row, it sets *started* and waits for *release*. With
    *waiting*: set when it finds the store locked and waits.
    """
    if started is not None:
        Store.commit_rows = _holding(started, release)
    if waiting is not None:
        _signal_waiting(waiting)
    result = outcome(lambda: sa.ingest(src, store, wait=wait).n_deltas)
    report(out, **result)


def cli_child(args: list[str], out: str, waiting=None) -> None:
    """The command line ``spectral-analyze ARGS`` in this process, stdout and stderr into files beside *out*.

    With *waiting*: set when it finds the store locked and waits.
    """
    from spectral_analyzer.cli import main

    if waiting is not None:
        _signal_waiting(waiting)

    with open(f"{out}.stdout", "w") as so, open(f"{out}.stderr", "w") as se:
        os.dup2(so.fileno(), 1)
        os.dup2(se.fileno(), 2)
    main(args, prog_name="spectral-analyze")


def reader_loop(path: str, window: int, out_dir: str, stop, seen) -> None:
    """A notebook: ``open_run(path).spectra(window=...)`` over and over until *stop*, then once more.

    Every result is saved with the commit it was computed from (n_deltas and
    the chain c_n), for the test to recompute from the deltas of that commit;
    *seen* holds the largest n_deltas read so far.
    """
    i = 0
    while True:
        last = stop.is_set()
        if Store.exists(path):
            run = sa.open_run(path)
            if run.n_deltas >= window:
                ds = run.spectra(window=window)
                np.savez(Path(out_dir, f"{os.getpid()}-{i:04d}.npz"), n=run.n_deltas, identity=run.store.identity,
                         sigma=ds.sigma.values, k_star=ds.k_star.values, step=ds.step.values)
                i += 1
                seen.value = max(seen.value, run.n_deltas)
        if last:
            return


def wait_for(counter, target: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while counter.value < target and time.monotonic() < deadline:
        time.sleep(0.005)


def append_loop(files: list[str], src: str, store: str, window: int, readers: list, out: str) -> None:
    """Checkpoints arriving one by one: each copied into *src* and ingested (waiting for the lock).

    Once there are *window* deltas, each ingest waits until every reader
    (*readers*: the largest n_deltas each has read) has read the commit
    before it, so each reader sees every commit; it reads on meanwhile.
    """
    for i, f in enumerate(files):
        shutil.copy2(f, src)
        if i >= 2:  # the store then holds i - 1 deltas, and gets the i-th
            if i - 1 >= window:
                for seen in readers:
                    wait_for(seen, i - 1)
            sa.ingest(src, store, wait=True)
    report(out, ok=True)


def toy_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def train_and_record(path: str, steps: int, wait: bool = True, seen=None) -> None:
    """A training loop with a Recorder: a seeded random walk of the weights, a loss logged at every step.

    With *seen* (the largest n_deltas a reader has read), each even step
    past WINDOW waits until the reader has read the commit before it.
    """
    model = toy_model(0)
    gen = torch.Generator().manual_seed(1)
    rec = sa.Recorder(path, model, wait=wait)
    for s in range(steps):
        if s:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.01 * (1 + s % 3))
        if seen is not None and s > WINDOW and s % 2 == 0:  # the store holds s - 1 deltas
            wait_for(seen, s - 1)
        rec.step(s, loss=1.0 / (1 + s))


def record_reporting(path: str, steps: int, wait: bool, out: str, seen=None) -> None:
    result = outcome(lambda: train_and_record(path, steps, wait, seen))
    report(out, **result)


def hold_lock_while_caching(path: str, started, release, longest: float) -> None:
    """``spectra`` whose band cache write (a large band) holds the writer lock until *release* (*longest* s at most)."""
    from spectral_analyzer.store import caches

    write = caches.BandCache.write

    def slow(self, *args, **kwargs):
        started.set()
        release.wait(longest)
        return write(self, *args, **kwargs)

    caches.BandCache.write = slow
    sa.open_run(path).spectra(window=WINDOW)


def replace_metrics(src: str, store: str, metrics: str, out: str) -> None:
    """``ingest`` of no new checkpoint with new metrics: only the logged series change."""
    report(out, **outcome(lambda: sa.ingest(src, store, metrics=metrics).n_deltas))


def rewrite_rows_and_cache(path: str, resume_at: int, steps: int, seed: int, ready, go) -> None:
    """Training resumed at *resume_at* along another trajectory (the later rows rewritten), then ``spectra``.

    Waits for *go* first; sets *ready* once the band cache of the new rows is written.
    """
    go.wait(30)
    model = toy_model(0)  # the weights train_and_record reached at resume_at: the checkpoint resumed from
    gen = torch.Generator().manual_seed(1)
    for s in range(1, resume_at + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01 * (1 + s % 3))
    rec = sa.Recorder(path, model, wait=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.RecordingWarning)
        rec.resume(resume_at)
    other = torch.Generator().manual_seed(seed)
    for s in range(resume_at + 1, steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=other) * 0.01)
        rec.step(s)
    sa.open_run(path).spectra(window=WINDOW)
    ready.set()


# -- what a store holds -----------------------------------------------------------


def contents(path: Path) -> dict:
    """Everything the numbers and later writes depend on: root attributes and the committed rows of every array.

    ``last_theta`` contributes its committed slot; ``metrics`` its series; the weight record its committed
    rows.
    """
    store = Store.open(path)
    n = store.n_deltas
    out = {"attrs": json.dumps(store.attrs, sort_keys=True)}
    for name in ("deltas", "step", "chunk_crc"):
        out[name] = np.asarray(store.array(name)[:n])
    out["base"] = np.asarray(store.array("base")[:])
    if store.commit_record is not None:
        out["last_theta"] = store.read_last_theta(0, store.n_params)
    if store.weights.info() is not None:  # the record of the committed checkpoints, with their generations
        group = store.group["weights"]
        out["weights sigma"] = np.asarray(group["sigma"][: n + 1])
        out["weights chain"] = np.asarray(group["chain"][: n + 1])
    steps, series = store.read_metrics()
    out["metric_steps"] = steps
    for key, values in series.items():
        out[f"metric {key}"] = values
    return out


def assert_same_contents(got: dict, want: dict, what: str = "") -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        if key == "attrs":
            g, w = json.loads(got[key]), json.loads(want[key])
            diff = {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
            assert not diff, f"{what}: root attributes differ: {str(diff)[:400]}"
        else:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{what}: {key}")


def dense_sigma(deltas: np.ndarray, window: int) -> np.ndarray:
    """sigma of every window from a float64 SVD of the explicit delta rows."""
    d = np.asarray(deltas, dtype=np.float64)
    return np.stack([np.linalg.svd(d[i - window + 1 : i + 1], compute_uv=False) for i in range(window - 1, len(d))])


def assert_spectra_match_rows(sigma: np.ndarray, k_star: np.ndarray, deltas: np.ndarray, window: int,
                              what: str = "") -> None:
    """Spectra equal a float64 dense SVD of *deltas* (1e-9 relative), and k* its argmax ratio."""
    dense = dense_sigma(deltas, window)
    np.testing.assert_allclose(sigma, dense, rtol=1e-9, atol=1e-12 * dense.max(), err_msg=what)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = dense[:, :-1] / dense[:, 1:]
    np.testing.assert_array_equal(k_star, np.argmax(ratio, axis=1) + 1, err_msg=what)


def assert_identical(a: xr.Dataset, b: xr.Dataset, what: str = "") -> None:
    try:
        xr.testing.assert_identical(a, b)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


# -- a real, small filesystem -------------------------------------------------------

_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000


def mount_small_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of *size* at *where*, seen by this process only; None, or why it cannot be done here.

    A new mount namespace (inside a new user namespace when not root), so
    nothing changes outside this process and the mount goes with it.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWNS | (0 if uid == 0 else _CLONE_NEWUSER)) != 0:
        return f"unshare: {os.strerror(ctypes.get_errno())}"
    if uid != 0:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return f"mount --make-rprivate /: {os.strerror(ctypes.get_errno())}"
    where.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"tmpfs", str(where).encode(), b"tmpfs", 0, f"size={size}".encode()) != 0:
        return f"mount tmpfs: {os.strerror(ctypes.get_errno())}"
    return None


def fill(folder: Path, leave: int) -> Path:
    """A file that takes all the free space of *folder*'s filesystem but *leave* bytes."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        block = b"\0" * 65536
        try:
            while f.write(block):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        size = f.tell()
    os.truncate(filler, max(0, size - leave))
    return filler


def on_a_full_tmpfs(mnt: str, first: str, all_: str, chunk_size: int, new_ref: str, appended_ref: str,
                    out: str) -> None:
    """Ingest, append and cache on a tmpfs filled up but for a few pages; each then run again with space.

    Reports ``{"skip": why}`` where a tmpfs cannot be mounted, ``{"failure":
    ...}`` where a check failed, else what each full attempt raised or warned.
    """
    why = mount_small_tmpfs(Path(mnt), "2m")
    if why is not None:
        report(out, skip=why)
        return
    try:
        report(out, steps=_full_tmpfs_steps(Path(mnt), first, all_, chunk_size, Path(new_ref), Path(appended_ref)))
    except Exception as exc:  # noqa: BLE001 -- reported to the test, which fails with it
        report(out, failure=f"{type(exc).__name__}: {exc}")


def _full_tmpfs_steps(root: Path, first: str, all_: str, chunk_size: int, new_ref: Path, appended_ref: Path):
    steps = []

    def full_attempt(what: str, call, leave: int) -> dict:
        filler = fill(root, leave)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = outcome(call)
        filler.unlink()
        result.update(what=what, warnings=[f"{w.category.__name__}: {w.message}" for w in caught])
        steps.append(result)
        return result

    for leave in (0, 65536):  # a new store
        store = root / f"new-{leave}.zarr"
        result = full_attempt(f"ingest, {leave} bytes free",
                              lambda: sa.ingest(first, store, chunk_size=chunk_size).n_deltas, leave)
        result["left"] = sorted(os.listdir(store)) if store.exists() else None
        sa.ingest(first, store, chunk_size=chunk_size)
        assert_same_contents(contents(store), contents(new_ref), f"ingest again after {leave} bytes free")
    expected = sa.open_run(shutil.copytree(appended_ref, root.parent / "expected.zarr")).spectra(window=WINDOW)
    for leave in (16384,):  # an append, then the band and result caches (no space at all: as for a new store)
        store = root / f"append-{leave}.zarr"
        sa.ingest(first, store, chunk_size=chunk_size)
        before = contents(store)
        full_attempt(f"append, {leave} bytes free", lambda: sa.ingest(all_, store).n_deltas, leave)
        assert_same_contents(contents(store), before, f"append with {leave} bytes free")
        sa.ingest(all_, store)
        assert_same_contents(contents(store), contents(appended_ref), f"append again after {leave} bytes free")
        full_attempt(f"spectra, {leave} bytes free",
                     lambda: assert_identical(sa.open_run(store).spectra(window=WINDOW), expected, "full"), leave)
        assert_same_contents(contents(store), contents(appended_ref), f"spectra with {leave} bytes free")
        assert_identical(sa.open_run(store).spectra(window=WINDOW), expected, f"spectra after {leave} bytes free")
        cached = [Store.open(store).read_result(p.name) for p in (store / "results").iterdir() if p.is_dir()]
        steps[-1]["cached_after"] = any(ds is not None for ds in cached)
    return steps
