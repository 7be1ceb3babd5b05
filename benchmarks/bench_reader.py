#!/usr/bin/env python
"""The direct chunk reader with 1, 2 and 4 threads: does reading scale with threads?

Writes a synthetic store (``bench_band.make_store``: random float32 delta rows
in a few uneven tensors) in WORKDIR, then reads every chunk of ``deltas``
once per measurement, a chunk column per thread at a time, ``BLOCK_ROWS``
rows into a buffer of the thread's own, with the read-ahead advice of the
next block, as a band task does:

* **reader**: ``Store.read_delta_chunk`` (the build's reader: one
  ``preadv`` of the chunk file, its crc32c trailer checked and the
  checksum recorded at commit compared), warm page cache;
* **raw**: the same ``preadv`` of each chunk file, no checksum: what the
  reader costs at least;
* **gil** (``--gil``): the reader with its crc32c computed by
  ``google_crc32c`` on the numpy buffer, which holds the GIL, as the reader
  did before: the difference the released GIL makes, in the same run.

With the page cache warm the disk is out of the way: what is left is
copying from the page cache and the crc32c, on as many cores as there are
threads, unless something holds the GIL. Before the crc32c was computed
with the GIL released, 2 threads measured no faster than 1.

    python benchmarks/bench_reader.py --workdir /tmp/bench_reader            # 16 x 33,554,432 params
    python benchmarks/bench_reader.py --threads 4,8,16 --deltas 32           # a larger machine

Figures: GB/s of chunk-file bytes per thread count, and each count's rate
over one thread's (the scaling). ``--cold`` drops the store from the page
cache before each measurement instead (then the disk is measured). The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_band import chunk_files, make_store, store_files  # noqa: E402
from bench_ingest import cache_state, drop_cache, resident_fraction  # noqa: E402

GiB = 1024**3
SEED = 20261201
BLOCK_ROWS = 8


def read_columns(store, threads: int, *, raw: bool = False, alloc=None) -> float:
    """Seconds to read every chunk of ``deltas`` once: chunk columns shared by *threads*, BLOCK_ROWS rows at a
    time into a buffer per thread (``alloc(shape)`` makes it: numpy by default, pinned memory for a GPU)."""
    from spectral_analyzer.store import Store

    n, c = store.n_deltas, store.chunk_size
    columns = list(store.chunk_bounds())
    folder = Path(store.path) / "deltas" / "c"
    buffers: queue.Queue = queue.Queue()
    for _ in range(threads):  # allocated before the clock starts
        buffers.put((alloc or (lambda shape: np.empty(shape, dtype=np.float32)))((BLOCK_ROWS, c)))
    trailer = np.empty(4, dtype=np.uint8)

    def raw_chunk(row: int, j: int, out: np.ndarray) -> None:
        fd = os.open(folder / str(row) / str(j), os.O_RDONLY)
        try:
            os.preadv(fd, [out.view(np.uint8), trailer], 0)  # the whole chunk (edge ones are padded) and its crc
        finally:
            os.close(fd)

    def column(bounds: tuple[int, int]) -> None:
        start, _ = bounds
        st = Store.open(store.path, verify=False)  # each task of the build opens the store
        st.expect_crcs(start // c, store.crcs[:, start // c])
        buf = buffers.get()
        try:
            for k0 in range(0, n, BLOCK_ROWS):
                st.prefetch_delta_chunks(range(k0 + BLOCK_ROWS, min(n, k0 + 2 * BLOCK_ROWS)), start)
                for j, row in enumerate(range(k0, min(n, k0 + BLOCK_ROWS))):
                    if raw:
                        raw_chunk(row, start // c, buf[j])
                    else:
                        st.read_delta_chunk(row, start, buf[j, : bounds[1] - start])
        finally:
            buffers.put(buf)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(column, columns))
    return time.perf_counter() - t0


def _gil_crc32c(data: np.ndarray, crc: int = 0) -> int:
    """crc32c by ``google_crc32c`` on a numpy buffer: the GIL is held for the whole call."""
    import google_crc32c

    return int(google_crc32c.extend(crc, np.ascontiguousarray(data).view(np.uint8).reshape(-1)))


def scaling(path: Path, thread_counts: list[int], cold: bool, repeats: int, alloc=None, gil: bool = False) -> dict:
    """Reader and raw read rates (GB/s of chunk files) for each thread count, best of *repeats* (and the reader
    with a crc32c that holds the GIL, *gil*)."""
    from spectral_analyzer.store import Store, chunks
    from spectral_analyzer.store.crc import releases_gil

    store = Store.open(path)
    files = chunk_files(path)
    nbytes = sum(f.stat().st_size for f in files)
    out: dict = {"store_bytes": nbytes, "crc32c_releases_gil": releases_gil(), "cache": {}}
    if not cold:
        read_columns(store, max(thread_counts), raw=True, alloc=alloc)  # into the page cache
    kinds = ("reader", "raw", "gil") if gil else ("reader", "raw")
    for threads in thread_counts:
        for kind in kinds:
            best = float("inf")
            for _ in range(repeats):
                if cold:
                    drop_cache(store_files(path))
                out["cache"][f"{kind}_{threads}"] = cache_state(resident_fraction(files))
                real = chunks.crc32c
                if kind == "gil":
                    chunks.crc32c = _gil_crc32c
                try:
                    best = min(best, read_columns(store, threads, raw=kind == "raw", alloc=alloc))
                finally:
                    chunks.crc32c = real
            out[f"{kind}_{threads}_gbps"] = nbytes / best / 1e9
    for threads in thread_counts:
        for kind in kinds:
            out[f"{kind}_{threads}_scaling"] = out[f"{kind}_{threads}_gbps"] / out[f"{kind}_{thread_counts[0]}_gbps"]
    return out


def main() -> None:
    def count(s: str) -> int:
        return int(s.replace("_", ""))

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deltas", type=count, default=16, help="delta rows (default 16)")
    ap.add_argument("--params", type=count, default=33_554_432, help="parameters per row (default 33_554_432)")
    ap.add_argument("--chunk-size", type=count, default=4 * 1024 * 1024, help="elements per chunk (default 4M)")
    ap.add_argument("--threads", default="1,2,4", help="thread counts, comma-separated (default 1,2,4)")
    ap.add_argument("--repeats", type=int, default=3, help="best of (default 3)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each read")
    ap.add_argument("--gil", action="store_true", help="also the reader with a crc32c that holds the GIL")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_reader"))
    ap.add_argument("--keep", action="store_true", help="leave the workdir in place")
    args = ap.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    path = args.workdir / "run.zarr"
    args.workdir.mkdir(parents=True, exist_ok=True)
    need = args.deltas * args.params * 4 + GiB
    if shutil.disk_usage(args.workdir).free < need:
        raise SystemExit(f"not enough free disk space in {args.workdir} ({need / 1e9:.1f} GB needed)")
    try:
        print(f"writing {args.deltas} deltas x {args.params:,} float32 params ...", flush=True)
        make_store(path, args.deltas, args.params, args.chunk_size, SEED)
        f = scaling(path, counts, args.cold, args.repeats, gil=args.gil)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    import spectral_analyzer

    f.update(date=datetime.date.today().isoformat(), cpus=os.cpu_count(), load_average=os.getloadavg()[0],
             python=platform.python_version(), deltas=args.deltas, params=args.params, chunk_size=args.chunk_size,
             spectral_analyzer=spectral_analyzer.__version__)
    print(f"\n{f['store_bytes'] / 1e9:.2f} GB of chunk files, {os.cpu_count()} cores, crc32c releases the GIL: "
          f"{f['crc32c_releases_gil']}")
    for threads in counts:
        print(f"{threads:3d} threads   reader {f[f'reader_{threads}_gbps']:6.2f} GB/s (x{f[f'reader_{threads}_scaling']:.2f})"
              f"   raw {f[f'raw_{threads}_gbps']:6.2f} GB/s (x{f[f'raw_{threads}_scaling']:.2f})"
              + (f"   GIL held {f[f'gil_{threads}_gbps']:6.2f} GB/s (x{f[f'gil_{threads}_scaling']:.2f})" if args.gil else "")
              + f"   [{f['cache'][f'reader_{threads}']}]")
    print(json.dumps(f))


if __name__ == "__main__":
    main()
