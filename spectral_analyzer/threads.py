"""torch's thread count, set deliberately: a busy machine's cores are not all free.

torch's default intra-op pool takes every core; beside other processes (or
Dask tasks) its threads contend, and one SVD was measured 40x slower beside
two CPU-bound processes on 2 cores. Work that runs torch outside Dask tasks
(the weight spectra, weights recorded at ingest) takes the cores free now
instead: the cores less those other threads and processes keep busy, measured
over a twentieth of a second.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["free_cores", "one_thread_each", "torch_threads"]


SAMPLE_S = 0.05  # how long the machine's CPU time is sampled
REUSE_S = 5.0  # a measurement is reused this long (a loop asking per tensor pays for one sample at most)
_last: tuple[float, int] | None = None


def _cpu_times() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from ``/proc/stat`` (idle and iowait are not busy)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(fields)
    return total - fields[3] - fields[4], total


def _busy_cores() -> float:
    """Cores kept busy by other threads and processes now: the busy share of the CPUs' time over
    :data:`SAMPLE_S`, while the calling thread sleeps, times the CPUs online."""
    busy0, total0 = _cpu_times()
    time.sleep(SAMPLE_S)
    busy1, total1 = _cpu_times()
    online = os.cpu_count() or 1
    return online * (busy1 - busy0) / max(1, total1 - total0)


def free_cores() -> int:
    """Cores this process may use, less those busy now; at least 1.

    Busy means busy in the last :data:`SAMPLE_S` (measured from ``/proc/stat``,
    reused for :data:`REUSE_S`), not the 1-minute load average, which lags:
    just after this process's own work (ingesting a run, say) the load
    average still counts it, and an idle machine was read as a busy one.
    Where ``/proc/stat`` is missing, the load average is all there is.
    """
    global _last
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    now = time.monotonic()
    if _last is not None and now - _last[0] < REUSE_S:
        return min(cores, _last[1])
    try:
        busy = _busy_cores()
    except (OSError, ValueError, IndexError):
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            busy = 0.0
    free = max(1, min(cores, (os.cpu_count() or 1) - int(busy + 0.5)))
    _last = (time.monotonic(), free)
    return free


# torch keeps a count per thread, and the last count set in any thread is the one threads started later
# take. Blocks may run in several threads at once (an ingest beside a notebook's analysis, two analyses in
# threads) and end in any order. So each block gives its thread back the count that thread had: the main
# thread's own, which the user may have set; a worker thread's own inside an enclosing block of its, and
# at its outermost block the process's count from before the first block began (what it had may be a
# count another thread's block set, which new threads took while that block ran).
_setting = threading.Lock()
_running = 0  # blocks in progress, in all threads
_before: int | None = None
_local = threading.local()  # .counts: the counts this thread had before each of its blocks in progress


def _process_default(torch) -> int:
    """The count threads get by default: torch keeps the last count set, in any thread, as the count of
    threads started later, while a thread's own count is what was last set in it (a Dask worker thread's
    may be a block's, not the process's). In the main thread its own count; elsewhere what a new thread
    sees."""
    if threading.current_thread() is threading.main_thread():
        return torch.get_num_threads()
    seen: list[int] = []
    probe = threading.Thread(target=lambda: seen.append(torch.get_num_threads()), name="spectral-analyzer-probe")
    probe.start()
    probe.join()
    return seen[0]


@contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """Run the block with *n* torch threads (default :func:`free_cores`), restoring the count after."""
    import torch

    global _before, _running
    n = n or free_cores()
    counts = _local.__dict__.setdefault("counts", [])
    with _setting:
        before = _process_default(torch) if not _running else _before
        # read first: a thread's first read sets its count to the last one set in any thread (torch's lazy
        # per-thread setup), which would otherwise happen later, inside the block, after another block ended
        had = torch.get_num_threads()
        own = counts or threading.current_thread() is threading.main_thread()
        torch.set_num_threads(n)  # refused (n < 1): nothing recorded, nothing to restore
        _before, _running = before, _running + 1
        counts.append(had if own else before)
    try:
        yield n
    finally:
        with _setting:
            _running -= 1
            torch.set_num_threads(counts.pop())


def _one_thread() -> None:
    import torch

    torch.get_num_threads()  # first a read, which fixes the thread's count (to the last one set anywhere) ...
    torch.set_num_threads(1)  # ... so that this set is the thread's own, not undone at its first torch call


def one_thread_each(fn: Callable[[T], R], items: Sequence[T], prefix: str = "spectral-analyzer") -> list[R]:
    """``[fn(x) for x in items]``, run by as many threads as torch has, each with one torch thread.

    For many small decompositions (eigvalsh of a 768 x 768 Gram, QR of a
    768 x 64 head block): LAPACK parallelises one small matrix poorly, and two
    matrices side by side on one thread each were measured 1.5-1.6x faster
    than one after the other on two threads. Results in the order of *items*.
    """
    import torch

    threads = torch.get_num_threads()
    if threads < 2 or len(items) < 2:
        return [fn(x) for x in items]
    # each pool thread sets its own count: one started after another thread's block set a count took that one
    with torch_threads(1), ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix=prefix,
                                              initializer=_one_thread) as pool:
        return list(pool.map(fn, items))
