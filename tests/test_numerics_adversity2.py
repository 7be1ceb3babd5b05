"""Spectra and dynamics on adversarial deltas, against the definitions computed densely in float64."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.linalg import hadamard

import spectral_analyzer as sa
from spectral_analyzer.errors import DuplicateCheckpointWarning
from spectral_analyzer.dynamics.kernel import flow_terms, principal_cosines, stability
from spectral_analyzer.spectra.kernel import spectral_quantities


def ingest_deltas(tmp_path, deltas: np.ndarray, name: str = "w"):
    """A run whose stored deltas are *deltas* exactly (theta_0 = 0, every partial sum exact in float32)."""
    src = tmp_path / "src"
    src.mkdir()
    theta = np.zeros(deltas.shape[1], dtype=np.float32)
    save_file({name: torch.from_numpy(theta.copy())}, str(src / "step_0.safetensors"))
    for i, d in enumerate(deltas, 1):
        theta = theta + d
        save_file({name: torch.from_numpy(theta.copy())}, str(src / f"step_{10 * i}.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DuplicateCheckpointWarning)  # a frozen stretch saves identical weights
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert np.array_equal(run.deltas.values, deltas)
    return run


def test_centred_windows_of_rank_one_report_no_gap_between_rounding_noise(tmp_path):
    """d_i = a + c_i b with |a| >> |b|: every centred window is exactly rank one (sigma_2 = 0, as a dense SVD of
    the centred X gives to 1e-15), so k* = 1, R = inf, k95 = 1. The centring's rounding, relative to the
    uncentred Gram, gave sigma_2 / sigma_1 ~ 1e-6 and k* = 2..4 at W = 6, R ~ 6e5 at W = 3."""
    rng = np.random.default_rng(0)
    a = rng.integers(-2**10, 2**10, size=512) / 8.0
    b = rng.integers(-4, 5, size=512) / 64.0
    c = rng.integers(-3, 4, size=16)
    c[:3] = [-1, 0, 1]  # no window with all c_i equal (that one is rank zero)
    run = ingest_deltas(tmp_path, (a[None] + c[:, None] * b[None]).astype(np.float32))
    x = run.deltas.values.astype(np.float64)
    for window in (3, 6):
        ds = run.spectra(window=window, center=True, interval_factor=None, cache=False)
        for t, end in enumerate(range(window - 1, x.shape[0])):
            xw = x[end - window + 1 : end + 1]
            s = np.linalg.svd(xw - xw.mean(axis=0), compute_uv=False)
            assert s[1] < 1e-12 * s[0]
        assert np.all(ds["sigma"].values[:, 1:] == 0)
        assert np.all(ds["k_star"].values == 1) and np.all(np.isinf(ds["gap_ratio"].values))
        assert np.all(ds["k95"].values == 1)


def test_centred_identical_deltas_have_an_undefined_spectrum(tmp_path):
    """Identical deltas centre to X = 0 exactly: no eigenvalue, no k*, no R (it gave k* = 1, R = 4.3, margin 7.4)."""
    rng = np.random.default_rng(1)
    d = (rng.integers(-64, 64, size=300) / 1024).astype(np.float32)
    run = ingest_deltas(tmp_path, np.stack([d] * 8))
    for window in (3, 5, 7):
        ds = run.spectra(window=window, center=True, interval_factor=None, cache=False)
        assert np.all(ds["sigma"].values == 0)
        assert np.all(ds["k_star"].values == 0) and np.all(ds["k_star_weighted"].values == 0)
        assert np.isnan(ds["gap_ratio"].values).all() and np.isnan(ds["margin"].values).all()
        assert np.all(ds["k95"].values == 0)


def test_k_star_of_tied_ratios_is_the_smallest_whatever_the_order_of_the_deltas():
    """sigma = (8, 4, 2, 1): every ratio is exactly 2, and k* = 1 (the smallest of the tied j). Permuting or
    negating the window's deltas leaves the spectrum unchanged; rounding made k* 1, 2 or 3 with the order."""
    w, m = 4, 16
    basis = np.zeros((w, w * m))
    for k in range(w):
        basis[k, k * m : (k + 1) * m] = 0.25  # disjoint, |B_k| = 1
    x = hadamard(w) @ np.diag([8.0, 4.0, 2.0, 1.0]) @ basis / 2
    grams, dense = [], []
    for seed in range(24):
        rng = np.random.default_rng(seed)
        xp = x[rng.permutation(w)] * rng.choice([-1.0, 1.0], size=w)[:, None]
        grams.append(xp @ xp.T)
        dense.append(np.linalg.svd(xp, compute_uv=False))
    np.testing.assert_allclose(np.array(dense), np.broadcast_to([8.0, 4.0, 2.0, 1.0], (24, 4)), rtol=1e-14)
    q = spectral_quantities(np.array(grams))
    assert np.all(q["k_star"] == 1)
    np.testing.assert_allclose(q["gap_ratio"], 2.0, rtol=1e-13)
    np.testing.assert_allclose(q["gap"], 4.0, rtol=1e-13)


