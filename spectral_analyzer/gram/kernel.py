"""The band kernel: lagged inner products of delta rows, per tensor segment.

Pure torch, no I/O. Products of float32 values are exact in float64, so with
float64 accumulation the band is exact up to float64 summation rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["COL_BLOCK", "band_rows"]

COL_BLOCK = 32768  # columns converted to float64 at a time (fits in cache)


def band_rows(
    rows: Sequence[torch.Tensor],
    n_new: int,
    segments: Sequence[tuple[int, int]],
    max_lag: int,
    *,
    device: torch.device | str = "cpu",
    col_block: int = COL_BLOCK,
) -> np.ndarray:
    """Band entries of the last *n_new* rows against the rows before them.

    ``out[s, r, l] = <x_r[seg_s], x_{r-l}[seg_s]>`` for the new rows r and lags
    ``l = 0..max_lag``, accumulated in float64; NaN where row ``r - l`` is not
    among *rows*.

    Parameters
    ----------
    rows : sequence of 1-D float32 tensors, all of length C
        ``h`` halo rows (``h <= max_lag``) followed by the ``n_new`` new rows.
    n_new : int
    segments : sequence of (start, stop)
        Column ranges (one per tensor piece in this chunk).
    max_lag : int
        L.

    Returns
    -------
    numpy.ndarray, float64, shape (len(segments), n_new, max_lag + 1)

    Cost: ``2 n_new (h + n_new) C`` flops; memory ``(h + n_new) * col_block * 8``
    bytes beyond the inputs.

    Examples
    --------
    >>> x = [torch.ones(4), 2 * torch.ones(4)]
    >>> band_rows(x, 1, [(0, 4)], 1)[0]
    array([[16.,  8.]])
    """
    h = len(rows) - n_new
    if h < 0 or h > max_lag:
        raise ValueError(f"band_rows: need 0 <= halo <= max_lag, got {h} halo rows for L={max_lag}")
    n_rows = len(rows)
    out = np.full((len(segments), n_new, max_lag + 1), np.nan)
    buf = torch.empty((n_rows, col_block), dtype=torch.float64, device=device)
    # gather[r, l] = column of the product block holding <x_r, x_{r-l}>
    r_idx = np.arange(n_new)[:, None]
    cols = h + r_idx - np.arange(max_lag + 1)[None, :]
    valid = cols >= 0
    for s, (start, stop) in enumerate(segments):
        acc = torch.zeros((n_new, n_rows), dtype=torch.float64, device=device)
        for a in range(start, stop, col_block):
            b = min(a + col_block, stop)
            y = buf[:, : b - a]
            for j, row in enumerate(rows):
                y[j].copy_(row[a:b])
            acc += y[h:] @ y.T
        prod = acc.cpu().numpy()
        out[s][valid] = prod[np.broadcast_to(r_idx, cols.shape)[valid], cols[valid]]
    return out
