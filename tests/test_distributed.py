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
