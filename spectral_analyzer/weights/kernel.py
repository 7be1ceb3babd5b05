"""Weight-matrix spectra: pure torch / numpy kernels."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["matrix_stats", "singular_values", "split_packed"]


def split_packed(name: str, weight: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Split a packed attention ``in_proj_weight`` (3E, E) into q, k, v (rows [0:E], [E:2E], [2E:3E]).

    This is ``nn.MultiheadAttention``'s own slicing (``w.chunk(3)``). Other
    matrices are returned as they are.
    """
    if name.rsplit(".", 1)[-1] == "in_proj_weight" and weight.ndim == 2 and weight.shape[0] % 3 == 0:
        e = weight.shape[0] // 3
        return [(f"{name}[{part}]", weight[i * e : (i + 1) * e]) for i, part in enumerate("qkv")]
    return [(name, weight)]


def split_heads(name: str, weight: np.ndarray, heads: int) -> list[tuple[str, np.ndarray]]:
    """Row blocks of a projection, one per attention head: rows [h d, (h+1) d), d = rows / heads."""
    if weight.shape[0] % heads:
        raise ValueError(f"{name}: {weight.shape[0]} rows do not split into {heads} heads")
    d = weight.shape[0] // heads
    return [(f"{name}[head {h}]", weight[h * d : (h + 1) * d]) for h in range(heads)]


def singular_values(matrices: list[np.ndarray], device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Singular values (descending, float64) of each matrix; matrices of one shape go in one batch."""
    out: list[np.ndarray | None] = [None] * len(matrices)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(m.shape, []).append(i)
    for idx in by_shape.values():
        batch = torch.from_numpy(np.stack([matrices[i] for i in idx]).astype(np.float64)).to(device)
        values = torch.linalg.svdvals(batch).cpu().numpy()
        for i, v in zip(idx, values):
            out[i] = v
    return out  # type: ignore[return-value]


def matrix_stats(sigma: np.ndarray) -> dict[str, np.ndarray]:
    """From singular values (..., rank), NaN-padded: sigma1/sigma2, g12, g23, stable rank ||W||_F^2 / sigma1^2."""
    s1, s2 = sigma[..., 0], sigma[..., 1] if sigma.shape[-1] > 1 else np.full(sigma.shape[:-1], np.nan)
    s3 = sigma[..., 2] if sigma.shape[-1] > 2 else np.full(sigma.shape[:-1], np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "sigma_ratio_12": s1 / s2,
            "g12": s1 - s2,
            "g23": s2 - s3,
            "stable_rank": np.nansum(sigma**2, axis=-1) / s1**2,
        }