def test_a_clear_maximum_is_not_taken_for_a_tie():
    lam = np.array([[100.0, 25.0, 6.2, 1.0]])  # ratios 2, 2.008.., 2.49..
    g = np.diag(lam[0])[None]
    assert spectral_quantities(g)["k_star"][0] == 3
    g = np.diag([4.0, 1.0, 0.0, 0.0])[None]  # the rank gap: ratio_2 = inf
    assert spectral_quantities(g)["k_star"][0] == 2


def test_principal_angles_of_undefined_modes_are_undefined(tmp_path):
    """A frozen stretch: windows of all-zero deltas have no modes, and windows of rank r < k have no top-k
    subspace; their principal angles are NaN (they were pi/2, a full rotation)."""
    rng = np.random.default_rng(2)
    x = (rng.integers(-64, 64, size=(14, 200)) / 1024).astype(np.float32)
    x[5:10] = 0
    run = ingest_deltas(tmp_path, x)
    w = 3
    ds = run.dynamics(window=w, lr=1e-3, cache=False, interval_factor=None)
    ranks = [np.linalg.matrix_rank(x[e - w + 1 : e + 1]) for e in range(w - 1, x.shape[0])]
    for t in range(ds.sizes["step"]):
        defined = min(ranks[t], ranks[t + 1])
        angle = ds["principal_angle"].values[t]
        assert np.isfinite(angle[:defined]).all()
        assert np.isnan(angle[defined:]).all()
    frozen = ds["lambda"].values.max(axis=1) == 0
    assert frozen.sum() == 3
    # the flow expands about the previous window's modes: undefined where it has lambda_j = 0 (repulsion was 0)
    dead = np.isnan(ds["flow_first"].values)
    assert dead.all(axis=1).sum() == 3
    assert np.array_equal(np.isnan(ds["flow_repulsion"].values), dead)
    still = frozen & (ds["dC_norm"].values == 0)  # nothing enters or leaves: alpha = 1 - C 0 / 0
    assert still.sum() == 2 and np.isnan(ds["alpha"].values[still]).all()


def test_principal_cosines_match_the_explicit_subspaces():
    rng = np.random.default_rng(3)
    o = rng.standard_normal((2, 4, 4))
    o[1, 3, 0] = np.nan
    cos = principal_cosines(o, 3)
    for j in range(1, 4):
        assert cos[0, j - 1] == pytest.approx(np.linalg.svd(o[0, :j, :j], compute_uv=False)[-1])
    assert np.isfinite(cos[1]).all()
    cos = principal_cosines(o, 4)
    assert np.isnan(cos[1, 3]) and np.isfinite(cos[0, 3])


def test_flow_repulsion_of_a_mode_with_zero_eigenvalue_is_undefined():
    """flow_terms documents NaN for modes with lambda_j = 0; the repulsion term was 0 there."""
    rng = np.random.default_rng(4)
    xw = rng.standard_normal((4, 50))
    xw[3] = xw[0] + xw[1]  # the previous window has rank 3
    lam, u = np.linalg.eigh(xw @ xw.T)
    lam, u = lam[::-1].copy(), u[:, ::-1]
    lam[3] = 0.0
    d_in, d_out = rng.standard_normal(50), xw[0]
    out = flow_terms(lam[None], u[None], (xw @ d_in)[None], (xw @ d_out)[None], np.array([d_in @ d_in]),
                     np.array([d_out @ d_out]), np.array([d_in @ d_out]))
    for name in ("entering", "first", "repulsion", "outside", "second"):
        assert np.isnan(out[name][0, 3]), name
        assert np.isfinite(out[name][0, :3]).all(), name


def test_stability_is_undefined_only_where_it_is_zero_over_zero():
    lam = np.array([[4.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [4.0, 1.0, 1.0, 0.0]])
    alpha = stability(lam, np.array([0.5, 0.0, 0.0]))
    np.testing.assert_array_equal(alpha[0], [1 - 0.5 / 3, 0.0, 0.0, 0.5])
    assert np.isnan(alpha[1]).all()
    np.testing.assert_array_equal(alpha[2, [0, 3]], [1.0, 1.0])
    assert np.isnan(alpha[2, [1, 2]]).all()


@pytest.mark.parametrize("n", [2, 5, 12])
def test_lags_longer_than_the_series_have_no_pairs(n):
    """max_lag between n and 2n - 2 crashed (x[0 : n - lag] with lag > n counts from the end: broadcast error);
    every lag against a float64 reference of corr(x_t, y_{t+l}), NaN where fewer than 3 pairs or fewer than
    half of lag 0's."""
    from spectral_analyzer.dynamics.coupling import lagged_correlation

    rng = np.random.default_rng(n)
    x, y = rng.standard_normal(n), rng.standard_normal(n)
    for max_lag in (n - 1, n, n + 3, 2 * n - 2, 2 * n + 5):
        got = lagged_correlation(x, y, max_lag)
        assert got.shape == (2 * max_lag + 1,)
        for i, lag in enumerate(range(-max_lag, max_lag + 1)):
            pairs = [(x[t], y[t + lag]) for t in range(n) if 0 <= t + lag < n]
            if len(pairs) < max(3, -(-n // 2)):
                assert np.isnan(got[i]), (max_lag, lag)
            else:
                a, b = np.array(pairs).T
                np.testing.assert_allclose(got[i], np.corrcoef(a, b)[0, 1], rtol=1e-12, atol=1e-15)
