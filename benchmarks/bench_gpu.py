#!/usr/bin/env python
"""Band build on cuda against its floors, on a synthetic store (needs a cuda device).

Writes a store of N float32 delta rows of P parameters in WORKDIR (the
synthetic store of bench_band.py: random normal data in six uneven tensors),
then measures, in the same run:

* the host-read floor: every chunk of ``deltas`` read once into pinned host
  buffers of BLOCK_ROWS rows by the build's own reader
  (``Store.read_delta_chunk``, with the same ``posix_fadvise`` read-ahead of
  the next block), a chunk column at a time per thread, with as many threads
  as the build runs tasks; cold, then warm;
* the device kernel floor: ``band_rows`` on rows already in device memory
  (every chunk column, or the first ones that fit in --device-gb, scaled to
  the store by bytes), over the build's blocks (a halo of L rows and
  BLOCK_ROWS new rows per call), one thread and one stream per chunk column,
  as many at once as the build; best of 3;
* the band build, ``build_band(store, L, device="cuda")`` in this process
  (cuda already initialised by the kernel floor), cold, then warm after
  deleting the cached band;
* the check: band rows 0..K-1 (--check-rows) built on the cpu against the
  same rows of the cuda band: max |cuda - cpu| / max |cpu| per tensor, which
  must be <= 1e-12.

Store bytes are the chunk files' bytes (with their crc32c and the padding of
edge chunks), what the build and the read floor read; the kernel's rate is of
float32 data bytes. Target: build <= 1.4 x max(host read, kernel), as for the
cpu build (docs/performance.md).

    python benchmarks/bench_gpu.py --workdir /tmp/bench_gpu     # 48 deltas x 33,554,432 params, L = 16

Page cache: before each cold read the store's files are flushed and dropped
with ``posix_fadvise(DONTNEED)`` and the fraction still resident is measured
with mincore(2). Without a cuda device the script says so on one line and
exits with status 2. The last line of output is one JSON object with all
figures.
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
from bench_band import chunk_files, make_store, store_files
from bench_ingest import cache_state, drop_cache, resident_fraction

GiB = 1024**3
RATIO_TARGET = 1.4
CHECK_RTOL = 1e-12
SEED = 20261129


# -- floors -------------------------------------------------------------------


def host_read_floor(store, workers: int, block_rows: int) -> float:
    """Seconds to read every chunk of ``deltas`` into pinned buffers, a chunk column per thread."""
    import torch

    from spectral_analyzer.gram import build
    from spectral_analyzer.store import Store

    chunks = build._chunk_segments(store)
    n = store.n_deltas
    width = max(stop - start for start, stop, _ in chunks)
    buffers: queue.Queue = queue.Queue()
    for _ in range(workers):  # allocated before the clock starts, as the build's are cached by torch after its first tasks
        buffers.put(torch.empty((block_rows, width), dtype=torch.float32, pin_memory=True).numpy())

    def column(chunk) -> None:
        start, stop, _ = chunk
        st = Store.open(store.path)  # each task of the build opens the store
        buf = buffers.get()
        try:
            for k0 in range(0, n, block_rows):
                for j, row in enumerate(range(k0, min(n, k0 + block_rows))):
                    st.read_delta_chunk(row, start, buf[j, : stop - start])
                st.prefetch_delta_chunks(range(k0 + block_rows, min(n, k0 + 2 * block_rows)), start)
        finally:
            buffers.put(buf)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(column, chunks))
    return time.perf_counter() - t0


def kernel_floor(store, max_lag: int, workers: int, block_rows: int, device, device_bytes: int, repeats: int) -> dict:
    """``band_rows`` over the build's blocks on chunk columns already in device memory, best of *repeats*."""
    import torch

    from spectral_analyzer.gram import build
    from spectral_analyzer.gram.kernel import band_rows

    chunks = build._chunk_segments(store)
    n = store.n_deltas
    sample, held = [], 0
    for chunk in chunks:
        size = n * (chunk[1] - chunk[0]) * 4
        if sample and held + size > device_bytes:
            break
        sample.append(chunk)
        held += size
    resident = {}
    for start, stop, _ in sample:
        host = np.empty((n, stop - start), dtype=np.float32)
        for row in range(n):
            store.read_delta_chunk(row, start, host[row])
        resident[start] = torch.from_numpy(host).to(device)
    torch.cuda.synchronize()

    def column(chunk) -> None:
        start, _, pieces = chunk
        x = resident[start]
        local = [(a - start, b - start) for _, a, b in pieces]
        with torch.cuda.stream(torch.cuda.Stream(device)):
            for k0 in range(0, n, block_rows):
                lo, hi = max(0, k0 - max_lag), min(n, k0 + block_rows)
                band_rows(x[lo:hi], range(k0 - lo, hi - lo), np.arange(lo, hi), local, max_lag)

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(column, sample))
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    resident.clear()
    torch.cuda.empty_cache()
    return {"sample_chunks": len(sample), "sample_bytes": held, "sample_s": best}


