"""One writer at a time: the lock every write to a store takes.

Locally the lock is an advisory ``flock`` on ``<store>/.lock``, released by
the operating system when its process dies (no stale locks). After taking
it, the holder checks that the file it locked is still the one at that path:
an overwrite renames the whole folder away, and a writer that waited on the
old folder's lock then tries again on the new one.

On object storage the lock is an object ``<store>/.lock`` created with a
conditional write (``If-None-Match: *`` on S3), holding the holder's host,
pid and the time its lease ends. The holder renews the lease from a thread;
a lock whose lease has run out (its process died) is broken by the next
writer. A filesystem with no conditional create cannot be written.

Readers take no lock: they read the commit record they opened. Zarr's writes
still running when a write failed are waited for before the lock is released
(:func:`finish_writes`).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from ..errors import StoreBusyError, StoreError
from .location import LOCK_NAME, Location

__all__ = ["WriterLock", "finish_writes", "writer_lock"]

LEASE_SECONDS = 120.0
_POLL = 0.2
_held: dict[str, list] = {}  # path -> [lock, depth]: a process re-entering its own lock
_held_guard = threading.Lock()


def _holder() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "expires": now + LEASE_SECONDS}


def _describe(location: Location, holder: dict | None) -> str:
    if not holder:
        who = "another process"
    else:
        since = datetime.fromtimestamp(float(holder.get("since", 0)), timezone.utc).astimezone()
        who = f"pid {holder.get('pid')} on host {holder.get('host')} since {since:%H:%M:%S}"
    return f"{location.path}: being written by {who}; --wait (wait=True) to wait for it"


def _replace_lock(path: str) -> None:
    """Put a new, empty lock file at *path* (atomically: a writer that opens it meanwhile finds the old one
    replaced after taking it, and takes the new one)."""
    fresh = f"{path}.{os.getpid()}.{threading.get_ident()}"
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.close(fd)
    try:
        os.replace(fresh, path)
    except BaseException:
        os.unlink(fresh)
        raise


class WriterLock:
    """The writer lock of the store at *location*; ``acquire`` it, or use :func:`writer_lock`."""

    def __init__(self, location: Location):
        self.location = location
        self._fd: int | None = None
        self._stop: threading.Event | None = None

    # -- local: flock ---------------------------------------------------------

    def _try_local(self) -> dict | None:
        """None once locked, else the holder's description."""
        os.makedirs(self.location.path, exist_ok=True)
        path = os.path.join(self.location.path, LOCK_NAME)
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides, as for every other file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"null")
            except ValueError:
                holder = None
            os.close(fd)
            return holder or {}
        try:
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same and os.fstat(fd).st_nlink > 1:  # a hard-linked copy's (cp -al, rsync --link-dest): its
                _replace_lock(path)                     # writers would block this store's; each gets its own
                same = False                            # (under this lock: no writer of this store holds it)
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        except BaseException:  # a full disk: the lock is not taken, and not kept by a stray descriptor
            os.close(fd)
            raise
        if not same:  # the folder was replaced while we waited: lock the new one
            os.close(fd)
            return {"retry": True}
        self._fd = fd
        return None

    # -- object storage: a conditional create and a lease -----------------------

    def _try_remote(self) -> dict | None:
        fs, root = self.location.filesystem()
        key = f"{root}/{LOCK_NAME}"
        mine = _holder()
        body = json.dumps(mine).encode()
        try:
            fs.pipe_file(key, body, mode="create")
        except FileExistsError:
            holder = self._remote_holder(fs, key)
            if holder is not None and float(holder.get("expires", 0)) < time.time():
                fs.rm_file(key)  # its lease ran out: the writer died
                return {"retry": True}
            return holder or {}
        except (TypeError, NotImplementedError):
            raise StoreError(
                f"{self.location.path}: this filesystem has no conditional create, so the store cannot be "
                "locked for writing; write it where one exists (a local folder, S3)"
            ) from None
        self._stop = threading.Event()
        threading.Thread(target=self._renew, args=(fs, key, mine), daemon=True).start()
        return None

    @staticmethod
    def _remote_holder(fs, key: str) -> dict | None:
        try:
            fs.invalidate_cache(key)
            return json.loads(fs.cat_file(key))
        except (FileNotFoundError, ValueError):
            return None

    def _renew(self, fs, key: str, mine: dict) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            mine["expires"] = time.time() + LEASE_SECONDS
            try:
                fs.pipe_file(key, json.dumps(mine).encode())
            except Exception:  # noqa: BLE001 -- a failed renewal is retried; the lease is long
                pass

    # -- both -----------------------------------------------------------------

    def acquire(self, wait: bool | float = False) -> None:
        """Take the lock; *wait* False fails at once, True waits, a number waits that many seconds."""
        deadline = None if wait is True else time.monotonic() + float(wait or 0)
        while True:
            try:
                holder = self._try_remote() if self.location.is_remote else self._try_local()
            except OSError as exc:
                raise StoreError(f"{self.location.path}: cannot write the store ({' '.join(str(exc).split())})") from None
            if holder is None:
                return
            if holder.get("retry"):
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreBusyError(_describe(self.location, holder))
            time.sleep(_POLL)

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # a lock file at rest names no holder
            except OSError:
                pass
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            fs, root = self.location.filesystem()
            try:
                fs.rm_file(f"{root}/{LOCK_NAME}")
            except FileNotFoundError:
                pass


def finish_writes() -> None:
    """Wait for the writes Zarr still has running in its event loop.

    Zarr writes a batch (chunks, an array's metadata and its parents') with
    ``asyncio.gather``: the first that fails is raised while the others go
    on, in its threads. One that lands after a rollback, or after the lock
    is released, writes into a store that has moved on (a root ``zarr.json``
    recreated in a folder the rollback emptied).
    """
    if "zarr" not in sys.modules:
        return
    from zarr.core.sync import sync

    async def rest() -> None:
        me = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not me), return_exceptions=True)

    sync(rest())


@contextmanager
def writer_lock(location: Location, wait: bool | float = False):
    """Hold the writer lock of *location* for the ``with`` block (re-entrant within a process)."""
    key = location.path
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[2] == threading.get_ident():
            entry[1] += 1
        else:
            entry = None
    if entry is None:
        lock = WriterLock(location)
        lock.acquire(wait)
        with _held_guard:
            _held[key] = [lock, 1, threading.get_ident()]
    try:
        yield
    finally:
        with _held_guard:
            entry = _held[key]
            entry[1] -= 1
            done = entry[1] == 0
            if done:
                del _held[key]
        if done:
            try:
                finish_writes()
            finally:
                entry[0].release()
