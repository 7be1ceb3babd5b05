"""Kills, full disks and damage: a one-line error or the right numbers, never a partial cache or other numbers.

Kills are real: a child process is sent SIGKILL at the n-th of the store's
writes (adversary_procs.broken_writes: every chunk and metadata document
zarr writes, and every deletion), either just before that write or half-way
through it (a temporary file left with half of its bytes, a folder whose own
metadata is deleted first). Counting writes rather than killing after a
random delay names each crash point, reaches every one of them (a cache
write lasts milliseconds, so random delays mostly land before or after it)
and reproduces with a fixed seed. The child dies in the middle of zarr's
own threads, with no Python clean-up, exactly as a killed process does.

A full disk is injected the same way (every write from the n-th on raises
ENOSPC, in this process), and is also real: a tmpfs of 2 MiB, filled up,
in a child's own mount namespace (skipped where none can be mounted).
Damage is a seeded fuzz of byte flips, truncations and deletions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_run
from adversary_procs import (
    MAX_LAG,
    WINDOW,
    assert_identical,
    assert_same_contents,
    broken_writes,
    contents,
    count_writes,
    ingest_child,
    on_a_full_tmpfs,
    run_child,
    spectra_child,
    start_fork_server,
)

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.store import Store

SIZES = {"a.w": (10, 7), "b.b": (30,)}
CHUNK = 64  # two chunks per row
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    start_fork_server()  # it imports the package while the first test prepares


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints (14, and the first 10 of them), reference stores and the numbers they give."""
    root = tmp_path_factory.mktemp("faults")
    files = write_run(root / "all", 14, SIZES, seed=9)
    (root / "first").mkdir()
    for f in files[:10]:
        shutil.copy2(f, root / "first")
    (root / "metrics.csv").write_text("step,loss\n" + "".join(f"{10 * i},{1 / (1 + i)}\n" for i in range(14)))
    r = SimpleNamespace(root=root, all=root / "all", first=root / "first", metrics=root / "metrics.csv")
    r.fresh = root / "fresh.zarr"  # all 14 in one ingest, no cache
    sa.ingest(r.all, r.fresh, chunk_size=CHUNK)
    r.first_store = root / "first.zarr"  # the first 10
    sa.ingest(r.first, r.first_store, chunk_size=CHUNK)
    r.appended = _copy(r.first_store, root / "appended.zarr")  # the first 10, then 4 appended
    sa.ingest(r.all, r.appended)
    r.with_metrics = _copy(r.first_store, root / "with_metrics.zarr")
    sa.ingest(r.all, r.with_metrics, metrics=r.metrics)
    scratch = _copy(r.fresh, root / "scratch.zarr")
    r.reference = sa.open_run(scratch).spectra(window=WINDOW, cache=False)
    r.band = sa.open_run(scratch).band(max_lag=MAX_LAG).values
    # caches of an older generation: the band of the first 10 checkpoints, then 4 appended
    r.extended = _copy(r.first_store, root / "extended.zarr")
    sa.open_run(r.extended).spectra(window=WINDOW)
    sa.ingest(r.all, r.extended)
    # a band cached with too few lags for the spectra: rebuilt from scratch
    r.short_band = _copy(r.fresh, root / "short_band.zarr")
    sa.open_run(r.short_band).band(max_lag=2)
    r.cached = _copy(r.fresh, root / "cached.zarr")  # band and result cached
    sa.open_run(r.cached).spectra(window=WINDOW)
    return r


def _points(keys: list[str], phases: dict[str, int], seed: int) -> list[tuple[int, bool]]:
    """(write number, torn) pairs, *phases[p]* of them among the writes whose key holds *p* (the first p that
    does, in order; "" for the writes no other phase holds), every other one torn."""
    rng = np.random.default_rng(seed)
    named = [p for p in phases if p]
    phase_of = [next((p for p in named if p in k), "") for k in keys]
    out = []
    for phase, count in phases.items():
        numbers = [i + 1 for i, p in enumerate(phase_of) if p == phase]
        picked = rng.choice(numbers, size=min(count, len(numbers)), replace=False)
        out += [(int(n), j % 2 == 0) for j, n in enumerate(sorted(picked))]
    return out


