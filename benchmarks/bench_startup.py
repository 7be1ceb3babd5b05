#!/usr/bin/env python
"""Start-up of the command line against the interpreter's own, in the same run.

Times (median of R runs, wall clock) and peak RSS of:

* the floor: ``python -c pass``;
* ``spectral-analyze --help``;
* ``spectral-analyze info STORE`` on a store of the shipped grokking run
  (ingested once into WORKDIR first).

Targets: each command under 0.5 s and 150 MB peak RSS, and within 0.4 s of
the floor. The last line of output is one JSON object with all figures.

    python benchmarks/bench_startup.py --repeat 7 --workdir /tmp/bench_startup
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WALL_TARGET_S, RSS_TARGET_MB, OVER_FLOOR_S = 0.5, 150, 0.4


def _run(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed: {proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def _measure(argv: list[str], repeat: int) -> dict:
    runs = [_run(argv) for _ in range(repeat)]
    return {"wall_s": statistics.median(w for w, _ in runs), "rss_mb": max(r for _, r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_startup"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.workdir / "wd1.zarr"
    cli = [sys.executable, "-m", "spectral_analyzer.cli"]
    subprocess.run([*cli, "ingest", str(ROOT / "fixtures" / "grokking" / "wd1"), "-o", str(store), "--overwrite",
                    "--no-progress"], check=True, capture_output=True)
    floor = _measure([sys.executable, "-c", "pass"], args.repeat)
    figures = {"floor": floor}
    ok = True
    for name, argv in (("help", [*cli, "--help"]), ("info", [*cli, "info", str(store)])):
        m = _measure(argv, args.repeat)
        m["over_floor_s"] = m["wall_s"] - floor["wall_s"]
        m["pass"] = (m["wall_s"] < WALL_TARGET_S and m["rss_mb"] < RSS_TARGET_MB
                     and m["over_floor_s"] < OVER_FLOOR_S)
        ok &= m["pass"]
        figures[name] = m
        print(f"{name:>5}: {m['wall_s']:.3f} s ({m['over_floor_s']:+.3f} s over python -c pass), "
              f"peak RSS {m['rss_mb']:.0f} MB: {'PASS' if m['pass'] else 'MISS'}")
    print(f"floor: python -c pass {floor['wall_s']:.3f} s, {floor['rss_mb']:.0f} MB")
    print(json.dumps({"benchmark": "startup", "date": datetime.date.today().isoformat(), "host": platform.node(),
                      "cpus": os.cpu_count(), "repeat": args.repeat, **figures, "pass": ok}))
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
