"""What a reader of the reports and plots sees, against the runs' own numbers."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from conftest import write_run
from matplotlib.figure import Figure

import spectral_analyzer as sa
from spectral_analyzer.report import write_comparison

SIZES = {"layers.0.attn.q_proj.weight": (6, 4), "layers.0.mlp.w": (5, 4)}


def _run(tmp_path, name: str, n: int, every: int, grok: int | None = None, log_every: int = 100, seed: int = 0):
    """A small run with a test accuracy that reaches 1 at *grok* (never when None), and a loss logged every 5 steps."""
    src = tmp_path / name
    write_run(src, n, SIZES, seed=seed, every=every)
    last = every * (n - 1)
    lines = ["step,test_acc,train_loss"]
    for s in range(0, last + 1, 5):
        acc = (1.0 if grok is not None and s >= grok else 0.1) if s % log_every == 0 or s == grok else ""
        lines.append(f"{s},{acc},{1.0 / (1 + s)}")
    (src / "metrics.csv").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sa.ingest(src, tmp_path / f"{name}.zarr", progress=False)


def test_comparison_report_prints_the_grok_step_whole(tmp_path):
    """A grok step of five digits is printed as the step, not rounded to four significant digits."""
    _run(tmp_path, "a", 14, 1000, grok=12345, seed=1)
    _run(tmp_path, "b", 14, 1000, grok=7700, seed=2)
    runs = sa.open_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"])
    page = write_comparison(runs, tmp_path / "both.html", window=3).read_text()
    rows = re.findall(r"<tr><td>([ab])</td><td>(yes|no)</td><td>([^<]*)</td>", page)
    assert rows == [("a", "yes", "12345"), ("b", "yes", "7700")]


def _drawn(line) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)


def test_runs_on_different_step_grids_are_each_drawn_whole(tmp_path):
    """A run checkpointed half as often as another is one connected line through its own windows, not isolated
    points between the other run's steps (which matplotlib does not draw)."""
    a = _run(tmp_path, "a", 13, 10, seed=1)
    b = _run(tmp_path, "b", 7, 20, seed=2)
    runs = sa.open_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"])
    ax = Figure().subplots()
    runs.spectra(window=3).spectral.plot_gap_ratio(metrics=runs.metrics, metric="test_acc", ax=ax)
    lines = {line.get_label(): _drawn(line) for line in ax.get_lines()}
    for label, run in (("a", a), ("b", b)):
        own = run.spectra(window=3)
        x, y = lines[f"R ({label})"]
        assert np.array_equal(x, own["step"].values) and np.array_equal(y, own["gap_ratio"].values)
    metric_lines = {line.get_label(): _drawn(line) for line in ax.figure.axes[1].get_lines()}
    for label, run in (("a", a), ("b", b)):
        acc = run.metrics["test_acc"].dropna("step")
        x, y = metric_lines[f"test_acc ({label})"]
        assert np.array_equal(x, acc["step"].values) and np.array_equal(y, acc.values)


def test_a_metric_logged_less_often_than_others_is_drawn(tmp_path):
    """An accuracy evaluated every 100 steps beside a loss logged every 10 is drawn through its logged points."""
    run = _run(tmp_path, "a", 13, 10, grok=60, log_every=40)
    ax = Figure().subplots()
    run.spectra(window=3).spectral.plot_gap_ratio(metrics=run.metrics, metric="test_acc", ax=ax)
    (line,) = ax.figure.axes[1].get_lines()
    acc = run.metrics["test_acc"].dropna("step")
    x, y = _drawn(line)
    assert np.array_equal(x, acc["step"].values) and np.array_equal(y, acc.values)


@pytest.mark.parametrize("plot", ["plot_sigma", "plot_ratios"])
def test_one_run_picked_from_several_is_drawn_over_its_own_steps(tmp_path, plot):
    a = _run(tmp_path, "a", 13, 10, seed=1)
    _run(tmp_path, "b", 7, 20, seed=2)
    runs = sa.open_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"])
    ax = Figure().subplots()
    getattr(runs.spectra(window=3).spectral, plot)(run="b", ax=ax)
    own = sa.open_run(tmp_path / "b.zarr").spectra(window=3)
    for line in ax.get_lines():
        x, _ = _drawn(line)
        assert np.array_equal(x, own["step"].values)
    assert a.n_deltas != own.sizes["step"]


def _columns(ax) -> tuple[np.ndarray, np.ndarray]:
    """Left and right edges, in steps, of the columns of the heatmap drawn on *ax*."""
    from matplotlib.collections import QuadMesh
    from matplotlib.image import AxesImage

    (artist,) = [a for a in ax.get_children() if isinstance(a, (AxesImage, QuadMesh))]
    if isinstance(artist, AxesImage):
        x0, x1 = artist.get_extent()[:2]
        n = artist.get_array().shape[1]
        edges = x0 + (x1 - x0) * np.arange(n + 1) / n
    else:
        edges = artist.get_coordinates()[0, :, 0]
    return edges[:-1], edges[1:]


def test_energy_heatmap_puts_each_window_at_its_step(tmp_path):
    """Checkpoints at uneven intervals: the column of each window spans its own step, not an even share of the
    axis."""
    from conftest import trajectory, write_safetensors_run

    steps = [0, 1, 2, 4, 8, 16, 100, 200, 300, 400, 500, 600]
    write_safetensors_run(tmp_path / "src", trajectory(steps, seed=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", progress=False)
        dyn = run.dynamics(window=3, lr=1.0)
    ax = Figure().subplots()
    dyn.spectral.plot_energy(mode=1, ax=ax)
    left, right = _columns(ax)
    windows = dyn["step"].values
    assert left.size == windows.size
    assert np.all((left < windows) & (windows < right))
