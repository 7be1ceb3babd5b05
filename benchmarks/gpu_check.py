#!/usr/bin/env python
"""The first check of the band's GPU path on a device: one JSON line per figure, each with ``step`` and ``ok``.

Steps (``python benchmarks/gpu_check.py STEP [--dry-run] [--workdir DIR]``;
``benchmarks/gpu_check.sh`` runs them all, with time limits):

env
    GPU, memory, PCIe generation and width (current and maximum, from
    nvidia-smi), driver, torch and CUDA, cores, host memory.
tests
    tests/test_gpu_path.py and tests/test_devices.py under pytest: counts of
    passed, skipped, failed. On a device none may be skipped.
device
    On a synthetic store of 40 deltas x 8M parameters in chunks of 512K (16
    chunk columns; chunk edges cut tensors), in this order:

    * race: every copy into a ring delayed ~50 ms by a device sleep queued
      before it on the copy stream; the staged ring must equal the host ring
      to 1e-12 (L = 13 wraps blocks round the ring, L = 16 does not; from
      row 0 and from row 19), and two negative controls, a kernel that does
      not wait for its block's copy and a staging buffer refilled before its
      copy ran, must differ (> 1e-6): the check can see a missing wait;
    * build: the full build (row tiles, every chunk column, the dask tree
      sum) on cuda against cpu, L = 13 and 16, and the shipped grokking run
      (small tensors: the kernel's padded groups), to 1e-12;
    * kernel: one block (8 new rows, a float64 ring of 32 rows of a 4M
      chunk) through ``band_products`` for 1 and 512 tensors, and the plain
      8 x 32 x 4M DGEMM of the same block for comparison: ms and GB/s of the
      ring read from device memory;
    * copy: pinned host-to-device bandwidth, one stream, and 4 and 8
      threads with a stream each;
    * reader: the build's reader and the raw read at 4, 8 and 16 threads,
      page cache warm (``bench_reader.scaling``);
    * weights: Gram + ``eigvalsh`` against ``svdvals`` on the device in
      float64 (batches of 32 x 768 x 768, 2 x 2048 x 2048, 16 x 3072 x 768),
      against numpy's SVD on the cpu, and the package's ``singular_values``
      on the device against the cpu.
bench
    ``bench_gpu.py`` reduced to 32 deltas x 16.8M parameters (2.1 GB), its
    JSON under ``step: bench_gpu``.

``--dry-run`` runs every step on the cpu, small, to check the check: no
figure means anything then, skipped cuda tests are expected, and the
negative controls cannot fail on the cpu (its copies are synchronous).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

SLEEP_CYCLES = 100_000_000  # device cycles before every copy into a ring: ~50 ms at ~2 GHz
RTOL = 1e-12


def emit(step: str, ok: bool, **figures) -> bool:
    print(json.dumps({"step": step, "ok": bool(ok), **figures}, default=float), flush=True)
    return ok


def rel(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|, inf where their NaN differ."""
    if got.shape != want.shape or not np.array_equal(np.isnan(got), np.isnan(want)):
        return float("inf")
    scale = np.nanmax(np.abs(want))
    return float(np.nanmax(np.abs(got - want)) / scale) if scale else float(np.nanmax(np.abs(got)))


# -- env, tests ---------------------------------------------------------------------


def env(dry: bool) -> bool:
    import torch

    figures: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                     "cpus": os.cpu_count(), "python": sys.version.split()[0],
                     "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                       capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
    query = "name,driver_version,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max"
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        figures["nvidia_smi"] = [dict(zip(query.split(","), (v.strip() for v in line.split(","))))
                                 for line in smi.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        figures["nvidia_smi"] = None
    return emit("env", dry or torch.cuda.is_available(), dry_run=dry, **figures)


def tests(dry: bool) -> bool:
    files = ["tests/test_gpu_path.py", "tests/test_devices.py"]
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|skipped|failed|error|errors)", tail)}
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    skipped = counts.get("skipped", 0)
    ok = done.returncode == 0 and failed == 0 and (dry or skipped == 0)
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    return emit("tests", ok, files=files, passed=counts.get("passed", 0), skipped=skipped, failed=failed,
                seconds=time.perf_counter() - t0, summary=tail, skip_reasons=skips[:10])


# -- device -------------------------------------------------------------------------


def _rings(device):
    """StagedRing variants: copies delayed by a device sleep, and two with a wait removed."""
    import torch

    from spectral_analyzer.gram.ring import StagedRing

    class Delayed(StagedRing):
        def land(self, rows):
            if device.type == "cuda":
                with torch.cuda.stream(self._copy_stream):
                    torch.cuda._sleep(SLEEP_CYCLES)
            super().land(rows)

    class NoReadyWait(Delayed):  # the kernel does not wait for its block's copy
        def ready(self):
            self._landed.popleft()

    class NoStageSync(Delayed):  # a staging buffer is refilled while its copy is still queued
        def stage(self, rows, then):
            if rows:
                b, self._turn = self._turn, 1 - self._turn
                for j, row in enumerate(rows):
                    self.store.read_delta_chunk(row, self.start, self._host[b][j])
                self._staged.append(b)
            self.store.prefetch_delta_chunks(then, self.start)

    return Delayed, NoReadyWait, NoStageSync


