"""The writer: one transaction on a store, used by every write path.

``with StoreWriter(path, overwrite=..., wait=...) as w:`` takes the writer
lock (lock.py), opens the store that is there (``w.existing``) or lets the
caller ``w.create(...)`` one, and on leaving:

* success: an overwrite swaps the finished store (built beside, at
  ``<path>.overwrite-partial``) into place;
* an error: a store this transaction created is removed, an existing one is
  restored to the commit it was opened at (rows it did not commit, their
  steps and checksums dropped), and an ``OSError`` (a full disk, no
  permission, a missing bucket) becomes a one-line :class:`StoreError`.
  Locally the root metadata as opened is kept as a hard link
  (``.rollback.json``) and renamed back first: a full disk, which can
  refuse every write of the rollback, cannot keep the commit record from
  returning to where it was;
* ``KeyboardInterrupt``: rows committed so far stay; the next writer cleans
  what was left after them.

Leftovers of killed writers (``.overwrite-*`` beside the store, rows past the
commit, ``.rollback.json``) are removed when the next writer opens the store.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from ..errors import StoreError, StoreExistsError
from .core import Store
from .layout import TensorEntry
from .location import LOCK_NAME, Location
from .lock import finish_writes, writer_lock

__all__ = ["StoreWriter", "unwritable"]

_ROLLBACK = ".rollback.json"  # the root metadata as the transaction opened it (a hard link)


def unwritable(path: str, exc: OSError) -> StoreError:
    return StoreError(f"{path}: cannot write the store ({' '.join(str(exc).split())})")


def _foreign(path: str) -> StoreExistsError:
    return StoreExistsError(f"{path}: exists and is not a spectral-analyzer store (no zarr.json); "
                            "overwrite replaces stores only: remove it yourself or choose another path")


class StoreWriter:
    """A write transaction on the store at *path* (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, *,
                 overwrite: bool = False, wait: bool | float = False, fresh: bool = False):
        location = Location.of(path, storage_options)
        if not location.is_remote and os.path.islink(location.path.rstrip("/")):
            # the store the link names: an overwrite exchanges folders, which would swap the link itself
            location = Location.of(os.path.realpath(location.path), storage_options)
        self.location = location
        self.overwrite, self.wait, self.fresh = overwrite, wait, fresh
        self.existing: Store | None = None
        self.store: Store | None = None
        self._target = self.location
        self._snapshot: dict | None = None
        self._kept: str | None = None
        self._created = False
        self._stack = ExitStack()

    def __enter__(self) -> StoreWriter:
        loc = self.location
        if (above := loc.enclosing_store()) is not None:  # it would be written into that store's arrays
            raise StoreError(f"{loc.path}: is inside the Zarr store {above}; put the store outside it")
        if self.overwrite and not loc.is_remote and loc.holds_zarr_root() and _holds_cwd(loc.path):
            raise StoreError(f"{loc.path}: holds the current directory, which an overwrite would remove; run the "
                             "command from outside the store")
        self._fresh_folder = not loc.is_remote and not os.path.exists(loc.path)
        if (not loc.is_remote and not os.path.lexists(os.path.join(loc.path, LOCK_NAME)) and loc.occupied()
                and not loc.holds_zarr_root()):
            raise _foreign(loc.path)  # refused before the lock, which would leave a lock file in a folder of the user's
        self._stack.enter_context(writer_lock(loc, self.wait))
        try:
            self._open()
        except OSError as exc:  # a leftover of a killed writer that cannot be removed
            self._stack.close()
            raise unwritable(loc.path, exc) from None
        except BaseException:
            self._stack.close()
            raise
        return self

    def _open(self) -> None:
        loc = self.location
        old, new = loc.beside(".overwrite-old"), loc.beside(".overwrite-partial")
        if not loc.is_remote and old.holds_zarr_root() and not loc.holds_zarr_root():
            # killed between the two renames of an overwrite (a system with no atomic exchange): neither is removed
            raise StoreError(
                f"{loc.path}: an overwrite was interrupted between its two renames; the earlier store is at "
                f"{old.path}" + (f" and the new one at {new.path}" if new.holds_zarr_root() else "")
                + f": move the one to keep to {loc.path} (which holds at most a lock file)"
            )
        for suffix in (".overwrite-partial", ".overwrite-old"):  # left by a killed overwrite
            if not loc.is_remote or suffix == ".overwrite-partial":
                leftover = loc.beside(suffix)
                if leftover.occupied():
                    leftover.clear(keep_lock=loc.is_remote)
        if Store.exists(loc.path, loc.storage_options) and not self.overwrite:
            # Unverified: reading every step and checksum would make each append O(rows). An append
            # extends the recorded chain, never one recomputed from the rows, so damage to the rows
            # stays visible to every reader; truncation checks the chain before it trusts it.
            store = Store.open(loc, mode="r+", verify=False)
            if store.commit_record is None and not self.fresh:
                return  # an ingest killed before its base was committed: start again
            store.clean_uncommitted()
            self.existing = self.store = store
            self._snapshot = store.attrs
            self._kept = self._keep_root()
            return
        if loc.occupied():
            if not loc.holds_zarr_root():  # a folder of the user's, a file: never deleted for them
                raise _foreign(loc.path)
            if not self.overwrite:
                raise StoreExistsError(f"{loc.path}: exists and is not a spectral-analyzer store; "
                                       "pass overwrite to replace it")
            self._target = loc.beside(".overwrite-partial")
            self._stack.enter_context(writer_lock(self._target, False))

    def _keep_root(self) -> str | None:
        """A hard link to the root metadata as it is now (local stores; None where links are not possible)."""
        if self.location.is_remote:
            return None
        kept = os.path.join(self.location.path, _ROLLBACK)
        try:
            if os.path.lexists(kept):  # left by a killed writer
                os.unlink(kept)
            os.link(os.path.join(self.location.path, "zarr.json"), kept)
        except OSError:
            return None
        return kept

    def create(self, manifest: Sequence[TensorEntry], chunk_size: int, attrs: Mapping[str, Any]) -> Store:
        """A new, empty store where this transaction writes."""
        self._created = True
        try:
            self.store = Store.create(self._target, manifest, chunk_size, attrs)
        except OSError as exc:  # a missing bucket, no permission, a full disk
            raise unwritable(self._target.path, exc) from None
        return self.store

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is None:
                if self._target != self.location:
                    try:
                        self.location.replace_with(self._target)
                    except OSError as err:
                        raise unwritable(self.location.path, err) from None
                return False
            if isinstance(exc, KeyboardInterrupt):
                return False
            finish_writes()  # the writes of the failed batch still running: the rollback comes after them
            self._rollback()
            if isinstance(exc, OSError):
                raise unwritable(self._target.path, exc) from None
            return False
        finally:
            if self._kept is not None:
                try:
                    os.unlink(self._kept)
                except OSError:
                    pass
            self._stack.close()

    def _rollback(self) -> None:
        """Undo this transaction (the error that led here is the one to report)."""
        try:
            if self._created:
                self._target.clear(keep_lock=self._target == self.location and not self._fresh_folder)
            elif self.store is not None and self._snapshot is not None:
                if self._kept is not None:  # a rename: the commit record is back even on a full disk
                    # (where nothing was committed the two names are one file, the rename does nothing, and
                    # the link is removed when the transaction ends)
                    os.replace(self._kept, os.path.join(self.location.path, "zarr.json"))
                self.store.restore(self._snapshot)
            elif self._fresh_folder and not self.location.occupied():
                self.location.clear(keep_lock=False)  # the folder only the lock made
        except OSError:
            pass


def _holds_cwd(path: str) -> bool:
    """Whether the current directory is the folder *path* or inside it."""
    try:
        here, there = os.path.realpath(os.getcwd()), os.path.realpath(path)
    except OSError:  # the current directory was removed
        return False
    return here == there or here.startswith(there.rstrip(os.sep) + os.sep)
