from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.dynamics.events import detect_events, phases
from spectral_analyzer.dynamics.kernel import eig_desc, flow_terms


def explicit(x: np.ndarray, end: int, window: int):
    """Eigen-decomposition of the window ending at row *end*, with v_j = X^T u_j / sigma_j formed explicitly."""
    xw = x[end - window + 1 : end + 1]
    lam, u = np.linalg.eigh(xw @ xw.T)
    lam, u = lam[::-1], u[:, ::-1]
    v = xw.T @ u / np.sqrt(lam)
    return lam, v


@pytest.fixture(scope="module")
def grok(tmp_path_factory):
    run = sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path_factory.mktemp("g") / "g.zarr")
    return run, run.deltas.values.astype(np.float64)


def test_overlap_rotation_alpha_against_explicit_vectors(grok):
    run, x = grok
    w = 10
    ds = run.dynamics(window=w)
    for t, step in enumerate(ds["step"].values):
        i = int(np.searchsorted(run.steps, step))
        lam_p, v_p = explicit(x, i - 1, w)
        lam_c, v_c = explicit(x, i, w)
        np.testing.assert_allclose(ds["overlap"].values[t], v_p.T @ v_c, atol=1e-8)
        np.testing.assert_allclose(ds["rotation"].values[t], np.arccos(np.clip(np.abs(np.diag(v_p.T @ v_c)), 0, 1)), atol=1e-6)
        # Davis-Kahan with the exact Frobenius norm of the rank-two update
        dc = np.outer(x[i], x[i]) if x.shape[1] < 3000 else None
        d_in, d_out = x[i], x[i - w]
        norm = math.sqrt(max((d_in @ d_in) ** 2 + (d_out @ d_out) ** 2 - 2 * (d_in @ d_out) ** 2, 0))
        assert ds["dC_norm"].values[t] == pytest.approx(norm, rel=1e-10)
        gaps = np.abs(lam_c[:, None] - lam_c[None, :]) + np.diag(np.full(w, np.inf))
        np.testing.assert_allclose(ds["alpha"].values[t], np.clip(1 - norm / gaps.min(axis=1), 0, 1), atol=1e-8)
        # two halves
        h = w // 2
        l1, v1 = explicit(x[: i - w + 1 + h], i - w + h, h)
        l2, v2 = explicit(x, i, w - h)
        np.testing.assert_allclose(ds["alpha_halves"].values[t, :h], np.abs(np.sum(v1[:, :h] * v2[:, :h], axis=0)), atol=1e-8)
        assert dc is None or dc.shape[0] == x.shape[1]


