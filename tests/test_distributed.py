"""The band build on a dask.distributed cluster equals the local one exactly."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_run

import spectral_analyzer as sa

distributed = pytest.importorskip("distributed")


def test_scheduler_address_gives_the_local_result(tmp_path):
    write_run(tmp_path / "src", 24, {"layers.0.w": (64, 33), "layers.1.w": (257,), "head": (99,)}, seed=6)
    local = sa.ingest(tmp_path / "src", tmp_path / "local.zarr", chunk_size=500).band(max_lag=5).values
    run = sa.ingest(tmp_path / "src", tmp_path / "remote.zarr", chunk_size=500)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        remote = run.band(max_lag=5, scheduler=cluster.scheduler_address).values
    assert np.array_equal(remote, local, equal_nan=True)


def test_killing_a_worker_mid_build_keeps_the_result_exact(tmp_path):
    import os
    import signal
    import threading
    import time

    write_run(tmp_path / "src", 30, {"layers.0.w": (200, 101), "head": (777,)}, seed=7)
    local = sa.ingest(tmp_path / "src", tmp_path / "local.zarr", chunk_size=160).band(max_lag=4).values
    run = sa.ingest(tmp_path / "src", tmp_path / "remote.zarr", chunk_size=160)  # 132 chunk tasks
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("band", run.band(max_lag=4, scheduler=client)))
        thread.start()
        # wait until band tasks are running on the workers, then kill one worker process outright
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = client.run_on_scheduler(
                lambda dask_scheduler: sum(
                    ts.state == "processing" and str(ts.key).startswith("_band_task")
                    for ts in dask_scheduler.tasks.values()
                )
            )
            if running:
                break
            time.sleep(0.01)
        time.sleep(0.2)
        assert thread.is_alive(), "the build finished before a worker could be killed"
        victim = next(iter(cluster.workers.values())).process.pid
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=120)
        assert not thread.is_alive()
    assert np.array_equal(result["band"].values, local, equal_nan=True)
