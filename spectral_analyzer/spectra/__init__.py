"""Windowed spectra of a run as labelled xarray Datasets."""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr
from dask.base import tokenize

from .._version import RESULTS_REVISION, __version__
from ..attributes import windowed
from ..errors import MixedIntervalsWarning, WindowError
from ..gram.build import DEFAULT_MAX_LAG, build_band
from ..groups import group_tensors, select_tensors
from ..steps import delta_rows, parse_step_range
from ..store import Store
from .kernel import bbp, spectral_quantities, window_grams, wishart_max_ratio

__all__ = ["INTERVAL_FACTOR", "WindowError", "compute_spectra", "step_offsets", "step_range_label", "step_rows",
           "noted", "warn_mixed_intervals"]

NULL_SEED = 20240601
INTERVAL_FACTOR = 2.0


def step_rows(store: Store, steps) -> slice:
    """The delta rows between the checkpoints whose steps lie in *steps* (``(A, B)``, ``slice(A, B)``, ``"A..B"``).

    All rows when *steps* is None; see :func:`spectral_analyzer.steps.delta_rows`.
    """
    return delta_rows(store.checkpoint_steps, parse_step_range(steps))


def step_offsets(steps, origin) -> np.ndarray:
    """``steps - origin`` (each step at least its origin) as float64, the difference taken exactly.

    int64 steps lose their units beyond 2**53 as floats, and the difference of
    two can overflow int64 (steps from -2**63 to 2**63 - 1); the difference of
    their two's complements modulo 2**64 is exact, then rounded once.

    Examples
    --------
    >>> step_offsets(np.array([2**62 + 1, 2**62 + 3]), 2**62)
    array([1., 3.])
    """
    as_unsigned = (np.asarray(x, dtype=np.int64).view(np.uint64) for x in (steps, origin))
    return np.subtract(*as_unsigned).astype(np.float64)


def step_range_label(store: Store, rows: slice) -> str:
    """``"A..B"``, the steps of the first and last checkpoint of *rows*, or ``""`` for all of them."""
    if rows == slice(0, store.n_deltas):
        return ""
    steps = store.checkpoint_steps
    return f"{steps[rows.start]}..{steps[rows.stop]}"


# The attributes of a spectra result that say which windows of which tensors it holds: a result derived from it
# (correlations, the grokking summary) carries them too.
SPECTRA_OPTIONS = ("window", "stride", "steps", "center", "params", "group_by")


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_window(store: Store, window: int, stride: int = 1, rows: slice | None = None) -> None:
    for name, value in (("window", window), ("stride", stride)):
        if not _whole(value):  # 5.0 or "5" would index the band wrongly or fail deep inside
            raise WindowError(f"{name} must be a whole number of deltas, not {value!r}")
    if window < 2:
        raise WindowError(f"window must be at least 2, got {window}")
    if stride < 1:
        raise WindowError(f"stride must be at least 1, got {stride}")
    if stride >= 2**62:  # (numpy's ranges of such strides are object arrays)
        raise WindowError(f"stride must be less than 2**62, got {stride}")
    rows = slice(0, store.n_deltas) if rows is None else rows
    n = rows.stop - rows.start
    if n < window:
        steps = store.checkpoint_steps  # the checkpoints the deltas lie between
        span = f" (between steps {steps[rows.start]} and {steps[rows.stop]})" if n else ""
        where = "the store has" if n == store.n_deltas else "the step range holds"
        raise WindowError(f"{store.path}: window {window} needs at least {window} deltas; {where} {n}{span}")


def noted(ds: xr.Dataset, warning: str | None) -> xr.Dataset:
    """*ds* with *warning* (what :func:`warn_mixed_intervals` told) as its ``warnings`` attribute, so that a
    result saved or exported carries it; added after the cache, whose key the interval factor is not part of."""
    return ds if not warning else ds.assign_attrs(warnings=warning)


