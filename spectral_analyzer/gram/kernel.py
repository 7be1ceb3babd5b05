"""The band kernel: lagged inner products of delta rows, per tensor segment.

Pure torch, no I/O. Products of float32 values are exact in float64, so with
float64 accumulation the band is exact up to float64 summation rounding.

:func:`band_plan` sorts a chunk's columns once per task, and sets the layout
of a ring row (:class:`BandPlan`):

* pieces: each segment's whole :data:`COL_BLOCK`-column pieces;
* groups: what is left of each segment (at most one piece per segment),
  padded to the next power of two of its width (at least :data:`MIN_WIDTH`)
  and laid side by side with the pieces of the same padded width. Padding
  columns are zero, so they add exact zeros.

Two layouts. *Compact* (a device ring, float64): a landing row is gathered
into all the pieces side by side, then the groups; a block then costs one
batched product over every piece (summed per segment by one small product
with a 0/1 matrix and one add) and two operations per group: a few
operations whatever the number of tensors in the chunk, at most about
``3 + 2 log2(COL_BLOCK / MIN_WIDTH)``. *In place* (the cpu ring, float32,
read straight from the chunk files): pieces, and remainders of at least
:data:`IN_PLACE_WIDTH` columns, stay where they were read and are converted
to float64 a piece at a time in cache, one product each (on a cpu an
operation costs microseconds, and padding and copies cost more than they
save: measured in benchmarks/bench_kernel.py); only smaller remainders are
copied into padded groups appended to the row (tensors of one width that
already lie side by side are read where they are).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "COL_BLOCK", "DEVICE_GROUP_COLS", "GROUP", "IN_PLACE_WIDTH", "MIN_WIDTH", "BandPlan", "band_entries", "band_plan",
    "band_products", "band_rows", "ring_width",
]

COL_BLOCK = 32768  # columns per piece; on cpu converted to float64 at a time (fits in cache)
DEVICE_GROUP_COLS = 1 << 22  # padded columns of one group in the compact layout (in place: COL_BLOCK)
MIN_WIDTH = 8  # remainders are padded to a power of two at least this wide
IN_PLACE_WIDTH = 2048  # in place, remainders at least this wide are products of their own (no copy, no padding)
# A BLAS rounds a product by its shape: MKL's products of 8 new rows with 24 ring rows and with 28, taken as
# new @ ring^T, differed in the last bits. Taken as ring @ new^T, the ring's rows first, the same entries have
# the same bits whatever the number of ring rows (L + 8) and wherever the rows lie (measured for 2 to 56 rows,
# 5,000 to 100,003 columns), as long as the new rows are the same GROUP: a band entry then has the same bits
# whatever L. Blocks of new rows are GROUP rows from a multiple of GROUP (the last one of a run may be shorter,
# and is recomputed whole when rows are appended: gram.build).
GROUP = 8


@dataclass(frozen=True)
class _Group:
    start: int  # ring column of the first piece
    width: int  # padded width of every piece
    segments: torch.Tensor  # (count,) long: the segment of each piece, all distinct


@dataclass(frozen=True)
class BandPlan:
    """How :func:`band_products` covers the segments of a chunk, and the layout of a ring row.

    Built once per task by :func:`band_plan`; its index tensors live on the
    device that computes, so a block moves nothing from the host.
    """

    n_segments: int
    n_cols: int  # the chunk's columns
    width: int  # a ring row's columns
    compact: bool
    pieces: tuple[tuple[int, int, int], ...]  # (segment, ring column, width); compact: side by side from 0
    groups: tuple[_Group, ...]
    copies: tuple[tuple[int, int, int], ...]  # in place: (chunk column, ring column, width) copied after a read
    gather: torch.Tensor | None  # compact: the chunk column of each ring column (n_cols: a zero), None if the same
    piece_sum: torch.Tensor | None  # compact: (segments with pieces, pieces) 0/1, float64
    piece_segments: torch.Tensor | None  # compact: the segments with pieces

    def land(self, rows: torch.Tensor, read: torch.Tensor) -> None:
        """Fill ring *rows* from *read*, rows of the chunk as read (compact layout)."""
        if self.gather is None:
            rows.copy_(read[:, : self.n_cols])
        else:
            rows.copy_(read.index_select(1, self.gather))

    def spread(self, rows: np.ndarray) -> None:
        """Copy the narrow pieces of ring *rows* (in place layout, the chunk's columns read) into their groups."""
        for a, b, w in self.copies:
            rows[:, b : b + w] = rows[:, a : a + w]


def _layout(segments: Sequence[tuple[int, int]], n_cols: int, compact: bool, kb: int, budget: int):
    """Pieces, groups as (ring column, padded width, segments), copies, the gather and the row's width."""
    pieces: list[tuple[int, int, int]] = []
    narrow: dict[int, list[tuple[int, int, int]]] = {}  # padded width -> (segment, chunk column, width)
    for s, (a, b) in enumerate(segments):
        whole, rest = divmod(b - a, kb)
        pieces += [(s, a + j * kb, kb) for j in range(whole)]
        start = a + whole * kb
        if rest and not compact and rest >= min(IN_PLACE_WIDTH, kb):
            pieces.append((s, start, rest))
        elif rest:
            narrow.setdefault(max(MIN_WIDTH, 1 << (rest - 1).bit_length()), []).append((s, start, rest))
    gather: list[np.ndarray] = []
    if compact:
        gather = [np.arange(a, a + w) for _, a, w in pieces]
        pieces = [(s, j * kb, kb) for j, (s, _, _) in enumerate(pieces)]
    groups: list[tuple[int, int, list[int]]] = []
    copies: list[tuple[int, int, int]] = []
    end = len(pieces) * kb if compact else n_cols
    for width, part_all in sorted(narrow.items()):
        per = max(1, budget // width)
        for i in range(0, len(part_all), per):
            part = part_all[i : i + per]
            segs = [s for s, _, _ in part]
            first = part[0][1]
            if not compact and all(w == width and a == first + j * width for j, (_, a, w) in enumerate(part)):
                groups.append((first, width, segs))  # already side by side in the chunk, unpadded
                continue
            for j, (_, a, w) in enumerate(part):
                if compact:
                    columns = np.full(width, n_cols)  # padding gathers the zero column
                    columns[:w] = np.arange(a, a + w)
                    gather.append(columns)
                    continue
                c, b, v = copies[-1] if copies else (-1, -1, 0)
                if c + v == a and b + v == end + j * width:  # continues the last copy (no padding between)
                    copies[-1] = (c, b, v + w)
                else:
                    copies.append((a, end + j * width, w))
            groups.append((end, width, segs))
            end += len(part) * width
    columns = np.concatenate(gather) if gather else np.zeros(0, dtype=np.int64)
    if compact and np.array_equal(columns, np.arange(n_cols)):
        columns = None  # the chunk as read is the layout
    return pieces, groups, copies, columns, end


def ring_width(segments: Sequence[tuple[int, int]], n_cols: int, compact: bool = False) -> int:
    """Columns of a ring row for these segments (:attr:`BandPlan.width`), without building the plan."""
    return _layout(segments, n_cols, compact, COL_BLOCK, DEVICE_GROUP_COLS if compact else COL_BLOCK)[4]


def band_plan(
    segments: Sequence[tuple[int, int]],
    n_cols: int,
    device: str | torch.device = "cpu",
    *,
    compact: bool = False,
    col_block: int | None = None,
) -> BandPlan:
    """The pieces and groups of :func:`band_products` for *segments* (column ranges of a chunk of *n_cols*).

    Parameters
    ----------
    segments : sequence of (start, stop)
        Column ranges, one per tensor piece, disjoint, within ``[0, n_cols)``.
    n_cols : int
        The chunk's columns.
    device : the device whose ring the plan is used with (its index tensors go there)
    compact : bool
        The compact layout (a float64 device ring, filled by :meth:`BandPlan.land`)
        rather than in place (filled by a read, then :meth:`BandPlan.spread`).
    col_block : int, optional
        Columns per piece; default :data:`COL_BLOCK`.

    Memory: a ring row grows by the padding of the remainders (less than
    their columns), and in place by their copies too.

    Examples
    --------
    >>> segments = [(0, 100_000), *((100_000 + 10 * i, 100_010 + 10 * i) for i in range(500))]
    >>> plan = band_plan(segments, 105_000)
    >>> len(plan.pieces), [(g.width, len(g.segments)) for g in plan.groups], plan.width - plan.n_cols
    (3, [(16, 500), (2048, 1)], 10048)
    >>> plan = band_plan(segments, 105_000, compact=True)
    >>> len(plan.pieces), [(g.width, len(g.segments)) for g in plan.groups], plan.width - plan.n_cols
    (3, [(16, 500), (2048, 1)], 3352)
    """
    device = torch.device(device)
    kb = col_block or COL_BLOCK
    budget = DEVICE_GROUP_COLS if compact else COL_BLOCK
    pieces, groups, copies, columns, width = _layout(segments, n_cols, compact, kb, budget)
    piece_sum = piece_segments = None
    if compact and pieces:
        owners = sorted({s for s, _, _ in pieces})
        indicator = np.zeros((len(owners), len(pieces)))
        indicator[np.searchsorted(owners, [s for s, _, _ in pieces]), np.arange(len(pieces))] = 1.0
        piece_sum = torch.from_numpy(indicator).to(device)
        piece_segments = torch.as_tensor(owners, dtype=torch.long).to(device)
    return BandPlan(
        len(segments), n_cols, width, compact, tuple(pieces),
        tuple(_Group(start, w, torch.as_tensor(segs, dtype=torch.long).to(device)) for start, w, segs in groups),
        tuple(copies),
        None if columns is None else torch.from_numpy(columns.astype(np.int64)).to(device),
        piece_sum, piece_segments,
    )


def band_products(
    ring: torch.Tensor, new: Sequence[int], plan: BandPlan, out: torch.Tensor,
    window: Sequence[tuple[int, int]] | None = None,
) -> None:
    """Add to *out* the products of the new rows with every row of the ring (or of *window*), per segment.

    ``out[s, r, q] += <ring[new[r], seg_s], ring[q, seg_s]>``, float64,
    computed on ``ring.device`` in its current stream; nothing comes back to
    the host and nothing waits. With *window*, q counts the rows of its runs
    instead, in their order.

    Parameters
    ----------
    ring : float32 or float64 tensor (R, plan.width)
        Delta rows in any physical order, in the plan's layout. A float32
        ring is converted :data:`COL_BLOCK` columns at a time; a float64 ring
        (a device ring, converted once when its rows landed) is read in place.
    new : sequence of int
        Physical rows of the new deltas; on a gpu pass consecutive rows (a
        gathered set would copy its index to the device, which waits).
    plan : BandPlan
        From :func:`band_plan` for the chunk's segments, on ``ring.device``.
    out : float64 tensor (n_segments, len(new), R) on ``ring.device``
        (R the rows of *window* when given).
    window : sequence of (first, stop), optional
        Runs of ring rows to take the products with, *new* among them (a
        host ring reads only a block's halo of its slots this way); each
        run costs an operation more per piece.

    Cost: ``2 len(new) R C`` flops, plus as many again at most on the padding
    of the remainders. Operations per block: compact, three for all the
    pieces and two per group; in place, two per piece (one on a float64
    ring) and three per group (two). Memory: on a float32 ring
    ``R * COL_BLOCK * 8`` bytes of converted columns; compact, the
    ``(pieces, len(new), R)`` products before their sum.

    Examples
    --------
    >>> plan = band_plan([(0, 1), (1, 4)], 4)
    >>> ring = torch.zeros(2, plan.width)
    >>> ring[0, :4], ring[1, :4] = 1.0, 2.0
    >>> plan.spread(ring.numpy())
    >>> out = torch.zeros((2, 1, 2), dtype=torch.float64)
    >>> band_products(ring, [1], plan, out)
    >>> out[:, 0]
    tensor([[ 2.,  4.],
            [ 6., 12.]], dtype=torch.float64)
    """
    runs = [(0, ring.shape[0])] if window is None else list(window)
    n_rows, n = sum(b - a for a, b in runs), len(new)
    offsets = np.cumsum([0] + [b - a for a, b in runs])
    new = [int(offsets[i] + r - a) for r in new for i, (a, b) in enumerate(runs) if a <= r < b]  # rows of the window
    if len(new) != n:
        raise ValueError(f"new rows {new} are not all in the window {runs}")
    contiguous = new == list(range(new[0], new[0] + n))
    index = None if contiguous else torch.as_tensor(new, dtype=torch.long, device=ring.device)

    def take(y: torch.Tensor) -> torch.Tensor:  # the new rows of y (a view when they are consecutive)
        return y[new[0] : new[0] + n] if contiguous else y.index_select(0, index)

    def rows(cols: slice, into: torch.Tensor | None = None) -> torch.Tensor:  # the window's rows of ring[:, cols]
        if into is not None:
            for (a, b), o in zip(runs, offsets):
                into[o : o + b - a].copy_(ring[a:b, cols])
            return into
        parts = [ring[a:b, cols] for a, b in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def batched(start: int, count: int, width: int) -> torch.Tensor:  # (count, n, R) products of side-by-side pieces
        y = rows(slice(start, start + count * width))
        if y.dtype != torch.float64:
            y = y.to(torch.float64)
        y = y.view(n_rows, count, width)  # (count, R, n) products, the ring's rows first (see GROUP)
        return torch.bmm(y.transpose(0, 1), take(y).permute(1, 2, 0)).transpose(1, 2)

    if plan.compact and plan.pieces:
        products = batched(0, len(plan.pieces), plan.pieces[0][2]).reshape(len(plan.pieces), n * n_rows)
        out.index_add_(0, plan.piece_segments, (plan.piece_sum @ products).view(-1, n, n_rows))
    elif plan.pieces:
        buf = None
        if ring.dtype != torch.float64:
            # rows of whole 64-byte lines: the new rows' address, after the halo's rows, would otherwise depend on
            # L (an odd width), and MKL rounds by its operands' alignment
            buf = torch.empty((n_rows, -(-max(w for _, _, w in plan.pieces) // 8) * 8), dtype=torch.float64,
                              device=ring.device)
        for s, a, w in plan.pieces:
            y = rows(slice(a, a + w), None if buf is None else buf[:, :w])
            out[s].add_(torch.mm(y, take(y).T).T)  # the ring's rows first (see GROUP)
    for group in plan.groups:
        products = batched(group.start, len(group.segments), group.width)
        out.index_add_(0, group.segments, products)  # distinct segments: one addend each, in any order


def band_entries(products: np.ndarray, new: Sequence[int], logical: np.ndarray, max_lag: int) -> np.ndarray:
    """Band entries ``(n_segments, len(new), max_lag + 1)`` picked from products ``(n_segments, len(new), R)``.

    The entry of new row r at lag l is the product with the ring row holding
    delta ``logical[new[r]] - l``; NaN where no ring row holds it.
    """
    lag = logical[np.asarray(new)][:, None] - logical[None, :]
    take = (lag >= 0) & (lag <= max_lag) & (logical[None, :] >= 0)
    r_idx, q_idx = np.nonzero(take)
    out = np.full((products.shape[0], len(new), max_lag + 1), np.nan)
    out[:, r_idx, lag[r_idx, q_idx]] = products[:, r_idx, q_idx]
    return out


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
    where row ``i - l`` is not in the ring. The ring is copied into the
    plan's layout (in place; compact for a float64 ring off the cpu), then
    one call of :func:`band_products` and one copy to the host (the band
    build keeps its rings in their layout and the products of a whole task
    on the device).

    Parameters
    ----------
    ring : float32 or float64 tensor (R, C)
        Delta rows in any physical order (a circular buffer), on the device
        that computes.
    new : sequence of int
        Physical rows of the new deltas.
    logical : int array (R,)
        Logical (delta) index of each physical row, -1 for an empty slot.
    segments : sequence of (start, stop)
        Column ranges, one per tensor piece.
    max_lag : int
        L.
    col_block : int, optional
        Columns per piece (:data:`COL_BLOCK`).

    Returns
    -------
    numpy.ndarray, float64, shape (len(segments), len(new), max_lag + 1)

    Examples
    --------
    >>> ring = torch.stack([torch.ones(4), 2 * torch.ones(4)])
    >>> band_rows(ring, [1], np.array([0, 1]), [(0, 4)], 1)[0]
    array([[16.,  8.]])
    """
    compact = ring.dtype == torch.float64 and ring.device.type != "cpu"
    plan = band_plan(segments, ring.shape[1], ring.device, compact=compact, col_block=col_block)
    if compact:
        read = torch.cat([ring, ring.new_zeros((ring.shape[0], 1))], dim=1)  # column n_cols: the zero of padding
        ring = ring.new_empty((ring.shape[0], plan.width))
        plan.land(ring, read)
    elif plan.width > ring.shape[1]:
        laid = torch.zeros((ring.shape[0], plan.width), dtype=ring.dtype)
        laid[:, : ring.shape[1]] = ring.cpu()
        plan.spread(laid.numpy())
        ring = laid.to(ring.device)
    out = torch.zeros((len(segments), len(new), ring.shape[0]), dtype=torch.float64, device=ring.device)
    band_products(ring, new, plan, out)
    return band_entries(out.cpu().numpy(), new, logical, max_lag)
