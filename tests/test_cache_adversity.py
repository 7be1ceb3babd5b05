"""Every cache under changed data: the band, cached results, the weight record, in-process memos.

Each test changes the data under a cache in a way the tool allows (a recorder resumed earlier that
rewrites the same steps with other values, an overwrite by another run of the same shape and steps,
metrics replaced, caches copied from another store) and checks that what comes back equals a fresh
computation on a copy of the store with no cache at all (``cache=False``), bit for bit, or is an
error: never the old numbers, never another commit's. (What the generation chain cannot see, a rewrite
whose every changed chunk keeps its crc32c, is stated in store/generations.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_run
from safetensors.torch import save_file

import spectral_analyzer as sa

W = 4


def _uncached_copy(store: Path, dst: Path) -> sa.Run:
    """A copy of the store without its band and results: what a fresh computation sees."""
    shutil.copytree(store, dst)
    for cache in ("gram", "results"):
        shutil.rmtree(dst / cache, ignore_errors=True)
    return sa.open_run(dst)


def _identical(a, b) -> None:
    """Every variable and coordinate bit for bit (NaN where NaN), and the same attributes."""
    assert set(a.variables) == set(b.variables)
    for k in a.variables:
        x, y = a[k].values, b[k].values
        assert x.dtype == y.dtype, k
        if x.dtype.kind in "fc":
            assert np.array_equal(x, y, equal_nan=True), k
        else:
            assert np.array_equal(x, y), k
    assert a.attrs.keys() == b.attrs.keys()
    for k in a.attrs:
        x, y = a.attrs[k], b.attrs[k]
        assert x == y or (x != x and y != y), (k, x, y)  # NaN attributes (dynamics' factor) are equal


# -- a recorder resumed earlier rewrites the same steps: every cache recomputed ------------------------


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2)
        self.fc = torch.nn.Linear(8, 6)


def _move(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.fixture
def recorded(tmp_path):
    """An ingested run (weights recorded at ingest, metrics) and the model at each of its steps."""
    torch.manual_seed(0)
    model = _Attn()
    src = tmp_path / "src"
    src.mkdir()
    states = {}
    for i in range(14):
        if i:
            _move(model, i)
        states[10 * i] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_file(states[10 * i], str(src / f"step_{10 * i}.safetensors"))
    (tmp_path / "m.csv").write_text("step,test_acc,lr\n" + "".join(f"{10 * i},{min(1, i / 9)},0.01\n" for i in range(14)))
    store = tmp_path / "r.zarr"
    sa.ingest(src, store, weights=["*in_proj_weight[q]", "fc.weight"], metrics=tmp_path / "m.csv", chunk_size=64)
    return store, model, states


def _resume_on_another_trajectory(store: Path, model, states, at: int, last: int, seed: int) -> None:
    """Training resumed at step *at* (Recorder.resume drops the rows after it) and recorded again to *last*."""
    model.load_state_dict(states[at])
    rec = sa.Recorder(store, model, chunk_size=64)
    with pytest.warns(sa.RecordingWarning, match="dropping"):
        rec.resume(at)
    for step in range(at + 10, last + 1, 10):
        _move(model, seed + step)
        rec.step(step, test_acc=min(1, step / 90), lr=0.01)
    rec.flush()


def _everything(run: sa.Run, cache: bool = True) -> dict:
    return {
        "spectra": run.spectra(window=W, cache=cache),
        "grouped": run.spectra(window=W, group_by="tensor", params="*weight*", cache=cache),
        "centred": run.spectra(window=W, center=True, stride=2, steps=(30, None), cache=cache),
        "dynamics": run.dynamics(window=W, cache=cache),
        "recorded": run.weight_spectra(["*in_proj_weight[q]", "fc.weight"], cache=cache),
        "rebuilt": run.weight_spectra(cache=cache),
        "attention": run.attention_spectra(heads=2, cache=cache),
    }


def test_rows_rewritten_at_the_same_steps_recompute_every_cache(recorded, tmp_path):
    store, model, states = recorded
    old = sa.open_run(store)
    before = _everything(old)
    assert before["recorded"].attrs["source"] == "recorded at ingest from the source tensors"
    assert before["rebuilt"].attrs["source"].startswith("theta_i = base")
    _resume_on_another_trajectory(store, model, states, 80, 130, 1000)
    run = sa.open_run(store)
    assert run.n_deltas == old.n_deltas and list(run.steps) == list(old.steps)
    assert run.store.identity != old.store.identity
    fresh = _everything(_uncached_copy(store, tmp_path / "fresh.zarr"), cache=False)
    for first in (_everything(run), _everything(sa.open_run(store))):  # computed (band reused up to row 8), then cached
        for name, ds in first.items():
            _identical(ds, fresh[name])
            assert not ds.identical(before[name]), name
    # the band: the rows before the rewritten ones reused, and equal to a build from scratch
    np.testing.assert_array_equal(run.band(max_lag=16).values, sa.open_run(tmp_path / "fresh.zarr").band().values)
    g, f = run.grokking(window=W), sa.open_run(tmp_path / "fresh.zarr").grokking(window=W)
    for k in g.data_vars:
        np.testing.assert_array_equal(g[k].values, f[k].values)


def test_an_older_run_object_never_mixes_its_rows_with_rewritten_ones(recorded):
    """Band, spectra, dynamics and attention of a Run opened before the rewrite: an error naming the row."""
    store, model, states = recorded
    old = sa.open_run(store)
    _resume_on_another_trajectory(store, model, states, 80, 130, 1000)
    for compute in (lambda: old.spectra(window=W), lambda: old.dynamics(window=W),
                    lambda: old.attention_spectra(heads=2), lambda: old.weight_spectra("attn.out_proj.weight")):
        with pytest.raises(sa.StoreError, match="rewritten since this store was opened"):
            compute()


def test_an_older_run_object_does_not_serve_rewritten_recorded_singular_values(recorded):
    """A Run opened before the rows after step 80 were rewritten: the weight record's rows carry their
    generation, so the new rows' recorded singular values are not taken for its own; rebuilt from its
    rows, which are gone, it raises as every other analysis of that Run does."""
    store, model, states = recorded
    old = sa.open_run(store)
    own = old.weight_spectra("fc.weight", cache=False)
    _resume_on_another_trajectory(store, model, states, 80, 130, 1000)
    assert own.attrs["source"].startswith("recorded")
    with pytest.raises(sa.StoreError, match="rewritten since this store was opened"):
        old.weight_spectra("fc.weight", cache=False)
    assert sa.open_run(store).weight_spectra("fc.weight", cache=False).attrs["source"].startswith("recorded")


def test_an_older_run_object_after_an_overwrite_by_another_run(tmp_path):
    """As above, after ``ingest --overwrite`` of another run of the same shape and steps."""
    sizes = {"a.weight": (12, 9), "b.weight": (10, 7)}
    write_run(tmp_path / "one", 8, sizes, seed=1)
    write_run(tmp_path / "two", 8, sizes, seed=2)
    store = tmp_path / "r.zarr"
    sa.ingest(tmp_path / "one", store, weights="*weight", chunk_size=64)
    old = sa.open_run(store)
    own = old.weight_spectra("a.weight", cache=False)
    sa.ingest(tmp_path / "two", store, weights="*weight", chunk_size=64, overwrite=True)
    with pytest.raises(sa.StoreError):
        old.spectra(window=W)
    assert own.attrs["source"].startswith("recorded")
    with pytest.raises(sa.StoreError):
        old.weight_spectra("a.weight", cache=False)


def test_an_older_run_objects_deltas_are_its_own(tmp_path):
    """Run.deltas, Run.delta and Run.base read through the Run's snapshot, checked against its commit's chunk
    checksums: rows rewritten since it was opened are an error, never the new rows as its own."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    store = tmp_path / "r.zarr"
    rec = sa.Recorder(store, model)
    states = {}
    for s in range(8):
        if s:
            _move(model, s)
        states[s] = {k: v.clone() for k, v in model.state_dict().items()}
        rec.step(s)
    old = sa.open_run(store)
    own = old.deltas.values.copy()
    model.load_state_dict(states[4])
    rec = sa.Recorder(store, model)
    with pytest.warns(sa.RecordingWarning):
        rec.resume(4)
    for s in range(5, 8):
        _move(model, 100 + s)
        rec.step(s)
    assert sa.open_run(store).n_deltas == old.n_deltas
    with pytest.raises(sa.StoreError, match="rewritten since this store was opened"):
        old.deltas.values
    with pytest.raises(sa.StoreError, match="rewritten since this store was opened"):
        old.delta("weight").values
    np.testing.assert_array_equal(old.deltas[:4].values, own[:4])  # rows 0-3 are the same rows
    np.testing.assert_array_equal(old.base.values, sa.open_run(store).base.values)


