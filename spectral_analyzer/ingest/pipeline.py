"""Streaming ingest: checkpoints -> float32 delta rows in the store.

Tensor by tensor, in the manifest's canonical order: load a tensor from the
previous and the current checkpoint, upcast (bf16/fp16 -> float32), subtract,
and stream the result into chunk-sized buffers written by a small thread
pool. Peak memory is about two copies of the largest tensor plus the write
buffers, whatever the model's size. A row is committed (one atomic metadata
write) only after its data and step are written; a killed ingest run again
resumes after the last commit and ends bit-identical to an uninterrupted one.
Bad input found part-way leaves an existing store exactly as it was.

The checkpoints come from a source (sources.py): a local folder, a folder at
an fsspec URL, or the revisions of a hub repository. A remote source that
still fails after its retries stops the ingest with the rows committed so far
kept, as an interruption does: the same ingest run again resumes after them.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import (
    CheckpointError,
    DuplicateCheckpointWarning,
    InconsistentCheckpointsError,
    MetricsError,
    ModelCopyWarning,
    NonFiniteError,
    OutlierDeltaWarning,
    PrecisionChangeWarning,
    SelectionError,
    SourceError,
    StepError,
    StoreError,
    StoreExistsError,
    TiedWeightsWarning,
    UnderflowWarning,
    UnreadWeightsWarning,
    printable,
)
from ..progress import progress_bar
from ..steps import StepSelection
from ..store import DEFAULT_CHUNK_SIZE, Store, StoreWriter, TensorEntry
from ..store.crc import crc32c
from ..store.generations import base_link, chain, chunk_crc, hex_of, zero_crc
from ..threads import torch_threads
from ..weights import ingest_packing, matrices_of, select_weights
from ..weights.kernel import singular_values
from .anomalies import OUTLIER_HISTORY, DeltaNorms, identical_message, squared_norm
from .discover import Checkpoint, copies_of, has_step_word, natural_key, order_by_step, same_bytes
from .metrics import find_trainer_state, read_metrics
from .readers import KeyOptions, TensorInfo, needs_download, open_checkpoint, patterns
from .sources import RemoteFile, Source, is_remote, open_source

__all__ = ["ingest_store"]

_HASH_BLOCK = 8 * 1024 * 1024


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    except OSError as exc:  # e.g. deleted by the trainer's checkpoint rotation while being read
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return h.hexdigest()


def _fingerprint(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _same_file(path: Path | RemoteFile, recorded: dict[str, Any]) -> bool:
    """Whether *path* holds what was ingested (a remote file: its identity).

    The same size and mtime vouch for the same content only at the path that was ingested: a file of another
    folder (a copy kept with its times, a run of the same sweep saved in the same second on a filesystem with
    coarse times) is compared by its sha256.
    """
    if isinstance(path, RemoteFile):
        return path.matches(recorded)
    st = path.stat()
    if st.st_size != recorded["size"]:
        return False
    if st.st_mtime_ns == recorded.get("mtime_ns") and str(path.resolve()) == recorded.get("path"):
        return True
    return _sha256(path) == recorded.get("sha256")


@dataclass
class _Planned:
    checkpoint: Checkpoint
    step: int
    tensors: dict[str, TensorInfo] | None  # None: a remote pickle, not read until its row is written
    considered: frozenset[str] = frozenset()  # its tensors' names before include / exclude
    unread: Mapping[str, str] = field(default_factory=dict)  # selected weights of no float dtype: name: dtype
    beside: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (file, key): weights outside its state dict


def _same_values(a: Checkpoint, b: Checkpoint, keys: KeyOptions) -> bool:
    """Whether two local checkpoints hold the same tensors, bit for bit (read one tensor at a time)."""
    if is_remote(a.files) or is_remote(b.files):
        return False
    ra, rb = open_checkpoint(a.files, a.label, keys), open_checkpoint(b.files, b.label, keys)
    if _signature(ra.tensors) != _signature(rb.tensors):
        return False
    for name in ra.tensors:
        x, y = ra.read(name), rb.read(name)
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def _name_or_stored(c: Checkpoint, stored: int | None) -> int:
    """The step of *c*, named by its name, where the file stores *stored* (see :func:`_preflight`)."""
    if stored is None or stored == c.step:
        return c.step
    if not has_step_word(Path(c.label).name):
        return stored  # a number in the name that is not said to be the step
    if Path(c.label).suffix == ".ckpt" and stored == c.step + 1:
        return c.step  # Lightning before 1.6
    raise StepError(f"{printable(c.label)}: its name says step {c.step} and the file records step {stored}; "
                    "rename it, or give the steps")


def _preflight(
    checkpoints: Sequence[Checkpoint], keys: KeyOptions, selection: StepSelection | None = None, src: str = "",
    named: bool = True,
) -> list[_Planned]:
    """Open the header of every selected checkpoint: steps, tensor names, shapes, dtypes.

    Checkpoints whose step is known from their name and not selected are
    never opened; those whose step is stored inside are opened to learn it.
    A remote pickle with a step in its name, other than the first checkpoint,
    is only opened when its row is written (opening it downloads it whole).
    Where the file stores a step and the name's (*named*: not given) is
    another: a bare number in the name (``model_epoch_3.pt``) gives way to
    the stored step; a step word's (``step=99``) is refused, but for a
    Lightning ``.ckpt`` storing it plus one (Lightning before 1.6 stored
    ``global_step + 1`` and named the file by ``global_step``).
    """
    if selection is not None:
        checkpoints = [c for c in checkpoints if c.step is None or selection.keeps(c.step)]
    planned = []
    for c in checkpoints:
        if planned and c.step is not None and needs_download(c.files):
            planned.append(_Planned(c, c.step, None))
            continue
        reader = open_checkpoint(c.files, c.label, keys)
        step = c.step if c.step is not None else reader.step_hint
        if named and c.step is not None:
            step = _name_or_stored(c, reader.step_hint)
        planned.append(_Planned(replace(c, step=step), step, reader.tensors, frozenset(reader.considered),
                                dict(reader.unread), dict(reader.beside)))
    if selection is not None:
        selection.check_exact([p.step for p in planned], str(src))
        kept = [p for p in planned if p.step is not None and selection.keeps(p.step)]
        if not kept:
            raise SelectionError(f"{src}: the step selection '{selection}' keeps none of its checkpoints")
        planned = kept
    copies = copies_of([p.checkpoint for p in planned], {c.label for c in checkpoints if c.step is None},
                       lambda a, b: same_bytes(a.files, b.files) or _same_values(a, b, keys))
    if copies:  # Lightning's last.ckpt beside the checkpoint it copies: read once, and told
        (copy, original), more = next(iter(copies.items())), len(copies) - 1
        warnings.warn(printable(f"{copy}: the same weights as {original}, not read twice"
                                f"{f' (and {more} more such)' if more else ''}"), UnreadWeightsWarning, stacklevel=3)
        planned = [p if not (mine := [c for c, o in copies.items() if o == p.checkpoint.label]) else
                   replace(p, checkpoint=replace(p.checkpoint, origin={**p.checkpoint.origin, "copies": mine}))
                   for p in planned if p.checkpoint.label not in copies]  # the copies kept in provenance
    by_checkpoint = {id(p.checkpoint): p for p in planned}
    ordered = order_by_step([p.checkpoint for p in planned])
    return [by_checkpoint[id(c)] for c in ordered]


def _signature(tensors: dict[str, TensorInfo]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's (shape, dtype): what every checkpoint of a run must agree on."""
    return {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}


