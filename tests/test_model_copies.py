"""A copy of the model saved beside it (an EMA, a teacher or target network) is read as parameters of its
own, and its updates are summed into every Gram: told at ingest, and kept in the store's warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa


def _run(folder, names, copy=None, n=3):
    gen = torch.Generator().manual_seed(0)
    shapes = {"weight": (4, 4), "bias": (4,)}
    model = {f"{m}.{k}": torch.randn(s, generator=gen) for m in names for k, s in shapes.items()}
    folder.mkdir()
    for step in range(n):
        model = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in model.items()}
        state = dict(model)
        if copy is not None:
            state.update({f"{copy}.{k}": 0.9 * v for k, v in model.items()})
        save_file(state, str(folder / f"step_{10 * step}.safetensors"))
    return folder


@pytest.mark.parametrize("copy", ["model_ema", "ema_model", "teacher", "target_net", "momentum_encoder"])
def test_a_copy_of_the_model_is_told_and_kept_in_the_warnings(tmp_path, copy):
    src = _run(tmp_path / "src", ["fc1", "fc2"], copy=copy)
    with pytest.warns(sa.ModelCopyWarning, match=rf"step_0\.safetensors: the 4 tensors under '{copy}\.' repeat the "
                                                 rf"names and shapes of the model's own.*exclude='{copy}\.\*'"):
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert any(f"under '{copy}.'" in w for w in run.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.ModelCopyWarning)
        assert sa.ingest(src, tmp_path / "x.zarr", exclude=[f"{copy}.*"]).n_params == 40


def test_layers_of_one_shape_are_no_copies(tmp_path):
    """fc1 and fc2 repeat each other's names and shapes after their first part; their names say no copy."""
    src = _run(tmp_path / "src", ["fc1", "fc2", "targets_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.ModelCopyWarning)
        assert sa.ingest(src, tmp_path / "r.zarr").warnings == []
