#!/usr/bin/env python
"""Band Gram build against its floors and against dask.array, on a synthetic store.

Writes a store of N float32 delta rows of P parameters (random normal data,
split into a few uneven tensors) in WORKDIR with the Store API, then measures,
in the same run:

* the read floor: every chunk file of ``deltas`` read once, sequentially,
  16 MiB at a time (cold, then warm), and cold with ``O_DIRECT`` (straight
  into an aligned buffer, past the page cache, as the build reads what the
  cache does not hold); the cold floor is the faster of the two cold reads;
* the kernel floor: the build's own task (``_band_task``: ``band_products`` on a
  halo of L rows and BLOCK_ROWS new rows per call) with its store replaced by
  rows already in memory, as many tasks in parallel and torch threads per
  task as the build's local scheduler uses, and one task with every core's
  torch threads, on a sample of parameter chunks (all rows), best of 3,
  extrapolated to the store by bytes; the floor is the faster of the two;
* the dask.array baseline: ``(x @ x.T).compute()`` with
  ``x = dask.array.from_zarr(STORE/deltas)`` restricted to the same sample of
  columns (all rows), once, extrapolated to the store by bytes (its Gram is
  checked against the kernel's band of the same columns);
* the band build, ``sa.open_run(STORE).band(max_lag=L)`` in a child process:
  wall time of the call (timed in the child) and the child's peak RSS, first
  with a cold page cache, then warm (the store read once to fill the cache)
  after deleting the cached band; the child
  then computes the spectra of every window of W = min(10, L) deltas off the
  band (timed apart; the peak RSS includes them);
* the build's peak RSS on a second store of about P/4 parameters (same
  rows; rounded up to whole chunks, at least one per parallel task), to show
  that peak memory does not grow with P.

Store bytes are the bytes of the chunk files (with their crc32c and the
zero padding of edge chunks): what the build and the read floor read.

Targets: build <= 1.4 x max(read, kernel); dask baseline >= 10 x build;
peak RSS < 1.5 GiB.

    python benchmarks/bench_band.py --deltas 40 --params 25_000_000 --workdir /tmp/bench_band

Page cache: before each cold read (the read floor, the dask baseline, the cold
builds) the store's files are flushed and dropped with
``posix_fadvise(DONTNEED)``; the fraction still resident is measured with
mincore(2) and the read reported as "cold" or "warm". The last line of output
is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import RssPoller, cache_state, drop_cache, resident_fraction  # noqa: E402

GiB = 1024**3
BUF = 16 * 1024 * 1024
RATIO_TARGET = 1.4
BASELINE_TARGET = 10.0
RSS_TARGET_GIB = 1.5
SEED = 20261128
STEP_EVERY = 100

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import spectral_analyzer as sa
import spectral_analyzer.gram.build, spectral_analyzer.run  # the package imports these on first use: not timed
t1 = time.perf_counter()
def status():
    return dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
import_rss_kib = int(status()["VmRSS"].split()[0])
run = sa.open_run(sys.argv[1])
band = run.band(max_lag=int(sys.argv[2]))
t2 = time.perf_counter()
v = band.values
spectra = run.spectra(window=min(10, int(sys.argv[2])), cache=False)  # off the cached band, no delta read
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1, "spectra_s": t3 - t2,
                  "windows": int(spectra.sizes["step"]), "k_star_mode": int(spectra.k_star.to_series().mode()[0]),
                  "shape": list(v.shape),
                  "checksum": float(np.nansum(v)), "import_rss_kib": import_rss_kib,
                  "vm_hwm_kib": int(status()["VmHWM"].split()[0])}))
"""


# -- synthetic store ----------------------------------------------------------


