"""Logged series (loss, accuracy, learning rate) in the store's ``metrics`` group.

The root attribute ``metrics`` is the commit record of the series::

    metrics = {"token": t, "group": g, "n": n, "last_step": s, "names": {key: name}, "crc": {key: crc32c}}

Readers read the first ``n`` rows of the arrays of the group whose own
``token`` attribute is ``g``, and check each series against its crc32c.
``t`` changes with every write and is what cached results depend on.

* :func:`write_metrics` replaces the series: it builds them complete in
  ``metrics-new`` (a fresh ``g``), commits the record, then moves ``metrics``
  to ``metrics-previous`` and ``metrics-new`` into its place. A reader takes
  whichever of the three carries its ``g``, so a write killed at any point
  leaves the old series or the new ones, never a mixture, and a reader of
  the commit before a replacement still reads its own series.
* :func:`append_metrics` adds rows after the last logged step: it writes
  them past ``n`` (invisible to readers) and commits ``n + m`` with the
  extended checksums (crc32c extends over appended bytes), so an append
  writes O(new rows) however long the run.

The next write finishes or removes what a killed one left. Arrays are named
after the series (``/`` read as ``.``); a name that is not a safe array name
(or longer than a file name may be), or that collides with another, gets
``s<i>``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping

import google_crc32c
import numpy as np
from dask.base import tokenize
from zarr.codecs import Crc32cCodec

from ..errors import StoreError

__all__ = ["append_metrics", "last_logged_step", "read_metrics", "write_metrics"]

_CURRENT, _NEW, _PREVIOUS = "metrics", "metrics-new", "metrics-previous"
_LOOKUPS = 4  # a reader looks its group up again this many times while a writer moves the groups
_ROWS = 4096  # rows per chunk: an append rewrites at most one partial chunk per series
_OPTS = {"compressors": [Crc32cCodec()], "dimension_names": ("step",), "chunks": (_ROWS,)}


def _crc(values: np.ndarray, crc: int = 0) -> int:
    return int(google_crc32c.extend(crc, np.ascontiguousarray(values).tobytes()))


def _record(store) -> dict | None:
    record = store.attrs.get("metrics")
    return record if isinstance(record, dict) else None


def _keys(names: list[str], taken: Mapping[str, str] = {}) -> list[str]:  # noqa: B006 -- read only
    keys, seen = [], {"step", *taken}
    for i, name in enumerate(names, start=len(taken)):
        key = str(name).replace("/", ".")
        unsafe = (not key or key in (".", "..", "zarr.json") or key.startswith("__") or key in seen
                  or not key.isprintable() or len(key.encode()) > 255)  # 255: a file name's limit in bytes
        key = f"s{i}" if unsafe else key
        while key in seen:
            key = f"_{key}"
        seen.add(key)
        keys.append(key)
    return keys


def _token_of(store, name: str) -> str | None:
    try:
        return store.location.open_group("r", path=name).attrs.get("token")
    except (FileNotFoundError, KeyError, ValueError):
        return None


def _move(store, src: str, dst: str) -> None:
    """Put child group *src* in the place of *dst*."""
    loc = store.location
    if not loc.is_remote:
        target = os.path.join(loc.path, dst)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(os.path.join(loc.path, src), target)
        return
    fs, root = loc.filesystem()
    a, b = f"{root}/{src}", f"{root}/{dst}"
    if fs.exists(b):
        fs.rm(b, recursive=True)
    objects = [p for p in fs.find(a) if p != f"{a}/zarr.json"]
    fs.copy(objects, [b + p[len(a):] for p in objects], on_error="raise")
    fs.copy(f"{a}/zarr.json", f"{b}/zarr.json", on_error="raise")
    fs.rm(a, recursive=True)
    fs.invalidate_cache()


def _settle(store) -> None:
    """Finish or undo a write that was killed or rolled back (the writer lock is held): the committed group
    is put at ``metrics`` wherever the write left it (``metrics-new`` where it was killed before its moves,
    ``metrics-previous`` where a rewrite's commit was rolled back after them), and the rest is dropped."""
    record = _record(store)
    group = record and record.get("group")
    if group and _token_of(store, _CURRENT) != group:
        found = next((name for name in (_NEW, _PREVIOUS) if _token_of(store, name) == group), None)
        if found is not None:
            _move(store, found, _CURRENT)
    if _NEW in store.group:
        del store.group[_NEW]


def _commit(store, group: str, n: int, last: int | None, names: Mapping[str, str], crcs: Mapping[str, int]) -> None:
    token = tokenize(group, n, dict(names), dict(crcs))[:16]
    store.commit(metrics={"token": token, "group": group, "n": int(n), "last_step": last, "names": dict(names),
                          "crc": dict(crcs)})


def _without_step(series: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """*series* less one named ``step``: the index itself, which a series may not be named after."""
    return {name: values for name, values in series.items() if name != "step"}


def write_metrics(store, steps: np.ndarray, series: Mapping[str, np.ndarray]) -> None:
    """Replace the run's metrics by step-indexed float64 *series* (the caller holds the writer lock).

    A series named ``step`` repeats the index and is left out.
    """
    steps = np.asarray(steps, dtype=np.int64)
    series = _without_step(series)
    names = list(series)
    values = [np.asarray(series[n], dtype=np.float64) for n in names]
    group_token = tokenize(steps, names, values)[:16]
    _settle(store)
    record = _record(store)
    if record is not None and record["group"] == group_token and record["n"] == len(steps):
        return
    keys = _keys(names)
    group = store.group.create_group(_NEW)
    group.create_array("step", data=steps, **_OPTS)
    for key, v in zip(keys, values):
        group.create_array(key, data=v, fill_value=np.nan, **_OPTS)
    group.attrs.put({"token": group_token})
    crcs = {"step": _crc(steps), **{k: _crc(v) for k, v in zip(keys, values)}}
    last = int(steps[-1]) if len(steps) else None
    _commit(store, group_token, len(steps), last, dict(zip(keys, names)), crcs)
    if _CURRENT in store.group:  # kept for readers of the commits before this one
        _move(store, _CURRENT, _PREVIOUS)
    _move(store, _NEW, _CURRENT)


def last_logged_step(store) -> int | None:
    """The last step of the committed series, or None."""
    record = _record(store)
    return None if record is None else record["last_step"]


def append_metrics(store, steps: np.ndarray, series: Mapping[str, np.ndarray]) -> None:
    """Add rows at *steps*, all after the last logged step, to the run's metrics (the lock is held).

    A series not logged before is added (missing, NaN, at the earlier rows);
    one logged before and not in *series* is missing at the new rows; one
    named ``step`` repeats the index and is left out.
    """
    steps = np.asarray(steps, dtype=np.int64)
    series = _without_step(series)
    _settle(store)
    record = _record(store)
    if record is None:
        write_metrics(store, steps, series)
        return
    last = last_logged_step(store)
    if len(steps) == 0:
        return
    if last is not None and steps[0] <= last:
        raise ValueError(f"appended metrics start at step {steps[0]}, not after the last logged step {last}")
    n, m = record["n"], len(steps)
    names, crcs = dict(record["names"]), dict(record["crc"])
    if _token_of(store, _CURRENT) != record["group"]:  # rows appended anywhere else would be lost or read as damage
        raise StoreError(f"{store.path}: the store is damaged: its metrics group is missing or not the committed one")
    group = store.location.open_group("r+", path=_CURRENT)
    with warnings.catch_warnings():  # a series' folder whose metadata a failed append did not write: no array
        warnings.filterwarnings("ignore", message=r"Object at \S+ is not recognized")
        begun = list(group.array_keys())
    for key in begun:  # a series an append that failed began, never committed
        if key != "step" and key not in names:
            del group[key]
    by_name = {name: key for key, name in names.items()}
    fresh = [name for name in series if name not in by_name]
    for key, name in zip(_keys(fresh, names), fresh):
        group.create_array(key, shape=(n,), dtype="float64", fill_value=np.nan, **_OPTS)
        names[key], by_name[name] = name, key
        crcs[key] = _crc(np.full(n, np.nan))
    new = {"step": steps}
    for key, name in names.items():
        v = series.get(name)
        new[key] = np.full(m, np.nan) if v is None else np.asarray(v, dtype=np.float64)
    for key, v in new.items():
        arr = group[key]
        arr.resize((n + m,))
        arr[n:] = v
        crcs[key] = _crc(v, crcs[key])
    _commit(store, record["group"], n + m, int(steps[-1]), names, crcs)


def read_metrics(store) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(steps, {name: values})`` of the snapshot's metrics, checked."""
    record = store.attrs.get("metrics")
    if not record:
        return np.zeros(0, dtype=np.int64), {}
    try:
        group_token, n, names, crcs = record["group"], int(record["n"]), dict(record["names"]), dict(record["crc"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{store.path}: the store is damaged: unreadable metrics record ({exc!r})") from None
    if list(names) != _keys(list(names.values())):  # each array is named after its series, in the order logged
        raise StoreError(f"{store.path}: the store is damaged: the metrics record's names are not those of its "
                         "series' arrays")
    def current() -> bool:  # whether the store's commit is still the one read
        return store.location.open_group("r").attrs.get("metrics") == record

    # A writer moves the groups while this reads (new -> current -> previous, each move atomic): a group
    # looked up by its token and then read may have moved on, and another one read in its place fails the
    # checksums. Damage is told only where the group still carries this commit's token after the read.
    for _ in range(_LOOKUPS):
        name = next((g for g in (_CURRENT, _NEW, _PREVIOUS) if _token_of(store, g) == group_token), None)
        if name is None:
            if not current():
                break
            continue  # between two names at the instant it was looked for: looked for again
        problem, steps, data = _read_group(store, name, n, names, crcs, record.get("last_step"))
        if problem is None:
            return steps, {names[k]: v for k, v in data.items()}
        if _token_of(store, name) == group_token:
            if not current():
                break  # a later write is removing the group (its token is the last thing to go)
            raise StoreError(f"{store.path}: the store is damaged: {problem}")
    else:
        if current():
            raise StoreError(f"{store.path}: the store is damaged: its metrics group is missing or not the "
                             "committed one")
    raise StoreError(f"{store.path}: the metrics were replaced since this store was opened; open it again")


def _read_group(store, name: str, n: int, names: dict, crcs: dict, last_step) -> tuple[str | None, np.ndarray, dict]:
    """``(problem, steps, {key: values})`` of the first *n* rows of the group at *name*; problem None if sound."""
    try:
        group = store.location.open_group("r", path=name)
        steps = np.asarray(group["step"][:n], dtype=np.int64)
        data = {k: np.asarray(group[k][:n], dtype=np.float64) for k in names}
    except (KeyError, ValueError, FileNotFoundError) as exc:
        return f"its metrics are unreadable ({exc!r})", np.zeros(0, dtype=np.int64), {}
    if n and (len(steps) != n or last_step != int(steps[-1])):
        return "the metrics record's last step is not the last one", steps, data
    for key, v in [("step", steps), *data.items()]:
        if len(v) != n or _crc(v) != crcs.get(key):
            what = "step" if key == "step" else repr(names[key])
            return f"metrics series {what} does not match its checksum", steps, data
    return None, steps, data