def race(store, device, dry: bool) -> bool:
    from spectral_analyzer.gram import build
    from spectral_analyzer.gram.ring import HostRing

    delayed, no_ready, no_stage = _rings(device)
    n = store.n_deltas
    out: dict = {}
    t0 = time.perf_counter()
    for lag in (13, 16):
        for r0 in (0, 19):
            for start, stop, pieces in build._chunk_segments(store)[: 1 if dry else 2]:
                segments = [(a - start, b - start) for _, a, b in pieces]
                want = build._ring_band(HostRing(store, start, stop, lag, 8, segments=segments), r0, n, lag)
                for cls in (delayed, no_ready, no_stage):
                    ring = cls(store, start, stop, lag, 8, device, segments=segments)
                    key = f"{cls.__name__}_L{lag}_r{r0}"
                    out[key] = max(out.get(key, 0.0), rel(build._ring_band(ring, r0, n, lag), want))
    equal = all(v <= RTOL for k, v in out.items() if k.startswith("Delayed"))
    seen = all(v > 1e-6 for k, v in out.items() if not k.startswith("Delayed"))
    return emit("race", equal and (dry or seen), staged_equals_host=equal, negative_controls_differ=seen,
                rel_diff=out, seconds=time.perf_counter() - t0)


def full_build(store, fixture: Path, work: Path, device) -> bool:
    import torch

    import spectral_analyzer as sa
    from spectral_analyzer.gram import build
    from spectral_analyzer.store import Store

    figures: dict = {}
    ok = True
    small = Store.open(sa.ingest(fixture, work / "grokking.zarr").path)
    for name, st, lags in (("store", store, (13, 16)), ("grokking", small, (16,))):
        for lag in lags:
            t0 = time.perf_counter()
            got = build._compute_rows(st, lag, 0, st.n_deltas, str(device), None, None, False)
            t1 = time.perf_counter()
            want = build._compute_rows(st, lag, 0, st.n_deltas, torch.device("cpu"), None, None, False)
            d = rel(got, want)
            ok &= d <= RTOL
            figures[f"{name}_L{lag}"] = {"rel_diff": d, "device_s": t1 - t0, "cpu_s": time.perf_counter() - t1}
    figures["workers"] = build.local_workers(store.chunk_size, 16, None, device)[0]
    return emit("build", ok, **figures)


def kernel(device, dry: bool) -> bool:
    import torch

    from spectral_analyzer.gram.kernel import band_plan, band_products

    n_cols = 1 << 14 if dry else 1 << 22
    repeats = 1 if dry else 5
    n_rows, new = 32, list(range(16, 24))
    gen = torch.Generator().manual_seed(1)
    read = torch.zeros((n_rows, n_cols + 1))
    read[:, :n_cols] = torch.randn(n_rows, n_cols, generator=gen)
    read = read.to(device)
    figures: dict = {"cols": n_cols, "ring_rows": n_rows}

    def best_ms(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    rng = np.random.default_rng(2)
    cuts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, n_cols), 511, replace=False)), [n_cols]])  # 512
    for name, edges in (("1", [0, n_cols]), ("512", cuts)):
        segments = list(zip(np.asarray(edges)[:-1].tolist(), np.asarray(edges)[1:].tolist()))
        plan = band_plan(segments, n_cols, device, compact=True)
        ring = torch.empty((n_rows, plan.width), dtype=torch.float64, device=device)
        plan.land(ring, read)
        out = torch.zeros((len(segments), len(new), n_rows), dtype=torch.float64, device=device)
        ms = best_ms(lambda: band_products(ring, new, plan, out))
        figures[f"band_products_{name}_ms"] = ms
        figures[f"band_products_{name}_ring_gbps"] = n_rows * plan.width * 8 / ms / 1e6
        figures[f"land_{name}_ms"] = best_ms(lambda: plan.land(ring[:8], read[:8]))
    y = read[:, :n_cols].double()
    acc = torch.zeros((len(new), n_rows), dtype=torch.float64, device=device)
    ms = best_ms(lambda: acc.addmm_(y[16:24], y.T))
    figures.update(dgemm_8x32_ms=ms, dgemm_8x32_ring_gbps=n_rows * n_cols * 8 / ms / 1e6)
    return emit("kernel", True, **figures)