def test_principal_angles_and_energy(grok):
    run, x = grok
    w = 8
    ds = run.dynamics(window=w, group_by="layer", top_k=3)
    t = 20
    i = int(np.searchsorted(run.steps, ds["step"].values[t]))
    _, v_p = explicit(x, i - 1, w)
    _, v_c = explicit(x, i, w)
    # the largest principal angle of the top-k subspaces, from the explicit parameter-space vectors
    cos = [np.linalg.svd(v_p[:, :k].T @ v_c[:, :k], compute_uv=False).min() for k in (1, 2, 3)]
    np.testing.assert_allclose(np.cos(ds["principal_angle"].values[t]), cos, atol=1e-8)
    assert cos[0] == pytest.approx(abs(float(v_p[:, 0] @ v_c[:, 0])), abs=1e-12)
    tensors = run.tensors
    for g in ds["group"].values:
        cols = np.concatenate([np.arange(int(o), int(o + s)) for n, o, s in
                               zip(tensors["tensor"].values, tensors["offset"].values, tensors["size"].values)
                               if sa.groups.layer_of(n) == g])
        share = (v_c[cols] ** 2).sum(axis=0)  # |v_j restricted to the group|^2
        np.testing.assert_allclose(ds["energy"].sel(group=g).values[t], share, atol=1e-8)
    np.testing.assert_allclose(ds["energy"].sum("group").values, 1.0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_flow_orders_by_scaling_the_update(seed):
    """Replace dC by eps dC: residual after first order ~ eps^2, after second order ~ eps^3."""
    rng = np.random.default_rng(seed)
    w, p = 6, 80
    d = rng.standard_normal((w + 1, p)) * np.linspace(4, 1, w + 1)[:, None]
    xp, d_in, d_out = d[:w], d[w], d[0]
    c = xp.T @ xp
    lam, u = eig_desc((xp @ xp.T)[None])
    res1, res2 = [], []
    for eps in (1e-2, 1e-3):
        s = math.sqrt(eps)  # dC is quadratic in d_i, d_{i-W}
        exact = np.linalg.eigvalsh(c + eps * (np.outer(d_in, d_in) - np.outer(d_out, d_out)))[::-1][:w] - lam[0]
        f = flow_terms(lam, u, (xp @ d_in * s)[None], (xp @ d_out * s)[None], np.array([d_in @ d_in * eps]),
                       np.array([d_out @ d_out * eps]), np.array([d_in @ d_out * eps]))
        r1 = exact - f["first"][0]
        r2 = r1 - f["second"][0]
        res1.append(np.abs(r1).max() / lam[0, 0])
        res2.append(np.abs(r2).max() / lam[0, 0])
    assert 50 < res1[0] / res1[1] < 200  # eps^2: 100x per decade
    assert 500 < res2[0] / res2[1] < 2000  # eps^3: 1000x per decade
    assert res2[1] < 1e-7


def test_flow_terms_in_dataset_against_explicit_vectors(grok):
    run, x = grok
    w = 10
    ds = run.dynamics(window=w)
    t = 15
    i = int(np.searchsorted(run.steps, ds["step"].values[t]))
    lam_p, v_p = explicit(x, i - 1, w)
    lam_c, _ = explicit(x, i, w)
    d_in, d_out = x[i], x[i - w]
    np.testing.assert_allclose(ds["flow_entering"].values[t], (v_p.T @ d_in) ** 2, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ds["flow_exiting"].values[t], (v_p.T @ d_out) ** 2, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ds["lambda_change"].values[t], lam_c - lam_p, rtol=1e-7, atol=1e-9)
    dc_v = np.outer(d_in, d_in @ v_p) - np.outer(d_out, d_out @ v_p)  # w_j = dC v_j, explicitly
    proj = v_p.T @ dc_v
    second = []
    for j in range(w):
        rep = sum(proj[k, j] ** 2 / (lam_p[j] - lam_p[k]) for k in range(w) if k != j)
        second.append(rep + (dc_v[:, j] @ dc_v[:, j] - (proj[:, j] ** 2).sum()) / lam_p[j])
    np.testing.assert_allclose(ds["flow_second"].values[t], second, rtol=1e-6, atol=1e-9)
    lr = float(run.metrics["lr"].values[0])
    g = ds["gap"].values[t]
    assert ds["adiabatic"].values[t] == pytest.approx(ds["dC_norm"].values[t] / (lr * g**2), rel=1e-12)
    assert ds.attrs["lr_source"] == "metrics:lr"


def _planted_run(folder, coefficients, n_deltas=40, p=3000, noise=1e-3, seed=0):
    """Deltas sum_k c_k(i) e_k + noise with e_k orthonormal in R^p."""
    rng = np.random.default_rng(seed)
    k = len(coefficients(1))
    basis, _ = np.linalg.qr(rng.standard_normal((p, k)))
    theta = np.zeros(p, dtype=np.float32)
    folder.mkdir()
    save_file({"w": torch.from_numpy(theta.copy())}, str(folder / "s_0.safetensors"))
    for i in range(1, n_deltas + 1):
        d = basis @ np.array(coefficients(i)) + noise * rng.standard_normal(p)
        theta = (theta.astype(np.float64) + d).astype(np.float32)
        save_file({"w": torch.from_numpy(theta.copy())}, str(folder / f"s_{i * 10}.safetensors"))


@pytest.mark.parametrize("r, k, want", [
    # a one-window dip is no collapse, and the return from it is no opening
    ([1.5, 1.5, 1.5, 1.1, 1.5, 1.5, 1.5], [1] * 7, []),
    ([1.0, 1.0, 1.0, 1.3, 1.0, 1.0, 1.0], [1] * 7, []),
    # a one-window change of k* is no shift, and the return to the k* that held is none either
    ([2.0] * 8, [1, 1, 1, 2, 1, 1, 1, 1], []),
    # a flicker first, then a collapse that holds: one event, where it starts holding
    ([1.5, 1.1, 1.5, 1.1, 1.1, 1.1], [1] * 6, [(3, "gap_collapse")]),
    # collapse, then an opening that holds
    ([1.5, 1.5, 1.0, 1.0, 1.0, 1.4, 1.4], [1] * 7, [(2, "gap_collapse"), (5, "gap_opening")]),
    # undefined windows neither start nor end a state
    ([1.5, np.nan, 1.1, 1.1], [1, 0, 1, 1], [(2, "gap_collapse")]),
    ([2.0] * 6, [1, 1, 3, 3, 0, 3], [(2, "k_star_shift")]),
])
def test_events_change_an_established_state(r, k, want):
    found = detect_events(np.array(r), np.array(k), tau=1.2, persistence=2)
    assert [(t, kind) for t, kind, _, _ in found] == want


def test_scripted_gap_collapse_is_reported_at_its_step(tmp_path):
    """One strong mode for deltas 1..20, none after: the first window without it ends at delta 28."""
    w = 8
    _planted_run(tmp_path / "src", lambda i: [3.0 * math.cos(2 * math.pi * i / w) if i <= 20 else 0.0])
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr")
    ds = run.dynamics(window=w)
    kinds = list(ds["event_kind"].values)
    assert kinds.count("gap_collapse") == 1 and "gap_opening" not in kinds
    at = int(ds["event_step"].values[kinds.index("gap_collapse")])
    assert at == (20 + w) * 10
    phase = dict(zip(ds["step"].values.tolist(), ds["phase"].values.tolist()))
    assert all(ph == "collapse" for s, ph in phase.items() if s >= at)
    assert phase[min(phase)] == "plateau"


def test_scripted_level_crossing_is_tracked(tmp_path):
    """Two modes on alternate deltas (so they never mix) trade strength after delta 16: sigma_1 and
    sigma_2 cross, the sorted modes jump to the other direction and tracking follows each direction."""
    w = 8

    def coefficients(i):
        s1, s2 = (3.0, 1.0) if i <= 16 else (1.0, 2.9)
        return [s1 if i % 2 == 0 else 0.0, s2 if i % 2 == 1 else 0.0]

    _planted_run(tmp_path / "src", coefficients)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr")
    ds = run.dynamics(window=w)
    # where the crossing must be: the first window whose mode-2 energy exceeds mode 1's
    energy = np.array([[sum(coefficients(j)[m] ** 2 for j in range(i - w + 1, i + 1)) for m in (0, 1)]
                       for i in range(w + 1, 41)])
    expected = (w + 1 + int(np.argmax(energy[:, 1] > energy[:, 0]))) * 10
    tracked = ds["tracked_from"].sel(mode=[1, 2]).values
    swaps = [int(s) for s, t in zip(ds["step"].values, tracked) if list(t) == [2, 1]]
    assert swaps == [expected]
    t = int(np.searchsorted(ds["step"].values, expected))
    # noise of 1e-3 per entry (|noise| ~ 0.05 per delta against signals of 1 to 3) tilts directions by ~0.01
    assert ds["rotation_tracked"].values[t, :2].max() < 0.05  # the tracked directions do not move
    assert ds["rotation"].values[t, :2].min() > math.pi / 2 - 0.05  # the sorted modes swap directions


def test_grokking_fixture_gap_dynamics_precede_grokking(grok):
    """What the tool finds on the shipped grokking run (W = 10, default events):

    grok step (test_acc first >= 0.95) = 1400; R peaks at 3.68 (step 760, the plateau's middle) and
    declines to 1.51-1.71 in the windows before grokking (1.57 at 1400), a 2.3x decline; the
    collapse phase starts at step 1000; R never crosses tau = 1.2 (no absolute collapse event); R
    first falls below half its running peak at step 1160; k* leaves 1 persistently at step 1280.
    All of these precede the grok step.
    """
    run, _ = grok
    m = run.metrics
    grok_step = int(m["step"].values[np.argmax(m["test_acc"].values >= 0.95)])
    assert grok_step == 1400
    ds = run.dynamics(window=10, factor=2.0)
    spectra = run.spectra(window=10)
    r = spectra["gap_ratio"]
    before = r.sel(step=slice(None, grok_step))
    peak_step = int(before["step"].values[int(np.argmax(before.values))])
    assert peak_step == 760 and float(before.max()) == pytest.approx(3.68, abs=0.01)
    assert float(before.max()) / float(r.sel(step=grok_step)) > 2.0
    kinds = list(ds["event_kind"].values)
    steps = ds["event_step"].values
    assert "gap_collapse" not in kinds  # tau = 1.2 is never crossed on this run
    first_relative = int(steps[kinds.index("gap_collapse_relative")])
    first_shift = int(steps[kinds.index("k_star_shift")])
    assert first_relative == 1160 < grok_step
    assert first_shift == 1280 < grok_step
    phase = dict(zip(ds["step"].values.tolist(), ds["phase"].values.tolist()))
    collapse_starts = min(s for s, ph in phase.items() if ph == "collapse")
    assert collapse_starts == 960 < grok_step


def test_correlate_with_metrics(grok):
    run, _ = grok
    c = run.correlate("test_loss", window=10, max_lag=5)
    assert c["r"].dims == ("series", "lag") and c.sizes["lag"] == 11
    assert np.nanmax(np.abs(c["r"].values)) <= 1.0
    assert 1 <= int(c["k_star_cross"]) <= 9
    # lag 0 equals a plain correlation of the detrended series
    from spectral_analyzer.dynamics.coupling import detrend

    s = run.spectra(window=10)
    steps = s["step"].values.astype(float)
    y = np.interp(steps, run.metrics["step"].values, run.metrics["test_loss"].values)
    a, b = detrend(s["gap_ratio"].values, steps), detrend(y, steps)
    assert float(c["r"].sel(series="gap_ratio", lag=0)) == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-10)
    with pytest.raises(sa.SpectralAnalyzerError, match="metric 'nope' is not logged"):
        run.correlate("nope", window=10)


