"""Results describe themselves: every variable and coordinate of every result has a long_name."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES

import spectral_analyzer as sa


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path_factory.mktemp("attrs") / "wd1.zarr")


def test_every_variable_and_coordinate_of_every_result_has_a_long_name(run):
    results = {
        "spectra": run.spectra(window=10),
        "grouped spectra": run.spectra(window=10, group_by="module"),
        "dynamics": run.dynamics(window=10),
        "weight spectra": run.weight_spectra(),
        "grokking": run.grokking(window=10),
        "attention spectra": run.attention_spectra(heads=4),
        "qk grokking": run.grokking(operator="qk", heads=4),
        "correlate": run.correlate("test_loss", window=10),
        "band": run.band(max_lag=4).to_dataset(),
        "tensors": run.tensors,
        "metrics": run.metrics,
    }
    for kind, ds in results.items():
        for name in [*ds.data_vars, *ds.coords]:
            assert ds[name].attrs.get("long_name"), (kind, name)
    assert results["spectra"].gap_ratio.attrs["units"] == "1"
    assert results["spectra"].sigma.attrs["long_name"] == "singular value sigma_j"


def test_window_start_is_the_step_the_window_begins_at(run):
    ds = run.spectra(window=10)
    steps = run.checkpoint_steps
    first = int(np.searchsorted(steps, ds.step.values[0]))
    assert first == 10  # the first full window ends at the 10th delta
    np.testing.assert_array_equal(ds.window_start.values, steps[np.arange(first, first + ds.sizes["step"]) - 10])
    assert (run.dynamics(window=10).window_start.values < run.dynamics(window=10).step.values).all()


def test_tensors_by_name_shape_and_html(run):
    tensors = run.tensors
    assert all(isinstance(s, tuple) and all(isinstance(d, int) for d in s) for s in tensors["shape"].values)
    name = str(tensors["tensor"].values[0])
    delta = run.delta(name)
    entry = tensors.sel(tensor=name)
    assert delta.shape == (run.n_deltas, *entry["shape"].item())
    offset, size = int(entry["offset"]), int(entry["size"])
    np.testing.assert_array_equal(delta.values.reshape(run.n_deltas, -1), run.deltas.values[:, offset : offset + size])
    with pytest.raises(sa.SelectionError, match="no tensor 'nope'"):
        run.delta("nope")
    html = run._repr_html_()
    assert "<table>" in html and f"{run.n_params:,}" in html
    prov = run.provenance
    assert prov["checkpoints"] == run.n_deltas + 1 and prov["first"]["step"] == 0 and "sources" not in prov
