#!/usr/bin/env python
"""The band kernel on one block: time and operations against the number of tensor segments in a chunk.

A ring of R delta rows (random float32) of one chunk of C columns, in the
layout the build uses (:func:`spectral_analyzer.gram.kernel.band_plan`), and
one block of 8 new rows: ``band_products`` then ``band_entries``, as a task
of the build runs them, for a chunk that is one tensor, 512 tensors of one
width side by side, and 512 and 4096 tensors of random widths. Two rings: float32
with L + 8 rows in the in-place layout (the cpu build's ``HostRing``:
narrow pieces copied into padded groups after a row is read) and float64
with ``staged_slots(L, 8)`` rows in the compact layout (the device build's
``StagedRing``: each landing row gathered into its layout and converted
once). The landing work of a block of 8 rows is timed apart. Operations are the
top-level torch operators of one block that write memory, counted with
torch.profiler; each is one kernel launch on a GPU.

    python benchmarks/bench_kernel.py                 # C = 4M, L = 16, 1 torch thread, on cpu
    python benchmarks/bench_kernel.py --device cuda   # the same on a GPU

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

VIEWS = {  # operators that make views or wrap others: no kernel of their own
    "aten::slice", "aten::select", "aten::alias", "aten::view", "aten::transpose", "aten::t", "aten::numpy_T",
    "aten::permute", "aten::narrow", "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze",
    "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::to", "aten::_to_copy",
    "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
}


def segment_sets(n_cols: int, seed: int) -> dict[str, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    equal = np.linspace(0, n_cols, 513).astype(int)
    out = {"1": [(0, n_cols)], "512_equal": list(zip(equal[:-1].tolist(), equal[1:].tolist()))}
    for n in (512, 4096):
        cuts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, n_cols), n - 1, replace=False)), [n_cols]])
        out[f"{n}_random"] = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
    return out


def operations(fn) -> int:
    """Top-level torch operators of one call of *fn* that write memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")
               and e.name not in VIEWS)


def main() -> None:
    from spectral_analyzer.gram.kernel import band_entries, band_plan, band_products
    from spectral_analyzer.gram.ring import staged_slots

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cols", type=lambda s: int(s.replace("_", "")), default=4 * 1024 * 1024,
                    help="columns of the chunk (default 4M)")
    ap.add_argument("--max-lag", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the build's tasks)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_cols, L, block = args.cols, args.max_lag, 8
    rings = {"float32": (L + block, torch.float32), "float64": (staged_slots(L, block), torch.float64)}
    if device.type != "cpu":
        rings.pop("float32")  # the device build keeps float64 rings only
    gen = torch.Generator().manual_seed(5)
    data = torch.randn(max(n for n, _ in rings.values()), n_cols, generator=gen)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    figures: dict = {"cols": n_cols, "max_lag": L, "threads": args.threads, "device": str(device),
                     "torch": torch.__version__}
    for kind, (n_slots, dtype) in rings.items():
        for name, segments in segment_sets(n_cols, 7).items():
            compact = dtype == torch.float64
            plan = band_plan(segments, n_cols, device, compact=compact)
            ring = torch.zeros((n_slots, plan.width), dtype=dtype, device=device)
            read = torch.zeros((n_slots, n_cols + 1), device=device)  # rows as read, and the zero column
            read[:, :n_cols] = data[:n_slots].to(device)
            if compact:
                plan.land(ring, read)
            else:
                ring[:, :n_cols] = read[:, :n_cols]
                plan.spread(ring.numpy())
            new = list(range(n_slots - block, n_slots))
            logical = np.arange(n_slots)
            out = torch.zeros((len(segments), block, n_slots), dtype=torch.float64, device=device)

            def one_block():
                out.zero_()
                band_products(ring, new, plan, out)
                return band_entries(out.cpu().numpy(), new, logical, L)

            def land():  # a block of rows laid out as its ring does when they land
                if compact:
                    plan.land(ring[:block], read[:block])
                else:
                    plan.spread(ring[:block].numpy())

            one_block()
            times, spread = [], []
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                one_block()
                sync()
                t1 = time.perf_counter()
                land()
                sync()
                times.append(t1 - t0)
                spread.append(time.perf_counter() - t1)
            key = f"{kind}_{name}"
            figures[f"{key}_ms"] = min(times) * 1e3
            figures[f"{key}_spread_ms"] = min(spread) * 1e3
            figures[f"{key}_ops"] = operations(lambda: band_products(ring, new, plan, out))
            figures[f"{key}_extra_cols"] = plan.width - n_cols
            print(f"{kind} ring ({n_slots} rows), {name:>10} segments: {min(times) * 1e3:8.1f} ms per block "
                  f"({block * n_cols * 4 / min(times) / 1e9:.2f} GB/s of new rows), {figures[f'{key}_ops']:4d} "
                  f"operations, landing copies {min(spread) * 1e3:.1f} ms, +{plan.width - n_cols:,} columns",
                  flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
