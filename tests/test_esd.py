"""ESD summaries: against WeightWatcher itself, and against known answers (planted spikes, Pareto samples, MP law)."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
from scipy import optimize

from spectral_analyzer.weights.esd import (
    EVALS_THRESHOLD,
    MIN_EVALS,
    SMALL_N,
    esd_summary,
    marchenko_pastur,
    mp_median,
    power_law_fit,
)

# Both sides evaluate the same closed forms on eigenvalues that agree to ~1e-13 relative (two LAPACK SVDs of
# the same float64 matrix), and WW's xmin search is an argmin over the same candidates, so a faithful
# implementation picks the same xmin and gives alpha to ~1e-13 (measured: 1e-14). 1e-9 leaves four orders
# of margin for the SVDs' rounding while any change of definition (the (t - 1) / t bias correction, another
# empirical CDF or tail guard, which move xmin or alpha by 1e-3 or more) fails it.
RTOL_WW = 1e-9


def _spiked(rng, n: int, m: int, k: int) -> np.ndarray:
    """N(0, 1) entries plus k orthogonal rank-one spikes of strength 2, 3, ... times the BBP threshold (n m)^(1/4)."""
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((m, k)))
    return rng.standard_normal((n, m)) + (u * ((n * m) ** 0.25 * np.arange(2, 2 + k))) @ v.T


def _sigma(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(w, compute_uv=False)


def _weightwatcher(module: str = "weightwatcher"):
    """Import WW, undoing the ``warnings.simplefilter("ignore")`` it runs at import (WW_powerlaw.py)."""
    with warnings.catch_warnings():
        return pytest.importorskip(module)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """These matrices are too small to gain from BLAS threads, and on a busy machine threads waiting for a core
    made the file 4x slower (65 s against 15 s measured, 2 cores at load 5)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # it comes with weightwatcher's scikit-learn; without it BLAS keeps its threads
        yield
        return
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def reference():
    """WeightWatcher's per-layer analysis of a model of nn.Linear layers with chosen weights, and the weights."""
    ww = _weightwatcher()
    rng = np.random.default_rng(2024)
    layers = {  # name: (weight as nn.Linear stores it (out, in), planted outliers or None for heavy tails)
        "gaussian": (rng.standard_normal((512, 256)), 0),
        "spiked": (_spiked(rng, 512, 256, 3), 3),
        "spiked_wide": (_spiked(rng, 1000, 300, 5).T, 5),
        "student_t2.5": (rng.standard_t(2.5, (512, 256)), None),
        "student_t1.5": (rng.standard_t(1.5, (1000, 300)), None),
    }
    model = torch.nn.Sequential(*[torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w, _ in layers.values()])
    weights = {}
    for layer, (name, (w, _)) in zip(model, layers.items()):
        layer.weight.data = torch.tensor(w, dtype=torch.float32)
        weights[name] = layer.weight.detach().double().numpy()
    watcher = ww.WeightWatcher(model=model)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pandas deprecations inside WW
        details = watcher.analyze()  # WW's defaults: no fix_fingers, pl_package "ww", no mp_fit
        rows = dict(zip(layers, (row for _, row in details.iterrows())))
        mp_layers = [int(rows[name].layer_id) for name, (_, k) in layers.items() if k is not None]
        mp = watcher.analyze(layers=mp_layers, mp_fit=True)  # num_spikes, where the MP model holds
    by_id = dict(zip(mp.layer_id.astype(int), mp.num_spikes.astype(int)))
    spikes = {name: by_id[int(rows[name].layer_id)] for name, (_, k) in layers.items() if k is not None}
    return weights, rows, {name: k for name, (_, k) in layers.items()}, spikes


