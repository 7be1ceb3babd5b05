"""Events and phases of the gap ratio series R(t): pure functions on arrays."""

from __future__ import annotations

import numpy as np

__all__ = ["EVENT_KINDS", "detect_events", "phases"]

EVENT_KINDS = ("gap_collapse", "gap_opening", "gap_collapse_relative", "k_star_shift")


def _persists(mask: np.ndarray, t: int, persistence: int) -> bool:
    return t + persistence <= mask.size and bool(mask[t : t + persistence].all())


def detect_events(
    gap_ratio: np.ndarray,
    k_star: np.ndarray,
    *,
    tau: float = 1.2,
    factor: float | None = None,
    persistence: int = 2,
) -> list[tuple[int, str, int, float]]:
    """Events as ``(index, kind, mode, value)``, in time order.

    * ``gap_collapse``: R goes below *tau* from above it and stays below for
      *persistence* windows; ``gap_opening`` the reverse.
    * ``gap_collapse_relative`` (with *factor*): R falls below its running
      peak / factor; the peak then restarts from the current value.
    * ``k_star_shift``: k* takes a new value that holds for *persistence* windows.

    Each series has an established state (R above or below *tau*; k*), set by
    its first defined window and changed only by an event: a new state that
    holds for *persistence* windows. A flicker shorter than that is no event,
    and neither is the return from it to the state that held all along.
    ``mode`` is k* at the event and ``value`` is R there (the new k* for a shift).
    Windows where R is undefined (NaN) neither start nor continue an event;
    k* = 0 (an all-zero window) is never a state of its own.
    """
    r = np.asarray(gap_ratio, dtype=float)
    k = np.asarray(k_star)
    out: list[tuple[int, str, int, float]] = []
    below = r < tau
    above = r >= tau
    side: bool | None = None  # established: R above tau
    mode: int | None = None  # established k*
    peak = np.nan
    for t in range(r.size):
        if above[t] or below[t]:
            now = bool(above[t])
            if side is None:
                side = now
            elif now != side and _persists(above if now else below, t, persistence):
                out.append((t, "gap_opening" if now else "gap_collapse", int(k[t]), float(r[t])))
                side = now
        if factor is not None and np.isfinite(r[t]):
            if np.isnan(peak) or r[t] > peak:
                peak = r[t]
            elif r[t] < peak / factor:
                out.append((t, "gap_collapse_relative", int(k[t]), float(r[t])))
                peak = r[t]
        if k[t] > 0:
            if mode is None:
                mode = int(k[t])
            elif k[t] != mode and _persists(k == k[t], t, persistence):
                out.append((t, "k_star_shift", int(k[t]), float(r[t])))
                mode = int(k[t])
    return out


def phases(gap_ratio: np.ndarray, fraction: float = 0.8) -> np.ndarray:
    """Rise / plateau / collapse of R(t).

    The plateau runs from the first to the last window where R reaches
    ``fraction * max(R)`` (the largest finite value; an infinite R, a window
    whose spectrum ends at k*, reaches it as the event detector counts it);
    before it R rises, after it R collapses. Windows with R undefined get ``""``.
    """
    r = np.asarray(gap_ratio, dtype=float)
    out = np.full(r.size, "", dtype=object)
    finite = np.isfinite(r)
    high = np.isposinf(r)
    if finite.any():
        high |= finite & (r >= fraction * r[finite].max())
    if not high.any():
        return out.astype(str)
    first, last = np.flatnonzero(high)[[0, -1]]
    idx = np.arange(r.size)
    out[idx < first] = "rise"
    out[(idx >= first) & (idx <= last)] = "plateau"
    out[idx > last] = "collapse"
    out[np.isnan(r)] = ""
    return out.astype(str)
