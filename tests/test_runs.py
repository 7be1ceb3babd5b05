"""Runs side by side: every result along ``run``, steps outer-joined, missing values NaN."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import FIXTURES

import spectral_analyzer as sa


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    sa.ingest(FIXTURES / "grokking" / "wd1", root / "wd1.zarr")
    # wd0 with its last 10 checkpoints left out: the runs cover different steps
    src = root / "wd0-src"
    shutil.copytree(FIXTURES / "grokking" / "wd0", src)
    for f in sorted(src.glob("*.safetensors"))[-10:]:
        f.unlink()
    sa.ingest(src, root / "wd0.zarr", metrics=FIXTURES / "grokking" / "wd0" / "metrics.csv")
    return root


def test_results_along_run_equal_each_runs_own(stores):
    runs = sa.open_runs(str(stores / "wd*.zarr"))
    assert runs.labels == ["wd0", "wd1"]
    both = runs.spectra(window=10)
    assert both.sizes["run"] == 2 and list(both["store"].values) == [str(stores / "wd0.zarr"), str(stores / "wd1.zarr")]
    for label in runs.labels:
        own = runs[label].spectra(window=10)
        part = both.sel(run=label).sel(step=own.step)
        np.testing.assert_array_equal(part.gap_ratio.values, own.gap_ratio.values)
        np.testing.assert_array_equal(part.sigma.values, own.sigma.values)
    # wd0 stops earlier: its later steps are missing (NaN), not sentinels
    late = both.sel(run="wd0").gap_ratio.sel(step=both.step > runs["wd0"].steps[-1])
    assert late.size > 0 and np.isnan(late.values).all()
    assert both.gap_ratio.attrs["long_name"] and "store" not in both.attrs


def test_dynamics_events_and_grokking_concatenate(stores):
    runs = sa.open_runs([stores / "wd1.zarr", stores / "wd0.zarr"])
    dyn = runs.dynamics(window=10)
    for label in runs.labels:
        own = runs[label].dynamics(window=10)
        kinds = dyn.sel(run=label).event_kind.values[: own.sizes["event"]]
        assert list(kinds) == list(own.event_kind.values)
    grok = runs.grokking(window=10)
    assert float(grok.grok_step.sel(run="wd1")) == 1400
    assert np.isnan(float(grok.grok_step.sel(run="wd0")))  # never grokked: missing, not -1
    assert list(grok["store"].values) == [str(stores / "wd1.zarr"), str(stores / "wd0.zarr")]


def test_labels_are_unique_and_a_glob_must_match(tmp_path):
    from spectral_analyzer.runs import _labels

    assert _labels(["a/run.zarr", "b/run.zarr", "c/x.zarr"]) == ["a/run", "b/run", "c/x"]
    assert _labels(["s3://bucket/r1.zarr", "s3://bucket/r2.zarr"]) == ["r1", "r2"]
    with pytest.raises(sa.StoreError, match="no store matches"):
        sa.open_runs(str(tmp_path / "none*.zarr"))


def test_every_result_type_concatenates(stores):
    runs = sa.open_runs([stores / "wd1.zarr", stores / "wd0.zarr"])
    for ds in (runs.weight_spectra("*in_proj_weight*"), runs.correlate("test_loss", window=10), runs.metrics,
               runs.spectra(window=10, group_by="module")):
        assert ds.sizes["run"] == 2 and list(ds["run"].values) == ["wd1", "wd0"]
        assert all(ds[v].attrs.get("long_name") for v in [*ds.data_vars, *ds.coords])
    ws = runs.weight_spectra("*in_proj_weight*")
    own = runs["wd0"].weight_spectra("*in_proj_weight*")
    np.testing.assert_array_equal(ws.sigma.sel(run="wd0").sel(step=own.step).values, own.sigma.values)


@pytest.mark.parametrize("series", ["run", "store"])
def test_a_series_named_like_the_runs_coordinate_is_refused_in_one_line(tmp_path, series):
    """A logged series 'store' vanished from the metrics side by side (m['store'] gave the stores' paths); one
    named 'run' raised xarray's error, and the report of two such runs a traceback."""
    from click.testing import CliRunner
    from conftest import write_run

    from spectral_analyzer.cli import main

    for name in ("a", "b"):
        write_run(tmp_path / name, 6, {"w": (4, 4)})
        (tmp_path / name / "metrics.csv").write_text(
            f"step,test_acc,{series}\n" + "".join(f"{10 * i},{i / 5},{100 + i}\n" for i in range(6)))
        sa.ingest(tmp_path / name, tmp_path / f"{name}.zarr")
    runs = sa.open_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"])
    message = f"a.zarr: its series '{series}' has the name of the coordinate that tells the runs apart"
    with pytest.raises(sa.MetricError, match=message):
        runs.metrics
    out = CliRunner().invoke(main, ["report", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "-w", "3",
                                    "-o", str(tmp_path / "r.html"), "--metric", "test_acc"])
    assert out.exit_code == 1 and out.output.count("\n") == 1 and message in out.output
    assert not (tmp_path / "r.html").exists()
    assert float(sa.open_run(tmp_path / "a.zarr").metrics[series][-1]) == 105  # one run alone keeps it


def test_the_step_coordinate_is_no_metric(tmp_path):
    """--metric step took the step coordinate for a logged series: 'grokked at step 20' for any threshold."""
    from conftest import write_run

    write_run(tmp_path / "a", 6, {"w": (4, 4)})
    (tmp_path / "a" / "metrics.csv").write_text("step,loss\n" + "".join(f"{10 * i},{1 - i / 9}\n" for i in range(6)))
    run = sa.ingest(tmp_path / "a", tmp_path / "a.zarr")
    with pytest.raises(sa.MetricError, match=r"metric 'step' is not logged \(metrics: loss\)"):
        run.grokking(metric="step", threshold=15, window=3)
    with pytest.raises(sa.MetricError, match=r"metric 'step' is not logged \(metrics: loss\)"):
        run.correlate("step", window=3)
    from spectral_analyzer.report import write_report

    with pytest.raises(sa.MetricError, match=r"metric 'step' is not logged"):
        write_report(run, tmp_path / "r.html", window=3, metric="step")