# -- what a cached result says about how it was made ----------------------------------------------------


def test_a_cached_result_says_the_max_lag_it_was_asked_for(tmp_path):
    """max_lag is part of a result's key as of its attributes: asked with max_lag=24 after a call with the
    default, the result says 24, as a fresh computation does."""
    write_run(tmp_path / "src", 10, {"a.w": (20, 9)}, seed=3)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=64)
    run.spectra(window=W)
    run.dynamics(window=W)
    fresh = _uncached_copy(tmp_path / "r.zarr", tmp_path / "f.zarr")
    _identical(run.spectra(window=W, max_lag=24), fresh.spectra(window=W, max_lag=24, cache=False))
    _identical(run.dynamics(window=W, max_lag=24), fresh.dynamics(window=W, max_lag=24, cache=False))


def test_caches_copied_from_another_store_of_the_same_shape_and_steps_are_not_served(tmp_path):
    sizes = {"a.w": (20, 9), "b.w": (33,)}
    write_run(tmp_path / "one", 10, sizes, seed=1)
    write_run(tmp_path / "two", 10, sizes, seed=2)
    mine = sa.ingest(tmp_path / "one", tmp_path / "mine.zarr", chunk_size=64)
    other = sa.ingest(tmp_path / "two", tmp_path / "other.zarr", chunk_size=64)
    other.spectra(window=W)
    fresh = mine.spectra(window=W, cache=False)
    shutil.rmtree(tmp_path / "mine.zarr" / "gram", ignore_errors=True)
    shutil.copytree(tmp_path / "other.zarr" / "gram", tmp_path / "mine.zarr" / "gram")
    mine.spectra(window=W)  # caches mine's result: its name
    (name,) = [p.name for p in (tmp_path / "mine.zarr" / "results").iterdir() if p.is_dir()]
    (theirs,) = [p for p in (tmp_path / "other.zarr" / "results").iterdir() if p.is_dir()]
    shutil.rmtree(tmp_path / "mine.zarr" / "results" / name)
    shutil.copytree(theirs, tmp_path / "mine.zarr" / "results" / name)  # the other's result under mine's name
    shutil.rmtree(tmp_path / "mine.zarr" / "gram")
    shutil.copytree(tmp_path / "other.zarr" / "gram", tmp_path / "mine.zarr" / "gram")
    run = sa.open_run(tmp_path / "mine.zarr")
    _identical(run.spectra(window=W), fresh)
    np.testing.assert_array_equal(run.band().values, _uncached_copy(tmp_path / "mine.zarr", tmp_path / "f.zarr").band().values)


