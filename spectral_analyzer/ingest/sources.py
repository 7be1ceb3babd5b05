"""Where checkpoints come from: a local folder, a folder at an fsspec URL, or the revisions of a hub repository.

A :class:`Source` lists checkpoints (:class:`~.discover.Checkpoint`) whose
files are local paths or :class:`RemoteFile` objects. A remote folder is a
:class:`RemoteFolder`, on which the layout rules of discover.py run as they
do on a local folder. The readers (readers.py) stay the only code that knows
formats: they read a remote safetensors file by byte range (its header, then
each selected tensor's span) and ask for a local copy of a remote pickle.

Local disk and memory, whatever the number of checkpoints:

* A byte range is fetched once. The ingest reads each tensor of a checkpoint
  twice: as the current checkpoint, then as the previous one of the next
  delta. So a range read once is kept -- in memory up to ``KEEP_IN_MEMORY``
  bytes in all, in a file of the workspace beyond that -- until its second
  read, which takes it. At most one checkpoint's selected tensors are kept,
  never a whole file: unselected tensors and other files are never fetched.
* Reading ahead: while one tensor is processed, the next ones (in the order
  the ingest reads them, up to ``AHEAD_BYTES``, at least one) are fetched on
  ``FETCH_THREADS`` threads, so that the transfer overlaps the arithmetic and
  a distant server's latency is paid once per several tensors.
* A pickle (``.bin``, ``.pt``) is downloaded whole into the workspace, since
  torch reads pickles from files. The downloads of the two checkpoints in use
  (the previous and the current one) are kept and older ones deleted: local
  disk up to two checkpoints' pickle files.
* The workspace, a temporary folder (under ``$TMPDIR``), is deleted when the
  source is closed. A process killed outright leaves it behind.

Each request is tried up to ``ATTEMPTS`` times on transient failures (a lost
connection, a timeout, a 5xx or 429 answer, a short or malformed response:
the transports raise ``ConnectionError`` for the last two),
waiting ``FIRST_WAIT`` seconds, doubled after each failure up to ``MAX_WAIT``;
then, or at once for a permanent failure (no such file, no access), a
one-line :class:`~spectral_analyzer.errors.SourceError` names the file, and
for a hub source its revision.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import count
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import CheckpointError, SourceError, SpectralAnalyzerError, StepError
from .model_config import MAX_BYTES, attention_config, read_model_config

if TYPE_CHECKING:
    from .discover import Checkpoint

__all__ = [
    "AHEAD_BYTES",
    "ATTEMPTS",
    "KEEP_IN_MEMORY",
    "LocalSource",
    "RemoteFile",
    "RemoteFolder",
    "Source",
    "Workspace",
    "is_remote",
    "open_source",
    "read_config",
    "read_remote_model_config",
    "retrying",
]

ATTEMPTS = 5
FIRST_WAIT = 1.0  # seconds
MAX_WAIT = 16.0
KEEP_IN_MEMORY = 128 * 1024 * 1024  # bytes of kept ranges held in memory; the rest goes to the workspace
AHEAD_BYTES = 32 * 1024 * 1024  # bytes fetched ahead of the tensor being read
FETCH_THREADS = 4
TEXT_LIMIT = 64 * 1024 * 1024  # the largest JSON file (shard index, config.json) read whole

T = TypeVar("T")


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def retrying(label: str, what: str, call: Callable[[], T], transient: Callable[[Exception], bool],
             reset: Callable[[], None] | None = None, stop: threading.Event | None = None) -> T:
    """``call()``, tried up to ``ATTEMPTS`` times while it fails with an exception *transient* accepts.

    *reset* runs before each new try; none is made once *stop* is set (the
    source is being closed). The package's own errors pass through; any other
    failure becomes a one-line :class:`SourceError` naming *label*.
    """
    wait = FIRST_WAIT
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except SpectralAnalyzerError:
            raise
        except Exception as exc:  # noqa: BLE001 -- every transport has its own error types
            if not transient(exc):
                raise SourceError(f"{label}: {what} failed ({one_line(exc)})") from None
            if attempt == ATTEMPTS:
                raise SourceError(
                    f"{label}: {what} still failed after {ATTEMPTS} attempts ({one_line(exc)}); check the "
                    "connection and run the same ingest again: it resumes after the last committed checkpoint"
                ) from None
            if reset is not None:
                reset()
            if stop is None:
                time.sleep(wait)
            elif stop.wait(wait):
                raise SourceError(f"{label}: {what} failed ({one_line(exc)}); not tried again: the ingest stopped")
            wait = min(MAX_WAIT, 2 * wait)
    raise AssertionError("unreachable")


class Workspace:
    """What a remote ingest keeps on local disk and in memory, in one temporary folder deleted by :meth:`close`."""

    def __init__(self, keep_in_memory: int | None = None):
        self.keep_in_memory = KEEP_IN_MEMORY if keep_in_memory is None else keep_in_memory
        self._folder: Path | None = None
        self._kept: dict[tuple, np.ndarray | Path] = {}
        self._in_memory = 0
        self._downloads: OrderedDict[str, Path] = OrderedDict()
        self._fetching: dict[tuple, Future] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._names = count()
        self._lock = threading.Lock()
        self.closing = threading.Event()  # set by close(): requests in flight are not tried again

    @property
    def folder(self) -> Path:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="spectral-analyzer-"))
            return self._folder

    def keep(self, key: tuple, data: np.ndarray) -> None:
        """Keep *data* (not copied: readers never write into what they read) for one :meth:`take` of *key*."""
        with self._lock:
            fits = self._in_memory + data.nbytes <= self.keep_in_memory
            if fits:
                self._in_memory += data.nbytes
                self._kept[key] = data
                return
        path = self.folder / f"kept-{next(self._names)}"
        with open(path, "wb") as f:
            f.write(memoryview(data))
        with self._lock:
            self._kept[key] = path

    def fetch_ahead(self, key: tuple, fetch: Callable[[], np.ndarray]) -> None:
        """Run ``fetch()`` on a background thread, unless *key* is kept or being fetched; see :meth:`fetched`."""
        with self._lock:
            if key in self._kept or key in self._fetching:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="spectral-fetch")
            self._fetching[key] = self._pool.submit(fetch)

    def fetched(self, key: tuple) -> np.ndarray | None:
        """The data fetched ahead for *key* (waiting for it; its failure raised here); None if none was."""
        with self._lock:
            future = self._fetching.pop(key, None)
        return None if future is None else future.result()

    def take(self, key: tuple) -> np.ndarray | None:
        """The data kept for *key*, forgotten here; None if there is none."""
        with self._lock:
            kept = self._kept.pop(key, None)
            if isinstance(kept, np.ndarray):
                self._in_memory -= kept.nbytes
                return kept
        if kept is None:
            return None
        try:
            return np.fromfile(kept, dtype=np.uint8)
        finally:
            kept.unlink()

    def download_folder(self, group: str) -> Path:
        """The folder for the downloads of checkpoint *group*.

        Only the two checkpoints asked for last keep their downloads: the
        ingest never goes back further than the previous checkpoint.
        """
        with self._lock:
            if group in self._downloads:
                self._downloads.move_to_end(group)
                return self._downloads[group]
            while len(self._downloads) >= 2:
                _, old = self._downloads.popitem(last=False)
                shutil.rmtree(old, ignore_errors=True)
        folder = self.folder / f"download-{next(self._names)}"
        folder.mkdir()
        with self._lock:
            self._downloads[group] = folder
        return folder

    def close(self) -> None:
        self.closing.set()
        with self._lock:
            pool, self._pool = self._pool, None
            self._fetching.clear()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._kept.clear()
            self._in_memory = 0
            self._downloads.clear()
            folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class RemoteFile(ABC):
    """A remote file: its name, size and identity, read by byte range.

    Subclasses give the transport: :meth:`_fetch` (a byte range into a
    buffer), :meth:`_download` (the whole file to a local path), which
    failures are transient, and the identity recorded in the store's
    provenance.
    """

    def __init__(self, label: str, name: str, size: int, workspace: Workspace, parent: RemoteFolder | None = None):
        self.label = label  # the URL shown in messages and kept in provenance
        self.name = name
        self.size = int(size)
        self.workspace = workspace
        self.parent = parent
        self.memo: dict[str, Any] = {}  # what the readers learnt of the file (its parsed header): read once

    @property
    def key(self) -> tuple:
        """What tells this file from every other one of the ingest (its byte ranges are kept under it)."""
        return (self.label,)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    def exists(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, size={self.size})"

    def read(self, start: int, stop: int, keep: bool = True) -> np.ndarray:
        """Bytes ``[start, stop)`` in a writable buffer of their own.

        Fetched once: with *keep*, the range is kept for one more read (see
        the module's docstring).
        """
        if not 0 <= start <= stop <= self.size:
            raise CheckpointError(f"{self.label}: bytes {start}..{stop} are past its end ({self.size} bytes)")
        key = (*self.key, start, stop)
        kept = self.workspace.take(key)
        if kept is not None:
            return kept
        buf = self.workspace.fetched(key)
        if buf is None:
            buf = self._fetch_new(start, stop)
        if keep:
            self.workspace.keep(key, buf)
        return buf

    def fetch_ahead(self, start: int, stop: int) -> None:
        """Start fetching ``[start, stop)`` on a background thread; the first :meth:`read` of it takes it."""
        if 0 <= start < stop <= self.size:
            self.workspace.fetch_ahead((*self.key, start, stop), lambda: self._fetch_new(start, stop))

    def _fetch_new(self, start: int, stop: int) -> np.ndarray:
        buf = np.empty(stop - start, dtype=np.uint8)
        if stop > start:
            self.retrying(f"reading bytes {start}..{stop}", lambda: self._fetch(start, stop, memoryview(buf)))
        return buf

    def read_text(self) -> str:
        """The whole file as text (a JSON index or config); refused past ``TEXT_LIMIT`` bytes."""
        if self.size > TEXT_LIMIT:
            raise CheckpointError(f"{self.label}: {self.size} bytes, too large for a JSON file")
        try:
            return self.read(0, self.size, keep=False).tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{self.label}: not UTF-8 text ({exc.reason})") from None

    def local_copy(self, group: str) -> Path:
        """The file downloaded into the workspace, beside the other files of checkpoint *group*."""
        path = self.workspace.download_folder(group) / PurePosixPath(self.name).name
        if not path.exists():
            partial = path.with_name(f".partial-{uuid.uuid4().hex[:12]}")  # short: the name may be at NAME_MAX
            self.retrying("downloading", lambda: self._download(partial))
            os.replace(partial, path)
        return path

    def content_id(self) -> str | None:
        """A name of the file's bytes that its source gives without reading them (a content ETag, a git blob
        id), for telling two files with the same bytes apart from others; None where there is none."""
        return None

    def check_unchanged(self) -> None:
        """Refuse the file if it is not the version listed (replaced while it was read). A source whose reads
        are pinned to a version (a hub revision's commit) checks each answer instead: nothing to do here."""

    def retrying(self, what: str, call: Callable[[], T]) -> T:
        """``call()``, tried again after a transient failure (see the module's docstring)."""
        return retrying(self.label, what, call, self._transient, self._reset, self.workspace.closing)

    # -- the transport ---------------------------------------------------------

    @abstractmethod
    def _fetch(self, start: int, stop: int, out: memoryview) -> None:
        """Bytes [start, stop) of the file into *out*."""

    @abstractmethod
    def _download(self, path: Path) -> None:
        """The whole file to the local *path*."""

    def _transient(self, exc: Exception) -> bool:
        return isinstance(exc, ConnectionError)

    def _reset(self) -> None:
        """Forget what a failed request may have left stale (a resolved location), before it is tried again."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the store's provenance records of this file."""

    @abstractmethod
    def matches(self, recorded: Mapping[str, Any]) -> bool:
        """Whether this file holds what *recorded* (an :meth:`identity`) describes."""


class _Absent:
    """A name that is not in a remote folder."""

    def __init__(self, label: str):
        self.label = label
        self.name = label.rstrip("/").rsplit("/", 1)[-1]

    def exists(self) -> bool:
        return False

    def is_dir(self) -> bool:
        return False

    def __str__(self) -> str:
        return self.label


class RemoteFolder(ABC):
    """A remote folder, listed once: what discover.py's layout rules read (``/``, ``iterdir``, ``exists``)."""

    def __init__(self, label: str):
        self.label = label.rstrip("/")
        self._listing: dict[str, RemoteFile | RemoteFolder] | None = None

    @property
    def name(self) -> str:
        return self.label.rsplit("/", 1)[-1]

    @property
    def parent(self) -> str:
        return self.label.rsplit("/", 1)[0]

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r})"

    @abstractmethod
    def _list(self) -> dict[str, RemoteFile | RemoteFolder]:
        """The folder's entries by name, asked of the remote end (once: :meth:`children` keeps them)."""

    def children(self) -> dict[str, RemoteFile | RemoteFolder]:
        if self._listing is None:
            self._listing = self._list()
        return self._listing

    @abstractmethod
    def exists(self) -> bool:
        """Whether the folder is there."""

    def is_dir(self) -> bool:
        return self.exists()

    def iterdir(self) -> Iterator[RemoteFile | RemoteFolder]:
        return iter(list(self.children().values()))

    def __truediv__(self, name: str) -> RemoteFile | RemoteFolder | _Absent:
        return self.children().get(name) or _Absent(f"{self.label}/{name}")


