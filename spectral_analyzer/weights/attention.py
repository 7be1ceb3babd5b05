"""Attention-circuit spectra: pure torch kernels, batched over heads (and any leading dims), in float64.

Per head h, with W_Q^h, W_K^h, W_V^h the head's (d_head, d_model) row blocks
of the projections and W_O^h its (d_model, d_head) column block of the output
projection (see :mod:`spectral_analyzer.weights.layouts`):

* QK circuit  W_QK^h = W_Q^h^T W_K^h   (d_model x d_model, rank <= d_head):
  the attention score of a query token x and a key token y is x^T W_QK^h y.
* OV circuit  W_OV^h = W_O^h W_V^h     (d_model x d_model, rank <= d_head):
  what head h writes to the residual stream for a key token y it attends to.

Both are products A^T B of two (r, n) factors, r = d_head << n = d_model, and
everything is computed in the small r-dimensional space, never forming the
n x n matrix:

* singular values: with reduced QR factorisations A^T = Q_A R_A and
  B^T = Q_B R_B (Q with orthonormal columns), A^T B = Q_A (R_A R_B^T) Q_B^T,
  so sigma(A^T B) = sigma(R_A R_B^T), an r x r SVD;
* eigenvalues: A^T B and B A^T have the same nonzero eigenvalues, so those of
  W_QK^h are the eigenvalues of W_K^h W_Q^h^T (r x r). They are complex in
  general (W_QK^h is not symmetric), and returned sorted by modulus,
  descending, the member of a conjugate pair with positive imaginary part
  first.

Cost per head: O(n r^2) for the QR factorisations and the r x r product,
O(r^3) for the SVD or eigenvalues; the n x n circuit would cost O(n^2 r) to
form and O(n^3) to decompose (GPT-2 small, n = 768, r = 64: ~100x less).
Memory: the factors, O(heads n r).
"""

from __future__ import annotations

import torch

__all__ = ["circuit_spectra", "head_factors", "product_eigenvalues", "product_singular_values"]


def product_singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of A^T B, descending, from the factors A and B (..., r, n).

    sigma(A^T B) = sigma(R_A R_B^T) with A^T = Q_A R_A and B^T = Q_B R_B
    (reduced QR): O(n r^2 + r^3) per matrix instead of O(n^2 r + n^3).

    Examples
    --------
    >>> a, b = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    >>> s = product_singular_values(a, b)
    >>> torch.allclose(s, torch.linalg.svdvals(a.T @ b)[:3])
    True
    """
    r_a = torch.linalg.qr(a.mT, mode="r").R
    r_b = torch.linalg.qr(b.mT, mode="r").R
    return torch.linalg.svdvals(r_a @ r_b.mT)


def product_eigenvalues(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The r eigenvalues of B A^T (..., r, r), which are the nonzero eigenvalues of A^T B (n x n), and zeros.

    Complex, sorted by modulus descending; of a conjugate pair (equal moduli)
    the one with positive imaginary part comes first. O(n r^2 + r^3).

    Examples
    --------
    >>> a, b = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    >>> lam = product_eigenvalues(a, b)
    >>> full = torch.linalg.eigvals(a.T @ b)
    >>> torch.allclose(lam.abs(), full.abs().sort(descending=True).values[:3])
    True
    """
    lam = torch.linalg.eigvals(b @ a.mT)
    by_imag = torch.sort(-lam.imag, dim=-1, stable=True).indices
    lam = torch.gather(lam, -1, by_imag)
    by_modulus = torch.sort(-lam.abs(), dim=-1, stable=True).indices
    return torch.gather(lam, -1, by_modulus)


def head_factors(
    w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head factors (..., heads, d_head, d_model): W_Q^h, W_K^g(h), W_V^g(h) and W_O^h^T.

    W_Q (..., heads d_head, d_model), W_K and W_V (..., kv_heads d_head,
    d_model), W_O (..., d_model, heads d_head), as ``nn.Linear`` stores them;
    query head h reads key/value head g(h) = h // (heads / kv_heads).
    """
    *lead, rows, n = w_q.shape
    d = rows // heads
    group = heads // kv_heads
    q = w_q.reshape(*lead, heads, d, n)
    k = w_k.reshape(*lead, kv_heads, d, n)
    v = w_v.reshape(*lead, kv_heads, d, n)
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    o = w_o.reshape(*lead, n, heads, d).movedim(-3, -1)
    return q, k, v, o


def circuit_spectra(
    w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, heads: int, kv_heads: int
) -> dict[str, torch.Tensor]:
    """QK and OV circuit spectra of every head, each (..., heads, d_head).

    * ``qk_sigma``: singular values of W_QK^h = W_Q^h^T W_K^h, descending;
    * ``qk_eig``: its nonzero eigenvalues (complex, by modulus, descending:
      the eigenvalues of W_K^h W_Q^h^T);
    * ``ov_sigma``: singular values of W_OV^h = W_O^h W_V^h, descending.

    Arguments as for :func:`head_factors`, float64 advised.

    Examples
    --------
    >>> shapes = [(8, 16), (4, 16), (4, 16), (16, 8)]  # 2 query heads of 4 rows sharing 1 key/value head
    >>> w = [torch.randn(s, dtype=torch.float64) for s in shapes]
    >>> {k: tuple(v.shape) for k, v in circuit_spectra(*w, heads=2, kv_heads=1).items()}
    {'qk_sigma': (2, 4), 'qk_eig': (2, 4), 'ov_sigma': (2, 4)}
    """
    q, k, v, o = head_factors(w_q, w_k, w_v, w_o, heads, kv_heads)
    qk_sigma, ov_sigma = product_singular_values(q, k), product_singular_values(o, v)
    # values at or below max(d_head, d_model) eps times the circuit's sigma_1 are its rounding, as 0 (as
    # weights.kernel._floored: a rank-1 head's sigma_1/sigma_2 and |lambda_1|/|lambda_2| were 1e16 or 4e15
    # from one step to the next); |lambda| <= sigma_1
    limit = max(q.shape[-2:]) * torch.finfo(q.dtype).eps
    qk_eig = product_eigenvalues(q, k)
    return {
        "qk_sigma": torch.where(qk_sigma > limit * qk_sigma[..., :1], qk_sigma, 0.0),
        "qk_eig": torch.where(qk_eig.abs() > limit * qk_sigma[..., :1], qk_eig, 0.0),
        "ov_sigma": torch.where(ov_sigma > limit * ov_sigma[..., :1], ov_sigma, 0.0),
    }
