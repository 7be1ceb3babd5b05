"""Caches in the store: the band and analysis results.

Every cache records the generation (generations.py) of the rows it was
computed from and becomes visible only through a marker written last, in one
atomic metadata write; anything else (a killed write, a full disk, a missing
or flipped chunk) is not a cache, is recomputed, and is removed at the next
write. Writing a cache needs the writer lock (the caller takes it); readers
never wait for it.

``gram/``: ``band`` float64 (tensor, delta, lag), ``chain`` uint64 (delta,)
the generation of each row, ``row_crc`` uint32 (delta,) the crc32c of each
band row; attributes ``max_lag``, ``n_rows``, ``revision`` (the
RESULTS_REVISION of the build that wrote it: a band of another is no
cache), ``writing`` (set while rows are being replaced) and ``written`` (a
new token at every write), so a reader that saw the attributes change under
it discards what it read.

``results/<name>``: an analysis Dataset (coding.py), with the attribute
``committed = {"identity", "checksums"}`` written last.

The weight spectra recorded at ingest are weight_record.py.
"""

from __future__ import annotations

import contextlib
import errno
import uuid
import warnings

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .._version import RESULTS_REVISION
from ..errors import CacheWarning, StoreBusyError, StoreError
from . import coding
from .chunk_writes import remove_temporaries
from .location import group_keys
from .lock import writer_lock

__all__ = ["BandCache", "ResultCache", "write_if_current"]

_BAND_ROWS = 64  # rows per band chunk
_BAND_CHUNK_BYTES = 1 << 20


def _crc(values: np.ndarray) -> int:
    return int(google_crc32c.value(np.ascontiguousarray(values).tobytes()))


def _subgroup(store, name: str) -> zarr.Group | None:
    """A child group of the store, read fresh (not the snapshot's metadata), or None."""
    try:
        return store.location.open_group("r", path=name)
    except (FileNotFoundError, KeyError, ValueError):
        return None