def _check_names(names: Iterable[str], label: str) -> None:
    """Refuse a tensor name that is no Unicode text (a lone surrogate, which a pickle can hold): results and
    exports name tensors in UTF-8; or that holds a NUL, which numpy's strings drop at the end (``w`` and
    ``w\x00`` would be one label of the results)."""
    for name in names:
        try:
            name.encode()
        except UnicodeEncodeError:
            raise CheckpointError(f"{label}: tensor {name!r} has a name that is not Unicode text (a lone "
                                  "surrogate); rename it in the checkpoint") from None
        if "\x00" in name:
            raise CheckpointError(f"{label}: tensor {name!r} has a NUL character in its name; rename it in the "
                                  "checkpoint")


def _check_consistent(
    reference: dict[str, tuple], ref_label: str, other: _Planned, what: str = "", dtypes: bool = False,
    ref_unread: Mapping[str, str] = {},
) -> None:
    """That *other* has the tensors of *reference* (``_signature``) with the same shapes (and dtypes, if
    asked: a file checked against its own plan). *ref_unread*: the reference's weights of no float dtype
    (a weight that is float in one checkpoint and int8 in the other is named so, not as missing)."""
    here = _signature(other.tensors)
    label = f"{other.checkpoint.label}{what}"
    for name in sorted(reference, key=natural_key):
        if name not in here and name in other.unread:
            raise InconsistentCheckpointsError(
                f"tensor {name!r} is {reference[name][1]} in {ref_label} but {other.unread[name]} in {label}, "
                "which is not read (only floating-point tensors are)")
        if name not in here:
            twins = [n for n in sorted(here, key=natural_key) if n not in reference and here[n][0] == reference[name][0]]
            hint = (f"; it has {twins[0]!r} of that shape instead (one weight under another name: a tied weight "
                    "kept under its other name, a prefix such as torch.compile's '_orig_mod.'?)") if twins else ""
            raise InconsistentCheckpointsError(f"tensor {name!r} is in {ref_label} but missing from {label}{hint}")
        (shape, dtype), (shape2, dtype2) = reference[name], here[name]
        if shape != shape2:
            raise InconsistentCheckpointsError(
                f"tensor {name!r} has shape {shape} in {ref_label} but {shape2} in {label}"
            )
        if dtypes and dtype != dtype2:
            raise InconsistentCheckpointsError(f"tensor {name!r} is {dtype} in {ref_label} but {dtype2} in {label}")
    for name in sorted(here, key=natural_key):
        if name not in reference and name in ref_unread:
            raise InconsistentCheckpointsError(
                f"tensor {name!r} is {ref_unread[name]} in {ref_label}, which is not read (only floating-point "
                f"tensors are), but {here[name][1]} in {label}")
        if name not in reference:
            raise InconsistentCheckpointsError(f"tensor {name!r} appears in {label} but not in {ref_label}; a "
                                               f"parameter added during the run can be left out with exclude={name!r}")


def _precision_changes(planned: Sequence[_Planned], new: Sequence[_Planned], last_step: int | None = None
                       ) -> tuple[str | None, set[int]]:
    """A message where a tensor's dtype changes between consecutive checkpoints (in step order) into one of
    *new*, else None; and the steps of *new* compared so with the checkpoint right before them (the others,
    whose tensors or predecessor are not at hand before their rows are written, are compared by
    :func:`write_rows`). *last_step*: the store's last step, the one the first new checkpoint follows.

    The deltas stay exact differences of the stored values, but the one across the change also holds the
    rounding of one precision into the other (float32 to bfloat16: about 2^-9 of each value), which can
    dwarf a training update and look like an event."""
    fresh = {id(p) for p in new}
    message, later, compared = None, [], set()
    for a, b in zip(planned, planned[1:]):
        if id(b) not in fresh or a.tensors is None or b.tensors is None:
            continue  # a remote pickle not read yet: compared when its row is written
        if id(a) not in fresh and a.step != last_step:
            continue  # the store's last checkpoint is not at hand (its file gone): compared with its record
        compared.add(b.step)
        da, db = _signature(a.tensors), _signature(b.tensors)
        told = _precision_message(da, a.step, _shown(a.checkpoint), db, b.step, _shown(b.checkpoint))
        if told is not None and message is not None:
            later.append(b.step)
        elif told is not None:
            message = told
    if later:
        steps = ", ".join(map(str, later[:5])) + (f" and {len(later) - 5} more" if len(later) > 5 else "")
        message += f"; precisions change again in the deltas to step{'s' * (len(later) > 1)} {steps}"
    return message, compared


def _precision_message(before: Mapping[str, tuple], step_a: int, label_a: str, after: Mapping[str, tuple],
                       step_b: int, label_b: str) -> str | None:
    """The message for tensors whose dtype differs between two checkpoints' signatures (name: (shape, dtype)),
    or None."""
    changed = [n for n in sorted(before, key=natural_key) if n in after and before[n][1] != after[n][1]]
    if not changed:
        return None
    n = changed[0]
    more = f" (and {len(changed) - 1} more tensors)" if len(changed) > 1 else ""
    return (f"tensor {n!r} is {before[n][1]} at step {step_a} ({label_a}) but {after[n][1]} at step {step_b} "
            f"({label_b}){more}: the delta between them holds the rounding of the change of precision besides "
            "the update")


def _dtype_runs(signature: Mapping[str, tuple], manifest: Sequence[TensorEntry]) -> list[list]:
    """The dtypes of *manifest*'s tensors in a checkpoint, as [dtype, count] runs in manifest order: what a
    commit record keeps of its last checkpoint, so that an append compares its first checkpoint's precision
    with the store's last (whose file may be gone) and a recorder started anew with the store's last."""
    runs: list[list] = []
    for t in manifest:
        dtype = signature[t.name][1]
        if runs and runs[-1][0] == dtype:
            runs[-1][1] += 1
        else:
            runs.append([dtype, 1])
    return runs


def _recorded_signature(record: Mapping[str, Any] | None, manifest: Sequence[TensorEntry]
                        ) -> dict[str, tuple] | None:
    """The store's last checkpoint's signature from its commit record's dtype runs; None where the record
    keeps none (written before it was recorded) or they do not fit the manifest."""
    runs = (record or {}).get("last_dtypes")
    if not isinstance(runs, list) or sum(int(n) for _, n in runs) != len(manifest):
        return None
    dtypes = [dtype for dtype, n in runs for _ in range(int(n))]
    return {t.name: (tuple(t.shape), d) for t, d in zip(manifest, dtypes)}


