"""The rows a band task holds: a ring of delta rows of one parameter chunk.

A task of the band build keeps the last ``L`` rows of its chunk, the block
being computed and (on a GPU) the block after it in a circular buffer, the
ring, on the device that computes the band. Rows arrive a block at a time::

    ring.stage(block[0], then=block[1])
    for k:
        while fewer than ring.ahead blocks past k have landed:
            ring.land(block[j]); ring.stage(block[j + 1], then=block[j + 2])
        ring.ready(); band_rows(ring.rows, ...); ring.release()

``stage(rows, then)``
    bring *rows* (the block landed next) into host memory, and let the disk
    start on *then*;
``land(rows)``
    start making *rows* resident in the ring, over its oldest rows, and
    return the slots they occupy;
``ready()``
    the kernel about to run may read the oldest landed block;
``release()``
    the kernel has been given the ring: a later ``land`` may overwrite the
    slots it reads once it has run.

:class:`HostRing` (cpu) reads rows straight into the ring when they land and
only asks the operating system to start reading when they are staged: no row
is copied, and nothing lands ahead (``ahead = 0``). :class:`StagedRing`
(cuda; it also runs on cpu, where its stream and event operations do
nothing) reads a staged block into one of two host buffers, pinned on cuda,
and lands it with an asynchronous copy on a copy stream, one block ahead
(``ahead = 1``): the copy of block k + 1 runs while the disk reads block
k + 2 into the other buffer and while block k is computed. The compute stream waits for a block's copy only
when that block is computed; a copy into the ring waits for the last kernel
that read the slots it overwrites. Only the band entries come back from the device.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from ..store import Store

__all__ = ["HostRing", "StagedRing"]


class _Ring:
    """Which delta row each slot holds, and which slots the next rows overwrite."""

    ahead = 0  # blocks landed beyond the one being computed

    def __init__(self, store: Store, start: int, n_slots: int):
        self.store = store
        self.start = start
        self.logical = np.full(n_slots, -1)  # delta row in each slot, -1 for none yet
        self._next = 0

    def _take(self, rows: range) -> list[int]:
        """The slots of the len(rows) oldest rows, now holding *rows*."""
        n_slots = len(self.logical)
        slots = [(self._next + j) % n_slots for j in range(len(rows))]
        self._next = (self._next + len(rows)) % n_slots
        self.logical[slots] = list(rows)
        return slots


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

    Memory: ``(L + block_rows) * (stop - start) * 4`` bytes.
    """

    def __init__(self, store: Store, start: int, stop: int, max_lag: int, block_rows: int):
        n_slots = max_lag + block_rows
        super().__init__(store, start, n_slots)
        self._host = np.zeros((n_slots, stop - start), dtype=np.float32)
        self.rows = torch.from_numpy(self._host)

    def stage(self, rows: range, then: range) -> None:
        self.store.prefetch_delta_chunks(rows, self.start)

    def land(self, rows: range) -> list[int]:
        slots = self._take(rows)
        for row, slot in zip(rows, slots):
            self.store.read_delta_chunk(row, self.start, self._host[slot])
        return slots

    def computing(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def ready(self) -> None:
        pass

    def release(self) -> None:
        pass

    def drain(self) -> None:
        pass


class StagedRing(_Ring):
    """A ring on *device*, filled through two host staging buffers.

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

    Memory: ``(L + 2 block_rows) * (stop - start) * 4`` bytes on *device*
    (the halo, the block computed, the block landing), and
    ``2 * block_rows * (stop - start) * 4`` bytes of host memory, pinned when
    *device* is cuda.
    """

    ahead = 1

    def __init__(self, store: Store, start: int, stop: int, max_lag: int, block_rows: int, device: torch.device):
        n_slots = max_lag + (1 + self.ahead) * block_rows
        super().__init__(store, start, n_slots)
        self._mod = torch.get_device_module(device)
        self._copy_stream = _new_stream(device)
        self._compute_stream = _new_stream(device)
        self._copied = [self._mod.Event(), self._mod.Event()]  # the last copy out of each staging buffer
        self._computed = self._mod.Event()  # the kernel's last read of the ring
        n_cols = stop - start
        pin = device.type == "cuda"
        self._staging = [torch.empty((block_rows, n_cols), dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self._host = [buf.numpy() for buf in self._staging]
        with self.computing():
            self.rows = torch.zeros((n_slots, n_cols), dtype=torch.float32, device=device)
        self._computed.record(self._compute_stream)  # the first copy into the ring waits for its zeroing
        self._staged: deque[int] = deque()  # staging buffers holding the blocks not landed yet, in order
        self._landed: deque[int] = deque()  # staging buffers of the blocks landed and not computed yet
        self._turn = 0

    def stage(self, rows: range, then: range) -> None:
        if not rows:
            return
        b, self._turn = self._turn, 1 - self._turn
        self._copied[b].synchronize()  # the block staged here before has left for the device
        for j, row in enumerate(rows):
            self.store.read_delta_chunk(row, self.start, self._host[b][j])
        self._staged.append(b)
        self.store.prefetch_delta_chunks(then, self.start)

    def land(self, rows: range) -> list[int]:
        b = self._staged.popleft()
        slots = self._take(rows)
        with self._mod.stream(self._copy_stream):
            self._copy_stream.wait_event(self._computed)  # the kernel is done with the slots overwritten
            for a, z, j in _runs(slots):
                self.rows[a:z].copy_(self._staging[b][j : j + z - a], non_blocking=True)
            self._copied[b].record(self._copy_stream)
        self._landed.append(b)
        return slots

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
