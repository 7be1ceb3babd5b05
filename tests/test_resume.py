"""An ingest killed (SIGKILL) at any point and run again ends bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import write_run

import spectral_analyzer as sa

SIZES = {"layers.0.w": (300, 257), "layers.1.w": (257, 300), "head.b": (1001,)}
CHUNK = 7000  # ~23 chunks a row, tensors split across chunks


def _arrays(store: Path) -> dict[str, np.ndarray]:
    run = sa.open_run(store)
    g = zarr.open_group(str(store), mode="r", use_consolidated=False)
    return {
        "deltas": run.deltas.values,
        "step": run.steps,
        "base": np.asarray(g["base"][:]),
        "checkpoint_steps": run.checkpoint_steps,
    }


def _committed(store: Path) -> int:
    try:
        meta = json.loads((store / "zarr.json").read_text())
    except (OSError, ValueError):
        return -1
    commit = meta.get("attributes", {}).get("commit")
    return -1 if commit is None else commit["n_deltas"]


def _ingest_cmd(src: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "spectral_analyzer.cli", "ingest", str(src), "-o", str(store),
            "--chunk-size", str(CHUNK), "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_run(root / "src", 25, SIZES, seed=11)
    reference = root / "reference.zarr"
    sa.ingest(root / "src", reference, chunk_size=CHUNK)
    return root, _arrays(reference)


@pytest.mark.parametrize("kill_after", [-1, 11])  # more kill points: tests/test_adversary_faults.py
def test_kill_and_resume_is_bit_identical(run_dir, kill_after):
    """Kill once the store has committed *kill_after* rows (-1: before the base)."""
    root, reference = run_dir
    store = root / f"killed-{kill_after}.zarr"
    proc = subprocess.Popen(_ingest_cmd(root / "src", store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (kill_after < 0 and (store / "deltas").exists()) or (kill_after >= 0 and _committed(store) >= kill_after):
            break
        time.sleep(0.002)
    if proc.poll() is not None:
        pytest.fail(f"ingest finished before the kill point: {proc.stderr.read().decode()}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _committed(store)
    run = sa.ingest(root / "src", store)
    assert killed_at < 24  # it really was interrupted
    got = _arrays(store)
    assert run.n_deltas == 24
    for key, want in reference.items():
        assert np.array_equal(got[key].view(np.uint8), want.view(np.uint8)), key