def _values_crc(t: torch.Tensor) -> int:
    """crc32c of tensor *t*'s values, in its dtype."""
    return crc32c(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _check_unchanged(checkpoint: Checkpoint) -> None:
    """Refuse *checkpoint*, read and not yet committed, if a remote file of it was replaced since it was listed:
    its tensors, fetched by range, may come from both versions, and its provenance would name the old one."""
    for f in checkpoint.files:
        if isinstance(f, RemoteFile):
            f.check_unchanged()


class _TieCandidates:
    """Tensors that may be one tied weight saved under two names: for each tensor that shares its shape with
    another, a running crc32c over its rows' update crcs, whether an update was nonzero, and the rows seen.

    Kept in the commit record (``ties``, with the rows it covers), so that an append, or a run ingested one
    checkpoint at a time, goes on comparing the whole run's updates; a tensor whose updates differ from every
    other's once is dropped for good.
    """

    def __init__(self, manifest: Sequence[TensorEntry], record: Mapping[str, Any] | None):
        self.sizes = {t.name: t.size for t in manifest}
        record = record or {}
        self.rows = int(record.get("n_deltas", 0))  # the rows the state is that of
        kept = record.get("ties")
        if kept is not None and kept.get("rows") == self.rows:
            self.state = {n: list(v) for n, v in kept["tensors"].items()}
        else:  # a new store, or one whose record keeps none for its rows: from the rows of this call
            shapes: dict[tuple, list[str]] = {}
            for t in manifest:
                shapes.setdefault(tuple(t.shape), []).append(t.name)
            self.state = {n: [0, 0, 0] for names in shapes.values() if len(names) > 1 for n in names}

    def add(self, name: str, update: int) -> None:
        """The update crc of *name* in the row being written."""
        fold, nonzero, n = self.state[name]
        self.state[name] = [crc32c(np.array([update], dtype="<u4").view(np.uint8), fold),
                            int(nonzero or update != zero_crc(self.sizes[name])), n + 1]

    def record(self) -> dict[str, Any]:
        """The state after a row, the tensors that can no longer tie to another dropped."""
        groups: dict[tuple, list[str]] = {}
        for name, (fold, _, n) in self.state.items():
            groups.setdefault((self.sizes[name], fold, n), []).append(name)
        self.state = {n: self.state[n] for names in groups.values() if len(names) > 1 for n in names}
        self.rows += 1
        return {"rows": self.rows, "tensors": self.state}

    def message(self) -> str | None:
        """A message where tensors have the same update at every step, not all zero, over two rows or more (one
        row's coincidence is no tie: a recorder writes one at a time, and counts a tied weight once by its
        storage): one tied weight saved under two names, which the run counts twice; else None."""
        same: dict[tuple, list[str]] = {}
        for name, (fold, nonzero, n) in self.state.items():
            if n >= 2 and nonzero:
                same.setdefault((self.sizes[name], fold, n), []).append(name)
        pairs = [names for names in same.values() if len(names) > 1]
        if not pairs:
            return None
        (first, *rest), more = pairs[0], f" (and {len(pairs) - 1} more such)" if len(pairs) > 1 else ""
        twins = " and ".join(repr(n) for n in rest)
        return printable(
            f"tensors {first!r} and {twins}{more} have the same update at every step ingested: one tied weight "
            "saved under each name (torch.distributed.checkpoint keeps both, as does a state dict cloned to save as "
            "safetensors)? The run counts it once per name, so its updates weigh that much more in every Gram; if "
            f"it is one weight, ingest again with exclude={rest[0]!r}")


_COPY_WORDS = {"ema", "teacher", "target", "momentum", "shadow", "swa", "averaged", "polyak"}


def _model_copy(manifest: Sequence[TensorEntry], origin: str) -> str | None:
    """A message where the tensors under a top-level name that says copy (``model_ema``, ``ema_model``,
    ``teacher``, ``target_net``, ``momentum_encoder``; under it, ``module.`` as ``AveragedModel`` saves it)
    mirror a model: the same names (after that first part) and shapes as all the other tensors, or as all
    those of one other top-level module, two or more, nested (a name with a dot): a copy of a whole network,
    not one layer of the shape of another (``source_embedding``, ``target_embedding``); else None."""
    by_top: dict[str, dict[str, tuple]] = {}
    for t in manifest:
        top, _, rest = t.name.partition(".")
        if rest:
            by_top.setdefault(top, {})[rest] = tuple(t.shape)
    for top, tensors in by_top.items():
        if not _COPY_WORDS & set(re.split(r"[_\-]+", top.lower())):
            continue
        mirror = {rest.removeprefix("module."): shape for rest, shape in tensors.items()}
        if len(mirror) < 2 or not any("." in rest for rest in mirror):
            continue
        root = {t.name: tuple(t.shape) for t in manifest if not t.name.startswith(top + ".")}
        if mirror == root or any(mirror == its for other, its in by_top.items() if other != top):
            return printable(
                f"{origin}: the {len(tensors)} tensors under {top + '.'!r} repeat the names and shapes of the "
                "model's own: a copy of the model (an EMA, a teacher or target network) saved beside it? It is "
                "read as parameters of its own, and its updates are summed into every Gram; if it is a copy, "
                f"ingest again with exclude={top + '.*'!r}")
    return None


def _manifest(tensors: dict[str, TensorInfo]) -> list[TensorEntry]:
    entries, offset = [], 0
    for name in sorted(tensors, key=natural_key):
        t = tensors[name]
        entries.append(TensorEntry(name, offset, t.size, t.shape, str(t.dtype).removeprefix("torch.")))
        offset += t.size
    return entries


class _Writer:
    """Writes whole chunks on a few threads, with a bound on buffers in flight."""

    def __init__(self, store: Store, threads: int = 2, in_flight: int = 4):
        self.store = store
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="spectral-write")
        self.slots = threading.BoundedSemaphore(in_flight)
        self.futures: list[Future] = []

    def submit(self, name: str, row: int | None, start: int, data: np.ndarray, squares: bool = False) -> Future:
        """Write the chunk; the future gives its crc32c and, if asked, the sum of its squares (float64)."""
        self.slots.acquire()

        def work():
            try:
                crc = self.store.write_chunk(name, row, start, data)
                return crc, squared_norm(data) if squares else None
            finally:
                self.slots.release()

        future = self.pool.submit(work)
        self.futures.append(future)
        return future

    def wait(self) -> None:
        futures, self.futures = self.futures, []
        for f in futures:
            f.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _ChunkedRow:
    """Assembles one flat row in chunk-sized buffers and hands out each chunk once it is full.

    The caller fills the buffer in place (``segments``), so a delta is
    computed straight into the chunk it is written from, with no copy of a
    whole tensor in float32.
    """

    def __init__(self, chunk: int, n_params: int, emit: Callable[[int, np.ndarray], Future]):
        self.chunk, self.n_params, self.emit = chunk, n_params, emit
        self.written: list[Future] = []
        self.start = 0
        self.fill = 0
        self.buf = np.empty(min(chunk, n_params), dtype=np.float32)

    def segments(self, n: int) -> Iterator[tuple[np.ndarray, int, int]]:
        """The next *n* values of the row, as (buffer view, lo, hi) in order: the caller writes values
        lo:hi of its tensor into the view before asking for the next segment."""
        pos = 0
        while pos < n:
            take = min(self.buf.size - self.fill, n - pos)
            yield self.buf[self.fill : self.fill + take], pos, pos + take
            self.fill += take
            pos += take
            if self.fill == self.buf.size:
                self.written.append(self.emit(self.start, self.buf))
                self.start += self.fill
                self.fill = 0
                remaining = self.n_params - self.start
                self.buf = np.empty(min(self.chunk, remaining), dtype=np.float32) if remaining else self.buf

    def add(self, flat: np.ndarray) -> None:
        for view, lo, hi in self.segments(flat.size):
            view[:] = flat[lo:hi]

    def crcs(self) -> list[int]:
        return [f.result()[0] for f in self.written]


def _crc_only(start: int, data: np.ndarray) -> Future:
    """A chunk's crc32c, as a finished future (for a _ChunkedRow that only checks values against a store)."""
    done: Future = Future()
    done.set_result((chunk_crc(data), None))
    return done


class _StoredTheta:
    """Theta at the store's last commit, read from ``last_theta`` a checked chunk at a time."""

    def __init__(self, store: Store):
        self.store = store
        self.entries = {t.name: t for t in store.manifest}
        self.label = f"{store.path} (last_theta)"
        self._chunk: tuple[int, np.ndarray] | None = None

    def read(self, name: str) -> torch.Tensor:
        t = self.entries[name]
        out = np.empty(t.size, dtype=np.float32)
        for a, b in self.store.chunk_bounds():
            lo, hi = max(a, t.offset), min(b, t.offset + t.size)
            if lo >= hi:
                continue
            if self._chunk is None or self._chunk[0] != a:
                self._chunk = (a, self.store.read_last_theta(a, b))
            out[lo - t.offset : hi - t.offset] = self._chunk[1][lo - a : hi - a]
        return torch.from_numpy(out).reshape(t.shape)