def manifest(n_params: int):
    """A few uneven tensors summing to exactly *n_params*, boundaries off the chunk grid."""
    from spectral_analyzer.store import TensorEntry

    width = 1000
    shares = [  # name, share of the parameters
        ("embed_tokens.weight", 0.31),
        ("layers.0.attn.qkv_proj.weight", 0.17),
        ("layers.0.attn.qkv_proj.bias", None),  # a small vector
        ("layers.0.mlp.up_proj.weight", 0.26),
        ("layers.0.mlp.down_proj.weight", 0.2),
    ]
    entries, offset = [], 0
    for name, share in shares:
        if share is None:
            size, shape = 3 * 1024, (3 * 1024,)
        else:
            rows = max(1, int(share * n_params) // width)
            size, shape = rows * width, (rows, width)
        entries.append(TensorEntry(name, offset, size, shape, "float32"))
        offset += size
    rest = n_params - offset
    if rest <= 0:
        raise SystemExit(f"--params {n_params} is too small")
    entries.append(TensorEntry("lm_head.weight", offset, rest, (rest,), "float32"))
    return entries


def make_store(path: Path, n_deltas: int, n_params: int, chunk_size: int, seed: int) -> None:
    """Write and commit N rows through the store's commit protocol: one chunk of random data in memory at a time."""
    from spectral_analyzer.store import StoreWriter
    from spectral_analyzer.store.generations import base_link, hex_of

    rng = np.random.default_rng(seed)
    with StoreWriter(path, overwrite=True) as writer:
        st = writer.create(manifest(n_params), chunk_size,
                           {"provenance": {"source": "synthetic (benchmarks/bench_band.py)", "seed": seed}})
        st.reserve_rows(0)
        zeros = [np.zeros(stop - start, dtype=np.float32) for start, stop in st.chunk_bounds()]
        base_crc = [st.write_chunk("base", None, start, z) for (start, _), z in zip(st.chunk_bounds(), zeros)]
        last_crc = [st.write_chunk("last_theta", 0, start, z) for (start, _), z in zip(st.chunk_bounds(), zeros)]
        st.write_source(0, {"step": 0, "label": "synthetic", "files": []})
        c0 = hex_of(base_link(st.attrs["tensors"], st.chunk_size, 0, base_crc))
        st.commit(commit={"n_deltas": 0, "head_step": 0, "last_slot": 0, "last_step": 0, "base": c0, "chain": c0,
                          "last_crc": last_crc}, base_step=0, base_crc=base_crc)
        st.reserve_rows(n_deltas)
        for row in range(n_deltas):
            crcs = []
            for start, stop in st.chunk_bounds():
                data = rng.standard_normal(stop - start, dtype=np.float32)
                data *= np.float32(1e-3)
                crcs.append(st.write_chunk("deltas", row, start, data))
            step = (row + 1) * STEP_EVERY
            st.write_row_meta(row, step, crcs)
            st.write_source(row + 1, {"step": step, "label": "synthetic", "files": []})
            st.commit_rows({**st.commit_record, "n_deltas": row + 1}, [step], [crcs])
    os.sync()


def chunk_files(store: Path) -> list[Path]:
    """The chunk files of ``deltas`` in (row, column) order."""
    files = [p for p in (store / "deltas" / "c").rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: tuple(int(x) for x in p.relative_to(store / "deltas" / "c").parts))


def store_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file()]


# -- floors -------------------------------------------------------------------


def read_floor(paths: list[Path]) -> tuple[float, int]:
    buf = bytearray(BUF)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return time.perf_counter() - t0, total


def direct_read_floor(paths: list[Path]) -> tuple[float, int] | None:
    """Every file read once with ``O_DIRECT`` (16 MiB reads into an aligned buffer), None where refused."""
    from spectral_analyzer.store.direct_io import ALIGN, aligned_zeros

    if not hasattr(os, "O_DIRECT"):
        return None
    buf = aligned_zeros((BUF + ALIGN,), np.uint8)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return None
        try:
            offset = 0
            while n := os.preadv(fd, [buf], offset):
                total += n
                offset += n
                if n % ALIGN:
                    break  # the end of the file
        except OSError:
            return None
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def build_workers(chunk_size: int, max_lag: int) -> tuple[int, int]:
    """Parallel tasks and torch threads per task of the build's local scheduler."""
    from spectral_analyzer.gram.build import DEFAULT_MEMORY_LIMIT, local_workers

    return local_workers(chunk_size, max_lag, DEFAULT_MEMORY_LIMIT)


