"""Plots of spectra, dynamics and weight spectra (matplotlib), and the ``ds.spectral`` accessor.

Every function takes the Dataset it draws and an optional ``ax``, and returns
the axes, so figures compose in notebooks:

>>> ds = run.spectra(window=10)                      # doctest: +SKIP
>>> ds.spectral.plot_gap_ratio(metrics=run.metrics, metric="test_acc")   # doctest: +SKIP
>>> sa.open_runs("wd*.zarr").spectra(window=10).spectral.plot_gap_ratio()   # one line per run

Results with a ``run`` or ``group`` dimension (several runs, ``group_by``):
:func:`plot_gap_ratio` and :func:`plot_weight_ratio` draw one line per run or
group; the plots of many lines per result (sigma, ratios, alpha, energy)
draw one of them, chosen with ``run=`` / ``group=``, and refuse to guess.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import MetricError, SelectionError

__all__ = [
    "SpectralAccessor",
    "plot_alpha",
    "plot_energy",
    "plot_gap_ratio",
    "plot_ratios",
    "plot_sigma",
    "plot_weight_ratio",
]

_EVENT_COLORS = {"gap_collapse": "tab:red", "gap_opening": "tab:green", "gap_collapse_relative": "tab:orange",
                 "k_star_shift": "tab:purple"}


def _label(text) -> str:
    """*text* (a name from a file: tensor, metric, group, run) as matplotlib draws it literally.

    matplotlib reads text between two unescaped ``$`` as math (mathtext) and
    fails on what does not parse (``layers.$\\frac{$.q``); each ``$`` escaped
    as ``\\$`` is drawn as a dollar sign.
    """
    return str(text).replace("$", r"\$")


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(8, 3.6))
    return ax


def _need(ds: xr.Dataset, plot: str, names: tuple[str, ...], made_by: str) -> None:
    """Refuse a Dataset that is not the kind of result *plot* draws."""
    missing = [n for n in names if n not in ds]
    if missing:
        have = ", ".join(map(str, ds.data_vars)) or "no variables"
        raise SelectionError(f"{plot} draws the result of {made_by}: this Dataset has no {missing[0]!r} ({have})")


def _pick(ds: xr.Dataset, plot: str, **chosen) -> xr.Dataset:
    """Select one run / group where the Dataset has several, as ``chosen`` says, or refuse."""
    for dim, label in chosen.items():
        if dim not in ds.dims:
            if label is not None:
                raise SelectionError(f"{plot}: {dim}={label!r} given, but this Dataset has no {dim} dimension")
            continue
        labels = [str(v) for v in ds[dim].values]
        if label is None:
            if len(labels) == 1:
                ds = ds.isel({dim: 0})
                continue
            raise SelectionError(f"{plot} draws one {dim} at a time: pass {dim}= one of {', '.join(labels)}")
        if str(label) not in labels:
            raise SelectionError(f"{plot}: no {dim} {label!r} (the {dim}s: {', '.join(labels)})")
        ds = ds.isel({dim: labels.index(str(label))})
        if dim == "run":
            ds = _held(ds)
    return ds


def _held(ds: xr.Dataset) -> xr.Dataset:
    """*ds* at the steps where it holds a value: runs side by side are outer-joined on ``step``, so one run is NaN
    at another's steps, and a line through those NaN would be broken into points that are not drawn (so is a
    series logged at fewer steps than the others)."""
    return ds.dropna("step", how="all") if "step" in ds.dims else ds


def _lines(ds: xr.Dataset) -> list[tuple[str | None, xr.Dataset]]:
    """``(label, part)`` per run and group: one line each."""
    parts: list[tuple[str | None, xr.Dataset]] = [(None, ds)]
    for dim in ("run", "group"):
        if dim in ds.dims:
            parts = [(f"{label}, {_label(v)}" if label else _label(v), part.isel({dim: i}))
                     for label, part in parts for i, v in enumerate(part[dim].values)]
    return [(label, _held(part)) for label, part in parts]


def _mark_events(ax, events: xr.Dataset | None) -> None:
    if events is None:
        return
    _need(events, "events=", ("event_step", "event_kind"), "run.dynamics()")
    if "run" in events.dims:
        raise SelectionError("events= takes the dynamics of one run: select it with .sel(run=...)")
    seen = set()
    for step, kind in zip(events["event_step"].values, events["event_kind"].values):
        if not np.isfinite(step):
            continue
        ax.axvline(step, color=_EVENT_COLORS.get(str(kind), "k"), ls="--", lw=1, alpha=0.8,
                   label=None if kind in seen else _label(kind))
        seen.add(kind)


def _mark_grok(ax, grok) -> None:
    """A vertical line at the grok step: a number, or a ``run.grokking()`` result."""
    if grok is None:
        return
    if isinstance(grok, xr.Dataset):
        _need(grok, "grok=", ("grok_step",), "run.grokking()")
        steps = np.atleast_1d(grok["grok_step"].values).astype(float)
        labels = [_label(r) for r in grok["run"].values] if "run" in grok.dims else [None]
    else:
        steps, labels = np.atleast_1d(np.asarray(grok, dtype=float)), [None]
    for step, label in zip(steps, labels):
        if np.isfinite(step):
            ax.axvline(step, color="k", lw=1.5, alpha=0.7, label="grok step" + (f" ({label})" if label else ""))


def plot_sigma(ds: xr.Dataset, modes: int | None = None, *, group=None, run=None, ax=None):
    """sigma_j(t) on a log axis, one line per mode.

    Parameters
    ----------
    ds : a result of ``run.spectra()``
    modes : int, optional
        The first *modes* singular values (all W by default).
    group, run : label, optional
        The group or run drawn, where *ds* has several.
    ax : matplotlib axes, optional

    Returns
    -------
    matplotlib axes
    """
    _need(ds, "plot_sigma", ("sigma",), "run.spectra()")
    ds = _pick(ds, "plot_sigma", run=run, group=group)
    ax = _axes(ax)
    sigma = ds["sigma"]
    n = sigma.sizes["mode"] if modes is None else min(modes, sigma.sizes["mode"])
    for j in range(n):
        values = sigma.isel(mode=j).values
        ax.plot(ds["step"].values, np.where(values > 0, values, np.nan), label=f"sigma_{j + 1}", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("singular value")
    ax.set_title(f"window spectrum (W = {ds.attrs.get('window', '?')})")
    ax.legend(fontsize=7, ncol=min(n, 5))
    return ax


def plot_ratios(ds: xr.Dataset, events: xr.Dataset | None = None, modes: int = 4, *, group=None, run=None, ax=None):
    """Consecutive ratios sigma_j / sigma_{j+1}, with k* marked at each window and events as vertical lines.

    Parameters
    ----------
    ds : a result of ``run.spectra()``
    events : a result of ``run.dynamics()``, optional
        Its events drawn as dashed lines, coloured by kind.
    modes : int
        Ratios of the first *modes* modes.
    group, run : label, optional
        The group or run drawn, where *ds* has several.
    ax : matplotlib axes, optional
    """
    _need(ds, "plot_ratios", ("ratio", "k_star", "gap_ratio"), "run.spectra()")
    ds = _pick(ds, "plot_ratios", run=run, group=group)
    ax = _axes(ax)
    steps = ds["step"].values
    for j in range(min(modes, ds.sizes["mode"] - 1)):
        ax.plot(steps, ds["ratio"].isel(mode=j).values, lw=1, label=f"ratio_{j + 1}")
    ax.scatter(steps, ds["gap_ratio"].values, s=10, c="k", zorder=3, label="R at k*")
    for s, k, r in zip(steps, ds["k_star"].values, ds["gap_ratio"].values):
        if np.isfinite(r):
            ax.annotate(str(int(k)), (s, r), fontsize=6, xytext=(0, 3), textcoords="offset points", ha="center")
    _mark_events(ax, events)
    ax.set_xlabel("step")
    ax.set_ylabel("sigma_j / sigma_{j+1}")
    ax.set_title("ratios, with k* and events")
    ax.legend(fontsize=7, ncol=3)
    return ax


def plot_gap_ratio(ds: xr.Dataset, metrics: xr.Dataset | None = None, metric: str | None = None, *,
                   events: xr.Dataset | None = None, grok=None, ax=None):
    """The gap ratio R(t) with its noise floor, one line per run and group; a logged metric on a second axis.

    Parameters
    ----------
    ds : a result of ``run.spectra()`` or ``run.dynamics()`` (or of ``sa.open_runs(...)``)
    metrics, metric : the run's ``run.metrics`` and the name of a series in it, optional
        Drawn on a second axis (one line per run where *metrics* has a ``run`` dimension).
    events : a result of ``run.dynamics()``, optional
        Its events as dashed lines.
    grok : a step, or a result of ``run.grokking()``, optional
        Marked with a solid vertical line ("grok step").
    ax : matplotlib axes, optional
    """
    _need(ds, "plot_gap_ratio", ("gap_ratio",), "run.spectra() or run.dynamics()")
    if metric is not None and metrics is None:
        raise MetricError(f"metric={metric!r} needs the series it is read from: pass metrics=run.metrics")
    if metrics is not None and metric is None:
        raise MetricError(f"metrics= given without metric=: name one of {', '.join(metrics.data_vars) or 'none'}")
    if metrics is not None and metric not in metrics.data_vars:
        raise MetricError(f"metric {metric!r} is not logged (metrics: {', '.join(metrics.data_vars) or 'none'})")
    ax = _axes(ax)
    lines = _lines(ds)
    for i, (label, part) in enumerate(lines):
        color = f"C{i}" if len(lines) > 1 else "tab:blue"
        ax.plot(part["step"].values, part["gap_ratio"].values, color=color, lw=1.5,
                label=f"R ({label})" if label else "gap ratio R")
        if "null_q95" in part and np.isfinite(float(part["null_q95"])):
            ax.axhline(float(part["null_q95"]), color=color, ls=":", lw=1,
                       label="noise floor (Wishart q95)" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("R")
    _mark_events(ax, events)
    _mark_grok(ax, grok)
    if metrics is not None:
        other = ax.twinx()
        for i, (label, part) in enumerate(_lines(metrics[[metric]])):
            other.plot(part["step"].values, part[metric].values, color="tab:red", lw=1.2, alpha=0.9 - 0.3 * (i > 0),
                       ls="-" if i == 0 else "--",
                       label=f"{_label(metric)} ({label})" if label else _label(metric))
        other.set_ylabel(_label(metric), color="tab:red")
        other.legend(fontsize=7, loc="upper right")
    ax.set_title("gap ratio" + (f" and {_label(metric)}" if metric else ""))
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_alpha(dyn: xr.Dataset, modes: int = 4, *, run=None, ax=None):
    """Davis-Kahan stability alpha_j(t), one line per mode.

    Parameters
    ----------
    dyn : a result of ``run.dynamics()``
    modes : int
        The first *modes* modes.
    run : label, optional
        The run drawn, where *dyn* has several.
    ax : matplotlib axes, optional
    """
    _need(dyn, "plot_alpha", ("alpha",), "run.dynamics()")
    dyn = _pick(dyn, "plot_alpha", run=run)
    ax = _axes(ax)
    for j in range(min(modes, dyn.sizes["mode"])):
        ax.plot(dyn["step"].values, dyn["alpha"].isel(mode=j).values, lw=1.2, label=f"alpha_{j + 1}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    ax.set_title("stability per mode")
    ax.legend(fontsize=7, ncol=4)
    return ax


def plot_energy(dyn: xr.Dataset, mode: int = 1, *, run=None, ax=None):
    """Heatmap of the share of mode *mode* carried by each group over time.

    Parameters
    ----------
    dyn : a result of ``run.dynamics()``
    mode : int
        The mode (1 the largest).
    run : label, optional
        The run drawn, where *dyn* has several.
    ax : matplotlib axes, optional
    """
    _need(dyn, "plot_energy", ("energy",), "run.dynamics()")
    dyn = _pick(dyn, "plot_energy", run=run)
    modes = dyn["mode"].values
    if mode not in modes:
        raise SelectionError(f"no mode {mode} in these dynamics (modes {modes[0]}..{modes[-1]})")
    ax = _axes(ax)
    e = dyn["energy"].sel(mode=mode).transpose("group", "step").values
    # each window's column spans halfway to its neighbours' steps: checkpoints need not be evenly spaced
    steps = dyn["step"].values.astype(np.float64)
    half = np.diff(steps) / 2 if steps.size > 1 else np.array([0.5])
    edges = np.concatenate([[steps[0] - half[0]], steps[:-1] + half, [steps[-1] + half[-1]]])
    im = ax.pcolormesh(edges, np.arange(e.shape[0] + 1) - 0.5, e, cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(e.shape[0]), [_label(g) for g in dyn["group"].values], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"mode {mode} energy by group")
    ax.figure.colorbar(im, ax=ax, fraction=0.03)
    return ax


def plot_weight_ratio(ws: xr.Dataset, *, grok=None, ax=None):
    """sigma_1 / sigma_2 of each weight matrix over training (log axis), one line per matrix and run.

    Parameters
    ----------
    ws : a result of ``run.weight_spectra()`` (or of ``sa.open_runs(...)``)
    grok : a step, or a result of ``run.grokking()``, optional
        Marked with a solid vertical line.
    ax : matplotlib axes, optional
    """
    _need(ws, "plot_weight_ratio", ("sigma_ratio_12",), "run.weight_spectra()")
    ax = _axes(ax)
    for label, part in _lines(ws):
        for name in part["matrix"].values:
            ax.plot(part["step"].values, part["sigma_ratio_12"].sel(matrix=name).values, lw=1.2,
                    label=f"{_label(name)} ({label})" if label else _label(name))
    _mark_grok(ax, grok)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("sigma_1 / sigma_2")
    ax.set_title("weight-matrix spectra")
    ax.legend(fontsize=7)
    return ax


@xr.register_dataset_accessor("spectral")
class SpectralAccessor:
    """``ds.spectral.plot_gap_ratio()`` and friends on spectra, dynamics and weight Datasets.

    Each method is the function of the same name in :mod:`spectral_analyzer.plot`
    applied to the Dataset; see there for the parameters.
    """

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def plot_sigma(self, modes: int | None = None, *, group=None, run=None, ax=None):
        """sigma_j(t) on a log axis, one line per mode; see :func:`plot_sigma`."""
        return plot_sigma(self._ds, modes, group=group, run=run, ax=ax)

    def plot_ratios(self, events: xr.Dataset | None = None, modes: int = 4, *, group=None, run=None, ax=None):
        """Consecutive ratios with k* and events; see :func:`plot_ratios`."""
        return plot_ratios(self._ds, events, modes, group=group, run=run, ax=ax)

    def plot_gap_ratio(self, metrics: xr.Dataset | None = None, metric: str | None = None, *,
                       events: xr.Dataset | None = None, grok=None, ax=None):
        """R(t) per run and group, its noise floor, a metric, events and the grok step; see :func:`plot_gap_ratio`."""
        return plot_gap_ratio(self._ds, metrics, metric, events=events, grok=grok, ax=ax)

    def plot_alpha(self, modes: int = 4, *, run=None, ax=None):
        """Davis-Kahan stability per mode; see :func:`plot_alpha`."""
        return plot_alpha(self._ds, modes, run=run, ax=ax)

    def plot_energy(self, mode: int = 1, *, run=None, ax=None):
        """Share of a mode carried by each group; see :func:`plot_energy`."""
        return plot_energy(self._ds, mode, run=run, ax=ax)

    def plot_weight_ratio(self, *, grok=None, ax=None):
        """sigma_1 / sigma_2 of each weight matrix; see :func:`plot_weight_ratio`."""
        return plot_weight_ratio(self._ds, grok=grok, ax=ax)
