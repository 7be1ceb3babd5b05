"""The store of one run at one commit: what it holds, opened and checked.

A :class:`Store` is a snapshot: the commit record as it was opened (the
protocol that writes it is in committing.py, the checked reads in
reading.py). Opening checks the manifest, the arrays' shapes and the
generation chain against the rows' steps and chunk checksums, so an edited
attribute, step or count is an error that names it rather than a different
number. Caches (caches.py) and the logged series (metrics.py) hang off it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from ..errors import StoreError, StoreRewrittenError
from . import generations
from .caches import BandCache, ResultCache, write_if_current
from .chunks import DirectChunks, ZarrChunks
from .committing import CommitProtocol
from .layout import FORMAT_NAME, FORMAT_VERSION, TensorEntry, check_format, create_arrays, damaged, no_store
from .location import Location, unreachable
from .metrics import append_metrics, last_logged_step, read_metrics, write_metrics
from .reading import RowReading
from .weight_record import WeightRecord

__all__ = ["Store"]

_NOT_A_STORE = (FileNotFoundError, NotADirectoryError, ValueError)


class Store(RowReading, CommitProtocol):
    """A run's Zarr group at one commit, with the commit protocol of its writers.

    Open one with :meth:`open` (checked) or :meth:`create` (a new, empty store).
    """

    def __init__(self, group: zarr.Group, location: Location, attrs: dict[str, Any]):
        self.group = group
        self.location = location
        self._attrs = attrs
        self._arrays: dict[str, zarr.Array] = {}
        self._direct_folders: dict[str, str | None] = {}  # where write_chunk writes chunk files itself
        self._reader: DirectChunks | ZarrChunks | None = None
        self._direct_readers: dict[str, DirectChunks | None] = {}  # base, last_theta
        self._steps: np.ndarray | None = None
        self._crcs: np.ndarray | None = None
        self._chain: np.ndarray | None = None
        self._crc_columns: dict[int, np.ndarray] = {}
        self._opened_record: dict[str, Any] | None = None  # a task's: the commit of the snapshot it works for

    # -- the location ---------------------------------------------------------

    @property
    def path(self) -> str:
        return self.location.path

    @property
    def storage_options(self) -> dict | None:
        return self.location.storage_options

    @property
    def is_remote(self) -> bool:
        return self.location.is_remote

    @staticmethod
    def exists(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
        """Whether *path* holds a Zarr group written by this package."""
        group = Location.of(path, storage_options).try_open_group()
        return group is not None and group.attrs.get("format") == FORMAT_NAME

    @classmethod
    def open(
        cls, path: str | os.PathLike | Location, mode: str = "r", storage_options: Mapping[str, Any] | None = None,
        *, verify: bool = True,
    ) -> Store:
        """Open the store's last commit, refusing unknown format versions and damage.

        *verify* False skips reading the steps and checksums to check the
        chain (band tasks, which are handed the checksums they need).
        """
        location = path if isinstance(path, Location) else Location.of(path, storage_options)
        where = location.path
        if not location.occupied():
            raise no_store(where)
        for attempt in range(3):  # rewritten by another process while it was being opened: opened again
            try:
                group = location.open_group(mode)
            except _NOT_A_STORE as exc:
                raise StoreError(f"{where}: not a spectral-analyzer store ({exc})") from None
            except StoreError:
                raise
            except Exception as exc:  # noqa: BLE001 -- credentials, permissions, the network
                raise unreachable(where, exc) from None
            check_format(where, attrs := group.attrs.asdict())
            try:
                (store := cls(group, location, attrs))._check(verify)
                return store
            except StoreRewrittenError:
                if attempt == 2:
                    raise

    @classmethod
    def create(cls, location: Location, manifest: Sequence[TensorEntry], chunk_size: int,
               attrs: Mapping[str, Any]) -> Store:
        """Create an empty store (no commit yet); the caller holds the writer lock."""
        n_params = sum(t.size for t in manifest)
        if n_params == 0:
            raise StoreError(f"{location.path}: the checkpoints hold no floating-point tensors to store")
        chunk = min(int(chunk_size), n_params)
        location.clear()  # whatever an interrupted writer left, the lock kept
        # The attributes go in with the group, in one write: a store killed
        # while its arrays are being made is still recognisable (and has no commit).
        root = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "n_params": n_params, "chunk_size": chunk,
            "tensors": [t.to_json() for t in manifest], "commit": None, "warnings": [],
            "base_step": None, "base_crc": None, **attrs,
        }
        group = zarr.create_group(location.zarr_store(False), overwrite=False, attributes=root)
        create_arrays(group, n_params, chunk)
        return cls(group, location, root)

    def reopen(self, mode: str = "r") -> Store:
        """The store's latest commit (this object stays at its own)."""
        return Store.open(self.location, mode)

    # -- the commit it holds ----------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes as of this snapshot."""
        return dict(self._attrs)

    @property
    def commit_record(self) -> dict[str, Any] | None:
        return self._attrs.get("commit")

    @property
    def n_deltas(self) -> int:
        record = self.commit_record
        return 0 if record is None else int(record["n_deltas"])

    @property
    def n_params(self) -> int:
        return int(self._attrs["n_params"])

    @property
    def chunk_size(self) -> int:
        return int(self._attrs["chunk_size"])

    @property
    def manifest(self) -> list[TensorEntry]:
        return [TensorEntry.from_json(t) for t in self._attrs["tensors"]]

    @property
    def sources(self) -> list[dict[str, Any]]:
        """One entry per committed checkpoint, base first: ``{"step", "label", "files"}``."""
        if self.commit_record is None:
            return []
        return self.sources_at(*range(self.n_deltas + 1))

    def sources_at(self, *indices: int) -> list[dict[str, Any]]:
        """The entries of these committed checkpoints (0 the base), reading only their chunks."""
        if len(indices) < 4:  # a few entries: one small read each
            entries = [self._read_meta("sources", i + 1, i)[0] for i in indices]
        else:
            entries = self._read_meta("sources", max(indices) + 1)[list(indices)]
        # not in the chain: read after another process rewrote the rows, they would describe that run's files
        if (rewritten := self._rewritten("the sources of its checkpoints")) is not None:
            raise rewritten
        try:
            return [json.loads(str(e)) for e in entries]
        except ValueError:
            raise self._damaged("the 'sources' array holds an entry that is not JSON") from None

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """Step of each committed checkpoint, base first."""
        if self.commit_record is None:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([[int(self._attrs["base_step"])], self.steps]).astype(np.int64)

    @property
    def last_checkpoint_step(self) -> int:
        """The last committed checkpoint's step (one element read, however long the run)."""
        n = self.n_deltas
        if n == 0:
            return int(self._attrs["base_step"])
        if self._steps is not None:
            return int(self._steps[n - 1])
        return int(self._read_meta("step", n, n - 1)[0])

    @property
    def steps(self) -> np.ndarray:
        """End step of each committed delta."""
        if self._steps is None:
            self._steps = self._read_meta("step", self.n_deltas).astype(np.int64)
        return self._steps.copy()

    @property
    def crcs(self) -> np.ndarray:
        """crc32c of each committed row's chunks, uint32 (delta, chunk)."""
        if self._crcs is None:
            self._crcs = self._read_meta("chunk_crc", self.n_deltas)
        return self._crcs

    @property
    def chain(self) -> np.ndarray:
        """The generation chain c_1..c_n of the committed rows (uint64)."""
        if self._chain is None:
            record = self.commit_record
            base = 0 if record is None else int(record["base"], 16)
            self._chain = generations.chain(base, self.steps, self.crcs)
        return self._chain

    @property
    def identity(self) -> str:
        """c_n as hex: what the committed rows are (``""`` before the base is committed)."""
        record = self.commit_record
        return "" if record is None else str(record["chain"])

    def _read_meta(self, name: str, n: int, start: int = 0) -> np.ndarray:
        try:
            return np.asarray(self.array(name)[start:n])
        except ValueError as exc:  # the crc32c codec: a flipped byte
            raise damaged(self.path, f"the '{name}' array fails its checksum ({exc})") from None

    def array(self, name: str) -> zarr.Array:
        """A top-level array, opened once (its metadata is read once per Store)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except (ValueError, TypeError) as exc:  # zarr's errors for unreadable or invalid metadata
                raise damaged(self.path, f"the metadata of the '{name}' array is unreadable "
                                          f"({' '.join(str(exc).split())})") from None
        return self._arrays[name]

    def size_on_disk(self) -> int:
        return self.location.size_on_disk()

    # -- what is kept beside the rows ---------------------------------------------

    @property
    def band_cache(self) -> BandCache:
        return BandCache(self)

    @property
    def results(self) -> ResultCache:
        return ResultCache(self)

    @property
    def weights(self) -> WeightRecord:
        return WeightRecord(self)

    def read_metrics(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(steps, {name: values})`` of the logged series, checked."""
        return read_metrics(self)

    def write_metrics(self, steps: np.ndarray, series: Mapping[str, np.ndarray]) -> None:
        """Replace the logged series (the writer lock is held)."""
        write_metrics(self, steps, series)

    def append_metrics(self, steps: np.ndarray, series: Mapping[str, np.ndarray]) -> None:
        """Add logged rows after the last logged step, writing O(new rows) (the writer lock is held)."""
        append_metrics(self, steps, series)

    @property
    def last_logged_step(self) -> int | None:
        return last_logged_step(self)

    @property
    def results_identity(self) -> str:
        """What every cached result depends on: the rows' generation and the metrics."""
        return f"{self.identity}/{(self._attrs.get('metrics') or {}).get('token', '')}"

    def read_result(self, name: str):
        """A cached analysis Dataset of this snapshot's rows and metrics, or None."""
        return self.results.read(name, self.results_identity)

    def cache_result(self, name: str, ds) -> None:
        """Cache *ds* where this process can: see :meth:`cache`."""
        self.cache(lambda store: store.results.write(name, ds, self.results_identity))

    def cache(self, write) -> bool:
        """Run ``write(store)`` under the writer lock, on a store opened for writing, if this snapshot is current.

        A store another process is writing, or that has moved on since this
        snapshot, is not written (the caller has computed its numbers and
        returns them anyway). A store that cannot be written (read-only
        media or credentials, a full disk) gives a :class:`CacheWarning`.
        Returns whether the cache was written.
        """
        return write_if_current(self, write)
