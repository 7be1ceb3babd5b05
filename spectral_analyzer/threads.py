"""torch's thread count, set deliberately: a busy machine's cores are not all free.

torch's default intra-op pool takes every core; beside other processes (or
Dask tasks) its threads contend, and one SVD was measured 40x slower beside
two CPU-bound processes on 2 cores. Work that runs torch outside Dask tasks
(the weight spectra) takes the cores free now instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["free_cores", "torch_threads"]


def free_cores() -> int:
    """Cores this process may use, less the 1-minute load average of the machine; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        load = 0.0
    return max(1, min(cores, cores - int(load)))


@contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """Run the block with *n* torch threads (default :func:`free_cores`), restoring the count after."""
    import torch

    previous = torch.get_num_threads()
    n = n or free_cores()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)
