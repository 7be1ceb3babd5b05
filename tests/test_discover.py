from __future__ import annotations

import pytest
from conftest import FIXTURES

from spectral_analyzer.ingest.discover import discover, natural_key, step_from_name


@pytest.mark.parametrize(
    "name, step",
    [
        ("checkpoint-500", 500),
        ("epoch=3-step=1200", 1200),
        ("step_000040", 40),
        ("model_v2_iter300", 300),
        ("ckpt_17", 17),
        ("run7-global_step90", 90),
        ("weights-42", 42),
        ("final", None),
    ],
)
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_natural_order_not_string_order():
    names = ["checkpoint-1000", "checkpoint-200", "checkpoint-30"]
    assert sorted(names, key=natural_key) == ["checkpoint-30", "checkpoint-200", "checkpoint-1000"]


def test_hf_folder_skips_trainer_pickles_and_final_copy():
    found = discover(FIXTURES / "layouts" / "hf_trainer")
    assert [c.step for c in found] == [0, 10, 20, 30]
    assert all([f.name for f in c.files] == ["model.safetensors"] for c in found)


def test_sharded_folder_lists_shards():
    found = discover(FIXTURES / "layouts" / "hf_sharded")
    assert [f.name for f in found[0].files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_safetensors_preferred_over_pickle(tmp_path):
    import torch
    from safetensors.torch import save_file

    for step in (1, 2):
        save_file({"w": torch.zeros(2)}, str(tmp_path / f"s_{step}.safetensors"))
        torch.save({"w": torch.zeros(2)}, tmp_path / f"s_{step}.pt")
    found = discover(tmp_path)
    assert [c.files[0].suffix for c in found] == [".safetensors", ".safetensors"]
