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

:meth:`DirectChunks.read` with ``uncached=True`` (the band build's reader
threads) reads what the page cache does not hold past it, with
``O_DIRECT`` (:mod:`.direct_io`).

Writing such chunk files directly is :mod:`.chunk_writes`.

Both return the chunk's values; :meth:`Store.read_delta_chunk` then checks
them against the crc32c recorded when the row was committed, which catches
a missing chunk (read as zeros), a chunk from another row and a stale
rewrite alike.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import sys
import threading

import numpy as np
import zarr

from .crc import crc32c
from .direct_io import ALIGN, aligned_zeros, read_file

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


class _Unreadable(Exception):
    """The chunk file is there but cannot be read (EIO, EACCES, a symlink loop): the message says why."""


@contextlib.contextmanager
def _opening(path: str):
    """OS errors of reading chunk file *path* as this module's: a path that is absent, or a directory, is
    :class:`_Missing` (as Zarr reads it: what its values must be is then the recorded crc32c's to say);
    any other failure :class:`_Unreadable`."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise _Missing(path) from None
    except OSError as exc:
        raise _Unreadable(exc.strerror or str(exc)) from None


class DirectChunks:
    """Local chunk files of a float32 array with chunks (1, C) (or (C,): *row* None), read with no
    intermediate copy."""

    def __init__(self, folder: str, chunk_size: int):
        self.folder, self.chunk_size = folder, chunk_size
        self._past_cache = read_file()

    def read(self, row: int | None, j: int, out: np.ndarray, uncached: bool = False) -> int:
        """Chunk (row, j) (chunk j of a 1-D array: *row* None) into *out*; returns the crc32c of its values.

        *uncached*: what the page cache does not hold is read with
        ``O_DIRECT`` (when *out* is a whole chunk on an :data:`ALIGN`
        boundary), and so is not added to the cache (:mod:`.direct_io`).
        """
        path = os.path.join(self.folder, str(j)) if row is None else os.path.join(self.folder, str(row), str(j))
        full = self.chunk_size * 4  # chunks on disk are whole, the last one padded
        if uncached and self._past_cache.direct and out.nbytes == full and full % ALIGN == 0 and out.ctypes.data % ALIGN == 0:
            return self._read_uncached(path, out)
        crc = np.empty(4, dtype=np.uint8)
        tail = np.empty(full - out.size * 4, dtype=np.uint8)
        extra = np.empty(1, dtype=np.uint8)  # a byte past the trailer: a longer file is not a chunk
        with _opening(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                got = _readv(fd, [out.view(np.uint8), tail, crc, extra])
            finally:
                os.close(fd)
        if got != full + 4:
            raise _Corrupt(f"truncated ({got} bytes)" if got < full + 4 else f"longer than a chunk ({full + 4} bytes)")
        data_crc = crc32c(out)
        whole = crc32c(tail, data_crc) if tail.size else data_crc
        if whole != int.from_bytes(crc.tobytes(), "little"):
            raise _Corrupt("fails its crc32c check")
        return data_crc

    def _read_uncached(self, path: str, out: np.ndarray) -> int:
        trailer = aligned_zeros((ALIGN,), np.uint8)  # the crc32c, then nothing (the file ends)
        with _opening(path):
            got = self._past_cache(path, [out, trailer])
        full = out.nbytes
        if got != full + 4:
            raise _Corrupt(f"truncated ({got} bytes)" if got < full + 4 else f"{got} bytes long, not {full + 4}")
        crc = crc32c(out)
        if crc != int.from_bytes(trailer[:4].tobytes(), "little"):
            raise _Corrupt("fails its crc32c check")
        return crc

    def prefetch(self, rows: range, j: int) -> None:
        """Ask the OS to read these chunk files ahead (costs no memory; returns at once)."""
        if hasattr(os, "posix_fadvise"):
            _advisor.put([(os.path.join(self.folder, str(row), str(j)), self.chunk_size * 4 + 4) for row in rows])


class _Advisor:
    """One background thread that gives ``POSIX_FADV_WILLNEED`` advice for the files queued to it.

    Off the caller's thread, because the advice is not free: the kernel
    allocates the page cache and submits the reads before the call returns
    (about 80 ms for 128 MiB here), time a band task would otherwise spend
    not computing. And a window at a time: Linux reads at most one
    read-ahead window (the device's ``read_ahead_kb``) per call and drops
    the rest of the range silently; a 16 MiB chunk advised in one call came
    in half, and the reader then waited on the disk for the other half.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, files: list[tuple[str, int]]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # none yet, or this is a forked child
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, args=(self._queue,), daemon=True,
                                                name="spectral-analyzer-readahead")
                self._thread.start()
            self._queue.put(files)

    @staticmethod
    def _run(todo: queue.SimpleQueue) -> None:
        while True:
            for path, size in todo.get():
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue  # absent or unreadable: the read itself reports it
                try:
                    window = _readahead_bytes(os.fstat(fd).st_dev)
                    for offset in range(0, size, window):
                        os.posix_fadvise(fd, offset, window, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass  # advice only
                finally:
                    os.close(fd)


_advisor = _Advisor()


_MIN_READAHEAD = 128 * 1024  # the kernel's default read_ahead_kb


@functools.lru_cache(maxsize=None)
def _readahead_bytes(dev: int) -> int:
    """The read-ahead window of the block device holding a file (``read_ahead_kb``), 128 KiB if unknown."""
    major, minor = os.major(dev), os.minor(dev)
    for sysfs in (
        f"/sys/class/bdi/{major}:{minor}/read_ahead_kb",
        f"/sys/dev/block/{major}:{minor}/queue/read_ahead_kb",
        f"/sys/dev/block/{major}:{minor}/../queue/read_ahead_kb",  # a partition: its disk's queue
    ):
        try:
            with open(sysfs) as f:
                return max(_MIN_READAHEAD, int(f.read()) * 1024)
        except (OSError, ValueError):
            continue
    return _MIN_READAHEAD


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

    def read(self, row: int, j: int, out: np.ndarray, uncached: bool = False) -> int:
        """Chunk (row, j) into *out* (an absent chunk reads as zeros); returns the crc32c of its values.

        *uncached* is for local chunk files (:class:`DirectChunks`): here Zarr reads.
        """
        start = j * self.chunk_size
        ahead = self.ahead
        if ahead is not None and ahead.start == start and row in ahead.rows:
            block = ahead.result()
            if block is not None:
                out[:] = block[row - ahead.rows.start]
                if row == ahead.rows[-1]:
                    self.ahead = None
                return crc32c(out)
            self.ahead = None  # the read failed: read again below, for the error's message
        try:
            out[:] = self.array[row, start : start + out.size]
        except ValueError as exc:
            if "checksum" in str(exc):
                raise _Corrupt("fails its crc32c check") from None
            raise
        return crc32c(out)

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
