"""Every step label against a brute-force float64 reference, on irregular step grids.

The reference is plain numpy on the source states: delta i = theta(s_{i+1}) - theta(s_i), labelled s_{i+1};
the window ending at delta e holds deltas e-W+1..e, starts at checkpoint e-W+1 and is labelled s_{e+1}.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import trajectory, write_safetensors_run

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.steps import parse_step_range

# Pythia's grid: log-spaced, then 1000-step; the store takes some steps by name, then is appended to.
PYTHIA = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000]
SHAPES = {"layers.0.attn.q_proj.weight": (6, 4), "layers.0.mlp.weight": (5, 3), "head.bias": (4,)}
TOP = 2**63 - 1


def theta(state) -> np.ndarray:
    """The flattened parameter vector (natural order of names), float64 of the float32 values."""
    return np.concatenate([state[k].double().numpy().ravel() for k in sorted(state)])


def reference_windows(steps, deltas, window, stride=1, first=0, last=None):
    """(label, window_start, singular values) of every window within delta rows first..last."""
    last = len(deltas) if last is None else last
    return [(steps[e + 1], steps[e - window + 1], np.linalg.svd(deltas[e - window + 1 : e + 1], compute_uv=False))
            for e in range(first + window - 1, last, stride)]


def gap_ratio(sigma: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nanmax(sigma[:-1] / sigma[1:]))


def write_metrics(path, rows) -> None:
    path.write_text("step,test_acc\n" + "".join(f"{s},{float(v)!r}\n" for s, v in rows))


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
    """A store ingested with an explicit list of steps and appended to by range, and its reference deltas."""
    tmp = tmp_path_factory.mktemp("pythia")
    states = trajectory(PYTHIA, SHAPES, seed=7)
    src = write_safetensors_run(tmp / "src", states)
    kept = [s for s in PYTHIA if s != 16 and s != 3000]  # a gap in the log-spaced part and one in the grid
    sa.ingest(src, tmp / "r.zarr", select=[s for s in kept if s <= 512])
    run = sa.ingest(src, tmp / "r.zarr", select=",".join(map(str, kept)))
    thetas = [theta(states[s]) for s in kept]
    deltas = np.stack([(b.astype(np.float32) - a.astype(np.float32)).astype(np.float64)
                       for a, b in zip(thetas, thetas[1:])])
    return run, kept, deltas, states, src


def test_the_store_holds_the_selected_steps(pythia):
    run, kept, deltas, _, _ = pythia
    assert run.checkpoint_steps.tolist() == kept and run.steps.tolist() == kept[1:]
    np.testing.assert_allclose(run.deltas.values, deltas, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window, stride, steps", [
    (3, 1, None), (3, 2, None), (4, 3, "4..5000"), (2, 5, (3, 7500)), (3, 1, "1000.."), (2, 1, slice(None, 64)),
])
def test_spectra_labels_and_values(pythia, window, stride, steps):
    run, kept, deltas, _, _ = pythia
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.MixedIntervalsWarning)
        ds = run.spectra(window=window, stride=stride, steps=steps)
    rng = parse_step_range(steps)
    lo, hi = (None, None) if rng is None else (rng.start, rng.stop)
    # deltas whose two checkpoints both lie in [lo, hi]
    inside = [i for i in range(len(deltas)) if (lo is None or kept[i] >= lo) and (hi is None or kept[i + 1] <= hi)]
    ref = reference_windows(kept, deltas, window, stride, inside[0], inside[-1] + 1)
    assert ds["step"].values.tolist() == [r[0] for r in ref]
    assert ds["window_start"].values.tolist() == [r[1] for r in ref]
    for t, (_, _, sigma) in enumerate(ref):
        np.testing.assert_allclose(ds["sigma"].values[t], sigma, rtol=0, atol=1e-9 * sigma[0])
        assert ds["gap_ratio"].values[t] == pytest.approx(gap_ratio(sigma), rel=1e-7)


def test_dynamics_labels_events_and_phases(pythia):
    run, kept, deltas, _, _ = pythia
    w, tau = 3, 1.4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.MixedIntervalsWarning)
        dyn = run.dynamics(window=w, tau=tau, persistence=1)
    ref = reference_windows(kept, deltas, w)
    labels = [r[0] for r in ref]
    r = np.array([gap_ratio(s) for s in (x[2] for x in ref)])
    assert dyn["step"].values.tolist() == labels[1:]  # each window with a predecessor
    assert dyn["window_start"].values.tolist() == [x[1] for x in ref][1:]
    np.testing.assert_allclose(dyn["gap_ratio"].values, r[1:], rtol=1e-7)
    lam = np.array([x[2] ** 2 for x in ref])
    np.testing.assert_allclose(dyn["lambda_change"].values, lam[1:] - lam[:-1], rtol=0, atol=1e-9 * lam.max())
    # with persistence 1 an event is every change of side of tau, at the window where R is first on the new side
    above = r >= tau
    crossings = [(labels[t], "gap_opening" if above[t] else "gap_collapse") for t in range(1, r.size)
                 if above[t] != above[t - 1]]
    events = [(e["step"], e["kind"]) for e in sa.events_table(dyn) if e["kind"].startswith("gap_")]
    assert crossings and events == crossings
    high = np.flatnonzero(r >= 0.8 * r.max())
    want = np.where(np.arange(r.size) < high[0], "rise", np.where(np.arange(r.size) > high[-1], "collapse", "plateau"))
    assert dyn["phase"].values.tolist() == want[1:].tolist()


@pytest.mark.filterwarnings("ignore::spectral_analyzer.MixedIntervalsWarning")
def test_correlate_interpolates_at_window_steps_and_positive_lags_mean_the_spectrum_leads(pythia, tmp_path):
    """The metric is logged only between checkpoints (8 steps either side of each window's step, never at it),
    and interpolates at window t to the gap ratio of window t - 2: r(+2) = 1, best_lag = +2."""
    run, kept, _, _, src = pythia
    spectra = run.spectra(window=2, steps="4..")
    steps, x = spectra["step"].values, spectra["gap_ratio"].values
    rows = []
    for t in range(2, steps.size):
        rows += [(int(steps[t]) - 8, x[t - 2] - 0.25), (int(steps[t]) + 8, x[t - 2] + 0.25)]
    write_metrics(tmp_path / "m.csv", rows)
    copy = sa.ingest(src, tmp_path / "c.zarr", select=",".join(map(str, kept)), metrics=tmp_path / "m.csv")
    c = copy.correlate("test_acc", window=2, max_lag=3, detrend="none", steps="4..")
    y = np.interp(steps, [s for s, _ in rows], [v for _, v in rows], left=np.nan, right=np.nan)
    np.testing.assert_allclose(y[2:], x[:-2], rtol=1e-12)
    both = np.isfinite(y)  # both series are taken over the steps where both are defined
    want = []
    for lag in range(-3, 4):
        pairs = np.array([(x[t], y[t + lag]) for t in range(steps.size)
                          if 0 <= t + lag < steps.size and both[t] and both[t + lag]])
        want.append(np.corrcoef(pairs.T)[0, 1] if len(pairs) >= 3 else np.nan)
    np.testing.assert_allclose(c["r"].sel(series="gap_ratio").values, want, rtol=1e-9)
    assert float(c["best_lag"].sel(series="gap_ratio")) == 2
    assert float(c["best_r"].sel(series="gap_ratio")) == pytest.approx(1.0, abs=1e-9)
    assert c["lag_steps"].sel(lag=2) == np.median(steps[2:] - steps[:-2])
    assert c["lag_steps"].sel(lag=-1) == -np.median(np.diff(steps))


def test_grokking_at_a_metric_step_between_checkpoints(pythia, tmp_path):
    """test_acc crosses 0.95 at step 700 (no checkpoint there), falls back, crosses again at 2500: the grok step
    is the first crossing, and the values "at grokking" are those of the last window / checkpoint before it."""
    run, kept, deltas, states, src = pythia
    write_metrics(tmp_path / "m.csv", [(0, 0.1), (300, 0.9), (700, 0.96), (900, 0.5), (2500, 0.97), (7900, 0.99)])
    copy = sa.ingest(src, tmp_path / "g.zarr", select=",".join(map(str, kept)), metrics=tmp_path / "m.csv")
    w = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.MixedIntervalsWarning)
        g = copy.grokking(window=w)
    assert bool(g["grokked"]) and float(g["grok_step"]) == 700
    ref = reference_windows(kept, deltas, w)
    labels = np.array([x[0] for x in ref])
    r = np.array([gap_ratio(x[2]) for x in ref])
    g23 = np.array([x[2][1] ** 2 - x[2][2] ** 2 for x in ref])
    last = np.flatnonzero(labels <= 700)[-1]
    assert labels[last] == 512
    assert float(g["R_grok"]) == pytest.approx(r[last], rel=1e-7)
    assert float(g["R_early"]) == pytest.approx(r[labels < 700].mean(), rel=1e-7)
    peak = int(np.argmax(g23[: last + 1]))
    assert float(g["g23_peak_step"]) == labels[peak]
    assert float(g["g23_decline"]) == pytest.approx(g23[peak] / g23[last], rel=1e-6)
    wq = [np.linalg.svd(states[s]["layers.0.attn.q_proj.weight"].double().numpy(), compute_uv=False) for s in kept]
    at = max(i for i, s in enumerate(kept) if s <= 700)
    assert float(g["wq_sigma_ratio_grok"]) == pytest.approx(wq[at][0] / wq[at][1], rel=1e-5)
    assert float(g["wq_sigma_ratio_end"]) == pytest.approx(wq[-1][0] / wq[-1][1], rel=1e-5)


def test_weight_spectra_rows_are_their_checkpoints(pythia):
    run, kept, _, states, _ = pythia
    ws = run.weight_spectra("*q_proj.weight")
    assert ws["step"].values.tolist() == kept
    for t, s in enumerate(kept):
        want = np.linalg.svd(states[s]["layers.0.attn.q_proj.weight"].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(ws["sigma"].values[t, 0], want, rtol=0, atol=1e-5 * want[0])


def test_cli_tables_print_each_value_beside_its_step(pythia):
    run, kept, deltas, _, _ = pythia
    result = CliRunner().invoke(main, ["spectra", run.path, "-w", "2", "--stride", "2", "--steps", "1000..",
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    ds = run.spectra(window=2, stride=2, steps="1000..")
    lines = result.output.splitlines()
    table = lines[1 : 1 + ds.sizes["step"]]
    ref = reference_windows(kept, deltas, 2, 2, kept.index(1000))
    assert [int(line.split()[0]) for line in table] == [x[0] for x in ref]
    for line, (_, _, sigma) in zip(table, ref):
        assert float(line.split()[2]) == pytest.approx(gap_ratio(sigma), rel=1e-3)
    peak = max(ref, key=lambda x: gap_ratio(x[2]))
    assert f"at step {peak[0]} " in next(line for line in lines if line.startswith("peak R"))


EXTREME = [-(2**63), -(2**63) + 1, -(2**63) + 2, TOP - 10, TOP - 8, TOP - 6, TOP - 4, TOP - 2, TOP - 1, TOP]
EXTREME_METRIC = [(TOP - 12, 0.0), (TOP - 7, 0.5), (TOP - 3, 0.2), (TOP, 0.9)]


@pytest.fixture(scope="module")
def extreme(tmp_path_factory):
    """Steps from -2**63 to 2**63 - 1, given at ingest: differences overflow int64, floats lose units past 2**53."""
    tmp = tmp_path_factory.mktemp("extreme")
    states = trajectory(range(len(EXTREME)), {"w": (5, 3)}, seed=1)
    src = tmp / "src"
    for i, state in enumerate(states.values()):  # names without steps: the steps are given
        write_safetensors_run(src, {0: state})
        (src / "step_0.safetensors").rename(src / f"ckpt_{chr(97 + i)}.safetensors")
    write_metrics(tmp / "m.csv", EXTREME_METRIC)
    run = sa.ingest(src, tmp / "r.zarr", steps=EXTREME, metrics=tmp / "m.csv")
    assert run.checkpoint_steps.tolist() == EXTREME
    return run


def test_interval_warning_near_the_int64_limits(extreme):
    """The interval from -2**63 + 2 to 2**63 - 11 overflowed int64: "intervals of -13 to 1 steps"."""
    with pytest.warns(sa.MixedIntervalsWarning, match=r"the first from step -9223372036854775808 to "
                      r"9223372036854775797 \(intervals of 1 to 18446744073709551603 steps\)"):
        ds = extreme.spectra(window=3)
    assert ds["step"].values.tolist() == EXTREME[3:] and ds["window_start"].values.tolist() == EXTREME[:-3]


def test_correlate_near_the_int64_limits(extreme):
    """Steps 2**63 - 7 .. 2**63 - 1 are one float64: the metric was interpolated at merged steps (and a linear
    detrend failed to converge)."""
    late = extreme.spectra(window=2, steps=f"{TOP - 10}..")
    ends = EXTREME[5:]
    assert late["step"].values.tolist() == ends
    c = extreme.correlate("test_acc", window=2, max_lag=2, detrend="none", steps=f"{TOP - 10}..")
    origin = EXTREME_METRIC[0][0]  # exact interpolation, in offsets (Python ints)
    y = np.interp([s - origin for s in ends], [s - origin for s, _ in EXTREME_METRIC], [v for _, v in EXTREME_METRIC])
    x = late["gap_ratio"].values
    want = [np.corrcoef(x[max(0, -lag): x.size - max(0, lag)], y[max(0, lag): y.size - max(0, -lag)])[0, 1]
            for lag in range(-2, 3)]
    np.testing.assert_allclose(c["r"].sel(series="gap_ratio").values, want, rtol=1e-9)
    assert c["lag_steps"].values.tolist() == [np.sign(lag) * np.median([b - a for a, b in zip(ends, ends[abs(lag):])])
                                              for lag in range(-2, 3)] == [-3, -1.5, 0, 1.5, 3]
    extreme.correlate("test_acc", window=2, max_lag=2, steps=f"{TOP - 10}..")  # a linear detrend converges