@pytest.mark.parametrize("option", [{"tau": float("nan")}, {"tau": 0.0}, {"factor": 0.0}, {"factor": 1.0},
                                    {"lr": -1.0}, {"lr": 0.0}, {"constant": -5.0}, {"persistence": 0},
                                    {"top_k": 0}, {"phase_fraction": 1.5}, {"group_by": "modules"},
                                    {"persistence": 1.5}, {"top_k": 2.5}, {"persistence": 2.0}])
def test_options_without_meaning_are_refused_before_any_work(grok, option, tmp_path):
    run, _ = grok
    from conftest import snapshot

    before = snapshot(Path(run.path))
    with pytest.raises(sa.SelectionError) as caught:
        run.dynamics(window=6, **option)
    assert "\n" not in str(caught.value)
    assert snapshot(Path(run.path)) == before  # refused before any band or result was written


def _metrics_of(steps, values, name="m"):
    import xarray as xr

    return xr.Dataset({name: ("step", np.asarray(values, dtype=float))}, coords={"step": np.asarray(steps)})


def test_correlation_detrends_both_series_over_the_steps_where_both_are_defined(grok):
    """A metric equal to the gap ratio but logged over the first half only correlates with it at r(0) = 1:
    both series are detrended over the same steps (before, the spectrum's trend was fitted over all its
    windows and the metric's over half of them: r(0) = 0.43)."""
    from spectral_analyzer.dynamics.coupling import correlate

    run, _ = grok
    spectra = run.spectra(window=10)
    steps, r = spectra["step"].values, spectra["gap_ratio"].values
    half = steps.size // 2
    c = correlate(spectra, _metrics_of(steps[:half], r[:half]), "m", max_lag=3)
    assert float(c["r"].sel(series="gap_ratio", lag=0)) == pytest.approx(1.0, abs=1e-12)
    assert float(c["best_lag"].sel(series="gap_ratio")) == 0


