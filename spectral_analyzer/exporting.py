"""Writing result Datasets to .nc, .csv or .json, chosen by extension."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import ExportError

__all__ = ["ExportError", "check_output", "events_table", "export", "table"]

FORMATS = (".nc", ".csv", ".json")


KEY_DIMS = ("run", "group", "matrix", "layer", "head", "step")
SPREAD_DIMS = ("mode", "rank")


def table(ds: xr.Dataset) -> list[dict]:
    """One record per (run, group, matrix, layer, head, step) present: every variable over those dims,
    and variables with one more ``mode`` / ``rank`` dim spread as ``sigma_1 .. sigma_W``.
    Variables over other dims (overlaps, events) are left to netCDF."""
    keys = [d for d in KEY_DIMS if d in ds.dims]
    records = []
    for combo in itertools.product(*(range(ds.sizes[d]) for d in keys)):
        at = dict(zip(keys, combo))
        row: dict = {d: _plain(ds[d].values[i]) for d, i in at.items()}
        spread = []
        for name, var in ds.data_vars.items():
            if not set(var.dims) <= set(keys) | set(SPREAD_DIMS):
                continue
            extra = [d for d in var.dims if d not in keys]
            value = var.isel({d: i for d, i in at.items() if d in var.dims})
            if not extra:
                row[name] = _plain(value.values)
            elif len(extra) == 1:
                spread.append((name, extra[0], value.values))
        for name, dim, values in spread:
            for j, label in enumerate(ds[dim].values):
                row[f"{name}_{int(label)}"] = _plain(values[j])
        records.append(row)
    return records


def events_table(ds: xr.Dataset) -> list[dict]:
    """The events of a dynamics Dataset as records (step, kind, mode, value)."""
    if "event" not in ds.dims:
        return []
    return [
        {"step": int(s), "kind": str(k), "mode": int(m), "value": _plain(float(v))}
        for s, k, m, v in zip(ds["event_step"].values, ds["event_kind"].values, ds["event_mode"].values,
                              ds["event_value"].values)
    ]


def _write_records(records: list[dict], path: Path, attrs: dict | None = None) -> None:
    if path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["step"])
            writer.writeheader()
            writer.writerows(records)
    else:
        path.write_text(json.dumps({"attrs": attrs or {}, "records": records}, indent=1))


def _plain(x):
    x = x.item() if hasattr(x, "item") else x
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _netcdf_ready(ds: xr.Dataset) -> xr.Dataset:
    """netCDF3 (scipy engine) has no int64 and no booleans."""
    out = ds.copy()
    for name in list(out.variables):
        v = out[name]
        if v.dtype == np.int64:
            small = v.size == 0 or (np.abs(v.values).max() < 2**31)
            out[name] = v.astype(np.int32 if small else np.float64)
        elif v.dtype == bool:
            out[name] = v.astype(np.int8)
    out.attrs = {k: (int(v) if isinstance(v, bool) else v) for k, v in out.attrs.items()}
    return out


def export(ds: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write *ds* to *path* as netCDF (.nc), CSV (.csv) or JSON (.json).

    CSV and JSON hold :func:`table`'s records (JSON adds the attributes); a
    Dataset with events also gets ``<stem>.events.csv|json`` with
    :func:`events_table`'s records (netCDF keeps them along its ``event`` dim).
    An existing file (the events file included) is replaced only with
    ``overwrite``; every target is checked before anything is written.
    """
    path = Path(path)
    targets = check_output(path, overwrite=overwrite, events="event" in ds.dims)
    try:
        if path.suffix == ".nc":
            _netcdf_ready(ds).to_netcdf(path, engine="scipy")
            return path
        attrs = {k: _plain(v) for k, v in ds.attrs.items()}
        _write_records(table(ds), path, attrs)
        if len(targets) > 1:  # the events table beside the per-step table
            _write_records(events_table(ds), targets[1], attrs)
    except OSError as exc:
        raise ExportError(f"{exc.filename or path}: cannot write ({exc.strerror or exc})") from None
    return path


def check_output(
    path: str | os.PathLike, *, overwrite: bool = False, events: bool = False, formats: tuple[str, ...] | None = FORMATS
) -> list[Path]:
    """The files a write to *path* creates, refused before any work is done if it cannot go ahead.

    Those are *path* and, for a CSV or JSON export of a Dataset with
    *events*, ``<stem>.events<suffix>`` beside it. Refused: an extension not
    in *formats* (None: any), a target that exists unless *overwrite*, a
    target that is a folder, and a folder that does not exist.

    Examples
    --------
    >>> check_output("dynamics.csv", events=True)  # doctest: +SKIP
    [PosixPath('dynamics.csv'), PosixPath('dynamics.events.csv')]
    """
    path = Path(path)
    if formats is not None and path.suffix not in formats:
        raise ExportError(f"{path}: unknown output format {path.suffix!r}; use one of {', '.join(formats)}")
    targets = [path]
    if events and path.suffix != ".nc":  # netCDF keeps the events along its event dim
        targets.append(path.with_name(f"{path.stem}.events{path.suffix}"))
    for target in targets:
        if target.is_dir():
            raise ExportError(f"{target}: is a folder; give a file name")
        if target.exists() and not overwrite:
            raise ExportError(f"{target}: exists; pass overwrite to replace it")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: the folder {path.parent} does not exist; create it or choose another path")
    return targets
