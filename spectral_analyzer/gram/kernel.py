"""The band kernel: lagged inner products of delta rows, per tensor segment.

Pure torch, no I/O. Products of float32 values are exact in float64, so with
float64 accumulation the band is exact up to float64 summation rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["COL_BLOCK", "DEVICE_COL_BLOCK", "band_rows"]

COL_BLOCK = 32768  # columns converted to float64 at a time on cpu (fits in cache)
DEVICE_COL_BLOCK = 1 << 20  # the same on a gpu, where fewer, larger kernels are faster


def band_rows(
    ring: torch.Tensor,
    new: Sequence[int],
    logical: np.ndarray,
    segments: Sequence[tuple[int, int]],
    max_lag: int,
    *,
    col_block: int | None = None,
) -> np.ndarray:
    """Band entries of the new rows against every row held in a ring buffer.

    ``out[s, r, l] = <x_i[seg_s], x_{i-l}[seg_s]>`` for the r-th new row
    (logical index i) and lags ``l = 0..max_lag``, accumulated in float64; NaN
    where row ``i - l`` is not in the ring.

    Parameters
    ----------
    ring : float32 tensor (R, C)
        Delta rows in any physical order (a circular buffer), on the device
        that computes: the products run on ``ring.device``, in its current
        stream, and only the band entries come back to the host.
    new : sequence of int
        Physical rows of the new deltas.
    logical : int array (R,)
        Logical (delta) index of each physical row, -1 for an empty slot.
    segments : sequence of (start, stop)
        Column ranges, one per tensor piece.
    max_lag : int
        L.
    col_block : int, optional
        Columns converted to float64 at a time: :data:`COL_BLOCK` on cpu,
        :data:`DEVICE_COL_BLOCK` elsewhere.

    Returns
    -------
    numpy.ndarray, float64, shape (len(segments), len(new), max_lag + 1)

    Cost: ``2 len(new) R C`` flops; one float32 -> float64 conversion of the
    ring per call, ``col_block`` columns at a time (``R * col_block * 8`` bytes).

    Examples
    --------
    >>> ring = torch.stack([torch.ones(4), 2 * torch.ones(4)])
    >>> band_rows(ring, [1], np.array([0, 1]), [(0, 4)], 1)[0]
    array([[16.,  8.]])
    """
    device = ring.device
    if col_block is None:
        col_block = COL_BLOCK if device.type == "cpu" else DEVICE_COL_BLOCK
    n_rows = ring.shape[0]
    new = list(new)
    # the new rows' slots are contiguous unless the block wraps round the ring: a view, not a gather
    contiguous = new == list(range(new[0], new[0] + len(new)))
    new_idx = None if contiguous else torch.as_tensor(new, dtype=torch.long, device=device)
    # entries (r, q) of the product that are band entries, and their lags
    lag = logical[np.asarray(new)][:, None] - logical[None, :]
    take = (lag >= 0) & (lag <= max_lag) & (logical[None, :] >= 0)
    r_idx, q_idx = np.nonzero(take)
    lags = lag[r_idx, q_idx]
    width = min(col_block, max((b - a for a, b in segments), default=1))
    buf = torch.empty((n_rows, width), dtype=torch.float64, device=device)
    products = torch.zeros((len(segments), len(new), n_rows), dtype=torch.float64, device=device)
    for s, (start, stop) in enumerate(segments):
        acc = products[s]
        for a in range(start, stop, col_block):
            b = min(a + col_block, stop)
            y = buf[:, : b - a]
            y.copy_(ring[:, a:b])
            fresh = y[new[0] : new[0] + len(new)] if contiguous else y.index_select(0, new_idx)
            acc += fresh @ y.T
    out = np.full((len(segments), len(new), max_lag + 1), np.nan)
    out[:, r_idx, lags] = products.cpu().numpy()[:, r_idx, q_idx]  # one transfer per call
    return out