def test_metrics_replaced_recompute_what_depends_on_them(tmp_path):
    write_run(tmp_path / "src", 10, {"a.w": (12, 9)}, seed=1)
    for name, lr in (("m1", 0.01), ("m2", 0.02)):
        (tmp_path / f"{name}.csv").write_text("step,lr,test_acc\n" + "".join(
            f"{10 * i},{lr},{i / (9 if lr == 0.01 else 20)}\n" for i in range(10)))
    store = tmp_path / "r.zarr"
    first = sa.ingest(tmp_path / "src", store, metrics=tmp_path / "m1.csv", chunk_size=64)
    d1, g1 = first.dynamics(window=W), first.grokking(window=W)
    sa.ingest(tmp_path / "src", store, metrics=tmp_path / "m2.csv")  # no new checkpoint: the metrics only
    run = sa.open_run(store)
    assert run.store.identity == first.store.identity and run.store.results_identity != first.store.results_identity
    fresh = _uncached_copy(store, tmp_path / "f.zarr")
    _identical(run.dynamics(window=W), fresh.dynamics(window=W, cache=False))
    assert run.dynamics(window=W).lr.values[0] == 0.02
    assert float(g1.grok_step) == 90 and np.isnan(float(run.grokking(window=W).grok_step))
    _identical(first.dynamics(window=W), d1)  # the older Run: its own metrics (kept beside the new ones)


