"""The key of every cache: whatever can change a cached number is in it, or provably cannot change it.

Each cached analysis (spectra, dynamics, weight spectra with their ESD summaries, attention spectra) is
asked for over a grid of arguments on one store, in an order where every earlier answer is cached
beside it, and compared bit for bit with ``cache=False`` on a copy with nothing cached: an argument left
out of a key would serve an earlier combination's numbers. The band, reused for every window, subset and
smaller L, is checked to be the same bits whatever L, tiling and memory limit built it. Store state:
caches copied between stores of the same rows, a store copied and then appended differently, a band
written by a build of another revision, two processes asking for different windows at once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from adversary_procs import context, start_fork_server
from conftest import write_run
from safetensors.torch import load_file, save_file
from test_cache_adversity import _Attn, _identical, _move, _uncached_copy

import spectral_analyzer as sa

SIZES = {"layers.0.a.w": (20, 9), "layers.0.b.w": (33,), "layers.1.c.w": (7, 5)}  # three tensors over several 64-element chunks
DRAWS = 200  # null draws: the default 4000 costs time and changes nothing here


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    start_fork_server()  # it imports the package while the first tests run


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """14 checkpoints of three tensors in two layers, with metrics whose learning rate varies."""
    root = tmp_path_factory.mktemp("keys")
    write_run(root / "src", 14, SIZES, seed=1)
    (root / "m.csv").write_text("step,lr,test_acc\n" + "".join(f"{10 * i},{0.01 * (1 + i % 3)},{i / 9}\n"
                                                               for i in range(14)))
    sa.ingest(root / "src", root / "r.zarr", chunk_size=64, metrics=root / "m.csv")
    return root / "r.zarr"


def _grid(base: dict, vary: dict) -> list[dict]:
    """*base*, and *base* with each value of each argument in *vary* in turn."""
    return [dict(base)] + [{**base, name: value} for name, values in vary.items() for value in values]


def _warmed_against_fresh(tmp_path: Path, store: Path, compute, grid: list[dict]) -> None:
    """Every combination on one store, each after all earlier ones were cached (one whose key missed an
    argument would be served an earlier one's numbers): bit for bit the same as a computation without the
    cache on a copy that never cached anything."""
    shutil.copytree(store, tmp_path / "warm.zarr")
    warm = sa.open_run(tmp_path / "warm.zarr")
    fresh = _uncached_copy(store, tmp_path / "fresh.zarr")
    for kw in grid:
        try:
            _identical(compute(warm, **kw), compute(fresh, cache=False, **kw))
        except AssertionError as exc:
            raise AssertionError(f"{kw}, asked for after {grid[: grid.index(kw)]}: {exc}") from None


def _spectra(run, **kw):
    return run.spectra(null_draws=kw.pop("null_draws", DRAWS), **kw)


def test_every_argument_of_spectra_is_in_its_key(store, tmp_path):
    grid = _grid({"window": 4}, {
        "window": [3], "stride": [2], "center": [True], "params": ["layers.0.*", ["layers.1.c.w", "layers.0.b.w"]],
        "group_by": ["layer", "tensor"], "steps": [(20, None), (0, 120)], "null_draws": [100], "max_lag": [5],
    })
    grid += [{"window": 3, "stride": 2, "center": True, "steps": (20, None), "group_by": "layer", "params": "layers.*"}]
    _warmed_against_fresh(tmp_path, store, _spectra, grid)


def test_every_argument_of_dynamics_is_in_its_key(store, tmp_path):
    grid = _grid({"window": 4}, {
        "window": [3], "params": ["layers.0.*"], "group_by": ["tensor"], "constant": [2.0], "lr": [0.5],
        "top_k": [1], "tau": [3.0], "factor": [1.5], "persistence": [3], "phase_fraction": [0.5],
        "steps": [(20, None)], "max_lag": [5],
    })
    _warmed_against_fresh(tmp_path, store, lambda run, **kw: run.dynamics(**kw), grid)


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    """Checkpoints of a model with packed attention, ingested with (``recorded``) and without a weight record."""
    root = tmp_path_factory.mktemp("attention")
    torch.manual_seed(0)
    model = _Attn()
    (root / "src").mkdir()
    for i in range(6):
        if i:
            _move(model, i)
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()},
                  str(root / "src" / f"step_{10 * i}.safetensors"))
    sa.ingest(root / "src", root / "recorded.zarr", weights=["*in_proj_weight[q]", "fc.weight"], chunk_size=64)
    sa.ingest(root / "src", root / "plain.zarr", chunk_size=64)
    return root


def test_every_argument_of_weight_and_attention_spectra_is_in_its_key(attention, tmp_path):
    """match, top (the ESD summaries only without it) and heads; the attention's layer and heads."""
    grid = _grid({"match": None}, {
        "match": ["fc.weight", ["*in_proj_weight[q]", "fc.weight"], "*in_proj_weight*"], "top": [2],
        "heads": [2],
    })
    grid += [{"match": "*in_proj_weight*", "top": 2, "heads": 2}, {"match": "fc.weight", "top": 1}]
    _warmed_against_fresh(tmp_path / "w", attention / "recorded.zarr",
                          lambda run, match, **kw: run.weight_spectra(match, **kw), grid)
    grid = [{"heads": 2}, {"heads": 4}, {"heads": 1}, {"heads": 2, "layer": "attn"}]
    _warmed_against_fresh(tmp_path / "a", attention / "recorded.zarr",
                          lambda run, **kw: run.attention_spectra(**kw), grid)


def test_weight_spectra_cached_from_a_weight_record_are_not_served_to_a_store_without_one(attention, tmp_path):
    """Two stores of the same rows (the same generation), one with the singular values recorded at ingest from
    the source tensors, one without (rebuilt from the float32 deltas: 1e-8 apart). A result copied from the
    first into the second was served there as its own, saying "recorded at ingest"; the record is in the key."""
    recorded = sa.open_run(shutil.copytree(attention / "recorded.zarr", tmp_path / "recorded.zarr"))
    plain = sa.open_run(shutil.copytree(attention / "plain.zarr", tmp_path / "plain.zarr"))
    assert recorded.store.results_identity == plain.store.results_identity
    want = plain.weight_spectra("fc.weight", cache=False)
    assert want.attrs["source"].startswith("theta_i = base")
    assert recorded.weight_spectra("fc.weight").attrs["source"].startswith("recorded")
    shutil.rmtree(tmp_path / "plain.zarr" / "results", ignore_errors=True)
    shutil.copytree(tmp_path / "recorded.zarr" / "results", tmp_path / "plain.zarr" / "results")
    _identical(sa.open_run(tmp_path / "plain.zarr").weight_spectra("fc.weight"), want)


def test_weight_spectra_recorded_from_other_float64_values_are_not_served(tmp_path):
    """Two runs of float64 checkpoints that differ below float32's precision: the same float32 rows (the same
    identity), other singular values recorded at ingest. A result copied from one store into the other was
    served there; what the record holds is in the key."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(4)]
    for run, nudge in (("a", 0.0), ("b", 1e-12)):
        (tmp_path / run).mkdir()
        for i, w in enumerate(base):
            save_file({"fc.weight": w + nudge * (i + 1)}, str(tmp_path / run / f"step_{10 * i}.safetensors"))
        sa.ingest(tmp_path / run, tmp_path / f"{run}.zarr", weights="fc.weight")
    a, b = sa.open_run(tmp_path / "a.zarr"), sa.open_run(tmp_path / "b.zarr")
    assert a.store.results_identity == b.store.results_identity
    want = b.weight_spectra("fc.weight", cache=False)
    assert not np.array_equal(a.weight_spectra("fc.weight")["sigma"].values, want["sigma"].values)
    shutil.copytree(tmp_path / "a.zarr" / "results", tmp_path / "b.zarr" / "results", dirs_exist_ok=True)
    _identical(sa.open_run(tmp_path / "b.zarr").weight_spectra("fc.weight"), want)


def test_the_band_is_the_same_bits_whatever_L_tiles_and_memory_built_it(tmp_path, monkeypatch):
    """A band cached at a larger L is served for every smaller one, and built in row tiles that depend on L,
    the cores and the memory limit. Each tile's rows were summed over the chunks in a tree over all tasks, so
    another tiling added the chunks in another order: spectra at L = 4 after a band of L = 24 differed from a
    fresh computation in the last bits. Now every L and tiling give the same bits."""
    import spectral_analyzer.gram.build as build

    monkeypatch.setattr(build.os, "cpu_count", lambda: 4)  # the same tiles on every machine
    write_run(tmp_path / "src", 34, {"a.w": (7, 64)}, seed=2)  # one tensor over 7 chunks, 33 rows
    sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=64)
    store = sa.open_run(tmp_path / "r.zarr").store
    assert build._row_tiles(0, 33, 7, 4, 4) != build._row_tiles(0, 33, 7, 4, 24)
    fresh = _uncached_copy(tmp_path / "r.zarr", tmp_path / "fresh.zarr")
    want = fresh.band(max_lag=4).values
    for options in ({"max_lag": 24}, {"max_lag": 4, "memory_limit": 1 << 12}, {"max_lag": 8}):
        shutil.rmtree(tmp_path / "r.zarr" / "gram", ignore_errors=True)
        np.testing.assert_array_equal(sa.open_run(store.path).band(**options).values[..., :5], want)
    sa.open_run(store.path).band(max_lag=24)
    _identical(_spectra(sa.open_run(store.path), window=4, max_lag=4),
               _spectra(_uncached_copy(tmp_path / "r.zarr", tmp_path / "f2.zarr"), window=4, max_lag=4, cache=False))


def test_the_band_is_the_same_bits_whatever_L_on_wide_chunks(tmp_path):
    """MKL rounds a product by its shape, and a block's rows were multiplied with L + 8 rows at once: on
    chunks of 16K columns a band of L = 16 and one of L = 20 differed by 1.4e-14 relative (29 entries), and
    dynamics at W = 6 after spectra at W = 20 by 1.8e-9 in the adiabatic parameter."""
    write_run(tmp_path / "src", 30, {"a.w": (64, 256), "b": (300,)}, seed=2)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", progress=False)
    assert run.store.chunk_size >= 16384
    want = _uncached_copy(tmp_path / "r.zarr", tmp_path / "fresh.zarr").band(max_lag=16).values
    for lag in (20, 17, 29):
        shutil.rmtree(tmp_path / "r.zarr" / "gram", ignore_errors=True)
        np.testing.assert_array_equal(sa.open_run(run.path).band(max_lag=lag).values[..., :17], want)
    # the widest piece of an odd width: its converted rows, of an odd stride, put the new rows at an address
    # that depended on L
    write_run(tmp_path / "odd", 30, {"c": (3001,)}, seed=3)
    odd = sa.ingest(tmp_path / "odd", tmp_path / "odd.zarr", chunk_size=4096, progress=False)
    want = _uncached_copy(tmp_path / "odd.zarr", tmp_path / "odd-fresh.zarr").band(max_lag=7).values
    for lag in (8, 9, 23):
        shutil.rmtree(tmp_path / "odd.zarr" / "gram", ignore_errors=True)
        np.testing.assert_array_equal(sa.open_run(odd.path).band(max_lag=lag).values[..., :8], want)


def test_a_band_cached_by_a_build_of_another_revision_is_not_served(tmp_path, monkeypatch):
    """A build whose band meant something else (here: twice the products) cached it under an older
    RESULTS_REVISION: this build computes its own band, as it computes its own results."""
    import spectral_analyzer.gram.build as build
    from spectral_analyzer.store import caches

    write_run(tmp_path / "src", 10, SIZES, seed=3)
    sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=64)
    want = _spectra(_uncached_copy(tmp_path / "r.zarr", tmp_path / "fresh.zarr"), window=4, cache=False)
    compute = build._compute_rows
    with monkeypatch.context() as older:
        older.setattr(caches, "RESULTS_REVISION", caches.RESULTS_REVISION - 1)
        older.setattr(build, "_compute_rows", lambda *args, **kw: 2 * compute(*args, **kw))
        sa.open_run(tmp_path / "r.zarr").band()
    got = _spectra(sa.open_run(tmp_path / "r.zarr"), window=4, cache=False)
    _identical(got, want)
    band, _ = sa.open_run(tmp_path / "r.zarr").store.band_cache.lookup(16)  # cached again, by this revision
    np.testing.assert_array_equal(band, sa.open_run(tmp_path / "fresh.zarr").band().values)


def test_caches_of_a_copy_appended_with_other_checkpoints_are_not_served(tmp_path):
    """A store copied; each copy appended with other checkpoints at the same steps; every cache of one copied
    into the other: the band rows they share are reused, and every number equals a fresh computation."""
    one = write_run(tmp_path / "one", 16, SIZES, seed=4)
    gen = torch.Generator().manual_seed(5)
    state = load_file(str(one[8]))
    for f in one[9:]:  # another walk on from step 80
        state = {k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        save_file(state, str(tmp_path / f.name))
    for folder, files in (("first", one[:9]), ("two", one[:9] + [tmp_path / f.name for f in one[9:]])):
        (tmp_path / folder).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / folder / f.name)
    sa.ingest(tmp_path / "first", tmp_path / "a.zarr", chunk_size=64)
    sa.open_run(tmp_path / "a.zarr").spectra(window=4, null_draws=DRAWS)
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "b.zarr")
    for name, src in (("a", "one"), ("b", "two")):
        run = sa.ingest(tmp_path / src, tmp_path / f"{name}.zarr")
        assert run.n_deltas == 15
        _spectra(run, window=4), _spectra(run, window=3, group_by="layer")
    for cache in ("gram", "results"):
        shutil.rmtree(tmp_path / "a.zarr" / cache)
        shutil.copytree(tmp_path / "b.zarr" / cache, tmp_path / "a.zarr" / cache)
    a = sa.open_run(tmp_path / "a.zarr")
    fresh = _uncached_copy(tmp_path / "a.zarr", tmp_path / "fresh.zarr")
    for kw in ({"window": 4}, {"window": 3, "group_by": "layer"}):
        _identical(_spectra(a, **kw), _spectra(fresh, cache=False, **kw))
    np.testing.assert_array_equal(a.band().values, fresh.band().values)


def _ask(path: str, window: int, max_lag: int, out: str) -> None:
    """A process's spectra and dynamics of *window* at *max_lag*, saved to *out*."""
    run = sa.open_run(path)
    ds = run.spectra(window=window, max_lag=max_lag, null_draws=DRAWS)
    dyn = run.dynamics(window=window, max_lag=max_lag)
    np.savez(out, sigma=ds["sigma"].values, alpha=dyn["alpha"].values)


def test_two_processes_asking_for_different_windows_at_once_get_their_own(store, tmp_path):
    """One process asks for window 3 (L = 16), another for window 5 with L = 24, which replaces the band the
    first reads: each gets its own window's numbers, and the caches they leave serve the right ones."""
    path = shutil.copytree(store, tmp_path / "r.zarr")
    for cache in ("gram", "results"):
        shutil.rmtree(path / cache, ignore_errors=True)
    asks = {3: 16, 5: 24}
    procs = [context().Process(target=_ask, args=(str(path), w, lag, str(tmp_path / f"{w}.npz")))
             for w, lag in asks.items()]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    fresh = _uncached_copy(store, tmp_path / "fresh.zarr")
    run = sa.open_run(path)
    for w, lag in asks.items():
        spectra = _spectra(fresh, window=w, max_lag=lag, cache=False)
        dynamics = fresh.dynamics(window=w, max_lag=lag, cache=False)
        got = np.load(tmp_path / f"{w}.npz")
        np.testing.assert_array_equal(got["sigma"], spectra["sigma"].values)
        np.testing.assert_array_equal(got["alpha"], dynamics["alpha"].values)
        _identical(_spectra(run, window=w, max_lag=lag), spectra)
        _identical(run.dynamics(window=w, max_lag=lag), dynamics)