class BandCache:
    """The cached per-tensor band of a store."""

    def __init__(self, store):
        self.store = store

    def lookup(self, max_lag: int) -> tuple[np.ndarray, int] | None:
        """``(band rows 0..k-1, L)``: the longest cached prefix of the snapshot's rows, with L >= *max_lag*.

        None when nothing usable is cached. The prefix ends at the first row
        whose generation differs from the snapshot's (rows rewritten since)
        or whose values fail their checksum.
        """
        try:
            gram = _subgroup(self.store, "gram")
            if gram is None:
                return None
            before = gram.attrs.asdict()
            if before.get("writing") or before.get("revision") != RESULTS_REVISION or int(before["max_lag"]) < max_lag:
                return None
            if gram["band"].shape[2] != int(before["max_lag"]) + 1:  # attributes that do not describe it
                return None
            n = min(int(before["n_rows"]), self.store.n_deltas)
            cached = np.asarray(gram["chain"][:n])
            if len(cached) != n:  # shorter than the attributes say: its generations cannot be checked
                return None
            mine = self.store.chain[:n]
            k = int(np.argmin(cached == mine)) if n and not (cached == mine).all() else n
            band = np.asarray(gram["band"][:, :k, :])
            crcs = np.asarray(gram["row_crc"][:k])
            after = _subgroup(self.store, "gram").attrs.asdict()
        except Exception:  # noqa: BLE001 -- a damaged or half-replaced cache is no cache
            return None
        if after != before or band.shape[1] != k or len(crcs) != k:  # arrays shorter than the attributes say
            return None
        for i in range(k):
            if _crc(band[:, i, :]) != int(crcs[i]):
                k = i
                break
        return band[:, :k, :], int(before["max_lag"])

    def write(self, rows: np.ndarray, start: int, max_lag: int, meta: dict) -> None:
        """Band rows ``start..`` of the snapshot's rows, committed last (the writer lock is held)."""
        n_tensors, n_new, n_lags = rows.shape
        group = self.store.group
        n = start + n_new
        try:
            gram = group["gram"] if "gram" in group else None
            if gram is not None:
                attrs = gram.attrs.asdict()
                lag, rows_there = int(attrs.get("max_lag", -1)), int(attrs.get("n_rows", 0))
                usable = not attrs.get("writing") and attrs.get("revision") == RESULTS_REVISION
                mine = self.store.chain[:n]
                same = (usable and rows_there >= len(mine)
                        and np.array_equal(np.asarray(gram["chain"][: len(mine)]), mine))
                if start == 0 and same and lag >= max_lag:
                    return  # another writer cached these rows already, at this L or more: kept
                if start > 0:
                    head = self.store.chain[:start]
                    if not (usable and lag == max_lag and rows_there >= start
                            and np.array_equal(np.asarray(gram["chain"][:start]), head)):
                        return  # not the prefix these rows extend (another writer replaced it): left as it is
                else:
                    gram = None
        except OSError:  # the store cannot be written (see Store.cache)
            raise
        except Exception:  # noqa: BLE001 -- unreadable metadata: not a cache
            gram = None
        if gram is None and start > 0:
            return  # rows start.. alone are no cache
        if gram is None:
            del group["gram"]  # an older band, or what a killed or damaged write left (nothing is fine)
            per_tensor = _BAND_ROWS * n_lags * 8
            tc = max(1, min(n_tensors, _BAND_CHUNK_BYTES // per_tensor))
            gram = group.create_group("gram", attributes={"max_lag": max_lag, "n_rows": 0, "writing": False})
            gram.create_array(
                "band", shape=(n_tensors, 0, n_lags), chunks=(tc, _BAND_ROWS, n_lags), dtype="float64",
                fill_value=np.nan, compressors=[ZstdCodec(level=1), Crc32cCodec()],
                dimension_names=("tensor", "delta", "lag"),
            )
            for name, dtype in (("chain", "uint64"), ("row_crc", "uint32")):
                gram.create_array(name, shape=(0,), chunks=(4096,), dtype=dtype, fill_value=0,
                                  compressors=[Crc32cCodec()], dimension_names=("delta",))
        else:
            gram.attrs.put({**gram.attrs.asdict(), "n_rows": start, "writing": True})
        gram["band"].resize((n_tensors, n, n_lags))
        gram["chain"].resize((n,))
        gram["row_crc"].resize((n,))
        gram["band"][:, start:n, :] = rows
        gram["chain"][start:n] = self.store.chain[start:n]
        gram["row_crc"][start:n] = np.array([_crc(rows[:, i, :]) for i in range(n_new)], dtype=np.uint32)
        # a new token each write: a reader whose attributes before and after its reads are equal read no write's rows
        gram.attrs.put({**gram.attrs.asdict(), "max_lag": max_lag, "n_rows": n, "writing": False, **meta,
                        "revision": RESULTS_REVISION, "written": uuid.uuid4().hex})


class ResultCache:
    """Cached analysis Datasets, keyed by what made them and the generation of the rows."""

    def __init__(self, store):
        self.store = store

    def read(self, name: str, identity: str):
        """The cached Dataset *name* made from rows of generation *identity*, or None."""
        import xarray as xr

        try:
            group = _subgroup(self.store, f"results/{name}")
            if group is None:
                return None
            committed = group.attrs.get("committed")
            if not committed or committed.get("identity") != identity:
                return None
            with warnings.catch_warnings():  # a member whose metadata is damaged: zarr skips it with a warning
                warnings.filterwarnings("ignore", message=r"Object at \S+ is not recognized")
                ds = xr.open_zarr(self.store.group.store, group=f"results/{name}", consolidated=False).load()
            ds.attrs.pop("committed", None)
            ds = coding.decode(ds)
            if {k: int(v) for k, v in committed["checksums"].items()} != coding.checksums(ds):
                return None
            # in the order computed: zarr lists the members in the folder's order, and exports keep this one
            ds = xr.Dataset({k: ds.variables[k] for k in committed["order"]["data_vars"]},
                            coords={k: ds.variables[k] for k in committed["order"]["coords"]}, attrs=ds.attrs)
        except Exception:  # noqa: BLE001 -- a damaged or partial result is no result: computed again
            return None
        return ds

    def write(self, name: str, ds, identity: str) -> None:
        """Cache *ds* (the writer lock is held): results of other generations and partial ones go first."""
        group = self.store.group
        try:
            results = group["results"] if "results" in group else group.create_group("results")
            with warnings.catch_warnings():  # a folder a killed write left without its metadata: removed below
                warnings.filterwarnings("ignore", message=r"Object at \S+ is not recognized")
                keys = group_keys(results)
            stale = [key for key in keys
                     if key == name or (results[key].attrs.get("committed") or {}).get("identity") != identity]
        except OSError:  # the store cannot be written (see Store.cache)
            raise
        except Exception:  # noqa: BLE001 -- unreadable metadata: no result there can be read, all go
            del group["results"]
            results, keys, stale = group.create_group("results"), [], []
        for key in stale:
            del results[key]
        self._remove_leftovers(set(keys) - set(stale))
        encoded = coding.encode(ds)
        encoded.to_zarr(group.store, group=f"results/{name}", mode="w", consolidated=False, zarr_format=3)
        marker = {"identity": identity, "checksums": coding.checksums(ds),
                  "order": {"data_vars": list(ds.data_vars), "coords": list(ds.coords)}}
        written = self.store.location.open_group("r+", path=f"results/{name}")
        written.attrs.put({**written.attrs.asdict(), "committed": marker})

    def _remove_leftovers(self, keep: set[str]) -> None:
        """Remove from ``results/`` what is neither its metadata nor a result in *keep*: what killed writes left
        (a result's folder whose metadata was never written, zarr's temporary files). The writer lock is held."""
        fs, root = self.store.location.filesystem()
        folder = f"{root}/results"
        fs.invalidate_cache(folder)
        for entry in fs.ls(folder, detail=False):
            if entry.rstrip("/").rsplit("/", 1)[-1] not in (*keep, "zarr.json"):
                fs.rm(entry, recursive=True)


def write_if_current(snapshot, write) -> bool:
    """Run ``write(store)`` under the writer lock on the store of *snapshot*, opened for writing, if still current.

    See :meth:`~spectral_analyzer.store.core.Store.cache`.
    """
    try:
        with writer_lock(snapshot.location, False):
            current = type(snapshot).open(snapshot.location, mode="r+", verify=False)
            if current.identity != snapshot.identity or current.attrs.get("metrics") != snapshot.attrs.get("metrics"):
                return False
            current._chain, current._steps, current._crcs = snapshot._chain, snapshot._steps, snapshot._crcs
            write(current)
            if not current.is_remote:  # what killed cache writes left (zarr rewrites the root's too); one that
                with contextlib.suppress(OSError):  # cannot be removed stays for the next writer: it is cached
                    remove_temporaries(current.path, ("gram", "results"))
            return True
    except StoreBusyError:
        return False
    except (OSError, StoreError) as exc:
        cause = exc if isinstance(exc, OSError) else exc.__context__  # the lock's StoreError wraps an OSError
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
        lasting = isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        if (snapshot.path, reason) not in _TOLD:  # a read-only store: once a store and process, not at every cache
            if lasting:
                _TOLD.add((snapshot.path, reason))
            warnings.warn(f"{snapshot.path}: computed without caching: the store cannot be written ({reason})",
                          CacheWarning, stacklevel=4)
        return False


_TOLD: set[tuple[str, str]] = set()  # (store, reason) of the read-only stores told so
