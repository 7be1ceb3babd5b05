"""A copy of the model saved beside it (an EMA, a teacher or target network) is read as parameters of its
own, and its updates are summed into every Gram: told at ingest, and kept in the store's warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa


def _run(folder, names, copy=None, n=3, of=""):
    """A model of *names* (each a module with a weight and a bias), with a *copy* of the modules under *of*
    (all of them by default) saved beside it."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"weight": (4, 4), "bias": (4,)}
    model = {f"{m}.{k}": torch.randn(s, generator=gen) for m in names for k, s in shapes.items()}
    folder.mkdir()
    for step in range(n):
        model = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in model.items()}
        state = dict(model)
        if copy is not None:
            state.update({f"{copy}.{k.removeprefix(of)}": 0.9 * v for k, v in model.items() if k.startswith(of)})
        save_file(state, str(folder / f"step_{10 * step}.safetensors"))
    return folder


@pytest.mark.parametrize("copy", ["model_ema", "momentum_encoder", "ema_model.module"])
def test_a_copy_of_the_model_is_told_and_kept_in_the_warnings(tmp_path, copy):
    src = _run(tmp_path / "src", ["fc1", "fc2"], copy=copy)
    top = copy.split(".")[0]  # AveragedModel's copy: ema_model.module.<name>
    with pytest.warns(sa.ModelCopyWarning, match=rf"step_0\.safetensors: the 4 tensors under '{top}\.' repeat the "
                                                 rf"names and shapes of the model's own.*exclude='{top}\.\*'"):
        run = sa.ingest(src, tmp_path / "r.zarr")
    assert any(f"under '{top}.'" in w for w in run.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.ModelCopyWarning)
        assert sa.ingest(src, tmp_path / "x.zarr", exclude=[f"{top}.*"]).n_params == 40


def test_layers_of_one_shape_are_no_copies(tmp_path):
    """fc1 and fc2 repeat each other's names and shapes after their first part; their names say no copy."""
    src = _run(tmp_path / "src", ["fc1", "fc2", "targets_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.ModelCopyWarning)
        assert sa.ingest(src, tmp_path / "r.zarr").warnings == []


def test_a_copy_of_one_module_is_told(tmp_path):
    src = _run(tmp_path / "src", ["encoder.l1", "encoder.l2", "decoder.l1"], copy="ema_encoder", of="encoder.")
    with pytest.warns(sa.ModelCopyWarning, match=r"the 4 tensors under 'ema_encoder\.'"):
        sa.ingest(src, tmp_path / "r.zarr")


@pytest.mark.parametrize("names", [["source_embedding", "target_embedding"], ["head", "target_head", "body"]])
def test_one_layer_named_like_a_copy_of_another_is_no_copy(tmp_path, names):
    """target_embedding repeats source_embedding's weight and bias: a layer of its shape, not a copy."""
    src = _run(tmp_path / "src", names)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sa.ModelCopyWarning)
        assert sa.ingest(src, tmp_path / "r.zarr").warnings == []
