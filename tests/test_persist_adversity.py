"""Stores that outlive one process and one place, after a review of them: cached results in the order they
were computed, a lock file other members of a group can write, and hard-linked copies of a store."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings

import pytest
from conftest import write_run

import spectral_analyzer as sa
from spectral_analyzer.exporting import table
from spectral_analyzer.errors import StoreBusyError
from spectral_analyzer.store.location import Location
from spectral_analyzer.store.lock import writer_lock


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("persist")
    write_run(root / "ck", 7, {"layers.0.q.weight": (6, 5), "layers.1.q.weight": (6, 5), "head.bias": (3,)})
    sa.ingest(root / "ck", root / "s.zarr", progress=False)
    return root / "s.zarr"


@pytest.mark.parametrize("analysis", ["spectra", "dynamics", "weight_spectra"])
def test_a_cached_result_keeps_the_order_it_was_computed_in(store, analysis):
    """A result read from the cache listed its variables in the order of the cache folder's listing:
    'gap_ratio' was column 3 of a CSV export on the first run and 'nu' on the second."""
    options = {} if analysis == "weight_spectra" else {"window": 3}
    first = getattr(sa.open_run(store), analysis)(**options)
    again = getattr(sa.open_run(store), analysis)(**options)
    assert (store / "results").exists()
    assert list(again.data_vars) == list(first.data_vars)
    assert list(again.coords) == list(first.coords)
    assert list(again.attrs) == list(first.attrs)
    assert [list(r) for r in table(again)] == [list(r) for r in table(first)]


def test_the_lock_file_is_made_as_the_umask_says(tmp_path):
    """With umask 002 (a group's shared store) every file was group-writable but the lock (0644): another
    member of the group could neither append nor cache."""
    old = os.umask(0o002)
    try:
        write_run(tmp_path / "ck", 3, {"w": (4,)})
        sa.ingest(tmp_path / "ck", tmp_path / "s.zarr", progress=False)
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "s.zarr" / ".lock").st_mode)
    assert mode == 0o664, oct(mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "s.zarr" / "zarr.json").st_mode)


def test_a_hard_linked_copy_has_a_lock_of_its_own(tmp_path):
    """cp -al and rsync --link-dest copy the lock file as a link to the same file: a writer of the copy held
    the original's lock too, and appends to the original were refused as busy, naming the other job."""
    write_run(tmp_path / "ck", 3, {"w": (4,)})
    sa.ingest(tmp_path / "ck", tmp_path / "orig.zarr", progress=False)
    subprocess.run(["cp", "-al", str(tmp_path / "orig.zarr"), str(tmp_path / "copy.zarr")], check=True)
    assert os.stat(tmp_path / "orig.zarr" / ".lock").st_nlink == 2
    code = ("import sys, time\nfrom spectral_analyzer.store.lock import writer_lock\n"
            "from spectral_analyzer.store.location import Location\n"
            f"with writer_lock(Location.of({str(tmp_path / 'copy.zarr')!r})):\n"
            "    print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        with writer_lock(Location.of(tmp_path / "orig.zarr")):  # the original's own lock is free
            pass
        with pytest.raises(StoreBusyError):  # the copy's is held
            with writer_lock(Location.of(tmp_path / "copy.zarr")):
                pass
        write_run(tmp_path / "ck", 4, {"w": (4,)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert sa.ingest(tmp_path / "ck", tmp_path / "orig.zarr", progress=False).n_deltas == 3
    finally:
        child.kill()
        child.wait()
    assert os.stat(tmp_path / "orig.zarr" / ".lock").st_nlink == 1
    assert os.stat(tmp_path / "copy.zarr" / ".lock").st_nlink == 1
    assert not [f for f in os.listdir(tmp_path / "orig.zarr") if f.startswith(".lock.")]
    assert sa.open_run(tmp_path / "copy.zarr").n_deltas == 2


def test_a_read_only_store_is_told_once_in_the_words_of_the_system(store, tmp_path, monkeypatch):
    """From Python, each analysis of a read-only store warned twice (the band's cache and the result's), each
    naming the store twice: '... cannot be written (s.zarr: cannot write the store ([Errno 30] ...))'."""
    import errno
    import shutil

    path = tmp_path / "ro.zarr"
    shutil.copytree(store, path)
    real_open = os.open

    def read_only(name, flags, *args, **kwargs):
        if str(name).startswith(str(path)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    run = sa.open_run(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.spectra(window=4)
        run.dynamics(window=4)
    told = [str(w.message) for w in caught if issubclass(w.category, sa.CacheWarning)]
    assert told == [f"{path}: computed without caching: the store cannot be written (Read-only file system)"]