def warn_mixed_intervals(store: Store, ends: np.ndarray, window: int, factor: float | None) -> str | None:
    """Warn once if windows (ending at delta rows *ends*) hold deltas whose step intervals differ by > *factor*;
    the warning's text, or None.

    The spectrum of such a window mixes updates of different lengths: with
    Pythia's steps 1, 2, 4, ..., 512, 1000, 2000, a window over the early
    deltas spans intervals from 1 to 488 steps.
    """
    if factor is None or not ends.size:
        return None
    steps = store.checkpoint_steps
    intervals = step_offsets(steps[1:], steps[:-1])
    spans = np.lib.stride_tricks.sliding_window_view(intervals, window)[ends - window + 1]
    lo, hi = spans.min(axis=1), spans.max(axis=1)
    mixed = np.nonzero(hi > factor * lo)[0]
    if not mixed.size:
        return None
    end = int(ends[mixed[0]])
    first = [int(s) for s in steps[end - window + 1 : end + 2]]
    span = [b - a for a, b in zip(first, first[1:])]  # exact, as Python ints
    message = (
        f"{store.path}: {mixed.size} of {ends.size} windows of {window} deltas mix step intervals differing by more "
        f"than {factor:g}x, the first from step {first[0]} to {first[-1]} (intervals of "
        f"{min(span)} to {max(span)} steps); their spectra mix updates of different lengths: choose steps "
        "with equal intervals (steps=(A, B), --steps A..B)"
    )
    warnings.warn(message, MixedIntervalsWarning, stacklevel=2)
    return message


def effective_lag(window: int, max_lag: int | None) -> int:
    """The band's lag a result asks for: max(max_lag, window), max_lag by default DEFAULT_MAX_LAG."""
    return max(max_lag or DEFAULT_MAX_LAG, window)


def band_for(store: Store, window: int, params, max_lag, device, scheduler, progress):
    """The cached per-tensor band with L >= the :func:`effective_lag`, that lag (what a result records: the
    band may hold more lags, built for an earlier call), the manifest and the picked tensors."""
    lag = effective_lag(window, max_lag)
    manifest = store.manifest
    names = [t.name for t in manifest]
    picked = select_tensors(names, params)  # a selection that matches nothing is refused before the pass
    band, _ = build_band(store, lag, device=device, scheduler=scheduler, progress=progress)
    return band, lag, manifest, names, picked


def _group_spectra(band: np.ndarray, p: int, window: int, stride: int, center: bool, draws: int):
    ends, grams = window_grams(band, window, stride, center)
    # centred, the rounding is that of the Gram before centring: its trace bounds it
    scale = np.trace(window_grams(band, window, stride)[1], axis1=1, axis2=2) if center else None
    q = spectral_quantities(grams, center, scale)
    q.update(bbp(q["lambda"], p, center))
    null = wishart_max_ratio(window, p, draws, seed=NULL_SEED, center=center)
    # inf where p < W (the null's smallest singular value is 0), NaN where W < 2 (no ratio at all)
    q95 = float(np.quantile(null, 0.95)) if np.isfinite(null).all() else np.inf if np.isinf(null).any() else np.nan
    r = q["gap_ratio"]
    with np.errstate(invalid="ignore"):
        exceed = (null[None, :] >= r[:, None]).sum(axis=1)
    q["p_value"] = np.where(np.isnan(r), np.nan, (1 + exceed) / (1 + draws))
    q["null_q95"] = q95
    return ends, q


