"""Every bad input: a one-line error naming the file, tensor or step, and the
store exactly as it was (or no store at all when there was none)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, snapshot
from safetensors.torch import load_file, save_file

import spectral_analyzer as sa


def _new_checkpoint(hf: Path, step: int, edit) -> Path:
    """Add checkpoint-<step> to an HF folder: the last state moved by a training-sized step, changed by *edit*."""
    d = hf / f"checkpoint-{step}"
    shutil.copytree(hf / "checkpoint-30", d)
    state = load_file(str(d / "model.safetensors"))
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    state = edit(state)
    if state is not None:
        save_file(state, str(d / "model.safetensors"))
    return d


@pytest.fixture
def store_and_snapshot(tmp_path, hf_copy):
    store = tmp_path / "run.zarr"
    sa.ingest(hf_copy, store)
    return hf_copy, store, snapshot(store)


def _assert_unchanged(store: Path, before: dict) -> None:
    assert snapshot(store) == before
    assert not list(store.parent.glob("*.overwrite-*"))


def _with(name, value):
    def edit(state):
        state[name] = value
        return state

    return edit


def _without(name):
    def edit(state):
        del state[name]
        return state

    return edit


@pytest.mark.parametrize(
    "edit, error, pattern",
    [
        (_without("head.bias"), sa.InconsistentCheckpointsError, r"'head.bias' is in .*checkpoint-0 but missing from .*checkpoint-40"),
        (_with("extra.weight", torch.ones(3)), sa.InconsistentCheckpointsError, r"'extra.weight' appears in .*checkpoint-40"),
        (_with("head.bias", torch.ones(12)), sa.InconsistentCheckpointsError, r"'head.bias' has shape \(11,\) in .*checkpoint-0 but \(12,\) in .*checkpoint-40"),
        (_with("norm.weight", torch.tensor([float("nan")] * 8)), sa.NonFiniteError, r"'norm.weight' at step 40 .*checkpoint-40.* 8 NaN/Inf"),
        (_with("embed.weight", torch.full((11, 8), float("inf"))), sa.NonFiniteError, r"'embed.weight' at step 40"),
    ],
)
def test_bad_new_checkpoint_leaves_store_as_it_was(store_and_snapshot, edit, error, pattern):
    hf, store, before = store_and_snapshot
    _new_checkpoint(hf, 35, lambda s: s)  # a good one first: its row gets written, then rolled back
    _new_checkpoint(hf, 40, edit)
    with pytest.raises(error, match=pattern):
        sa.ingest(hf, store)
    _assert_unchanged(store, before)
    assert sa.open_run(store).n_deltas == 3


def test_bad_input_leaves_no_new_store(tmp_path, hf_copy):
    _new_checkpoint(hf_copy, 40, _with("norm.weight", torch.tensor([float("nan")] * 8)))
    with pytest.raises(sa.NonFiniteError):
        sa.ingest(hf_copy, tmp_path / "new.zarr")
    assert not (tmp_path / "new.zarr").exists()


def test_nan_in_first_checkpoint_names_step(tmp_path, hf_copy):
    path = hf_copy / "checkpoint-0" / "model.safetensors"
    state = load_file(str(path))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(sa.NonFiniteError, match=r"'head.weight' at step 0 .* 1 NaN/Inf"):
        sa.ingest(hf_copy, tmp_path / "new.zarr")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(sa.NoCheckpointsError, match="empty: no checkpoints found"):
        sa.ingest(tmp_path / "empty", tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "pickle-opcode"])
def test_truncated_or_corrupt_file(store_and_snapshot, fmt, damage):
    hf, store, before = store_and_snapshot
    d = _new_checkpoint(hf, 40, lambda s: s)
    if fmt == "pt":
        state = load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").unlink()
        torch.save(state, d / "pytorch_model.bin")
        path = d / "pytorch_model.bin"
    else:
        path = d / "model.safetensors"
    data = path.read_bytes()
    # b"b" is a lone pickle BUILD opcode: the unpickler fails on its empty stack (IndexError)
    damaged = {"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "pickle-opcode": b"b"}
    path.write_bytes(damaged[damage])
    with pytest.raises(sa.CheckpointError, match=str(path)):
        sa.ingest(hf, store)
    _assert_unchanged(store, before)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs(tmp_path, store_and_snapshot):
    hf, store, before = store_and_snapshot
    d = _new_checkpoint(hf, 40, lambda s: s)
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**state, "payload": _RunsCode(str(marker))}, d / "pytorch_model.bin")
    with pytest.raises(sa.UnsafeCheckpointError, match=r"pytorch_model.bin: refused to unpickle"):
        sa.ingest(hf, store)
    assert not marker.exists()
    _assert_unchanged(store, before)
    # The control: unrestricted unpickling of the same file does run the code.
    code = f"import torch; torch.load({str(d / 'pytorch_model.bin')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path)
    assert marker.exists()


def test_duplicate_steps(tmp_path, hf_copy):
    shutil.copytree(hf_copy / "checkpoint-20", hf_copy / "checkpoint-020")
    with pytest.raises(sa.StepError, match=r"duplicate step 20: .*checkpoint-20.* and .*checkpoint-020"):
        sa.ingest(hf_copy, tmp_path / "r.zarr")


def test_steps_given_out_of_order(tmp_path, hf_copy):
    with pytest.raises(sa.StepError, match="not increasing: 20 .*checkpoint-10.* then 15"):
        sa.ingest(hf_copy, tmp_path / "r.zarr", steps=[0, 20, 15, 30])


def test_new_checkpoint_older_than_store(store_and_snapshot):
    hf, store, before = store_and_snapshot
    _new_checkpoint(hf, 25, lambda s: s)
    with pytest.raises(sa.StepError, match=r"checkpoint-25: step 25 is before the store's last step 30"):
        sa.ingest(hf, store)
    _assert_unchanged(store, before)


def test_identical_checkpoints_warn_and_info_reports(tmp_path, hf_copy):
    from click.testing import CliRunner

    from spectral_analyzer.cli import main

    shutil.copytree(hf_copy / "checkpoint-30", hf_copy / "checkpoint-40")
    with pytest.warns(sa.DuplicateCheckpointWarning, match="steps 30 .* and 40 .* identical"):
        run = sa.ingest(hf_copy, tmp_path / "r.zarr")
    assert not run.deltas.values[-1].any()
    result = CliRunner().invoke(main, ["info", str(tmp_path / "r.zarr")])
    assert result.exit_code == 0
    assert "warning: checkpoints at steps 30" in result.output


def test_unknown_format_version(store_and_snapshot):
    hf, store, _ = store_and_snapshot
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 99
    (store / "zarr.json").write_text(json.dumps(meta))
    before = snapshot(store)
    with pytest.raises(sa.StoreVersionError, match=r"run.zarr: store format version 99"):
        sa.open_run(store)
    with pytest.raises(sa.StoreVersionError):
        sa.ingest(hf, store)
    _assert_unchanged(store, before)


def test_output_holds_a_different_run(tmp_path, store_and_snapshot):
    _, store, before = store_and_snapshot
    with pytest.raises(sa.StoreExistsError, match=r"run.zarr: holds a different run .*pass overwrite"):
        sa.ingest(FIXTURES / "planted", store)
    _assert_unchanged(store, before)
    run = sa.ingest(FIXTURES / "planted", store, overwrite=True)
    assert run.n_deltas == 24
    assert not list(tmp_path.glob("*.overwrite-*"))


def test_same_tensors_different_run(store_and_snapshot, tmp_path):
    hf, store, before = store_and_snapshot
    other = tmp_path / "other"
    shutil.copytree(hf, other)
    path = other / "checkpoint-10" / "model.safetensors"
    state = load_file(str(path))
    state["head.bias"] = state["head.bias"] + 1
    save_file(state, str(path))
    with pytest.raises(sa.StoreExistsError, match=r"checkpoint at step 10.*differs"):
        sa.ingest(other, store)
    _assert_unchanged(store, before)


def test_output_path_is_something_else(tmp_path, hf_copy):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(sa.StoreExistsError, match="notes: exists and is not a spectral-analyzer store"):
        sa.ingest(hf_copy, target)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(sa.StoreExistsError, match="overwrite replaces stores only"):  # never deleted for the user
        sa.ingest(hf_copy, target, overwrite=True)
    assert (target / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("mine")
    with pytest.raises(sa.StoreError, match="file: "):
        sa.ingest(hf_copy, tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "mine"
    damaged = tmp_path / "damaged.zarr"  # a store whose root metadata is damaged: replaced on request
    sa.ingest(hf_copy, damaged)
    (damaged / "zarr.json").write_text("{not json")
    with pytest.raises(sa.StoreExistsError, match="pass overwrite"):
        sa.ingest(hf_copy, damaged)
    assert sa.ingest(hf_copy, damaged, overwrite=True).n_deltas > 0


def test_failed_overwrite_keeps_old_store(store_and_snapshot, tmp_path):
    _, store, before = store_and_snapshot
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "layouts" / "plain_pt", bad)
    state = torch.load(bad / "ckpt_20.pt", weights_only=True)
    state["module.head.bias"][0] = float("nan")
    torch.save(state, bad / "ckpt_20.pt")
    with pytest.raises(sa.NonFiniteError, match="step 20"):
        sa.ingest(bad, store, overwrite=True)
    _assert_unchanged(store, before)


def test_a_checkpoint_deleted_mid_ingest_is_named(tmp_path, hf_copy, monkeypatch):
    """A trainer's checkpoint rotation can delete a folder while it is being ingested."""
    from spectral_analyzer.ingest import pipeline

    real = pipeline._sha256
    gone = hf_copy / "checkpoint-20" / "model.safetensors"

    def rotated(path):
        if path == gone:
            path.unlink()
        return real(path)

    monkeypatch.setattr(pipeline, "_sha256", rotated)
    # the hash or the reader meets it first: either way one line naming the file
    with pytest.raises(sa.CheckpointError, match=rf"^{gone}: (cannot read|unreadable safetensors file) \(No such file"):
        sa.ingest(hf_copy, tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
