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
  weight record and the logged series;
* :mod:`.summary`: what a store holds, from its root metadata alone (no Zarr).
"""

from __future__ import annotations

import importlib

from .layout import DEFAULT_CHUNK_SIZE, FORMAT_NAME, FORMAT_VERSION, TensorEntry

# Imported on first use: these import zarr (the layout's constants do not).
_LAZY = {"Store": ".core", "Location": ".location", "is_url": ".location", "writer_lock": ".lock",
         "StoreWriter": ".writer", "unwritable": ".writer", "aligned_zeros": ".direct_io"}

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Location",
    "Store",
    "StoreWriter",
    "TensorEntry",
    "aligned_zeros",
    "is_url",
    "unwritable",
    "writer_lock",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
