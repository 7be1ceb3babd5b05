"""The chunk files read and written directly (chunk_writes, committing, chunks, reading), adversarially.

What these attack, by experiment: a SIGKILL *inside* ``put_file`` / ``remove_file`` (the temporary
file opened, half written, complete but not renamed, renamed), errors from ``os.writev`` / ``close``
/ ``rename`` part-way through a row, readers (``weight_spectra`` and ``spectra``) while another
process appends, chunk files replaced by directories, symlinks or files of the wrong length, stale
temporary files of odd names, and spans that start or end mid-chunk in stores whose last chunk is
partial, whole or the only one. The numbers are compared with a plain float64 computation from the
checkpoint files.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import expected_deltas, flat_theta, load_state, write_run
from safetensors.torch import save_file
from adversary_procs import (
    assert_same_contents,
    assert_spectra_match_rows,
    contents,
    context,
    run_child,
    start_fork_server,
)

import spectral_analyzer as sa
import spectral_analyzer.store.chunk_writes as chunk_writes
from spectral_analyzer.cli import main
from spectral_analyzer.store import Store, chunks
from spectral_analyzer.store.crc import crc32c

C = 64  # chunk size of the stores here
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    start_fork_server()


def _checkpoints(folder: Path, n: int) -> list[Path]:
    """n checkpoints of 248 parameters in chunks of 64: chunk 2 all zeros (a frozen, zero tensor: its files
    are left absent, and remove_file is called), chunk 3 partial (56 values)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    a, z, c = torch.randn(10, 7, generator=g), torch.zeros(128), torch.randn(50, generator=g)
    paths = []
    for i in range(n):
        if i:
            a = a + 0.1 * torch.randn(10, 7, generator=g)
            c = c + 0.1 * torch.randn(50, generator=g)
        path = folder / f"step_{10 * i}.safetensors"
        save_file({"a.w": a, "b.zero": z, "c.w": c}, str(path))
        paths.append(path)
    return paths


def _files(path: Path) -> dict[str, bytes]:
    """Every file of a store but the lock file, by content."""
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != ".lock"}


def _assert_same_files(got: Path, want: Path, what: str) -> None:
    a, b = _files(got), _files(want)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    assert not differ, f"{what}: files differ: {differ[:8]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    files = _checkpoints(root / "all", 5)
    (root / "first").mkdir()
    for f in files[:3]:
        shutil.copy2(f, root / "first")
    new_ref = root / "new.zarr"
    sa.ingest(root / "all", new_ref, chunk_size=C)
    first = root / "first.zarr"
    sa.ingest(root / "first", first, chunk_size=C)
    appended = root / "appended.zarr"
    shutil.copytree(first, appended)
    sa.ingest(root / "all", appended)
    return root, files, new_ref, first, appended


# -- a SIGKILL inside the direct write path ---------------------------------------------------------


