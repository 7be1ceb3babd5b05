"""The run store: one Zarr v3 group per training run.

This package is the only code that touches Zarr. Its modules, one concern each:

* :mod:`.location`: where a store lives (a folder or an fsspec URL);
* :mod:`.layout`: the format, the manifest and the arrays;
* :mod:`.core`: the :class:`Store` at one commit, the commit protocol;
* :mod:`.generations`: the hash chain that says which rows a cache describes;
* :mod:`.chunks`: reading chunks (through Zarr, or the chunk files directly);
* :mod:`.lock`: one writer at a time;
* :mod:`.writer`: the write transaction (rollback, overwrite swap);
* :mod:`.caches`, :mod:`.coding`, :mod:`.metrics`: the band, results, the
  weight record and the logged series.
"""

from __future__ import annotations

from .core import Store
from .layout import DEFAULT_CHUNK_SIZE, FORMAT_NAME, FORMAT_VERSION, TensorEntry
from .location import Location, is_url
from .lock import writer_lock
from .writer import StoreWriter, unwritable

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Location",
    "Store",
    "StoreWriter",
    "TensorEntry",
    "is_url",
    "unwritable",
    "writer_lock",
]