# -- the build and the check ----------------------------------------------------


def timed_build(path: Path, max_lag: int, device: str) -> tuple[float, np.ndarray]:
    from spectral_analyzer.gram.build import build_band
    from spectral_analyzer.store import Store

    store = Store.open(path)
    t0 = time.perf_counter()
    band, _ = build_band(store, max_lag, device=device)
    return time.perf_counter() - t0, band


def cpu_rows(path: Path, max_lag: int, n_rows: int) -> tuple[float, np.ndarray]:
    """Band rows 0..n_rows-1 built on the cpu (the cached band neither read nor written)."""
    import torch

    from spectral_analyzer.gram import build
    from spectral_analyzer.store import Store

    store = Store.open(path)
    t0 = time.perf_counter()
    rows = build._compute_rows(store, max_lag, 0, n_rows, torch.device("cpu"), None, build.DEFAULT_MEMORY_LIMIT, False)
    return time.perf_counter() - t0, rows


def max_rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    """Largest over tensors of max |got - want| / max |want| (NaN where want is NaN, in both)."""
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        diff, scale = np.nanmax(np.abs(g - w)), np.nanmax(np.abs(w))
        if diff:
            worst = max(worst, float(diff / scale) if scale else float("inf"))
    return worst


# -- main ---------------------------------------------------------------------


