"""Dynamics of the spectrum from the cached band: stability, rotation, flow, energy, events."""

from __future__ import annotations

import math
import re

import numpy as np
import xarray as xr
from dask.base import tokenize

from .._version import RESULTS_REVISION, __version__
from ..attributes import windowed
from ..groups import GROUPINGS, SelectionError, group_tensors, select_tensors
from ..spectra import (
    INTERVAL_FACTOR,
    WindowError,
    band_for,
    effective_lag,
    check_window,
    step_range_label,
    step_rows,
    noted,
    warn_mixed_intervals,
)
from ..spectra.kernel import spectral_quantities, window_grams
from ..store import Store
from .events import detect_events, phases
from .kernel import (
    eig_desc,
    flow_terms,
    halves_overlap,
    mode_energy,
    overlap_matrix,
    principal_cosines,
    rank_two_norm,
    stability,
    track_modes,
)

__all__ = ["compute_dynamics", "learning_rate_at"]

LR_NAMES = ("learning_rate", "lr")


def _lr_names(names) -> list[str]:
    """The series that are a learning rate: ``learning_rate`` or ``lr``; else the one series logged under a
    path or by a monitor as one (``train/learning_rate``, as HF writes TensorBoard tags; ``lr-AdamW``, as
    Lightning's LearningRateMonitor names a single parameter group). Several such (param groups ``lr-AdamW/pg1``
    and ``/pg2``) are no one learning rate: none."""
    exact = [n for n in LR_NAMES if n in names]
    if exact:
        return exact
    found = [n for n in names if n.rsplit("/", 1)[-1] in LR_NAMES  # lr-AdamW, not its -momentum / -weight_decay
             or (re.fullmatch(r"lr-[^/]+", n) and not re.search(r"-(?:momentum|weight_decay)$", n))]
    return found if len(found) == 1 else []


def learning_rate_at(store: Store, steps: np.ndarray) -> tuple[np.ndarray, str]:
    """The logged learning rate in force at each step (last value logged at or before it)."""
    logged_steps, series = store.read_metrics()
    for name in _lr_names(list(series)):
        if name in series:
            values = series[name]
            ok = np.isfinite(values)
            if not ok.any():
                # A column with no finite value (a logger that wrote NaN) is no learning rate: the
                # adiabatic parameter is then NaN, like a run that logs none, while every other
                # quantity, which does not depend on it, is still returned; lr= supplies one.
                continue
            s, v = logged_steps[ok], values[ok]
            idx = np.searchsorted(s, steps, side="right") - 1
            return np.where(idx >= 0, v[np.maximum(idx, 0)], np.nan), f"metrics:{name}"
    return np.full(steps.shape, np.nan), ""


def _check_options(**given) -> None:
    """Refuse, in one line, an option outside the range where its quantity means anything."""
    bounds = {"tau": 0, "factor": 1, "lr": 0, "constant": 0, "persistence": 0, "top_k": 0, "phase_fraction": 0}
    for name, value in given.items():
        if value is None and name in ("factor", "lr"):
            continue
        counts = name in ("persistence", "top_k")  # numbers of windows and of modes
        ok = isinstance(value, (int, np.integer) if counts else (int, float, np.integer, np.floating))
        if (not ok or isinstance(value, bool) or not math.isfinite(value) or value <= bounds[name]
                or (name == "phase_fraction" and value > 1)):
            top = " and at most 1" if name == "phase_fraction" else ""
            what = "a whole number" if counts else "a finite number"
            raise SelectionError(f"dynamics: {name} must be {what} above {bounds[name]}{top}, not {value!r}")


