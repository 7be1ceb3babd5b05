#!/usr/bin/env python
"""Append cost against the run's length: is a row as cheap at row 5,000 as at row 1?

Two ways a store grows one row at a time, each timed row by row:

* a ``Recorder`` on a small model (about 11K parameters) recording every
  step, with the loss logged at every step (the floor measured in the same
  run: ``torch.save`` of the same model, per step);
* one ``ingest`` of a folder of N small safetensors checkpoints (each row's
  time is the interval between consecutive commits).

Target: the mean cost of the last 100 rows within 1.2x of the first 100
(DESIGN.md: an append is O(k p) for k new checkpoints, whatever the run's
length). The last line of output is one JSON object with all figures.

    python benchmarks/bench_append.py --rows 5000 --workdir /tmp/bench_append
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

TARGET = 1.2
EDGE = 100  # rows averaged at each end


def _model(torch):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 24))


def _ends(per_row: list[float]) -> dict:
    first, last = float(np.mean(per_row[:EDGE])), float(np.mean(per_row[-EDGE:]))
    return {"first_ms": 1e3 * first, "last_ms": 1e3 * last, "ratio": last / first,
            "median_ms": 1e3 * float(np.median(per_row)), "rows": len(per_row)}


def bench_recorder(workdir: Path, rows: int) -> dict:
    import torch

    import spectral_analyzer as sa

    model = _model(torch)
    params = sum(p.numel() for p in model.parameters())
    path = workdir / "recorded.zarr"
    rec = sa.Recorder(path, model, overwrite=True)
    per_row, floor = [], []
    rng = torch.Generator().manual_seed(1)
    for step in range(rows + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=rng), alpha=1e-3)
        t0 = time.perf_counter()
        rec.step(step, loss=1.0 / (step + 1))
        t1 = time.perf_counter()
        torch.save(model.state_dict(), workdir / "floor.pt")
        t2 = time.perf_counter()
        if step:  # step 0 writes the base
            per_row.append(t1 - t0)
            floor.append(t2 - t1)
    run = sa.open_run(path)
    assert run.n_deltas == rows and len(run.metrics.step) == rows + 1
    return {"params": params, **_ends(per_row), "torch_save_ms": 1e3 * float(np.median(floor))}


def bench_ingest(workdir: Path, rows: int) -> dict:
    import torch
    from safetensors.torch import save_file

    import spectral_analyzer as sa
    from spectral_analyzer.store import Store

    src = workdir / "ckpts"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    for step in range(rows + 1):
        w = w + 1e-3 * rng.standard_normal(w.shape).astype(np.float32)
        save_file({"w": torch.from_numpy(w)}, str(src / f"step-{step}.safetensors"))
    commits: list[float] = []
    original = Store.commit_rows

    def timed(self, *args, **kwargs):
        original(self, *args, **kwargs)
        commits.append(time.perf_counter())

    Store.commit_rows = timed
    try:
        sa.ingest(src, workdir / "ingested.zarr", overwrite=True)
    finally:
        Store.commit_rows = original
    return {"params": int(w.size), **_ends(list(np.diff(commits)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_append"))
    ap.add_argument("--only", choices=["recorder", "ingest"], default=None, help="run one of the two")
    args = ap.parse_args()
    if args.rows < 2 * EDGE:
        sys.exit(f"--rows must be at least {2 * EDGE}")
    import torch

    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    recorder = ingest = {"ratio": float("nan")}
    if args.only != "ingest":
        recorder = bench_recorder(args.workdir, args.rows)
        print(f"recorder: {args.rows} rows of {recorder['params']} params: first {EDGE} "
              f"{recorder['first_ms']:.1f} ms/row, last {EDGE} {recorder['last_ms']:.1f} ms/row, ratio "
              f"{recorder['ratio']:.2f} (target <= {TARGET}); torch.save {recorder['torch_save_ms']:.1f} ms/step")
    if args.only != "recorder":
        ingest = bench_ingest(args.workdir, args.rows)
        print(f"ingest:   {args.rows} checkpoints of {ingest['params']} params: first {EDGE} "
              f"{ingest['first_ms']:.1f} ms/row, last {EDGE} {ingest['last_ms']:.1f} ms/row, ratio "
              f"{ingest['ratio']:.2f} (target <= {TARGET})")
    print(json.dumps({"benchmark": "append", "date": datetime.date.today().isoformat(), "host": platform.node(),
                      "cpus": os.cpu_count(), "rows": args.rows, "recorder": recorder, "ingest": ingest,
                      "pass": all(r["ratio"] <= TARGET for r in (recorder, ingest) if r["ratio"] == r["ratio"])}))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