class _RowsInMemory:
    """Stands in for the store inside the build's task: delta rows served from memory.

    ``read_delta_row`` hands out the loaded array itself; ``read_delta_chunk``
    (reading into a caller's buffer) costs one memcpy. Anything else goes to
    the real store.
    """

    def __init__(self, store, rows: dict[tuple[int, int], np.ndarray]):
        self._store, self._rows = store, rows

    def read_delta_row(self, row: int, start: int, stop: int) -> np.ndarray:
        return self._rows[row, start]

    def read_delta_chunk(self, row: int, start: int, out: np.ndarray, **_) -> None:
        out[:] = self._rows[row, start]

    def __getattr__(self, name: str):
        return getattr(self._store, name)


def kernel_floor(store_path: Path, n_chunks: int, max_lag: int, repeats: int) -> dict:
    """Time the build's own task (``_band_task``) on the first *n_chunks* parameter chunks held in memory.

    The task is called as the local scheduler calls it, one chunk column
    (all rows) per task, with the store it opens replaced by rows in memory:
    what remains is the kernel and the task's own bookkeeping.
    """
    import inspect

    import torch

    from spectral_analyzer.gram import build
    from spectral_analyzer.store import Store

    st = Store.open(store_path)
    chunks = build._chunk_segments(st)[:n_chunks]
    n = st.n_deltas
    rows = {(r, a): st.read_delta_row(r, a, b) for a, b, _ in chunks for r in range(n)}
    sample_bytes = sum(x.nbytes for x in rows.values())
    memory = _RowsInMemory(st, rows)
    crcs = st.crcs
    workers, threads = build_workers(st.chunk_size, max_lag)
    params = inspect.signature(build._band_task).parameters

    def task(chunk: tuple, n_threads: int) -> dict:
        torch.set_num_threads(n_threads)  # per OS thread: in the worker's own thread, as the build does
        start, stop, segs = chunk
        args = {"path": str(store_path), "storage_options": None, "version": n, "start": start, "stop": stop, "segments": segs,
                "r0": 0, "r1": n, "max_lag": max_lag, "device": "cpu", "threads": n_threads,
                "crcs": crcs[:, start // st.chunk_size].copy()}
        return build._band_task(**{k: v for k, v in args.items() if k in params})

    class _OpenInMemory:
        @staticmethod
        def open(path, *args, **kwargs):
            return memory

    def timed(n_workers: int, n_threads: int) -> tuple[float, list[dict]]:
        best, out = float("inf"), []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n_workers) as pool:
                out = list(pool.map(lambda c: task(c, n_threads), chunks))
            best = min(best, time.perf_counter() - t0)
        return best, out

    real_store, real_open = build.Store, getattr(build, "_open", None)
    build.Store = _OpenInMemory
    if real_open is not None:  # older builds cache the store per worker
        build._open = lambda path, version: memory
    try:
        build_s, parts = timed(workers, threads)
        cores = os.cpu_count() or 1
        alt_s, _ = timed(1, cores)
    finally:
        build.Store = real_store
        if real_open is not None:
            build._open = real_open
    # <x_i, x_{i-l}> over the sample's columns: the sum over chunks and tensor pieces
    lagged = sum(v for part in parts for v in part.values())
    return {"sample_chunks": len(chunks), "sample_bytes": sample_bytes, "workers": workers,
            "torch_threads": threads, "sample_s": build_s, "alt_sample_s": alt_s,
            "alt_config": f"1 task at a time, {cores} torch threads", "lagged": lagged}


def dask_baseline(store_path: Path, n_chunks: int, chunk_size: int) -> dict:
    import dask.array as da

    x = da.from_zarr(str(store_path / "deltas"))
    cols = min(n_chunks * chunk_size, x.shape[1])
    xs = x[:, :cols]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", da.PerformanceWarning)
        gram = (xs @ xs.T).compute()
    elapsed = time.perf_counter() - t0
    return {"sample_bytes": xs.shape[0] * cols * 4, "sample_s": elapsed, "gram": gram}


# -- the build in a child -----------------------------------------------------


def run_build(store: Path, max_lag: int) -> dict:
    """Build the band in a child; its peak RSS is the child's own VmHWM.

    Not ``ru_maxrss``: a child started by vfork + exec inherits the parent's
    high-water mark in ``ru_maxrss``, and this parent holds torch and the
    kernel sample.
    """
    t0 = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store), str(max_lag)], stdout=subprocess.PIPE, text=True,
        cwd=store.parent,  # the package as installed (or on PYTHONPATH), not from the current folder
    )
    poller = RssPoller(child.pid)
    poller.peak["VmHWM"] = 0
    poller.start()
    out, _ = child.communicate()
    wall = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    if child.returncode:
        raise SystemExit(f"band build on {store} failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {
        "wall_s": wall,
        **result,
        "peak_rss_gib": max(result["vm_hwm_kib"], poller.peak["VmHWM"]) / 1024**2,
        "import_rss_gib": result["import_rss_kib"] / 1024**2,
        "peak_rss_anon_gib": poller.peak["RssAnon"] / 1024**2,
        "peak_rss_file_gib": poller.peak["RssFile"] / 1024**2,
    }


