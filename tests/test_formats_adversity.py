"""How real runs save their parameters, after a review of them: a tied weight saved under two names ingested
one checkpoint at a time, ``.pth.tar`` files, a tensor added mid-run left out, zero-size tensors, and names
that torch.compile changes inside a model."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import spectral_analyzer as sa
from spectral_analyzer.errors import TiedWeightsWarning


def _tied_run(folder: Path, n: int) -> list[Path]:
    """Checkpoints whose embedding and head are one tied weight, cloned to save as safetensors (both kept)."""
    gen = torch.Generator().manual_seed(3)
    emb, other = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    folder.mkdir(parents=True)
    paths = []
    for k in range(n):
        if k:
            emb = emb + 1e-2 * torch.randn(6, 4, generator=gen)
            other = other + 1e-2 * torch.randn(6, 4, generator=gen)
        state = {"emb.weight": emb.clone(), "head.weight": emb.clone(), "other.weight": other.clone()}
        paths.append(folder / f"step_{10 * k}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def _ingest(src: Path, store: Path) -> list[type]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sa.ingest(src, store, progress=False)
    return [w.category for w in caught]


def test_a_tied_weight_is_told_when_the_run_is_ingested_one_checkpoint_at_a_time(tmp_path):
    """Ingested at once, the tie was told and kept in the store; ingested after each save (one new checkpoint
    an append), never: each call compared only its own rows, and a tie needs two."""
    paths = _tied_run(tmp_path / "all", 5)
    assert TiedWeightsWarning in _ingest(tmp_path / "all", tmp_path / "all.zarr")
    whole = sa.open_run(tmp_path / "all.zarr")
    told = [w for w in whole.warnings if "same update at every step" in w]
    assert len(told) == 1 and "'emb.weight'" in told[0] and "'head.weight'" in told[0]

    (tmp_path / "inc").mkdir()
    seen = []
    for k, path in enumerate(paths):
        shutil.copy(path, tmp_path / "inc")
        if k:
            seen.append(TiedWeightsWarning in _ingest(tmp_path / "inc", tmp_path / "inc.zarr"))
    assert seen == [False, True, False, False]  # from the second delta, once a store
    inc = sa.open_run(tmp_path / "inc.zarr")
    assert inc.warnings == told
    np.testing.assert_array_equal(inc.deltas.values, whole.deltas.values)


def test_tensors_whose_updates_differ_once_are_no_tie_whatever_comes_after(tmp_path):
    """Equal updates after an unequal one are no tied weight: the comparison goes on across appends."""
    folder = tmp_path / "ck"
    folder.mkdir()
    a = torch.ones(5)
    for k in range(5):
        b = a.clone() if k != 1 else a + 1  # head differs at step 10's update only (and back at step 20)
        save_file({"emb.weight": a.clone(), "head.weight": b}, str(folder / f"step_{10 * k}.safetensors"))
        a = a + 0.5
    (tmp_path / "inc").mkdir()
    for k in range(5):
        shutil.copy(folder / f"step_{10 * k}.safetensors", tmp_path / "inc")
        if k:
            assert TiedWeightsWarning not in _ingest(tmp_path / "inc", tmp_path / "s.zarr")
    assert not sa.open_run(tmp_path / "s.zarr").warnings


def test_pth_tar_files_are_torch_checkpoints_and_real_archives_are_still_told(tmp_path):
    """timm and the PyTorch ImageNet example save checkpoint-N.pth.tar with torch.save (a torch zip, no tar):
    they were called compressed or archived, told to be unpacked, and left out of the run."""
    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, 3, generator=gen)} for _ in range(3)]
    folder = tmp_path / "ck"
    folder.mkdir()
    for k, state in enumerate(states):
        torch.save({"state_dict": state, "epoch": k}, folder / f"checkpoint-{k}.pth.tar")
    run = sa.ingest(folder, tmp_path / "s.zarr", progress=False)
    assert run.checkpoint_steps.tolist() == [0, 1, 2]
    want = np.stack([(b["w"] - a["w"]).reshape(-1).numpy() for a, b in zip(states, states[1:])])
    np.testing.assert_array_equal(run.deltas.values, want)

    (folder / "checkpoint-3.tar").write_bytes(b"x" * 512)  # an archive is still told, not read
    with pytest.warns(sa.UnreadWeightsWarning, match=r"checkpoint-3\.tar: compressed or archived"):
        sa.ingest(folder, tmp_path / "s2.zarr", progress=False)
    (folder / "checkpoint-3.tar").unlink()
    (folder / "checkpoint-3.PTH.TAR").write_bytes(b"x")
    with pytest.raises(sa.CheckpointError, match=r"suffix in capitals; rename it checkpoint-3\.pth\.tar"):
        sa.ingest(folder, tmp_path / "s3.zarr", progress=False)


def test_a_parameter_added_during_the_run_can_be_left_out(tmp_path):
    """A head added at step 20 was refused without a way out: exclude='head.*' was refused too, as matching
    no tensor of the first checkpoint."""
    folder = tmp_path / "ck"
    folder.mkdir()
    gen = torch.Generator().manual_seed(1)
    body = torch.arange(12.0).reshape(4, 3)
    for k in range(4):
        state = {"body.weight": body + k}
        if k >= 2:
            state.update({"head.weight": torch.randn(2, 4, generator=gen), "head.bias": torch.zeros(2)})
        torch.save(state, folder / f"step_{10 * k}.pt")
    with pytest.raises(sa.InconsistentCheckpointsError, match=r"appears in .*exclude='head\.(bias|weight)'"):
        sa.ingest(folder, tmp_path / "s.zarr", progress=False)
    run = sa.ingest(folder, tmp_path / "s.zarr", progress=False, exclude=["head.*"])
    assert [t.name for t in run._store.manifest] == ["body.weight"]
    np.testing.assert_array_equal(run.deltas.values, np.ones((3, 12), dtype=np.float32))
    with pytest.raises(sa.SelectionError, match=r"pattern 'haed\.\*' matches no tensor of 4 checkpoints"):
        sa.ingest(folder, tmp_path / "t.zarr", progress=False, exclude=["haed.*"])


def test_a_weight_kept_under_another_name_is_named_in_the_refusal(tmp_path):
    """torch.save keeps a tied weight under its first name, safetensors' save_model under another: the refusal
    named the missing name only; and torch.compile of a submodule puts '_orig_mod.' inside the names."""
    folder = tmp_path / "ck"
    folder.mkdir()
    w, v = torch.ones(6, 4), torch.ones(2, 4)
    torch.save({"wte.weight": w, "net.fc.weight": v}, folder / "step_0.pt")
    torch.save({"lm_head.weight": w + 1, "net._orig_mod.fc.weight": v + 1}, folder / "step_1.pt")
    with pytest.raises(sa.InconsistentCheckpointsError,
                       match=r"'net\.fc\.weight' is in .* it has 'net\._orig_mod\.fc\.weight' of that shape instead"):
        sa.ingest(folder, tmp_path / "s.zarr", progress=False)
    torch.save({"lm_head.weight": w + 1, "net.fc.weight": v + 1}, folder / "step_1.pt")
    with pytest.raises(sa.InconsistentCheckpointsError,
                       match=r"'wte\.weight' is in .* it has 'lm_head\.weight' of that shape instead"):
        sa.ingest(folder, tmp_path / "t.zarr", progress=False)


def test_the_deltas_of_a_zero_size_tensor_are_an_empty_array(tmp_path):
    """run.delta() of a (0, 4) tensor, which the store keeps in its manifest, failed inside dask's reshape."""
    folder = tmp_path / "ck"
    folder.mkdir()
    for k in range(3):
        save_file({"w": torch.full((3,), float(k)), "prefix.bias": torch.zeros(0, 4)},
                  str(folder / f"step_{k}.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.UnreadWeightsWarning)
        run = sa.ingest(folder, tmp_path / "s.zarr", progress=False)
    empty = run.delta("prefix.bias")
    assert empty.shape == (2, 0, 4) and empty.values.size == 0
    np.testing.assert_array_equal(run.delta("w").values, np.ones((2, 3), dtype=np.float32))


def _lightning_run(folder: Path, steps=(3, 6, 9)) -> None:
    """Lightning checkpoints epoch=0-step=S.ckpt, as ModelCheckpoint names them."""
    folder.mkdir(parents=True)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(5))
    for step in steps:
        w = w + 0.01 * torch.randn(4, 4, generator=torch.Generator().manual_seed(step))
        torch.save({"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.6.0",
                    "state_dict": {"model.w": w.clone()}}, folder / f"epoch=0-step={step}.ckpt")


@pytest.mark.parametrize("how", ["copy", "link", "saved again"])
def test_lightning_s_last_checkpoint_beside_the_one_it_copies_is_read_once_and_told(tmp_path, how):
    """ModelCheckpoint(save_last=True) saves last.ckpt again at the newest checkpoint's step (its callbacks'
    state differs, so do the bytes; save_last="link" links it): every such run was refused as 'duplicate
    step 9', with no way forward (--steps cannot part two files of one step)."""
    src = tmp_path / "run"
    _lightning_run(src)
    last = src / "last.ckpt"
    if how == "copy":
        shutil.copy(src / "epoch=0-step=9.ckpt", last)
    elif how == "link":
        last.symlink_to("epoch=0-step=9.ckpt")
    else:
        saved = torch.load(src / "epoch=0-step=9.ckpt", weights_only=True)
        torch.save({**saved, "callbacks": {"ModelCheckpoint": {"last_model_path": str(last)}}}, last)
        assert last.read_bytes() != (src / "epoch=0-step=9.ckpt").read_bytes()
    with pytest.warns(sa.UnreadWeightsWarning, match=r"last\.ckpt: the same weights as .*epoch=0-step=9\.ckpt"):
        run = sa.ingest(src, tmp_path / "s.zarr")
    assert list(run.checkpoint_steps) == [3, 6, 9]
    assert [Path(s["label"]).name for s in run.sources] == [f"epoch=0-step={s}.ckpt" for s in (3, 6, 9)]
    assert run.sources[-1]["copies"] == [str(last)]


def test_two_checkpoints_of_one_step_that_differ_are_refused_with_the_way_forward(tmp_path):
    """A last.ckpt of other weights at the newest checkpoint's step is no copy: which one is the run's is not
    for the tool to guess."""
    src = tmp_path / "run"
    _lightning_run(src)
    torch.save({"epoch": 0, "global_step": 9, "state_dict": {"model.w": torch.zeros(4, 4)}}, src / "last.ckpt")
    with pytest.raises(sa.StepError, match=r"duplicate step 9: .*; move the one that is not this run's "
                                           r"checkpoint of that step out of the folder$"):
        sa.ingest(src, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_the_trainer_s_final_save_beside_its_checkpoint_folders_is_told(tmp_path):
    """trainer.save_model() at the end (step 130, past the last checkpoint-100/) or the best checkpoint reloaded
    by load_best_model_at_end leaves model.safetensors at the top of the output folder; it, and a
    final_model/ folder, were left out of the run without a word. A final save that is the last checkpoint's
    bytes (the usual end of a run) loses nothing and is not told."""
    src = tmp_path / "out"
    gen = torch.Generator().manual_seed(2)
    for where in ("checkpoint-50", "checkpoint-100", ".", "final_model", "best"):
        (src / where).mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.randn(4, 4, generator=gen)}, str(src / where / "model.safetensors"))
    shutil.copy(src / "checkpoint-50" / "model.safetensors", src / "best")  # a copy of a checkpoint: not told
    (src / "runs").mkdir()  # TensorBoard's logs: no weights, not told
    with pytest.warns(sa.UnreadWeightsWarning) as caught:
        run = sa.ingest(src, tmp_path / "s.zarr")
    assert list(run.checkpoint_steps) == [50, 100]
    (told,) = [str(w.message) for w in caught if "beside the checkpoint folders" in str(w.message)]
    assert told.startswith(f"{src}/model.safetensors and 1 more: ") and "not read" in told
    shutil.rmtree(src / "final_model")  # and the final save is the last checkpoint's tensors, other metadata
    save_file(load_file(src / "checkpoint-100" / "model.safetensors"), str(src / "model.safetensors"),
              metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sa.ingest(src, tmp_path / "t.zarr")


def test_a_folder_that_cannot_be_listed_beside_the_checkpoint_folders_is_no_obstacle(tmp_path, monkeypatch):
    """lost+found (mode 700) at a volume's root beside checkpoint-<step>/: the look for a final save listed it,
    and the ingest failed with PermissionError where it had read both checkpoints."""
    src = tmp_path / "out"
    for step in (10, 20):
        (src / f"checkpoint-{step}").mkdir(parents=True)
        save_file({"w": torch.full((3,), float(step))}, str(src / f"checkpoint-{step}" / "model.safetensors"))
    hidden = src / "lost+found"
    hidden.mkdir()
    real = Path.iterdir

    def iterdir(self):
        if self == hidden:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert list(sa.ingest(src, tmp_path / "s.zarr").checkpoint_steps) == [10, 20]
