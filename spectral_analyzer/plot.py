"""Plots of spectra, dynamics and weight spectra (matplotlib), and the ``ds.spectral`` accessor.

Every function takes the Dataset it draws and an optional ``ax``, and returns
the axes, so figures compose in notebooks:

>>> ds = run.spectra(window=10)                      # doctest: +SKIP
>>> ds.spectral.plot_sigma()                         # doctest: +SKIP
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


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(8, 3.6))
    return ax


def _one_group(ds: xr.Dataset, group) -> xr.Dataset:
    if "group" in ds.dims:
        groups = [str(g) for g in ds["group"].values]
        if group is not None and str(group) not in groups:
            raise SelectionError(f"no group {group!r} in these spectra (groups: {', '.join(groups)})")
        return ds.sel(group=group if group is not None else ds["group"].values[0])
    return ds


def _mark_events(ax, events: xr.Dataset | None) -> None:
    if events is None or "event" not in events.dims:
        return
    colors = {"gap_collapse": "tab:red", "gap_opening": "tab:green", "gap_collapse_relative": "tab:orange",
              "k_star_shift": "tab:purple"}
    seen = set()
    for step, kind in zip(events["event_step"].values, events["event_kind"].values):
        ax.axvline(step, color=colors.get(str(kind), "k"), ls="--", lw=1, alpha=0.8,
                   label=None if kind in seen else str(kind))
        seen.add(kind)


def plot_sigma(ds: xr.Dataset, modes: int | None = None, group=None, ax=None):
    """sigma_j(t) on a log axis, one line per mode."""
    ax = _axes(ax)
    ds = _one_group(ds, group)
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


def plot_ratios(ds: xr.Dataset, events: xr.Dataset | None = None, modes: int = 4, group=None, ax=None):
    """Consecutive ratios sigma_j / sigma_{j+1}, k* marked, events as vertical lines."""
    ax = _axes(ax)
    ds = _one_group(ds, group)
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


def plot_gap_ratio(ds: xr.Dataset, metrics: xr.Dataset | None = None, metric: str | None = None, group=None, ax=None):
    """The gap ratio R(t), with a logged metric on a second axis."""
    if metrics is not None and metric is not None and metric not in metrics:
        raise MetricError(f"metric {metric!r} is not logged (metrics: {', '.join(metrics.data_vars) or 'none'})")
    ax = _axes(ax)
    ds = _one_group(ds, group)
    ax.plot(ds["step"].values, ds["gap_ratio"].values, color="tab:blue", lw=1.5, label="gap ratio R")
    if "null_q95" in ds:
        ax.axhline(float(ds["null_q95"]), color="tab:blue", ls=":", lw=1, label="noise floor (Wishart q95)")
    ax.set_xlabel("step")
    ax.set_ylabel("R", color="tab:blue")
    if metrics is not None and metric is not None:
        other = ax.twinx()
        other.plot(metrics["step"].values, metrics[metric].values, color="tab:red", lw=1.2, label=metric)
        other.set_ylabel(metric, color="tab:red")
    ax.set_title("gap ratio" + (f" and {metric}" if metric else ""))
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_alpha(dyn: xr.Dataset, modes: int = 4, ax=None):
    """Davis-Kahan stability alpha_j(t) per mode."""
    ax = _axes(ax)
    for j in range(min(modes, dyn.sizes["mode"])):
        ax.plot(dyn["step"].values, dyn["alpha"].isel(mode=j).values, lw=1.2, label=f"alpha_{j + 1}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("alpha")
    ax.set_title("stability per mode")
    ax.legend(fontsize=7, ncol=4)
    return ax


def plot_energy(dyn: xr.Dataset, mode: int = 1, ax=None):
    """Heatmap of the share of mode *mode* carried by each group over time."""
    modes = dyn["mode"].values
    if mode not in modes:
        raise SelectionError(f"no mode {mode} in these dynamics (modes {modes[0]}..{modes[-1]})")
    ax = _axes(ax)
    e = dyn["energy"].sel(mode=mode).transpose("group", "step").values
    steps = dyn["step"].values
    im = ax.imshow(e, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                   extent=(steps[0], steps[-1], -0.5, e.shape[0] - 0.5), interpolation="nearest")
    ax.set_yticks(range(e.shape[0]), [str(g) for g in dyn["group"].values], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(f"mode {mode} energy by group")
    ax.figure.colorbar(im, ax=ax, fraction=0.03)
    return ax


def plot_weight_ratio(ws: xr.Dataset, ax=None):
    """sigma1 / sigma2 of each weight matrix over training (log axis)."""
    ax = _axes(ax)
    for name in ws["matrix"].values:
        ax.plot(ws["step"].values, ws["sigma_ratio_12"].sel(matrix=name).values, lw=1.2, label=str(name))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("sigma_1 / sigma_2")
    ax.set_title("weight-matrix spectra")
    ax.legend(fontsize=7)
    return ax


@xr.register_dataset_accessor("spectral")
class SpectralAccessor:
    """``ds.spectral.plot_sigma()`` and friends on spectra, dynamics and weight Datasets."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def plot_sigma(self, **kwargs):
        return plot_sigma(self._ds, **kwargs)

    def plot_ratios(self, **kwargs):
        return plot_ratios(self._ds, **kwargs)

    def plot_gap_ratio(self, **kwargs):
        return plot_gap_ratio(self._ds, **kwargs)

    def plot_alpha(self, **kwargs):
        return plot_alpha(self._ds, **kwargs)

    def plot_energy(self, **kwargs):
        return plot_energy(self._ds, **kwargs)

    def plot_weight_ratio(self, **kwargs):
        return plot_weight_ratio(self._ds, **kwargs)
