"""Reading a snapshot's rows: every chunk checked against the crc32c its commit recorded.

Chunks are read through :mod:`.chunks`: the chunk files directly on a local
disk, Zarr elsewhere. An absent chunk is legitimate only where the recorded
crc32c is the one of zeros (Zarr leaves an all-zero chunk unwritten); any
other difference is an error naming the row, the step and the chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import StoreError, StoreRewrittenError
from . import generations
from .chunks import _Corrupt, DirectChunks, _Missing, _Unreadable, ZarrChunks, direct_layout
from .layout import damaged

__all__ = ["RowReading"]


class RowReading:
    """The reading half of :class:`~spectral_analyzer.store.core.Store`."""

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

    @property
    def reads_chunk_files(self) -> bool:
        """Whether delta chunks are read straight from local files (any thread may read; see :mod:`.chunks`)."""
        return isinstance(self._chunks(), DirectChunks)

    def read_delta_chunk(self, row: int, start: int, out: np.ndarray, *, uncached: bool = False) -> None:
        """Read the chunk of ``deltas`` at (row, start) into *out* (float32, its length), checked.

        The values must have the crc32c recorded when the row was committed:
        an absent chunk is legitimate only where that crc32c is the one of zeros.
        *uncached*: from local chunk files, what the page cache does not hold
        is read past it, with ``O_DIRECT`` (*out* from
        :func:`~.chunks.aligned_zeros`, a whole chunk), for a reader that
        reads each chunk once.
        """
        j = start // self.chunk_size
        try:
            got = self._chunks().read(row, j, out, uncached)
        except _Missing:
            out[:] = 0.0
            got = generations.zero_crc(out.size)
        except _Corrupt as exc:
            raise self._bad_chunk(row, j, str(exc)) from None
        except _Unreadable as exc:
            raise self._unreadable(f"chunk {row}/{j} of deltas (the delta ending at step {self._step_of(row)})",
                                   exc) from None
        if got != self._expected_crc(row, j):
            what = ("is missing" if not out.any() else
                    "holds other values than were committed (corrupted, or rewritten since this store was opened)")
            raise self._bad_chunk(row, j, what)

    def _step_of(self, row: int) -> int | str:
        return int(self.steps[row]) if row < self.n_deltas else "?"

    def _bad_chunk(self, row: int, j: int, what: str) -> StoreError:
        return self._rewritten(f"chunk {row}/{j} of deltas") or StoreError(
            f"{self.path}: chunk {row}/{j} of deltas (the delta ending at step {self._step_of(row)}) {what}")

    def _unreadable(self, what: str, exc: _Unreadable) -> StoreError:
        """A chunk file there but not readable: named, and not called damage (EIO may pass; a rerun may do)."""
        return StoreError(f"{self.path}: {what} cannot be read ({exc})")

    def read_delta_row(self, row: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 ``deltas[row, start:stop]``, read chunk by chunk and checked, into *out* if given.

        Whole chunks are read straight into *out*; a reader of many rows
        passes the same *out* each time (fresh pages cost their first touch:
        about 2 s a GB on a virtual machine, against 0.15 s to write them again).
        """
        out = np.empty(stop - start, dtype=np.float32) if out is None else out
        for lo, hi, view in self._pieces(start, stop, out):
            self.read_delta_chunk(row, lo, view)
        return out

    def _pieces(self, start: int, stop: int, out: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """For each chunk [a, b) meeting [start, stop): (a, b, a buffer for its values); the values are in
        *out* once the next piece is asked for (a chunk that *out* holds whole is its own buffer)."""
        spare = None
        for a, b in self.chunk_bounds():
            if b <= start or a >= stop:
                continue
            lo, hi = max(a, start), min(b, stop)
            if (lo, hi) == (a, b):
                yield a, b, out[a - start : b - start]
                continue
            spare = np.empty(self.chunk_size, dtype=np.float32) if spare is None else spare
            yield a, b, spare[: b - a]
            out[lo - start : hi - start] = spare[lo - a : hi - a]

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

    def _direct(self, name: str) -> DirectChunks | None:
        """A reader of *name*'s local chunk files (``base``, ``last_theta``), or None: read through Zarr."""
        if name not in self._direct_readers:
            folder = direct_layout(self.array(name))
            self._direct_readers[name] = DirectChunks(folder, self.chunk_size) if folder else None
        return self._direct_readers[name]

    def _read_checked(self, name: str, row: int | None, crcs: Sequence[int], start: int, stop: int,
                      out: np.ndarray | None = None) -> np.ndarray:
        """``name[(row,) start:stop]`` with each chunk checked against *crcs*, into *out* if given."""
        out = np.empty(stop - start, dtype=np.float32) if out is None else out
        direct = self._direct(name)
        for a, b, view in self._pieces(start, stop, out):
            j = a // self.chunk_size
            try:
                if direct is not None:
                    got = direct.read(row, j, view)
                else:
                    view[:] = self.array(name)[a:b] if row is None else self.array(name)[row, a:b]
                    got = generations.chunk_crc(view)
            except _Missing:  # Zarr leaves a chunk of zeros unwritten
                view[:] = 0.0
                got = generations.zero_crc(view.size)
            except (_Corrupt, ValueError) as exc:
                raise self._damaged(f"chunk {j} of '{name}' fails its checksum ({exc})") from None
            except _Unreadable as exc:
                raise self._unreadable(f"chunk {j} of '{name}'", exc) from None
            if got != int(crcs[j]):
                raise self._damaged(f"chunk {j} of '{name}' is missing or holds other values than were written")
        return out

    def _damaged(self, what: str) -> StoreError:
        """The store damaged, unless it was rewritten since this snapshot was opened (then said so: a
        healthy store is not to be ingested again)."""
        return self._rewritten(what) or damaged(self.path, what)

    def _rewritten(self, what: str) -> StoreError | None:
        """The error for *what* where the store at the path no longer holds this snapshot's rows
        (:meth:`_changed`), else None."""
        change = self._changed()
        if change is None:
            return None
        return StoreRewrittenError(f"{self.path}: {what}: {change} since this store was opened; open it again")

    def _changed(self) -> str | None:
        """How the store at the path no longer holds this snapshot's committed rows: ``"overwritten"``
        (other checkpoints: ``c_0`` differs), ``"rewritten"`` (its rows truncated, or replaced by others
        with the same first checkpoint), else None (the same commit, or rows appended after them)."""
        snap = self._opened_record or self.commit_record or {}
        try:
            now = self.location.open_group("r").attrs.get("commit") or {}
        except Exception:  # noqa: BLE001 -- unreadable now: the damage is what to report
            return None
        if all(now.get(k) == snap.get(k) for k in ("base", "chain", "n_deltas")):
            return None  # the same commit (a record of the first format-3 stores gains head_step in memory)
        if now.get("base") != snap.get("base"):
            return "overwritten"
        n = int(snap.get("n_deltas") or 0)
        try:
            if int(now.get("n_deltas") or 0) < n:
                return "rewritten"
            if n and generations.hex_of(type(self).open(self.location, verify=False).chain[n - 1]) != snap["chain"]:
                return "rewritten"
        except Exception:  # noqa: BLE001 -- unreadable now: the damage is what to report
            return None
        return None

    def expect_commit(self, record: dict[str, Any] | None) -> None:
        """Hand a store opened for a task the commit record of the snapshot it works for: a chunk that
        does not match is then told as the store rewritten since that snapshot, where it was."""
        self._opened_record = record

    def read_base(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """float32 ``base[start:stop]`` (theta at the first checkpoint), checked, into *out* if given."""
        return self._read_checked("base", None, self._attrs["base_crc"], start, stop, out)

    def read_last_theta(self, start: int, stop: int) -> np.ndarray:
        """theta at the last committed checkpoint, ``[start:stop]``, checked."""
        record = self.commit_record
        return self._read_checked("last_theta", int(record["last_slot"]), record["last_crc"], start, stop)
