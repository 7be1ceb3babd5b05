from __future__ import annotations

import json

import torch

import spectral_analyzer as sa
from spectral_analyzer import examples


def test_modular_run_is_an_hf_trainer_folder(tmp_path):
    cfg = examples.ModularConfig(p=11, d_model=16, heads=2, d_ff=32, steps=30, every=10, batch=32, operation="sq")
    out = examples.train_modular(tmp_path / "run", cfg)
    assert sorted(d.name for d in out.iterdir()) == ["checkpoint-0", "checkpoint-10", "checkpoint-20", "checkpoint-30"]
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"]] == [0, 10, 20, 30]
    assert state["config"]["operation"] == "sq"
    run = sa.ingest(out, tmp_path / "r.zarr")
    assert list(run.checkpoint_steps) == [0, 10, 20, 30]
    assert {"test_acc", "train_acc", "loss", "learning_rate"} <= set(run.metrics.data_vars)
    assert "layers.1.attn.in_proj_weight" in run.tensors["tensor"].values
    assert run.weight_spectra("*in_proj_weight[q]").sizes["matrix"] == 2


def test_operations_and_dyck_labels():
    a, b = torch.tensor([3, 5]), torch.tensor([4, 6])
    assert examples.OPERATIONS["sub"](a, b, 7).tolist() == [6, 6]
    assert examples.OPERATIONS["sq"](a, b, 7).tolist() == [(9 + 16) % 7, (25 + 36) % 7]
    tokens = torch.tensor([[0, 0, 1, 0, 1, 1]])
    assert examples.dyck_depths(tokens).tolist() == [[1, 2, 1, 2, 1, 0]]


def test_dyck_run(tmp_path):
    cfg = examples.DyckConfig(length=8, samples=64, d_model=16, heads=2, d_ff=16, steps=20, every=10, batch=16)
    out = examples.train_dyck(tmp_path / "dyck", cfg)
    run = sa.ingest(out, tmp_path / "d.zarr")
    assert run.n_deltas == 2 and "test_acc" in run.metrics
