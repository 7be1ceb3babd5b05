"""Chunk I/O of the delta rows: one interface, two implementations.

:class:`ZarrChunks` reads through Zarr (any store, crc32c checked by its
codec). :class:`DirectChunks` reads a local chunk file straight into the
caller's buffer with one ``preadv`` (or ``readinto`` where ``os.preadv`` is
missing) and checks the crc32c trailer itself: Zarr's own read path costs
more than the disk here. It is used only where the array's metadata is the
exact layout it understands (``bytes`` little/native endian + ``crc32c``,
default chunk keys with ``/``); :func:`direct_layout` says so, and a test
writes through Zarr and reads back through both, so a Zarr upgrade that
changes the layout fails a test instead of switching paths silently.

Both return the chunk's values; :meth:`Store.read_delta_chunk` then checks
them against the crc32c recorded when the row was committed, which catches
a missing chunk (read as zeros), a chunk from another row and a stale
rewrite alike.
"""

from __future__ import annotations

import os
import sys
import threading

import google_crc32c
import numpy as np
import zarr

__all__ = ["DirectChunks", "ReadAhead", "ZarrChunks", "direct_layout"]


def direct_layout(array: zarr.Array) -> str | None:
    """The folder of *array*'s chunk files when :class:`DirectChunks` can read them, else None."""
    meta = array.metadata
    codecs = tuple(type(c).__name__ for c in meta.codecs)
    ok = (
        isinstance(array.store, zarr.storage.LocalStore)
        and codecs == ("BytesCodec", "Crc32cCodec")
        and getattr(meta.codecs[0], "endian", None) is not None
        and meta.codecs[0].endian.value == sys.byteorder
        and getattr(meta.chunk_key_encoding, "name", "") == "default"
        and meta.chunk_key_encoding.separator == "/"
    )
    return os.path.join(str(array.store.root), array.path, "c") if ok else None


class _Missing(Exception):
    """The chunk file is absent (Zarr leaves chunks equal to the fill value unwritten)."""


class _Corrupt(Exception):
    """The chunk fails its own crc32c trailer, or is truncated."""


class DirectChunks:
    """Local chunk files of a 2-D float32 array with chunks (1, C), read with no intermediate copy."""

    def __init__(self, folder: str, chunk_size: int):
        self.folder, self.chunk_size = folder, chunk_size

    def read(self, row: int, j: int, out: np.ndarray) -> int:
        """Chunk (row, j) into *out*; returns the crc32c of its values."""
        path = os.path.join(self.folder, str(row), str(j))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _Missing(path) from None
        full = self.chunk_size * 4  # chunks on disk are whole, the last one padded
        crc = np.empty(4, dtype=np.uint8)
        tail = np.empty(full - out.size * 4, dtype=np.uint8)
        try:
            got = _readv(fd, [out.view(np.uint8), tail, crc])
        finally:
            os.close(fd)
        if got != full + 4:
            raise _Corrupt(f"truncated ({got} bytes)")
        data_crc = google_crc32c.value(out.view(np.uint8))
        whole = google_crc32c.extend(data_crc, tail) if tail.size else data_crc
        if whole != int.from_bytes(crc.tobytes(), "little"):
            raise _Corrupt("fails its crc32c check")
        return data_crc

    def prefetch(self, rows: range, j: int) -> None:
        """Ask the OS to read these chunk files ahead (costs no memory)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for row in rows:
            try:
                fd = os.open(os.path.join(self.folder, str(row), str(j)), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


def _readv(fd: int, buffers: list[np.ndarray]) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, buffers, 0)
    got = 0
    with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
        for b in buffers:
            n = f.readinto(memoryview(b)) or 0
            got += n
            if n < b.size:
                break
    return got


class ZarrChunks:
    """Chunks of a 2-D array read through Zarr; object stores read a block of rows ahead."""

    def __init__(self, array: zarr.Array, chunk_size: int, n_cols: int):
        self.array, self.chunk_size, self.n_cols = array, chunk_size, n_cols
        self.ahead: ReadAhead | None = None

    def read(self, row: int, j: int, out: np.ndarray) -> int:
        """Chunk (row, j) into *out* (an absent chunk reads as zeros); returns the crc32c of its values."""
        start = j * self.chunk_size
        ahead = self.ahead
        if ahead is not None and ahead.start == start and row in ahead.rows:
            block = ahead.result()
            if block is not None:
                out[:] = block[row - ahead.rows.start]
                if row == ahead.rows[-1]:
                    self.ahead = None
                return google_crc32c.value(out.view(np.uint8))
            self.ahead = None  # the read failed: read again below, for the error's message
        try:
            out[:] = self.array[row, start : start + out.size]
        except ValueError as exc:
            if "checksum" in str(exc):
                raise _Corrupt("fails its crc32c check") from None
            raise
        return google_crc32c.value(out.view(np.uint8))

    def prefetch(self, rows: range, j: int, remote: bool) -> None:
        if remote and len(rows):
            start = j * self.chunk_size
            self.ahead = ReadAhead(self.array, rows, start, min(start + self.chunk_size, self.n_cols))


class ReadAhead:
    """``array[rows, start:stop]`` read in a background thread (Zarr fetches the chunks concurrently)."""

    def __init__(self, array: zarr.Array, rows: range, start: int, stop: int):
        self.rows, self.start = rows, start
        self._block: np.ndarray | None = None
        self._thread = threading.Thread(target=self._read, args=(array, stop), daemon=True)
        self._thread.start()

    def _read(self, array: zarr.Array, stop: int) -> None:
        try:
            self._block = np.asarray(array[self.rows.start : self.rows.stop, self.start : stop])
        except Exception:  # noqa: BLE001 -- any failure: the caller reads the chunk again and reports it
            self._block = None

    def result(self) -> np.ndarray | None:
        self._thread.join()
        return self._block