def _assert_no_partial_cache(path: Path, runs, what: str) -> None:
    """Whatever the caches serve now is right: band rows equal the reference band's, results the reference."""
    store = Store.open(path)
    found = store.band_cache.lookup(MAX_LAG)
    if found is not None:
        band, _ = found
        k = band.shape[1]
        # rows cached from an older generation were computed in other blocks: equal up to rounding
        np.testing.assert_allclose(band[:, :, : MAX_LAG + 1], runs.band[:, :k], rtol=1e-12, atol=0,
                                   equal_nan=True, err_msg=what)
    for group in (path / "results").iterdir() if (path / "results").is_dir() else ():
        if group.is_dir():
            ds = store.read_result(group.name)
            if ds is not None:
                assert_identical(ds, runs.reference, what)


def _temporaries(path: Path) -> list[str]:
    """The temporary files of killed writes still in the store (a torn chunk of the band is a megabyte)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*.partial"))


def _assert_one_line(message: str, path: Path) -> None:
    assert "\n" not in message and str(path) in message, message


# 20 kill points in all: where the band is written anew, extended, or rebuilt over a band of too few lags
# (its old folder deleted first), and where the result is written after it (its group made first)
KILL_POINTS = {
    "new band": {"gram": 5, "/results/zarr.json": 1, "": 4},
    "extended band": {"gram": 3, "": 2},
    "rebuilt band": {"delete_dir gram": 1, "gram": 3, "": 1},
}


@pytest.mark.parametrize("scenario", sorted(KILL_POINTS))
def test_killed_while_caching(runs, tmp_path, scenario):
    """SIGKILL at write n of the band and result caches; then spectra equal a fresh store's, caches committed."""
    pristine = {"new band": runs.fresh, "extended band": runs.extended, "rebuilt band": runs.short_band}[scenario]
    keys = count_writes(lambda: sa.open_run(_copy(pristine, tmp_path / "count.zarr")).spectra(window=WINDOW))
    points = _points(keys, KILL_POINTS[scenario], seed=len(keys))
    for n, torn in points:
        what = f"{scenario}: killed at write {n} of {len(keys)} ({keys[n - 1]}){' half-way' if torn else ''}"
        path = _copy(pristine, tmp_path / f"{n}-{torn}.zarr")
        assert run_child(spectra_child, str(path), [WINDOW], n, torn) == KILLED, what
        _assert_no_partial_cache(path, runs, what)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert_identical(sa.open_run(path).spectra(window=WINDOW), runs.reference, what)
        assert not caught, f"{what}: {[str(w.message) for w in caught]}"  # what the child left is no warning either
        store = Store.open(path)  # the call above cached the band and the result, complete
        band, _ = store.band_cache.lookup(MAX_LAG)
        np.testing.assert_array_equal(band, runs.band, err_msg=what)
        served = [store.read_result(p.name) for p in (path / "results").iterdir() if p.is_dir()]
        assert sum(ds is not None for ds in served) == 1, what
        assert not _temporaries(path), (what, _temporaries(path))
        shutil.rmtree(path)


@pytest.mark.parametrize("scenario", ["new store", "append"])
def test_killed_during_ingest(runs, tmp_path, scenario):
    """SIGKILL at write n of an ingest: readers see committed rows only; the next ingest ends equal to a clean one."""
    pristine, reference = (None, runs.fresh) if scenario == "new store" else (runs.first_store, runs.appended)
    want = contents(reference)
    scratch = tmp_path / "count.zarr"
    if pristine is not None:
        _copy(pristine, scratch)
    keys = count_writes(lambda: sa.ingest(runs.all, scratch, chunk_size=CHUNK))
    points = _points(keys, {"deltas/c": 2, "zarr.json": 1}, seed=len(keys)) + [(len(keys), False)]
    for n, torn in points:
        what = f"{scenario}: killed at write {n} of {len(keys)} ({keys[n - 1]}){' half-way' if torn else ''}"
        path = tmp_path / f"{n}-{torn}.zarr"
        if pristine is not None:
            _copy(pristine, path)
        assert run_child(ingest_child, str(runs.all), str(path), CHUNK, n, torn) == KILLED, what
        if Store.exists(path):
            run = sa.open_run(path)
            if run.n_deltas:
                np.testing.assert_array_equal(run.deltas.values, want["deltas"][: run.n_deltas], err_msg=what)
        sa.ingest(runs.all, path, chunk_size=CHUNK)
        assert_same_contents(contents(path), want, what)
        assert not _temporaries(path), (what, _temporaries(path))
        shutil.rmtree(path)