def copy(device) -> bool:
    import torch

    nbytes = 128 << 20
    src = [torch.empty(nbytes // 4, pin_memory=True).normal_() for _ in range(8)]
    dst = [torch.empty(nbytes // 4, device=device) for _ in range(8)]
    figures: dict = {"block_bytes": nbytes}
    for threads in (1, 4, 8):
        def run(i: int) -> None:
            with torch.cuda.stream(torch.cuda.Stream(device)):
                for _ in range(8):
                    dst[i].copy_(src[i], non_blocking=True)
                torch.cuda.current_stream(device).synchronize()

        run(0)
        t0 = time.perf_counter()
        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        figures[f"h2d_pinned_{threads}_threads_gbps"] = threads * 8 * nbytes / (time.perf_counter() - t0) / 1e9
    return emit("copy", True, **figures)


def reader(path: Path, device, dry: bool) -> bool:
    import torch
    from bench_reader import scaling

    pin = device.type == "cuda"
    alloc = (lambda shape: torch.empty(shape, dtype=torch.float32, pin_memory=pin).numpy())
    return emit("reader", True, **scaling(path, [1, 2] if dry else [4, 8, 16], cold=False, repeats=1, alloc=alloc))


def weights(device, dry: bool) -> bool:
    import torch

    from spectral_analyzer.weights.kernel import TOLERANCE, singular_values

    shapes = [(4, 64, 64), (4, 128, 32)] if dry else [(32, 768, 768), (2, 2048, 2048), (16, 3072, 768)]
    figures: dict = {}
    ok = True
    gen = torch.Generator().manual_seed(3)
    for b, m, n in shapes:
        host = torch.randn(b, m, n, generator=gen, dtype=torch.float64)
        ref = np.linalg.svd(host.numpy(), compute_uv=False)
        a = host.to(device)
        key = f"{b}x{m}x{n}"
        cases = {
            "svdvals": lambda: torch.linalg.svdvals(a),
            "gram_eigvalsh": lambda: torch.linalg.eigvalsh(a @ a.mT if m <= n else a.mT @ a).clamp(min=0).sqrt().flip(-1),
        }
        for name, fn in cases.items():
            fn()
            _sync(device)
            t0 = time.perf_counter()
            got = fn()
            _sync(device)
            figures[f"{key}_{name}_ms"] = (time.perf_counter() - t0) * 1e3
            got = got.cpu().numpy()
            figures[f"{key}_{name}_top3_rel"] = float(np.max(np.abs(got[:, :3] - ref[:, :3]) / ref[:, :3]))
        t0 = time.perf_counter()
        ours = singular_values(list(host.numpy()), device)
        figures[f"{key}_singular_values_ms"] = (time.perf_counter() - t0) * 1e3
        worst = max(float(np.max(np.abs(s - r)) / r[0]) for s, r in zip(ours, ref))
        figures[f"{key}_singular_values_rel_sigma1"] = worst
        ok &= worst <= TOLERANCE
    return emit("weights", ok, **figures)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_steps(work: Path, dry: bool) -> bool:
    import torch

    from bench_band import make_store
    from spectral_analyzer.devices import resolve_device
    from spectral_analyzer.store import Store

    device = torch.device("cpu") if dry else resolve_device("cuda")
    path = Path(tempfile.mkdtemp(dir=work)) / "run.zarr"
    ok = True
    try:
        t0 = time.perf_counter()
        if dry:
            make_store(path, 24, 200_000, 1 << 15, 7)
        else:
            make_store(path, 40, 8_000_000, 1 << 19, 7)  # 1.28 GB, 16 chunk columns of 512K, chunks cut tensors
        emit("store", True, path=str(path), seconds=time.perf_counter() - t0, device=str(device))
        store = Store.open(path)
        for name, fn in (
            ("race", lambda: race(store, device, dry)),
            ("build", lambda: full_build(store, ROOT / "fixtures" / "grokking" / "wd1", path.parent, device)),
            ("kernel", lambda: kernel(device, dry)),
            ("copy", lambda: copy(device) if device.type == "cuda" else emit("copy", True, skipped="no device")),
            ("reader", lambda: reader(path, device, dry)),
            ("weights", lambda: weights(device, dry)),
        ):
            try:
                ok &= fn()
            except Exception as exc:  # noqa: BLE001 -- one step's failure is a figure; the others still run
                ok &= emit(name, False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    return ok


def bench(work: Path, dry: bool) -> bool:
    if dry:
        size = ["--dry-run", "--deltas", "12", "--params", "600_000", "--chunk-size", "65_536", "--check-rows", "8"]
    else:
        size = ["--deltas", "32", "--params", "16_777_216", "--check-rows", "16"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), *size,
                           "--workdir", str(work / "bench_gpu")], cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return emit("bench_gpu", False, returncode=done.returncode, stderr=done.stderr[-1000:])
    print("\n".join(line for line in lines[:-1] if line.strip()), file=sys.stderr)  # the human-readable table
    return emit("bench_gpu", done.returncode == 0 and bool(figures.get("check_pass")), **figures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["env", "tests", "device", "bench", "all"])
    ap.add_argument("--dry-run", action="store_true", help="on the cpu, small: checks the check")
    ap.add_argument("--workdir", type=Path, default=None, help="a real disk for the stores (default: a temp folder)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    steps = {"env": lambda: env(args.dry_run), "tests": lambda: tests(args.dry_run),
             "device": lambda: device_steps(work, args.dry_run), "bench": lambda: bench(work, args.dry_run)}
    ok = True
    for name in (steps if args.step == "all" else [args.step]):
        ok &= steps[name]()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
