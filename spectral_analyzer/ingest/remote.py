"""Checkpoint folders at fsspec URLs (``s3://``, ``gs://``, ``memory://``, ...).

The folder is listed through its fsspec filesystem and read by discover.py's
layout rules, as a local folder is. A safetensors file is read by byte range
(``cat_file(path, start, end)``: one ranged request per tensor on object
stores); a pickle is downloaded into the source's workspace (see
sources.py). The filesystem takes the same ``storage_options`` as a store
at a URL (store/location.py).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SourceError, printable
from .discover import Checkpoint, discover
from .sources import RemoteFile, RemoteFolder, Source, Workspace, one_line, retrying

__all__ = ["FsspecSource"]

# What an fsspec backend's info() may hold that changes when an object is replaced (S3, GCS, Azure, memory).
VERSION_KEYS = ("ETag", "etag", "VersionId", "generation", "md5Hash", "crc32c", "content_md5", "LastModified",
                "last_modified", "updated", "mtime", "created")
CONTENT_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "content_md5")  # those that name the bytes, not the object
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, TypeError,
              NotImplementedError, ImportError)


def _comparable(info: Mapping[str, Any]) -> dict[str, str]:
    """The version fields of an fsspec ``info`` or ``ls`` entry, as text that the two give alike: a time as
    milliseconds since the epoch (fsspec's memory filesystem lists a float and answers info with a datetime)."""
    out = {}
    for k in VERSION_KEYS:
        v = info.get(k)
        if isinstance(v, datetime.datetime):
            v = v.timestamp()
        if isinstance(v, float):
            v = round(v * 1000)
        if v is not None:
            out[k] = str(v)
    return out


def _transient(exc: Exception) -> bool:
    return not isinstance(exc, _PERMANENT)


class FsspecFile(RemoteFile):
    """A file of an fsspec filesystem, read by ``cat_file`` byte ranges."""

    def __init__(self, fs, path: str, info: Mapping[str, Any], workspace: Workspace, parent: RemoteFolder):
        super().__init__(fs.unstrip_protocol(path), path.rsplit("/", 1)[-1], info["size"], workspace, parent)
        self.fs, self.path = fs, path
        self.version = {k: str(info[k]) for k in VERSION_KEYS if info.get(k) is not None}
        self._listed = _comparable(info)

    def _fetch(self, start: int, stop: int, out: memoryview) -> None:
        data = self.fs.cat_file(self.path, start=start, end=stop)
        if len(data) != stop - start:
            raise ConnectionError(f"asked for {stop - start} bytes, got {len(data)}")
        out[:] = data

    def _download(self, path: Path) -> None:
        self.fs.get_file(self.path, str(path))
        if path.stat().st_size != self.size:
            self.check_unchanged()  # another size: replaced since it was listed (refused), or cut short (retried)
            raise ConnectionError(f"downloaded {path.stat().st_size} bytes of {self.size}")

    def _transient(self, exc: Exception) -> bool:
        return _transient(exc)

    def content_id(self) -> str | None:
        key = next((k for k in CONTENT_KEYS if k in self.version), None)
        return None if key is None else f"{self.size}:{key.lower()}:{self.version[key]}"

    def check_unchanged(self) -> None:
        """Refuse the file if its size or version fields (ETag, generation, ...) are no longer those listed: a
        file replaced between its first byte range and its last would be read as a mix of two versions."""
        self.fs.invalidate_cache(self.path)
        info = self.retrying("checking its version", lambda: self.fs.info(self.path))
        now = _comparable(info)
        if info.get("size") != self.size or now != self._listed:
            changed = next((f"{k} {self._listed.get(k)} -> {now.get(k)}" for k in sorted({*now, *self._listed})
                            if now.get(k) != self._listed.get(k)), f"size {self.size} -> {info.get('size')}")
            raise CheckpointError(printable(
                f"{self.label}: replaced while it was read ({changed}); its row is not written: ingest again once "
                "the file is settled"))

    def identity(self) -> dict[str, Any]:
        return {"url": self.label, "size": self.size, **self.version}

    def matches(self, recorded: Mapping[str, Any]) -> bool:
        """Same size and the same version fields (ETag, generation, mtime, ...) as recorded.

        At another URL only the fields of the content (ETag, MD5, CRC32C) count: two objects of the same size
        written in the same second are not the same file. At its own URL, a file whose filesystem reports no
        version field is judged by its size.
        """
        if recorded.get("size") != self.size:
            return False
        keys = VERSION_KEYS if recorded.get("url") == self.label else CONTENT_KEYS
        common = [k for k in self.version if k in recorded and k in keys]
        return all(recorded[k] == self.version[k] for k in common) and (
            bool(common) or (not self.version and keys is VERSION_KEYS))


class FsspecFolder(RemoteFolder):
    """A folder of an fsspec filesystem, listed once with ``ls``."""

    def __init__(self, fs, path: str, workspace: Workspace):
        super().__init__(fs.unstrip_protocol(path))
        self.fs, self.path, self.workspace = fs, path.rstrip("/"), workspace
        self._exists: bool | None = None

    def exists(self) -> bool:
        if self._exists is None:
            self._exists = retrying(self.label, "listing", lambda: self.fs.isdir(self.path), _transient)
        return self._exists

    def _list(self) -> dict[str, RemoteFile | RemoteFolder]:
        entries = retrying(self.label, "listing", lambda: self.fs.ls(self.path, detail=True), _transient)
        out: dict[str, RemoteFile | RemoteFolder] = {}
        for info in entries:
            path = info["name"].rstrip("/")
            name = path.rsplit("/", 1)[-1]
            if path == self.path or not name:
                continue
            if info.get("type") == "directory":
                out[name] = FsspecFolder(self.fs, path, self.workspace)
            else:
                out[name] = FsspecFile(self.fs, path, info, self.workspace, self)
        return out


class FsspecSource(Source):
    """The checkpoints of a folder at an fsspec URL."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None, workspace: Workspace):
        import fsspec

        self.url = url.rstrip("/")
        self.workspace = workspace
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:  # the protocol's package (s3fs, gcsfs, ...) is missing; bad options
            raise SourceError(f"{self.url}: {one_line(exc)}") from None
        self.root = root.rstrip("/")
        self.folder: FsspecFolder | None = None
        self.fs.invalidate_cache(self.root)  # listings cached by an earlier ingest in this process may be stale

    def checkpoints(self, steps: Sequence[int] | None = None) -> list[Checkpoint]:
        self.folder = FsspecFolder(self.fs, self.root, self.workspace)
        return discover(self.folder, steps)

    def _top(self) -> list[RemoteFolder]:
        return [self.folder]

    def close(self) -> None:
        self.workspace.close()
