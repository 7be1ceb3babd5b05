"""Analyses that combine a run with its metrics, after a third review: far lags of a lagged correlation, an
accuracy logged in percent, options that are no numbers, and which run a missing metric is missing from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import FIXTURES

import spectral_analyzer as sa


@pytest.fixture(scope="module")
def wd1(tmp_path_factory):
    return sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path_factory.mktemp("wd1") / "s.zarr", progress=False)


def test_far_lags_of_few_windows_are_nan_and_never_the_best(wd1):
    """max_lag=40 on 41 windows: the best lag was -29, from 12 window pairs (r 0.93, against 0.43 at +2 with
    max_lag=10), so the answer flipped with the lags asked for."""
    near = wd1.correlate("test_loss", window=10, max_lag=10)
    far = wd1.correlate("test_loss", window=10, max_lag=40)
    n = wd1.spectra(window=10).sizes["step"]
    r = far.r.sel(series="gap_ratio")
    kept = r.lag.values[np.isfinite(r.values)]
    assert np.abs(kept).max() <= n - -(-n // 2)  # at least half of lag 0's pairs
    assert np.isnan(r.sel(lag=29).item()) and np.isnan(r.sel(lag=-29).item())
    assert abs(far.best_lag.sel(series="gap_ratio").item()) <= n // 2
    np.testing.assert_array_equal(far.r.sel(lag=slice(-10, 10)).values, near.r.values)


@pytest.mark.parametrize("max_lag", [-1, 2.5, True, "3"])
def test_a_max_lag_that_is_no_count_of_windows_is_refused(wd1, max_lag):
    with pytest.raises(sa.MetricError, match=r"s\.zarr: max_lag must be a whole number of windows"):
        wd1.correlate("test_loss", window=10, max_lag=max_lag)


def test_a_missing_metric_names_the_run(wd1, tmp_path):
    with pytest.raises(sa.MetricError, match=rf"{wd1.path}: metric 'nope' is not logged"):
        wd1.correlate("nope", window=10)


def test_an_accuracy_in_percent_with_a_fractional_threshold_is_refused(tmp_path):
    """test_acc logged as 0..100: the default threshold 0.95 was reached at 0.95 %, the run 'grokked' at
    step 0."""
    src = tmp_path / "wd1"
    shutil.copytree(FIXTURES / "grokking" / "wd1", src)
    lines = (src / "metrics.csv").read_text().splitlines()
    head = lines[0].split(",")
    col = head.index("test_acc")
    rows = [line.split(",") for line in lines[1:]]
    for row in rows:
        row[col] = repr(float(row[col]) * 100) if row[col] else row[col]
    (src / "metrics.csv").write_text("\n".join([lines[0], *(",".join(row) for row in rows)]) + "\n")
    run = sa.ingest(src, tmp_path / "s.zarr", progress=False)
    with pytest.raises(sa.MetricError, match=r"metric 'test_acc' reaches 100, an accuracy in percent, while the "
                                             r"threshold 0\.95 is a fraction; pass threshold=95"):
        run.grokking(metric="test_acc")
    percent = run.grokking(metric="test_acc", threshold=95)
    fraction = sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path / "f.zarr", progress=False).grokking(metric="test_acc")
    assert int(percent.grok_step) == int(fraction.grok_step) > 0
