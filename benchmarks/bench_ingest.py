#!/usr/bin/env python
"""Ingest throughput and memory against the I/O floor, on a synthetic run.

Builds N safetensors checkpoints of P float32 parameters in WORKDIR (each one
the previous plus a small random update), then measures, in the same run:

* the read floor: every checkpoint byte read once, sequentially, 16 MiB at a time;
* the write floor: (N-1) x P x 4 bytes (the delta rows) written without fsync;
* the ingest, in a child process: wall time and peak RSS.

Targets: ingest <= 2.0 x (read + write floor) and peak RSS < 1.5 GiB.

    python benchmarks/bench_ingest.py --checkpoints 20 --params 100_000_000 --workdir /tmp/bench_ingest

Page cache: before each timed read (the floor and the ingest) every checkpoint
is flushed and dropped with ``posix_fadvise(DONTNEED)``; the fraction still
resident afterwards is measured with mincore(2) and the read reported as
"cold" or "warm". The last line of output is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

GiB = 1024**3
BUF = 16 * 1024 * 1024
RATIO_TARGET = 2.0
RSS_TARGET_GIB = 1.5
SEED = 20261128

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import spectral_analyzer as sa
import spectral_analyzer.ingest.pipeline, spectral_analyzer.run  # the package imports these on first use: not timed
t1 = time.perf_counter()
run = sa.ingest(sys.argv[1], sys.argv[2], progress=False)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "ingest_s": t2 - t1,
                  "n_deltas": run.n_deltas, "n_params": run.n_params}))
"""


# -- synthetic run ------------------------------------------------------------


def layout(n_params: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes summing to exactly *n_params*: uneven 2-D
    matrices of width d plus a few length-d vectors (a one-layer model)."""
    d = int(np.sqrt(n_params / 8)) // 16 * 16
    d = max(16, min(1024, d))
    vectors = [
        "layers.0.input_layernorm.weight",
        "layers.0.attn.q_proj.bias",
        "layers.0.post_attention_layernorm.weight",
        "norm.weight",
    ]
    matrices = [  # name, share of the parameters
        ("embed_tokens.weight", 0.30),
        ("layers.0.attn.q_proj.weight", 0.10),
        ("layers.0.attn.k_proj.weight", 0.05),
        ("layers.0.attn.v_proj.weight", 0.05),
        ("layers.0.attn.o_proj.weight", 0.10),
        ("layers.0.mlp.up_proj.weight", 0.22),
        ("layers.0.mlp.down_proj.weight", None),  # the rest
    ]
    budget = n_params - d * len(vectors)
    if budget < d * len(matrices):
        raise SystemExit(f"--params {n_params} is too small (need at least {d * (len(vectors) + len(matrices))})")
    shapes: list[tuple[str, tuple[int, ...]]] = []
    used = 0
    for name, share in matrices:
        rows = max(1, int(share * budget) // d) if share is not None else (budget - used) // d
        shapes.append((name, (rows, d)))
        used += rows * d
    shapes += [(name, (d,)) for name in vectors]
    if budget - used:
        shapes.append(("lm_head.bias", (budget - used,)))
    assert sum(int(np.prod(s)) for _, s in shapes) == n_params
    return shapes


def make_run(folder: Path, n_checkpoints: int, n_params: int, step_every: int = 100) -> list[Path]:
    """Write the checkpoints; one theta (P floats) is held and updated in place."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    shapes = layout(n_params)
    theta: dict[str, np.ndarray] = {}
    for name, shape in shapes:
        theta[name] = rng.standard_normal(shape, dtype=np.float32)
        theta[name] *= np.float32(0.02)
    paths = []
    for i in range(n_checkpoints):
        if i:
            for name, _ in shapes:  # tensor by tensor: one tensor of noise at a time
                update = rng.standard_normal(theta[name].shape, dtype=np.float32)
                update *= np.float32(1e-3)
                theta[name] += update
                del update
        path = folder / f"step_{i * step_every:06d}.safetensors"
        save_file(theta, str(path))
        with open(path, "rb+") as f:  # flushed, so that the page cache can be dropped
            os.fsync(f.fileno())
        paths.append(path)
        print(f"  wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)
    return paths


# -- page cache ---------------------------------------------------------------


def drop_cache(paths: list[Path]) -> None:
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _mincore():
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore), None if unknown."""
    try:
        libc = _mincore()
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
                total += n
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None


def cache_state(fraction: float | None) -> str:
    if fraction is None:
        return "unknown"
    return "cold" if fraction < 0.05 else "warm" if fraction > 0.95 else f"partly cached ({fraction:.0%})"


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


def write_floor(path: Path, n_bytes: int) -> float:
    block = np.random.default_rng(SEED + 1).integers(0, 256, BUF, dtype=np.uint8).tobytes()
    view = memoryview(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    try:
        left = n_bytes
        while left:
            left -= os.write(fd, view[: min(left, BUF)])
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


# -- ingest in a child --------------------------------------------------------


class RssPoller(threading.Thread):
    """Peak RssAnon / RssFile of a process, from /proc, every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}

    def run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self.stop.wait(0.02):
            try:
                text = status.read_text()
            except OSError:
                return
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], int(value.split()[0]))


