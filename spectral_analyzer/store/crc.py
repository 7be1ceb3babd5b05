"""crc32c of array buffers, computed with the GIL released.

``google_crc32c.value`` releases the GIL only for ``bytes`` objects; a numpy
buffer (every chunk the band build reads) is checksummed holding it, so
reader threads queue behind one core: two threads measured no faster than
one. The same C library's own entry points (``crc32c_value``,
``crc32c_extend``, shipped inside the google_crc32c wheel) called through
:mod:`ctypes` release the GIL for the whole call, on the caller's buffer,
without a copy. The library is checked against ``google_crc32c`` on a test
vector when it is loaded; where it cannot be found (another platform's
wheel layout, the pure-Python build) the module falls back to
``google_crc32c`` itself, with the same results.
"""

from __future__ import annotations

import ctypes
import glob
import os

import google_crc32c
import numpy as np

__all__ = ["crc32c", "releases_gil"]


def _load():
    """``crc32c_extend`` from the C library the google_crc32c wheel ships, or None."""
    if google_crc32c.implementation != "c":
        return None
    package = os.path.dirname(google_crc32c.__file__)
    patterns = (
        os.path.join(package + ".libs", "libcrc32c*"),  # manylinux (auditwheel)
        os.path.join(package, ".dylibs", "libcrc32c*"),  # macOS (delocate)
        os.path.join(package, "*crc32c*.dll"),  # Windows
    )
    for path in sorted(p for pattern in patterns for p in glob.glob(pattern)):
        try:
            fn = ctypes.CDLL(path).crc32c_extend  # CDLL: ctypes releases the GIL around the call
        except (OSError, AttributeError):
            continue
        fn.argtypes = (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t)
        fn.restype = ctypes.c_uint32
        probe = np.arange(1000, dtype=np.uint8)
        if fn(0, probe.ctypes.data, probe.nbytes) == google_crc32c.value(probe.tobytes()):
            return fn
    return None


_EXTEND = _load()


def releases_gil() -> bool:
    """Whether :func:`crc32c` runs without holding the GIL on this installation."""
    return _EXTEND is not None


def crc32c(data: np.ndarray, crc: int = 0) -> int:
    """crc32c of *data*'s bytes (C order), continuing from *crc* (0: a new checksum).

    Examples
    --------
    >>> crc32c(np.frombuffer(b"123456789", dtype=np.uint8))
    3808858755
    """
    buf = np.ascontiguousarray(data)
    if _EXTEND is None:
        return int(google_crc32c.extend(crc, buf.view(np.uint8).reshape(-1)))
    return int(_EXTEND(crc, buf.ctypes.data, buf.nbytes))