def compute_dynamics(
    store: Store,
    window: int = 10,
    *,
    params: str | list[str] | None = None,
    group_by: str = "module",
    constant: float = 1.0,
    lr: float | None = None,
    top_k: int = 3,
    tau: float = 1.2,
    factor: float | None = None,
    persistence: int = 2,
    phase_fraction: float = 0.8,
    steps=None,
    interval_factor: float | None = INTERVAL_FACTOR,
    max_lag: int | None = None,
    device: str = "auto",
    scheduler=None,
    progress: bool = False,
    cache: bool = True,
) -> xr.Dataset:
    """Stability, rotation, flow, energy and events; see :meth:`Run.dynamics`."""
    _check_options(tau=tau, factor=factor, lr=lr, constant=constant, persistence=persistence, top_k=top_k,
                   phase_fraction=phase_fraction)
    if group_by not in GROUPINGS:
        raise SelectionError(f"unknown grouping {group_by!r}; choose one of {', '.join(GROUPINGS)}")
    rows = step_rows(store, steps)
    check_window(store, window, rows=rows)
    n_rows = rows.stop - rows.start
    if n_rows < window + 1:
        where = "the store has" if n_rows == store.n_deltas else "the step range holds"
        raise WindowError(
            f"{store.path}: dynamics with window {window} compare consecutive windows and need at least "
            f"{window + 1} deltas; {where} {n_rows}"
        )
    names = [t.name for t in store.manifest]
    groups = group_tensors(names, select_tensors(names, params), group_by)  # refused before anything is told
    mixed = warn_mixed_intervals(store, np.arange(rows.start + window - 1, rows.stop), window, interval_factor)
    options = (window, params, group_by, constant, lr, top_k, tau, factor, persistence, phase_fraction,
               effective_lag(window, max_lag))
    part = () if rows == slice(0, store.n_deltas) else (rows.start, rows.stop)
    key = tokenize("dynamics", options, store.results_identity, __version__, RESULTS_REVISION, *part)
    name = f"dynamics-{key[:20]}"
    if cache and (cached := store.read_result(name)) is not None:
        return noted(cached, mixed)
    band, lag, _, names, picked = band_for(store, window, params, max_lag, device, scheduler, progress)
    band = band[:, rows]
    steps = store.steps[rows]
    w = window
    ends, ext = window_grams(band[picked].sum(axis=0), w + 1)  # d_{i-W} .. d_i
    lam_p, u_p = eig_desc(ext[:, :w, :w])
    lam_c, u_c = eig_desc(ext[:, 1:, 1:])
    overlap = overlap_matrix(u_p, lam_p, ext[:, :w, 1:], u_c, lam_c)
    tracked = track_modes(overlap)
    n = ends.size
    abs_diag = np.abs(np.diagonal(overlap, axis1=1, axis2=2))
    abs_tracked = np.abs(overlap[np.arange(n)[:, None], tracked, np.arange(w)[None, :]])
    k = min(top_k, w)
    cosines = principal_cosines(overlap, k)
    n_in, n_out, c = ext[:, w, w], ext[:, 0, 0], ext[:, 0, w]
    dc_norm = rank_two_norm(n_in, n_out, c)
    flow = flow_terms(lam_p, u_p, ext[:, :w, w], ext[:, :w, 0], n_in, n_out, c)
    observed = lam_c - lam_p
    cur = spectral_quantities(ext[:, 1:, 1:])
    prev = spectral_quantities(ext[:, :w, :w])
    step = steps[ends]
    if lr is not None:
        eta, lr_source = np.full(n, float(lr)), "given"
    else:
        eta, lr_source = learning_rate_at(store, step)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # past float64's range: inf, as it is
        adiabatic = dc_norm / (eta * cur["gap"] ** 2)

    partial = np.stack([window_grams(band[m].sum(axis=0), w + 1)[1][:, 1:, 1:] for m in groups.values()])
    energy = np.moveaxis(mode_energy(u_c, lam_c, partial), 0, -1)

    # Events and phases over every window of the R series (the first window included).
    all_ends, grams = window_grams(band[picked].sum(axis=0), w)
    series = spectral_quantities(grams)
    found = detect_events(series["gap_ratio"], series["k_star"], tau=tau, factor=factor, persistence=persistence)
    phase = phases(series["gap_ratio"], phase_fraction)

    sm = ("step", "mode")
    ds = xr.Dataset(
        {
            "lambda": (sm, lam_c),
            "k_star": ("step", cur["k_star"]),
            "gap_ratio": ("step", cur["gap_ratio"]),
            "gap": ("step", cur["gap"]),
            "alpha": (sm, stability(lam_c, dc_norm, constant)),
            "alpha_halves": (sm, halves_overlap(ext[:, 1:, 1:])),
            "overlap": (("step", "mode_prev", "mode"), overlap),
            "rotation": (sm, np.arccos(np.clip(abs_diag, 0.0, 1.0))),
            "tracked_from": (sm, tracked + 1),
            "rotation_tracked": (sm, np.arccos(np.clip(abs_tracked, 0.0, 1.0))),
            "principal_angle": (("step", "k"), np.arccos(np.clip(cosines, 0.0, 1.0))),
            "dC_norm": ("step", dc_norm),
            "lambda_change": (sm, observed),
            "flow_entering": (sm, flow["entering"]),
            "flow_exiting": (sm, flow["exiting"]),
            "flow_first": (sm, flow["first"]),
            "flow_repulsion": (sm, flow["repulsion"]),
            "flow_outside": (sm, flow["outside"]),
            "flow_second": (sm, flow["second"]),
            "flow_residual": (sm, observed - flow["first"] - flow["second"]),
            "gap_change": ("step", cur["gap"] - prev["gap"]),
            "lr": ("step", eta),
            "adiabatic": ("step", adiabatic),
            "energy": (("step", "mode", "group"), energy),
            "phase": ("step", phase[1:]),
            "event_step": ("event", np.array([steps[all_ends[t]] for t, *_ in found], dtype=np.int64)),
            "event_kind": ("event", np.array([e[1] for e in found], dtype=str)),
            "event_mode": ("event", np.array([e[2] for e in found], dtype=np.int64)),
            "event_value": ("event", np.array([e[3] for e in found], dtype=np.float64)),
        },
        coords={
            "step": step,
            "mode": np.arange(1, w + 1),
            "mode_prev": np.arange(1, w + 1),
            "k": np.arange(1, k + 1),
            "group": list(groups),
            "event": np.arange(len(found)),  # an index, so that results of several runs concatenate
        },
    )
    ds.attrs = {
        "window": w,
        "steps": step_range_label(store, rows),
        "params": params if isinstance(params, str) else ",".join(params or []),
        "group_by": group_by,
        "constant": constant,
        "lr_source": lr_source,
        "tau": tau,
        "factor": np.nan if factor is None else factor,
        "persistence": persistence,
        "phase_fraction": phase_fraction,
        "max_lag": lag,
        "precision": "float64",
        "spectral_analyzer_version": __version__,
    }
    ds = windowed(ds, store.steps, store.checkpoint_steps, w)
    if cache:
        store.cache_result(name, ds)
    return noted(ds, mixed)
