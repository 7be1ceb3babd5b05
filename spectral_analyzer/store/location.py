"""Where a store lives: a local folder or an fsspec URL, resolved once.

A :class:`Location` is the path and the filesystem options; it opens the Zarr
group, answers whether anything is there, removes and replaces whole stores.
It knows nothing of the layout inside.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError

if TYPE_CHECKING:
    import zarr

__all__ = ["LOCK_NAME", "Location", "exchange", "group_keys", "is_url"]

LOCK_NAME = ".lock"  # the writer lock inside a store (see lock.py); never part of the data
_NOT_A_STORE = (FileNotFoundError, NotADirectoryError, ValueError)  # zarr's not-found and bad-metadata errors


NAME_MAX = 255  # bytes of one name in a folder, on the filesystems in use


def sibling_name(name: str, suffix: str, prefix: str = "") -> str:
    """``prefix + name + suffix``, the name of a file or folder written beside *name*; where that is longer
    than a folder's names may be, *name* shortened and a digest of it kept: the same name every time (a
    later writer finds what a killed one left), and no refusal of a name the filesystem itself takes."""
    whole = prefix + name + suffix
    if len(os.fsencode(whole)) <= NAME_MAX:  # the bytes on disk (a name that is no UTF-8 kept as it is)
        return whole
    import hashlib

    raw = os.fsencode(name)
    digest = "~" + hashlib.sha256(raw).hexdigest()[:16]
    room = NAME_MAX - len(os.fsencode(prefix + digest + suffix))
    return prefix + raw[:room].decode("utf-8", errors="ignore") + digest + suffix


def exchange(a: str, b: str) -> bool:
    """Swap what is at two local paths in one atomic step (Linux's ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or the filesystem has no such call."""
    if sys.platform != "linux":
        return False
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it (glibc < 2.28, musl)
        return False
    at_cwd, rename_exchange = -100, 2
    if call(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def is_url(path: str | os.PathLike) -> bool:
    """Whether *path* is an fsspec URL of a remote filesystem (``file://`` counts as local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


_KILLED_CREATE = re.compile(r"zarr\.[0-9a-f]{32}\.partial")  # zarr's temporary file of a root zarr.json


def group_keys(group: zarr.Group) -> list[str]:
    """Names of *group*'s child groups.

    The writer lock file beside them is not one, and not a warning; nor is a
    temporary file that a killed write left (zarr writes ``<name>.<hex>.partial``
    and renames it into place).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Object at {LOCK_NAME} is not recognized")
        warnings.filterwarnings("ignore", message=r"Object at \S+\.partial is not recognized")
        return list(group.group_keys())


def unreachable(path: str, exc: BaseException) -> StoreError:
    """A store that could not be read or listed: credentials, permissions, the network."""
    return StoreError(f"{path}: cannot access the store ({type(exc).__name__}: {' '.join(str(exc).split())})")


@dataclass(frozen=True)
class Location:
    """A store's path (a local path or a URL) and its filesystem's ``storage_options``."""

    path: str
    storage_options: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def of(cls, path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> Location:
        text = str(path)
        if not is_url(text):
            text = os.path.expanduser(text.removeprefix("file://"))  # ~ as a shell would (not done for env vars)
            if os.path.basename(text.rstrip("/")) in (".", ".."):  # the folder itself: its siblings fell inside it
                text = os.path.realpath(text)  # (.. of a symbolic link is the folder above its target)
        return cls(text, dict(storage_options) if storage_options else None)

    def __dask_tokenize__(self):
        return ("spectral-analyzer-location", self.path)

    @property
    def is_remote(self) -> bool:
        return is_url(self.path)

    def beside(self, suffix: str) -> Location:
        """A sibling location: the same path with *suffix* appended (:func:`sibling_name`)."""
        head, sep, name = self.path.rstrip("/").rpartition("/")
        return Location(head + sep + sibling_name(name, suffix), self.storage_options)

    def filesystem(self):
        """``(fsspec filesystem, path inside it)``; a bucket itself is refused."""
        import fsspec

        if self.is_remote and any(c in self.path for c in "*?["):  # fsspec globs: rm(run[1].zarr/x) hit run1.zarr/x
            raise StoreError(f"{self.path}: a store URL cannot hold *, ? or [ (fsspec takes them as patterns, and "
                             "would write or delete other stores' objects); name the store without them")
        try:
            fs, root = fsspec.core.url_to_fs(self.path, **(self.storage_options or {}))
        except ImportError as exc:  # the protocol's package (s3fs, gcsfs, ...) is not installed
            raise StoreError(f"{self.path}: {exc}") from None
        if fs.root_marker == "" and "/" not in root.strip("/"):
            # object stores: creating or replacing a store there would create or delete the bucket
            raise StoreError(
                f"{self.path}: a store needs a name inside the bucket, e.g. {self.path.rstrip('/')}/run.zarr"
            )
        return fs, root.rstrip("/")

    def zarr_store(self, read_only: bool):
        """What zarr opens: a local path as is, a URL as an fsspec store with its options."""
        import zarr.storage  # here: a Location is made and measured without Zarr

        if not self.is_remote:
            return zarr.storage.LocalStore(self.path, read_only=read_only)
        self.filesystem()  # refuses a bucket itself, names a missing backend package
        try:
            return zarr.storage.FsspecStore.from_url(
                self.path, storage_options=dict(self.storage_options or {}), read_only=read_only
            )
        except ImportError as exc:
            raise StoreError(f"{self.path}: {exc}") from None

    def open_group(self, mode: str = "r", path: str = "") -> zarr.Group:
        import zarr

        return zarr.open_group(self.zarr_store(mode == "r"), path=path, mode=mode, use_consolidated=False)

    def try_open_group(self) -> zarr.Group | None:
        """The root group, or None where there is no Zarr group; unreachable stores raise."""
        try:
            return self.open_group("r")
        except _NOT_A_STORE:
            return None
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 -- credentials, permissions, the network: not "no store"
            raise unreachable(self.path, exc) from None

    def enclosing_store(self, itself: bool = False) -> str | None:
        """The outermost folder above this local path (or the path *itself*) that holds a Zarr root: a store's
        arrays are Zarr nodes too, so the store is the outermost. None where there is none, or remotely."""
        if self.is_remote:
            return None
        folder = Path(os.path.abspath(self.path))
        for above in reversed((folder, *folder.parents) if itself else folder.parents):
            if Location.of(above).holds_zarr_root():
                return str(above)
        return None

    def holds_zarr_root(self) -> bool:
        """Whether a Zarr root (``zarr.json``) is at the path: a store, of any version or damaged, or a
        Zarr hierarchy; what an overwrite may replace."""
        try:
            if not self.is_remote:
                return os.path.isfile(os.path.join(self.path, "zarr.json"))
            fs, root = self.filesystem()
            return fs.isfile(f"{root}/zarr.json")
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 -- fsspec backends raise their own types (botocore's)
            raise unreachable(self.path, exc) from None

    def occupied(self) -> bool:
        """Whether anything but a writer lock is at the path (a file, a non-empty folder or prefix).

        Locally, nor is the temporary file of the root metadata that a writer killed while creating the
        store left (``zarr.<hex>.partial``, never renamed into place): the next writer starts again."""
        try:
            if not self.is_remote:
                p = Path(self.path)
                return p.exists() and (p.is_file() or any(
                    c.name != LOCK_NAME and not _KILLED_CREATE.fullmatch(c.name) for c in p.iterdir()))
            fs, root = self.filesystem()
            try:
                return fs.isfile(root) or any(not e.endswith("/" + LOCK_NAME) for e in fs.ls(root, detail=False))
            except FileNotFoundError:
                return False
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 -- fsspec backends raise their own types (botocore's)
            raise unreachable(self.path, exc) from None

    def clear(self, keep_lock: bool = True) -> None:
        """Delete what is at the path (nothing there is fine), the writer lock kept unless told."""
        if not self.is_remote:
            p = Path(self.path)
            if p.is_dir():
                for child in p.iterdir():
                    if keep_lock and child.name == LOCK_NAME:
                        continue
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                if not keep_lock:
                    p.rmdir()
            elif p.exists() or p.is_symlink():
                p.unlink()
            return
        fs, root = self.filesystem()
        try:
            doomed = [f for f in fs.find(root) if not (keep_lock and f == f"{root}/{LOCK_NAME}")]
        except FileNotFoundError:
            doomed = []
        if fs.isfile(root):
            doomed.append(root)
        if doomed:
            fs.rm(doomed)
        fs.invalidate_cache(root)

    def replace_with(self, src: Location) -> None:
        """Put the store at *src* in the place of this one (each holder of the lock keeps it).

        Locally one atomic exchange of the two folders where the system has
        one (Linux), then the old store, now at *src*, is removed: interrupted,
        the path holds the old store or the new one, and what is at *src* is a
        leftover. Elsewhere two renames, each atomic, the old store moved aside
        first (a kill between them leaves no store at the path, and the old
        one at ``.overwrite-old``). Object stores have no rename: the old
        store's root metadata goes first (what is left of it is no longer a
        store), then the rest of it; the new store is copied object by object
        (server side, O(store size) requests), its root metadata (the commit
        record) last, once every other object is there; then the copy at
        *src* is deleted. Interrupted, *src* is still complete and this
        location holds either the new store or no store at all.
        """
        if not self.is_remote:
            if os.path.isdir(self.path) and exchange(src.path, self.path):
                src.clear(keep_lock=False)
                return
            old = self.beside(".overwrite-old")
            old.clear(keep_lock=False)
            moved = os.path.exists(self.path)
            if moved:
                os.replace(self.path, old.path)
            try:
                os.replace(src.path, self.path)
            except OSError:
                if moved:  # the old store back in its place: the next writer would remove it as a leftover
                    os.replace(old.path, self.path)
                raise
            old.clear(keep_lock=False)
            return
        fs, dst_root = self.filesystem()
        _, src_root = src.filesystem()
        try:
            fs.rm_file(f"{dst_root}/zarr.json")
        except FileNotFoundError:
            pass
        self.clear()
        skip = {f"{src_root}/zarr.json", f"{src_root}/{LOCK_NAME}"}
        objects = [p for p in fs.find(src_root) if p not in skip]
        fs.copy(objects, [dst_root + p[len(src_root):] for p in objects], on_error="raise")
        fs.copy(f"{src_root}/zarr.json", f"{dst_root}/zarr.json", on_error="raise")
        src.clear()
        fs.invalidate_cache()

    def size_on_disk(self) -> int:
        """Bytes under the store's folder (or URL prefix)."""
        if self.is_remote:
            fs, root = self.filesystem()
            return int(fs.du(root, total=True))
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except FileNotFoundError:  # a writer's temporary file, renamed or removed since it was listed
                    pass
        return total
