"""Writers and readers in separate processes on one store, at the same time.

Every number a reader gets equals a float64 dense SVD of the deltas of the
commit it opened; a second writer is refused in one line or waits; the
store writers leave equals a clean ingest bit for bit. The children start
from a fork server (adversary_procs), so each is a real process with its own
locks and file descriptors; events and shared counters, never sleeps,
order them where a test needs an order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, write_run
from safetensors.torch import load_file, save_file
from adversary_procs import (
    WINDOW,
    append_loop,
    assert_same_contents,
    assert_spectra_match_rows,
    cli_child,
    contents,
    context,
    hold_lock_while_caching,
    ingest_reporting,
    reader_loop,
    record_reporting,
    replace_metrics,
    rewrite_rows_and_cache,
    spectra_child,
    start_fork_server,
    train_and_record,
)

import spectral_analyzer as sa
from spectral_analyzer.store import Store
from spectral_analyzer.store import caches
from spectral_analyzer.store.generations import hex_of

SIZES = {"a.w": (12, 5), "b.b": (20,)}


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    start_fork_server()  # it imports the package while the first test prepares


def _start(target, *args):
    proc = context().Process(target=target, args=args)
    proc.start()
    return proc


def _join(*procs, timeout: float = 60.0) -> None:
    for proc in procs:
        proc.join(timeout)
        assert not proc.is_alive(), f"{proc} did not finish"


def _read(out: Path) -> dict:
    return json.loads(out.read_text())


def _check_reads(reads: list[dict], final: Path, window: int) -> set[int]:
    """Each saved read equals a dense SVD of the rows of its commit (the final store's first n, same chain)."""
    store = Store.open(final)
    deltas = sa.open_run(final).deltas.values
    for r in reads:
        n = int(r["n"])
        assert hex_of(store.chain[n - 1]) == str(r["identity"]), "a commit that is not a prefix of the end"
        np.testing.assert_array_equal(r["step"], store.steps[window - 1 : n])
        assert_spectra_match_rows(r["sigma"], r["k_star"], deltas[:n], window, f"read at {n} deltas")
    return {int(r["n"]) for r in reads}


@pytest.fixture
def grokking(tmp_path) -> Path:
    """The first 8 checkpoints of the grokking run (17 tensors, 17k parameters)."""
    src = tmp_path / "wd1"
    src.mkdir()
    for f in sorted((FIXTURES / "grokking" / "wd1").glob("step_*.safetensors"))[:8]:
        shutil.copy2(f, src)
    return src


def test_a_second_ingest_of_the_same_folder_is_refused_in_one_line_or_waits(grokking, tmp_path):
    """A writes; B (the CLI) and B' (the API) are refused in one line naming A's pid; C (the CLI, --wait) waits.

    Then the store equals a clean ingest of the folder.
    """
    store = tmp_path / "r.zarr"
    ctx = context()
    started, release, waiting = ctx.Event(), ctx.Event(), ctx.Event()
    a = _start(ingest_reporting, str(grokking), str(store), str(tmp_path / "a.json"), False, started, release)
    assert started.wait(60)  # A holds the lock, one row written
    b = _start(cli_child, ["ingest", str(grokking), "-o", str(store), "--no-progress"], str(tmp_path / "b"))
    b_api = _start(ingest_reporting, str(grokking), str(store), str(tmp_path / "b_api.json"), False)
    _join(b, b_api)
    c = _start(cli_child, ["ingest", str(grokking), "-o", str(store), "--wait", "--no-progress"], str(tmp_path / "c"),
               waiting)
    assert waiting.wait(60)  # C found the store locked and waits
    release.set()
    _join(a, c)
    assert b.exitcode == 1
    err = (tmp_path / "b.stderr").read_text().splitlines()
    assert len(err) == 1 and err[0].startswith(f"Error: {store}: being written by pid {a.pid} on host "), err
    assert err[0].endswith("--wait (wait=True) to wait for it") and "Traceback" not in err[0]
    refused = _read(tmp_path / "b_api.json")
    assert refused["error"] == "StoreBusyError" and f"Error: {refused['message']}" == err[0], refused
    a_outcome = _read(tmp_path / "a.json")
    assert a_outcome["ok"] and a_outcome["value"] == 7, a_outcome
    assert c.exitcode == 0, (tmp_path / "c.stderr").read_text()
    assert (tmp_path / "c.stdout").read_text().startswith(f"{store}: 7 deltas over steps 0..280")
    reference = tmp_path / "ref.zarr"
    sa.ingest(grokking, reference)
    assert_same_contents(contents(store), contents(reference))


@pytest.mark.parametrize("first", ["clean", "nan"])
def test_two_ingests_of_different_folders_one_with_a_nan(grokking, tmp_path, first):
    """Folder A (8 clean checkpoints) and folder B (A's and 2 more, the last holding a NaN) into one store at once.

    Whichever takes the lock first, B fails with a one-line NonFiniteError
    naming the tensor and step and rolls back (its rows, or the whole store
    it created, gone), A succeeds, and the store equals A's clean ingest.
    """
    nan_src = tmp_path / "with_nan"
    shutil.copytree(grokking, nan_src)
    extra = sorted((FIXTURES / "grokking" / "wd1").glob("step_*.safetensors"))[8:10]
    shutil.copy2(extra[0], nan_src)
    state = load_file(str(extra[1]))
    state["layers.0.mlp.0.weight"][3, 4] = float("nan")
    save_file(state, str(nan_src / extra[1].name))
    store = tmp_path / "r.zarr"
    ctx = context()
    started, release, waiting = ctx.Event(), ctx.Event(), ctx.Event()
    srcs = {"clean": grokking, "nan": nan_src}
    second = "nan" if first == "clean" else "clean"
    p1 = _start(ingest_reporting, str(srcs[first]), str(store), str(tmp_path / f"{first}.json"), True, started,
                release)
    assert started.wait(60)  # the first holds the lock, one row written
    p2 = _start(ingest_reporting, str(srcs[second]), str(store), str(tmp_path / f"{second}.json"), True, None, None,
                waiting)
    assert waiting.wait(60)  # the second found the store locked and waits
    release.set()
    _join(p1, p2)
    clean, nan = _read(tmp_path / "clean.json"), _read(tmp_path / "nan.json")
    assert clean["ok"] and clean["value"] == 7, clean
    assert not nan["ok"] and nan["error"] == "NonFiniteError", nan
    assert nan["message"] == (f"tensor 'layers.0.mlp.0.weight' at step 360 ({nan_src / extra[1].name}) "
                              "holds 1 NaN/Inf values")
    reference = tmp_path / "ref.zarr"
    sa.ingest(grokking, reference)
    assert_same_contents(contents(store), contents(reference))


def test_readers_while_checkpoints_arrive(tmp_path):
    """Two notebook readers loop over spectra while checkpoints arrive and are ingested one by one.

    Each result equals a dense SVD of the commit the reader opened; each
    reader reads every commit from WINDOW deltas on (the writer waits for
    that, not for more); the store ends equal to one ingest of the folder.
    """
    files = write_run(tmp_path / "all", 9, SIZES, seed=4)
    src, store, out = tmp_path / "src", tmp_path / "r.zarr", tmp_path / "reads"
    src.mkdir()
    out.mkdir()
    ctx = context()
    stop, seen = ctx.Event(), [ctx.Value("i", 0) for _ in range(2)]
    readers = [_start(reader_loop, str(store), WINDOW, str(out), stop, r) for r in seen]
    writer = _start(append_loop, [str(f) for f in files], str(src), str(store), WINDOW, seen,
                    str(tmp_path / "w.json"))
    _join(writer)
    stop.set()
    _join(*readers)
    assert all(p.exitcode == 0 for p in (writer, *readers))
    reference = tmp_path / "ref.zarr"
    sa.ingest(src, reference)
    got, want = contents(store), contents(reference)
    for attrs in (got, want):  # one ingest or one per checkpoint: only the slot of the last checkpoint differs
        a = json.loads(attrs["attrs"])
        a["commit"].pop("last_slot")
        attrs["attrs"] = json.dumps(a)
    assert_same_contents(got, want)
    pids = {f.name.split("-")[0] for f in out.glob("*.npz")}
    assert len(pids) == 2
    for pid in pids:  # each reader read every commit from WINDOW deltas on, at least
        mine = [dict(np.load(f)) for f in sorted(out.glob(f"{pid}-*.npz"))]
        assert _check_reads(mine, store, WINDOW) == set(range(WINDOW, len(files)))


def test_two_spectra_at_once(tmp_path):
    """Two processes compute and cache the same spectra (3 windows) at once: the caches they leave are whole and right.

    The band and results they cached are compared with those of a copy of
    the store made before, where nothing was cached.
    """
    write_run(tmp_path / "src", 12, SIZES, seed=6)
    store = tmp_path / "r.zarr"
    sa.ingest(tmp_path / "src", store)
    uncached = sa.open_run(shutil.copytree(store, tmp_path / "uncached.zarr"))
    windows = [3, 4, 5]
    ctx = context()
    procs = [ctx.Process(target=spectra_child, args=(str(store), windows, None, False)) for _ in range(2)]
    for p in procs:
        p.start()
    _join(*procs)
    assert [p.exitcode for p in procs] == [0, 0]
    run = sa.open_run(store)
    deltas = run.deltas.values
    band, _ = run.store.band_cache.lookup(16)  # one of them cached it, whole
    np.testing.assert_array_equal(band, uncached.band(max_lag=16).values)
    fresh = {w: uncached.spectra(window=w, cache=False) for w in windows}
    for p in (store / "results").iterdir():  # a result refused while the other process wrote is not there
        if p.is_dir() and (ds := run.store.read_result(p.name)) is not None:
            assert any(ds.identical(f) for f in fresh.values()), p.name
    for w in windows:
        ds = run.spectra(window=w)
        assert ds.identical(fresh[w])
        assert_spectra_match_rows(ds.sigma.values, ds.k_star.values, deltas, w, f"window {w}")


def test_a_recorder_with_a_notebook_reading(tmp_path):
    """A training process records every step (wait=True) while this process, a notebook, loops over spectra.

    Every result the notebook gets equals a dense SVD of the deltas of the
    commit it opened; the store ends equal to a recording made alone.
    """
    store = tmp_path / "r.zarr"
    seen = context().Value("i", 0)
    trainer = _start(record_reporting, str(store), 13, True, str(tmp_path / "t.json"), seen)
    reads = []
    while True:
        done = not trainer.is_alive()
        if Store.exists(store):
            run = sa.open_run(store)
            if run.n_deltas >= WINDOW:
                ds = run.spectra(window=WINDOW)
                reads.append({"n": run.n_deltas, "identity": run.store.identity, "sigma": ds.sigma.values,
                              "k_star": ds.k_star.values, "step": ds.step.values})
                seen.value = max(seen.value, run.n_deltas)
        if done:
            break
    _join(trainer)
    assert _read(tmp_path / "t.json")["ok"]
    assert {5, 7, 9, 11} <= _check_reads(reads, store, WINDOW)
    alone = tmp_path / "alone.zarr"
    train_and_record(str(alone), 13)
    got, want = contents(store), contents(alone)
    got.pop("attrs"), want.pop("attrs")  # they name their own paths
    assert_same_contents(got, want)
    assert Store.open(store).identity == Store.open(alone).identity


def test_a_band_rewritten_while_it_is_read_is_not_served_to_the_older_commit(tmp_path, monkeypatch):
    """A reader of commit n, paused inside the band cache lookup, while another process rewrites the rows after 9.

    The other process is a training resumed at step 9 on another trajectory
    (Recorder.resume): the rows after 9 are replaced, the store again has
    as many rows, and their band is cached anew, with attributes equal to
    the old ones. The reader must not take the new rows' band for its own:
    it raises a StoreError (its rows are gone) or gives its own numbers.
    """
    store = tmp_path / "r.zarr"
    train_and_record(str(store), 14)
    old = sa.open_run(store)
    old.spectra(window=WINDOW)  # band and result cached
    shutil.copytree(store, tmp_path / "old.zarr")
    expected = sa.open_run(tmp_path / "old.zarr").spectra(window=WINDOW, cache=False)
    ctx = context()
    go, ready = ctx.Event(), ctx.Event()
    child = _start(rewrite_rows_and_cache, str(store), 9, 14, 7, ready, go)
    subgroup = caches._subgroup

    class Paused:
        """The gram group, pausing before its band is read until the other process has rewritten it."""

        def __init__(self, group):
            self.group, self.attrs = group, group.attrs

        def __getitem__(self, key):
            if key == "band" and not go.is_set():
                go.set()
                assert ready.wait(60)
            return self.group[key]

    monkeypatch.setattr(caches, "_subgroup", lambda st, name: Paused(g) if (g := subgroup(st, name)) is not None
                        and name == "gram" else g)
    try:
        got = old.spectra(window=WINDOW, cache=False)
    except sa.StoreError as exc:
        assert "rewritten since this store was opened" in str(exc)
    else:
        np.testing.assert_array_equal(got.sigma.values, expected.sigma.values)
    _join(child)
    assert go.is_set() and ready.is_set()
    assert sa.open_run(store).n_deltas == old.n_deltas  # as many rows, other ones


def test_a_reader_caching_does_not_make_a_recorder_fail(tmp_path):
    """A Recorder with its defaults records while a reader's spectra holds the writer lock to cache the band."""
    store = tmp_path / "r.zarr"
    model = torch.nn.Linear(4, 3)
    rec = sa.Recorder(store, model)
    for s in range(6):
        with torch.no_grad():
            model.weight.add_(0.01 * (s + 1))
        rec.step(s)
    ctx = context()
    started, release = ctx.Event(), ctx.Event()
    reader = _start(hold_lock_while_caching, str(store), started, release, 5.0)
    assert started.wait(60)
    try:
        with torch.no_grad():
            model.weight.add_(0.1)
        rec.step(6)  # a notebook computing spectra must not stop the training
    finally:
        release.set()
        _join(reader)
    assert sa.open_run(store).n_deltas == 6


def test_a_reader_of_an_older_commit_reads_its_metrics(tmp_path):
    """A Run opened before another process replaced the metrics still reads the metrics of its commit."""
    write_run(tmp_path / "src", 6, SIZES, seed=5)
    (tmp_path / "m1.csv").write_text("step,loss\n0,1.0\n10,0.5\n")
    (tmp_path / "m2.csv").write_text("step,loss\n0,1.0\n10,0.4\n20,0.3\n")
    store = tmp_path / "r.zarr"
    sa.ingest(tmp_path / "src", store, metrics=tmp_path / "m1.csv")
    run = sa.open_run(store)
    child = _start(replace_metrics, str(tmp_path / "src"), str(store), str(tmp_path / "m2.csv"),
                   str(tmp_path / "w.json"))
    _join(child)
    assert _read(tmp_path / "w.json")["ok"]
    np.testing.assert_array_equal(run.metrics["loss"].values, [1.0, 0.5])