def test_results_cached_by_an_earlier_revision_of_the_definitions_are_not_served(tmp_path, monkeypatch):
    """A store analysed by a build whose definitions differ (RESULTS_REVISION) keeps its results, but a build
    of another revision computes its own: each result's name holds the revision."""
    import spectral_analyzer.dynamics as dynamics
    import spectral_analyzer.spectra as spectra
    import spectral_analyzer.weights as weights

    write_run(tmp_path / "src", 10, {"a.w": (20, 9)}, seed=3)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=64)
    results = tmp_path / "r.zarr" / "results"

    def names():
        return {p.name for p in results.iterdir() if p.is_dir()} if results.exists() else set()

    run.spectra(window=W), run.dynamics(window=W), run.weight_spectra()
    before = names()
    assert len(before) == 3
    for module in (spectra, dynamics, weights):
        monkeypatch.setattr(module, "RESULTS_REVISION", module.RESULTS_REVISION + 1)
    run.spectra(window=W), run.dynamics(window=W), run.weight_spectra()
    after = names()
    assert len(after - before) == 3


def test_a_band_extension_finished_after_another_writer_replaced_the_cache_leaves_it_whole(tmp_path, monkeypatch):
    """A extends the cached band from its last block while B caches a band of another max_lag for every row:
    A's rows, which extend a prefix no longer there, are not written, and B's cache stays whole (before, A
    replaced it with its rows alone, marked complete, rows 0..start-1 a hole)."""
    from spectral_analyzer.gram import build

    write_run(tmp_path / "src", 30, {"a.w": (20, 9)}, seed=3)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=64)
    run.band(max_lag=3)
    write_run(tmp_path / "more", 50, {"a.w": (20, 9)}, seed=3)
    for f in sorted((tmp_path / "more").iterdir())[30:]:
        shutil.copy(f, tmp_path / "src" / f.name)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr")
    compute = build._compute_rows
    starts = []

    def meanwhile_another_writer(store, lag, start, n, *args, **kwargs):
        starts.append(start)
        rows = compute(store, lag, start, n, *args, **kwargs)
        if len(starts) == 1:
            sa.open_run(tmp_path / "r.zarr").band(max_lag=12)  # B, from scratch: rows 0.. at L = 12
        return rows

    monkeypatch.setattr(build, "_compute_rows", meanwhile_another_writer)
    got = run.band(max_lag=3).values
    assert starts[0] > 0  # A extended the cached prefix
    monkeypatch.undo()
    fresh = _uncached_copy(tmp_path / "r.zarr", tmp_path / "f.zarr").band(max_lag=3).values
    np.testing.assert_array_equal(got, fresh)
    cached = sa.open_run(tmp_path / "r.zarr").store.band_cache.lookup(12)
    assert cached is not None and cached[0].shape[1] == run.n_deltas and cached[1] == 12