def main() -> None:
    def count(s: str) -> int:
        return int(s.replace("_", ""))

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deltas", type=count, default=48, help="delta rows N (default 48)")
    ap.add_argument("--params", type=count, default=33_554_432,
                    help="float32 parameters per row P (default 33_554_432: eight whole chunks)")
    ap.add_argument("--chunk-size", type=count, default=4 * 1024 * 1024, help="elements per chunk (default 4M)")
    ap.add_argument("--max-lag", type=int, default=16, help="L (default 16)")
    ap.add_argument("--device", default="cuda", help="the cuda device (default cuda)")
    ap.add_argument("--device-gb", type=float, default=32.0,
                    help="device memory for the kernel floor's resident rows, GB (default 32)")
    ap.add_argument("--check-rows", type=count, default=24,
                    help="band rows checked against a cpu build (default 24; 0 for none)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_gpu"))
    ap.add_argument("--keep", action="store_true", help="leave the workdir in place")
    args = ap.parse_args()
    n, p, c, L = args.deltas, args.params, args.chunk_size, args.max_lag
    if n < 2 or L < 1:
        ap.error("--deltas must be at least 2 and --max-lag at least 1")

    import torch

    if not torch.cuda.is_available():
        print(f"bench_gpu.py: no cuda device visible to torch {torch.__version__}; run it on a GPU machine",
              file=sys.stderr)
        raise SystemExit(2)

    from spectral_analyzer.gram import build
    from spectral_analyzer.store import Store

    device = torch.device(args.device)
    if device.type != "cuda":
        ap.error(f"--device must be a cuda device, got {args.device!r}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    check_rows = min(args.check_rows, n)
    work = args.workdir
    path = work / "run.zarr"
    if path.exists():
        shutil.rmtree(path)
    work.mkdir(parents=True, exist_ok=True)
    need = n * p * 4 + GiB
    free = shutil.disk_usage(work).free
    print(f"workdir {work}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")
    if free < need:
        raise SystemExit("not enough free disk space; lower --deltas or --params")

    try:
        print(f"writing {n} deltas x {p:,} float32 params ...", flush=True)
        t0 = time.perf_counter()
        make_store(path, n, p, c, SEED)
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
        files = chunk_files(path)
        store_bytes = sum(f.stat().st_size for f in files)
        data_bytes = n * p * 4
        store = Store.open(path)
        workers, _ = build.local_workers(c, L, build.DEFAULT_MEMORY_LIMIT, device)

        drop_cache(store_files(path))
        read_cache = cache_state(resident_fraction(files))
        print(f"host-read floor ({read_cache}) ...", flush=True)
        read_s = host_read_floor(store, workers, build.BLOCK_ROWS)
        warm_read_cache = cache_state(resident_fraction(files))
        print(f"host-read floor ({warm_read_cache}) ...", flush=True)
        warm_read_s = host_read_floor(store, workers, build.BLOCK_ROWS)

        print("device kernel floor ...", flush=True)
        kern = kernel_floor(store, L, workers, build.BLOCK_ROWS, device, int(args.device_gb * 1e9), repeats=3)
        kernel_s = kern["sample_s"] * data_bytes / kern["sample_bytes"]

        drop_cache(store_files(path))
        build_cache = cache_state(resident_fraction(files))
        print(f"band build on {device} ({build_cache}) ...", flush=True)
        build_s, band = timed_build(path, L, str(device))
        shutil.rmtree(path / "gram")
        warm_cache = cache_state(resident_fraction(files))
        print(f"band build on {device} ({warm_cache}, cached band deleted) ...", flush=True)
        warm_build_s, warm_band = timed_build(path, L, str(device))
        assert band.shape == warm_band.shape == (len(store.manifest), n, L + 1), (band.shape, warm_band.shape)

        cpu_s, rel_diff = None, None
        if check_rows:
            print(f"cpu build of band rows 0..{check_rows - 1} for the check ...", flush=True)
            cpu_s, want = cpu_rows(path, L, check_rows)
            rel_diff = max_rel_diff(band[:, :check_rows], want)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    floor = max(read_s, kernel_s)
    warm_floor = max(warm_read_s, kernel_s)
    ratio = build_s / floor
    warm_ratio = warm_build_s / warm_floor

    import dask
    import zarr

    import spectral_analyzer

    props = torch.cuda.get_device_properties(device)
    f = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "gpu": props.name, "gpu_mem_gib": round(props.total_memory / GiB, 1),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "zarr": zarr.__version__, "dask": dask.__version__, "numpy": np.__version__,
            "spectral_analyzer": f"{spectral_analyzer.__version__} ({Path(spectral_analyzer.__file__).parent})",
        },
        "deltas": n, "params": p, "chunk_size": c, "max_lag": L, "workers": workers,
        "data_bytes": data_bytes, "store_bytes": store_bytes,
        "read_cache": read_cache, "read_s": read_s, "read_gbps": store_bytes / read_s / 1e9,
        "warm_read_cache": warm_read_cache, "warm_read_s": warm_read_s,
        "warm_read_gbps": store_bytes / warm_read_s / 1e9,
        "kernel_s": kernel_s, "kernel_gbps": data_bytes / kernel_s / 1e9,
        "kernel_sample_chunks": kern["sample_chunks"], "kernel_sample_bytes": kern["sample_bytes"],
        "build_cache": build_cache, "build_s": build_s, "build_gbps": store_bytes / build_s / 1e9,
        "warm_build_cache": warm_cache, "warm_build_s": warm_build_s,
        "warm_build_gbps": store_bytes / warm_build_s / 1e9,
        "floor_s": floor, "ratio": ratio, "ratio_target": RATIO_TARGET, "ratio_pass": ratio <= RATIO_TARGET,
        "warm_floor_s": warm_floor, "warm_ratio": warm_ratio, "warm_ratio_pass": warm_ratio <= RATIO_TARGET,
        "check_rows": check_rows, "check_cpu_s": cpu_s, "check_max_rel_diff": rel_diff,
        "check_pass": None if rel_diff is None else rel_diff <= CHECK_RTOL,
    }

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    print()
    print(f"{n} deltas x {p:,} float32 params, chunks of {c:,}, L = {L}; {props.name}, "
          f"{workers} tasks at once")
    print(f"store bytes (deltas)      {store_bytes / 1e9:8.2f} GB")
    print(f"band build on cuda        {build_s:8.2f} s    {f['build_gbps']:.2f} GB/s ({build_cache})")
    print(f"band build on cuda        {warm_build_s:8.2f} s    {f['warm_build_gbps']:.2f} GB/s ({warm_cache})")
    print(f"host read, pinned         {read_s:8.2f} s    {f['read_gbps']:.2f} GB/s ({read_cache}; "
          f"{workers} threads)")
    print(f"host read, pinned         {warm_read_s:8.2f} s    {f['warm_read_gbps']:.2f} GB/s ({warm_read_cache})")
    print(f"device kernel             {kernel_s:8.2f} s    {f['kernel_gbps']:.2f} GB/s ({kern['sample_chunks']} "
          f"chunks x {n} rows resident on the device, scaled by bytes)")
    print(f"floor = max(read, kernel) {floor:8.2f} s    (warm: {warm_floor:.2f} s)")
    print(f"ratio build / floor       {ratio:8.2f}      target <= {RATIO_TARGET}   {verdict(f['ratio_pass'])}")
    print(f"  warm build / warm floor {warm_ratio:8.2f}      target <= {RATIO_TARGET}   "
          f"{verdict(f['warm_ratio_pass'])}")
    if rel_diff is not None:
        print(f"cuda band = cpu band      {rel_diff:8.1e}      max |cuda - cpu| / max |cpu| per tensor, rows 0..{check_rows - 1} "
              f"(cpu {cpu_s:.1f} s); target <= {CHECK_RTOL:g}   {verdict(f['check_pass'])}")
    print(json.dumps(f))


if __name__ == "__main__":
    main()
