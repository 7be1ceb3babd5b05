"""Checkpoints that are not what their step says: byte-identical files, deltas far larger than their neighbours."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import trajectory, write_safetensors_run

import spectral_analyzer as sa
from spectral_analyzer.ingest.anomalies import DeltaNorms, squared_norm

SMALL = {"layers.0.weight": (6, 4), "layers.0.bias": (6,), "head.weight": (3, 6)}
STEPS = list(range(0, 100, 10))


def test_squared_norm_in_float64_blocks():
    x = np.random.default_rng(0).standard_normal(3 * (1 << 20) + 5).astype(np.float32)
    assert squared_norm(x) == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-12)


def test_rate_median_rule():
    norms = DeltaNorms([(0, 10, 1.0), (10, 20, 1.2)])
    assert norms.check(20, 30, 30.0, "c") is None  # two deltas before it: too few to judge
    norms = DeltaNorms([(0, 10, 1.0), (10, 20, 1.2), (20, 30, 0.8)])
    assert norms.check(30, 1000, 97 * 15.0, "long") is None  # a long interval: per step, 1.5x
    message = norms.check(1000, 1010, 25.0, "c")
    assert message.startswith("the delta at step 1010 (c) has norm 25 over 10 steps, 23x the median norm per step "
                              "of the 4 deltas before it")


def test_replaced_checkpoint_flags_the_deltas_around_it(tmp_path):
    states = trajectory(STEPS, shapes=SMALL)
    states[60] = trajectory([0], shapes=SMALL, seed=9)[0]  # another run's weights under step 60
    src = write_safetensors_run(tmp_path / "c", states)
    with pytest.warns(sa.OutlierDeltaWarning) as caught:
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert [str(w.message).split(" (")[0] for w in caught] == ["the delta at step 60", "the delta at step 70"]
    assert "is the checkpoint at step 60 (or 50) replaced or mislabelled?" in str(caught[0].message)
    assert run.warnings == [str(w.message) for w in caught]
    norms = [s.get("delta_norm") for s in run.sources]
    assert norms[0] is None and all(n > 0 for n in norms[1:])
    np.testing.assert_allclose(norms[1:], np.linalg.norm(run.deltas.values.astype(np.float64), axis=1), rtol=1e-12)


def test_append_judges_against_the_stored_norms(tmp_path):
    states = trajectory([*STEPS, 100], shapes=SMALL)
    states[100] = {k: v + 5.0 for k, v in states[90].items()}
    src = write_safetensors_run(tmp_path / "c", {s: states[s] for s in STEPS})
    store = tmp_path / "r.zarr"
    sa.ingest(src, store)
    write_safetensors_run(src, {100: states[100]})
    with pytest.warns(sa.OutlierDeltaWarning, match=r"the delta at step 100 \(.*step_100.safetensors\).*of the 5 "
                                                     "deltas before it"):
        sa.ingest(src, store)


def test_uneven_but_honest_intervals_do_not_warn(tmp_path):
    # Pythia's steps, moves growing with their interval (drift, or a random walk): nothing to flag
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000]
    for seed, scale in ((0, 1e-3), (1, 1e-1)):
        src = write_safetensors_run(tmp_path / f"c{seed}", trajectory(steps, shapes=SMALL, seed=seed, scale=scale))
        assert sa.ingest(src, tmp_path / f"r{seed}.zarr").warnings == []


def test_identical_files_under_other_steps(tmp_path):
    src = write_safetensors_run(tmp_path / "c", trajectory([0, 10, 20], shapes=SMALL))
    shutil.copy(src / "step_10.safetensors", src / "step_30.safetensors")  # not adjacent: a non-zero delta
    with pytest.warns(sa.DuplicateCheckpointWarning, match=r"steps 10 \(.*step_10.safetensors\) and 30 \(.*step_30"
                                                           r".safetensors\) have identical contents: byte-identical"):
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert run.deltas.values[-1].any()
    shutil.copy(src / "step_30.safetensors", src / "step_40.safetensors")  # appended: the store's last
    with pytest.warns(sa.DuplicateCheckpointWarning, match=r"steps 30 .* and 40 .* byte-identical") as caught:
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert len(caught) == 1 and len(run.warnings) == 2