class _OsProxy:
    """chunk_writes' ``os``, with a hook before and after ``replace`` and ``unlink``."""

    def __init__(self, hook):
        self._hook = hook

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, a, b):
        self._hook("before_replace")
        os.replace(a, b)
        self._hook("after_replace")

    def unlink(self, p):
        self._hook("before_unlink")
        os.unlink(p)
        self._hook("after_unlink")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def ingest_dying_in_put_file(src: str, store: str, n: int, where: str) -> None:
    """``ingest``, SIGKILLed at the n-th ``put_file`` (or ``remove_file`` for "before_unlink") at *where*:
    "opened" (the temporary file created, empty), "half" (half of it written), "written" (all of it, not
    renamed), "before_replace", "after_replace" (renamed over the chunk), "before_unlink"."""
    counts = {"put": 0, "remove": 0}
    lock, state = threading.Lock(), threading.local()
    put, remove, write_all = chunk_writes.put_file, chunk_writes.remove_file, chunk_writes._write_all
    kind = "remove" if where == "before_unlink" else "put"

    def hook(point):
        if getattr(state, "hit", False) and point == where:
            _die()

    def counted(fn, name):
        def wrapper(*args):
            with lock:
                counts[name] += 1
                state.hit = name == kind and counts[name] == n
            try:
                return fn(*args)
            finally:
                state.hit = False
        return wrapper

    def writing(fd, views):
        if getattr(state, "hit", False) and where == "opened":
            _die()
        if getattr(state, "hit", False) and where == "half":
            os.write(fd, views[0][: views[0].nbytes // 2])
            _die()
        write_all(fd, views)
        hook("written")

    chunk_writes.put_file, chunk_writes.remove_file = counted(put, "put"), counted(remove, "remove")
    chunk_writes._write_all = writing
    chunk_writes.os = _OsProxy(hook)
    sa.ingest(src, store, chunk_size=C)
    os._exit(3)  # never killed: the point was not reached


# new store of 5 checkpoints: 21 chunk files written (base 3, last_theta 3 + 3, 4 rows of 3), 7 removed;
# an append of 2: 9 written, 3 removed
KILLS = [("new store", 2, "written"), ("new store", 5, "half"), ("new store", 9, "opened"),
         ("new store", 13, "after_replace"), ("new store", 4, "before_unlink"),
         ("append", 2, "before_replace"), ("append", 6, "written"), ("append", 8, "after_replace")]


@pytest.mark.parametrize("scenario, n, where", KILLS)
def test_killed_inside_a_chunk_write_then_rerun_is_bit_identical(runs, tmp_path, scenario, n, where):
    root, _, new_ref, first, appended = runs
    reference = new_ref if scenario == "new store" else appended
    path = tmp_path / "r.zarr"
    if scenario == "append":
        shutil.copytree(first, path)
    what = f"{scenario}: killed at put/remove {n}, {where}"
    assert run_child(ingest_dying_in_put_file, str(root / "all"), str(path), n, where) == KILLED, what
    if where in ("opened", "half", "written", "before_replace"):
        assert list(path.rglob("*.partial")), f"{what}: no temporary file left: the point was not exercised"
    want = contents(reference)
    if Store.exists(path):  # a reader sees committed rows only, and the right ones
        run = sa.open_run(path)
        if run.n_deltas:
            np.testing.assert_array_equal(run.deltas.values, want["deltas"][: run.n_deltas], err_msg=what)
    sa.ingest(root / "all", path, chunk_size=C)
    assert_same_contents(contents(path), want, what)
    _assert_same_files(path, reference, what)  # no temporary file, no stale chunk: the same bytes


# -- full disk and I/O errors inside the direct write path ----------------------------------------------


class _FailingOs:
    """chunk_writes' ``os`` whose n-th writev / close / replace fails (ENOSPC: that one and every later one;
    EIO: that one only); a failing writev first writes half of its first buffer."""

    def __init__(self, where: str, n: int, err: int):
        self.where, self.n, self.err, self.count = where, n, err, 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(os, name)

    def _fails(self, where: str) -> bool:
        if where != self.where:
            return False
        with self.lock:
            self.count += 1
            return self.count == self.n or (self.err == errno.ENOSPC and self.count > self.n)

    def _error(self, *args) -> OSError:
        return OSError(self.err, os.strerror(self.err), *args)

    def writev(self, fd, views):
        if self._fails("writev"):
            os.write(fd, views[0][: views[0].nbytes // 2])
            raise self._error()
        return os.writev(fd, views)

    def close(self, fd):
        os.close(fd)
        if self._fails("close"):
            raise self._error()

    def replace(self, a, b):
        if self._fails("replace"):
            raise self._error(a)
        os.replace(a, b)


@pytest.mark.parametrize("scenario", ["new store", "append"])
@pytest.mark.parametrize("where, err", [("writev", errno.ENOSPC), ("close", errno.EIO), ("replace", errno.EIO),
                                        ("writev", errno.EIO)])
def test_io_error_inside_a_chunk_write(runs, tmp_path, monkeypatch, scenario, where, err):
    """The error mid-row: a one-line StoreError naming the store, committed rows as they were, no temporary
    file; the same ingest run again ends with the same files as an uninterrupted one."""
    root, _, new_ref, first, appended = runs
    reference = new_ref if scenario == "new store" else appended
    path = tmp_path / "r.zarr"
    before = None
    if scenario == "append":
        shutil.copytree(first, path)
        before = contents(path)
    failing = _FailingOs(where, 5, err)  # the 5th: in the middle of a delta row
    monkeypatch.setattr(chunk_writes, "os", failing)
    with pytest.raises(sa.StoreError) as caught:
        sa.ingest(root / "all", path, chunk_size=C)
    monkeypatch.undo()
    assert failing.count >= 5
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and os.strerror(err) in message, message
    assert not (list(path.rglob("*.partial")) if path.exists() else []), "a temporary file was left"
    if before is not None:
        assert_same_contents(contents(path), before, message)
    else:
        assert not path.exists() or os.listdir(path) in ([], [".lock"]), os.listdir(path)
    sa.ingest(root / "all", path, chunk_size=C)
    assert_same_contents(contents(path), contents(reference))
    _assert_same_files(path, reference, f"{scenario}, {where} {errno.errorcode[err]}")


# -- readers while another process appends -----------------------------------------------------------


def append_one_by_one(files: list[str], src: str, store: str, seen, out: str) -> None:
    """Checkpoints copied into *src* one at a time, each ingested (chunks of C); from the third commit on,
    each ingest waits until the reader has read the commit before it."""
    for i, f in enumerate(files):
        shutil.copy2(f, src)
        if i >= 2:
            if i >= 3:
                deadline = time.monotonic() + 30
                while seen.value < i - 1 and time.monotonic() < deadline:
                    time.sleep(0.005)
            sa.ingest(src, store, chunk_size=C, wait=True)
    Path(out).write_text("ok")


def _expected_weights(files: list[Path], n: int, run) -> dict[str, np.ndarray]:
    """float64 singular values of every 2-D tensor at checkpoints 0..n: theta_0 as stored (float32), plus the
    float32 deltas of the checkpoint files summed in float64."""
    theta0 = torch.cat(flat_theta(load_state([files[0]]))).numpy().astype(np.float64)
    deltas = expected_deltas([[f] for f in files[: n + 1]]).astype(np.float64)
    thetas = np.vstack([theta0, theta0 + np.cumsum(deltas, axis=0)])
    out = {}
    for t in run.store.manifest:
        if len(t.shape) == 2:
            out[t.name] = np.stack([np.linalg.svd(th[t.offset : t.offset + t.size].reshape(t.shape), compute_uv=False)
                                    for th in thetas])
    return out


def test_readers_while_appending_give_the_numbers_of_their_snapshot(tmp_path):
    files = write_run(tmp_path / "all", 8, {"a.weight": (12, 9), "b.bias": (20,), "c.weight": (7, 10)}, seed=5,
                      scale=0.3)
    src, store = tmp_path / "src", tmp_path / "r.zarr"
    src.mkdir()
    ctx = context()
    seen = ctx.Value("i", 0)
    writer = ctx.Process(target=append_one_by_one, args=([str(f) for f in files], str(src), str(store), seen,
                                                          str(tmp_path / "done")))
    writer.start()
    reads = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        last = not writer.is_alive()
        if Store.exists(store):
            run = sa.open_run(store)
            n = run.n_deltas
            if n >= 2:
                w = run.weight_spectra(cache=False)
                s = run.spectra(window=2, cache=False)
                reads.append((n, w, s))
                seen.value = max(seen.value, n)
        if last:
            break
    writer.join(30)
    assert writer.exitcode == 0 and (tmp_path / "done").exists()
    assert {n for n, _, _ in reads} >= set(range(2, len(files)))  # every commit was read
    deltas = expected_deltas([[f] for f in files])
    for n, w, s in reads:
        steps = [10 * i for i in range(n + 1)]
        assert list(w.step.values) == steps
        run = sa.open_run(store)
        want = _expected_weights(files, n, run)
        for m, name in enumerate(w.matrix.values):
            k = want[name].shape[1]
            got = w.sigma.values[:, m, :k]
            np.testing.assert_allclose(got, want[name], rtol=1e-9, atol=1e-12, err_msg=f"{name} at n={n}")
        assert_spectra_match_rows(s.sigma.values, s.k_star.values, deltas[:n], 2, f"spectra at n={n}")


# -- damaged chunk files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """6 checkpoints, 1,270 parameters in chunks of 300 (the last one partial, 70 values)."""
    root = tmp_path_factory.mktemp("small")
    write_run(root / "ckpts", 6, {"a.weight": (40, 24), "b.bias": (40,), "c.weight": (30, 10)}, seed=4, scale=0.2)
    path = root / "r.zarr"
    sa.ingest(root / "ckpts", path, chunk_size=300)
    return path


def _victim(path: Path, array: str, j: int) -> tuple[Path, str]:
    """The chunk file to damage and the words an error about it must hold."""
    if array == "deltas":
        return path / "deltas" / "c" / "2" / str(j), f"chunk 2/{j} of deltas"
    if array == "base":
        return path / "base" / "c" / str(j), f"chunk {j} of 'base'"
    slot = Store.open(path).commit_record["last_slot"]
    return path / "last_theta" / "c" / str(slot) / str(j), f"chunk {j} of 'last_theta'"


def _reads(store: Store, array: str):
    """Reads meeting the damaged chunk: whole, into a buffer, from mid-chunk, and a span past it."""
    p = store.n_params
    if array == "deltas":
        return [lambda: store.read_delta_row(2, 0, p), lambda: store.read_delta_row(2, 0, p, np.empty(p, np.float32)),
                lambda: store.read_delta_row(2, 250, p), lambda: store.read_delta_row(2, 305, 320),
                lambda: store.read_delta_row(2, 1210, 1270, np.full(60, np.nan, np.float32))]
    if array == "base":
        return [lambda: store.read_base(0, p), lambda: store.read_base(0, p, np.empty(p, np.float32)),
                lambda: store.read_base(305, 320), lambda: store.read_base(1210, 1270)]
    return [lambda: store.read_last_theta(0, p), lambda: store.read_last_theta(305, 1270)]


def _damage(victim: Path, kind: str, other: Path) -> None:
    raw = victim.read_bytes()
    if kind == "directory":
        victim.unlink()
        victim.mkdir()
        (victim / "0").write_bytes(raw)
    elif kind == "symlink loop":
        victim.unlink()
        os.symlink(victim.name, victim)
    elif kind == "dangling symlink":
        victim.unlink()
        os.symlink("nowhere", victim)
    elif kind == "symlink to another chunk":
        victim.unlink()
        os.symlink(other, victim)
    elif kind == "symlink to /dev/zero":
        victim.unlink()
        os.symlink("/dev/zero", victim)
    elif kind == "short":
        victim.write_bytes(raw[:-4])
    elif kind == "empty":
        victim.write_bytes(b"")
    elif kind == "longer":
        victim.write_bytes(raw + b"\0" * 8)


def _error_or_right(store: Store, pristine: Store, array: str, names: str, what: str) -> list[str]:
    """Each read gives a one-line StoreError naming the chunk, or the pristine store's values."""
    outcomes = []
    for read, good in zip(_reads(store, array), _reads(pristine, array)):
        try:
            got = read()
        except sa.StoreError as exc:
            assert "\n" not in str(exc) and names in str(exc) and str(store.path) in str(exc), f"{what}: {exc}"
            outcomes.append("error")
            continue
        np.testing.assert_array_equal(got.view(np.uint32), good().view(np.uint32), err_msg=what)
        outcomes.append("right")
    return outcomes


HELD = ["dangling symlink", "symlink to another chunk", "symlink to /dev/zero", "short", "empty", "longer"]


@pytest.mark.parametrize("array, j", [("deltas", 1), ("base", 4), ("last_theta", 1)])  # a middle or the last chunk
@pytest.mark.parametrize("kind", HELD)
def test_damaged_chunk_file_is_an_error_naming_it_or_the_right_numbers(small, tmp_path, array, j, kind):
    path = tmp_path / "r.zarr"
    shutil.copytree(small, path, symlinks=True)
    victim, names = _victim(path, array, j)
    _damage(victim, kind, victim.parent / ("0" if j else "1"))
    outcomes = _error_or_right(Store.open(path), Store.open(small), array, names, f"{kind} {array} {j}")
    assert "error" in outcomes


# A chunk file replaced by a directory (read as an absent chunk, as Zarr reads it) or by a symlink that loops
# (unreadable): a one-line error naming the chunk from read_delta_row, read_base and read_last_theta, never a
# bare IsADirectoryError / OSError(ELOOP) naming nothing.
@pytest.mark.parametrize("array", ["deltas", "base", "last_theta"])
@pytest.mark.parametrize("kind", ["directory", "symlink loop"])
def test_damaged_chunk_file_that_cannot_be_read_is_an_error_naming_it(small, tmp_path, array, kind):
    path = tmp_path / "r.zarr"
    shutil.copytree(small, path, symlinks=True)
    victim, names = _victim(path, array, 1)
    _damage(victim, kind, victim)
    outcomes = _error_or_right(Store.open(path), Store.open(small), array, names, f"{kind} {array}")
    assert outcomes[0] == "error" and outcomes.count("error") >= len(outcomes) - 1  # but a span past the chunk


# The command line names a delta chunk that is a directory (not "Error: Is a directory").
def test_weights_on_the_command_line_name_an_unreadable_chunk(small, tmp_path):
    path = tmp_path / "r.zarr"
    shutil.copytree(small, path)
    victim, _ = _victim(path, "deltas", 1)
    _damage(victim, "directory", victim)
    result = CliRunner().invoke(main, ["weights", str(path)])
    assert result.exit_code == 1
    assert "chunk 2/1 of deltas" in result.stderr or str(victim) in result.stderr, result.stderr


# A chunk file longer than a chunk and its trailer is damage for the buffered read as for the uncached one
# (and Zarr's crc32c codec, which takes the file's last 4 bytes): one store, one verdict, whichever reads it.
def test_a_longer_chunk_file_is_refused_by_the_buffered_read_too(tmp_path):
    values = np.random.default_rng(0).standard_normal(C).astype(np.float32)
    (tmp_path / "c" / "0").mkdir(parents=True)
    (tmp_path / "c" / "0" / "0").write_bytes(values.tobytes() + crc32c(values).to_bytes(4, "little") + b"\0" * 8)
    with pytest.raises(chunks._Corrupt):
        chunks.DirectChunks(str(tmp_path / "c"), C).read(0, 0, np.empty(C, np.float32))


# -- stale temporary files of odd names ---------------------------------------------------------------


ODD = ["deltas/c/0/1.partial", "deltas/c/1/.0.partial", "deltas/c/0/0.abc.def.partial", "deltas/c/9.partial",
       "base/c/2.partial", "base/c/x.partial/0.1a.partial", "last_theta/c/0/3.1a2b.partial",
       "last_theta/c/1/.partial"]


def test_stale_temporary_files_of_odd_names(runs, tmp_path):
    """Reads ignore them; the next writer removes every temporary file and ends with the same contents."""
    root, _, _, first, appended = runs
    path = tmp_path / "r.zarr"
    shutil.copytree(first, path)
    for name in ODD:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"\x7f" * (4 * C + 4))  # a chunk's length, not a chunk
    want = contents(first)
    assert_same_contents(contents(path), want)
    run = sa.open_run(path)
    np.testing.assert_array_equal(run.deltas.values, want["deltas"])
    assert Store.open(path).size_on_disk() > 0
    sa.ingest(root / "all", path)
    assert not [f for f in path.rglob("*.partial") if f.is_file()]
    assert_same_contents(contents(path), contents(appended))


# An entry of deltas/c whose name str.isdigit() accepts but int() does not (a superscript "²") does not stop
# the next writer (clean_uncommitted) with a bare ValueError.
def test_an_odd_name_in_the_deltas_folder_does_not_stop_the_next_writer(runs, tmp_path):
    root, _, _, first, appended = runs
    path = tmp_path / "r.zarr"
    shutil.copytree(first, path)
    (path / "deltas" / "c" / "\u00b2").write_bytes(b"junk")
    sa.ingest(root / "all", path)
    assert_same_contents(contents(path), contents(appended))


# -- spans against the checkpoint files ----------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 50, 64, 128, 199])
def test_spans_equal_the_checkpoint_files(tmp_path, p):
    """Delta rows, base and last_theta over random spans, into a buffer (inside a larger one) or not, equal
    the float32 values computed from the checkpoint files, for a store of one partial chunk, whole chunks
    only, or a partial last one; half of the parameters never change (absent chunks)."""
    g = torch.Generator().manual_seed(p)
    sizes = {"a": (max(1, p // 2),)} | ({"frozen": (p - p // 2,)} if p > 1 else {})
    state = {k: torch.randn(s, generator=g) for k, s in sizes.items()}
    files = []
    (tmp_path / "ck").mkdir()
    for i in range(4):
        if i:
            state = {k: v if k == "frozen" else v + 0.3 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        f = tmp_path / "ck" / f"step_{i}.safetensors"
        save_file(state, str(f))
        files.append([f])
    sa.ingest(tmp_path / "ck", tmp_path / "r.zarr", chunk_size=C)
    st = Store.open(tmp_path / "r.zarr")
    deltas = expected_deltas(files)
    base, last = (torch.cat(flat_theta(load_state(f))).numpy() for f in (files[0], files[-1]))
    rng = np.random.default_rng(p)
    spans = [(0, p), (0, 0), (p, p)] + [tuple(sorted(rng.integers(0, p + 1, 2))) for _ in range(40)]
    for a, b in spans:
        a, b = int(a), int(b)
        for row in range(st.n_deltas):
            buf = np.full(b - a + 3, np.nan, dtype=np.float32)
            got = st.read_delta_row(row, a, b, buf[1 : 1 + b - a])
            np.testing.assert_array_equal(got.view(np.uint32), deltas[row, a:b].view(np.uint32))
            assert np.isnan(buf[0]) and np.isnan(buf[-2:]).all()  # nothing written outside the span
            np.testing.assert_array_equal(st.read_delta_row(row, a, b), deltas[row, a:b])
        out = np.full(b - a, np.nan, dtype=np.float32)
        np.testing.assert_array_equal(st.read_base(a, b, out), base[a:b])
        np.testing.assert_array_equal(st.read_last_theta(a, b), last[a:b])