def test_a_constant_metric_correlates_with_nothing(grok):
    from spectral_analyzer.dynamics.coupling import correlate

    run, _ = grok
    spectra = run.spectra(window=10)
    steps = spectra["step"].values
    for value in (0.1, 0.003, 2.0):  # residuals of fitting a constant are rounding, not fluctuations
        c = correlate(spectra, _metrics_of(steps, np.full(steps.size, value)), "m", max_lag=3)
        assert np.isnan(c["r"].values).all() and np.isnan(c["best_lag"].values).all()
        assert int(c["k_star_cross"]) == 0


def test_lags_are_also_given_in_training_steps(grok):
    """Checkpoints 10 steps apart, then 100: a lag of 1 window is 10 steps in the median, and lag_steps
    is signed as the lag (a lag counts windows, which alone cannot be compared across spacings)."""
    from spectral_analyzer.dynamics.coupling import correlate

    run, _ = grok
    spectra = run.spectra(window=10)
    n = spectra.sizes["step"]
    steps = np.concatenate([10 * np.arange(n - 4), 10 * (n - 5) + 100 * np.arange(1, 5)])
    spectra = spectra.assign_coords(step=steps)
    c = correlate(spectra, _metrics_of(steps, np.sin(np.arange(n))), "m", max_lag=3)
    assert c["lag_steps"].sel(lag=0) == 0
    assert c["lag_steps"].sel(lag=1) == 10 and c["lag_steps"].sel(lag=-1) == -10
    assert c["lag_steps"].sel(lag=3) == 30


