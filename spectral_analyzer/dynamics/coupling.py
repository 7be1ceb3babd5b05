"""Coupling of the spectrum to training metrics: lagged correlations."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import MetricError
from ..spectra import SPECTRA_OPTIONS, step_offsets

__all__ = ["MetricError", "correlate", "detrend", "lagged_correlation"]

DETRENDS = {"none": None, "linear": 1, "cubic": 3}


# A residual below this fraction of the series' largest value is the fit's rounding, not a fluctuation:
# zero (a constant or exactly polynomial series correlates with nothing, r is NaN).
ROUNDING = 1e-10


def detrend(y: np.ndarray, t: np.ndarray, kind: str = "linear") -> np.ndarray:
    """Residual of a least-squares polynomial fit in t (NaN kept); 0 where the fit is exact to rounding."""
    deg = DETRENDS[kind]
    ok = np.isfinite(y)
    if not ok.any():
        return y
    if deg is None or ok.sum() <= deg + 1:
        res = y - np.nanmean(y)
    else:
        x = (t - t[ok].mean()) / (np.ptp(t[ok]) or 1.0)
        coef = np.polyfit(x[ok], y[ok], deg)
        res = y - np.polyval(coef, x)
    if np.max(np.abs(res[ok])) <= ROUNDING * np.max(np.abs(y[ok])):
        return np.where(ok, 0.0, np.nan)
    return res


def lagged_correlation(x: np.ndarray, y: np.ndarray, max_lag: int) -> np.ndarray:
    """``r(l) = corr(x_t, y_{t+l})`` for l = -max_lag..max_lag over the pairs where both are finite.

    l > 0 pairs x with later y: the first series leads. NaN at a lag with fewer than 3 pairs, or fewer than
    half as many as at lag 0: a correlation of a handful of far windows would win the best lag by chance.
    """
    n = x.size
    out = np.full(2 * max_lag + 1, np.nan)
    least = max(3, -(-int((np.isfinite(x) & np.isfinite(y)).sum()) // 2))
    for i, lag in enumerate(range(-max_lag, max_lag + 1)):
        if abs(lag) >= n:  # no pairs (a slice to n - lag < 0 would count from the end)
            continue
        a = x[max(0, -lag) : n - max(0, lag)]
        b = y[max(0, lag) : n - max(0, -lag)]
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < least:
            continue
        a, b = _unit(a[ok]), _unit(b[ok])  # r is scale-free; products of 1e155s overflowed (r 0), of 1e-200s
        a, b = a - a.mean(), b - b.mean()  # underflowed (r NaN)
        denom = np.sqrt((a @ a) * (b @ b))
        if denom > 0:
            out[i] = (a @ b) / denom
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    """*v* divided by its largest |value| (unchanged where that is 0)."""
    top = np.abs(v).max()
    return v / top if top > 0 else v


def _lag_steps(steps: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """Median step offset between windows ``l`` apart, signed as the lag; NaN past the run's length."""
    out = np.full(len(lags), np.nan)
    for i, lag in enumerate(lags):
        a = abs(int(lag))
        if a < len(steps):
            out[i] = np.sign(lag) * np.median(steps[a:] - steps[: len(steps) - a])
    return out


def correlate(
    spectra: xr.Dataset,
    metrics: xr.Dataset,
    metric: str,
    *,
    max_lag: int = 10,
    detrend_kind: str = "linear",
    origin: str = "correlate",
) -> xr.Dataset:
    """Lagged correlation of ``gap_ratio`` and each ``ratio_j`` with a logged metric.

    The metric is interpolated (linearly, within its logged range) at the
    spectra's steps; both series are detrended (``"none"``, ``"linear"`` or
    ``"cubic"``) over the steps where both are defined (a constant series
    correlates with nothing: NaN); ``r(l) = corr(x_t, y_{t+l})`` in windows, l > 0 meaning the
    spectrum leads.

    Returns
    -------
    xarray.Dataset
        ``r`` (series, lag), ``best_lag`` and ``best_r`` (series: the lag of
        largest |r|; NaN where r is defined at no lag), ``k_star_cross``: the j whose ratio_j correlates most
        strongly with the metric, and ``lag_steps`` (lag): the median number of training steps between
        windows l apart (a lag counts windows; where checkpoints are unevenly spaced the same lag spans
        different step offsets along the run, and across runs compared side by side).
    """
    if isinstance(max_lag, bool) or not isinstance(max_lag, (int, np.integer)) or max_lag < 0:
        raise MetricError(f"{origin}: max_lag must be a whole number of windows, 0 or more, not {max_lag!r}")
    if metric not in metrics.data_vars:  # a coordinate (step) is no series
        logged = ", ".join(metrics.data_vars) or "none"
        raise MetricError(f"{origin}: metric {metric!r} is not logged (metrics: {logged})")
    if detrend_kind not in DETRENDS:
        raise MetricError(f"unknown detrend {detrend_kind!r}; choose one of {', '.join(DETRENDS)}")
    if "group" in spectra.dims:
        raise MetricError("correlate takes ungrouped spectra")
    m = metrics[metric]
    ok = np.isfinite(m.values)
    if ok.sum() < 3:
        raise MetricError(f"metric {metric!r} is logged at {int(ok.sum())} steps; correlation needs at least 3")
    # steps as exact offsets from the earliest: int64 steps as floats lose their units beyond 2**53
    origin = min(spectra["step"].values.min(), m["step"].values[ok].min())
    steps = step_offsets(spectra["step"].values, origin)
    ms, mv = step_offsets(m["step"].values[ok], origin), m.values[ok]
    y = np.interp(steps, ms, mv, left=np.nan, right=np.nan)
    names = ["gap_ratio"] + [f"ratio_{j}" for j in spectra["mode"].values[:-1]]
    series = [spectra["gap_ratio"].values] + [spectra["ratio"].values[:, j] for j in range(len(names) - 1)]
    r = []
    for x in series:
        # both detrended over the steps where both are defined: trends fitted over different ranges would
        # leave residuals that differ by the trends' difference
        both = np.isfinite(x) & np.isfinite(y)
        xs, ys = (np.where(both, v, np.nan) for v in (x, y))
        r.append(lagged_correlation(detrend(xs, steps, detrend_kind), detrend(ys, steps, detrend_kind), max_lag))
    r = np.array(r)
    score = np.where(np.isnan(r), -np.inf, np.abs(r))
    best = np.argmax(score, axis=1)
    best_r = r[np.arange(len(names)), best]
    lags = np.arange(-max_lag, max_lag + 1)
    ratio_best = np.where(np.isnan(best_r[1:]), -np.inf, np.abs(best_r[1:]))
    ds = xr.Dataset(
        {
            "r": (("series", "lag"), r),
            "best_lag": ("series", np.where(np.isnan(best_r), np.nan, lags[best].astype(float))),  # NaN: no r
            "best_r": ("series", best_r),
            "k_star_cross": ((), int(np.argmax(ratio_best)) + 1 if np.isfinite(ratio_best).any() else 0),
            "lag_steps": ("lag", _lag_steps(steps, lags)),
        },
        coords={"series": names, "lag": lags},
    )
    ds.attrs = {"metric": metric, **{k: spectra.attrs[k] for k in SPECTRA_OPTIONS if k in spectra.attrs},
                "detrend": detrend_kind, "max_lag": max_lag, "lag_unit": "windows (l > 0: the spectrum leads)"}
    return ds
