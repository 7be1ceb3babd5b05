"""Logged series (loss, accuracy, learning rate) in the store's ``metrics`` group.

A write builds the new series complete in ``metrics-new``, then commits their
token as the root attribute ``metrics`` (one atomic write of the root
metadata), then moves ``metrics-new`` into the place of ``metrics``. A reader
takes whichever of the two carries the committed token, so a write killed at
any point leaves either the old series or the new ones, never a mixture; the
next write finishes or removes what was left. Arrays are named after the
series (``/`` read as ``.``); a name that is not a safe array name, or that
collides with another, gets ``s<i>``; the logged names are kept in the
group's attributes with the crc32c of each series.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping

import google_crc32c
import numpy as np
from dask.base import tokenize
from zarr.codecs import Crc32cCodec

from ..errors import StoreError

__all__ = ["read_metrics", "write_metrics"]

_CURRENT, _NEW = "metrics", "metrics-new"


def _crc(values: np.ndarray) -> int:
    return int(google_crc32c.value(np.ascontiguousarray(values).tobytes()))


def _keys(names: list[str]) -> list[str]:
    keys, seen = [], {"step"}
    for i, name in enumerate(names):
        key = str(name).replace("/", ".")
        unsafe = (not key or key in (".", "..", "zarr.json") or key.startswith("__") or key in seen
                  or not key.isprintable())
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
    """Finish or undo a write that was killed (the writer lock is held)."""
    token = store.attrs.get("metrics")
    if token and _token_of(store, _CURRENT) != token and _token_of(store, _NEW) == token:
        _move(store, _NEW, _CURRENT)
    if _NEW in store.group:
        del store.group[_NEW]


def write_metrics(store, steps: np.ndarray, series: Mapping[str, np.ndarray]) -> None:
    """Replace the run's metrics by step-indexed float64 *series* (the caller holds the writer lock)."""
    steps = np.asarray(steps, dtype=np.int64)
    names = list(series)
    values = [np.asarray(series[n], dtype=np.float64) for n in names]
    token = tokenize(steps, names, values)[:16]
    _settle(store)
    if token == store.attrs.get("metrics"):
        return
    keys = _keys(names)
    group = store.group.create_group(_NEW)
    opts = {"compressors": [Crc32cCodec()], "dimension_names": ("step",)}
    group.create_array("step", data=steps, **opts)
    for key, v in zip(keys, values):
        group.create_array(key, data=v, fill_value=np.nan, **opts)
    group.attrs.put({
        "token": token,
        "names": dict(zip(keys, names)),
        "checksums": {"step": _crc(steps), **{k: _crc(v) for k, v in zip(keys, values)}},
    })
    store.commit(metrics=token)
    _move(store, _NEW, _CURRENT)


def read_metrics(store) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(steps, {name: values})`` of the snapshot's metrics, checked."""
    token = store.attrs.get("metrics")
    if not token:
        return np.zeros(0, dtype=np.int64), {}
    name = next((n for n in (_CURRENT, _NEW) if _token_of(store, n) == token), None)
    if name is None:
        raise StoreError(f"{store.path}: the store is damaged: its metrics group is missing or not the committed one")
    try:
        group = store.location.open_group("r", path=name)
        attrs = group.attrs.asdict()
        names, crcs = attrs["names"], attrs["checksums"]
        steps = np.asarray(group["step"][:], dtype=np.int64)
        data = {k: np.asarray(group[k][:], dtype=np.float64) for k in names}
    except (KeyError, ValueError) as exc:
        raise StoreError(f"{store.path}: the store is damaged: its metrics are unreadable ({exc!r})") from None
    for key, v in [("step", steps), *data.items()]:
        if _crc(v) != crcs.get(key):
            what = "step" if key == "step" else repr(names[key])
            raise StoreError(f"{store.path}: the store is damaged: metrics series {what} does not match its checksum")
    return steps, {names[k]: v for k, v in data.items()}
