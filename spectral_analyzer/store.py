"""The run store: one Zarr v3 group per training run.

This is the only module that touches Zarr. Layout::

    run.zarr/
      deltas      float32 (delta, param)  chunks (1, C), crc32c-checked
      base        float32 (param,)        theta at the first checkpoint
      last_theta  float32 (slot, param)   theta at the last committed checkpoint
      step        int64   (delta,)        end step of each delta
      metrics/    step-indexed float64 series, coordinate ``step``

A store is a local folder or an fsspec URL (``s3://bucket/run.zarr``,
``gs://...``, ``memory://...``) opened with the filesystem's
``storage_options``; everything below works the same on both.

Root attributes hold the format version, the tensor manifest, the sources of
every checkpoint (size, mtime, sha256) and the commit record. A delta row
counts only once the commit record says so: the array shape grows before any
data is written, and an all-zero chunk is legitimately absent, so neither
shape nor chunk presence says anything about progress.

``last_theta`` has two slots so that appending never needs the older
checkpoint files (HF Trainer deletes them): an ingest writes the newest theta
into the slot the commit record does not point at, then flips it in the same
attribute write that commits the row.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .errors import StoreError, StoreVersionError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Store",
    "TensorEntry",
    "is_url",
]

FORMAT_NAME = "spectral-analyzer"
FORMAT_VERSION = 1
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024  # elements per chunk of a delta row (16 MiB)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's slice of the flattened parameter vector."""

    name: str
    offset: int
    size: int
    shape: tuple[int, ...]
    dtype: str  # dtype in the source checkpoint, e.g. "bfloat16"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorEntry:
        return cls(d["name"], int(d["offset"]), int(d["size"]), tuple(d["shape"]), d["dtype"])


def is_url(path: str | os.PathLike) -> bool:
    """Whether *path* is an fsspec URL of a remote filesystem (``file://`` counts as local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _local(path: str | os.PathLike) -> str:
    text = str(path)
    return text.removeprefix("file://")


def _filesystem(path: str, storage_options: Mapping[str, Any] | None):
    """``(fsspec filesystem, path inside it)`` of a URL; a bucket itself is refused."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
    except ImportError as exc:  # the protocol's package (s3fs, gcsfs, ...) is not installed
        raise StoreError(f"{path}: {exc}") from None
    if fs.root_marker == "" and "/" not in root.strip("/"):
        # object stores: creating or replacing a store there would create or delete the bucket
        raise StoreError(f"{path}: a store needs a name inside the bucket, e.g. {path.rstrip('/')}/run.zarr")
    return fs, root


_NOT_A_STORE = (FileNotFoundError, NotADirectoryError, ValueError)  # zarr's not-found and bad-metadata errors


def _unreachable(path: str, exc: BaseException) -> StoreError:
    """A store that could not be read or listed: credentials, permissions, the network."""
    return StoreError(f"{path}: cannot access the store ({type(exc).__name__}: {' '.join(str(exc).split())})")


def _data_array(group: zarr.Group, name: str, shape, chunks, dims) -> None:
    group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype="float32",
        fill_value=0.0,
        compressors=[Crc32cCodec()],
        dimension_names=dims,
    )


