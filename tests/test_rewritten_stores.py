"""A store rewritten by another process (overwritten, or its rows truncated and recorded again) while a
reader holds it or is opening it: told as rewritten, never as damage (a healthy store is not to be
ingested again), and nothing of the other run is served as this one's."""

from __future__ import annotations

import pytest
from conftest import write_run

import spectral_analyzer as sa
import spectral_analyzer.store.core as core
from spectral_analyzer.store import Store
from spectral_analyzer.store.reading import RowReading
from spectral_analyzer.store.writer import StoreWriter


@pytest.fixture
def runs(tmp_path):
    write_run(tmp_path / "a", 8, {"w": (6, 5), "v": (7,)}, seed=1)
    write_run(tmp_path / "b", 8, {"w": (6, 5), "v": (7,)}, seed=2)
    return tmp_path


def test_sources_of_a_run_in_hand_after_an_overwrite_are_refused(runs):
    """run.sources and run.provenance read the sources array at call time: after an overwrite they named
    the other run's files as this run's."""
    run = sa.ingest(runs / "a", runs / "s.zarr", progress=False)
    assert "a" in run.sources[3]["label"].split("/")[-2:][0]
    sa.ingest(runs / "b", runs / "s.zarr", progress=False, overwrite=True)
    for read in (lambda: run.sources, lambda: run.provenance):
        with pytest.raises(sa.StoreRewrittenError, match=r"s\.zarr: the sources of its checkpoints: "
                                                         r"(over|re)written since this store was opened; open it again"):
            read()


def test_sources_of_a_run_in_hand_after_an_append_are_its_own(runs, tmp_path):
    write_run(tmp_path / "c", 5, {"w": (6, 5), "v": (7,)}, seed=1)
    run = sa.ingest(tmp_path / "c", runs / "s.zarr", progress=False)
    write_run(tmp_path / "c", 8, {"w": (6, 5), "v": (7,)}, seed=1)  # the same run, three checkpoints later
    sa.ingest(tmp_path / "c", runs / "s.zarr", progress=False)
    assert [s["step"] for s in run.sources] == list(run.checkpoint_steps)


def test_deltas_of_a_run_in_hand_after_an_overwrite_say_so(runs):
    """A held run's lazy deltas said 'chunk 2/0 of deltas (the delta ending at step ...) is missing' or
    'truncated'; its spectra named a step of the other run."""
    run = sa.ingest(runs / "a", runs / "s.zarr", progress=False, chunk_size=16)
    deltas = run.deltas
    sa.ingest(runs / "b", runs / "s.zarr", progress=False, overwrite=True, chunk_size=16)
    for read in (lambda: deltas.values, lambda: run.spectra(window=3, cache=False)):
        with pytest.raises(sa.StoreRewrittenError, match=r"chunk \d+/\d+ of deltas: (over|re)written "
                                                         "since this store was opened; open it again"):
            read()


def test_a_store_truncated_while_it_is_opened_is_opened_again(runs, monkeypatch):
    """A reader that had read the root metadata when a recorder's resume truncated the rows was told 'the
    store is damaged ... ingest the run again'."""
    sa.ingest(runs / "a", runs / "s.zarr", progress=False)
    real, calls = core.check_format, []

    def truncated_meanwhile(*args, **kwargs):  # after the root metadata is read, before the arrays are
        real(*args, **kwargs)
        if not calls:
            calls.append(1)
            with StoreWriter(str(runs / "s.zarr")) as writer:
                writer.existing.truncate(3)

    monkeypatch.setattr(core, "check_format", truncated_meanwhile)
    assert Store.open(str(runs / "s.zarr")).n_deltas == 3
    monkeypatch.setattr(core, "check_format", real)
    group = Store.open(str(runs / "s.zarr")).group
    stale = {**group.attrs.asdict(), "commit": {**group.attrs["commit"], "n_deltas": 7}}
    with pytest.raises(sa.StoreRewrittenError, match="rewritten since this store was opened"):
        Store(group, Store.open(str(runs / "s.zarr")).location, stale)._check(True)


def test_damage_in_a_store_whose_record_lacks_head_step_is_damage(runs):
    """The first format-3 stores committed no head_step (added in memory when opened): a damaged step value
    was told as 'rewritten since this store was opened', after three opens."""
    sa.ingest(runs / "a", runs / "s.zarr", progress=False)
    group = Store.open(str(runs / "s.zarr"), "r+").group
    record = dict(group.attrs["commit"])
    record.pop("head_step")
    group.attrs["commit"] = record
    assert Store.open(str(runs / "s.zarr")).n_deltas == 7
    steps = group["step"][:]
    steps[2] += 1
    group["step"][:] = steps
    with pytest.raises(sa.StoreError, match="the store is damaged: the steps or chunk checksums"):
        Store.open(str(runs / "s.zarr"))


def test_a_store_gone_while_it_is_opened_again_is_a_one_line_error(runs, monkeypatch):
    sa.ingest(runs / "a", runs / "s.zarr", progress=False)
    real, calls = core.check_format, []

    def truncated_meanwhile(*args, **kwargs):  # truncated by another process while it is opened
        real(*args, **kwargs)
        if not calls:
            calls.append(1)
            with StoreWriter(str(runs / "s.zarr")) as writer:
                writer.existing.truncate(3)

    changed = RowReading._changed

    def then_gone(self):  # ... and its metadata replaced before it is opened again
        found = changed(self)
        if found:
            (runs / "s.zarr" / "zarr.json").rename(runs / "zarr.json.moved")
        return found

    monkeypatch.setattr(core, "check_format", truncated_meanwhile)
    monkeypatch.setattr(RowReading, "_changed", then_gone)
    with pytest.raises(sa.StoreError, match=r"s\.zarr: not a spectral-analyzer store"):
        Store.open(str(runs / "s.zarr"))


def test_a_path_ending_in_dot_dot_through_a_symbolic_link_is_the_folder_above_its_target(runs, monkeypatch):
    sa.ingest(runs / "a", runs / "s.zarr", progress=False)
    (runs / "work").mkdir()
    (runs / "work" / "d").symlink_to(runs / "s.zarr" / "deltas")
    monkeypatch.chdir(runs / "work")
    assert sa.open_run("d/..").n_deltas == 7