# -- main ---------------------------------------------------------------------


def main() -> None:
    def count(s: str) -> int:
        return int(s.replace("_", ""))

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deltas", type=count, default=160, help="delta rows N (default 160)")
    ap.add_argument("--params", type=count, default=8_388_608, help="float32 parameters per row P (default 8_388_608: two whole chunks)")
    ap.add_argument("--chunk-size", type=count, default=4 * 1024 * 1024, help="elements per chunk (default 4M)")
    ap.add_argument("--max-lag", type=int, default=16, help="L (default 16)")
    ap.add_argument("--sample-chunks", type=int, default=2,
                    help="parameter chunks (all rows) timed for the kernel floor and the dask baseline (default 2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_band"))
    ap.add_argument("--keep", action="store_true", help="leave the workdir in place")
    args = ap.parse_args()
    n, p, c, L = args.deltas, args.params, args.chunk_size, args.max_lag
    if n < 2 or L < 1:
        ap.error("--deltas must be at least 2 and --max-lag at least 1")
    # a quarter of P, rounded up to whole chunks and at least one chunk per parallel task,
    # so that the smaller store keeps every task of the build busy with a full chunk
    workers = build_workers(c, L)[0]
    p_small = max(workers, -(-(p // 4) // c)) * c
    if p_small >= p:  # too few chunks to round: a plain quarter
        p_small = p // 4

    work = args.workdir
    big, small = work / "run.zarr", work / "run_small.zarr"
    for old in (big, small):
        if old.exists():
            shutil.rmtree(old)
    work.mkdir(parents=True, exist_ok=True)
    need = n * (p + p_small) * 4 + GiB
    free = shutil.disk_usage(work).free
    print(f"workdir {work}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")
    if free < need:
        raise SystemExit("not enough free disk space; lower --deltas or --params")

    try:
        print(f"writing {n} deltas x {p:,} float32 params (and a {p_small:,}-param store) ...", flush=True)
        t0 = time.perf_counter()
        make_store(big, n, p, c, SEED)
        make_store(small, n, p_small, c, SEED + 1)
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
        files = chunk_files(big)
        store_bytes = sum(f.stat().st_size for f in files)
        data_bytes = n * p * 4

        drop_cache(store_files(big))
        read_cache = cache_state(resident_fraction(files))
        print(f"read floor ({read_cache}) ...", flush=True)
        read_s, read_bytes = read_floor(files)
        assert read_bytes == store_bytes
        warm_read_cache = cache_state(resident_fraction(files))
        print(f"read floor ({warm_read_cache}) ...", flush=True)
        warm_read_s, _ = read_floor(files)
        drop_cache(store_files(big))
        direct_cache = cache_state(resident_fraction(files))
        print(f"read floor, O_DIRECT ({direct_cache}) ...", flush=True)
        direct = direct_read_floor(files)
        direct_read_s = None
        if direct is not None:
            direct_read_s, got = direct
            assert got == store_bytes, (got, store_bytes)

        print("kernel floor ...", flush=True)
        kern = kernel_floor(big, args.sample_chunks, L, repeats=3)
        kernel_s = kern["sample_s"] * data_bytes / kern["sample_bytes"]
        alt_kernel_s = kern["alt_sample_s"] * data_bytes / kern["sample_bytes"]

        drop_cache(store_files(big))
        dask_cache = cache_state(resident_fraction(files))
        print(f"dask baseline ({dask_cache}) ...", flush=True)
        dk = dask_baseline(big, args.sample_chunks, c)
        dask_s = dk["sample_s"] * data_bytes / dk["sample_bytes"]
        # the sample's band from the kernel against the same entries of dask's full Gram
        i = np.arange(n)[:, None]
        lag = np.arange(L + 1)[None, :]
        ok = i - lag >= 0
        ref = dk["gram"][np.broadcast_to(i, ok.shape)[ok], (i - lag)[ok]]
        dask_rel_diff = float(np.max(np.abs(kern["lagged"][ok] - ref) / np.abs(kern["lagged"][ok]).max()))

        drop_cache(store_files(big))
        build_cache = cache_state(resident_fraction(files))
        print(f"band build ({build_cache}) ...", flush=True)
        cold = run_build(big, L)
        shutil.rmtree(big / "gram")
        read_floor(files)  # the cold build read past the page cache: fill it
        warm_cache = cache_state(resident_fraction(files))
        print(f"band build ({warm_cache}, cached band deleted) ...", flush=True)
        warm = run_build(big, L)
        assert cold["shape"] == warm["shape"] == [len(manifest(p)), n, L + 1], (cold, warm)
        assert cold["checksum"] == warm["checksum"], (cold["checksum"], warm["checksum"])

        small_files = chunk_files(small)
        drop_cache(store_files(small))
        small_cache = cache_state(resident_fraction(small_files))
        print(f"band build, {p_small:,}-param store ({small_cache}) ...", flush=True)
        sm = run_build(small, L)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # the kernel on both cores, whichever way runs it faster (a store of one chunk column runs one
    # task at a time in the build's configuration, but the build splits it into row tiles)
    kernel_s = min(kernel_s, alt_kernel_s)
    buffered_read_s = read_s
    if direct_read_s is not None:  # the faster way to read the store cold is the floor
        read_s = min(read_s, direct_read_s)
    floor = max(read_s, kernel_s)
    warm_floor = max(warm_read_s, kernel_s)
    ratio = cold["build_s"] / floor
    warm_ratio = warm["build_s"] / warm_floor
    speedup = dask_s / cold["build_s"]
    peak_rss = max(cold["peak_rss_gib"], warm["peak_rss_gib"])

    import dask
    import torch
    import zarr

    import spectral_analyzer

    f = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "python": platform.python_version(),
            "torch": torch.__version__, "zarr": zarr.__version__, "dask": dask.__version__,
            "numpy": np.__version__,
            "spectral_analyzer": f"{spectral_analyzer.__version__} ({Path(spectral_analyzer.__file__).parent})",
        },
        "deltas": n, "params": p, "chunk_size": c, "max_lag": L,
        "data_bytes": data_bytes, "store_bytes": store_bytes,
        "build_cache": build_cache, "build_s": cold["build_s"], "build_wall_s": cold["wall_s"],
        "import_s": cold["import_s"], "build_gbps": store_bytes / cold["build_s"] / 1e9,
        "spectra_s": cold["spectra_s"], "spectra_windows": cold["windows"],
        "warm_build_cache": warm_cache, "warm_build_s": warm["build_s"],
        "warm_build_gbps": store_bytes / warm["build_s"] / 1e9,
        "read_cache": read_cache, "read_s": read_s, "read_gbps": store_bytes / read_s / 1e9,
        "buffered_read_s": buffered_read_s, "direct_read_cache": direct_cache, "direct_read_s": direct_read_s,
        "warm_read_cache": warm_read_cache, "warm_read_s": warm_read_s,
        "warm_read_gbps": store_bytes / warm_read_s / 1e9,
        "kernel_s": kernel_s, "kernel_gbps": data_bytes / kernel_s / 1e9,
        "kernel_sample_chunks": kern["sample_chunks"], "kernel_sample_bytes": kern["sample_bytes"],
        "kernel_workers": kern["workers"], "kernel_torch_threads": kern["torch_threads"],
        "alt_kernel_s": alt_kernel_s, "alt_kernel_config": kern["alt_config"],
        "floor_s": floor, "ratio": ratio, "ratio_target": RATIO_TARGET, "ratio_pass": ratio <= RATIO_TARGET,
        "warm_floor_s": warm_floor, "warm_ratio": warm_ratio, "warm_ratio_pass": warm_ratio <= RATIO_TARGET,
        "dask_cache": dask_cache, "dask_s": dask_s, "dask_gbps": data_bytes / dask_s / 1e9,
        "dask_sample_bytes": dk["sample_bytes"], "dask_sample_s": dk["sample_s"],
        "dask_band_max_rel_diff": dask_rel_diff,
        "speedup": speedup, "speedup_target": BASELINE_TARGET, "speedup_pass": speedup >= BASELINE_TARGET,
        "peak_rss_gib": peak_rss, "peak_rss_anon_gib": cold["peak_rss_anon_gib"],
        "peak_rss_file_gib": cold["peak_rss_file_gib"], "warm_peak_rss_gib": warm["peak_rss_gib"],
        "import_rss_gib": cold["import_rss_gib"],
        "rss_target_gib": RSS_TARGET_GIB, "rss_pass": peak_rss < RSS_TARGET_GIB,
        "small_params": p_small, "small_build_cache": small_cache, "small_build_s": sm["build_s"],
        "small_peak_rss_gib": sm["peak_rss_gib"],
    }

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    print()
    print(f"{n} deltas x {p:,} float32 params, chunks of {c:,}, L = {L}")
    print(f"store bytes (deltas)   {store_bytes / 1e9:8.2f} GB")
    print(f"band build             {f['build_s']:8.1f} s    {f['build_gbps']:.2f} GB/s ({build_cache}; "
          f"child wall {f['build_wall_s']:.1f} s with {f['import_s']:.1f} s import)")
    print(f"band build             {f['warm_build_s']:8.1f} s    {f['warm_build_gbps']:.2f} GB/s ({warm_cache})")
    print(f"spectra                {f['spectra_s']:8.1f} s    ({cold['windows']} windows of W = {min(10, L)} off the "
          f"cached band, in the same child: its peak RSS below includes them)")
    print(f"raw read               {buffered_read_s:8.1f} s    {store_bytes / buffered_read_s / 1e9:.2f} GB/s ({read_cache})")
    if direct_read_s is not None:
        print(f"raw read, O_DIRECT     {direct_read_s:8.1f} s    {store_bytes / direct_read_s / 1e9:.2f} GB/s ({direct_cache})")
    print(f"raw read               {warm_read_s:8.1f} s    {f['warm_read_gbps']:.2f} GB/s ({warm_read_cache})")
    print(f"kernel                 {kernel_s:8.1f} s    {f['kernel_gbps']:.2f} GB/s ({kern['workers']} tasks x "
          f"{kern['torch_threads']} torch thread(s); {kern['sample_chunks']} chunks x {n} rows in memory, "
          f"scaled by bytes; {alt_kernel_s:.1f} s with {kern['alt_config']})")
    print(f"floor = max(read, kernel) {floor:5.1f} s    (warm: {warm_floor:.1f} s)")
    print(f"ratio build / floor    {ratio:8.2f}      target <= {RATIO_TARGET}   {verdict(f['ratio_pass'])}")
    print(f"  warm build / warm floor {warm_ratio:5.2f}      target <= {RATIO_TARGET}   {verdict(f['warm_ratio_pass'])}")
    print(f"dask x @ x.T           {dask_s:8.1f} s    {f['dask_gbps']:.3f} GB/s ({dask_cache}; "
          f"{dk['sample_s']:.1f} s on {dk['sample_bytes'] / 1e9:.2f} GB of columns, scaled by bytes)")
    print(f"ratio dask / build     {speedup:8.1f}      target >= {BASELINE_TARGET:g}    {verdict(f['speedup_pass'])}")
    print(f"peak RSS               {peak_rss:8.2f} GiB  target < {RSS_TARGET_GIB}   {verdict(f['rss_pass'])}"
          f"   (cold build: anon {f['peak_rss_anon_gib']:.2f}, file-backed {f['peak_rss_file_gib']:.2f}; "
          f"warm build {f['warm_peak_rss_gib']:.2f}; {f['import_rss_gib']:.2f} after imports)")
    print(f"peak RSS, smaller P    {f['small_peak_rss_gib']:8.2f} GiB  ({p_small:,} params, {small_cache} build "
          f"{f['small_build_s']:.1f} s; {p:,} params: {peak_rss:.2f} GiB)")
    print(json.dumps(f))


if __name__ == "__main__":
    main()
