"""Weight-matrix spectra: pure torch / numpy kernels."""

from __future__ import annotations

import numpy as np
import torch

from ..devices import resolve_device
from ..threads import one_thread_each

__all__ = ["batch_limit", "matrix_stats", "singular_values", "split_packed", "top_singular_values"]


def split_packed(name: str, weight: np.ndarray, per_head: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Split a packed attention projection into its q, k and v matrices, named ``name[q]``, ``[k]``, ``[v]``.

    * ``in_proj_weight`` (3E, E): rows [0:E], [E:2E], [2E:3E], as
      ``nn.MultiheadAttention`` slices it (``w.chunk(3)``);
    * ``c_attn.weight`` (E, 3E), GPT-2's ``Conv1D`` stored (in, out) and
      applied as ``x @ W``: columns [0:E], [E:2E], [2E:3E], each returned
      transposed, in ``nn.Linear``'s (out, in) orientation, so that head
      blocks are row blocks here too (transposing changes no singular value);
    * with *per_head* (the head count; :func:`~.layouts.interleaved_packing`
      says which tensors): rows interleaved per head as [heads, (q, k, v),
      d_head], as GPT-NeoX / Pythia / BLOOM's ``query_key_value`` and
      GPT-BigCode's ``c_attn`` pack them; ``[q]`` is every head's q rows, in
      head order (a copy);
    * ``c_attn.weight`` (3E, E), an ``nn.Linear`` (nanoGPT): rows, as
      ``in_proj_weight``.

    Other matrices, and a per-head packing without its head count, are returned as they are.
    """
    last = name.rsplit(".", 1)[-1]
    if per_head and weight.ndim == 2 and weight.shape[0] % (3 * per_head) == 0:
        d, cols = weight.shape[0] // (3 * per_head), weight.shape[1]
        blocks = weight.reshape(per_head, 3, d, cols)
        return [(f"{name}[{part}]", blocks[:, i].reshape(per_head * d, cols)) for i, part in enumerate("qkv")]
    packed = last == "in_proj_weight" or name == "c_attn.weight" or name.endswith(".c_attn.weight")
    if packed and weight.ndim == 2:
        rows, cols = weight.shape
        if name.endswith("c_attn.weight") and cols == 3 * rows:
            return [(f"{name}[{part}]", weight[:, i * rows : (i + 1) * rows].T) for i, part in enumerate("qkv")]
        if rows % 3 == 0 and (last == "in_proj_weight" or rows == 3 * cols):
            e = rows // 3
            return [(f"{name}[{part}]", weight[i * e : (i + 1) * e]) for i, part in enumerate("qkv")]
    return [(name, weight)]


def split_heads(name: str, weight: np.ndarray, blocks: int, axis: int = 0, label: str = "head"
                ) -> list[tuple[str, np.ndarray]]:
    """Blocks of a projection, one per head, named ``name[head h]`` (*label* h): rows [h d, (h+1) d) with
    *axis* 0 (W_Q, W_K, W_V in (out, in)), columns with *axis* 1 (W_O in (out, in))."""
    if weight.shape[axis] % blocks:
        raise ValueError(f"{name}: {weight.shape[axis]} {'rows' if axis == 0 else 'columns'} do not split into "
                         f"{blocks} heads")
    d = weight.shape[axis] // blocks
    if axis == 0:
        return [(f"{name}[{label} {h}]", weight[h * d : (h + 1) * d]) for h in range(blocks)]
    return [(f"{name}[{label} {h}]", weight[:, h * d : (h + 1) * d]) for h in range(blocks)]


# Singular values through the smaller Gram G (W W^T or W^T W, k x k, float64) and eigvalsh. eigvalsh is
# backward stable: |d lambda_j| <= c eps ||G|| = c eps sigma_1^2, so sqrt(lambda_j) has an absolute error
# of about c eps sigma_1^2 / (2 sigma_j): relative to sigma_1, c eps (sigma_1 / sigma_j) / 2, and relative
# to sigma_j itself c eps (sigma_1 / sigma_j)^2 / 2. Two measures keep it exact enough, each taken only by
# the matrices that need it:
# * where that bound exceeds LEAD_TOLERANCE for one of the top REFINED values (sigma_1 / sigma_16 above
#   about 3.7: outliers above a bulk), those values are recomputed as ||W v_j|| from their eigenvectors
#   (error ~ eps sigma_1 plus a term second order in the eigenvector's error), so the leading values are as
#   good as an SVD's; eigenvectors cost eigh about 1.5-2x eigvalsh, so they are asked only then;
# * a matrix whose smallest sigma is below TAIL_LIMIT * sigma_1 (ill-conditioned or rank-deficient: the
#   bound above would exceed TOLERANCE relative to sigma_1) goes to a full SVD instead.
# Near-square matrices go the same way: for a square k x k matrix the Gram and eigvalsh take about 0.7x
# the time of svdvals (batched, float64, 768 x 768: 49 ms against 75 ms a matrix on 2 threads).
TOLERANCE = 1e-9  # wanted: every sigma_j to this, relative to sigma_1
LEAD_TOLERANCE = 1e-13  # wanted: the top REFINED values to this, relative to themselves
GRAM_CONSTANT = 64.0  # c above, measured with margin over random matrices of size up to 4096
_EPS = float(np.finfo(np.float64).eps)
TAIL_LIMIT = GRAM_CONSTANT * _EPS / (2 * TOLERANCE)
REFINED = 16


# On the cpu the Gram is computed a block row at a time, its lower triangle only (all that eigvalsh and eigh
# read): with k blocks, (k + 1) / 2k of the full product's flops. Blocks of at least GRAM_BLOCK rows, at most
# GRAM_BLOCKS of them. Float64, one thread: 768 x 3072 in 46 ms against 75 ms for the full product, the
# 50257 x 768 embedding in 0.73 s against 1.22 s. On a gpu the full product, one launch.
GRAM_BLOCK = 128
GRAM_BLOCKS = 8


def gram_blocks(k: int, device: torch.device | str = "cpu") -> int:
    """How many block rows the k x k Gram is computed in (1: the full product)."""
    return 1 if torch.device(device).type != "cpu" else max(1, min(GRAM_BLOCKS, k // GRAM_BLOCK))


def _lower_gram(batch: torch.Tensor) -> torch.Tensor:
    """The smaller Gram of each matrix of a (b, m, n) batch, right in its lower triangle (the diagonal
    blocks whole, zeros above them)."""
    rows = batch if batch.shape[-2] <= batch.shape[-1] else batch.mT  # (b, k, l), k <= l: gram = rows rows^T
    k = rows.shape[-2]
    blocks = gram_blocks(k, batch.device)
    if blocks == 1:
        return rows @ rows.mT
    gram = torch.zeros(*rows.shape[:-2], k, k, dtype=rows.dtype, device=rows.device)
    step = -(-k // blocks)
    for i in range(0, k, step):
        gram[..., i : i + step, : i + step] = rows[..., i : i + step, :] @ rows[..., : i + step, :].mT
    return gram


# A Gram whose largest diagonal entry (the largest squared row norm) is past float64's range, or below
# GRAM_FLOOR (where the squares of values 1e-9 below sigma_1 near the subnormals, or underflow to 0 for a
# matrix that is not zero), is made again from the
# matrix scaled by its largest |entry|, and the values scaled back: entries of 1e-160 or 1e+160 give
# sigma to the same tolerance as entries of 1.
GRAM_FLOOR = 1e-250


def _unit_scale(batch: torch.Tensor, extreme: torch.Tensor) -> torch.Tensor:
    """Per matrix, its largest |entry| where *extreme* (else 1; 1 for an all-zero matrix)."""
    scale = torch.where(extreme, batch.abs().amax(dim=(-2, -1)), torch.ones_like(extreme, dtype=batch.dtype))
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _gram_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma descending, whether each matrix needs a full SVD) of a float64 batch (b, m, n) via its Gram."""
    wide = batch.shape[-2] <= batch.shape[-1]
    gram = _lower_gram(batch)  # eigvalsh and eigh read the lower triangle (UPLO="L")
    largest = torch.diagonal(gram, dim1=-2, dim2=-1).amax(dim=-1)
    extreme = ~torch.isfinite(largest) | (largest < GRAM_FLOOR)
    if bool(extreme.any()):  # an all-zero matrix is not extreme; one whose squares underflow to 0 is
        extreme &= ~torch.isfinite(largest) | (batch.abs().amax(dim=(-2, -1)) > 0)
    if bool(extreme.any()):
        scale = _unit_scale(batch, extreme)
        sigma, fallback = _gram_batch(batch / scale[..., None, None])
        return sigma * scale[..., None], fallback
    lam = torch.linalg.eigvalsh(gram).flip(-1)  # descending
    sigma = lam.clamp(min=0).sqrt()
    top = min(REFINED, sigma.shape[-1])
    fallback = (lam[..., -1] < (TAIL_LIMIT * sigma[..., 0]) ** 2) & (sigma[..., 0] > 0)
    # the bound relative to sigma_j, c eps (lambda_1 / lambda_j) / 2, above LEAD_TOLERANCE for j = top
    refine = ~fallback & (lam[..., top - 1] * (2 * LEAD_TOLERANCE) < GRAM_CONSTANT * _EPS * lam[..., 0])
    if bool(refine.any()):
        sub = batch[refine]
        lead = torch.linalg.eigh(gram[refine]).eigenvectors.flip(-1)[..., :top]
        head = torch.linalg.vector_norm(sub.mT @ lead if wide else sub @ lead, dim=-2)
        head = head.sort(dim=-1, descending=True).values
        # the unrefined values below are at most the refined top's last (the Gram's rounding lifts them:
        # sorted with the refined ones, a bulk value 2e-7 too large had taken sigma_2's place)
        sigma[refine] = torch.cat([head, torch.minimum(sigma[refine, top:], head[..., -1:])], dim=-1)
    return sigma, fallback


# top=k: block subspace iteration with Rayleigh-Ritz (the randomized range finder with power
# iterations), never forming the Gram. With Q an orthonormal basis of A V and Q^T A = U_b S V_b^T, the
# Ritz triplets (s_j, u_j = Q U_b e_j, v_j = V_b e_j) satisfy A^T u_j = s_j v_j exactly, and the
# residual r_j = A v_j - s_j u_j comes for free from the next iteration's product A V. Then
# [u_j; v_j] / sqrt(2) is an approximate eigenvector of [[0, A], [A^T, 0]] with residual ||r_j|| / sqrt(2):
# a singular value of A lies within ||r_j|| / sqrt(2) of s_j (and s_j <= sigma_j, by interlacing). The
# iteration stops when every one of the top k is within TOP_TOLERANCE * s_1 by that bound; if it would
# cost more flops than the dense path before converging (spectra without a gap after the k-th value
# converge slowly), the dense path answers instead.
TOP_TOLERANCE = 1e-10
OVERSAMPLE = 8
_TOP_SEED = 20261201


def top_singular_values(a: torch.Tensor, k: int) -> torch.Tensor | None:
    """The *k* largest singular values of the float64 matrix *a* to TOP_TOLERANCE * sigma_1, or None.

    None when the subspace iteration would cost more than the dense path
    (Gram and ``eigvalsh``, 2 m n^2 flops) before meeting the tolerance.
    Cost per iteration: about 4 m n q + 4 m q^2 flops, q = k + OVERSAMPLE.
    """
    if a.shape[0] < a.shape[1]:
        a = a.mT
    largest = float(a.abs().max()) if a.numel() else 0.0
    if largest > 0 and not 1e-100 < largest < 1e100:  # products near float64's limits: scaled to |entries| <= 1
        found = top_singular_values(a / largest, k)
        return None if found is None else found * largest
    m, n = a.shape
    q = min(n, k + OVERSAMPLE)
    if 4 * q > n:
        return None
    budget = int(2 * m * n * n // (4 * m * n * q + 4 * m * q * q))
    gen = torch.Generator(device=a.device).manual_seed(_TOP_SEED)
    v = torch.linalg.qr(torch.randn(n, q, dtype=a.dtype, device=a.device, generator=gen)).Q
    y = a @ v
    for _ in range(budget):
        qb = torch.linalg.qr(y).Q
        ub, s, vbt = torch.linalg.svd(qb.mT @ a, full_matrices=False)  # the Rayleigh-Ritz step, q x n
        v = vbt.mT
        y = a @ v  # the next basis, and the residuals of this one
        residual = torch.linalg.vector_norm(y[:, :k] - (qb @ ub[:, :k]) * s[:k], dim=0) / 2**0.5
        if bool((residual <= TOP_TOLERANCE * s[0]).all()):
            return s[:k]
    return None


def batch_limit(shape: tuple[int, int], budget: int) -> int:
    """Matrices of *shape* that one batched decomposition may hold in *budget* bytes (at least 1).

    Per matrix, float64: the matrix and a copy (the refinement's product,
    or the SVD's working copy), the k x k Gram, its eigenvectors and the
    solver's workspace of about as much again (k = the smaller side):
    ``8 (2 m n + 3 k^2)`` bytes.

    >>> batch_limit((768, 768), 1 << 30)
    45
    """
    m, n = shape
    k = min(m, n)
    return max(1, budget // (8 * (2 * m * n + 3 * k * k)))


def singular_values(
    matrices: list[np.ndarray],
    device: str | torch.device = "cpu",
    top: int | None = None,
    budget: int | None = None,
) -> list[np.ndarray]:
    """Singular values (descending, float64) of each matrix: on the cpu one matrix per torch thread at a
    time, on a GPU the matrices of one shape in one batch.

    Each matrix goes through its smaller Gram and ``eigvalsh``, the leading
    values refined from their vectors where the Gram leaves them less exact
    than ``LEAD_TOLERANCE``, with a full SVD for a matrix whose condition
    number makes the Gram inexact: every value to ``TOLERANCE`` relative to
    sigma_1 (see the bounds above :func:`_gram_batch`).
    With *top*, only the top values are returned, through
    :func:`top_singular_values` where that is cheaper and converges (to
    ``TOP_TOLERANCE`` relative to sigma_1), else from the full spectrum.

    Parameters
    ----------
    matrices : list of 2-D arrays
    device : "auto", "cpu", "cuda" or "cuda:N"
        An unavailable device is refused with a ``DeviceError``.
    top : int, optional
        Only the top values (above).
    budget : int, optional
        Bytes a batch may take on a GPU (:func:`batch_limit`); default half
        its free memory. (The cpu holds one matrix's Gram per thread.)
    """
    values = _values(matrices, resolve_device(device), top, budget)
    return [_floored(v, m.shape) for v, m in zip(values, matrices)]


def _floored(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """*values* (descending) with those at or below max(m, n) eps sigma_1, the rounding of a float64 SVD of
    an (m, n) matrix, as 0: an exactly rank-deficient matrix's sigma_2 came out as 1e-16 sigma_1 or 0 by
    its last bits, and sigma_1 / sigma_2 as 1e16 or inf from one step to the next (the spectra zero their
    eigenvalues below W eps lambda_1 alike)."""
    if values.size and values[0] > 0:
        values = np.where(values > max(shape[-2:]) * np.finfo(np.float64).eps * values[0], values, 0.0)
    return values


def _values(matrices: list[np.ndarray], device: torch.device, top: int | None, budget: int | None
            ) -> list[np.ndarray]:
    if budget is None and device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    out: list[np.ndarray | None] = [None] * len(matrices)
    if top:
        rest = []
        for i, m in enumerate(matrices):
            found = None
            if min(m.shape) > top:
                found = top_singular_values(aligned(m).to(device), top)
            if found is None:
                rest.append(i)
            else:
                out[i] = found.cpu().numpy()
        for i, values in zip(rest, _values([matrices[i] for i in rest], device, None, budget)):
            out[i] = values[:top]
        return out  # type: ignore[return-value]
    if device.type == "cpu":
        return _cpu_values(matrices)
    return _batched_values(matrices, device, budget)


# On the cpu, each matrix on its own, straight from the caller's array (no stacked copy: stacking a layer's
# transposed c_attn slices cost 0.7 s a GPT-2 checkpoint), the small ones one per torch thread at a time
# (threads.one_thread_each): eigvalsh's tridiagonalisation is mostly matrix-vector products, which one
# thread drives about as fast as two (48 Grams of 768 x 768: 1.84 s batched on 2 threads, 1.25 s as two
# halves on 1 thread each). A matrix of at least SHARED_SIZE elements (an embedding) takes all the
# threads: its Gram is a large GEMM.
SHARED_SIZE = 1 << 23


# MKL's kernels round differently by where their operands lie: a 768 x 768 matrix starting 8 bytes past a
# 16-byte boundary gave other last bits (687 of its 768 singular values) than the same values on one, so the
# same checkpoint gave other values by where the allocator had put its buffer. Every matrix is decomposed
# from an address on a 64-byte boundary (torch's own allocations are): the values depend on the data alone.
ALIGNMENT = 64


def aligned(matrix: np.ndarray) -> torch.Tensor:
    """*matrix* as a float64 tensor whose data starts on an ALIGNMENT boundary: a view where it already
    does (writeable, positive strides, as ``from_numpy`` wants), else a copy into a torch allocation."""
    m = np.asarray(matrix)
    if (m.dtype == np.float64 and m.ctypes.data % ALIGNMENT == 0 and m.flags.writeable
            and all(st >= 0 for st in m.strides)):
        return torch.from_numpy(m)
    out = torch.empty(m.shape, dtype=torch.float64)
    assert out.data_ptr() % ALIGNMENT == 0  # torch's cpu allocator aligns to 64 bytes
    out.numpy()[...] = m
    return out


def _one(matrix: np.ndarray) -> np.ndarray:
    """Singular values of one matrix on the cpu: the Gram route, or ``svdvals`` where it falls back."""
    if min(matrix.shape) == 0:
        return np.zeros(0)
    w = aligned(matrix)
    values, fallback = _gram_batch(w[None])
    return (torch.linalg.svdvals(w) if bool(fallback[0]) else values[0]).numpy()


def _cpu_values(matrices: list[np.ndarray]) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(matrices)
    shared = [i for i, m in enumerate(matrices) if np.size(m) >= SHARED_SIZE]
    for i in shared:
        out[i] = _one(matrices[i])
    # largest first: the threads then end together, not one left alone with a large matrix at the end
    alone = sorted((i for i in range(len(matrices)) if out[i] is None), key=lambda i: -np.size(matrices[i]))
    for i, values in zip(alone, one_thread_each(_one, [matrices[i] for i in alone], "spectral-analyzer-svd")):
        out[i] = values
    return out  # type: ignore[return-value]


def _batched_values(matrices: list[np.ndarray], device: torch.device, budget: int | None) -> list[np.ndarray]:
    """On a GPU: the matrices of one shape in one batch (at most :func:`batch_limit` of *budget*), each
    batch through the Gram route, ``svdvals`` for those that fall back."""
    out: list[np.ndarray | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(m.shape, []).append(i)
    batches = []
    for shape, idx in by_shape.items():
        step = len(idx) if budget is None or len(shape) != 2 else batch_limit(shape, budget)
        batches += [idx[i : i + step] for i in range(0, len(idx), step)]
    for idx in batches:
        if len(idx) == 1:  # no stacked copy: a vocabulary-sized matrix is decomposed in place
            batch = torch.from_numpy(np.ascontiguousarray(matrices[idx[0]], dtype=np.float64))[None].to(device)
        else:
            batch = torch.from_numpy(np.stack([matrices[i] for i in idx], dtype=np.float64)).to(device)
        if min(batch.shape[-2:]) == 0:
            values = torch.zeros(batch.shape[:-2] + (0,), dtype=torch.float64)
        else:
            values, fallback = _gram_batch(batch)
            if fallback.any():
                values[fallback] = torch.linalg.svdvals(batch[fallback])
        values = values.cpu().numpy()
        for i, v in zip(idx, values):
            out[i] = v
    return out  # type: ignore[return-value]


def matrix_stats(sigma: np.ndarray, frobenius2: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """From singular values (..., rank), NaN-padded: sigma1/sigma2, g12, g23, stable rank ||W||_F^2 / sigma1^2.

    ``||W||_F^2`` is the sum of the squared singular values unless given (*frobenius2*: the top values only
    were computed).
    """
    none = np.full(sigma.shape[:-1], np.nan)  # a value the rank lacks (a matrix with a side of 0: all NaN)
    s1 = sigma[..., 0] if sigma.shape[-1] > 0 else none
    s2 = sigma[..., 1] if sigma.shape[-1] > 1 else none
    s3 = sigma[..., 2] if sigma.shape[-1] > 2 else none
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "sigma_ratio_12": s1 / s2,
            "g12": s1 - s2,
            "g23": s2 - s3,
            "stable_rank": (np.nansum(sigma**2, axis=-1) if frobenius2 is None else frobenius2) / s1**2,
        }