def compute_spectra(
    store: Store,
    window: int = 10,
    *,
    params: str | list[str] | None = None,
    group_by: str | None = None,
    center: bool = False,
    stride: int = 1,
    steps=None,
    interval_factor: float | None = INTERVAL_FACTOR,
    max_lag: int | None = None,
    null_draws: int = 4000,
    device: str = "auto",
    scheduler=None,
    progress: bool = False,
    cache: bool = True,
) -> xr.Dataset:
    """Spectra of every window of *window* consecutive deltas; see :meth:`Run.spectra`."""
    rows = step_rows(store, steps)
    check_window(store, window, stride, rows)
    if not _whole(null_draws) or null_draws < 1:
        raise WindowError(f"null_draws must be a whole number of draws, 1 or more, not {null_draws!r}")
    names = [t.name for t in store.manifest]  # a selection or grouping that cannot work is refused before
    picked = select_tensors(names, params)     # anything is told of the windows or built
    if group_by:
        group_tensors(names, picked, group_by)
    mixed = warn_mixed_intervals(store, np.arange(rows.start + window - 1, rows.stop, stride), window,
                                 interval_factor)
    part = () if rows == slice(0, store.n_deltas) else (rows.start, rows.stop)
    key = tokenize("spectra", window, params, group_by, center, stride, null_draws, effective_lag(window, max_lag),
                   store.results_identity, __version__, RESULTS_REVISION, *part)
    name = f"spectra-{key[:20]}"
    if cache:
        cached = store.read_result(name)
        if cached is not None:
            return noted(cached, mixed)
    band, lag, manifest, names, picked = band_for(store, window, params, max_lag, device, scheduler, progress)
    band = band[:, rows]
    steps = store.steps[rows]
    groups = group_tensors(names, picked, group_by) if group_by else {"all": picked}
    results = {}
    for label, members in groups.items():
        p = sum(manifest[i].size for i in members)
        results[label] = _group_spectra(band[members].sum(axis=0), p, window, stride, center, null_draws)
        results[label][1]["n_params"] = p
    ends = next(iter(results.values()))[0]
    per_mode = ("sigma", "lambda", "ratio")
    per_step = ("k_star", "gap_ratio", "gap", "k95", "k_star_weighted", "p_value", "nu", "d_crit", "margin")
    scalars = ("null_q95", "n_params")
    labels = list(results)

    def stack(var):
        values = np.stack([np.asarray(results[g][1][var]) for g in labels])
        return values if group_by else values[0]

    gdim = ("group",) if group_by else ()
    data = {v: (gdim + ("step", "mode"), stack(v)) for v in per_mode}
    data.update({v: (gdim + ("step",), stack(v)) for v in per_step})
    data.update({v: (gdim, stack(v)) for v in scalars})
    coords = {"step": steps[ends], "mode": np.arange(1, window + 1)}
    if group_by:
        coords["group"] = labels
    ds = xr.Dataset(data, coords=coords)
    ds["max_ratio"] = ds["gap_ratio"]
    ds.attrs = {
        "window": window,
        "stride": stride,
        "steps": step_range_label(store, rows),
        "center": int(center),
        "params": params if isinstance(params, str) else ",".join(params or []),
        "group_by": group_by or "",
        "max_lag": lag,
        "precision": "float64",
        "null_draws": null_draws,
        "spectral_analyzer_version": __version__,
    }
    _describe(ds)
    ds = windowed(ds, store.steps, store.checkpoint_steps, window)
    if cache:
        store.cache_result(name, ds)
    return noted(ds, mixed)


_DESCRIPTIONS = {
    "sigma": "singular values sigma_j = sqrt(lambda_j) of the window's delta matrix",
    "lambda": "eigenvalues of the window Gram G = X X^T, descending",
    "ratio": "sigma_j / sigma_{j+1} (NaN for the last mode)",
    "k_star": "argmax_j ratio_j, 1-based (0: undefined)",
    "gap_ratio": "R = ratio at k*",
    "gap": "sigma_{k*} - sigma_{k*+1}",
    "k95": "smallest k with 95% of sum(lambda) in the top k",
    "k_star_weighted": "argmax_j (sigma_j / sum sigma) ratio_j",
    "p_value": "P(max ratio of Wishart_W(p, I) noise >= R)",
    "null_q95": "95% quantile of the max ratio under isotropic noise (floor of significance)",
    "nu": "BBP noise level sqrt(mean(lambda_j, j > W/2) / p)",
    "d_crit": "BBP threshold nu (p (W-1))^(1/4)",
    "margin": "sigma_W / d_crit",
    "n_params": "parameters in the subset or group",
    "max_ratio": "max_j ratio_j (= gap_ratio)",
}


def _describe(ds: xr.Dataset) -> None:
    for name, text in _DESCRIPTIONS.items():
        if name in ds:
            ds[name].attrs["description"] = text
