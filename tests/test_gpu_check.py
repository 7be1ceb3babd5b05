"""The prepared first-device check runs green on the cpu in its dry-run mode (small, every step in process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402
import gpu_check  # noqa: E402


def test_the_device_steps_of_the_dry_run_are_ok(tmp_path, capsys):
    assert gpu_check.env(dry=True)
    assert gpu_check.device_steps(tmp_path, dry=True)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    steps = {line["step"]: line for line in lines}
    assert set(steps) == {"env", "store", "race", "build", "kernel", "copy", "reader", "weights"}
    assert all(line["ok"] for line in lines), [line for line in lines if not line["ok"]]
    assert steps["race"]["staged_equals_host"] and len(steps["race"]["rel_diff"]) == 12
    assert {k: v["rel_diff"] for k, v in steps["build"].items() if k.startswith(("store_", "grokking_"))} == {
        "store_L13": 0.0, "store_L16": 0.0, "grokking_L16": 0.0}


def test_bench_gpu_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--dry-run", "--deltas", "10", "--params", "300_000",
                                      "--chunk-size", "65_536", "--check-rows", "8", "--workdir", str(tmp_path / "b")])
    bench_gpu.main()
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["dry_run"] and figures["check_pass"] and figures["kernel_sample_chunks"] == 5
    assert figures["copy_s"] is None and figures["workers"] >= 1