class _WeightRecorder:
    """Singular values of the selected source matrices of one checkpoint, written before its commit."""

    def __init__(self, store: Store):
        self.store = store
        record = store.weights.info()
        self.packing = {} if record is None else store.weights.packing()
        # by the tensor each matrix is read from: a stacked experts tensor holds several (name[expert i])
        self.picked: dict[str, list[tuple[TensorEntry, list[str], int]]] = {}
        if record is not None:
            offsets = sorted((t.offset, t.name) for t in store.manifest if t.size)
            for t, parts in select_weights(store.manifest, record[0], self.packing):
                start, source = offsets[bisect.bisect_right(offsets, (t.offset, "\U0010ffff")) - 1]
                self.picked.setdefault(source, []).append((t, parts, t.offset - start))
        self.matrices = [] if record is None else record[1]
        self.rank = 0 if record is None else record[2]
        self.values: dict[str, np.ndarray] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        for t, parts, start in self.picked.get(name, []):
            flat = tensor.reshape(-1)[start : start + t.size].to(torch.float64).numpy()
            mats = matrices_of([(t, parts)], [flat], packing=self.packing)
            with torch_threads():  # beside the writer threads: only the cores free now
                values = singular_values([m for _, m in mats])
            for (matrix, _), s in zip(mats, values):
                self.values[matrix] = s

    def write(self, index: int, link: int) -> None:
        """The record of checkpoint *index*, tied to *link*, the generation chain's value there."""
        if not self.matrices:
            return
        out = np.full((len(self.matrices), self.rank), np.nan)
        for j, matrix in enumerate(self.matrices):
            s = self.values[matrix]
            out[j, : s.size] = s
        self.store.weights.write_row(index, out, link)
        self.values = {}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of *t* is finite.

    A NaN or an infinity makes the minimum or the maximum non-finite: one
    reduction pass, without the boolean copy of ``isfinite(t).all()`` (about
    ten times faster on a CPU).
    """
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _check_finite(t: torch.Tensor, name: str, label: str, step: int) -> None:
    """NaN/Inf refused; so are float64 values that float32 cannot hold (|x| rounds past 3.4e38), at every
    checkpoint: the base and ``last_theta`` are float32, and a run is accepted or refused as a whole,
    whichever of its checkpoints holds such values."""
    if t.numel() == 0:
        return
    low, high = torch.aminmax(t)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        n_bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"tensor {name!r} at step {step} ({label}) holds {n_bad} NaN/Inf values")
    if t.dtype == torch.float64 and not _all_finite(torch.stack([low, high]).to(torch.float32)):
        _check_float32(t.to(torch.float32), name, label, step, "of its values")


def _delta(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(cur.dtype, prev.dtype), torch.float32)
    return (cur.to(dtype) - prev.to(dtype)).to(torch.float32)


UNDERFLOW = "are below float32's range"  # in the message of an UnderflowWarning (told once a store per tensor)


def _delta_into(out: torch.Tensor, cur: torch.Tensor, prev: torch.Tensor) -> int:
    """``out[:] = _delta(cur, prev)`` for float32 *out*, without temporaries where the difference is
    taken in float32 anyway (float16, bfloat16 and float32 sources): the same rounding, bit for bit.

    Returns how many differences float32 lost below its range: taken in float64, nonzero, and rounded
    to a subnormal or to 0 (a float64 parameter moving by 1e-50 would read as frozen). Differences of
    float32 values below its smallest normal number are exact."""
    dtype = torch.promote_types(torch.promote_types(cur.dtype, prev.dtype), torch.float32)
    if dtype == torch.float32:
        out.copy_(cur)
        out.sub_(prev)
        return 0
    wide = cur.to(dtype) - prev.to(dtype)
    out.copy_(wide)
    small = out.abs() < torch.finfo(torch.float32).tiny
    if not bool(small.any()):
        return 0
    return int(((wide[small] != 0) & (out[small].to(dtype) != wide[small])).sum())


def _may_overflow_float32(*dtypes: torch.dtype) -> bool:
    """Whether a value or a difference of values of these dtypes can overflow float32 (float16's
    range is far inside it; float32's own difference, bfloat16's and float64's are not)."""
    return not all(d == torch.float16 or not d.is_floating_point for d in dtypes)


def _check_float32(t: torch.Tensor, name: str, label: str, step: int, what: str) -> None:
    """Values finite in the source may overflow float32 (|x| > 3.4e38) once stored."""
    if not _all_finite(t):
        n_bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"tensor {name!r} at step {step} ({label}): {n_bad} {what} overflow float32")


def _exact_in_float32(x: torch.Tensor, x32: torch.Tensor) -> bool:
    """Whether *x32* (``x`` in float32) is *x* exactly: always but for float64 values float32 rounds."""
    return x.dtype != torch.float64 or torch.equal(x32.to(torch.float64), x)


def _stored_is_exact(st: Store, record: dict[str, Any], file_at_hand: bool = False) -> bool:
    """Whether ``last_theta`` (float32) holds the last checkpoint exactly, so that deltas can be taken from
    it: as recorded when it was written. For a store written before that was recorded, not where the
    checkpoint's file is at hand (read instead: exact whatever its precision); else when no tensor of the
    manifest, which has the first checkpoint's dtypes, comes from float64."""
    exact = record.get("last_exact")
    if exact is not None:
        return bool(exact)
    return not file_at_hand and all(t.dtype != "float64" for t in st.manifest)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    return progress_bar(total=total, unit="B", unit_scale=True, desc="ingest", leave=False)


def _warn_unread(new: list[_Planned]) -> None:
    """One warning for the weight files beside the checkpoints' own that are not read (an adapter beside the
    base model, an EMA copy), each source's entry in provenance listing its own; one for the weights that are
    not floating point (int8 quantised, complex), which the run leaves out."""
    for empty in (False, True):  # weights of no float dtype; weights that hold no values (placeholders)
        p = next((p for p in new if any(k.startswith("no values") == empty for k in p.unread.values())), None)
        if p is None:
            continue
        named = [(n, k) for n, k in p.unread.items() if k.startswith("no values") == empty]
        (name, kind), more = named[0], f" and {len(named) - 1} more" if len(named) > 1 else ""
        verb = ("hold" if empty else "are") if more else ("holds" if empty else "is")
        why = (f"{verb} no values: placeholders of weights saved without them (DeepSpeed ZeRO-3's save_pretrained "
               "without gathering?), so the run lacks those weights; save the gathered model" if empty else
               f"{verb} not read: only floating-point tensors are; quantised weights and complex parameters are not "
               "part of the run (dequantise them, or leave them out with exclude= to silence this)")
        warnings.warn(printable(f"{p.checkpoint.label}: tensor {name!r} ({kind}){more} {why}"),
                      UnreadWeightsWarning, stacklevel=4)
    over = [(p.checkpoint, name) for p in new for name in p.checkpoint.passed_over]
    if over:
        (checkpoint, name), files = over[0], over[0][0].files
        more = f", and {len(over) - 1} more beside the other checkpoints" if len(over) > 1 else ""
        taken = ", ".join(f.name for f in files[:2]) + (", ..." if len(files) > 2 else "")
        warnings.warn(printable(
            f"{checkpoint.label}: {name} is not read{more}: the checkpoint is its model's weights ({taken}); "
            "an adapter, EMA copy or second model beside them is not part of the run"), UnreadWeightsWarning,
            stacklevel=4)
    inside = [(p.checkpoint, file, key, n) for p in new for (file, key), n in p.beside.items()]
    if inside:
        (checkpoint, file, key, n), more = inside[0], f" (and {len(inside) - 1} more such)" if len(inside) > 1 else ""
        of = "" if Path(checkpoint.label).name == file else f" of {file}"
        warnings.warn(printable(
            f"{checkpoint.label}: {n} tensor{'s' * (n > 1)} under {key!r}{of}{more} {'are' if n > 1 else 'is'} "
            "not read: the run is the weights of the file's state dict; an EMA copy, teacher, second model or "
            "training state saved beside them is not part of it (save the one to analyse as the state dict)"),
            UnreadWeightsWarning, stacklevel=4)


