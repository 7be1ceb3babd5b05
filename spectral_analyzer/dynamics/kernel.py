"""Stability, rotation and eigenvalue flow between consecutive windows.

Pure numpy kernels on the extended Gram ``E`` of W + 1 consecutive deltas
``d_{i-W} .. d_i`` (read off a band with L >= W): ``E[:W, :W]`` is the Gram of
window i-1, ``E[1:, 1:]`` that of window i, and ``E[:W, 1:] = X_{i-1} X_i^T``
the cross-block between them. Every quantity of DESIGN section 2 is a
function of these entries; no parameter-space vector is ever formed.

Notation: ``G = U diag(lambda) U^T`` (descending), ``v_j = X^T u_j / sigma_j``
the eigenvectors of the covariance ``C = X^T X`` in parameter space.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "eig_desc",
    "flow_terms",
    "halves_overlap",
    "mode_energy",
    "overlap_matrix",
    "principal_cosines",
    "rank_two_norm",
    "stability",
    "track_modes",
]


def eig_desc(grams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, rounding below ``W eps lambda_1`` set to 0) and eigenvectors."""
    lam, vec = np.linalg.eigh(grams)
    lam, vec = lam[..., ::-1], vec[..., ::-1]
    w = grams.shape[-1]
    floor = w * np.finfo(np.float64).eps * np.maximum(lam[..., :1], 0.0)
    return np.where(lam > floor, lam, 0.0), vec


