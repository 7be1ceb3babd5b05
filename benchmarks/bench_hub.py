#!/usr/bin/env python
"""Ingest of hub revisions from a hub on loopback, against the raw transfer floor, and peak RSS.

Publishes N revisions (``step0``, ``step1000``, ...) of a synthetic GPT-NeoX-shaped model (about 100M
parameters by default, float16 ``model.safetensors`` as Pythia's are, each revision the previous plus a
small update) on the tests' loopback hub (tests/hub_server.py: the endpoints huggingface_hub calls, the
files served from disk with sendfile by a storage origin of its own), in a process of its own. Then, in
the same run:

* the transfer floor: the byte ranges the ingest fetches (each file's 8-byte length and header, then
  every tensor's span), fetched from the same server with plain HTTP range requests (http.client, one
  at a time, into a reused buffer, no processing), before and after the ingest; the faster counts;
* the ingest, ``sa.ingest("hf://bench/suite", store)`` in a child process that reaches the hub through
  ``HF_ENDPOINT``: wall time (imports excluded) and peak RSS.

Targets: ingest <= 1.5 x the transfer floor, peak RSS < 1.5 GiB. Also measured in the same run, for
context: the raw write of the delta bytes (on loopback, the transfer can be faster than the store's
writes), and the ingest of the same files from the local folder (the pipeline's own cost, which the
hub ingest adds its requests to).

    python benchmarks/bench_hub.py --revisions 20 --workdir /tmp/bench_hub
    python benchmarks/bench_hub.py --revisions 20 --link-mbps 1000 --workdir /tmp/bench_hub

On loopback the bytes arrive faster than this machine writes the float32 deltas they become (float16
sources give twice as many delta bytes as they fetch), so the ratio there measures the ingest's own
cost. ``--link-mbps`` paces the hub's storage to a network link's rate, shared by all connections (the
floor's and the ingest's alike): a distant hub, where the transfer is the floor that counts and the
ingest's work should hide behind it.

The server's files are in the page cache for the floor and the ingest alike (just written and hashed).
The last line of output is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from bench_ingest import RssPoller, du, write_floor
from bench_ingest import run_ingest as run_local_ingest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hub_server import gpt_neox_config, gpt_neox_shapes  # noqa: E402 -- the tests' loopback hub

GiB = 1024**3
RATIO_TARGET = 1.5
RSS_TARGET_GIB = 1.5
SEED = 20261204
REPO = "bench/suite"

SERVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from hub_server import Blob, LoopbackHub
manifest = json.loads(Path(sys.argv[2]).read_text())
hub = LoopbackHub(link=None if sys.argv[3] == "none" else float(sys.argv[3]))
for rev in manifest["revisions"]:
    hub.add_revision(manifest["repo"], rev["name"], {
        "model.safetensors": Blob.on_disk(Path(rev["path"]), rev["sha256"]),
        "config.json": json.dumps(manifest["config"]).encode()})
hub.start()
print(json.dumps({"url": hub.url, "storage": hub.storage_url}), flush=True)
sys.stdin.read()  # until the benchmark closes it
hub.stop()
"""

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import huggingface_hub
import spectral_analyzer as sa
import spectral_analyzer.ingest.hub, spectral_analyzer.ingest.pipeline, spectral_analyzer.run  # not timed
t1 = time.perf_counter()
run = sa.ingest(sys.argv[1], sys.argv[2], progress=False)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "ingest_s": t2 - t1, "n_deltas": run.n_deltas, "n_params": run.n_params,
                  "steps": [int(s) for s in run.checkpoint_steps]}))
