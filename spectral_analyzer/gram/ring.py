"""The rows a band task holds: a ring of delta rows of one parameter chunk.

A task of the band build keeps the last ``L`` rows of its chunk, the block
being computed and (on a GPU) the block after it in a circular buffer, the
ring, on the device that computes the band. Delta row i lives in slot
``i % n_slots``, so a row has the same slot whichever row a task starts from.
Rows arrive a block at a time (``A = ring.ahead``)::

    ring.stage(nothing, then=block[0]); ring.stage(block[0], then=block[1])
    for j < A: ring.land(block[j]); ring.stage(block[j + 1], then=block[j + 2])
    for k:
        ring.land(block[k + A])
        ring.ready(); kernel(block k); ring.release()
        ring.stage(block[k + A + 1], then=block[k + A + 2])

``stage(rows, then)``
    bring *rows* (the block landed next) into host memory, and let the disk
    start on *then*;
``land(rows)``
    start making *rows* resident in the ring, over its oldest rows;
``ready()``
    the kernel about to run may read the oldest landed block;
``release()``
    the kernel has been given the ring: a later ``land`` may overwrite the
    slots it reads once it has run.

:class:`HostRing` (cpu) reads rows straight into the ring (float32, the
kernel's in-place layout: only a chunk's small tensors are copied, into
padded groups). On local chunk files (``A = 1``) it has a block of slots
more, and a reader thread of its own reads block k + 1 into them while block
k is computed, past the page cache (``O_DIRECT``) for what the cache does
not hold: cold, a buffered read cost more CPU than the kernel can spare on
a small machine. ``land`` then only assigns the slots and ``ready`` waits
for the block's read. Elsewhere (``A = 0``) rows are read when they land,
and staging only asks the operating system to start reading them. The
kernel reads only the slots of the block and its halo (:meth:`_Ring.window`).
:class:`StagedRing` (cuda; it also runs on cpu, where
its stream and event operations do nothing) reads a staged block into one of
two host buffers, pinned on cuda, and lands it one block ahead (``A = 1``)
with an asynchronous copy on a copy stream, where each row is laid out in
the kernel's compact layout and converted to float64 once. So
while the kernel of block k runs, the copy of block k + 1 is queued and the
host reads block k + 2 from the disk: the kernel's launch returns at once,
and its products stay on the device until the task ends. The compute stream
waits for a block's copy only when that block is computed; a copy into the
ring waits for the last kernel that read the slots it overwrites; a staging
buffer is refilled only after its copy has finished. Each worker thread
creates its two streams once and reuses them for every task it runs (the
caching allocator reuses a freed block only on the stream it was allocated
on, so fresh streams per task would keep every task's ring reserved).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..store import Store, aligned_zeros
from .kernel import BandPlan, band_plan

__all__ = ["HostRing", "StagedRing", "staged_slots"]


def staged_slots(max_lag: int, block_rows: int) -> int:
    """Slots of a :class:`StagedRing`: ``L + 2 block_rows`` (halo, block computed, block landing),
    rounded up to whole blocks so that a block of new rows is always a run of consecutive slots."""
    return -(-(max_lag + 2 * block_rows) // block_rows) * block_rows


class _Ring:
    """Which delta row each slot holds, and the layout of a row (:class:`~.kernel.BandPlan`)."""

    ahead = 0  # blocks landed beyond the one being computed

    def __init__(self, store: Store, start: int, n_slots: int, plan: BandPlan):
        self.store = store
        self.start = start
        self.n_slots = n_slots
        self.plan = plan
        self.logical = np.full(n_slots, -1)  # delta row in each slot, -1 for none yet

    def slots(self, rows: range) -> list[int]:
        """The slot of each of *rows*."""
        return [row % self.n_slots for row in rows]

    def _take(self, rows: range) -> list[int]:
        slots = self.slots(rows)
        self.logical[slots] = list(rows)
        return slots

    def window(self, rows: range) -> list[tuple[int, int]] | None:
        """Runs of slots ``(first, stop)`` whose products the kernel computes for *rows*: None for all of them."""
        return None


class HostRing(_Ring):
    """A ring in host memory, filled straight from the store.

    Parameters
    ----------
    store : Store
    start, stop : int
        The chunk's column range.
    max_lag : int
        L.
    block_rows : int
        The most rows landed at once.
    segments : sequence of (start, stop)
        The tensor pieces, as columns of the chunk: they set the row layout.
    read_ahead : bool, optional
        A reader thread reads the next block while one is computed; default
        where the store reads local chunk files (:attr:`Store.reads_chunk_files`).

    Memory: ``n_slots * width * 4`` bytes, ``n_slots`` = L + block_rows
    (twice block_rows when reading ahead), ``width`` the chunk's columns plus
    its narrow pieces padded (:func:`~.kernel.band_plan`), rounded up to 4 KiB.
    """

    def __init__(self, store: Store, start: int, stop: int, max_lag: int, block_rows: int, *, segments,
                 read_ahead: bool | None = None):
        if read_ahead is None:
            read_ahead = store.reads_chunk_files
        n_slots = max_lag + block_rows * (2 if read_ahead else 1)
        super().__init__(store, start, n_slots, band_plan(segments, stop - start))  # in place
        width = self.plan.width
        self._host = aligned_zeros((n_slots, -(-width // 1024) * 1024))[:, :width]  # each slot on a 4 KiB boundary
        self.rows = torch.from_numpy(self._host)
        self._n_cols = stop - start
        self.max_lag = max_lag
        self._first: int | None = None  # the first row landed
        self.ahead = 1 if read_ahead else 0
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="spectral-analyzer-ring") if read_ahead else None
        self._reads: deque[Future] = deque()  # reads of the blocks staged, in order

    def stage(self, rows: range, then: range) -> None:
        if self._reader is None:
            self.store.prefetch_delta_chunks(then, self.start)
        elif rows:
            self._reads.append(self._reader.submit(self._read, rows))

    def _read(self, rows: range) -> None:
        for row, slot in zip(rows, self.slots(rows)):
            self.store.read_delta_chunk(row, self.start, self._host[slot, : self._n_cols], uncached=True)
            self.plan.spread(self._host[slot : slot + 1])

    def land(self, rows: range) -> None:
        if self._first is None:
            self._first = rows.start
        if self._reader is None:
            self._read(rows)
        self._take(rows)

    def window(self, rows: range) -> list[tuple[int, int]]:
        """The slots of *rows* and of the L rows before them (those landed), in the order of the rows."""
        runs, row = [], max(rows.start - self.max_lag, self._first)
        while row < rows.stop:
            slot = row % self.n_slots
            n = min(rows.stop - row, self.n_slots - slot)
            runs.append((slot, slot + n))
            row += n
        return runs

    def computing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def ready(self) -> None:
        """Wait for the oldest block staged to be read (its read's error is raised here)."""
        if self._reads:
            self._reads.popleft().result()

    def release(self) -> None:
        pass

    def drain(self) -> None:
        """Wait for the reads in flight (none may write into the ring after it is freed), and end the reader."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)


class StagedRing(_Ring):
    """A float64 ring on *device*, filled through two host staging buffers.

    Parameters
    ----------
    store : Store
    start, stop : int
        The chunk's column range.
    max_lag : int
        L.
    block_rows : int
        The most rows staged (and landed) at once.
    device : torch.device
    segments : sequence of (start, stop)
        The tensor pieces, as columns of the chunk: they set the row layout.

    Memory: ``staged_slots(L, block_rows) * width * 8`` bytes on *device*
    (the halo, the block computed, the block landing, in float64; ``width``
    the chunk's columns plus its narrow pieces padded) plus a float32
    landing block of ``block_rows`` rows there, and
    ``2 * block_rows * (stop - start + 1) * 4`` bytes of host memory, pinned
    when *device* is cuda.
    """

    ahead = 1

    def __init__(
        self, store: Store, start: int, stop: int, max_lag: int, block_rows: int, device: torch.device, *, segments
    ):
        n_slots = staged_slots(max_lag, block_rows)
        super().__init__(store, start, n_slots, band_plan(segments, stop - start, device, compact=True))
        self._mod = torch.get_device_module(device)
        self._copy_stream, self._compute_stream = thread_streams(device)
        self._copied = [self._mod.Event(), self._mod.Event()]  # the last copy out of each staging buffer
        self._computed = self._mod.Event()  # the kernel's last read of the ring
        n_cols = stop - start
        pin = device.type == "cuda"
        # rows as read, and a zero column that the layout's padding gathers
        self._staging = [torch.zeros((block_rows, n_cols + 1), dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self._host = [buf.numpy()[:, :n_cols] for buf in self._staging]
        with self._mod.stream(self._copy_stream):
            self._landing = torch.empty((block_rows, n_cols + 1), dtype=torch.float32, device=device)
        with self.computing():
            self.rows = torch.zeros((n_slots, self.plan.width), dtype=torch.float64, device=device)
        self._computed.record(self._compute_stream)  # the first copy into the ring waits for its zeroing
        self._staged: deque[int] = deque()  # staging buffers holding the blocks not landed yet, in order
        self._landed: deque[int] = deque()  # staging buffers of the blocks landed and not computed yet
        self._turn = 0

    def stage(self, rows: range, then: range) -> None:
        if rows:
            b, self._turn = self._turn, 1 - self._turn
            self._copied[b].synchronize()  # the block staged here before has left for the device
            for j, row in enumerate(rows):
                self.store.read_delta_chunk(row, self.start, self._host[b][j])
            self._staged.append(b)
        self.store.prefetch_delta_chunks(then, self.start)

    def land(self, rows: range) -> None:
        b = self._staged.popleft()
        slots = self._take(rows)
        with self._mod.stream(self._copy_stream):
            self._copy_stream.wait_event(self._computed)  # the kernel is done with the slots overwritten
            self._landing[: len(rows)].copy_(self._staging[b][: len(rows)], non_blocking=True)
            for a, z, j in _runs(slots):
                self.plan.land(self.rows[a:z], self._landing[j : j + z - a])  # laid out, to float64, once per row
            self._copied[b].record(self._copy_stream)
        self._landed.append(b)

    def ready(self) -> None:
        """The compute stream waits for the copy of the oldest landed block (not for the one after it)."""
        self._compute_stream.wait_event(self._copied[self._landed.popleft()])

    def computing(self) -> contextlib.AbstractContextManager:
        """Make the ring's compute stream current: the kernel runs there."""
        return self._mod.stream(self._compute_stream)

    def release(self) -> None:
        self._computed.record(self._compute_stream)

    def drain(self) -> None:
        """Wait for every copy queued: none may write into the ring after it is freed (after an error too)."""
        for event in self._copied:
            event.synchronize()


_local = threading.local()


def thread_streams(device: torch.device) -> tuple:
    """The (copy, compute) streams of this thread on *device*, created on first use and then reused."""
    mod = torch.get_device_module(device)
    streams = _local.__dict__.setdefault("streams", {})
    key = (mod, str(device))
    if key not in streams:
        streams[key] = (_new_stream(device), _new_stream(device))
    return streams[key]


def _new_stream(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.Stream(device)
    return torch.get_device_module(device).Stream()


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Contiguous runs of *slots* as (first slot, stop slot, offset in *slots*)."""
    runs, j = [], 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[i - 1] + 1:
            runs.append((slots[j], slots[i - 1] + 1, j))
            j = i
    return runs