def weights_crc(chunk_crcs: Sequence[int]) -> int:
    """One checksum of a checkpoint's float32 weights: the crc32c of its chunks' crc32c values."""
    return crc32c(np.asarray(chunk_crcs, dtype=np.uint32))


def stored_unread(store: Store) -> dict[str, str]:
    """The weights of no float dtype (name: dtype) the store's last checkpoint held, as its source records."""
    return store.sources_at(store.n_deltas)[0].get("unread") or {}


def _match_existing(store: Store, manifest: list[TensorEntry], planned: list[_Planned]) -> list[_Planned]:
    """Check that *planned* continues the run in *store*; return the new checkpoints."""
    stored = {t.name: tuple(t.shape) for t in store.manifest}
    wanted = {t.name: tuple(t.shape) for t in manifest}
    if stored != wanted:
        missing = sorted(set(stored) - set(wanted), key=natural_key)
        extra = sorted(set(wanted) - set(stored), key=natural_key)
        changed = sorted((n for n in set(stored) & set(wanted) if stored[n] != wanted[n]), key=natural_key)
        unread = stored_unread(store) if extra else {}
        what = (
            f"tensor {missing[0]!r} is in the store but not in the checkpoints" if missing
            else f"tensor {extra[0]!r} is {unread[extra[0]]} in the store's checkpoints, which is not read (only "
            "floating-point tensors are), but is read in these" if extra and extra[0] in unread
            else f"tensor {extra[0]!r} is in the checkpoints but not in the store" if extra
            else f"tensor {changed[0]!r} has shape {stored[changed[0]]} in the store "
            f"but {wanted[changed[0]]} in the checkpoints"
        )
        raise StoreExistsError(f"{store.path}: holds a different run ({what}); pass overwrite to replace it")
    sources = {s["step"]: s for s in store.sources}
    last = max(sources) if sources else None
    new = []
    for p in planned:
        if last is not None and p.step <= last:
            if p.step not in sources:
                chosen = store.attrs.get("provenance", {}).get("options", {}).get("select")
                raise StepError(
                    f"{p.checkpoint.label}: step {p.step} is before the store's last step {last} "
                    "but not in the store; steps must increase"
                    + (f" (the store was made with the step selection {chosen!r}: give it again to append)"
                       if chosen else "")
                )
            recorded = sources[p.step]["files"]
            if len(recorded) != len(p.checkpoint.files) or not all(
                _same_file(f, r) for f, r in zip(p.checkpoint.files, recorded)
            ):
                raise StoreExistsError(
                    f"{store.path}: holds a different run (the checkpoint at step {p.step}, "
                    f"{p.checkpoint.label}, differs from the one ingested); pass overwrite to replace it"
                )
        else:
            new.append(p)
    return new


def ingest_store(
    src: str | os.PathLike,
    store: str | os.PathLike,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    strip_prefix: Sequence[str] = ("module.", "_orig_mod."),
    lightning_prefix: str | None = "model.",
    metrics: str | os.PathLike | None = None,
    steps: Sequence[int] | None = None,
    select: str | Sequence[int] | StepSelection | None = None,
    every: int | None = None,
    weights: str | Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    wait: bool | float = False,
    revisions: str | Sequence[str] | None = None,
    source_options: Mapping[str, Any] | None = None,
) -> str:
    """Ingest the checkpoints at *src* into the store at *store*; see :func:`spectral_analyzer.ingest`."""
    options = storage_options if source_options is None else source_options
    with open_source(src, revisions=revisions, storage_options=options) as source:
        return _ingest_source(
            source, str(store), chunk_size=chunk_size, include=include, exclude=exclude, strip_prefix=strip_prefix,
            lightning_prefix=lightning_prefix, metrics=metrics, steps=steps, select=select, every=every,
            weights=weights, overwrite=overwrite, progress=progress, storage_options=storage_options, wait=wait,
        )