def _inv_sigma(lam: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(lam > 0, 1.0 / np.sqrt(np.where(lam > 0, lam, 1.0)), np.nan)


def overlap_matrix(u_a: np.ndarray, lam_a: np.ndarray, cross: np.ndarray, u_b: np.ndarray, lam_b: np.ndarray) -> np.ndarray:
    """``O_jk = <v_j^a, v_k^b> = u_j^aT (X_a X_b^T) u_k^b / (sigma_j^a sigma_k^b)``.

    Batched over a leading axis; NaN where a singular value is 0.
    """
    o = np.swapaxes(u_a, -1, -2) @ cross @ u_b
    return o * _inv_sigma(lam_a)[..., :, None] * _inv_sigma(lam_b)[..., None, :]


def rank_two_norm(n_in: np.ndarray, n_out: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``||dC||_F`` of ``dC = d_i d_i^T - d_{i-W} d_{i-W}^T``:
    ``sqrt(|d_i|^4 + |d_{i-W}|^4 - 2 <d_i, d_{i-W}>^2)`` from band lags 0 and W."""
    return np.sqrt(np.maximum(n_in**2 + n_out**2 - 2 * c**2, 0.0))


def stability(lam: np.ndarray, dc_norm: np.ndarray, constant: float = 1.0) -> np.ndarray:
    """Davis-Kahan stability ``alpha_j = clip(1 - C ||dC||_F / dlambda_j, 0, 1)``,
    ``dlambda_j = min_{k != j} |lambda_j - lambda_k|``.

    0 where dlambda_j = 0 and dC != 0 (the limit); NaN where both are 0 (0 / 0: a
    degenerate level that nothing moves, such as every mode of an all-zero window).
    """
    diff = np.abs(lam[..., :, None] - lam[..., None, :])
    w = lam.shape[-1]
    diff[..., np.arange(w), np.arange(w)] = np.inf
    dlam = diff.min(axis=-1)
    moved = np.broadcast_to(dc_norm[..., None] > 0, dlam.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # -inf past float64's range: clipped to 0
        alpha = 1.0 - constant * dc_norm[..., None] / dlam
    return np.clip(np.where(dlam > 0, alpha, np.where(moved, 0.0, np.nan)), 0.0, 1.0)


def halves_overlap(grams: np.ndarray) -> np.ndarray:
    """Two-halves stability ``|<v_j^(1), v_j^(2)>|``, j = 1..floor(W/2), NaN beyond.

    The window's first floor(W/2) deltas and the rest, each with its own
    eigenvectors; the overlap uses the cross-block X_1 X_2^T of G.
    """
    w = grams.shape[-1]
    h = w // 2
    lam1, u1 = eig_desc(grams[..., :h, :h])
    lam2, u2 = eig_desc(grams[..., h:, h:])
    o = overlap_matrix(u1, lam1, grams[..., :h, h:], u2, lam2)
    out = np.full(grams.shape[:-1], np.nan)
    out[..., :h] = np.abs(np.diagonal(o[..., :h, :h], axis1=-2, axis2=-1))
    return out


def principal_cosines(overlap: np.ndarray, top_k: int) -> np.ndarray:
    """Cosine of the largest principal angle between the top-j subspaces of two windows, j = 1..top_k.

    The smallest singular value of the leading j x j block of the overlap
    matrix (:func:`overlap_matrix`, orthonormal modes on both sides). NaN where
    that block holds a NaN: a mode j' <= j with sigma = 0 on either side, so
    that a top-j subspace does not exist (fewer than j nonzero modes).
    Returns (..., top_k).
    """
    out = []
    for j in range(1, top_k + 1):
        block = overlap[..., :j, :j]
        undefined = np.isnan(block).any(axis=(-2, -1))
        smallest = np.linalg.svd(np.where(np.isnan(block), 0.0, block), compute_uv=False)[..., -1]
        out.append(np.where(undefined, np.nan, smallest))
    return np.stack(out, axis=-1)


def track_modes(overlap: np.ndarray) -> np.ndarray:
    """For each mode of the new window, the mode of the previous window it continues.

    Best overlap, one to one (an assignment on ``|O|``), so modes are
    followed through level crossings.
    """
    n, w, _ = overlap.shape
    out = np.empty((n, w), dtype=np.int64)
    for t in range(n):
        score = np.nan_to_num(np.abs(overlap[t]), nan=0.0)
        rows, cols = linear_sum_assignment(-score)
        out[t, cols] = rows
    return out


def flow_terms(
    lam: np.ndarray,
    u: np.ndarray,
    a_in: np.ndarray,
    a_out: np.ndarray,
    n_in: np.ndarray,
    n_out: np.ndarray,
    c: np.ndarray,
) -> dict[str, np.ndarray]:
    """Perturbation terms of the eigenvalues of ``C + dC`` (C = the previous window's covariance).

    Parameters (batched over a leading axis)
    ----------
    lam, u : eigen-decomposition of the previous window's Gram (descending)
    a_in : ``X_{i-1} d_i`` (W,), band entries <d_{i-W+a}, d_i>
    a_out : ``X_{i-1} d_{i-W}`` (W,)
    n_in, n_out, c : ``|d_i|^2``, ``|d_{i-W}|^2``, ``<d_i, d_{i-W}>``

    Returns
    -------
    dict with ``entering`` = (v_j . d_i)^2, ``exiting`` = (v_j . d_{i-W})^2,
    ``first`` = entering - exiting (Hellmann-Feynman), and ``second``:
    ``sum_{k != j} (v_k . w_j)^2 / (lambda_j - lambda_k)
    + (|w_j|^2 - sum_k (v_k . w_j)^2) / lambda_j`` with ``w_j = dC v_j``; the
    last term is the rest of R^p, where C has eigenvalue 0. NaN for modes
    with lambda_j = 0.
    """
    inv = _inv_sigma(lam)
    p_in = np.einsum("...aj,...a->...j", u, a_in) * inv  # v_j . d_i
    p_out = np.einsum("...aj,...a->...j", u, a_out) * inv  # v_j . d_{i-W}
    live = lam > 0
    p_in_z = np.where(live, p_in, 0.0)
    p_out_z = np.where(live, p_out, 0.0)
    # m[k, j] = v_k . w_j = (v_k . d_i)(d_i . v_j) - (v_k . d_{i-W})(d_{i-W} . v_j)
    m = p_in_z[..., :, None] * p_in_z[..., None, :] - p_out_z[..., :, None] * p_out_z[..., None, :]
    w_norm2 = p_in**2 * n_in[..., None] + p_out**2 * n_out[..., None] - 2 * p_in * p_out * c[..., None]
    gap = lam[..., None, :] - lam[..., :, None]  # [k, j] = lambda_j - lambda_k
    w = lam.shape[-1]
    eye = np.eye(w, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        repulsion = np.where(eye | ~live[..., :, None], 0.0, m**2 / np.where(gap == 0, np.nan, gap)).sum(axis=-2)
        repulsion = np.where(live, repulsion, np.nan)
        rest = (w_norm2 - (m**2).sum(axis=-2)) / np.where(live, lam, np.nan)
    entering, exiting = p_in**2, p_out**2
    return {
        "entering": entering,
        "exiting": exiting,
        "first": entering - exiting,
        "repulsion": repulsion,
        "outside": rest,
        "second": repulsion + rest,
    }


def mode_energy(u: np.ndarray, lam: np.ndarray, partial_grams: np.ndarray) -> np.ndarray:
    """``E_{j,g} = u_j^T G^(g) u_j / lambda_j`` for each group's partial Gram.

    Parameters: u, lam (n, W, W) and (n, W); partial_grams (n_groups, n, W, W).
    Returns (n_groups, n, W); sums to 1 over groups where lambda_j > 0.
    """
    quad = np.einsum("...aj,g...ab,...bj->g...j", u, partial_grams, u)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lam > 0, quad / np.where(lam > 0, lam, 1.0), np.nan)
