"""Numbers in checkpoint names that are not steps: read from the file, left out, or refused in one line; never
taken as the step (a wrong step reorders the run and every delta after it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.ingest.discover import discover, step_from_name


def _lightning(folder, names_steps, seed: int = 0) -> list[np.ndarray]:
    """Lightning checkpoints named *names*, each holding its global_step; the values saved, in step order."""
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g)
    saved = []
    for i, (name, step) in enumerate(names_steps):
        if i:
            w = w + 0.01 * torch.randn(16, generator=g)
        saved.append(w.double().numpy())
        torch.save({"state_dict": {"model.w": w.clone()}, "global_step": step, "epoch": i,
                    "pytorch-lightning_version": "2.4.0"}, folder / name)
    return saved


@pytest.mark.parametrize("name", ["epoch=2-val_loss=0.35", "epoch=02-val_acc=0.91", "epoch=2", "val_loss=0.35"])
def test_numbers_of_key_value_names_without_a_step_are_not_steps(name):
    assert step_from_name(name) is None
    assert step_from_name(f"{name}-step=300") == 300


def test_lightning_checkpoints_named_by_a_metric_take_the_step_they_hold(tmp_path):
    """ModelCheckpoint(filename="{epoch}-{val_loss:.2f}"): the losses 0.90, 0.50, 0.35 were read as steps 90,
    50, 35 and the run ingested backwards; the steps are the global_step each file holds."""
    saved = _lightning(tmp_path / "c", [("epoch=0-val_loss=0.90.ckpt", 100), ("epoch=1-val_loss=0.50.ckpt", 200),
                                        ("epoch=2-val_loss=0.35.ckpt", 300)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = sa.ingest(tmp_path / "c", tmp_path / "r.zarr")
    assert list(run.checkpoint_steps) == [100, 200, 300]
    want = np.float32(saved[1] - saved[0])
    np.testing.assert_array_equal(np.asarray(run.deltas[0]), want)


def test_a_step_in_the_name_that_the_file_contradicts_is_refused(tmp_path):
    """ckpt_5.pt holding global_step 500: which is the step is not known; nothing is written."""
    _lightning(tmp_path / "c", [("ckpt_5.ckpt", 500), ("ckpt_6.ckpt", 600)])
    with pytest.raises(sa.StepError, match=r"ckpt_5.ckpt: its name says step 5 and the file records step 500"):
        sa.ingest(tmp_path / "c", tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
    run = sa.ingest(tmp_path / "c", tmp_path / "r.zarr", steps=[5, 6])  # given: the user's
    assert list(run.checkpoint_steps) == [5, 6]


def _state(seed: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(8, generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("final", ["model.fp16.safetensors", "pytorch_model.bf16.safetensors",
                                   "model-int8.safetensors", "model.safetensors"])
def test_a_copy_of_the_final_model_beside_checkpoint_folders_is_left_out(final, tmp_path):
    """checkpoint-{0,100,200}/ and, at the top, the final model in another precision: model.fp16 became a
    checkpoint at step 16, between 0 and 100."""
    for i, step in enumerate((0, 100, 200)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file(_state(i), str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    save_file(_state(9), str(tmp_path / final))
    assert [c.step for c in discover(tmp_path)] == [0, 100, 200]


@pytest.mark.parametrize("other", ["model.fp16.safetensors", "gpt2.safetensors", "final_3.safetensors"])
def test_a_bare_number_among_names_that_say_their_step_is_refused(other, tmp_path):
    for i, step in enumerate((0, 100, 200)):
        save_file(_state(i), str(tmp_path / f"step_{step}.safetensors"))
    save_file(_state(9), str(tmp_path / other))
    if other.startswith("model.fp16"):  # a precision is no number at all: no step, refused as before
        with pytest.raises(sa.StepError, match="model.fp16.safetensors"):
            sa.ingest(tmp_path, tmp_path.parent / "r.zarr")
        return
    with pytest.raises(sa.StepError, match=f"{other}: its name has no step word, where step_0.safetensors says its "
                                           r"step \(step_0\)"):
        discover(tmp_path)


def test_a_bare_number_beside_checkpoint_folders_is_refused_not_dropped(tmp_path):
    for i, step in enumerate((0, 100)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        save_file(_state(i), str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    save_file(_state(9), str(tmp_path / "gpt2.safetensors"))
    with pytest.raises(sa.StepError, match="gpt2.safetensors: its name has no step word"):
        discover(tmp_path)
    for i, step in enumerate((0, 1000)):  # folders named by a bare number, and a file so named: one run
        (tmp_path / "bare" / str(step)).mkdir(parents=True)
        save_file(_state(i), str(tmp_path / "bare" / str(step) / "model.safetensors"))
    save_file(_state(2), str(tmp_path / "bare" / "model_2000.safetensors"))
    assert [c.step for c in discover(tmp_path / "bare")] == [0, 1000, 2000]


@pytest.mark.parametrize("name, step", [("seed=1-1000", 1000), ("wd=0.1_1000", 1000), ("last-v1", None),
                                        ("epoch=0-step=99-v1", 99), ("ckpt_fp16_1000", 1000)])
def test_numbers_beside_key_value_parts_and_versions(name, step):
    assert step_from_name(name) == step


def test_lightning_before_1_6_stores_the_step_plus_one(tmp_path):
    """Lightning < 1.6 named a file step=99 and stored global_step 100: the name's step is kept."""
    _lightning(tmp_path / "c", [("epoch=0-step=99.ckpt", 100), ("epoch=0-step=199.ckpt", 200)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(sa.ingest(tmp_path / "c", tmp_path / "r.zarr").checkpoint_steps) == [99, 199]


def test_a_bare_number_gives_way_to_the_stored_step(tmp_path):
    """model_epoch_0.pt holding global_step 500: the epoch was the step."""
    _lightning(tmp_path / "c", [("model_epoch_0.pt", 500), ("model_epoch_1.pt", 1000), ("model_epoch_2.pt", 1500)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert list(sa.ingest(tmp_path / "c", tmp_path / "r.zarr").checkpoint_steps) == [500, 1000, 1500]


def test_bare_numbers_alone_are_still_steps(tmp_path):
    for i, step in enumerate((0, 100, 200)):
        save_file(_state(i), str(tmp_path / f"run_{step}.safetensors"))
    assert [c.step for c in discover(tmp_path)] == [0, 100, 200]


def test_a_file_saved_over_during_the_ingest_is_refused(tmp_path, monkeypatch):
    """latest.pt (no step in its name) planned at the step it stored, 40, then saved over by a training still
    running before its row was written: the row was labelled 40 and held step 50's weights."""
    from spectral_analyzer.ingest import pipeline

    src = tmp_path / "c"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name, step in (("first", 5), ("second", 9), ("latest", 40)):
        torch.save({"model_state_dict": {"w": torch.randn(4, generator=gen)}, "global_step": step}, src / f"{name}.pt")
    real = pipeline.write_rows

    def saved_over(*args, **kwargs):
        torch.save({"model_state_dict": {"w": torch.randn(4, generator=gen)}, "global_step": 50}, src / "latest.pt")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_rows", saved_over)
    with pytest.raises(sa.StepError, match=r"latest\.pt: records step 50 as opened to be read, not the step 40 it "
                                           r"was planned at: it was written again during the ingest"):
        sa.ingest(src, tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists() or list(sa.open_run(tmp_path / "r.zarr").checkpoint_steps) == [5, 9]