def test_power_law_fit_and_norms_match_weightwatcher_layer_by_layer(reference):
    weights, rows, _, _ = reference
    for name, w in weights.items():
        got = esd_summary(_sigma(w), w.shape)
        row = rows[name]
        assert got["n_tail"] == row.num_pl_spikes, name  # the same xmin candidate
        np.testing.assert_allclose(got["xmin"], row.xmin, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(got["alpha"], row.alpha, rtol=RTOL_WW, err_msg=name)
        np.testing.assert_allclose(got["ks_distance"], row.D, rtol=RTOL_WW, err_msg=name)
        np.testing.assert_allclose(got["spectral_norm"], row.spectral_norm, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(got["stable_rank"], row.stable_rank, rtol=1e-12, err_msg=name)


def test_outlier_count_matches_weightwatcher_and_the_planted_spikes(reference):
    weights, _, planted, spikes = reference
    assert spikes  # the MP layers were analysed
    for name, ww_count in spikes.items():
        w = weights[name]
        got = esd_summary(_sigma(w), w.shape)["n_outliers"]
        assert got == ww_count == planted[name], (name, float(got), ww_count, planted[name])


def test_power_law_fit_matches_wwfit_on_small_and_large_samples():
    """WW's fitter itself, on both of its paths (n < 20: the bias-corrected small-sample fit)."""
    WWFit = _weightwatcher("weightwatcher.WW_powerlaw").WWFit
    rng = np.random.default_rng(7)
    for n in (MIN_EVALS, 11, SMALL_N - 1, SMALL_N, 57, 400):
        for lam in ((1 - rng.random(n)) ** (-1 / rng.uniform(0.5, 3)), _sigma(rng.standard_t(3, (2 * n, n))) ** 2):
            with contextlib.redirect_stdout(io.StringIO()):
                fit = WWFit(lam)
            alpha, xmin, d, n_tail = power_law_fit(lam)
            assert xmin == fit.xmin and n_tail == np.count_nonzero(lam >= fit.xmin), n
            np.testing.assert_allclose([alpha, d], [fit.alpha, fit.D], rtol=RTOL_WW, err_msg=str(n))


@pytest.mark.parametrize("rank", [2, 5, 7])
def test_a_matrix_of_low_rank_is_fitted_as_weightwatcher_does(rank):
    """16 eigenvalues (WW analyses the matrix) of which only *rank* exceed its threshold: no tail of 8 exists,
    and WWFit falls back to the whole set above the threshold as the tail."""
    WWFit = _weightwatcher("weightwatcher.WW_powerlaw").WWFit
    rng = np.random.default_rng(rank)
    lam = _sigma(rng.standard_normal((40, rank)) @ rng.standard_normal((rank, 16))) ** 2
    with contextlib.redirect_stdout(io.StringIO()):
        fit = WWFit(lam[lam > EVALS_THRESHOLD])  # WW thresholds before fitting
    alpha, xmin, d, n_tail = power_law_fit(lam)
    assert np.isfinite(alpha) and xmin == fit.xmin and n_tail == rank
    np.testing.assert_allclose([alpha, d], [fit.alpha, fit.D], rtol=RTOL_WW)


@pytest.mark.parametrize("alpha", [1.5, 2.5, 4.0])
def test_alpha_of_pareto_samples_within_three_standard_errors(alpha):
    """x = (1 - U)^(-1 / (alpha - 1)) has density (alpha - 1) x^-alpha on [1, inf).

    The MLE over a tail of n values has standard error (alpha - 1) / sqrt(n) (Clauset, Shalizi & Newman
    2009, eq. 3.2); 3 of them hold with probability 0.997 for a fixed tail, and the xmin search only
    shortens the tail (a wider interval), so a fixed seed that passes is no accident.
    """
    rng = np.random.default_rng(int(alpha * 10))
    for n in (300, 3000):
        x = (1 - rng.random(n)) ** (-1 / (alpha - 1))
        got, xmin, d, n_tail = power_law_fit(x)
        assert abs(got - alpha) < 3 * (alpha - 1) / np.sqrt(n_tail), (n, got, n_tail)
        assert xmin >= 1 and 0 < d < 1
        assert n_tail == np.count_nonzero(x >= xmin) >= n // 10


def test_mp_median_against_its_closed_form_at_q1_and_the_empirical_median():
    phi = optimize.brentq(lambda p: p + np.sin(p) - np.pi / 2, 0, 2)  # y = 1: F(m) = (phi + sin phi) / pi
    np.testing.assert_allclose(mp_median(1.0), 2 * (1 - np.cos(phi)), rtol=1e-12)
    # y = 1/4: the median eigenvalue of W^T W / N for a 2000 x 500 Gaussian, whose eigenvalues are rigid
    # (fluctuations of order log(M) / M relative), against the limit law's median
    lam = _sigma(np.random.default_rng(0).standard_normal((2000, 500))) ** 2 / 2000
    np.testing.assert_allclose(np.median(lam), mp_median(0.25), rtol=5e-3)
    with pytest.raises(ValueError, match="aspect ratio"):
        mp_median(2.0)


def test_mp_edge_of_gaussian_matrices_and_planted_spike_counts():
    """Unit-variance entries: edge (sqrt(N) + sqrt(M))^2; k spikes above the BBP threshold: k outliers.

    Over 60 draws of 1000 x 500 the edge's relative error measured sd 0.4%, max 1.4%: 3% is 7 sd.
    """
    rng = np.random.default_rng(11)
    for n, m, k in [(1000, 500, 0), (512, 256, 1), (300, 1000, 4), (2000, 100, 2)]:
        w = _spiked(rng, max(n, m), min(n, m), k) if k else rng.standard_normal((n, m))
        w = w if w.shape == (n, m) else w.T
        lam = _sigma(w) ** 2
        edge, count = marchenko_pastur(lam, max(n, m), min(n, m))
        np.testing.assert_allclose(edge, (np.sqrt(n) + np.sqrt(m)) ** 2, rtol=0.03)
        assert count == k
        np.testing.assert_equal(esd_summary(np.sqrt(lam), (n, m))["n_outliers"], k)


def test_a_batch_is_the_matrices_one_by_one_and_padding_rows_are_nan():
    rng = np.random.default_rng(5)
    shapes = np.array([(120, 40), (30, 90), (50, 50)])
    sigma = np.full((3, len(shapes), 50), np.nan)  # (step, matrix, rank), as weight_spectra fills it
    for step in range(2):  # the last step is padding
        for j, (a, b) in enumerate(shapes):
            s = _sigma(rng.standard_t(3, (a, b)))
            sigma[step, j, : s.size] = s
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = esd_summary(sigma, shapes)
    for name, values in out.items():
        assert values.shape == (3, len(shapes)) and values.dtype == np.float64, name
        assert np.isnan(values[2]).all(), name
    for step in range(2):
        for j, (a, b) in enumerate(shapes):
            one = esd_summary(sigma[step, j, : min(a, b)], (a, b))
            for name, values in out.items():
                np.testing.assert_allclose(values[step, j], one[name], rtol=1e-13, err_msg=name)  # nansum order


def test_degenerate_matrices_give_nan_without_warnings():
    rng = np.random.default_rng(1)
    few = _sigma(rng.standard_normal((40, MIN_EVALS - 1)))  # fewer eigenvalues than WW analyses
    square_orthogonal = np.ones(64)  # all eigenvalues equal: every tail has alpha = inf
    low_rank = _sigma(rng.standard_normal((80, 12)) @ rng.standard_normal((12, 30)))  # median sigma ~ eps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few_out = esd_summary(few, (40, MIN_EVALS - 1))
        zero_out = esd_summary(np.zeros(30), (60, 30))
        flat_out = esd_summary(square_orthogonal, (64, 64))
        low_out = esd_summary(low_rank, (80, 30))
        empty_out = esd_summary(np.zeros((2, 0)), (4, 0))
    esd = ["mp_edge", "n_outliers", "alpha", "xmin", "ks_distance", "n_tail"]
    assert few_out["spectral_norm"] == few[0] ** 2 and np.isfinite(few_out["stable_rank"])
    assert all(np.isnan(few_out[k]) for k in esd)
    assert zero_out["spectral_norm"] == 0 and all(np.isnan(zero_out[k]) for k in esd + ["stable_rank"])
    assert flat_out["stable_rank"] == 64 and np.isnan(flat_out["alpha"])
    assert np.isnan(low_out["mp_edge"]) and np.isfinite(low_out["alpha"])
    assert all(v.shape == (2,) and np.isnan(v).all() for v in empty_out.values())


def test_a_row_with_part_of_its_spectrum_is_refused():
    sigma = np.full((2, 10), np.nan)
    sigma[0] = np.linspace(2, 1, 10)
    sigma[1, :6] = np.linspace(2, 1, 6)
    with pytest.raises(ValueError, match=r"matrix \(1,\) of shape \(30, 10\) has 6 finite singular values"):
        esd_summary(sigma, (30, 10))


def test_summaries_are_the_same_fitted_in_threads_or_one_after_another(monkeypatch):
    import spectral_analyzer.weights.esd as esd

    rng = np.random.default_rng(11)
    sigma = np.sort(np.abs(rng.standard_normal((3, 5, 40))), axis=-1)[..., ::-1]
    sigma[1, 2] = np.nan  # padding
    monkeypatch.setattr(esd, "free_cores", lambda: 2)
    threaded = esd.esd_summary(sigma, (40, 90))
    monkeypatch.setattr(esd, "free_cores", lambda: 1)
    serial = esd.esd_summary(sigma, (40, 90))
    assert threaded.keys() == serial.keys()
    for key in serial:
        np.testing.assert_array_equal(threaded[key], serial[key])
    assert np.isnan(serial["alpha"][1, 2]) and np.isfinite(serial["alpha"]).sum() == 14
