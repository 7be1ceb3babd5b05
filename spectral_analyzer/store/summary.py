"""What a store holds, from its root metadata alone: no Zarr, no array read.

``spectral-analyze info`` answers from this at once. The root metadata is a
fixed-size JSON document (layout.py): the manifest, the commit record (with
the first and last step), the metrics record and the warnings. Only the
manifest and the format are checked here; opening a :class:`Store` checks the
rows against the commit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import StoreError
from .layout import TensorEntry, check_format, check_manifest, no_store
from .location import Location, unreachable

__all__ = ["Summary", "summarize"]


@dataclass(frozen=True)
class Summary:
    """A store's contents as its last commit describes them."""

    path: str
    format_version: int
    checkpoint_steps: tuple[int, int] | None  # first and last, None before the first commit
    n_deltas: int
    n_params: int
    tensors: list[TensorEntry]
    metrics: list[str]  # names of the logged series
    logged_steps: int  # steps they are logged at
    warnings: list[str]
    size_on_disk: int

    @property
    def n_checkpoints(self) -> int:
        return 0 if self.checkpoint_steps is None else self.n_deltas + 1


def _root(location: Location) -> dict[str, Any]:
    where = location.path
    try:
        if location.is_remote:
            fs, root = location.filesystem()
            raw = fs.cat_file(f"{root}/zarr.json")
        else:
            with open(os.path.join(where, "zarr.json"), "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        raise no_store(where) from None
    except (NotADirectoryError, IsADirectoryError):
        raise StoreError(f"{where}: not a spectral-analyzer store (no zarr.json)") from None
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 -- credentials, permissions, the network
        raise unreachable(where, exc) from None
    try:
        meta = json.loads(raw)
        return dict(meta.get("attributes") or {})
    except (ValueError, AttributeError, TypeError):
        raise StoreError(f"{where}: not a spectral-analyzer store (its zarr.json is not a JSON object)") from None


def _head_step(location: Location, record: Mapping[str, Any]) -> int:
    """The commit's last step; the first stores of format 3 did not record it: read from their rows (Zarr)."""
    if "head_step" in record:
        return int(record["head_step"])
    from .core import Store

    return Store.open(location, verify=False).last_checkpoint_step


def summarize(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Summary:
    """The :class:`Summary` of the store at *path* (a folder or an fsspec URL)."""
    location = Location.of(path, storage_options)
    attrs = _root(location)
    check_format(location.path, attrs)
    tensors = check_manifest(location.path, attrs.get("tensors"), attrs.get("n_params"), attrs.get("chunk_size"))
    record = attrs.get("commit")
    metrics = attrs.get("metrics") or {}
    try:
        steps = None if record is None else (int(attrs["base_step"]), _head_step(location, record))
        n = 0 if record is None else int(record["n_deltas"])
        names = [str(name) for name in dict(metrics.get("names", {})).values() if name != "step"]  # the index
        logged = int(metrics.get("n", 0))
        warned = attrs.get("warnings", [])
        if not isinstance(warned, list):
            raise TypeError(f"warnings is a {type(warned).__name__}, not a list")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(f"{location.path}: the store is damaged: unreadable commit record ({exc!r})") from None
    return Summary(
        path=location.path, format_version=int(attrs["format_version"]), checkpoint_steps=steps, n_deltas=n,
        n_params=int(attrs["n_params"]), tensors=tensors, metrics=names, logged_steps=logged,
        warnings=[str(w) for w in warned], size_on_disk=location.size_on_disk(),
    )
