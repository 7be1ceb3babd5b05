"""Windowed spectra from a band: pure numpy kernels, no I/O, no labels.

Definitions (DESIGN section 2): G_i = X_i X_i^T for the window of W deltas
ending at delta i, read off the band; lambda_1 >= ... >= lambda_W its
eigenvalues, sigma_j = sqrt(lambda_j); ratio_j = sigma_j / sigma_{j+1};
k* = argmax_j ratio_j (1-based); R = ratio_{k*}; g = sigma_{k*} - sigma_{k*+1}.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bbp",
    "k95",
    "spectral_quantities",
    "window_grams",
    "wishart_max_ratio",
]


def window_grams(band: np.ndarray, window: int, stride: int = 1, center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Gram matrices of every window, read off a band.

    ``G_i[a, c] = <d_{i-W+1+a}, d_{i-W+1+c}> = band[i - W + 1 + max(a, c), |a - c|]``.

    Parameters
    ----------
    band : ndarray (n_deltas, L + 1), L >= W - 1
    window : int
        W >= 2.
    stride : int
        Windows end at deltas W-1, W-1+stride, ... (0-based).
    center : bool
        G <- H G H with H = I - 11^T / W.

    Returns
    -------
    ends : ndarray of int (n_windows,)
        0-based index of each window's last delta.
    grams : ndarray (n_windows, W, W), float64

    Examples
    --------
    >>> x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    >>> band = np.array([[x[i] @ x[i - l] if i >= l else np.nan for l in range(2)] for i in range(3)])
    >>> ends, g = window_grams(band, 2)
    >>> np.allclose(g[1], x[1:] @ x[1:].T)
    True
    """
    n, n_lags = band.shape
    if n_lags < window:
        raise ValueError(f"window {window} needs band lags 0..{window - 1}; the band has lags 0..{n_lags - 1}")
    ends = np.arange(window - 1, n, stride)
    a = np.arange(window)
    hi = np.maximum(a[:, None], a[None, :])
    lag = np.abs(a[:, None] - a[None, :])
    rows = ends[:, None, None] - window + 1 + hi[None]
    grams = band[rows, lag[None]]
    if center:
        h = np.eye(window) - 1.0 / window
        grams = h @ grams @ h
    return ends, grams