class Store:
    """A run's Zarr group, with the commit protocol of the ingest.

    Parameters
    ----------
    group : zarr.Group
        The root group, opened without consolidated metadata.
    path : str
        Where it lives: a local path or an fsspec URL.
    storage_options : dict, optional
        The fsspec filesystem's options for a URL (credentials, endpoint).
    """

    def __init__(self, group: zarr.Group, path: str, storage_options: Mapping[str, Any] | None = None):
        self.group = group
        self.path = path if is_url(path) else _local(path)
        self.storage_options = dict(storage_options) if storage_options else None
        self._arrays: dict[str, zarr.Array] = {}
        self._direct: str | None = None
        self._ahead: _ReadAhead | None = None

    @property
    def is_remote(self) -> bool:
        return is_url(self.path)

    def _writable(self) -> zarr.Group:
        """The group opened for writing (caches are written into read-only opened stores too)."""
        if self.group.read_only:
            self.group = _open_group(self.path, "r+", self.storage_options)
            self._arrays.clear()
        return self.group

    # -- the location ---------------------------------------------------------

    @staticmethod
    def occupied(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
        """Whether anything (a file, a non-empty folder or prefix) is at *path*."""
        try:
            if not is_url(path):
                p = Path(_local(path))
                return p.exists() and (p.is_file() or any(p.iterdir()))
            fs, root = _filesystem(str(path), storage_options)
            try:
                return bool(fs.isfile(root) or fs.ls(root, detail=False))
            except FileNotFoundError:
                return False
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 -- fsspec backends raise their own types (botocore's)
            raise _unreachable(str(path), exc) from None

    @staticmethod
    def remove(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
        """Delete whatever is at *path* (nothing there is fine)."""
        if not is_url(path):
            p = Path(_local(path))
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
            return
        fs, root = _filesystem(str(path), storage_options)
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(root)

    @staticmethod
    def replace(src: str | os.PathLike, dst: str | os.PathLike,
                storage_options: Mapping[str, Any] | None = None) -> None:
        """Put the store at *src* in the place of the one at *dst*.

        Locally a rename, atomic per step. Object stores have no rename: the
        old store's root metadata goes first (what is left of it is no longer
        a store), then the rest of it; the new store is copied object by
        object (server side, O(store size) requests), its root metadata (the
        commit record) last, once every other object is there; then the
        copy at *src* is deleted. Interrupted, *src* is still complete and
        *dst* is either the new store or not a store at all.
        """
        if not is_url(dst):
            src, dst = _local(src), _local(dst)
            old = dst.rstrip("/") + ".overwrite-old"
            shutil.rmtree(old, ignore_errors=True)
            if os.path.exists(dst):
                os.replace(dst, old)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
            return
        fs, src_root = _filesystem(str(src), storage_options)
        _, dst_root = _filesystem(str(dst), storage_options)
        src_root, dst_root = src_root.rstrip("/"), dst_root.rstrip("/")
        try:
            fs.rm_file(f"{dst_root}/zarr.json")
        except FileNotFoundError:
            pass
        Store.remove(dst, storage_options)
        objects = [p for p in fs.find(src_root) if p != f"{src_root}/zarr.json"]
        targets = [dst_root + p[len(src_root):] for p in objects]
        fs.copy(objects, targets, on_error="raise")
        fs.copy(f"{src_root}/zarr.json", f"{dst_root}/zarr.json", on_error="raise")
        Store.remove(src, storage_options)
        fs.invalidate_cache()

    @staticmethod
    def exists(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> bool:
        """Whether *path* holds a Zarr group written by this package."""
        try:
            group = _open_group(str(path), "r", storage_options)
        except _NOT_A_STORE:  # nothing there, an array, other files, bad metadata
            return False
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 -- no credentials, no permission, no network: not "no store"
            raise _unreachable(str(path), exc) from None
        return group.attrs.get("format") == FORMAT_NAME

    @classmethod
    def open(
        cls, path: str | os.PathLike, mode: str = "r", storage_options: Mapping[str, Any] | None = None
    ) -> Store:
        """Open an existing store, refusing unknown format versions."""
        path = str(path)
        if not Store.occupied(path, storage_options):
            raise StoreError(f"{path}: no store here (run `spectral-analyze ingest CKPT_DIR -o {path}` first)")
        try:
            group = _open_group(path, mode, storage_options)
        except _NOT_A_STORE as exc:  # zarr raises several types for a non-group path
            raise StoreError(f"{path}: not a spectral-analyzer store ({exc})") from None
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 -- credentials, permissions, the network
            raise _unreachable(path, exc) from None
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{path}: not a spectral-analyzer store (no '{FORMAT_NAME}' format attribute)")
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreVersionError(
                f"{path}: store format version {version!r} is not one this version of "
                f"spectral-analyzer reads (it reads version {FORMAT_VERSION}); upgrade the package"
            )
        return cls(group, path, storage_options)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        manifest: Sequence[TensorEntry],
        chunk_size: int,
        attrs: Mapping[str, Any],
        storage_options: Mapping[str, Any] | None = None,
    ) -> Store:
        """Create an empty store: arrays sized for no deltas, no commit yet."""
        path = str(path)
        n_params = sum(t.size for t in manifest)
        if n_params == 0:
            raise StoreError(f"{path}: the checkpoints hold no floating-point tensors to store")
        chunk = min(int(chunk_size), n_params)
        # The attributes go in with the group, in one write: a store killed
        # while its arrays are being made is still recognisable (and has no commit).
        group = zarr.create_group(
            _store_like(path, "w", storage_options),
            overwrite=True,
            attributes={
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "n_params": n_params,
                "chunk_size": chunk,
                "tensors": [t.to_json() for t in manifest],
                "commit": None,
                "sources": [],
                "warnings": [],
                **attrs,
            },
        )
        _data_array(group, "deltas", (0, n_params), (1, chunk), ("delta", "param"))
        _data_array(group, "base", (n_params,), (chunk,), ("param",))
        _data_array(group, "last_theta", (2, n_params), (1, chunk), ("slot", "param"))
        group.create_array(
            "step", shape=(0,), chunks=(4096,), dtype="int64", fill_value=-1, dimension_names=("delta",)
        )
        return cls(group, path, storage_options)

    # -- what is committed ----------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    @property
    def commit_record(self) -> dict[str, Any] | None:
        """``{"n_deltas", "last_slot", "last_step"}`` or None before the base is committed."""
        return self.attrs.get("commit")

    @property
    def n_deltas(self) -> int:
        record = self.commit_record
        return 0 if record is None else int(record["n_deltas"])

    @property
    def n_params(self) -> int:
        return int(self.group.attrs["n_params"])

    @property
    def chunk_size(self) -> int:
        return int(self.group.attrs["chunk_size"])

    @property
    def manifest(self) -> list[TensorEntry]:
        return [TensorEntry.from_json(t) for t in self.attrs["tensors"]]

    @property
    def sources(self) -> list[dict[str, Any]]:
        """One entry per committed checkpoint, base first: ``{"step", "files"}``."""
        record = self.commit_record
        if record is None:
            return []
        return self.attrs["sources"][: int(record["n_deltas"]) + 1]

    @property
    def checkpoint_steps(self) -> np.ndarray:
        return np.array([s["step"] for s in self.sources], dtype=np.int64)

    @property
    def steps(self) -> np.ndarray:
        """End step of each committed delta."""
        return np.asarray(self.array("step")[: self.n_deltas], dtype=np.int64)

    def array(self, name: str) -> zarr.Array:
        """A top-level array, opened once (its metadata is read once per Store)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def chunk_bounds(self) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each parameter chunk."""
        c, p = self.chunk_size, self.n_params
        for start in range(0, p, c):
            yield start, min(start + c, p)

    # -- writing --------------------------------------------------------------

    def reserve_rows(self, n_rows: int) -> None:
        """Size ``deltas`` and ``step`` for *n_rows* rows (data follows, commit after)."""
        self.array("deltas").resize((n_rows, self.n_params))
        self.array("step").resize((n_rows,))
        if "weights" in self.group:
            sigma = self.group["weights"]["sigma"]
            sigma.resize((n_rows + 1, *sigma.shape[1:]))

    def write_chunk(self, name: str, row: int | None, start: int, data: np.ndarray) -> None:
        """Write one whole chunk of array *name* (row ``None`` for the 1-D ``base``)."""
        arr = self.array(name)
        if row is None:
            arr[start : start + data.shape[0]] = data
        else:
            arr[row, start : start + data.shape[0]] = data

    def write_step(self, row: int, step: int) -> None:
        self.array("step")[row] = step

    def commit(self, **updates: Any) -> None:
        """Update root attributes in one atomic write of the group's metadata."""
        attrs = self.attrs
        attrs.update(updates)
        self.group.attrs.put(attrs)

    def restore(self, attrs: Mapping[str, Any]) -> None:
        """Return to a snapshot of the attributes, dropping rows it did not commit."""
        n = 0 if attrs.get("commit") is None else int(attrs["commit"]["n_deltas"])
        step = self.array("step")
        if step.shape[0] > n:  # a step chunk holds several rows: clear the ones going
            step[n:] = step.fill_value
        self.reserve_rows(n)
        self.group.attrs.put(dict(attrs))

    def truncate(self, n_deltas: int) -> None:
        """Keep the first *n_deltas* committed rows (and their checkpoints) only.

        ``last_theta`` then holds no committed checkpoint (its step is no
        longer the last one), so an append needs the checkpoint at the new
        last step, or a recorder's own snapshot of it.
        """
        attrs = self.attrs
        record = attrs["commit"]
        attrs["commit"] = {**record, "n_deltas": int(n_deltas)}
        attrs["sources"] = attrs["sources"][: int(n_deltas) + 1]
        self.restore(attrs)

    # -- weight spectra recorded at ingest -------------------------------------

    def create_weight_record(self, match: Sequence[str], matrices: Sequence[str], rank: int) -> None:
        """``weights/sigma`` float64 (checkpoint, matrix, rank), one chunk per checkpoint."""
        weights = self.group.create_group("weights")
        weights.create_array(
            "sigma", shape=(0, len(matrices), rank), chunks=(1, len(matrices), rank), dtype="float64",
            fill_value=np.nan, compressors=[Crc32cCodec()], dimension_names=("checkpoint", "matrix", "rank"),
        )
        weights.attrs.put({"match": list(match), "matrices": list(matrices)})

    def weight_record(self) -> tuple[list[str], list[str], int] | None:
        """``(match, matrices, rank)`` of the weight spectra recorded at ingest, or None."""
        if "weights" not in self.group:
            return None
        weights = self.group["weights"]
        attrs = weights.attrs
        return list(attrs["match"]), list(attrs["matrices"]), int(weights["sigma"].shape[-1])

    def write_weight_row(self, index: int, sigma: np.ndarray) -> None:
        """Singular values of checkpoint *index* (0 = base), before its commit."""
        array = self.group["weights"]["sigma"]
        if array.shape[0] <= index:
            array.resize((index + 1, *array.shape[1:]))
        array[index] = sigma

    def read_weight_record(self) -> np.ndarray:
        """Recorded singular values of the committed checkpoints (checkpoint, matrix, rank)."""
        return np.asarray(self.group["weights"]["sigma"][: self.n_deltas + 1])

    # -- metrics --------------------------------------------------------------

    def write_metrics(self, steps: np.ndarray, series: Mapping[str, np.ndarray]) -> None:
        """Replace the ``metrics`` group with step-indexed float64 series."""
        if "metrics" in self.group:
            del self.group["metrics"]
        metrics = self.group.create_group("metrics")
        metrics.create_array(
            "step", data=np.asarray(steps, dtype=np.int64), dimension_names=("step",)
        )
        names = {}
        for name, values in series.items():
            key = name.replace("/", ".")
            names[key] = name
            metrics.create_array(
                key, data=np.asarray(values, dtype=np.float64), dimension_names=("step",), fill_value=np.nan
            )
        metrics.attrs.put({"names": names})

    def read_metrics(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if "metrics" not in self.group:
            return np.zeros(0, dtype=np.int64), {}
        metrics = self.group["metrics"]
        steps = np.asarray(metrics["step"][:], dtype=np.int64)
        names = metrics.attrs.get("names", {})
        series = {names.get(k, k): np.asarray(metrics[k][:]) for k in sorted(names)}
        return steps, series

    # -- reading --------------------------------------------------------------

    def read_delta_row(self, row: int, start: int, stop: int) -> np.ndarray:
        """float32 ``deltas[row, start:stop]`` (one chunk when aligned)."""
        try:
            return np.asarray(self.array("deltas")[row, start:stop])
        except ValueError as exc:
            if "checksum" not in str(exc):
                raise
            c = self.chunk_size
            for j in range(start // c, (stop - 1) // c + 1):  # which chunk of the span
                try:
                    self.array("deltas")[row, j * c]
                except ValueError:
                    raise self._corrupt(row, str(j)) from None
            raise

    def _corrupt(self, row: int, chunk: str) -> StoreError:
        return StoreError(
            f"{self.path}: chunk {row}/{chunk} of deltas (the delta ending at step {int(self.array('step')[row])}) "
            "fails its crc32c check: the file is corrupted"
        )

    def read_delta_chunk(self, row: int, start: int, out: np.ndarray) -> None:
        """Read the chunk of ``deltas`` at (row, start) into *out* (float32, its length).

        On a local store the chunk file is read straight into *out* and its
        crc32c checked, with no intermediate buffers: Zarr's own read path
        costs more than the disk here. Elsewhere Zarr reads it.
        """
        direct = self._direct_chunks()
        if direct is None:
            ahead = self._ahead
            if ahead is not None and ahead.start == start and row in ahead.rows:
                block = ahead.result()
                if block is not None:
                    out[:] = block[row - ahead.rows.start]
                    if row == ahead.rows[-1]:
                        self._ahead = None
                    return
                self._ahead = None  # the read failed: read again below, for the error's message
            out[:] = self.read_delta_row(row, start, start + out.size)
            return
        j = start // self.chunk_size
        path = os.path.join(direct, str(row), str(j))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            out[:] = 0.0  # a chunk equal to the fill value is not written
            return
        crc = np.empty(4, dtype=np.uint8)
        full = self.chunk_size  # chunks on disk are whole, the last one padded
        try:
            if out.size == full:
                got = os.preadv(fd, [out.view(np.uint8), crc], 0)
            else:
                tmp = np.empty(full * 4, dtype=np.uint8)
                got = os.preadv(fd, [out.view(np.uint8), tmp[out.size * 4 :], crc], 0)
                tmp[: out.size * 4] = out.view(np.uint8)
        finally:
            os.close(fd)
        if got != full * 4 + 4:
            raise StoreError(f"{self.path}: chunk {row}/{j} of deltas is truncated ({got} bytes)")
        data = out.view(np.uint8) if out.size == full else tmp
        if google_crc32c.value(data) != int.from_bytes(crc.tobytes(), "little"):
            raise self._corrupt(row, str(j))

    def prefetch_delta_chunks(self, rows: range, start: int) -> None:
        """Start reading these chunks (consecutive rows, one column chunk) now.

        Locally the OS is asked to (``posix_fadvise(WILLNEED)``), costing no
        memory. From object storage, whose latency is per request, the rows'
        chunks are fetched concurrently in the background into one block
        (``len(rows)`` chunks of memory) that :meth:`read_delta_chunk` then serves.
        """
        direct = self._direct_chunks()
        if direct is None:
            if self.is_remote and len(rows):
                stop = min(start + self.chunk_size, self.n_params)
                self._ahead = _ReadAhead(self.array("deltas"), rows, start, stop)
            return
        if not hasattr(os, "posix_fadvise"):
            return
        j = start // self.chunk_size
        for row in rows:
            try:
                fd = os.open(os.path.join(direct, str(row), str(j)), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _direct_chunks(self) -> str | None:
        """The folder of the delta chunk files when they can be read directly."""
        if self._direct is None:
            arr = self.array("deltas")
            meta = arr.metadata
            codecs = tuple(type(c).__name__ for c in meta.codecs)
            ok = (
                isinstance(self.group.store, zarr.storage.LocalStore)
                and codecs == ("BytesCodec", "Crc32cCodec")
                and getattr(meta.codecs[0], "endian", None) is not None
                and meta.codecs[0].endian.value == sys.byteorder
                and getattr(meta.chunk_key_encoding, "name", "") == "default"
                and meta.chunk_key_encoding.separator == "/"
            )
            self._direct = os.path.join(str(self.group.store.root), "deltas", "c") if ok else ""
        return self._direct or None

    def read_base(self, start: int, stop: int) -> np.ndarray:
        """float32 ``base[start:stop]`` (theta at the first checkpoint)."""
        return np.asarray(self.array("base")[start:stop])

    # -- the band cache ---------------------------------------------------------

    def band_info(self) -> dict[str, Any] | None:
        """``{"max_lag", "n_rows", "steps"}`` of the cached band, or None."""
        if "gram" not in self.group:
            return None
        gram = self.group["gram"]
        attrs = gram.attrs.asdict()
        n = int(attrs.get("n_rows", 0))
        return {"max_lag": int(attrs["max_lag"]), "n_rows": n, "steps": np.asarray(gram["step"][:n])}

    def read_band(self) -> np.ndarray:
        """The cached per-tensor band, float64 (tensor, delta, lag), committed rows."""
        gram = self.group["gram"]
        n = int(gram.attrs["n_rows"])
        return np.asarray(gram["band"][:, :n, :])

    def write_band(self, rows: np.ndarray, start: int, max_lag: int, steps: np.ndarray, meta: Mapping[str, Any]) -> None:
        """Write band rows ``start..`` (a fresh cache when ``start == 0``), then commit them."""
        n_tensors, n_new, n_lags = rows.shape
        group = self._writable()
        if start == 0:
            if "gram" in group:
                del group["gram"]
            gram = group.create_group("gram")
            gram.create_array(
                "band", shape=(n_tensors, 0, n_lags), chunks=(min(n_tensors, 256), 256, n_lags), dtype="float64",
                fill_value=np.nan, compressors=[Crc32cCodec()], dimension_names=("tensor", "delta", "lag"),
            )
            gram.create_array("step", shape=(0,), chunks=(4096,), dtype="int64", fill_value=-1,
                              dimension_names=("delta",))
            gram.attrs.put({"max_lag": max_lag, "n_rows": 0, **meta})
        gram = group["gram"]
        n = start + n_new
        gram["band"].resize((n_tensors, n, n_lags))
        gram["step"].resize((n,))
        gram["band"][:, start:n, :] = rows
        gram["step"][start:n] = steps[start:n]
        gram.attrs.put({**gram.attrs.asdict(), "n_rows": n, **meta})

    # -- cached results ---------------------------------------------------------

    def read_result(self, name: str):
        """A cached analysis Dataset, or None."""
        import xarray as xr

        if "results" not in self.group or name not in self.group["results"]:
            return None
        ds = xr.open_zarr(self.group.store, group=f"results/{name}", consolidated=False).load()
        strings = ds.attrs.pop("string_variables", {})
        for key, v in strings.items():
            values = (v["dims"], np.array(v["values"], dtype=str))
            if v["coord"]:
                ds = ds.assign_coords({key: values})
            else:
                ds[key] = values
        return ds

    def cache_result(self, name: str, ds) -> None:
        """:meth:`write_result`, skipped where the store cannot be written (read-only media)."""
        try:
            self.write_result(name, ds)
        except OSError:
            pass

    def write_result(self, name: str, ds) -> None:
        """Cache an analysis Dataset under ``results/<name>`` (replacing it)."""
        group = self._writable()
        if "results" not in group:
            group.create_group("results")
        # Zarr v3 has no specified string dtype: string variables travel as an attribute.
        strings = {
            k: {"dims": list(ds[k].dims), "values": [str(x) for x in ds[k].values], "coord": k in ds.coords}
            for k in ds.variables
            if ds[k].dtype.kind in "USO"
        }
        out = ds.drop_vars(list(strings))
        out.attrs = {**ds.attrs, "string_variables": strings}
        out.to_zarr(group.store, group=f"results/{name}", mode="w", consolidated=False, zarr_format=3)

    def size_on_disk(self) -> int:
        """Bytes under the store's folder (or URL prefix)."""
        if self.is_remote:
            fs, root = _filesystem(self.path, self.storage_options)
            return int(fs.du(root, total=True))
        total = 0
        for root, _dirs, files in os.walk(_local(self.path)):
            for f in files:
                total += os.path.getsize(os.path.join(root, f))
        return total


class _ReadAhead:
    """``deltas[rows, start:stop]`` read in a background thread (Zarr fetches the chunks concurrently)."""

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


def _store_like(path: str, mode: str, storage_options: Mapping[str, Any] | None):
    """What zarr opens: a local path as is, a URL as an fsspec store with its options."""
    if not is_url(path):
        return _local(path)
    _filesystem(path, storage_options)  # refuses a bucket itself, names a missing backend package
    try:
        return zarr.storage.FsspecStore.from_url(path, storage_options=dict(storage_options or {}), read_only=mode == "r")
    except ImportError as exc:  # the protocol's package (s3fs, gcsfs, ...) is not installed
        raise StoreError(f"{path}: {exc}") from None


def _open_group(path: str, mode: str, storage_options: Mapping[str, Any] | None) -> zarr.Group:
    return zarr.open_group(_store_like(path, mode, storage_options), mode=mode, use_consolidated=False)