def _ingest_source(
    source: Source,
    path: str,
    *,
    chunk_size: int,
    include: Sequence[str],
    exclude: Sequence[str],
    strip_prefix: Sequence[str],
    lightning_prefix: str | None,
    metrics: str | os.PathLike | None,
    steps: Sequence[int] | None,
    select: str | Sequence[int] | StepSelection | None,
    every: int | None,
    weights: str | Sequence[str] | None,
    overwrite: bool,
    progress: bool,
    storage_options: Mapping[str, Any] | None,
    wait: bool | float,
) -> str:
    # a string is one pattern, in the selection and in provenance alike
    include, exclude, strip_prefix = patterns(include), patterns(exclude), patterns(strip_prefix)
    keys = KeyOptions(strip_prefix, lightning_prefix, include, exclude)
    selection = StepSelection.parse(select, every)
    found = source.checkpoints(steps)
    planned = _preflight(found, keys, selection, source.label, named=steps is None)
    if not planned[0].tensors and (include or exclude):
        raise SelectionError(
            f"{source.label}: include {list(include)} and exclude {list(exclude)} leave no floating-point tensor "
            f"in {planned[0].checkpoint.label}; check the patterns against its tensor names"
        )
    # against every checkpoint's names: exclude= leaves out a parameter added during the run
    if (unmatched := keys.unmatched(frozenset().union(*(p.considered for p in planned)))) is not None:
        where = planned[0].checkpoint.label if len(planned) == 1 else f"{len(planned)} checkpoints"
        raise SelectionError(printable(
            f"{source.label}: the {unmatched[0]} pattern {unmatched[1]!r} matches no tensor of {where}; check it "
            "against their tensor names"))
    if (ambiguous := keys.ambiguous(planned[0].considered)) is not None:
        raise SelectionError(printable(f"{source.label}: {ambiguous} ({planned[0].checkpoint.label})"))
    first = _signature(planned[0].tensors)
    _check_names(first, planned[0].checkpoint.label)
    for p in planned[1:]:
        if p.tensors is not None:
            _check_consistent(first, planned[0].checkpoint.label, p, ref_unread=planned[0].unread)
    manifest = _manifest(planned[0].tensors)
    if metrics is not None:
        metrics_path = Path(metrics)
    elif source.is_local:
        # the newest trainer_state.json of the run, selected or not: its log history covers every step
        step_of = {c.label: c.step for c in found if c.step is not None}
        step_of.update({p.checkpoint.label: p.step for p in planned})
        metrics_path = find_trainer_state(source.folder, sorted(step_of, key=step_of.__getitem__))
    else:  # a remote source's metrics are given with metrics=
        metrics_path = None
    metric_table = read_metrics(metrics_path) if metrics_path is not None else None
    if metric_table is not None and not metric_table[1]:  # no series: written, it would replace those stored
        if metrics is not None:
            raise MetricsError(printable(f"{metrics_path}: holds no logged values (an empty file, or a header "
                                        "alone); give the run's training log, or leave metrics out"))
        metric_table = None  # a trainer_state.json of a run that has logged nothing yet

    match = None if weights is None else ([weights] if isinstance(weights, str) else list(weights))
    with StoreWriter(path, storage_options, overwrite=overwrite, wait=wait) as writer:
        if writer.existing is not None:
            st = writer.existing
            chosen = st.attrs.get("provenance", {}).get("options", {}).get("select")
            if chosen and selection is None:  # every checkpoint appended: new rows on another grid of steps
                raise StepError(printable(
                    f"{path}: was made with the step selection {chosen!r}, and this append gives none (every "
                    "checkpoint); give the same --select / --every (select= / every=) again to append"))
            new = _match_existing(st, manifest, planned)
            _warn_unread(new)
            recorded = st.weights.info()
            if match is not None and (recorded is None or recorded[0] != match):
                raise StoreError(
                    f"{path}: weight spectra are recorded for {recorded[0] if recorded else 'no'} matrices, not "
                    f"{match}; the choice is made when the store is created (pass overwrite to start again)"
                )
        else:
            new = planned
            _warn_unread(new)
            options = {
                "chunk_size": chunk_size,
                "include": list(include),
                "exclude": list(exclude),
                "strip_prefix": list(strip_prefix),
                "lightning_prefix": lightning_prefix,
                "weights": match,
            }
            if selection is not None:
                options["select"] = str(selection)
            provenance = {
                "source": source.url,
                **source.provenance(),
                "options": options,
                "versions": {
                    "spectral_analyzer": __version__,
                    "torch": torch.__version__,
                    "numpy": np.__version__,
                    "zarr": __import__("zarr").__version__,
                    "safetensors": __import__("safetensors").__version__,
                },
            }
            model_config = source.model_config(planned[0].checkpoint)
            if model_config:
                provenance["model_config"] = model_config
            st = writer.create(manifest, chunk_size, {"provenance": provenance})
            if match is not None:
                # q, k and v split as the analysis splits them (GPT-NeoX's and GPT-BigCode's per head)
                packing = ingest_packing(manifest, model_config or {}, path)
                picked = select_weights(manifest, match, packing)
                shapes = [(n, m.shape) for n, m in matrices_of(
                    picked, [np.empty(t.size, dtype=np.bool_) for t, _ in picked], packing=packing)]
                st.weights.create(match, [n for n, _ in shapes], max(min(s) for _, s in shapes),
                                  {t.name: packing[t.name] for t, _ in picked if t.name in packing})

        told_unread = {n for q in new for n in q.unread}  # told before the rows (_warn_unread): not again
        told_beside = {k for q in new for k in q.beside}

        def open_reader(p: _Planned):
            reader = open_checkpoint(p.checkpoint.files, p.checkpoint.label, keys)
            if p.tensors is None:  # a remote pickle, read for the first time: planned now as the others were
                p.tensors, p.considered = reader.tensors, frozenset(reader.considered)
                p.unread, p.beside = dict(reader.unread), dict(reader.beside)
                fresh_unread = {n: k for n, k in p.unread.items() if n not in told_unread}
                fresh_beside = {k: n for k, n in p.beside.items() if k not in told_beside}
                told_unread.update(fresh_unread)
                told_beside.update(fresh_beside)
                if fresh_unread or fresh_beside:  # what this one holds that none before it did
                    _warn_unread([replace(p, checkpoint=replace(p.checkpoint, passed_over=()), unread=fresh_unread,
                                          beside=fresh_beside)])
                _check_consistent(first, planned[0].checkpoint.label, p, ref_unread=planned[0].unread)
                if steps is None and _name_or_stored(p.checkpoint, reader.step_hint) != p.step:  # ordered by its name
                    raise StepError(f"{printable(p.checkpoint.label)}: its name says step {p.step} and the file "
                                    f"records step {reader.step_hint}; rename it, or give the steps")
            else:  # what was planned from its header: a file replaced since is refused, not read as planned
                _check_consistent(_signature(p.tensors), f"{p.checkpoint.label} as planned",
                                  replace(p, tensors=reader.tensors), " as opened to be read", dtypes=True)
                if steps is None and reader.step_hint is not None and (
                        _name_or_stored(p.checkpoint, reader.step_hint) != p.step):  # latest.pt, saved over
                    raise StepError(f"{printable(p.checkpoint.label)}: records step {reader.step_hint} as opened to "
                                    f"be read, not the step {p.step} it was planned at: it was written again during "
                                    "the ingest (a training still saving?); ingest again")
            return reader

        stored_last = st.last_checkpoint_step if st.commit_record else None
        precision, compared = _precision_changes(planned, new, stored_last)
        if precision is not None:
            warnings.warn(precision, PrecisionChangeWarning, stacklevel=2)
        copy = _model_copy(manifest, planned[0].checkpoint.label) if st.commit_record is None else None  # told when the store is made
        if copy is not None:
            warnings.warn(copy, ModelCopyWarning, stacklevel=2)
        failure = None
        try:
            write_rows(st, planned, new, open_reader, progress, notes=[n for n in (precision, copy) if n],
                       precision_compared=compared)
        except SourceError as exc:
            if overwrite or st.commit_record is None:
                raise  # an overwrite, or a store with nothing committed yet: undone
            failure = exc  # the rows committed so far stay, as after an interruption
        else:
            if metric_table is not None:
                st.write_metrics(*metric_table)
    if failure is not None:
        raise failure
    return path


def _open_following(new: list[_Planned], i: int, open_reader: Callable[[_Planned], Any]) -> Any:
    """Checkpoint *i*'s reader, opened while the one before it is ingested, where that lets its
    transfer start early: remote safetensors (read by byte range; their headers were read when the
    ingest was planned). None otherwise, or if it cannot be opened now: it is opened again in its
    turn, and a failure is reported there, after the rows before it are committed."""
    if i >= len(new) or not is_remote(new[i].checkpoint.files) or needs_download(new[i].checkpoint.files):
        return None
    try:
        return open_reader(new[i])
    except (CheckpointError, SourceError):
        return None


def _shown(checkpoint: Checkpoint) -> str:
    """A checkpoint as messages name it: its path, and its hub revision if it has one."""
    revision = checkpoint.origin.get("revision")
    if not revision or checkpoint.label.endswith(f"@{revision}"):  # hf://org/name@step1000 names it already
        return checkpoint.label
    return f"{checkpoint.label}, revision {revision}"


def _recent_norms(st: Store, n: int) -> list[tuple[int, int, float]]:
    """(start step, end step, norm) of the store's last few committed deltas whose norm was recorded."""
    first = max(0, n - OUTLIER_HISTORY)
    entries = [st.sources_at(i)[0] for i in range(first, n + 1)] if n else []
    return [(a["step"], b["step"], b["delta_norm"]) for a, b in zip(entries, entries[1:])
            if isinstance(b.get("delta_norm"), float)]


def _on_one_torch_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch_threads(1):
            return fn(*args, **kwargs)

    return wrapper


