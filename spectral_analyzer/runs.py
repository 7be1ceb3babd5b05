"""Several runs side by side: every result along a ``run`` dimension.

>>> runs = sa.open_runs("stores/wd*.zarr")                     # doctest: +SKIP
>>> runs.spectra(window=10).gap_ratio.plot.line(x="step", hue="run")   # doctest: +SKIP
>>> runs.grokking().grok_step.to_series()                      # doctest: +SKIP

Steps are aligned by an outer join: a step one run has and another has not
is NaN in the other (integer variables become floats for that). Labels are
the stores' names (``wd1`` for ``stores/wd1.zarr``), made unique with their
parent folders where two stores share a name; the ``store`` coordinate holds
each full path.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import xarray as xr

from .attributes import describe
from .errors import MetricError, StoreError
from .groups import natural_key
from .run import Run, open_run
from .steps import exact_in_float

__all__ = ["Runs", "open_runs"]


def _labels(paths: Sequence[str]) -> list[str]:
    """Short, unique names: the last path part without ``.zarr``, with more parts where needed."""
    parts = [PurePosixPath(str(p).rstrip("/").split("://")[-1]).parts for p in paths]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]).removesuffix(".zarr") for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    if len(set(labels)) < len(labels):  # the same path twice
        labels = [f"{label}#{i}" for i, label in enumerate(labels)]
    return labels


def _first_seen(joined, orders) -> list[int]:
    """Positions in *joined* of its labels in the order the runs have them, the first run's first."""
    order = list(dict.fromkeys(label for labels in orders for label in labels))
    return [joined.get_loc(label) for label in order]


def _refuse_rounded(ds: xr.Dataset, parts: Sequence[xr.Dataset], paths: Sequence[str]) -> None:
    """Integers (steps, event steps, window starts) the outer join turned into float64 to pad them with NaN:
    refused, naming the run, where float64 would round them (beyond 2**53)."""
    for name, var in ds.variables.items():
        if var.dtype.kind != "f":
            continue
        for path, part in zip(paths, parts):
            if name in part.variables and part[name].dtype.kind in "iu":
                exact_in_float(part[name].values.ravel(), path, f"{name} of runs compared side by side")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:  # NaN: the same setting
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays
        return False


def _column(values: list) -> list | np.ndarray:
    """Per-run attribute values as one coordinate's values: numbers as numbers (NaN where a run has none), the
    rest as text ("" where a run has none; lists and mappings as JSON)."""
    numbers = all(v is None or (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool))
                  for v in values)
    if numbers:
        return np.array([np.nan if v is None else v for v in values],
                        dtype=np.int64 if all(isinstance(v, (int, np.integer)) for v in values) else np.float64)
    return ["" if v is None else v if isinstance(v, str) else json.dumps(v, default=str) for v in values]


def per_run_attrs(ds: xr.Dataset, parts: Sequence[xr.Dataset]) -> xr.Dataset:
    """*ds* (*parts* side by side along ``run``) with each attribute the runs do not share (their learning
    rate source, the precision of their stores, the matrix taken as W_Q) as a coordinate along ``run``
    holding every run's value, named after the attribute (``<name>_of_run`` where a variable has the name):
    concatenation drops such attributes, or keeps one run's value as if it were every run's."""
    keys = list(dict.fromkeys(k for p in parts for k in p.attrs if k != "store"))
    for key in keys:
        values = [p.attrs.get(key) for p in parts]
        if all(key in p.attrs for p in parts) and all(_same(values[0], v) for v in values[1:]):
            ds.attrs[key] = values[0]
            continue
        ds.attrs.pop(key, None)
        name = key if key not in ds.variables else f"{key}_of_run"
        ds = ds.assign_coords({name: ("run", _column(values))})
    return ds


