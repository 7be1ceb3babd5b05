"""Reading past the page cache: ``O_DIRECT`` for what the cache does not hold.

A read that fills the page cache is not free: on the 2-core machine of
docs/performance.md a cold buffered read of 16 MiB chunk files cost about
1.2 s of kernel CPU per GB (allocating and filling the cache, then copying)
and reached 0.46 GB/s from one thread, against 0.09 s per GB and 1.09 GB/s
with ``O_DIRECT``, which lands the data in the caller's buffer. A reader
that reads each chunk once (the band build) loses nothing by leaving the
cache as it was, and the CPU it saves is the kernel's.

What the cache does hold (a store just written, a second build) is read from
it: how much of the file it holds from the start is asked with ``mincore``
on a mapping of the file, which reads nothing. (``preadv2(RWF_NOWAIT)``
would be simpler, but on a miss it starts the cache's own read-ahead before
returning ``EAGAIN``: the file is then read twice.) ``O_DIRECT`` needs the
buffers, the offset and the lengths on :data:`ALIGN` boundaries; a file
system that refuses it (tmpfs, some network file systems) is read as usual.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os

import numpy as np

__all__ = ["ALIGN", "aligned_zeros", "cached_prefix", "read_file"]

ALIGN = 4096  # bytes: O_DIRECT buffers, offsets and lengths are multiples of this

_O_DIRECT = getattr(os, "O_DIRECT", 0)


def aligned_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on an :data:`ALIGN` boundary.

    Large zeroed allocations are lazily zeroed pages: memory is used as it is written.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


@functools.lru_cache(maxsize=1)
def _libc():
    """libc's mmap, munmap and mincore, or None where they cannot be called."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def cached_prefix(fd: int, size: int) -> int | None:
    """Bytes from the start of the file that the page cache holds (whole pages), None where unknown."""
    libc = _libc()
    if libc is None or size <= 0:
        return None
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(addr, size, vec) != 0:
            return None
        resident = np.frombuffer(vec, dtype=np.uint8) & 1
        missing = np.flatnonzero(resident == 0)
        return size if missing.size == 0 else int(missing[0]) * mmap.PAGESIZE
    finally:
        libc.munmap(addr, size)


class read_file:  # noqa: N801 -- used as a function; the class keeps one flag per reader
    """Read a file into *buffers* from the start: the cached part through the cache, the rest with ``O_DIRECT``.

    ``read_file()(path, buffers)`` returns the bytes read; raises
    FileNotFoundError where the file is absent. Every buffer must start on
    an :data:`ALIGN` boundary and all but the last be a multiple of it long.
    Once the file system refuses ``O_DIRECT`` (EINVAL) this reader reads
    through the cache from then on (:attr:`direct`).
    """

    def __init__(self):
        self.direct = bool(_O_DIRECT) and hasattr(os, "preadv")

    def __call__(self, path: str, buffers: list[np.ndarray]) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            cached = cached_prefix(fd, size) if self.direct else size
            cached = size if cached is None else cached
            head = _split(buffers, cached // ALIGN * ALIGN)
            got = _preadv(fd, head[0], 0) if head[0] else 0
        finally:
            os.close(fd)
        done = sum(b.size for b in head[0])
        if got < done or not head[1]:
            return got  # the end of the file came first
        return got + self._direct_read(path, head[1], done)

    def _direct_read(self, path: str, buffers: list[np.ndarray], offset: int) -> int:
        if self.direct:
            try:
                fd = os.open(path, os.O_RDONLY | _O_DIRECT)
                try:
                    return _preadv(fd, buffers, offset)
                finally:
                    os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # tmpfs, some network file systems, a device with larger logical blocks
        fd = os.open(path, os.O_RDONLY)
        try:
            return _preadv(fd, buffers, offset)
        finally:
            os.close(fd)


def _split(buffers: list[np.ndarray], at: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """*buffers* as views before and after byte *at* of their concatenation."""
    before, after, pos = [], [], 0
    for b in buffers:
        b = b.reshape(-1).view(np.uint8)
        cut = min(max(at - pos, 0), b.size)
        if cut:
            before.append(b[:cut])
        if cut < b.size:
            after.append(b[cut:])
        pos += b.size
    return before, after


def _preadv(fd: int, buffers: list[np.ndarray], offset: int) -> int:
    """One ``preadv``: on a local file it returns less than asked only at the end of the file."""
    return os.preadv(fd, buffers, offset)