def run_ingest(src: Path, store: Path) -> dict:
    t0 = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), str(store)], stdout=subprocess.PIPE, text=True
    )
    poller = RssPoller(child.pid)
    poller.start()
    out, _ = child.communicate()
    wall = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    if child.returncode:
        raise SystemExit(f"ingest failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    maxrss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {
        "wall_s": wall,
        **result,
        "peak_rss_gib": maxrss_kib / 1024**2,
        "polled_peak_rss_anon_gib": poller.peak["RssAnon"] / 1024**2,
        "polled_peak_rss_file_gib": poller.peak["RssFile"] / 1024**2,
    }


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- main ---------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", type=int, default=20, help="number of checkpoints N (default 20)")
    ap.add_argument("--params", type=lambda s: int(s.replace("_", "")), default=100_000_000,
                    help="float32 parameters per checkpoint P (default 100_000_000)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_ingest"))
    ap.add_argument("--keep", action="store_true", help="leave the workdir in place")
    args = ap.parse_args()
    n, p = args.checkpoints, args.params
    if n < 2:
        ap.error("--checkpoints must be at least 2")

    work = args.workdir
    src, store, scratch = work / "ckpts", work / "run.zarr", work / "write_floor.bin"
    for old in (src, store):  # start from nothing: no stale checkpoints or store
        if old.exists():
            shutil.rmtree(old)
    work.mkdir(parents=True, exist_ok=True)

    ckpt_estimate = n * p * 4
    delta_bytes = (n - 1) * p * 4
    store_estimate = (n + 2) * p * 4  # deltas + base + two last_theta slots
    need = ckpt_estimate + max(delta_bytes, store_estimate) + GiB
    free = shutil.disk_usage(work).free
    print(f"workdir {work}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")
    if free < need:
        raise SystemExit("not enough free disk space; lower --checkpoints or --params")

    try:
        print(f"generating {n} checkpoints x {p:,} float32 parameters ...", flush=True)
        t0 = time.perf_counter()
        paths = make_run(src, n, p)
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
        ckpt_bytes = sum(f.stat().st_size for f in paths)

        drop_cache(paths)
        read_cache = cache_state(resident_fraction(paths))
        print(f"read floor ({read_cache}) ...", flush=True)
        read_s, read_bytes = read_floor(paths)
        assert read_bytes == ckpt_bytes

        print("write floor ...", flush=True)
        write_s = write_floor(scratch, delta_bytes)
        os.sync()

        drop_cache(paths)
        ingest_cache = cache_state(resident_fraction(paths))
        print(f"ingest ({ingest_cache}) ...", flush=True)
        ing = run_ingest(src, store)
        assert ing["n_deltas"] == n - 1 and ing["n_params"] == p, ing
        store_bytes = du(store)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    floor = read_s + write_s
    ratio = ing["wall_s"] / floor
    figures = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
            "python": platform.python_version(),
        },
        "checkpoints": n,
        "params": p,
        "checkpoint_bytes": ckpt_bytes,
        "delta_bytes": delta_bytes,
        "store_bytes": store_bytes,
        "read_cache": read_cache,
        "ingest_cache": ingest_cache,
        "ingest_s": ing["wall_s"],
        "ingest_in_process_s": ing["ingest_s"],
        "import_s": ing["import_s"],
        "ingest_gbps": ckpt_bytes / ing["wall_s"] / 1e9,
        "read_s": read_s,
        "read_gbps": ckpt_bytes / read_s / 1e9,
        "write_s": write_s,
        "write_gbps": delta_bytes / write_s / 1e9,
        "floor_s": floor,
        "ratio": ratio,
        "ratio_target": RATIO_TARGET,
        "ratio_pass": ratio <= RATIO_TARGET,
        "peak_rss_gib": ing["peak_rss_gib"],
        "peak_rss_anon_gib": ing["polled_peak_rss_anon_gib"],
        "peak_rss_file_gib": ing["polled_peak_rss_file_gib"],
        "rss_target_gib": RSS_TARGET_GIB,
        "rss_pass": ing["peak_rss_gib"] < RSS_TARGET_GIB,
    }

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    f = figures
    print()
    print(f"{n} checkpoints x {p:,} float32 params")
    print(f"checkpoint bytes      {ckpt_bytes / 1e9:8.2f} GB")
    print(f"delta bytes           {delta_bytes / 1e9:8.2f} GB   (store on disk {store_bytes / 1e9:.2f} GB)")
    print(f"ingest                {f['ingest_s']:8.1f} s    {f['ingest_gbps']:.2f} GB/s of checkpoints "
          f"({ingest_cache}; {f['ingest_in_process_s']:.1f} s in sa.ingest, {f['import_s']:.1f} s import)")
    print(f"raw read              {read_s:8.1f} s    {f['read_gbps']:.2f} GB/s ({read_cache})")
    print(f"raw write             {write_s:8.1f} s    {f['write_gbps']:.2f} GB/s (no fsync)")
    print(f"floor = read + write  {floor:8.1f} s")
    print(f"ratio ingest / floor  {ratio:8.2f}      target <= {RATIO_TARGET}   {verdict(f['ratio_pass'])}")
    print(f"peak RSS              {f['peak_rss_gib']:8.2f} GiB  target < {RSS_TARGET_GIB}   {verdict(f['rss_pass'])}"
          f"   (anon {f['peak_rss_anon_gib']:.2f}, file-backed {f['peak_rss_file_gib']:.2f})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