def spectral_quantities(grams: np.ndarray, center: bool = False, scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Eigenvalues, singular values, ratios, k*, R, gap, weighted k* and k95.

    Eigenvalues below ``W * eps * scale`` (rounding of a rank-deficient
    Gram) are set to 0, so rank deficiency gives ``ratio = inf`` exactly; a
    ratio 0 / 0 is NaN and never chosen as k*. ``scale`` is lambda_1 by
    default; a centred Gram is rounded relative to the Gram before centring,
    so give its trace there (a centred window of identical deltas is then 0,
    not rounding noise with a gap). ``k_star = 0`` where no ratio is defined
    (an all-zero window). With ``center`` the last singular value is
    structurally 0 and ratio_{W-1} is left undefined (NaN).

    Ratios equal within the rounding of the eigenvalues (each lambda_j to
    ``W * eps * scale``) are a tie, and k* (and weighted k*) is the smallest
    of the tied j: sigma = (8, 4, 2, 1) gives k* = 1 whatever the order of
    the window's deltas.

    Returns arrays over windows: ``lambda``, ``sigma``, ``ratio`` (n, W; the
    last column NaN), ``k_star``, ``gap_ratio``, ``gap``, ``k_star_weighted``,
    ``k95``. ``gap_ratio`` and ``gap`` are NaN where ``k_star = 0``.

    Examples
    --------
    >>> q = spectral_quantities(np.diag([64.0, 16.0, 4.0, 1.0])[None])
    >>> int(q["k_star"][0]), float(q["gap_ratio"][0])
    (1, 2.0)
    """
    n, w, _ = grams.shape
    lam = np.linalg.eigvalsh(grams)[:, ::-1]
    top = np.maximum(lam[:, :1], 0.0) if scale is None else np.maximum(np.asarray(scale, dtype=np.float64), 0.0)[:, None]
    floor = w * np.finfo(np.float64).eps * top
    lam = np.where(lam > floor, lam, 0.0)
    sigma = np.sqrt(lam)
    ratio = np.full((n, w), np.nan)
    rel = np.zeros((n, w))  # relative rounding of each ratio, 0 where it is exactly inf or undefined
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio[:, :-1] = sigma[:, :-1] / sigma[:, 1:]
        live = (lam[:, :-1] > 0) & (lam[:, 1:] > 0)
        rel[:, :-1] = np.where(live, 0.5 * floor * (1 / lam[:, :-1] + 1 / lam[:, 1:]), 0.0)
        if center:
            ratio[:, w - 2] = np.nan
        total = sigma.sum(axis=1, keepdims=True)
        weighted = np.where(sigma > 0, sigma / total, 0.0) * ratio
    k_star = _argmax_1based(ratio, rel)
    k_w = _argmax_1based(weighted, rel)
    rows = np.arange(n)
    idx = np.maximum(k_star - 1, 0)
    defined = k_star > 0
    gap_ratio = np.where(defined, ratio[rows, idx], np.nan)
    gap = np.where(defined, sigma[rows, idx] - sigma[rows, np.minimum(idx + 1, w - 1)], np.nan)
    return {
        "lambda": lam,
        "sigma": sigma,
        "ratio": ratio,
        "k_star": k_star,
        "gap_ratio": gap_ratio,
        "gap": gap,
        "k_star_weighted": k_w,
        "k95": k95(lam),
    }


def _argmax_1based(values: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """The smallest j whose value, within its relative rounding *rel*, may be the largest (NaN never; 0 if all NaN)."""
    filled = np.where(np.isnan(values), -np.inf, values)
    with np.errstate(invalid="ignore"):
        lowest_best = np.max(filled * (1 - rel), axis=1, keepdims=True)
        tied = filled * (1 + rel) >= lowest_best
    k = np.argmax(tied, axis=1) + 1
    return np.where(np.isnan(values).all(axis=1), 0, k)


def k95(lam: np.ndarray, fraction: float = 0.95) -> np.ndarray:
    """Smallest k with sum_{j<=k} lambda_j >= fraction * sum_j lambda_j (0 for an all-zero window)."""
    total = lam.sum(axis=1, keepdims=True)
    cum = np.cumsum(lam, axis=1)
    with np.errstate(invalid="ignore"):
        reached = cum >= fraction * total * (1 - 1e-12)
    k = np.argmax(reached, axis=1) + 1
    return np.where(total[:, 0] > 0, k, 0)


def bbp(lam: np.ndarray, p: int, center: bool = False) -> dict[str, np.ndarray]:
    """BBP check: nu^2 = mean(lambda_j, j > W/2) / p; d_crit = nu (p (W - 1))^(1/4);
    margin = sigma_W / d_crit.

    Centred, the window has W - 1 degrees of freedom (lambda_W is 0 by construction): the same with
    W - 1 in place of W. The margin is NaN where d_crit is 0 (every eigenvalue past the middle is 0:
    a frozen group, or a window of rank at most W/2), where sigma_W / d_crit is 0/0.
    """
    w = lam.shape[1] - 1 if center else lam.shape[1]
    live = lam[:, :w]
    with np.errstate(divide="ignore", invalid="ignore"):  # p = 0: a group of empty tensors, NaN throughout
        nu = np.sqrt(live[:, w // 2 :].mean(axis=1) / p)
        d_crit = nu * (p * (w - 1)) ** 0.25
        last = np.sqrt(live[:, w - 1])
        margin = np.where(d_crit > 0, last / d_crit, np.nan)
    return {"nu": nu, "d_crit": d_crit, "margin": margin}


def wishart_max_ratio(window: int, p: int, draws: int = 4000, seed: int = 0, center: bool = False) -> np.ndarray:
    """Max consecutive singular-value ratio of isotropic noise, ``draws`` samples.

    Under X with i.i.d. N(0, nu^2) entries, G / nu^2 ~ Wishart_W(p, I)
    (Wishart_{W-1}(p, I) on the complement of 1 when centred). Sampled exactly
    with the Bartlett decomposition G = T T^T, T lower triangular with
    T_ii^2 ~ chi^2_{p-i+1} and T_ij ~ N(0, 1) below the diagonal: O(W^2)
    per draw, no p-sized vectors.
    """
    w = window - 1 if center else window
    if w < 2:
        return np.full(draws, np.nan)
    rng = np.random.default_rng(seed)
    t = np.tril(rng.standard_normal((draws, w, w)), k=-1)
    df = p - np.arange(w)
    diag = np.zeros((draws, w))
    live = df > 0
    diag[:, live] = np.sqrt(rng.chisquare(df[live], size=(draws, int(live.sum()))))
    t[:, np.arange(w), np.arange(w)] = diag
    sigma = np.linalg.svd(t, compute_uv=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = sigma[:, :-1] / sigma[:, 1:]
    return np.nanmax(np.where(np.isnan(ratios), -np.inf, ratios), axis=1)