class Runs:
    """Runs compared side by side; open with :func:`open_runs`.

    Each analysis method takes the arguments of the :class:`Run` method of the
    same name and returns one Dataset along ``run`` (labels from the store
    names, the path in the ``store`` coordinate).
    """

    def __init__(self, runs: Mapping[str, Run]):
        if not runs:
            raise StoreError("no runs to compare")
        self.runs = dict(runs)

    @property
    def labels(self) -> list[str]:
        return list(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs.values())

    def __getitem__(self, label: str) -> Run:
        return self.runs[label]

    def __repr__(self) -> str:
        return f"<Runs {', '.join(self.labels)}>"

    def _side_by_side(self, result: Callable[[Run], xr.Dataset]) -> xr.Dataset:
        parts = [result(run) for run in self.runs.values()]
        for run, part in zip(self.runs.values(), parts):  # a logged series of these names would be lost or clash
            if clash := next((name for name in ("run", "store") if name in part.variables), None):
                raise MetricError(f"{run.path}: its series {clash!r} has the name of the coordinate that tells the "
                                  "runs apart; compare the runs one by one, or rename the column where it was "
                                  "logged and ingest the run again")
        ds = xr.concat(parts, dim="run", join="outer", combine_attrs="drop_conflicts", coords="different",
                       compat="equals")
        for dim in ("group", "matrix", "layer"):  # the outer join sorts labels as text (layer 10 before layer 2):
            if dim in ds.dims:  # each run's own order, the first run's first
                ds = ds.isel({dim: _first_seen(ds.indexes[dim], [p.indexes[dim] for p in parts if dim in p.dims])})
        ds = ds.assign_coords(run=self.labels, store=("run", [run.path for run in self.runs.values()]))
        for name in ds.variables:  # concat keeps the first part's attributes: take them from any part
            source = next((p[name] for p in parts if name in p.variables), None)
            if source is not None:
                ds[name].attrs = dict(source.attrs)
        _refuse_rounded(ds, parts, [run.path for run in self.runs.values()])
        ds.attrs.pop("store", None)
        return describe(per_run_attrs(ds, parts))

    def spectra(self, window: int = 10, **options) -> xr.Dataset:
        """:meth:`Run.spectra` of every run, along ``run``."""
        return self._side_by_side(lambda run: run.spectra(window, **options))

    def dynamics(self, window: int = 10, **options) -> xr.Dataset:
        """:meth:`Run.dynamics` of every run, along ``run`` (events padded along ``event``)."""
        return self._side_by_side(lambda run: run.dynamics(window, **options))

    def weight_spectra(self, match: str | list[str] | None = None, **options) -> xr.Dataset:
        """:meth:`Run.weight_spectra` of every run, along ``run``."""
        return self._side_by_side(lambda run: run.weight_spectra(match, **options))

    def grokking(self, metric: str = "test_acc", threshold: float = 0.95, window: int = 10, **options) -> xr.Dataset:
        """:meth:`Run.grokking` of every run: one row per run."""
        return self._side_by_side(lambda run: run.grokking(metric, threshold, window, **options))

    def correlate(self, metric: str, window: int = 10, **options) -> xr.Dataset:
        """:meth:`Run.correlate` of every run, along ``run``."""
        return self._side_by_side(lambda run: run.correlate(metric, window, **options))

    @property
    def metrics(self) -> xr.Dataset:
        """Every run's logged series, along ``run`` (steps outer-joined)."""
        return self._side_by_side(lambda run: run.metrics)


def open_runs(
    stores: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    storage_options: Mapping[str, Any] | None = None,
    client=None,
) -> Runs:
    """Open several runs to compare them side by side.

    Parameters
    ----------
    stores : path, glob or list of paths / URLs
        A glob (``"stores/wd*.zarr"``) is expanded in natural order; a path
        that exists is taken as it is, glob characters and all.
    storage_options, client
        As for :func:`open_run`, shared by every run.

    Returns
    -------
    Runs

    Examples
    --------
    >>> runs = sa.open_runs(["wd1.zarr", "wd0.zarr"])        # doctest: +SKIP
    >>> runs.dynamics(window=10).gap_ratio.sel(run="wd1")    # doctest: +SKIP
    """
    if isinstance(stores, (str, os.PathLike)):
        text = str(stores)
        literal = not glob.has_magic(text) or "://" in text or os.path.exists(text)  # a store named "wd[1].zarr"
        matched = [text] if literal else sorted(glob.glob(text), key=natural_key)
        if not matched:
            raise StoreError(f"{text}: no store matches")
        paths = matched
    else:
        paths = [str(s) for s in stores]
    labels = _labels(paths)
    return Runs({label: open_run(p, storage_options=storage_options, client=client)
                 for label, p in zip(labels, paths)})
