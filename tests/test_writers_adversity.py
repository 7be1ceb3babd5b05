"""Writers under review: a table and its events file replaced as a pair, interrupted between the two."""

from __future__ import annotations

import os

import pytest
from conftest import write_run

import spectral_analyzer as sa
from spectral_analyzer import exporting
from spectral_analyzer.demo import run_demo

SIZES = {"a.weight": (6, 5), "b.bias": (7,)}


class Killed(BaseException):
    """What a kill between two renames looks like from inside: nothing after it runs."""


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_table_is_never_left_beside_the_events_of_another_export(tmp_path, monkeypatch, suffix):
    """Overwriting ``dynamics.csv`` replaces it and ``dynamics.events.csv``: stopped after any of the renames,
    the files there are both the earlier export's, both the new one's, or one alone; never one of each."""
    write_run(tmp_path / "src", 8, SIZES)
    run = sa.ingest(tmp_path / "src", tmp_path / "run.zarr")
    ds = run.dynamics(window=3)
    table = tmp_path / f"dynamics{suffix}"
    events = tmp_path / f"dynamics.events{suffix}"
    renames = 0
    real = os.replace

    def counting(src, dst):
        nonlocal renames
        renames += 1
        return real(src, dst)

    monkeypatch.setattr(exporting.os, "replace", counting)
    sa.export(ds, table, overwrite=True)
    assert renames == 2
    for stop in (1, 2):
        earlier = {p: os.stat(p).st_ino for p in (table, events)}
        calls = 0

        def killed(src, dst):
            nonlocal calls
            calls += 1
            if calls == stop:
                raise Killed
            return real(src, dst)

        monkeypatch.setattr(exporting.os, "replace", killed)
        with pytest.raises(Killed):
            sa.export(ds, table, overwrite=True)
        kinds = {"earlier" if os.stat(p).st_ino == ino else "new" for p, ino in earlier.items() if p.exists()}
        assert len(kinds) == 1, (stop, {p.name: p.exists() for p in earlier})
        monkeypatch.setattr(exporting.os, "replace", real)
        sa.export(ds, table, overwrite=True)  # and the next export completes the pair
        assert table.exists() and events.exists()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(spectra, dynamics) of a small run: dynamics has events, spectra none."""
    folder = tmp_path_factory.mktemp("results")
    write_run(folder / "src", 8, SIZES)
    run = sa.ingest(folder / "src", folder / "run.zarr")
    return run.spectra(window=3), run.dynamics(window=3)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_an_export_without_events_removes_or_refuses_the_events_of_the_one_it_replaces(tmp_path, results,
                                                                                         suffix):
    """`dynamics -o x.csv` then `spectra -o x.csv --overwrite` left the dynamics' x.events.csv beside the
    spectra's table, every time, nothing said."""
    spectra, dynamics = results
    table, events = tmp_path / f"x{suffix}", tmp_path / f"x.events{suffix}"
    sa.export(dynamics, table)
    assert events.exists()
    with pytest.raises(sa.ExportError, match=r"x\.events.*: the events of an earlier export"):
        sa.export(spectra, table)
    sa.export(spectra, table, overwrite=True)
    assert table.exists() and not events.exists()
    table.unlink()  # an events file beside no table: not an export this one replaces, with overwrite or not
    sa.export(dynamics, tmp_path / f"z{suffix}")
    os.replace(tmp_path / f"z.events{suffix}", events)
    for overwrite in (False, True):
        with pytest.raises(sa.ExportError, match="is there without the table"):
            sa.export(spectra, table, overwrite=overwrite)
    assert not table.exists() and events.exists()


def test_a_table_whose_events_name_would_be_too_long_is_written(tmp_path, results):
    """A name within 7 bytes of the longest a file may have: '<stem>.events.csv' is too long to exist, and
    the removal of an earlier events file there failed the export (File name too long)."""
    spectra, _ = results
    path = tmp_path / ("s" * 250 + ".csv")
    sa.export(spectra, path)
    sa.export(spectra, path, overwrite=True)
    assert path.exists()


def test_an_export_into_a_folder_it_may_write_but_not_list_goes_ahead(tmp_path, results, monkeypatch):
    """A drop-box folder (write and search, no read): the folder lock cannot open it, and the export failed
    with 'Permission denied' where it had been written. (Opening the folder is refused here as it is to a user
    without read permission; root reads any folder.)"""
    spectra, _ = results
    box = tmp_path / "box"
    box.mkdir()
    real = os.open

    def no_read(path, flags, *args, **kwargs):
        if os.fspath(path) == os.fspath(box) and flags & getattr(os, "O_DIRECTORY", 0):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(exporting.os, "open", no_read)
    sa.export(spectra, box / "out.csv")
    assert (box / "out.csv").exists()


HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path):
    """A folder locked by another process (as another export holds it), and the call that lets it go."""
    import subprocess
    import sys

    folder = tmp_path / "out"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"

    def release():
        proc.stdin.close()
        proc.wait()

    yield folder, release
    if proc.poll() is None:
        release()


def _in_thread(call):
    import threading

    box = {}

    def target():
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_exports_to_one_path_at_once_go_one_after_the_other_and_the_second_is_checked_again(held, results):
    """Two processes exporting other runs to one path with overwrite mixed them (24 of 1000 trials: one
    run's table beside the other's events); without overwrite both could pass the check, then both write."""
    folder, release = held
    _, dynamics = results
    thread, box = _in_thread(lambda: sa.export(dynamics, folder / "x.csv"))
    thread.join(1.0)
    assert thread.is_alive() and not (folder / "x.csv").exists()  # waits for the other export
    (folder / "x.csv").write_text("step\n")  # what the other export wrote meanwhile
    release()
    thread.join()
    assert "x.csv: exists; pass overwrite" in str(box["error"])
    assert (folder / "x.csv").read_text() == "step\n"


def test_tensorboard_exports_into_one_folder_at_once_leave_one(held, results):
    """Two export-tb into one new folder both succeeded: TensorBoard drew both runs under the same tags."""
    pytest.importorskip("tensorboard")
    from spectral_analyzer.tensorboard import EVENT_PREFIX, EXPORT_SUFFIX

    folder, release = held
    spectra, dynamics = results
    thread, box = _in_thread(lambda: sa.export_tensorboard(spectra, folder, dynamics))
    thread.join(1.0)
    assert thread.is_alive()
    (folder / f"{EVENT_PREFIX}1.host.1.0{EXPORT_SUFFIX}").write_bytes(b"")  # the other export, done meanwhile
    release()
    thread.join()
    assert "holds an export of spectra already" in str(box["error"])
    assert len(list(folder.iterdir())) == 1


def test_a_demo_into_a_folder_another_demo_writes_is_refused_at_once(held):
    """Two `demo -o D --overwrite` at once each restored or deleted what the other wrote, with wrong errors
    ('exists; pass --overwrite' though it was passed; 'Directory not empty'; 'the store is damaged')."""
    folder, _ = held
    with pytest.raises(sa.ExportError, match="another demo run is writing this folder"):
        run_demo(folder, overwrite=True)
    assert list(folder.iterdir()) == []


def test_a_demo_into_a_store_makes_no_folder_there(tmp_path, results):
    """`demo -o run.zarr/demo` was refused after it had made run.zarr/demo/."""
    store = tmp_path / "run.zarr"
    write_run(tmp_path / "src", 4, SIZES)
    sa.ingest(tmp_path / "src", store)
    with pytest.raises(sa.ExportError, match="inside the Zarr store"):
        run_demo(store / "demo")
    assert not (store / "demo").exists()
