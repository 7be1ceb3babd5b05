"""Store writers and caches under a third review: a metrics rewrite rolled back, a store path that is a
symbolic link, band metadata shorter than its record, a leftover that cannot be removed."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import write_run

import spectral_analyzer as sa
from spectral_analyzer.store import Store, StoreWriter
from spectral_analyzer.store import committing


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    write_run(root, 6, {"a.weight": (5, 4), "b.bias": (7,)}, seed=3)
    return root


def test_an_append_after_a_rolled_back_metrics_rewrite_lands_in_the_committed_series(tmp_path, source):
    """A rewrite of the metrics moved the committed group aside before its transaction failed; the rollback
    put the record back, and the next append wrote into the uncommitted group: the rows read as damaged."""
    path = tmp_path / "r.zarr"
    sa.ingest(source, path, chunk_size=16)
    with StoreWriter(path) as writer:
        writer.existing.write_metrics(np.array([0, 5, 10]), {"loss": np.array([3.0, 2.0, 1.0])})
    with pytest.raises(RuntimeError, match="refused"), StoreWriter(path) as writer:
        writer.existing.write_metrics(np.array([0, 5]), {"loss": np.array([9.0, 9.0])})
        raise RuntimeError("refused after the rewrite")
    with StoreWriter(path) as writer:
        writer.existing.append_metrics(np.array([20]), {"loss": np.array([0.5])})
    steps, series = Store.open(path).read_metrics()
    assert steps.tolist() == [0, 5, 10, 20]
    assert series["loss"].tolist() == [3.0, 2.0, 1.0, 0.5]


def test_overwriting_a_store_reached_through_a_symbolic_link_replaces_the_store_it_names(tmp_path, source):
    """The folder exchange swapped the link itself, and removing the old store then emptied its target."""
    real = tmp_path / "data" / "r.zarr"
    real.parent.mkdir()
    sa.ingest(source, real, chunk_size=16)
    link = tmp_path / "link.zarr"
    link.symlink_to(real, target_is_directory=True)
    sa.ingest(source, link, chunk_size=8, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert Store.open(real).chunk_size == 8
    assert sa.open_run(link).n_deltas == 5


def test_band_metadata_shorter_than_its_record_is_no_cache(tmp_path, source):
    """Checksums fewer than the rows the cache's attributes count raised IndexError out of every analysis."""
    path = tmp_path / "r.zarr"
    sa.ingest(source, path, chunk_size=16)
    expected = sa.open_run(path).band(max_lag=3).values
    zarr.open_group(str(path / "gram"), mode="r+")["row_crc"].resize((2,))
    assert Store.open(path).band_cache.lookup(3) is None
    np.testing.assert_array_equal(sa.open_run(path).band(max_lag=3).values, expected)


def test_a_leftover_that_cannot_be_removed_is_a_one_line_store_error(tmp_path, source, monkeypatch):
    """A killed chunk write's temporary file that cannot be removed raised a bare PermissionError."""
    path = tmp_path / "r.zarr"
    sa.ingest(source, path, chunk_size=16)
    leftover = next((path / "deltas" / "c").rglob("*[0-9]")).with_suffix(".partial")
    leftover.write_bytes(b"half a chunk")
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and p.name != ".lock"}
    unlink = os.unlink

    def refused(name, *args, **kwargs):
        if str(name).endswith(".partial"):
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return unlink(name, *args, **kwargs)

    monkeypatch.setattr(committing.os, "unlink", refused)
    with pytest.raises(sa.StoreError, match=r"r\.zarr: cannot write the store \(.*Permission denied") as exc:
        with StoreWriter(path):
            pass
    assert "\n" not in str(exc.value)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and p.name != ".lock"} == before
    with StoreWriter(path):  # the lock was let go, and the next writer removes the leftover
        pass
    assert not leftover.exists() and sa.open_run(path).n_deltas == 5


def test_a_reader_whose_metrics_group_moves_while_it_reads_gets_its_own_series(tmp_path, source, monkeypatch):
    """The group was looked up by its token, then opened by name: a rewrite in between put another group
    at that name, and the reader told the user the store was damaged."""
    from spectral_analyzer.store.location import Location

    path = tmp_path / "r.zarr"
    sa.ingest(source, path, chunk_size=16)
    with StoreWriter(path) as writer:
        writer.existing.write_metrics(np.array([0, 5, 10]), {"loss": np.array([3.0, 2.0, 1.0])})
    reader = Store.open(path)
    real, looked, busy = Location.open_group, [], []

    def meanwhile(self, mode="r", path=""):
        if path == "metrics" and not busy:
            looked.append(path)
            if len(looked) == 2:  # looked up by its token, about to be read: a rewrite now
                busy.append(True)
                with StoreWriter(tmp_path / "r.zarr") as writer:
                    writer.existing.write_metrics(np.array([0, 1]), {"loss": np.array([7.0, 8.0])})
        return real(self, mode, path)

    monkeypatch.setattr(Location, "open_group", meanwhile)
    steps, series = reader.read_metrics()
    monkeypatch.undo()
    assert steps.tolist() == [0, 5, 10] and series["loss"].tolist() == [3.0, 2.0, 1.0]
    assert Store.open(path).read_metrics()[0].tolist() == [0, 1]


def test_a_reader_whose_metrics_group_is_being_removed_is_told_to_open_again(tmp_path, source, monkeypatch):
    """A later rewrite removes the reader's group (not atomic: its token goes last): the reader found its token
    and half its arrays, and reported damage."""
    from spectral_analyzer.store import metrics

    path = tmp_path / "r.zarr"
    sa.ingest(source, path, chunk_size=16)

    def write(k):
        with StoreWriter(path) as writer:
            writer.existing.write_metrics(np.arange(5), {"loss": np.full(5, float(k)), "acc": np.full(5, k + 0.5)})

    write(0)
    reader = Store.open(path)
    write(1)  # the reader's group is metrics-previous now, still whole
    assert reader.read_metrics()[1]["loss"].tolist() == [0.0] * 5
    real, told = shutil.rmtree, []

    def removing(folder, *args, **kwargs):
        if str(folder).endswith("metrics-previous") and not told:
            real(os.path.join(folder, "acc"))  # half removed as the reader reads
            with pytest.raises(sa.StoreError) as exc:
                reader.read_metrics()
            told.append(str(exc.value))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(metrics.shutil, "rmtree", removing)
    write(2)
    assert told and "replaced since this store was opened; open it again" in told[0], told
