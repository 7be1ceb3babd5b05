"""The commit protocol: how rows, and everything else, become part of a store.

A delta row counts only once the commit record says so: the arrays grow
before any data is written, and an all-zero chunk is legitimately absent, so
neither shape nor chunk presence says anything about progress. A writer
(holding the lock, see lock.py) writes a row's chunks, then its step, the
crc32c of its chunks and its source entry, then the commit record, one
atomic write of the root metadata::

    commit = {"n_deltas": n, "head_step": step of row n, "last_slot": s,
              "last_step": step of last_theta[s] (None after a truncation dropped it),
              "last_exact": whether last_theta[s] is that checkpoint exactly (not rounded
              float64 values), "base": c_0, "chain": c_n, "last_crc": [...]}

``c_0 .. c_n`` is the generation chain (generations.py): every change of the
stored rows (append, truncate, rollback, overwrite) gives a new ``chain``,
and every cache records the chain of the rows it was computed from.

``last_theta`` has two slots so that appending never needs the older
checkpoint files (HF Trainer deletes them): a writer fills the slot the
commit record does not point at, then flips it in the write that commits.

The root metadata has a fixed size whatever the number of rows, so a
commit writes O(1) metadata; the arrays that grow with the run are extended
at their end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import generations
from .chunk_writes import remove_temporaries, write_direct
from .chunks import direct_layout
from .layout import check_manifest, chunk_lengths, damaged

__all__ = ["CommitProtocol"]


class CommitProtocol:
    """The writing half of :class:`~spectral_analyzer.store.core.Store` (the caller holds the writer lock)."""

    def _check(self, verify: bool) -> None:
        """Everything the numbers depend on, as far as it can be checked without reading deltas."""
        a = self._attrs
        check_manifest(self.path, a.get("tensors"), a.get("n_params"), a.get("chunk_size"))
        record = a.get("commit")
        if record is None:
            return
        try:
            n = int(record["n_deltas"])
            slot = int(record["last_slot"])
            int(record["base"], 16), int(record["chain"], 16)
            int(a["base_step"])
            ok = n >= 0 and slot in (0, 1) and len(a["base_crc"]) == len(chunk_lengths(self.n_params, self.chunk_size))
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(self.path, f"unreadable commit record ({exc!r})") from None
        if not ok:
            raise damaged(self.path, f"the commit record {record!r} does not match the base checksums")
        if "head_step" not in record:  # the first stores of format 3 committed no last step: read from the rows
            self._attrs["commit"] = record = {**record, "head_step": self.last_checkpoint_step}
        p = self.n_params
        k = len(a["base_crc"])
        for name, want in (("deltas", (n, p)), ("step", (n,)), ("chunk_crc", (n, k)), ("base", (p,)),
                           ("last_theta", (2, p)), ("sources", (n + 1,))):
            try:
                shape = self.array(name).shape
            except KeyError:
                raise self._damaged(f"the '{name}' array is missing") from None
            if len(shape) != len(want) or any(s < w for s, w in zip(shape, want)) or (
                    len(want) == 2 and shape[1] != want[1]):
                raise self._damaged(f"the '{name}' array has shape {shape}, the commit needs {want}")
        if not verify:
            return
        base = generations.base_link(a["tensors"], self.chunk_size, a["base_step"], a["base_crc"])
        if generations.hex_of(base) != record["base"]:
            raise self._damaged("the manifest, chunking, base step or base checksums do not match the commit")
        head = self.chain[-1] if n else base
        if generations.hex_of(head) != record["chain"]:
            raise self._damaged(f"the steps or chunk checksums of the {n} committed rows do not match the commit")
        if record["head_step"] != int(self.checkpoint_steps[-1]):
            raise self._damaged(f"the commit's last step {record['head_step']} is not the last row's step")

    def reserve_rows(self, n_rows: int) -> None:
        """Size the row arrays for *n_rows* rows (data follows, commit after)."""
        self.array("deltas").resize((n_rows, self.n_params))
        self.array("step").resize((n_rows,))
        crc = self.array("chunk_crc")
        crc.resize((n_rows, crc.shape[1]))
        self.array("sources").resize((n_rows + 1,))
        if "weights" in self.group:
            weights = self.group["weights"]
            for name in ("sigma", "row_crc", "chain"):
                if name not in weights:  # a record made before rows carried their generation
                    continue
                arr = weights[name]
                if name != "sigma" and arr.shape[0] > n_rows + 1:  # a chunk holds several checkpoints
                    arr[n_rows + 1 :] = arr.fill_value
                arr.resize((n_rows + 1, *arr.shape[1:]))

    def write_chunk(self, name: str, row: int | None, start: int, data: np.ndarray) -> int:
        """Write one whole chunk of array *name* (row ``None`` for the 1-D ``base``); returns its crc32c.

        *start* is the chunk's first parameter. A local store's chunk files are written directly
        (chunk_writes.write_direct), others through Zarr.
        """
        arr = self.array(name)
        if name not in self._direct_folders:
            self._direct_folders[name] = direct_layout(arr)
        folder = self._direct_folders[name]
        if folder is not None and start % self.chunk_size == 0 and arr.chunks[-1] == self.chunk_size:
            if row is not None and not 0 <= row < arr.shape[0]:
                raise IndexError(f"row {row} of '{name}' is past its {arr.shape[0]} rows")
            if (data.dtype != np.dtype("=f4") or data.ndim != 1 or not data.flags.c_contiguous
                    or data.size != min(self.chunk_size, arr.shape[-1] - start)):
                raise ValueError(f"chunk at {start} of '{name}': {data.size} values of {data.dtype}, "
                                 "not one whole chunk of float32")
            key = (start // self.chunk_size,) if row is None else (row, start // self.chunk_size)
            return write_direct(folder, key, data, self.chunk_size)
        if row is None:
            arr[start : start + data.shape[0]] = data
        else:
            arr[row, start : start + data.shape[0]] = data
        return generations.chunk_crc(data)

    def write_source(self, index: int, entry: Mapping[str, Any]) -> None:
        """Checkpoint *index*'s provenance (0 the base), before the commit that counts it."""
        self.array("sources")[index] = json.dumps(entry, sort_keys=True)

    def write_row_meta(self, row: int, step: int, crcs: Sequence[int]) -> None:
        """A row's step and chunk checksums, after its data and before its commit."""
        self.array("step")[row] = step
        self.array("chunk_crc")[row] = np.asarray(crcs, dtype=np.uint32)

    def commit(self, **updates: Any) -> None:
        """Update root attributes in one atomic write of the group's metadata."""
        attrs = {**self._attrs, **updates}
        self.group.attrs.put(attrs)
        self._attrs = attrs
        self._steps = self._crcs = self._chain = None

    def commit_rows(self, record: Mapping[str, Any], steps: Sequence[int], crcs: Sequence[Sequence[int]],
                    **updates: Any) -> None:
        """Commit new rows (their data, steps and checksums written): extends the chain."""
        prev = self.commit_record
        head = int(prev["chain"], 16) if prev is not None else int(record["base"], 16)
        if len(steps):
            head = int(generations.chain(head, np.asarray(steps), np.asarray(crcs, dtype=np.uint32))[-1])
        head_step = int(steps[-1]) if len(steps) else (prev or record)["head_step"]
        self.commit(commit={**record, "chain": generations.hex_of(head), "head_step": head_step}, **updates)

    def restore(self, attrs: Mapping[str, Any]) -> None:
        """Return to a snapshot of the attributes, dropping rows it did not commit.

        The commit goes first: a writer killed after it leaves rows past the commit, which the next
        writer drops (:meth:`clean_uncommitted`); cleared first, they would be rows the commit still
        counts, and the store would be damaged.
        """
        n = 0 if attrs.get("commit") is None else int(attrs["commit"]["n_deltas"])
        self.commit(**dict(attrs))
        for name, keep in (("step", n), ("chunk_crc", n), ("sources", n + 1)):
            arr = self.array(name)  # a chunk of these holds several rows: clear the ones going
            if arr.shape[0] > keep:
                arr[keep:] = arr.fill_value
        self.reserve_rows(n)

    def truncate(self, n_deltas: int) -> None:
        """Keep the first *n_deltas* committed rows (and their checkpoints) only.

        ``last_theta`` then holds no committed checkpoint, and the record
        says so (``last_step`` None: rows appended later at the same steps
        as the dropped ones must not be taken for them), so an append needs
        the checkpoint at the new last step, or a recorder's own snapshot of it.
        """
        attrs = self.attrs
        record = attrs["commit"]
        chain = self.chain
        if self.n_deltas and generations.hex_of(chain[-1]) != record["chain"]:  # a writer may have opened unverified
            raise damaged(self.path, "the steps or chunk checksums of the committed rows do not match the commit")
        head = chain[n_deltas - 1] if n_deltas else int(record["base"], 16)
        head_step = int(self.steps[n_deltas - 1]) if n_deltas else int(attrs["base_step"])
        attrs["commit"] = {**record, "n_deltas": int(n_deltas), "chain": generations.hex_of(head), "head_step": head_step}
        if record.get("last_step") is not None and record["last_step"] > head_step:
            attrs["commit"]["last_step"] = None  # last_theta holds a dropped checkpoint: no step may match it
        self.restore(attrs)

    def clean_uncommitted(self) -> None:
        """Drop what a killed writer left past the commit: rows, their steps, checksums and chunk folders."""
        n = self.n_deltas
        if any(self.array(a).shape[0] > n for a in ("deltas", "step", "chunk_crc")) or self.array(
                "sources").shape[0] > n + 1:
            self.restore(self.attrs)
        if not self.is_remote:  # zarr leaves a row's emptied chunk folder behind
            folder = os.path.join(self.path, "deltas", "c")
            for entry in os.listdir(folder) if os.path.isdir(folder) else ():
                if entry.isascii() and entry.isdigit() and int(entry) >= n:  # "²".isdigit() too
                    shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
            remove_temporaries(self.path)  # a killed write's temporary file, of a chunk or of metadata
