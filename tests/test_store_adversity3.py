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


def _drop_from_commit(path: Path, key: str) -> None:
    """The commit record as an earlier build wrote it, without *key*."""
    import json

    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["commit"][key]
    (path / "zarr.json").write_text(json.dumps(meta))


def test_a_store_whose_commit_has_no_last_step_is_read_and_appended(tmp_path, source):
    """The first stores of format 3 recorded no head_step: a raw KeyError from open_run and ingest, and
    'damaged' from info."""
    from spectral_analyzer.store.summary import summarize

    part = tmp_path / "part"
    part.mkdir()
    for f in sorted(source.iterdir(), key=lambda p: int(p.stem.split("_")[1]))[:4]:
        (part / f.name).write_bytes(f.read_bytes())
    path = tmp_path / "r.zarr"
    sa.ingest(part, path, chunk_size=16)
    _drop_from_commit(path, "head_step")
    assert sa.open_run(path).checkpoint_steps.tolist() == [0, 10, 20, 30]
    assert summarize(path).checkpoint_steps == (0, 30)
    sa.ingest(source, path, chunk_size=16)
    fresh = sa.ingest(source, tmp_path / "f.zarr", chunk_size=16)
    np.testing.assert_array_equal(sa.open_run(path).deltas.values, fresh.deltas.values)


def test_an_append_to_a_store_that_did_not_record_exactness_reads_the_last_checkpoint(tmp_path):
    """A store from before commits recorded last_exact, its first checkpoint float32 and the later ones float64:
    the float32 copy of the last was taken as exact (from the first's dtypes), and the first appended delta was
    taken from rounded values (4e-5 relative)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(5)
    (tmp_path / "src").mkdir()
    theta = torch.randn(40, generator=gen, dtype=torch.float64)
    for i in range(6):
        theta = theta + 1e-3 * torch.randn(40, generator=gen, dtype=torch.float64)
        save_file({"w": theta.float() if i == 0 else theta}, str(tmp_path / "src" / f"step_{i}.safetensors"))
    with pytest.warns(sa.PrecisionChangeWarning):
        fresh = sa.ingest(tmp_path / "src", tmp_path / "f.zarr", chunk_size=16)
    (tmp_path / "half").mkdir()
    for i in range(4):
        (tmp_path / "half" / f"step_{i}.safetensors").write_bytes((tmp_path / "src" / f"step_{i}.safetensors")
                                                                 .read_bytes())
    with pytest.warns(sa.PrecisionChangeWarning):
        sa.ingest(tmp_path / "half", tmp_path / "r.zarr", chunk_size=16)
    _drop_from_commit(tmp_path / "r.zarr", "last_exact")
    sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=16)
    np.testing.assert_array_equal(sa.open_run(tmp_path / "r.zarr").deltas.values, fresh.deltas.values)