@_on_one_torch_thread
def write_rows(
    st: Store,
    planned: list[_Planned],
    new: list[_Planned],
    open_reader: Callable[[_Planned], Any],
    progress: bool,
    prev_reader: Any = None,
    notes: Sequence[str] = (),
    precision_compared: Collection[int] = (),
) -> None:
    """Write the base (for a new store) and one committed row per checkpoint in *new* (the lock is held).

    *open_reader* gives a checkpoint's reader; the previous theta comes from
    *prev_reader*, else the folder's checkpoint at the store's last step,
    else the store's own copy of it. A change of precision from the checkpoint
    before is told here for the steps not in *precision_compared* (told
    before the rows were written): the first new one against the store's
    last (its file gone, or a recorder's earlier snapshot), a remote pickle
    read for the first time.

    Torch runs on one thread here: the ingest's torch work (float16 to
    float32, the differences, the finite checks) is memory-bound passes over
    chunk-sized pieces, beside the writer threads; on 2 cores a second torch
    thread, spinning between operations, took the writers' core (a 4-revision
    ingest of 100M float16 parameters: 6.2 s with 2 threads, 4.6 s with 1).
    """
    manifest = st.manifest
    record = st.commit_record
    found_warnings = list(st.attrs.get("warnings", []))
    found_warnings += [n for n in notes if n not in found_warnings]
    if not new:
        return
    hasher = ThreadPoolExecutor(1, thread_name_prefix="spectral-hash")
    writer = _Writer(st)
    recorder = _WeightRecorder(st)
    bar = _progress(progress, 4 * st.n_params * (len(new) + (record is None)))
    try:
        hashes = [  # a remote file's identity (sha256 or ETag) comes from its source: it is not hashed here
            [hasher.submit(_sha256, f) if isinstance(f, Path) else None for f in p.checkpoint.files] for p in new
        ]

        def known(i: int) -> tuple[str | None, ...]:
            return new[i].checkpoint.digests or (None,) * len(hashes[i])

        def verify(i: int) -> None:
            """Refuse, before anything of it is written, a file whose sha256 is not the one its name promised."""
            for f, h, digest in zip(new[i].checkpoint.files, hashes[i], known(i)):
                if digest is not None and h is not None and h.result() != digest:  # remote: checked by its source
                    raise CheckpointError(
                        f"{f}: its sha256 is {h.result()[:16]}..., not the {digest[:16]}... its hub cache blob is "
                        "named by; the cache is damaged: download the revision again"
                    )

        def source_entry(i: int, delta_norm: float | None = None) -> dict[str, Any]:
            p = new[i]
            files = [f.identity() if h is None else {**_fingerprint(f), "sha256": h.result()}
                     for f, h in zip(p.checkpoint.files, hashes[i])]
            entry = {**p.checkpoint.origin, "step": p.step, "label": p.checkpoint.label, "files": files}
            if p.checkpoint.passed_over or p.beside:
                entry["passed_over"] = [*p.checkpoint.passed_over, *(f"{file}: {key}" for file, key in p.beside)]
            if p.unread:  # weights of no float dtype, or with no values: not part of the run
                entry["unread"] = dict(p.unread)
            if delta_norm is not None:
                entry["delta_norm"] = delta_norm
            return entry

        # Checkpoints by the sha256 of their files: the first new one is compared with the
        # store's last, and every later one with every one before it in this ingest.
        identities: dict[tuple[str, ...], tuple[int, str]] = {}
        pending: list[int] = []
        if record is not None:
            last_source = st.sources_at(record["n_deltas"])[0]
            files = last_source.get("files") or []
            if files and all(isinstance(f, dict) and f.get("sha256") for f in files):
                identities[tuple(f["sha256"] for f in files)] = (last_source["step"], last_source["label"])

        def digests(j: int) -> tuple[str, ...] | None:
            """The sha256 of checkpoint *j*'s files, known or hashed, else the name its source gives a remote
            file's bytes (a content ETag, a git blob id); None where a file has neither."""
            key = tuple(d or (h.result() if h is not None else None)
                        or (f.content_id() if isinstance(f, RemoteFile) else None)
                        for d, h, f in zip(known(j), hashes[j], new[j].checkpoint.files))
            return key if key and None not in key else None

        def identical(i: int) -> str | None:
            """Whether checkpoint *i*'s files are an earlier one's (known or hashed before any tensor is read)."""
            for j in pending:
                if (key := digests(j)) is not None:
                    identities.setdefault(key, (new[j].step, _shown(new[j].checkpoint)))
            pending[:] = [i]
            key = digests(i)
            if key is None:
                return None
            earlier = identities.get(key)
            return None if earlier is None else identical_message(earlier, (new[i].step, _shown(new[i].checkpoint)),
                                                                  key[0])

        # Checkpoints whose files have no digest (a remote file its source names no content of, a recorder's
        # snapshot): by the crc32c of each tensor's values as read, so that two of one ingest with the same
        # values are told all the same
        same_values: dict[tuple[int, ...], tuple[int, str]] = {}
        start = 0
        following = None  # the next checkpoint's reader, opened early where its transfer can start early
        if record is None:  # a new store: the first checkpoint is the base
            base = new[0]
            verify(0)
            reader = open_reader(base)
            prev_signature = _signature(reader.tensors)
            following = _open_following(new, 1, open_reader)
            if following is not None:
                reader.read_on_into(following)
            row = _ChunkedRow(st.chunk_size, st.n_params, lambda s, b: writer.submit("base", None, s, b))
            last = _ChunkedRow(st.chunk_size, st.n_params, lambda s, b: writer.submit("last_theta", 0, s, b))
            exact = True  # whether last_theta will hold the base exactly
            values = [] if digests(0) is None else None
            for t in manifest:
                x = reader.read(t.name)
                _check_finite(x, t.name, base.checkpoint.label, base.step)
                if values is not None:
                    values.append(_values_crc(x))
                x32 = x.to(torch.float32)  # finite: float64 values past float32's range were refused above
                exact = exact and _exact_in_float32(x, x32)
                flat = x32.reshape(-1).numpy()
                row.add(flat)
                last.add(flat)
                recorder.add(t.name, x)
                if bar is not None:
                    bar.update(4 * t.size)
            del reader, x, x32, flat
            writer.wait()
            _check_unchanged(base.checkpoint)
            crcs = row.crcs()
            link = base_link(st.attrs["tensors"], st.chunk_size, base.step, crcs)
            recorder.write(0, link)
            st.reserve_rows(0)
            st.write_source(0, source_entry(0))
            c0 = hex_of(link)
            record = {"n_deltas": 0, "head_step": base.step, "last_slot": 0, "last_step": base.step, "base": c0,
                      "chain": c0, "last_crc": last.crcs(), "last_exact": exact, "base_exact": exact,
                      "last_dtypes": _dtype_runs(prev_signature, manifest)}
            st.commit(commit=record, base_step=base.step, base_crc=crcs)
            if values is not None:
                same_values[tuple(values)] = (base.step, _shown(base.checkpoint))
            start = 1
            pending.append(0)
        if start >= len(new):
            return
        n0 = record["n_deltas"]
        last_step = st.last_checkpoint_step
        prev_planned = next((p for p in planned if p.step == last_step), None)
        # The previous checkpoint's values: the store's float32 copy where it holds them exactly (nothing to
        # trust about a file on disk, nothing to fetch again from a remote source); else its file, whose
        # float32 values are checked against the copy's chunk checksums where the copy was committed.
        prev_verify = None
        if prev_reader is not None:
            prev: Any = prev_reader
            prev_label = prev_reader.label
        elif record["last_step"] == last_step and _stored_is_exact(st, record, prev_planned is not None):
            prev, prev_label = _StoredTheta(st), f"{st.path} at step {last_step}"
        elif prev_planned is not None:
            prev = open_reader(prev_planned)
            prev.read_once()  # the store holds it already: read for the first delta only
            prev_label = prev_planned.checkpoint.label
            if record["last_step"] == last_step and record.get("last_crc"):
                prev_verify = _ChunkedRow(st.chunk_size, st.n_params, _crc_only)
        elif record["last_step"] == last_step:
            raise StepError(
                f"{st.path}: cannot append: the checkpoint at the store's last step {last_step} is not in the "
                "folder, and the store's float32 copy of it rounds its float64 values (the deltas would be "
                "taken from the rounded values); ingest from a folder holding it"
            )
        else:
            raise StepError(
                f"{st.path}: cannot append: the checkpoint at the store's last step {last_step} is not in "
                "the folder and the store's copy of it was not committed; ingest from a folder holding it"
            )
        prev_step = last_step
        prev_checked = False
        if prev_reader is not None or not isinstance(prev, _StoredTheta):
            prev_signature = _signature(prev.tensors)
        elif prev_planned is not None and prev_planned.tensors is not None:
            prev_signature = _signature(prev_planned.tensors)
        else:
            prev_signature = _recorded_signature(record, manifest)
        norms = DeltaNorms(_recent_norms(st, n0))
        # two tensors with the same update at every step are one tied weight saved under two names (told, as
        # both are counted)
        ties = _TieCandidates(manifest, record)
        st.reserve_rows(n0 + len(new) - start)
        for k, i in enumerate(range(start, len(new))):
            cur = new[i]
            same_files = identical(i)
            if same_files is not None:
                warnings.warn(same_files, DuplicateCheckpointWarning, stacklevel=3)
                found_warnings.append(same_files)
            verify(i)
            reader = following if following is not None else open_reader(cur)
            following = _open_following(new, i + 1, open_reader)
            if following is not None:
                reader.read_on_into(following)
            signature = _signature(reader.tensors)
            if cur.step not in precision_compared and prev_signature is not None and (message := _precision_message(
                    prev_signature, prev_step, prev_label, signature, cur.step, _shown(cur.checkpoint))) is not None:
                warnings.warn(message, PrecisionChangeWarning, stacklevel=3)
                found_warnings.append(message)
            prev_signature = signature
            r = n0 + k
            final = i == len(new) - 1
            slot = 1 - record["last_slot"]
            row = _ChunkedRow(st.chunk_size, st.n_params,
                              lambda s, b, r=r: writer.submit("deltas", r, s, b, squares=True))
            last = (
                _ChunkedRow(st.chunk_size, st.n_params, lambda s, b, q=slot: writer.submit("last_theta", q, s, b))
                if final
                else None
            )
            exact = True
            underflows: list[tuple[str, int]] = []  # (tensor, its changes float32 lost below its range)
            values = [] if same_files is None and digests(i) is None else None
            for t in manifest:
                b = reader.read(t.name)
                _check_finite(b, t.name, cur.checkpoint.label, cur.step)
                if values is not None:
                    values.append(_values_crc(b))
                a = prev.read(t.name)
                if not prev_checked:  # a recorder's snapshot, the store's copy or an earlier ingest's file
                    _check_finite(a, t.name, prev_label, prev_step)
                    if prev_verify is not None:
                        prev_verify.add(a.to(torch.float32).reshape(-1).numpy())
                check = _may_overflow_float32(b.dtype, a.dtype)
                b_flat, a_flat = b.reshape(-1), a.reshape(-1)
                update = lost = 0
                for view, lo, hi in row.segments(b_flat.numel()):
                    out = torch.from_numpy(view)
                    lost += _delta_into(out, b_flat[lo:hi], a_flat[lo:hi])
                    if check and not _all_finite(out):  # counted over the whole tensor
                        _check_float32(_delta(b_flat, a_flat), t.name, cur.checkpoint.label, cur.step,
                                       "values of its delta from the previous checkpoint")
                    if t.name in ties.state:
                        update = crc32c(view, update)
                if t.name in ties.state:
                    ties.add(t.name, update)
                if lost:
                    underflows.append((t.name, lost))
                del a, a_flat, b_flat
                if last is not None:
                    b32 = b.to(torch.float32)  # finite: checked with b
                    exact = exact and _exact_in_float32(b, b32)
                    last.add(b32.reshape(-1).numpy())
                recorder.add(t.name, b)
                if bar is not None:
                    bar.update(4 * t.size)
            writer.wait()
            _check_unchanged(cur.checkpoint)
            if prev_verify is not None:
                if prev_verify.crcs() != list(record["last_crc"]):
                    raise StoreExistsError(
                        f"{st.path}: holds a different run (the checkpoint at step {prev_step}, {prev_label}, "
                        "differs from the one ingested: its values are not the store's copy); pass overwrite to "
                        "replace it"
                    )
                prev_verify = None
            crcs = row.crcs()
            recorder.write(r + 1, int(chain(int(record["chain"], 16), [cur.step], [crcs])[0]))
            st.write_row_meta(r, cur.step, crcs)
            squares = math.fsum(f.result()[1] for f in row.written)
            delta_norm = math.sqrt(squares)
            entry = source_entry(i, delta_norm)
            if last is not None:  # what a resume to this step checks the model against, once later rows exist
                entry["weights_crc"] = weights_crc(last.crcs())
            st.write_source(r + 1, entry)
            outlier = norms.check(prev_step, cur.step, delta_norm, _shown(cur.checkpoint))
            if outlier is not None:
                warnings.warn(outlier, OutlierDeltaWarning, stacklevel=3)
                found_warnings.append(outlier)
            lost_any = bool(underflows)
            told = {n for n, _ in underflows if any(m.startswith(f"tensor {n!r} at step ") and UNDERFLOW in m
                                                    for m in found_warnings)}
            underflows = [u for u in underflows if u[0] not in told]  # once a store: so small at every step
            if underflows:
                (name, n), others = underflows[0], len(underflows) - 1
                more = f" (and {others} more tensor{'s' * (others > 1)})" if others else ""
                message = (f"tensor {name!r} at step {cur.step} ({_shown(cur.checkpoint)}): {n} of its float64 "
                           f"changes from step {prev_step}{more} {UNDERFLOW} (under 1.2e-38) and are stored as 0 "
                           "or with fewer digits; scale the weights, or leave the tensor out (exclude=)")
                warnings.warn(message, UnderflowWarning, stacklevel=3)
                found_warnings.append(message)
            if squares == 0 and same_files is None and not lost_any:
                message = (
                    f"checkpoints at steps {prev_step} ({prev_label}) and {cur.step} "
                    f"({cur.checkpoint.label}) have identical contents"
                )
                warnings.warn(message, DuplicateCheckpointWarning, stacklevel=3)
                found_warnings.append(message)
            elif values is not None and (earlier := same_values.get(tuple(values))) is not None:
                message = (f"checkpoints at steps {earlier[0]} ({earlier[1]}) and {cur.step} ({_shown(cur.checkpoint)}) "
                           "have identical contents: the same values in every tensor, one of them stored under the "
                           "wrong step?")
                warnings.warn(message, DuplicateCheckpointWarning, stacklevel=3)
                found_warnings.append(message)
            if values is not None:
                same_values.setdefault(tuple(values), (cur.step, _shown(cur.checkpoint)))
            record = {**record, "n_deltas": r + 1, "ties": ties.record()}
            if final:
                record.update(last_slot=slot, last_step=cur.step, last_crc=last.crcs(), last_exact=exact,
                              last_dtypes=_dtype_runs(signature, manifest))
                if (tied := ties.message()) is not None and tied not in found_warnings:  # once a store
                    warnings.warn(tied, TiedWeightsWarning, stacklevel=3)
                    found_warnings.append(tied)
            st.commit_rows(record, [cur.step], [crcs], warnings=found_warnings)
            record = st.commit_record
            prev, prev_label, prev_step = reader, cur.checkpoint.label, cur.step
            prev_checked = True  # its values were checked above, as the current checkpoint
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        hasher.shutdown(wait=True, cancel_futures=True)