"""


def make_suite(folder: Path, n: int, shapes: dict[str, tuple[int, ...]], step_every: int = 1000) -> list[dict]:
    """Write the revisions (float16 safetensors); theta is held in float32 and updated tensor by tensor."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    theta = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.02) for k, s in shapes.items()}
    revisions = []
    for i in range(n):
        if i:
            for k in theta:
                update = rng.standard_normal(theta[k].shape, dtype=np.float32)
                update *= np.float32(1e-3)
                theta[k] += update
                del update
        path = folder / f"step{i * step_every}.safetensors"
        save_file({k: v.astype(np.float16) for k, v in theta.items()}, str(path))
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        revisions.append({"name": f"step{i * step_every}", "path": str(path), "sha256": h.hexdigest()})
        print(f"  wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)
    return revisions


def ranges_of(path: Path) -> list[tuple[int, int]]:
    """The byte ranges an ingest of every tensor fetches from a safetensors file, in file order."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    return [(0, 8), (8, 8 + n)] + [(8 + n + a, 8 + n + b) for a, b in spans if b > a]


def transfer_floor(storage: str, files: list[tuple[str, list[tuple[int, int]]]]) -> tuple[float, int]:
    """Seconds to fetch every range with plain HTTP range requests, one at a time, and the bytes fetched."""
    parts = urlsplit(storage)
    largest = max(b - a for _, spans in files for a, b in spans)
    buf = memoryview(bytearray(largest))
    total = 0
    conn = http.client.HTTPConnection(parts.hostname, parts.port)
    t0 = time.perf_counter()
    for sha256, spans in files:
        for a, b in spans:
            conn.request("GET", f"/lfs/{sha256}", headers={"Range": f"bytes={a}-{b - 1}"})
            response = conn.getresponse()
            assert response.status == 206, response.status
            got = 0
            while got < b - a:
                n = response.readinto(buf[got : b - a])
                if not n:
                    raise SystemExit(f"short answer for bytes {a}..{b} of {sha256}")
                got += n
            total += got
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed, total


def run_ingest(endpoint: str, store: Path) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, f"hf://{REPO}", str(store)], stdout=subprocess.PIPE,
                             text=True, env=env)
    poller = RssPoller(child.pid)
    poller.start()
    out, _ = child.communicate()
    wall = time.perf_counter() - t0
    poller.stop.set()
    poller.join()
    if child.returncode:
        raise SystemExit(f"ingest failed (exit {child.returncode})")
    import resource

    result = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": wall, **result,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2,
            "polled_peak_rss_anon_gib": poller.peak["RssAnon"] / 1024**2,
            "polled_peak_rss_file_gib": poller.peak["RssFile"] / 1024**2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--revisions", type=int, default=20, help="number of revisions N (default 20)")
    ap.add_argument("--hidden", type=int, default=640, help="GPT-NeoX hidden size (default 640)")
    ap.add_argument("--layers", type=int, default=7, help="GPT-NeoX layers (default 7: 98.9M parameters)")
    ap.add_argument("--vocab", type=int, default=50304, help="vocabulary (default 50304, Pythia's)")
    ap.add_argument("--link-mbps", type=float, default=None,
                    help="the hub's storage sends at this many megabits per second, shared by all connections, "
                         "as a distant hub over a network link would (default: as fast as loopback goes)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_hub"))
    ap.add_argument("--keep", action="store_true", help="leave the workdir in place")
    args = ap.parse_args()
    n = args.revisions
    if n < 2:
        ap.error("--revisions must be at least 2")
    shapes = gpt_neox_shapes(args.hidden, args.layers, args.vocab)
    p = sum(int(np.prod(s)) for s in shapes.values())

    work = args.workdir
    src, store = work / "revisions", work / "run.zarr"
    for old in (src, store):
        if old.exists():
            shutil.rmtree(old)
    work.mkdir(parents=True, exist_ok=True)
    need = n * p * 2 + (n + 2) * p * 4 + GiB
    free = shutil.disk_usage(work).free
    print(f"workdir {work}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")
    if free < need:
        raise SystemExit("not enough free disk space; lower --revisions or --layers")

    server = None
    try:
        print(f"generating {n} revisions x {p:,} float16 parameters ...", flush=True)
        t0 = time.perf_counter()
        revisions = make_suite(src, n, shapes)
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
        manifest = work / "manifest.json"
        manifest.write_text(json.dumps({"repo": REPO, "revisions": revisions,
                                        "config": gpt_neox_config(args.hidden, args.layers, args.vocab)}))
        link = "none" if args.link_mbps is None else str(args.link_mbps * 1e6 / 8)
        server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT / "tests"), str(manifest), link],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        urls = json.loads(server.stdout.readline())
        files = [(r["sha256"], ranges_of(Path(r["path"]))) for r in revisions]
        fetched = sum(b - a for _, spans in files for a, b in spans)
        checkpoint_bytes = sum(Path(r["path"]).stat().st_size for r in revisions)

        print("transfer floor ...", flush=True)
        floor_before, got = transfer_floor(urls["storage"], files)
        assert got == fetched
        print("ingest ...", flush=True)
        ing = run_ingest(urls["url"], store)
        assert ing["n_deltas"] == n - 1 and ing["n_params"] == p, ing
        print("transfer floor again ...", flush=True)
        floor_after, _ = transfer_floor(urls["storage"], files)
        store_bytes = du(store)
        shutil.rmtree(store)
        delta_bytes = (n - 1) * p * 4
        print("write floor ...", flush=True)
        write_s = write_floor(work / "write_floor.bin", delta_bytes)
        print("ingest of the same files from the local folder ...", flush=True)
        local = run_local_ingest(src, work / "local.zarr")
    finally:
        if server is not None:
            server.stdin.close()
            server.wait(timeout=30)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    floor = min(floor_before, floor_after)
    ingest_s = ing["ingest_s"]  # in sa.ingest: the child's imports are not the ingest's
    ratio = ingest_s / floor
    figures = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
                    "python": platform.python_version()},
        "revisions": n,
        "link_mbps": args.link_mbps,
        "params": p,
        "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "dtype": "float16"},
        "checkpoint_bytes": checkpoint_bytes,
        "fetched_bytes": fetched,
        "delta_bytes": delta_bytes,
        "store_bytes": store_bytes,
        "transfer_floor_s": floor,
        "transfer_floor_runs_s": [floor_before, floor_after],
        "transfer_gbps": fetched / floor / 1e9,
        "ingest_s": ingest_s,
        "ingest_wall_s": ing["wall_s"],
        "import_s": ing["import_s"],
        "ingest_gbps": fetched / ingest_s / 1e9,
        "write_s": write_s,
        "write_gbps": delta_bytes / write_s / 1e9,
        "ratio": ratio,
        "ratio_target": RATIO_TARGET,
        "ratio_pass": ratio <= RATIO_TARGET,
        "ratio_to_max_transfer_write": ingest_s / max(floor, write_s),
        "local_ingest_s": local["ingest_s"],
        "ratio_to_local_ingest": ingest_s / local["ingest_s"],
        "local_peak_rss_anon_gib": local["polled_peak_rss_anon_gib"],
        "local_peak_rss_file_gib": local["polled_peak_rss_file_gib"],
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
    print(f"{n} revisions x {p:,} float16 params (GPT-NeoX, hidden {args.hidden}, {args.layers} layers); "
          + ("loopback" if args.link_mbps is None else f"a link of {args.link_mbps:g} Mbit/s"))
    print(f"fetched bytes          {fetched / 1e9:8.2f} GB   (files {checkpoint_bytes / 1e9:.2f} GB)")
    print(f"delta bytes            {delta_bytes / 1e9:8.2f} GB   (store on disk {store_bytes / 1e9:.2f} GB)")
    print(f"transfer floor         {floor:8.1f} s    {f['transfer_gbps']:.2f} GB/s  "
          f"(runs {floor_before:.1f} s, {floor_after:.1f} s)")
    print(f"ingest                 {ingest_s:8.1f} s    {f['ingest_gbps']:.2f} GB/s of revisions "
          f"({ing['wall_s']:.1f} s with {ing['import_s']:.1f} s of imports)")
    print(f"raw write of deltas    {write_s:8.1f} s    {f['write_gbps']:.2f} GB/s (no fsync)")
    print(f"local ingest           {local['ingest_s']:8.1f} s    (the same files from the local folder; "
          f"hub / local {f['ratio_to_local_ingest']:.2f}; RSS anon {f['local_peak_rss_anon_gib']:.2f} GiB)")
    print(f"ratio ingest / floor   {ratio:8.2f}      target <= {RATIO_TARGET}   {verdict(f['ratio_pass'])}"
          f"   (to max(transfer, write): {f['ratio_to_max_transfer_write']:.2f})")
    print(f"peak RSS               {f['peak_rss_gib']:8.2f} GiB  target < {RSS_TARGET_GIB}   "
          f"{verdict(f['rss_pass'])}   (anon {f['peak_rss_anon_gib']:.2f}, file-backed {f['peak_rss_file_gib']:.2f})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
