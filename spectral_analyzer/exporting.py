"""Writing result Datasets to .nc, .csv or .json, chosen by extension."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr

from .errors import ExportError
from .store.location import NAME_MAX, Location, sibling_name

__all__ = ["ExportError", "check_output", "events_table", "export", "folder_lock", "refuse_inside_store", "replacing",
           "table"]

FORMATS = (".nc", ".csv", ".json")


KEY_DIMS = ("run", "group", "matrix", "layer", "head", "series", "step", "lag")
SPREAD_DIMS = ("mode", "rank")
EVENT_COLUMNS = ("step", "kind", "mode", "value")  # events_table's records (led by "run" for runs side by side)


def table(ds: xr.Dataset) -> list[dict]:
    """One record per (run, group, matrix, layer, head, series, step, lag) present: every variable over those
    dims, and variables with one more ``mode`` / ``rank`` dim spread as ``sigma_1 .. sigma_W``.

    Coordinates over those dims that are not dims themselves (``window_start``
    along ``step``, say) are columns too, after the variables. Variables over
    other dims (overlaps, events) are left to netCDF. Runs side by side are
    outer-joined on ``step``: a run has no record at a step it does not hold."""
    keys = [d for d in KEY_DIMS if d in ds.dims]
    shape = tuple(ds.sizes[d] for d in keys)

    def column(var: xr.DataArray) -> list:
        """*var* (over some of the key dims) at every record, in the records' order, as plain values."""
        own = [d for d in keys if d in var.dims]
        values = np.asarray(var.transpose(*own).values)
        spread = tuple(slice(None) if d in var.dims else np.newaxis for d in keys)
        return [_plain(v) for v in np.broadcast_to(values[spread], shape).reshape(-1).tolist()]

    columns = {d: column(ds[d]) for d in keys}
    spread = []
    for name, var in ds.data_vars.items():
        if not set(var.dims) <= set(keys) | set(SPREAD_DIMS):
            continue
        extra = [d for d in var.dims if d not in keys]
        if not extra:
            columns[name] = column(var)
        elif len(extra) == 1:
            spread.append((name, extra[0], var))
    for name, dim, var in spread:
        for j, label in enumerate(ds[dim].values):
            columns[f"{name}_{int(label)}"] = column(var.isel({dim: j}))
    for name, coord in ds.coords.items():
        if name not in ds.dims and coord.dims and set(coord.dims) <= set(keys):
            columns[name] = column(coord)
    n = int(np.prod(shape))
    keep = np.ones(n, dtype=bool)
    if {"run", "step"} <= set(keys):
        at = tuple(slice(None) if d in ("run", "step") else np.newaxis for d in keys)
        keep = np.broadcast_to(_held(ds)[at], shape).reshape(-1)
    names = list(columns)
    rows = zip(*columns.values()) if columns else iter([()] * n)
    return [dict(zip(names, values)) for values, kept in zip(rows, keep) if kept]


def _held(ds: xr.Dataset) -> np.ndarray:
    """(run, step): whether the run holds any value at the step (runs side by side are NaN at another's steps)."""
    held = np.zeros((ds.sizes["run"], ds.sizes["step"]), dtype=bool)
    for name, var in ds.variables.items():
        if name not in ds.dims and {"run", "step"} <= set(var.dims):
            other = [d for d in var.dims if d not in ("run", "step")]
            held |= var.notnull().any(other).transpose("run", "step").values
    return held


def events_table(ds: xr.Dataset) -> list[dict]:
    """The events of a dynamics Dataset as records (step, kind, mode, value), led by the run for several runs
    side by side (their events padded along ``event``)."""
    if "event" not in ds.dims:
        return []
    if "run" in ds.dims:
        return [{"run": _plain(label), **event}
                for i, label in enumerate(ds["run"].values) for event in events_table(ds.isel(run=i))]
    return [
        dict(zip(EVENT_COLUMNS, (int(s), str(k), int(m), _plain(float(v)))))
        for s, k, m, v in zip(ds["event_step"].values, ds["event_kind"].values, ds["event_mode"].values,
                              ds["event_value"].values)
        if np.isfinite(s)  # a run's padding, where another run has more events
    ]


