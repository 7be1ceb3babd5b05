"""Weights rebuilt a group of tensors at a time, the next delta row read while the current one is decomposed."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_run
from safetensors.numpy import load_file

import spectral_analyzer as sa
from spectral_analyzer.store import Store, TensorEntry
from spectral_analyzer.weights import streaming

SIZES = {"a.weight": (40, 24), "b.bias": (40,), "c.weight": (24, 96), "d.weight": (30, 30), "e.weight": (200, 16)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    paths = write_run(root / "ckpts", 6, SIZES, seed=3, scale=0.2)
    return sa.ingest(root / "ckpts", root / "run.zarr", chunk_size=1000, progress=False), paths


def test_groups_are_adjacent_runs_under_the_limit():
    entries = [TensorEntry(f"t{i}", o, s, (s,), "float32") for i, (o, s) in enumerate([(50, 10), (0, 20), (20, 30), (60, 500)])]
    assert streaming.tensor_groups(entries, limit=8 * 50) == [[1, 2], [0], [3]]  # t3 alone is over the limit
    assert streaming.tensor_groups(entries) == [[1, 2, 0, 3]]


def test_thetas_are_base_plus_float64_sums_of_deltas(run):
    r, _ = run
    store = Store.open(r.path)
    entries = sorted(store.manifest, key=lambda t: t.offset)[1:4]
    base = r.base.values.astype(np.float64)
    deltas = r.deltas.values.astype(np.float64)
    for k, flats in enumerate(streaming.thetas(store, entries)):
        want = base + deltas[:k].sum(axis=0)
        for t, got in zip(entries, flats):
            np.testing.assert_array_equal(got, want[t.offset : t.offset + t.size])
    assert k == store.n_deltas


@pytest.mark.parametrize("limit", [1, 8 * 40 * 24])
def test_grouping_does_not_change_the_spectra(run, monkeypatch, limit):
    """One group per tensor, or a few, give the same values as all at once, and match the checkpoints' own SVD."""
    r, paths = run
    whole = r.weight_spectra(cache=False)
    monkeypatch.setattr(streaming, "GROUP_BYTES", limit)
    grouped = r.weight_spectra(cache=False)
    np.testing.assert_array_equal(grouped["sigma"].values, whole["sigma"].values)
    for k, path in enumerate(paths):
        state = load_file(str(path))
        for name in ("a.weight", "c.weight", "d.weight", "e.weight"):
            want = np.linalg.svd(state[name].astype(np.float64), compute_uv=False)
            got = grouped["sigma"].sel(matrix=name).values[k, : want.size]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * want[0])


def test_top_keeps_the_leading_values_and_the_whole_matrix_stable_rank(run):
    r, _ = run
    whole = r.weight_spectra(cache=False)
    top = r.weight_spectra(top=2, cache=False)
    assert top.sizes["rank"] == 2
    np.testing.assert_allclose(top["sigma"].values, whole["sigma"].values[..., :2], rtol=1e-12)
    np.testing.assert_allclose(top["stable_rank"].values, whole["stable_rank"].values, rtol=1e-12)


def test_stacked_experts_are_decomposed_one_matrix_each(tmp_path):
    """A 3-D ``experts`` tensor (E, d, d_ff) is E matrices; a 3-D tensor of another kind (a conv kernel) is not."""
    sizes = {"mlp.experts.gate_up_proj": (3, 16, 40), "conv.weight": (8, 4, 3), "head.weight": (10, 16)}
    paths = write_run(tmp_path / "ckpts", 3, sizes, seed=5, scale=0.3)
    r = sa.ingest(tmp_path / "ckpts", tmp_path / "moe.zarr", progress=False)
    ws = r.weight_spectra(cache=False)
    names = list(ws["matrix"].values)
    experts = [f"mlp.experts.gate_up_proj[expert {e}]" for e in range(3)]
    assert sorted(names) == sorted(experts + ["head.weight"])  # conv.weight is not a stack of matrices
    for k, path in enumerate(paths):
        stack = load_file(str(path))["mlp.experts.gate_up_proj"].astype(np.float64)
        for e in range(3):
            want = np.linalg.svd(stack[e], compute_uv=False)
            got = ws["sigma"].sel(matrix=f"mlp.experts.gate_up_proj[expert {e}]").values[k, : want.size]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * want[0])
    assert list(r.weight_spectra(experts[1], cache=False)["matrix"].values) == [experts[1]]


def test_esd_summaries_of_every_matrix_and_none_with_top(run):
    from spectral_analyzer.weights.esd import esd_summary

    r, _ = run
    ws = r.weight_spectra(cache=False)
    for name, shape in (("a.weight", (40, 24)), ("e.weight", (200, 16))):
        want = esd_summary(ws["sigma"].sel(matrix=name).values[..., : min(shape)], shape)
        for key, var in (("alpha", "pl_alpha"), ("n_outliers", "n_outliers"), ("mp_edge", "mp_edge")):
            np.testing.assert_array_equal(ws[var].sel(matrix=name).values, want[key])
    assert np.isfinite(ws["pl_alpha"].sel(matrix="e.weight").values).all()
    assert "pl_alpha" not in r.weight_spectra(top=2, cache=False)
