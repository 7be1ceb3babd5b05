"""The grok step of a run, and the paper's modular-arithmetic quantities from the QK operator's eigenvalues."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .._version import __version__
from ..errors import MetricError
from ..steps import exact_in_float
from ..store import Store
from .circuits import compute_attention_spectra, model_config
from .layouts import find_attention_layers

__all__ = ["compute_qk_grokking", "grok_point"]


def grok_point(metrics: xr.Dataset, metric: str, threshold: float, origin: str) -> tuple[bool, int | float]:
    """(grokked, grok step): the first logged step where *metric* reaches *threshold* (an int; NaN if never).

    A value that float32 holds exactly (TensorBoard's scalars are float32) also counts as the shortest
    decimal that is that float32: 0.95 logged there is 0.949999988, and reaches a threshold of 0.95.

    Raises :class:`MetricError` naming *origin* when *metric* is not logged, *threshold* is not a finite
    number (NaN: never reached; -inf: reached at the first step), or an accuracy logged in percent (above 1)
    is given a threshold that is a fraction (0.95 would be reached at 0.95 %).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) or not (
            np.isfinite(threshold)):
        raise MetricError(f"{origin}: threshold must be a finite number, not {threshold!r}")
    if metric not in metrics.data_vars:  # a coordinate (step) is no series
        logged = ", ".join(map(str, metrics.data_vars)) or "none"
        raise MetricError(f"{origin}: metric {metric!r} is not logged (metrics: {logged})")
    m = metrics[metric]
    top = np.nanmax(m.values) if np.isfinite(m.values).any() else np.nan
    if "acc" in metric.lower() and 0 <= threshold <= 1 < top <= 100:
        raise MetricError(f"{origin}: metric {metric!r} reaches {top:g}, an accuracy in percent, while the threshold "
                          f"{threshold:g} is a fraction; pass threshold={threshold * 100:g}")
    if "acc" in metric.lower() and threshold > 1 and 0 <= top <= 1:
        raise MetricError(f"{origin}: metric {metric!r} reaches {top:g} at most, an accuracy as a fraction, while the "
                          f"threshold {threshold:g} is in percent; pass threshold={threshold / 100:g}")
    # A value float32 holds exactly (TensorBoard keeps scalars as float32: 0.95 logged is 0.949999988) also
    # counts as the shortest decimal that is that float32 (0.95), which is what was logged.
    values = np.nan_to_num(m.values.astype(np.float64), nan=-np.inf)
    with np.errstate(over="ignore"):
        single = np.flatnonzero((values.astype(np.float32).astype(np.float64) == values) & (values < threshold))
    as_logged = values.copy()
    as_logged[single] = [float(str(np.float32(v))) for v in values[single]]
    reached = np.flatnonzero((values >= threshold) | (as_logged >= threshold))
    if not reached.size:
        return False, np.nan
    step = int(m["step"].values[reached[0]])
    exact_in_float([step], origin, "the grokking summary")
    return True, step


def _mean(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the values that are not NaN (NaN where there are none), without numpy's empty-slice
    warning. An infinite ratio (|lambda_2| = 0) counts, as in the trajectory's R_early: left out, a head
    collapsed to rank 1 before grokking had its early ratio taken from its other checkpoints alone."""
    known = ~np.isnan(x)
    count = known.sum(axis=0)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, np.where(known, x, 0.0).sum(axis=0) / np.maximum(count, 1), np.nan)


def compute_qk_grokking(
    store: Store,
    metrics: xr.Dataset,
    *,
    metric: str = "test_acc",
    threshold: float = 0.95,
    wq: str | None = None,
    heads: int | None = None,
    device: str = "auto",
) -> xr.Dataset:
    """The QK-operator grokking summary, per head of one attention layer; see :meth:`Run.grokking`."""
    grokked, grok_step = grok_point(metrics, metric, threshold, store.path)
    shapes = {t.name: tuple(t.shape) for t in store.manifest}
    layer = find_attention_layers(shapes, heads=heads, config=model_config(store), match=wq, origin=store.path)[0]
    att = compute_attention_spectra(store, layer.name, heads=heads, device=device).sel(layer=layer.name)
    steps = att["step"].values
    exact_in_float(steps[[0, -1]], store.path, "the grokking summary")  # its peak steps
    ratio = att["qk_ratio_12"].values  # (step, head)
    gap = att["qk_gap_23"].values
    n_heads = ratio.shape[1]
    decline = peak_step = ratio_grok = np.full(n_heads, np.nan)
    # a grok step past the last checkpoint: no checkpoint holds it, so nothing is "at grokking"
    at = np.flatnonzero(steps <= grok_step) if grokked and grok_step <= steps[-1] else np.array([], dtype=int)
    if at.size:
        last = at[-1]
        before = gap[: last + 1]
        has = np.isfinite(before).any(axis=0)
        peak = np.argmax(np.where(np.isfinite(before), before, -np.inf), axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            decline = np.where(has, before[peak, np.arange(n_heads)] / gap[last], np.nan)
        peak_step = np.where(has, steps[peak].astype(float), np.nan)
        ratio_grok = ratio[last]
    early = _mean(ratio[steps < grok_step] if grokked else ratio)
    ds = xr.Dataset(
        {
            "grokked": ((), grokked),
            "grok_step": ((), float(grok_step)),  # NaN: never; steps as floats so that NaN can say so
            "qk_gap_23_decline": ("head", decline),
            "qk_gap_23_peak_step": ("head", peak_step),
            "qk_ratio_12_early": ("head", early),
            "qk_ratio_12_grok": ("head", ratio_grok),
            "qk_ratio_12_end": ("head", ratio[-1]),
        },
        coords={"head": att["head"].values},
    )
    ds.attrs = {
        "operator": "qk",
        "metric": metric,
        "threshold": threshold,
        "layer": layer.name,
        "heads": layer.heads,
        "store": store.path,
        "spectral_analyzer_version": __version__,
    }
    return ds