def is_remote(files: Sequence[Any]) -> bool:
    """Whether a checkpoint's files are remote."""
    return any(isinstance(f, RemoteFile) for f in files)


class Source(ABC):
    """Checkpoints and where they came from; a context manager that deletes its workspace on exit."""

    url: str  # recorded as the store's source
    is_local = False

    @property
    def label(self) -> str:
        """What messages call the source."""
        return self.url

    @abstractmethod
    def checkpoints(self, steps: Sequence[int] | None = None) -> list[Checkpoint]:
        """The source's checkpoints in step order (only *steps*, if given)."""

    def provenance(self) -> dict[str, Any]:
        """Entries for the store's provenance beside ``source`` (a hub's endpoint)."""
        return {}

    def model_config(self, first: Checkpoint) -> dict[str, int]:
        """The head counts and widths of the ``config.json`` beside the first checkpoint, else at the top of
        the source (see :mod:`~.model_config`); empty if there is none."""
        folders = [f.parent for f in first.files[:1] if isinstance(f, RemoteFile) and f.parent is not None]
        return read_remote_model_config([*folders, *self._top()])

    def _top(self) -> list[RemoteFolder]:
        return []

    def close(self) -> None:
        """Delete what the source kept locally."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalSource(Source):
    """A local folder of checkpoints (discover.py's layouts), or one model's folder of the hub cache (hub_cache.py)."""

    is_local = True

    def __init__(self, folder: Path):
        self.folder = folder
        self.url = str(folder.resolve())
        self.cache = None

    @property
    def label(self) -> str:
        return str(self.folder)

    def checkpoints(self, steps: Sequence[int] | None = None) -> list[Checkpoint]:
        from .discover import discover
        from .hub_cache import is_hub_cache, list_cache

        if not is_hub_cache(self.folder):
            return discover(self.folder, steps)
        if steps is not None:
            raise StepError(f"{self.folder}: a hub cache's steps come from its revision names; select steps with "
                            "select=")
        self.cache = list_cache(self.folder)
        return self.cache.checkpoints

    def provenance(self) -> dict[str, Any]:
        return {} if self.cache is None else {"hub_cache": self.cache.provenance()}

    def model_config(self, first: Checkpoint) -> dict[str, int]:
        label = Path(first.label)
        return read_model_config([label if label.is_dir() else label.parent, self.folder])


def read_config(folder: RemoteFolder) -> dict[str, Any] | None:
    """The ``config.json`` of a remote folder as a dict; None if it is missing, unreadable or not an object."""
    config = folder / "config.json"
    if not isinstance(config, RemoteFile) or config.size > MAX_BYTES:
        return None
    try:
        value = json.loads(config.read_text())
    except (SpectralAnalyzerError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def read_remote_model_config(folders: Sequence[RemoteFolder]) -> dict[str, int]:
    """:func:`~.model_config.read_model_config` for remote folders: a missing, unreadable or malformed
    ``config.json`` is no error."""
    for folder in folders:
        config = read_config(folder)
        if config is not None:
            return attention_config(config)
    return {}


def open_source(
    src: str | os.PathLike,
    *,
    revisions: str | Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    keep_in_memory: int | None = None,
) -> Source:
    """The source at *src*: ``hf://org/name`` (hub revisions), an fsspec URL, or a local folder.

    *revisions* selects hub revisions (see :func:`~.hub.select_revisions`);
    *storage_options* go to the fsspec filesystem of a URL. *keep_in_memory*
    bounds the kept ranges held in memory (default ``KEEP_IN_MEMORY``).
    """
    from ..store.location import is_url

    text = str(src)
    if text.startswith("hf://"):
        from .hub import HubSource

        return HubSource(text, revisions, Workspace(keep_in_memory))
    if revisions is not None:
        raise StepError(f"{text}: revisions select the revisions of a hub repository (hf://org/name); "
                        "a folder's checkpoints are selected by their steps")
    if is_url(text):
        from .remote import FsspecSource

        return FsspecSource(text, storage_options, Workspace(keep_in_memory))
    return LocalSource(Path(text.removeprefix("file://")))
