#!/usr/bin/env python
"""Band build on cuda against the host's read rate and the device's floors, on a synthetic store.

Writes a store of N float32 delta rows of P parameters in WORKDIR (the
synthetic store of bench_band.py: random normal data in six uneven tensors),
then measures, in the same run:

* the host read, the rate to match: every chunk file of ``deltas`` read once
  into pinned buffers of BLOCK_ROWS rows, a chunk column per thread at a
  time with the read-ahead advice of the next block, at full concurrency
  (one thread per core, ``bench_reader.read_columns``): raw (``preadv``, no
  checksum; the floor) and by the build's own reader (crc32c checked);
  cold, then warm;
* the host-to-device copy: pinned blocks of BLOCK_ROWS rows of a chunk
  copied to the device, one stream per thread, as many threads as the build
  runs tasks; the store's bytes at the rate measured on a sample;
* the device kernel: for each chunk column of a sample (every column, or
  the first ones that fit in --device-gb), its rows resident on the device
  in float32 as they arrive, landed block by block into a float64 ring of
  ``staged_slots(L, BLOCK_ROWS)`` rows (L + 16 for L = 16) in the kernel's
  compact layout and computed with ``band_products``, the products copied
  back once per column: the build's device work without its host side;
  one thread and stream per column, as many at once as the build runs
  tasks; best of 3, scaled to the store by bytes;
* the band build, ``build_band(store, L, device="cuda")`` in this process
  (cuda already initialised by the floors), cold, then warm after deleting
  the cached band;
* the check: band rows 0..K-1 (--check-rows) built on the cpu against the
  same rows of the cuda band: max |cuda - cpu| / max |cpu| per tensor, which
  must be <= 1e-12.

Target: the build at >= 0.8 of the host read rate, i.e. build time <= 1.25 x
the raw host read at full concurrency (cold against cold, warm against
warm). The ratio to max(host read, copy, kernel) says which floor binds.

    python benchmarks/bench_gpu.py --workdir /tmp/bench_gpu     # 48 deltas x 33,554,432 params, L = 16
    python benchmarks/bench_gpu.py --dry-run --deltas 12 --params 600_000 --chunk-size 65_536  # cpu, no figures

Page cache: before each cold read the store's files are flushed and dropped
with ``posix_fadvise(DONTNEED)`` and the fraction still resident is measured
with mincore(2). Without a cuda device the script says so on one line and
exits with status 2, unless --dry-run: then everything runs on the cpu
(no pinned memory, no copy floor) to check the script itself; its figures
mean nothing. The last line of output is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_band import chunk_files, make_store, store_files  # noqa: E402
from bench_ingest import cache_state, drop_cache, resident_fraction  # noqa: E402
from bench_reader import read_columns  # noqa: E402

GiB = 1024**3
RATIO_TARGET = 1.25  # build time over the host read's: the build at >= 0.8 of the host read rate
CHECK_RTOL = 1e-12
SEED = 20261129


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pinned(device):
    """A buffer maker for ``read_columns``: pinned host memory for a cuda device."""
    import torch

    pin = device.type == "cuda"
    return lambda shape: torch.empty(shape, dtype=torch.float32, pin_memory=pin).numpy()


# -- floors -------------------------------------------------------------------


def copy_floor(store, workers: int, block_rows: int, device, sample_bytes: int) -> dict:
    """Host-to-device copies of pinned blocks of *block_rows* rows of a chunk, one stream per thread."""
    import torch

    c = store.chunk_size
    block = block_rows * c * 4
    per_thread = max(1, sample_bytes // block // workers)
    pairs = [(torch.empty((block_rows, c), pin_memory=True).normal_(),
              torch.empty((block_rows, c), device=device)) for _ in range(workers)]

    def copies(pair) -> None:
        src, dst = pair
        with torch.cuda.stream(torch.cuda.Stream(device)):
            for _ in range(per_thread):
                dst.copy_(src, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()

    copies(pairs[0])  # the first copy sets up the driver's mappings
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(copies, pairs))
    seconds = time.perf_counter() - t0
    return {"copy_sample_bytes": per_thread * workers * block, "copy_sample_s": seconds}


def kernel_floor(store, max_lag: int, workers: int, block_rows: int, device, device_bytes: int, repeats: int) -> dict:
    """The build's device work on rows already on the device: landing into float64 rings and ``band_products``."""
    import torch

    from spectral_analyzer.gram import build
    from spectral_analyzer.gram.kernel import band_entries, band_plan, band_products
    from spectral_analyzer.gram.ring import staged_slots, thread_streams

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
        host = np.zeros((n, stop - start + 1), dtype=np.float32)  # and the zero column that padding gathers
        for row in range(n):
            store.read_delta_chunk(row, start, host[row, :-1])
        resident[start] = torch.from_numpy(host).to(device)
    n_slots = staged_slots(max_lag, block_rows)
    _sync(device)

    def column(chunk) -> np.ndarray:
        start, stop, pieces = chunk
        plan = band_plan([(a - start, b - start) for _, a, b in pieces], stop - start, device, compact=True)
        x = resident[start]
        _, compute = thread_streams(device) if device.type == "cuda" else (None, None)
        with torch.cuda.stream(compute) if compute is not None else contextlib.nullcontext():
            ring = torch.zeros((n_slots, plan.width), dtype=torch.float64, device=device)
            products = torch.zeros((len(pieces), n, n_slots), dtype=torch.float64, device=device)
            logical = np.full(n_slots, -1)
            snapshots = []
            for k0 in range(0, n, block_rows):
                rows = range(k0, min(n, k0 + block_rows))
                slots = [r % n_slots for r in rows]
                plan.land(ring[slots[0] : slots[-1] + 1], x[k0 : rows.stop])
                logical[slots] = list(rows)
                band_products(ring, slots, plan, products[:, k0 : rows.stop])
                snapshots.append((rows, slots, logical.copy()))
            host = products.cpu().numpy()  # once per column, as the build copies once per task
        return np.concatenate([band_entries(host[:, r.start : r.stop], s, lg, max_lag) for r, s, lg in snapshots], 1)

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(column, sample))
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    resident.clear()
    if device.type == "cuda":
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
    from spectral_analyzer.gram import build
    from spectral_analyzer.store import Store

    store = Store.open(path)
    t0 = time.perf_counter()
    rows = build._compute_rows(store, max_lag, 0, n_rows, "cpu", None, None, False)
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
    ap.add_argument("--device", default="cuda", help="the cuda device (default cuda: the current one)")
    ap.add_argument("--device-gb", type=float, default=32.0,
                    help="device memory for the kernel floor's resident rows, GB (default 32)")
    ap.add_argument("--check-rows", type=count, default=24,
                    help="band rows checked against a cpu build (default 24; 0 for none)")
    ap.add_argument("--dry-run", action="store_true", help="run everything on the cpu (checks the script only)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_gpu"))
    ap.add_argument("--keep", action="store_true", help="leave the workdir in place")
    args = ap.parse_args()
    n, p, c, L = args.deltas, args.params, args.chunk_size, args.max_lag
    if n < 2 or L < 1:
        ap.error("--deltas must be at least 2 and --max-lag at least 1")

    import torch

    from spectral_analyzer.devices import resolve_device
    from spectral_analyzer.errors import DeviceError
    from spectral_analyzer.gram import build
    from spectral_analyzer.store import Store

    if args.dry_run:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print(f"bench_gpu.py: no cuda device visible to torch {torch.__version__}; run it on a GPU machine "
                  "(or with --dry-run)", file=sys.stderr)
            raise SystemExit(2)
        try:
            device = resolve_device(args.device)
        except DeviceError as exc:
            ap.error(str(exc))
        if device.type != "cuda":
            ap.error(f"--device must be a cuda device, got {args.device!r}")
    cores = os.cpu_count() or 1
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
        workers, _ = build.local_workers(c, L, None, device)
        alloc = _pinned(device)

        reads = {}
        for state in ("cold", "warm"):
            for kind in ("raw", "reader"):
                if state == "cold":
                    drop_cache(store_files(path))
                cache = cache_state(resident_fraction(files))
                print(f"host read, {kind}, {cores} threads ({cache}) ...", flush=True)
                reads[state, kind] = (read_columns(store, cores, raw=kind == "raw", alloc=alloc), cache)

        copy = None
        if device.type == "cuda":
            print("host-to-device copy floor ...", flush=True)
            copy = copy_floor(store, workers, build.BLOCK_ROWS, device, min(store_bytes, 8 * GiB))
        copy_s = None if copy is None else copy["copy_sample_s"] * store_bytes / copy["copy_sample_bytes"]

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

    read_s, warm_read_s = reads["cold", "raw"][0], reads["warm", "raw"][0]
    floors = [s for s in (copy_s, kernel_s) if s is not None]
    floor, warm_floor = max(read_s, *floors), max(warm_read_s, *floors)

    import dask
    import zarr

    import spectral_analyzer

    machine = {
        "cpus": cores, "load_average": os.getloadavg()[0],
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "zarr": zarr.__version__, "dask": dask.__version__, "numpy": np.__version__,
        "spectral_analyzer": f"{spectral_analyzer.__version__} ({Path(spectral_analyzer.__file__).parent})",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / GiB, 1))
    f = {
        "date": datetime.date.today().isoformat(), "dry_run": args.dry_run, "machine": machine,
        "deltas": n, "params": p, "chunk_size": c, "max_lag": L, "device": str(device), "workers": workers,
        "read_threads": cores, "data_bytes": data_bytes, "store_bytes": store_bytes,
        **{f"{state}_{kind}_read_s": s for (state, kind), (s, _) in reads.items()},
        **{f"{state}_{kind}_read_gbps": store_bytes / s / 1e9 for (state, kind), (s, _) in reads.items()},
        **{f"{state}_{kind}_read_cache": cache for (state, kind), (_, cache) in reads.items()},
        "copy_s": copy_s, "copy_gbps": None if copy_s is None else store_bytes / copy_s / 1e9,
        "kernel_s": kernel_s, "kernel_gbps": data_bytes / kernel_s / 1e9,
        "kernel_sample_chunks": kern["sample_chunks"], "kernel_sample_bytes": kern["sample_bytes"],
        "build_cache": build_cache, "build_s": build_s, "build_gbps": store_bytes / build_s / 1e9,
        "warm_build_cache": warm_cache, "warm_build_s": warm_build_s,
        "warm_build_gbps": store_bytes / warm_build_s / 1e9,
        "ratio": build_s / read_s, "warm_ratio": warm_build_s / warm_read_s, "ratio_target": RATIO_TARGET,
        "ratio_pass": build_s / read_s <= RATIO_TARGET, "warm_ratio_pass": warm_build_s / warm_read_s <= RATIO_TARGET,
        "floor_s": floor, "floor_ratio": build_s / floor, "warm_floor_s": warm_floor,
        "warm_floor_ratio": warm_build_s / warm_floor,
        "check_rows": check_rows, "check_cpu_s": cpu_s, "check_max_rel_diff": rel_diff,
        "check_pass": None if rel_diff is None else rel_diff <= CHECK_RTOL,
    }

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    def line(label: str, seconds: float | None, nbytes: int, note: str) -> None:
        if seconds is not None:
            print(f"{label:26s}{seconds:8.2f} s    {nbytes / seconds / 1e9:7.2f} GB/s  {note}")

    print()
    print(f"{n} deltas x {p:,} float32 params, chunks of {c:,}, L = {L}; {machine.get('gpu', device)}, "
          f"{workers} tasks at once{'  (DRY RUN on the cpu: figures mean nothing)' if args.dry_run else ''}")
    print(f"store bytes (deltas)      {store_bytes / 1e9:8.2f} GB")
    line("band build", build_s, store_bytes, f"({build_cache})")
    line("band build", warm_build_s, store_bytes, f"({warm_cache})")
    for state in ("cold", "warm"):
        for kind in ("raw", "reader"):
            s, cache = reads[state, kind]
            line(f"host read, {kind}", s, store_bytes, f"({cache}; {cores} threads, pinned buffers)")
    line("host-to-device copy", copy_s, store_bytes, f"({workers} threads and streams, pinned blocks)")
    line("device kernel", kernel_s, data_bytes, f"({kern['sample_chunks']} chunk columns resident, "
         f"rings of {build.staged_slots(L, build.BLOCK_ROWS)} rows, scaled by bytes)")
    print(f"build / raw host read     {f['ratio']:8.2f}      target <= {RATIO_TARGET} (>= 0.8 of the read rate)   "
          f"{verdict(f['ratio_pass'])}")
    print(f"  warm                    {f['warm_ratio']:8.2f}      target <= {RATIO_TARGET}   {verdict(f['warm_ratio_pass'])}")
    print(f"build / max(floors)       {f['floor_ratio']:8.2f}      (warm {f['warm_floor_ratio']:.2f}; floors: raw read, "
          "copy, kernel)")
    if rel_diff is not None:
        print(f"band = cpu band           {rel_diff:8.1e}      max |{device.type} - cpu| / max |cpu| per tensor, rows "
              f"0..{check_rows - 1} (cpu {cpu_s:.1f} s); target <= {CHECK_RTOL:g}   {verdict(f['check_pass'])}")
    print(json.dumps(f))


if __name__ == "__main__":
    main()