_HELD = threading.local()  # the folders this thread holds a lock on: (device, inode) -> depth


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, busy: str | None = None) -> Iterator[None]:
    """An exclusive lock on *folder* while outputs are written into it: two processes (or threads) writing one
    output file, or a table and its events file, go one after the other, never interleaved.

    The lock is ``flock`` on the folder itself, so nothing is left in it; taken again by the thread that
    holds it, it is held already. It waits for another writer, or with *busy* (a message) refuses at once
    with an :class:`ExportError`. Where the filesystem has no ``flock`` (some network filesystems), or the
    folder cannot be opened for reading (one written into but not listed), the writes go ahead unlocked.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:  # a folder one may write into but not list (a drop box): no lock to take
        fd = None
    if fd is None:
        yield
        return
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        held = getattr(_HELD, "folders", None)
        if held is None:
            held = _HELD.folders = {}
        if not held.get(key):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
            except BlockingIOError:
                raise ExportError(busy) from None
            except OSError:  # ENOLCK, EINVAL: no flock on this filesystem
                pass
        held[key] = held.get(key, 0) + 1
        try:
            yield
        finally:
            held[key] -= 1
    finally:
        os.close(fd)  # (the lock goes with the last descriptor)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, label: str | None = None) -> Iterator[Path]:
    """A temporary path beside *path* to write to, moved onto *path* only once the block completes.

    The temporary is ``.<label>.<random>.partial`` (*label*: *path*'s name by
    default), a name no reader takes for a result. When the block ends, its
    bytes are flushed to disk (fsync) and it is renamed onto *path* in one
    step (``os.replace``): a reader, or a writer killed at any point, sees
    the old file or the new one, never a part. On any exception the
    temporary is removed and *path* is left as it was.

    Examples
    --------
    >>> with replacing("spectra.csv") as tmp:         # doctest: +SKIP
    ...     tmp.write_text("step,k_star\n10,1\n")
    """
    path = Path(path)
    tmp = path.with_name(sibling_name(label or path.name, f".{secrets.token_hex(4)}.partial", prefix="."))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename == str(tmp):
            exc.filename = str(path)  # the file the user asked for, not the temporary
        raise
    with contextlib.suppress(OSError):  # the rename itself on disk; not every filesystem can sync a folder
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet runs as a formula at the start of a cell


def _inert(cell):
    """A text cell a spreadsheet would run as a formula (a tensor named ``=HYPERLINK(...)``), with an apostrophe
    before it, as spreadsheets write such text themselves; numbers (``-inf`` too) as they are."""
    if isinstance(cell, str) and cell.startswith(_FORMULA) and cell not in ("-inf", "+inf"):
        return "'" + cell
    return cell


def _write_records(records: list[dict], path: Path, suffix: str, attrs: dict | None = None,
                   columns: list[str] | None = None) -> None:
    """*records* into the file at *path* as CSV or JSON (*suffix*: ``.csv`` or ``.json``); *columns* heads a
    CSV of no records (default: ``step``)."""
    if suffix == ".csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            names = list(records[0]) if records else list(columns or ["step"])
            writer.writerow([_inert(n) for n in names])
            writer.writerows([_inert(r.get(n, "")) for n in names] for r in records)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"attrs": attrs or {}, "records": records}, indent=1))


def _plain(x):
    x = x.item() if hasattr(x, "item") else x
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _netcdf_ready(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """netCDF3 (scipy engine) has no int64 and no boolean attributes: integers become int32 where they fit, else
    float64 where that holds them exactly (|n| <= 2**53); beyond that *path* is refused, never rounded. Boolean
    variables xarray writes itself, and reads back as booleans. The encoding a result read from the store carries
    (zarr's int64 of a k* that runs side by side turned float, NaN and all) is dropped: the values are written.
    netCDF3 reads a dim of length 0 as its record dim, which must lead: a variable over one (the events of runs
    side by side with none) has it first."""
    out = ds.drop_encoding()
    for name in list(out.variables):
        v = out[name]
        empty = [d for d in v.dims if out.sizes[d] == 0]
        if empty and v.dims[0] not in empty:
            out[name] = v = v.transpose(*empty, ...)
        if v.dtype == np.int64:
            top = max(int(v.values.max()), -int(v.values.min())) if v.size else 0
            if top > 2**53:
                raise ExportError(f"{path}: {name} holds {top}, beyond what netCDF3 keeps exactly (2**53); "
                                  "export to .csv or .json")
            out[name] = v.astype(np.int32 if top < 2**31 else np.float64)
    out.attrs = {k: (int(v) if isinstance(v, bool) else v) for k, v in out.attrs.items()}
    return out


def export(ds: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write *ds* to *path* as netCDF (.nc), CSV (.csv) or JSON (.json).

    CSV and JSON hold :func:`table`'s records (JSON adds the attributes); a
    Dataset with events also gets ``<stem>.events.csv|json`` with
    :func:`events_table`'s records (netCDF keeps them along its ``event`` dim).
    An existing file (the events file included) is replaced only with
    ``overwrite``; every target is checked before anything is written. Each
    file is written beside its target and moved onto it once complete
    (:func:`replacing`): a full disk or a kill leaves the earlier file, or
    none, never a part of one; and never a table beside the events file of
    another export (the earlier events file goes before the table is
    replaced; one beside a table of a Dataset without events is refused
    unless ``overwrite``, and then removed). Two exports to one path at once
    go one after the other (:func:`folder_lock`), the second checked again.
    """
    path = Path(path)
    events = "event" in ds.dims
    check_output(path, overwrite=overwrite, events=events)
    try:
        with folder_lock(path.parent):  # another export to this path goes before or after, not between
            return _export(ds, path, check_output(path, overwrite=overwrite, events=events))
    except OSError as exc:
        raise ExportError(f"{exc.filename or path}: cannot write ({exc.strerror or exc})") from None


def _export(ds: xr.Dataset, path: Path, targets: list[Path]) -> Path:
    """:func:`export` of *ds* to *targets* (checked, the folder locked)."""
    if path.suffix == ".nc":
        ready = _netcdf_ready(ds, path)
        with replacing(path) as tmp:
            ready.to_netcdf(tmp, engine="scipy")
        return path
    attrs = {k: _plain(v) for k, v in ds.attrs.items()}
    # both files complete before either replaces its target; then the table first (its context exits
    # first), the earlier events removed before it: stopped between the renames, the folder holds one
    # export's pair, or one file alone, never a table beside another export's events
    with contextlib.ExitStack() as stack:
        tmp = [stack.enter_context(replacing(target)) for target in reversed(targets)][::-1]
        _write_records(table(ds), tmp[0], path.suffix, attrs)
        if len(targets) > 1:  # the events table beside the per-step table
            _write_records(events_table(ds), tmp[1], path.suffix, attrs,
                           ["run", *EVENT_COLUMNS] if "run" in ds.dims else list(EVENT_COLUMNS))
            _fsync(tmp[1])
        # the earlier events file (of this export's table, or of an earlier export with events when this
        # one has none) goes before the table is replaced
        if _lexists(_events_beside(path)):
            _events_beside(path).unlink()
    return path


def _lexists(path: Path) -> bool:
    """Whether something is at *path*; a name too long for the folder has nothing there."""
    return len(os.fsencode(path.name)) <= NAME_MAX and os.path.lexists(path)


def _events_beside(path: Path) -> Path:
    """Where a CSV or JSON export of a Dataset with events writes them: ``<stem>.events<suffix>``."""
    return path.with_name(f"{path.stem}.events{path.suffix}")


def refuse_inside_store(path: str | os.PathLike) -> None:
    """Refuse *path*, where an output is to be written, if it is a Zarr store or inside one (``run.zarr/zarr.json``
    given as the output of its own spectra): the write would replace the store's own files."""
    if (above := Location.of(os.path.abspath(path)).enclosing_store(itself=True)) is not None:
        raise ExportError(f"{path}: is inside the Zarr store {above}; write outputs outside it")


def check_output(
    path: str | os.PathLike, *, overwrite: bool = False, events: bool = False, formats: tuple[str, ...] | None = FORMATS
) -> list[Path]:
    """The files a write to *path* creates, refused before any work is done if it cannot go ahead.

    Those are *path* and, for a CSV or JSON export of a Dataset with
    *events*, ``<stem>.events<suffix>`` beside it. Refused: an extension not
    in *formats* (None: any), a target that exists unless *overwrite*, a
    target that is a folder, a folder that does not exist, and a target
    inside a Zarr store.

    Examples
    --------
    >>> check_output("dynamics.csv", events=True)  # doctest: +SKIP
    [PosixPath('dynamics.csv'), PosixPath('dynamics.events.csv')]
    """
    path = Path(path)
    if formats is not None and path.suffix not in formats:
        raise ExportError(f"{path}: unknown output format {path.suffix!r}; use one of {', '.join(formats)}")
    targets = [path]
    paired = path.suffix in (".csv", ".json")  # netCDF keeps the events along its event dim
    if events and paired:
        targets.append(_events_beside(path))
    elif paired and _lexists(_events_beside(path)):  # another export's: the table would go beside it
        events = _events_beside(path)
        if not os.path.lexists(path) or events.is_dir():  # beside no table: not an export this one replaces
            raise ExportError(f"{events}: is there without the table {path.name} it belongs to; move it, or "
                              "choose another file name")
        if not overwrite:
            raise ExportError(f"{events}: the events of an earlier export to {path.name} are there; pass "
                              "overwrite to replace that export (its events file is removed)")
    for target in targets:
        if len(os.fsencode(target.name)) > NAME_MAX:  # is_dir() itself would raise ENAMETOOLONG
            raise ExportError(f"{target}: its name is longer than the {NAME_MAX} bytes a file name may have; "
                              "choose a shorter one")
        if target.is_dir():
            raise ExportError(f"{target}: is a folder; give a file name")
        if target.exists() and not overwrite:
            raise ExportError(f"{target}: exists; pass overwrite to replace it")
    if not path.parent.is_dir():
        raise ExportError(f"{path}: the folder {path.parent} does not exist; create it or choose another path")
    refuse_inside_store(path)
    return targets