@pytest.mark.parametrize("scenario", ["new store", "append"])
def test_killed_or_out_of_space_while_recording_weights(runs, tmp_path, scenario):
    """With the weight record (``--weights``): SIGKILL at writes of the record and of the rows, or no space from
    a write of the record on; the next ingest ends equal to a clean one, the record and its generations
    included, and weight_spectra reads the record (not rows rebuilt because its generations were torn)."""
    pristine = None
    if scenario == "append":
        pristine = sa.ingest(runs.first, tmp_path / "first.zarr", chunk_size=CHUNK, weights="a.w").path
    reference = _copy(pristine, tmp_path / "reference.zarr") if pristine is not None else tmp_path / "reference.zarr"
    want = contents(sa.ingest(runs.all, reference, chunk_size=CHUNK, weights="a.w").path)
    scratch = tmp_path / "count.zarr"
    if pristine is not None:
        _copy(pristine, scratch)
    keys = count_writes(lambda: sa.ingest(runs.all, scratch, chunk_size=CHUNK, weights="a.w"))
    assert any("weights/chain" in k for k in keys)
    kills = _points(keys, {"weights/": 3, "deltas/c": 1}, seed=len(keys))
    for n, torn in kills:
        what = f"{scenario}: killed at write {n} of {len(keys)} ({keys[n - 1]}){' half-way' if torn else ''}"
        path = tmp_path / f"{n}-{torn}.zarr"
        if pristine is not None:
            _copy(pristine, path)
        assert run_child(ingest_child, str(runs.all), str(path), CHUNK, n, torn, "a.w") == KILLED, what
        sa.ingest(runs.all, path, chunk_size=CHUNK, weights="a.w")
        assert_same_contents(contents(path), want, what)
        assert sa.open_run(path).weight_spectra("a.w", cache=False).attrs["source"].startswith("recorded"), what
        assert not _temporaries(path), (what, _temporaries(path))
        shutil.rmtree(path)
    n = next(i + 1 for i, k in enumerate(keys) if "weights/" in k and i > len(keys) // 2)
    path = tmp_path / "full.zarr"
    before = contents(_copy(pristine, path)) if pristine is not None else None
    with broken_writes(enospc_after=n - 1), pytest.raises(sa.StoreError, match="No space left on device"):
        sa.ingest(runs.all, path, chunk_size=CHUNK, weights="a.w")
    if before is not None:
        assert_same_contents(contents(path), before, f"{scenario}: no space from write {n}")
    sa.ingest(runs.all, path, chunk_size=CHUNK, weights="a.w")
    assert_same_contents(contents(path), want, f"{scenario}: no space from write {n}, then space")


# -- a full disk --------------------------------------------------------------------


def _enospc_points(keys: list[str], where: str, middle: bool = True) -> list[int]:
    """Writes (1-based) to fail at, all later ones failing too: the first, middle and last of those naming *where*."""
    numbers = [i + 1 for i, k in enumerate(keys) if where in k]
    return sorted({numbers[0], numbers[-1], *([numbers[len(numbers) // 2]] if middle else [])})


@pytest.mark.parametrize("scenario", ["new store", "append", "metrics"])
def test_full_disk_during_ingest(runs, tmp_path, scenario):
    """ENOSPC from write n on: a one-line StoreError, the store as it was; with space again, a clean ingest."""
    pristine = None if scenario == "new store" else runs.first_store
    reference = {"new store": runs.fresh, "append": runs.appended, "metrics": runs.with_metrics}[scenario]
    options = {"metrics": runs.metrics} if scenario == "metrics" else {}
    scratch = tmp_path / "count.zarr"
    if pristine is not None:
        _copy(pristine, scratch)
    keys = count_writes(lambda: sa.ingest(runs.all, scratch, chunk_size=CHUNK, **options))
    # 1: no space from the start, when the writer lock records its holder
    for n in sorted({1, *_enospc_points(keys, "metrics" if scenario == "metrics" else "", scenario != "metrics")}):
        what = f"{scenario}: no space from write {n} of {len(keys)}"
        path = tmp_path / f"{n}.zarr"
        before = contents(_copy(pristine, path)) if pristine is not None else None
        with broken_writes(enospc_after=n - 1), pytest.raises(sa.StoreError) as caught:
            sa.ingest(runs.all, path, chunk_size=CHUNK, **options)
        _assert_one_line(str(caught.value), path)
        assert "No space left on device" in str(caught.value), what
        if before is None:  # nothing there, or only the lock file that refused it
            assert not path.exists() or os.listdir(path) in ([], [".lock"]), what
        else:
            assert_same_contents(contents(path), before, what)
        sa.ingest(runs.all, path, chunk_size=CHUNK, **options)  # space freed, in the same process
        assert_same_contents(contents(path), contents(reference), what)


def test_full_disk_during_ingest_on_the_command_line(runs, tmp_path):
    """``spectral-analyze ingest`` on a full disk: exit 1, one ``Error:`` line, the store as it was."""
    path = _copy(runs.first_store, tmp_path / "r.zarr")
    before = contents(path)
    with broken_writes(enospc_after=5):
        result = CliRunner().invoke(main, ["ingest", str(runs.all), "-o", str(path), "--no-progress"])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "No space left on device" in lines[0], result.output
    assert "Traceback" not in result.output
    assert_same_contents(contents(path), before)
    result = CliRunner().invoke(main, ["ingest", str(runs.all), "-o", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert_same_contents(contents(path), contents(runs.appended))


@pytest.mark.parametrize("phase", ["gram", "results"])
def test_full_disk_while_caching(runs, tmp_path, phase):
    """ENOSPC while caching: the right numbers with a one-line CacheWarning, no partial cache served, caches later."""
    keys = count_writes(lambda: sa.open_run(_copy(runs.fresh, tmp_path / "count.zarr")).spectra(window=WINDOW))
    want = contents(runs.fresh)
    for n in sorted({1, *_enospc_points(keys, phase, middle=False)}):
        what = f"no space from write {n} of {len(keys)}"
        path = _copy(runs.fresh, tmp_path / f"{n}.zarr")
        with broken_writes(enospc_after=n - 1), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = sa.open_run(path).spectra(window=WINDOW)
        assert_identical(ds, runs.reference, what)
        assert caught and all(issubclass(w.category, sa.CacheWarning) for w in caught), what
        for w in caught:
            _assert_one_line(str(w.message), path)
            assert "No space left on device" in str(w.message), what
        assert_same_contents(contents(path), want, what)
        _assert_no_partial_cache(path, runs, what)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert_identical(sa.open_run(path).spectra(window=WINDOW), runs.reference, what)
        assert not caught, f"{what}: {[str(w.message) for w in caught]}"
        store = Store.open(path)
        assert any(store.read_result(p.name) is not None for p in (path / "results").iterdir() if p.is_dir()), what
    path = _copy(runs.fresh, tmp_path / "cli.zarr")
    with broken_writes(enospc_after=_enospc_points(keys, phase)[0] - 1), warnings.catch_warnings():
        warnings.simplefilter("default")  # as on a command line (the test suite makes the package's warnings errors)
        result = CliRunner().invoke(main, ["spectra", str(path), "--window", str(WINDOW), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("warning: ") and "No space left" in line for line in lines), result.stderr


def test_on_a_real_full_filesystem(runs, tmp_path):
    """A tmpfs of 2 MiB filled but for 0 to 64 KiB (in a child's own mount namespace): the same, for real.

    No space at all fails the new store's writer lock (its holder record):
    the next ingest, in the same process, must not find the store locked.
    """
    out = tmp_path / "report.json"
    code = run_child(on_a_full_tmpfs, str(tmp_path / "mnt"), str(runs.first), str(runs.all), CHUNK,
                     str(runs.first_store), str(runs.appended), str(out))
    assert code == 0 and out.exists(), f"child exit code {code}"
    result = json.loads(out.read_text())
    if "skip" in result:
        pytest.skip(f"no small filesystem can be mounted here: {result['skip']}")
    assert "failure" not in result, result.get("failure")
    for step in result["steps"]:
        if step["what"].startswith("spectra"):
            assert step["ok"] and step["cached_after"], step
            assert step["warnings"] and all(w.startswith("CacheWarning: ") and "\n" not in w
                                            and "No space left" in w for w in step["warnings"]), step
        else:
            assert not step["ok"] and step["error"] == "StoreError", step
            assert "\n" not in step["message"] and "No space left on device" in step["message"], step
            assert step.get("left") in (None, [], [".lock"]), step


# -- damage -------------------------------------------------------------------------

_NAMES = {"deltas": ["deltas"], "step": ["step"], "chunk_crc": ["chunk_crc", "chunk checksums"],
          "base": ["base"], "last_theta": ["last_theta"], "sources": ["sources"], "zarr.json": ["store"]}


def _damage(path: Path, rng) -> str:
    raw = bytearray(path.read_bytes())
    kind = ("flip", "truncate", "delete")[int(rng.integers(3))]
    if kind == "delete" or not raw:
        path.unlink()
        return "deleted"
    if kind == "truncate":
        size = int(rng.integers(len(raw)))
        path.write_bytes(bytes(raw[:size]))
        return f"truncated to {size} bytes"
    at, bit = int(rng.integers(len(raw))), int(rng.integers(8))
    raw[at] ^= 1 << bit
    path.write_bytes(bytes(raw))
    return f"bit {bit} of byte {at} flipped"


def test_fuzz_damage_to_rows_band_and_results(runs, tmp_path):
    """30 random flips, truncations and deletions, 10 each among the rows, the band cache and the result cache.

    For the rows the caches are removed first (so the rows are read), for the
    band the result (so the band is read, and the result not cached). spectra
    either raises a one-line package error naming the damaged array, or
    returns results identical to the undamaged ones (values, coordinates,
    dims and attributes); damage to a cache is never an error.
    """
    rng = np.random.default_rng(2024)
    for trial in range(30):
        part = ("rows", "gram", "results")[trial % 3]
        path = _copy(runs.cached, tmp_path / f"{trial}.zarr")
        if part != "results":
            shutil.rmtree(path / "results")
        if part == "rows":
            shutil.rmtree(path / "gram")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock"
                       and (part == "rows" or p.relative_to(path).parts[0] == part))
        victim = files[int(rng.integers(len(files)))]
        what = f"{victim.relative_to(path)} {_damage(victim, rng)}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = sa.open_run(path).spectra(window=WINDOW, cache=part == "results")
            except sa.SpectralAnalyzerError as exc:
                got, message = None, str(exc)
        assert not caught, f"{what}: {[str(w.message) for w in caught]}"
        if got is None:
            _assert_one_line(message, path)
            top = victim.relative_to(path).parts[0]
            assert part == "rows" and any(name in message for name in _NAMES[top]), f"{what}: {message}"
        else:
            assert_identical(got, runs.reference, what)
        shutil.rmtree(path)


def _edit_json(pattern: str, change):
    def edit(path: Path) -> None:
        (target,) = path.glob(pattern)
        if change is None:
            target.write_text("{")
        else:
            meta = json.loads(target.read_text())
            change(meta)
            target.write_text(json.dumps(meta))

    return edit


def _unreadable_results_group(path: Path) -> None:
    """The results group's metadata unreadable, and no result in it: a result must be written into it."""
    (name,) = [p for p in (path / "results").iterdir() if p.is_dir()]
    shutil.rmtree(name)
    (path / "results" / "zarr.json").write_text("{")


def _unreadable_band(path: Path) -> None:
    shutil.rmtree(path / "results")  # so that the band is read
    (path / "gram" / "zarr.json").write_text("{")


EDITS = {
    "a result's dataset attribute": _edit_json("results/*/zarr.json", lambda m: m["attributes"].update(window=5)),
    "a result's variable attribute": _edit_json("results/*/sigma/zarr.json",
                                                lambda m: m["attributes"].update(description="something else")),
    "a result's dimension name": _edit_json("results/*/sigma/zarr.json",
                                            lambda m: m.update(dimension_names=["step", "rank"])),
    "a result's metadata, unreadable": _edit_json("results/*/zarr.json", None),
    "a result variable's metadata, a field missing": _edit_json("results/*/gap/zarr.json",
                                                                lambda m: m.pop("zarr_format")),
    "the results group's metadata, unreadable": _unreadable_results_group,
    "the band's metadata, unreadable": _unreadable_band,
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_cache_metadata_is_neither_served_nor_an_error(runs, tmp_path, edit):
    """Metadata of a cached result or band edited or unreadable: computed again, right, no warning, cached again."""
    path = _copy(runs.cached, tmp_path / "r.zarr")
    EDITS[edit](path)
    (name,) = [p.name for p in (runs.cached / "results").iterdir() if p.is_dir()]
    assert Store.open(path).read_result(name) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_identical(sa.open_run(path).spectra(window=WINDOW), runs.reference, edit)
    assert not caught, [str(w.message) for w in caught]
    store = Store.open(path)
    assert_identical(store.read_result(name), runs.reference, edit)  # cached again
    np.testing.assert_array_equal(store.band_cache.lookup(MAX_LAG)[0], runs.band)


def test_full_disk_at_every_write_of_a_recorded_step(tmp_path):
    """A Recorder's record (row, source, checksums, metrics appended past their count) on a full disk at each of
    its writes: a one-line StoreError, the committed contents as they were; with space again the next record
    ends equal to a recording that never failed."""
    from adversary_procs import toy_model

    def record(path: Path, fail_at: int | None) -> None:
        model = toy_model(0)
        rec = sa.Recorder(path, model, chunk_size=CHUNK)
        for s in range(4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * (s + 1))
            if s == 3 and fail_at is not None:
                before = contents(path)
                with broken_writes(enospc_after=fail_at), pytest.raises(sa.StoreError) as caught:
                    rec.step(s, loss=float(s), **({"acc": 0.5} if s == 3 else {}))
                assert "No space left on device" in str(caught.value) and "\n" not in str(caught.value)
                assert_same_contents(contents(path), before, f"no space from write {fail_at + 1}")
                np.testing.assert_array_equal(sa.open_run(path).metrics["loss"].values, [0.0, 1.0, 2.0])
            rec.step(s, loss=float(s), **({"acc": 0.5} if s == 3 else {}))

    clean = tmp_path / "clean.zarr"
    record(clean, None)
    reference = contents(clean)
    model = toy_model(0)
    counted = tmp_path / "counted.zarr"
    rec = sa.Recorder(counted, model, chunk_size=CHUNK)
    for s in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (s + 1))
        rec.step(s, loss=float(s))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.04)
    keys = count_writes(lambda: rec.step(3, loss=3.0, acc=0.5))
    assert any("metrics" in k for k in keys)  # the metrics append is among the writes
    for n in range(0, len(keys), max(1, len(keys) // 4)):  # the row, its checksums and source, the metrics
        path = tmp_path / f"{n}.zarr"
        record(path, n)
        got = contents(path)
        assert_same_contents(got, reference, f"no space from write {n + 1} of {len(keys)}, then space again")
    run = sa.open_run(tmp_path / "0.zarr")
    assert run.metrics["loss"].values.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.isnan(run.metrics["acc"].values[:3]).all() and run.metrics["acc"].values[3] == 0.5


def test_a_result_write_killed_anywhere_leaves_nothing_that_lasts(runs, tmp_path):
    """SIGKILL at every write of a result (whole or torn): the next result cached beside it (another analysis)
    is told no warning and removes what the killed write left; results/ then holds committed results only."""
    keys = count_writes(lambda: sa.open_run(_copy(runs.cached, tmp_path / "count.zarr")).spectra(window=WINDOW + 1))
    points = [i + 1 for i, k in enumerate(keys) if "/results/" in k]
    rng = np.random.default_rng(len(keys))  # its first writes (the folders made) and others drawn
    for n in sorted({*points[:3], *rng.choice(points[3:], size=3, replace=False)}):
        for torn in (False, True):
            what = f"killed at write {n} of {len(keys)} ({keys[n - 1]}){' half-way' if torn else ''}"
            path = _copy(runs.cached, tmp_path / f"{n}-{torn}.zarr")
            assert run_child(spectra_child, str(path), [WINDOW + 1], n, torn) == KILLED, what
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sa.open_run(path).spectra(window=WINDOW + 2)
            assert not caught, f"{what}: {[str(w.message) for w in caught]}"
            store = Store.open(path)
            left = sorted(os.listdir(path / "results"))
            results = [name for name in left if name != "zarr.json"]
            assert all(store.read_result(name) is not None for name in results), (what, left)
            assert len(left) == 3, (what, left)  # its metadata, the cached result and the new one
            assert not _temporaries(path), (what, _temporaries(path))
            shutil.rmtree(path)
