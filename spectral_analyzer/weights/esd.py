"""Empirical spectral density (ESD) summaries of weight matrices: pure numpy / scipy kernels.

The quantities WeightWatcher (``weightwatcher`` 0.7.7, ``WeightWatcher.analyze``
with its defaults) reports per layer, computed from the singular values of each
matrix. Throughout, the ESD of an N x M matrix W (N >= M, whichever way round W
is stored) is WeightWatcher's: the M eigenvalues ``lambda_j = sigma_j^2`` of
W^T W, not divided by N (its ``normalize`` step is disabled in
``combined_eigenvalues``).

* ``spectral_norm = lambda_max = sigma_1^2`` (``apply_norm_metrics``:
  ``np.max(evals)``), and ``stable_rank = sum_j lambda_j / lambda_max`` as
  :func:`~spectral_analyzer.weights.kernel.matrix_stats` computes it.
* ``alpha``, ``xmin``, ``ks_distance`` (WW's ``D``) and ``n_tail`` (WW's
  ``num_pl_spikes``): the power-law fit of the ESD tail, as WW's own fitter
  ``WW_powerlaw.WWFit`` (its default ``pl_package="ww"``) does it; see
  :func:`power_law_fit`.
* ``mp_edge`` and ``n_outliers``: the Marchenko-Pastur bulk edge and the
  eigenvalues beyond it. WW's ``num_spikes`` (``mp_fit=True`` only) comes from
  a kernel-density fit tuned by hand (bandwidth 0.1, a density floor, a
  penalty of 1000 for edges outside the estimate, a grid search then
  Nelder-Mead), so the standard robust estimate is used instead; see
  :func:`marchenko_pastur`.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.typing import ArrayLike
from scipy import integrate, optimize

from ..threads import free_cores
from .kernel import TOLERANCE, matrix_stats

__all__ = ["esd_summary", "marchenko_pastur", "mp_median", "power_law_fit"]

# WeightWatcher's constants (weightwatcher/constants.py, WW_powerlaw.py), kept so alpha matches it
EVALS_THRESHOLD = 1e-5  # EVALS_THRESH: eigenvalues at or below it are left out of the power-law fit
MIN_EVALS = 8  # DEFAULT_MIN_EVALS: analyze() skips a layer with fewer eigenvalues; also the small fit's k_min
SMALL_N = 20  # SMALL_N_CUTOFF: below it WWFit uses its small-sample fit

# Tracy-Widom (beta = 1) 99% quantile (Tracy & Widom 1996; Bejan 2005 tables): the margin above the
# MP edge an eigenvalue must clear to count as an outlier.
TW1_QUANTILE_99 = 2.0234

# Candidate xmin values handled at once in the KS search: a block of BLOCK_ELEMENTS doubles.
BLOCK_ELEMENTS = 1 << 16  # doubles per temporary: 0.5 MiB stays in cache (2.6x faster than 1 << 18 at n = 768)


@functools.lru_cache(maxsize=256)
def mp_median(y: float) -> float:
    """Median of the Marchenko-Pastur law of ratio ``y = M / N`` in (0, 1], unit variance.

    The law of the eigenvalues of W^T W / N, W N x M with i.i.d. unit-variance
    entries, as N, M -> inf with M / N -> y::

        p(x) = sqrt((b - x)(x - a)) / (2 pi y x),   a, b = (1 -+ sqrt(y))^2.

    The median m solves ``F(m) = 1/2``; with ``x = a + (b - a) sin^2(t)`` the
    CDF is the integral of the smooth
    ``(b - a)^2 sin^2(t) cos^2(t) / (pi y x(t))`` over [0, t], solved for t
    by Brent's method. For y = 1, ``m = 2 (1 - cos(phi))`` with
    ``phi + sin(phi) = pi / 2`` (m = 0.65278...).

    Examples
    --------
    >>> round(mp_median(1.0), 4)
    0.6528
    """
    if not 0 < y <= 1:
        raise ValueError(f"mp_median needs the aspect ratio y = M / N in (0, 1]; got {y}")
    a, b = (1 - np.sqrt(y)) ** 2, (1 + np.sqrt(y)) ** 2

    def density(t: float) -> float:
        s2 = np.sin(t) ** 2
        return (b - a) ** 2 * s2 * (1 - s2) / (np.pi * y * (a + (b - a) * s2))

    def cdf_minus_half(t: float) -> float:
        return integrate.quad(density, 0.0, t, epsabs=1e-13, epsrel=1e-13)[0] - 0.5

    t = optimize.brentq(cdf_minus_half, 0.0, np.pi / 2, xtol=1e-15, rtol=1e-15)
    return float(a + (b - a) * np.sin(t) ** 2)


def marchenko_pastur(lam: np.ndarray, n: int, m: int) -> tuple[float, float]:
    """Marchenko-Pastur bulk edge of one ESD and the number of eigenvalues beyond it.

    For W (n x m, n >= m) of i.i.d. entries of variance v, the eigenvalues
    ``lambda = sigma^2`` of W^T W fill ``[v (sqrt(n) - sqrt(m))^2,
    v (sqrt(n) + sqrt(m))^2]`` as n, m grow. v is estimated robustly by
    matching the median eigenvalue to the law's (Gavish & Donoho 2014), so up
    to half the spectrum may be signal without moving it::

        v = median(lambda) / (n mu(m / n)),     mu = :func:`mp_median`
        mp_edge = v (sqrt(n) + sqrt(m))^2

    An outlier is an eigenvalue beyond the edge by more than the 99% quantile
    of the largest noise eigenvalue's Tracy-Widom fluctuation (Johnstone 2001,
    with n for n - 1)::

        n_outliers = #{j : lambda_j > mp_edge + 2.0234 v (sqrt(n) + sqrt(m)) (1/sqrt(n) + 1/sqrt(m))^(1/3)}

    Without the margin, 12-21% of pure-noise matrices (256 to 2000 rows) show
    an outlier; with it 0.7-2% (measured over 150 draws per shape: the
    estimate of v adds its own error, about 0.4% of the edge at 1000 x 500).

    Parameters
    ----------
    lam : ndarray (m,)
        All m eigenvalues sigma_j^2, any order.
    n, m : int
        The larger and the smaller dimension of W.

    Returns
    -------
    mp_edge, n_outliers : float
        In the units of ``lam``. NaN, NaN when the median eigenvalue is
        numerically zero (``sigma_median <= TOLERANCE sigma_1``: more than half
        the spectrum is rank deficiency, and there is no bulk to fit), or
        when ``m < MIN_EVALS``.

    Examples
    --------
    >>> w = np.random.default_rng(0).standard_normal((400, 100))
    >>> w[:, 0] *= 10.0
    >>> edge, k = marchenko_pastur(np.linalg.svd(w, compute_uv=False) ** 2, 400, 100)
    >>> round(edge / 900, 1), k
    (1.0, 1.0)
    """
    if m < MIN_EVALS or lam.size != m:
        return np.nan, np.nan
    median = float(np.median(lam))
    if not median > (TOLERANCE**2) * float(np.max(lam)):
        return np.nan, np.nan
    v = median / (n * mp_median(m / n))
    edge = v * (np.sqrt(n) + np.sqrt(m)) ** 2
    margin = TW1_QUANTILE_99 * v * (np.sqrt(n) + np.sqrt(m)) * (1 / np.sqrt(n) + 1 / np.sqrt(m)) ** (1 / 3)
    return float(edge), float(np.count_nonzero(lam > edge + margin))


def power_law_fit(lam: np.ndarray) -> tuple[float, float, float, float]:
    """Power-law exponent of the ESD tail, fitted as WeightWatcher's ``WWFit`` does.

    The eigenvalues above ``EVALS_THRESHOLD`` (1e-5, WW's ``EVALS_THRESH``)
    sorted, ``x_1 <= ... <= x_n``. Every ``x_i`` but the largest is a
    candidate xmin; its tail ``x_i .. x_n`` (t = n - i + 1 values) has the
    continuous power-law MLE and the KS distance::

        alpha_i = 1 + t / sum_{j>=i} log(x_j / x_i)
        D_i     = max_{j>=i} | 1 - (x_j / x_i)^(1 - alpha_i) - (j - i) / t |

    (the empirical CDF taken at the left of each step, as WWFit does; D_i = 1
    if alpha_i <= 1). xmin is the first ``x_i`` of least D_i. WW has no
    minimum tail size here: tails of 2 values are candidates.

    For ``n < SMALL_N`` (n < 20 values above the threshold), WWFit's
    small-sample fit: tails of at least 8 values only, and the bias-corrected
    ``alpha_i = 1 + (t - 1) / sum_{j>=i} log(x_j / x_i)``; where no tail of 8
    exists (a matrix of rank 2 to 7, say), the whole set is the tail, as
    WWFit falls back to. xmin is again the
    first minimum of D_i: WWFit's small-sample routine picks the minimum of
    ``D_i - 0.868 / sqrt(t)``, but ``WWFit.__init__`` then replaces its
    choice with ``argmin(D)`` for every fit, and that is what WW reports.

    Cost: n^2 / 2 exponentials (about 0.1 s for n = 3000 on one core), in blocks of
    ``BLOCK_ELEMENTS`` doubles.

    Parameters
    ----------
    lam : ndarray (k,)
        Eigenvalues sigma^2 of one matrix, any order; NaN are ignored.

    Returns
    -------
    alpha, xmin, ks_distance, n_tail : float
        ``n_tail`` is WW's ``num_pl_spikes``, the number of eigenvalues
        ``>= xmin``. All NaN for fewer than ``MIN_EVALS`` eigenvalues in all
        (WW skips such a matrix), fewer than 2 above ``EVALS_THRESHOLD``, or
        when no finite alpha exists (a tail of equal values).

    Examples
    --------
    >>> x = (1 - np.random.default_rng(0).random(2000)) ** (-1 / 1.5)  # Pareto, alpha = 2.5, xmin = 1
    >>> alpha, xmin, d, n = power_law_fit(x)
    >>> bool(abs(alpha - 2.5) < 3 * 1.5 / np.sqrt(n))
    True
    """
    finite = lam[np.isfinite(lam)]
    if finite.size < MIN_EVALS:  # WW skips a matrix of fewer than MIN_EVALS eigenvalues
        return np.nan, np.nan, np.nan, np.nan
    x = np.sort(finite[finite > EVALS_THRESHOLD])
    n = x.size
    if n < 2:
        return np.nan, np.nan, np.nan, np.nan
    small = n < SMALL_N
    log_x = np.log(x)
    first = np.arange(n - 1)  # candidate xmin x_i, i = 0 .. n - 2
    t = (n - first).astype(np.float64)
    suffix = np.cumsum(log_x[::-1])[::-1]
    s = suffix[:-1] - t * log_x[:-1]  # sum_{j>=i} log(x_j / x_i)
    with np.errstate(divide="ignore"):  # a tail of equal values: s = 0, alpha = inf, as in WWFit
        alpha = 1 + (t - 1 if small else t) / s
    valid = alpha > 1
    if small:
        valid &= (t >= MIN_EVALS) & (s > 1e-12)
        if not valid.any():  # WWFit's fallback: the whole set as the tail
            valid[0] = s[0] > 1e-12
    ks = np.ones(n - 1)
    flat = valid & np.isinf(alpha)  # x_j / x_i = 1 over the tail: the fitted CDF is 0 there
    ks[flat] = (t[flat] - 1) / t[flat]
    block = max(1, BLOCK_ELEMENTS // n)
    for lo in range(0, n - 1, block):
        i = first[lo : lo + block]
        i = i[valid[i] & ~flat[i]]
        if not i.size:
            continue
        # columns j >= lo; those below the tail (j < i) give 0: both terms are clamped there
        ahead = np.maximum(np.arange(lo, n)[None, :] - i[:, None], 0)  # j - i
        log_ratio = np.maximum(log_x[None, lo:] - log_x[i, None], 0.0)  # log(x_j / x_i)
        gap = np.abs(1 - np.exp((1 - alpha[i, None]) * log_ratio) - ahead / t[i, None])
        ks[i] = gap.max(axis=1)
    best = int(np.argmin(ks))
    if not (valid[best] and np.isfinite(alpha[best])):
        return np.nan, np.nan, np.nan, np.nan
    xmin = float(x[best])
    return float(alpha[best]), xmin, float(ks[best]), float(np.count_nonzero(x >= xmin))


def esd_summary(sigma: np.ndarray, shape: ArrayLike) -> dict[str, np.ndarray]:
    """WeightWatcher's per-matrix ESD summaries from singular values, over a batch.

    With ``lambda_j = sigma_j^2`` (the ESD as WeightWatcher defines it, not
    divided by N):

    * ``spectral_norm = sigma_1^2``;
    * ``stable_rank = sum_j sigma_j^2 / sigma_1^2``
      (:func:`~spectral_analyzer.weights.kernel.matrix_stats`);
    * ``mp_edge``, ``n_outliers``: :func:`marchenko_pastur`;
    * ``alpha``, ``xmin``, ``ks_distance``, ``n_tail``: :func:`power_law_fit`.

    ``xmin`` and ``mp_edge`` are in the units of ``spectral_norm``. A matrix
    whose row is all NaN (padding) gives NaN everywhere; one with fewer than
    ``MIN_EVALS`` eigenvalues (8) gives NaN for all but ``spectral_norm`` and
    ``stable_rank``; an all-zero matrix gives ``spectral_norm`` 0 and NaN
    for the rest. No warnings are raised.

    Parameters
    ----------
    sigma : ndarray (..., rank)
        Singular values of each matrix, descending, NaN-padded along the last
        axis as :func:`~spectral_analyzer.weights.kernel.singular_values`
        fills a (step, matrix, rank) array. A row holds either all
        ``min(shape)`` values of its matrix or none.
    shape : array_like (..., 2) of int
        Each matrix's (rows, cols), broadcast against ``sigma.shape[:-1]``:
        one ``(rows, cols)`` for all, or e.g. an (n_matrix, 2) array for a
        (step, matrix, rank) ``sigma``.

    Returns
    -------
    dict of str to ndarray, each of shape ``sigma.shape[:-1]``, float64
        ``spectral_norm``, ``stable_rank``, ``mp_edge``, ``n_outliers``,
        ``alpha``, ``xmin``, ``ks_distance``, ``n_tail`` (the counts are
        floats so that NaN can mark them undefined).

    Raises
    ------
    ValueError
        If a row holds some but not all ``min(rows, cols)`` singular values
        of its shape: the median and the fit need the whole spectrum.

    Examples
    --------
    >>> w = np.random.default_rng(0).standard_normal((300, 100))
    >>> out = esd_summary(np.linalg.svd(w, compute_uv=False), (300, 100))
    >>> sorted(out)
    ['alpha', 'ks_distance', 'mp_edge', 'n_outliers', 'n_tail', 'spectral_norm', 'stable_rank', 'xmin']
    >>> float(out["n_outliers"])
    0.0
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    batch = sigma.shape[:-1]
    dims = np.broadcast_to(np.asarray(shape, dtype=np.int64), batch + (2,))
    if sigma.shape[-1]:
        stable_rank = np.asarray(matrix_stats(sigma)["stable_rank"])
        out = {"spectral_norm": np.asarray(sigma[..., 0] ** 2), "stable_rank": stable_rank}
    else:
        out = {"spectral_norm": np.full(batch, np.nan), "stable_rank": np.full(batch, np.nan)}
    fields = ("mp_edge", "n_outliers", "alpha", "xmin", "ks_distance", "n_tail")
    for name in fields:
        out[name] = np.full(batch, np.nan)
    work = []
    for idx in np.ndindex(batch):
        row = sigma[idx]
        finite = np.isfinite(row)
        count = int(np.count_nonzero(finite))
        if count == 0:
            continue
        n, m = int(dims[idx].max()), int(dims[idx].min())
        if count != m:
            raise ValueError(
                f"esd_summary: matrix {idx} of shape ({dims[idx][0]}, {dims[idx][1]}) has {count} finite singular "
                f"values; it needs all min(rows, cols) = {m} of them (or none, for padding)"
            )
        work.append((idx, row[finite] ** 2, n, m))

    def summarise(item) -> tuple:
        _, lam, n, m = item
        return marchenko_pastur(lam, n, m) + power_law_fit(lam)

    # the fits' array operations release the GIL: one matrix per free core at a time (a GPT-2 checkpoint's
    # 74 fits took 0.6 s on one core)
    threads = min(free_cores(), len(work)) if len(work) > 1 else 1
    if threads > 1:
        with ThreadPoolExecutor(threads, thread_name_prefix="spectral-analyzer-esd") as pool:
            results = list(pool.map(summarise, work))
    else:
        results = [summarise(item) for item in work]
    for (idx, *_), values in zip(work, results):
        for name, value in zip(fields, values):
            out[name][idx] = value
    return out