def test_correlate_over_a_step_range_is_that_of_the_range_s_spectra(grok):
    """steps= reaches the spectra (it was a TypeError); an option correlate does not know is refused in one line."""
    from spectral_analyzer.dynamics.coupling import correlate

    run, _ = grok
    c = run.correlate("test_loss", window=6, max_lag=3, steps="400..1600")
    want = correlate(run.spectra(window=6, steps="400..1600"), run.metrics, "test_loss", max_lag=3)
    np.testing.assert_array_equal(c["r"].values, want["r"].values)
    assert not np.array_equal(c["r"].values, run.correlate("test_loss", window=6, max_lag=3)["r"].values,
                              equal_nan=True)
    with pytest.raises(sa.SelectionError, match="correlate: unknown option 'lag'"):
        run.correlate("test_loss", window=6, lag=3)


def test_a_grok_step_past_the_last_checkpoint_has_nothing_at_grokking(grok):
    """Grokking logged at step 9000 of a run whose checkpoints end at 2000: no window holds it, so the values
    "at grokking" are NaN (before, the last window's were reported as such)."""
    run, _ = grok
    spectra = run.spectra(window=10)
    from spectral_analyzer.weights import compute_grokking

    late = compute_grokking(run.store, spectra, _metrics_of([0, 9000], [0.0, 1.0], "test_acc"))
    assert bool(late["grokked"]) and float(late["grok_step"]) == 9000
    for name in ("g23_decline", "g23_peak_step", "R_grok", "wq_sigma_ratio_grok"):
        assert np.isnan(float(late[name])), name
    assert np.isfinite(float(late["wq_sigma_ratio_end"]))
    from spectral_analyzer.weights import compute_qk_grokking

    qk = compute_qk_grokking(run.store, _metrics_of([0, 9000], [0.0, 1.0], "test_acc"), heads=4)
    assert np.isnan(qk["qk_ratio_12_grok"].values).all() and np.isnan(qk["qk_gap_23_decline"].values).all()
    assert np.isfinite(qk["qk_ratio_12_end"].values).all()
    two = compute_grokking(run.store, run.spectra(window=2), _metrics_of([0, 1000], [0.0, 1.0], "test_acc"))
    assert np.isnan(float(two["g23_decline"])) and np.isfinite(float(two["R_grok"]))  # W = 2: no g23


def test_an_infinite_gap_ratio_is_in_the_plateau():
    """R = inf (a window of lower rank: its spectrum ends at k*) is the largest gap there is: the event detector
    counts it above tau, and the phases put it in the plateau (it was labelled collapse or rise)."""
    inf = np.inf
    assert list(phases([0.5, 1.2, inf, inf])) == ["rise", "plateau", "plateau", "plateau"]
    assert list(phases([2.0, 3.0, 2.9, inf, 1.1, 1.0])) == ["rise", "plateau", "plateau", "plateau", "collapse",
                                                             "collapse"]
    assert list(phases([inf, np.nan, 5.0, 1.0])) == ["plateau", "", "plateau", "collapse"]
    assert list(phases([inf, inf, np.nan])) == ["plateau", "plateau", ""]
    assert list(phases([np.nan, np.nan])) == ["", ""]
