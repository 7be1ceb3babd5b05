"""The store of one run: its committed rows, read and written.

The commit protocol. A delta row counts only once the commit record says so:
the arrays grow before any data is written, and an all-zero chunk is
legitimately absent, so neither shape nor chunk presence says anything about
progress. A writer (holding the lock, see lock.py) writes a row's chunks,
then its step and the crc32c of its chunks, then the commit record, one
atomic write of the root metadata::

    commit = {"n_deltas": n, "last_slot": s, "last_step": step,
              "base": c_0, "chain": c_n, "last_crc": [...]}

``c_0 .. c_n`` is the generation chain (generations.py): every change of the
stored rows (append, truncate, rollback, overwrite) gives a new ``chain``,
and every cache records the chain of the rows it was computed from.

``last_theta`` has two slots so that appending never needs the older
checkpoint files (HF Trainer deletes them): a writer fills the slot the
commit record does not point at, then flips it in the write that commits.

A :class:`Store` is a snapshot: the commit record as it was opened. Opening
checks the manifest, the arrays' shapes and the chain against the rows'
steps and chunk checksums, so an edited attribute, step or count is an error
that names it rather than a different number.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from ..errors import CacheWarning, StoreBusyError, StoreError, StoreVersionError
from . import generations
from .caches import BandCache, ResultCache, WeightRecord
from .chunks import _Corrupt, DirectChunks, _Missing, ZarrChunks, direct_layout
from .layout import FORMAT_NAME, FORMAT_VERSION, TensorEntry, check_manifest, chunk_lengths, create_arrays
from .location import Location, unreachable
from .lock import writer_lock
from .metrics import read_metrics, write_metrics

__all__ = ["Store"]

_NOT_A_STORE = (FileNotFoundError, NotADirectoryError, ValueError)


def _damaged(path: str, what: str) -> StoreError:
    return StoreError(f"{path}: the store is damaged: {what}; ingest the run again (or restore it from a copy)")


class Store:
    """A run's Zarr group at one commit, with the commit protocol of its writers.

    Open one with :meth:`open` (checked) or :meth:`create` (a new, empty store).
    """

    def __init__(self, group: zarr.Group, location: Location, attrs: dict[str, Any]):
        self.group = group
        self.location = location
        self._attrs = attrs
        self._arrays: dict[str, zarr.Array] = {}
        self._reader: DirectChunks | ZarrChunks | None = None
        self._steps: np.ndarray | None = None
        self._crcs: np.ndarray | None = None
        self._chain: np.ndarray | None = None
        self._crc_columns: dict[int, np.ndarray] = {}

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
            raise StoreError(f"{where}: no store here (run `spectral-analyze ingest CKPT_DIR -o {where}` first)")
        try:
            group = location.open_group(mode)
        except _NOT_A_STORE as exc:
            raise StoreError(f"{where}: not a spectral-analyzer store ({exc})") from None
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 -- credentials, permissions, the network
            raise unreachable(where, exc) from None
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{where}: not a spectral-analyzer store (no '{FORMAT_NAME}' format attribute)")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            hint = ("ingest the run again with this version" if isinstance(version, int) and version < FORMAT_VERSION
                    else "upgrade the package")
            raise StoreVersionError(
                f"{where}: store format version {version!r} is not one this version of "
                f"spectral-analyzer reads (it reads version {FORMAT_VERSION}); {hint}"
            )
        store = cls(group, location, attrs)
        store._check(verify)
        return store

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
            "tensors": [t.to_json() for t in manifest], "commit": None, "sources": [], "warnings": [],
            "base_crc": None, **attrs,
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
        """One entry per committed checkpoint, base first: ``{"step", "files"}``."""
        if self.commit_record is None:
            return []
        return self._attrs["sources"][: self.n_deltas + 1]

    @property
    def checkpoint_steps(self) -> np.ndarray:
        return np.array([s["step"] for s in self.sources], dtype=np.int64)

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

    def _read_meta(self, name: str, n: int) -> np.ndarray:
        try:
            return np.asarray(self.array(name)[:n])
        except ValueError as exc:  # the crc32c codec: a flipped byte
            raise _damaged(self.path, f"the '{name}' array fails its checksum ({exc})") from None

    def _check(self, verify: bool) -> None:
        """Everything the numbers depend on, as far as it can be checked without reading deltas."""
        a = self._attrs
        check_manifest(self.path, a.get("tensors"), a.get("n_params"), a.get("chunk_size"))
        record = a.get("commit")
        if record is None:
            return
        try:
            n = int(record["n_deltas"])
            slot = int(record["last_slot"])
            int(record["base"], 16), int(record["chain"], 16)
            ok = n >= 0 and slot in (0, 1) and len(a["sources"]) >= n + 1 and len(a["base_crc"]) == len(
                chunk_lengths(self.n_params, self.chunk_size))
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(self.path, f"unreadable commit record ({exc!r})") from None
        if not ok:
            raise _damaged(self.path, f"the commit record {record!r} does not match the sources and base checksums")
        p = self.n_params
        k = len(a["base_crc"])
        for name, want in (("deltas", (n, p)), ("step", (n,)), ("chunk_crc", (n, k)), ("base", (p,)),
                           ("last_theta", (2, p))):
            try:
                shape = self.array(name).shape
            except KeyError:
                raise _damaged(self.path, f"the '{name}' array is missing") from None
            if len(shape) != len(want) or any(s < w for s, w in zip(shape, want)) or (
                    len(want) == 2 and shape[1] != want[1]):
                raise _damaged(self.path, f"the '{name}' array has shape {shape}, the commit needs {want}")
        if not verify:
            return
        base = generations.base_link(a["tensors"], self.chunk_size, a["sources"][0]["step"], a["base_crc"])
        if generations.hex_of(base) != record["base"]:
            raise _damaged(self.path, "the manifest, chunking, base step or base checksums do not match the commit")
        head = self.chain[-1] if n else base
        if generations.hex_of(head) != record["chain"]:
            raise _damaged(self.path, f"the steps or chunk checksums of the {n} committed rows do not match the commit")

    def array(self, name: str) -> zarr.Array:
        """A top-level array, opened once (its metadata is read once per Store)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except (ValueError, TypeError) as exc:  # zarr's errors for unreadable or invalid metadata
                raise _damaged(self.path, f"the metadata of the '{name}' array is unreadable "
                                          f"({' '.join(str(exc).split())})") from None
        return self._arrays[name]

    def chunk_bounds(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each parameter chunk."""
        c, p = self.chunk_size, self.n_params
        for start in range(0, p, c):
            yield start, min(start + c, p)

    # -- reading ----------------------------------------------------------------

    def _chunks(self) -> DirectChunks | ZarrChunks:
        if self._reader is None:
            arr = self.array("deltas")
            folder = direct_layout(arr)
            self._reader = (DirectChunks(folder, self.chunk_size) if folder
                            else ZarrChunks(arr, self.chunk_size, self.n_params))
        return self._reader

    def expect_crcs(self, j: int, column: np.ndarray) -> None:
        """Hand this snapshot the recorded crc32c of column chunk *j* of every row (band tasks)."""
        self._crc_columns[j] = np.asarray(column, dtype=np.uint32)

    def _expected_crc(self, row: int, j: int) -> int:
        column = self._crc_columns.get(j)
        return int(column[row] if column is not None else self.crcs[row, j])

    def read_delta_chunk(self, row: int, start: int, out: np.ndarray) -> None:
        """Read the chunk of ``deltas`` at (row, start) into *out* (float32, its length), checked.

        The values must have the crc32c recorded when the row was committed:
        an absent chunk is legitimate only where that crc32c is the one of zeros.
        """
        j = start // self.chunk_size
        try:
            got = self._chunks().read(row, j, out)
        except _Missing:
            out[:] = 0.0
            got = generations.zero_crc(out.size)
        except _Corrupt as exc:
            raise self._bad_chunk(row, j, str(exc)) from None
        if got != self._expected_crc(row, j):
            what = ("is missing" if not out.any() else
                    "holds other values than were committed (corrupted, or rewritten since this store was opened)")
            raise self._bad_chunk(row, j, what)

    def _bad_chunk(self, row: int, j: int, what: str) -> StoreError:
        step = int(self.steps[row]) if row < self.n_deltas else "?"
        return StoreError(f"{self.path}: chunk {row}/{j} of deltas (the delta ending at step {step}) {what}")

    def read_delta_row(self, row: int, start: int, stop: int) -> np.ndarray:
        """float32 ``deltas[row, start:stop]``, read chunk by chunk and checked."""
        c = self.chunk_size
        out = np.empty(stop - start, dtype=np.float32)
        buf = np.empty(c, dtype=np.float32)
        for a, b in self.chunk_bounds():
            if b <= start or a >= stop:
                continue
            view = buf[: b - a]
            self.read_delta_chunk(row, a, view)
            lo, hi = max(a, start), min(b, stop)
            out[lo - start : hi - start] = view[lo - a : hi - a]
        return out

    def prefetch_delta_chunks(self, rows: range, start: int) -> None:
        """Start reading these chunks (consecutive rows, one column chunk) now.

        Locally the OS is asked to (``posix_fadvise(WILLNEED)``), costing no
        memory. From object storage, whose latency is per request, the rows'
        chunks are fetched concurrently in the background into one block
        (``len(rows)`` chunks of memory) that :meth:`read_delta_chunk` then serves.
        """
        reader = self._chunks()
        j = start // self.chunk_size
        if isinstance(reader, DirectChunks):
            reader.prefetch(rows, j)
        else:
            reader.prefetch(rows, j, self.is_remote)

    def _read_checked(self, name: str, row: int | None, crcs: Sequence[int], start: int, stop: int) -> np.ndarray:
        """``name[(row,) start:stop]`` with each chunk checked against *crcs*."""
        arr = self.array(name)
        out = np.empty(stop - start, dtype=np.float32)
        for j, (a, b) in enumerate(self.chunk_bounds()):
            if b <= start or a >= stop:
                continue
            try:
                values = np.asarray(arr[a:b] if row is None else arr[row, a:b])
            except ValueError as exc:
                raise _damaged(self.path, f"chunk {j} of '{name}' fails its checksum ({exc})") from None
            if generations.chunk_crc(values) != int(crcs[j]):
                raise _damaged(self.path, f"chunk {j} of '{name}' is missing or holds other values than were written")
            lo, hi = max(a, start), min(b, stop)
            out[lo - start : hi - start] = values[lo - a : hi - a]
        return out

    def read_base(self, start: int, stop: int) -> np.ndarray:
        """float32 ``base[start:stop]`` (theta at the first checkpoint), checked."""
        return self._read_checked("base", None, self._attrs["base_crc"], start, stop)

    def read_last_theta(self, start: int, stop: int) -> np.ndarray:
        """theta at the last committed checkpoint, ``[start:stop]``, checked."""
        record = self.commit_record
        return self._read_checked("last_theta", int(record["last_slot"]), record["last_crc"], start, stop)

    # -- writing (the caller holds the writer lock) -------------------------------

    def reserve_rows(self, n_rows: int) -> None:
        """Size the row arrays for *n_rows* rows (data follows, commit after)."""
        self.array("deltas").resize((n_rows, self.n_params))
        self.array("step").resize((n_rows,))
        crc = self.array("chunk_crc")
        crc.resize((n_rows, crc.shape[1]))
        if "weights" in self.group:
            weights = self.group["weights"]
            for name in ("sigma", "row_crc"):
                arr = weights[name]
                if name == "row_crc" and arr.shape[0] > n_rows + 1:  # a chunk holds several checkpoints
                    arr[n_rows + 1 :] = arr.fill_value
                arr.resize((n_rows + 1, *arr.shape[1:]))

    def write_chunk(self, name: str, row: int | None, start: int, data: np.ndarray) -> int:
        """Write one whole chunk of array *name* (row ``None`` for the 1-D ``base``); returns its crc32c."""
        arr = self.array(name)
        if row is None:
            arr[start : start + data.shape[0]] = data
        else:
            arr[row, start : start + data.shape[0]] = data
        return generations.chunk_crc(data)

    def write_row_meta(self, row: int, step: int, crcs: Sequence[int]) -> None:
        """A row's step and chunk checksums, after its data and before its commit."""
        self.array("step")[row] = step
        self.array("chunk_crc")[row] = np.asarray(crcs, dtype=np.uint32)

    def commit(self, **updates: Any) -> None:
        """Update root attributes in one atomic write of the group's metadata."""
        attrs = {**self._attrs, **updates}
        self.group.attrs.put(attrs)
        self._attrs = attrs
        self._steps = self._crcs = self._chain = None

    def commit_rows(self, record: Mapping[str, Any], steps: Sequence[int], crcs: Sequence[Sequence[int]],
                    **updates: Any) -> None:
        """Commit new rows (their data, steps and checksums written): extends the chain."""
        prev = self.commit_record
        head = int(prev["chain"], 16) if prev is not None else int(record["base"], 16)
        if len(steps):
            head = int(generations.chain(head, np.asarray(steps), np.asarray(crcs, dtype=np.uint32))[-1])
        self.commit(commit={**record, "chain": generations.hex_of(head)}, **updates)

    def restore(self, attrs: Mapping[str, Any]) -> None:
        """Return to a snapshot of the attributes, dropping rows it did not commit."""
        n = 0 if attrs.get("commit") is None else int(attrs["commit"]["n_deltas"])
        for name in ("step", "chunk_crc"):  # a chunk of these holds several rows: clear the ones going
            arr = self.array(name)
            if arr.shape[0] > n:
                arr[n:] = arr.fill_value
        self.reserve_rows(n)
        self.commit(**dict(attrs))

    def truncate(self, n_deltas: int) -> None:
        """Keep the first *n_deltas* committed rows (and their checkpoints) only.

        ``last_theta`` then holds no committed checkpoint (its step is no
        longer the last one), so an append needs the checkpoint at the new
        last step, or a recorder's own snapshot of it.
        """
        attrs = self.attrs
        record = attrs["commit"]
        chain = self.chain
        head = chain[n_deltas - 1] if n_deltas else int(record["base"], 16)
        attrs["commit"] = {**record, "n_deltas": int(n_deltas), "chain": generations.hex_of(head)}
        attrs["sources"] = attrs["sources"][: int(n_deltas) + 1]
        self.restore(attrs)

    def clean_uncommitted(self) -> None:
        """Drop what a killed writer left past the commit: rows, their steps, checksums and chunk folders."""
        n = self.n_deltas
        if any(self.array(a).shape[0] > n for a in ("deltas", "step", "chunk_crc")):
            self.restore(self.attrs)
        if not self.is_remote:  # zarr leaves a row's emptied chunk folder behind
            folder = os.path.join(self.path, "deltas", "c")
            for entry in os.listdir(folder) if os.path.isdir(folder) else ():
                if entry.isdigit() and int(entry) >= n:
                    shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)

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

    @property
    def results_identity(self) -> str:
        """What every cached result depends on: the rows' generation and the metrics."""
        return f"{self.identity}/{self._attrs.get('metrics') or ''}"

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
        try:
            with writer_lock(self.location, False):
                current = Store.open(self.location, mode="r+", verify=False)
                if current.identity != self.identity or current.attrs.get("metrics") != self._attrs.get("metrics"):
                    return False
                current._chain, current._steps, current._crcs = self._chain, self._steps, self._crcs
                write(current)
                return True
        except StoreBusyError:
            return False
        except (OSError, StoreError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            warnings.warn(f"{self.path}: computed without caching: the store cannot be written ({reason})",
                          CacheWarning, stacklevel=3)
            return False
