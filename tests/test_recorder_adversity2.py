"""Live recording under adversity: other writers, kills at every write, resumption.

A recorder's rows are the deltas of one training: another writer's rows
between two of its records are refused in one line, never differenced
across; a training killed at any of the store's writes and resumed from its
last checkpoint ends with the store an uninterrupted one would have, bit for
bit. Kills are real (adversary_procs.broken_writes, in a child process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from adversary_procs import (
    assert_same_contents,
    broken_writes,
    cli_child,
    context,
    contents,
    count_writes,
    run_child,
    start_fork_server,
    toy_model,
)
from safetensors.torch import load_file, save_file

import spectral_analyzer as sa
from spectral_analyzer.store import Store

CHUNK = 64  # rows of toy_model (83 parameters) in two chunks
KILLED = -signal.SIGKILL
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    start_fork_server()  # it imports the package while the first test prepares


def _moved(model: torch.nn.Module, step: int) -> None:
    """The update of *step*: a function of the step alone, so a training resumed from a checkpoint redoes it."""
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01 * (1 + step % 3))


def training(path: str, ckpts: str, order: str, steps: int = STEPS, every: int = 2, save: int = 5) -> None:
    """A training loop recording every *every* steps and saving a checkpoint every *save* steps, in *order*
    (``record first``, as the HF Trainer calls its callbacks before it saves; or ``save first``), as the
    HF callback drives a Recorder: resumed from the last checkpoint in *ckpts* when there is one, with
    the losses logged up to it (a Trainer's checkpoint holds its log history), flushed at the end."""
    model = toy_model(0)
    rec = sa.Recorder(path, model, every=every, chunk_size=CHUNK)
    saved = sorted(int(f.stem.split("_")[1]) for f in Path(ckpts).glob("step_*.safetensors"))
    start = 0
    if saved:
        model.load_state_dict(load_file(str(Path(ckpts, f"step_{saved[-1]}.safetensors"))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.RecordingWarning)
            rec.resume(saved[-1])
        for s in range(saved[-1] + 1):
            rec.log(s, loss=_loss(s))
        start = saved[-1] + 1
    for s in range(start, steps):
        if s:
            _moved(model, s)
        if order == "save first" and s % save == 0:
            _save(model, ckpts, s)
        rec.step(s, loss=_loss(s))
        if order == "record first" and s % save == 0:
            _save(model, ckpts, s)
    rec.flush()


def _loss(step: int) -> float:
    return 1.0 / (1 + step)


def _save(model: torch.nn.Module, ckpts: str, step: int) -> None:
    os.makedirs(ckpts, exist_ok=True)
    tmp = Path(ckpts, f"partial_{step}")
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, Path(ckpts, f"step_{step}.safetensors"))


def killed_training(path: str, ckpts: str, order: str, kill_at: int, torn: bool, steps: int = STEPS,
                    every: int = 2) -> None:
    with broken_writes(kill_at, torn):
        training(path, ckpts, order, steps, every)


def _rows(path: Path) -> dict:
    """What the numbers depend on: the committed rows, base, last theta, metrics and the commit record
    (less its slot of last_theta and the metrics' token, which tell the history of the writes)."""
    got = contents(path)
    attrs = json.loads(got.pop("attrs"))
    record = dict(attrs["commit"])
    record.pop("last_slot")
    got["commit"] = json.dumps(record, sort_keys=True)
    got["warnings"] = json.dumps(attrs["warnings"])
    return got


# -- other writers ------------------------------------------------------------------


def test_two_recorders_in_one_process_do_not_interleave_rows(tmp_path):
    """Recorder A, then B (another training) appends, then A records again: A's next delta would be its
    weights minus B's. Refused in one line naming the store and steps; the store stays as it was."""
    path = tmp_path / "r.zarr"
    a, b = toy_model(0), toy_model(1)
    rec_a, rec_b = sa.Recorder(path, a, chunk_size=CHUNK), sa.Recorder(path, b, chunk_size=CHUNK)
    rec_a.record(0)
    _moved(a, 1)
    rec_b.record(5)
    before = _rows(path)
    _moved(a, 2)
    with pytest.raises(sa.StoreError) as caught:
        rec_a.record(10)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: another writer changed the rows since this "
                                                       "recorder's row at step 0 (the store now ends at step 5)")
    assert_same_contents(_rows(path), before)


def test_a_recorder_after_the_command_line_appended_to_its_store(tmp_path):
    """`spectral-analyze ingest` (another process) appends a checkpoint to a store a Recorder is writing:
    the recorder's next record is refused, not differenced from that file's weights."""
    path = tmp_path / "r.zarr"
    model = toy_model(0)
    rec = sa.Recorder(path, model, chunk_size=CHUNK)
    rec.record(0)
    _moved(model, 1)
    rec.record(10)
    (tmp_path / "other").mkdir()
    other = {k: v + 1.0 for k, v in toy_model(2).state_dict().items()}  # another training's weights
    save_file(other, str(tmp_path / "other" / "step_15.safetensors"))
    child = context().Process(target=cli_child, args=(["ingest", str(tmp_path / "other"), "-o", str(path),
                                                       "--no-progress"], str(tmp_path / "cli")))
    child.start()
    child.join(60)
    assert child.exitcode == 0, (tmp_path / "cli.stderr").read_text()
    assert list(sa.open_run(path).checkpoint_steps) == [0, 10, 15]
    _moved(model, 2)
    with pytest.raises(sa.StoreError, match=r"another writer changed the rows since this recorder's row at step 10 "
                                            r"\(the store now ends at step 15\)"):
        rec.record(20)
    assert list(sa.open_run(path).checkpoint_steps) == [0, 10, 15]


def test_an_interrupted_record_that_committed_is_not_taken_for_another_writer(tmp_path, monkeypatch):
    """Interrupted after its row was committed and before the recorder kept its snapshot: the next record
    goes on from the store's copy of that row, which is this recorder's own."""
    path = tmp_path / "r.zarr"
    model = toy_model(0)
    rec = sa.Recorder(path, model, chunk_size=CHUNK)
    rec.record(0)
    _moved(model, 1)
    monkeypatch.setattr(sa.Recorder, "_keep", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        rec.record(1)
    monkeypatch.undo()
    at1 = _flat(model)
    _moved(model, 2)
    rec.record(2)
    run = sa.open_run(path)
    assert list(run.checkpoint_steps) == [0, 1, 2]
    np.testing.assert_array_equal(run.deltas.values[-1], _flat(model) - at1)


def _flat(model: torch.nn.Module) -> np.ndarray:
    """The model's tensors in the store's order (natural order of the names: sorted, for toy_model)."""
    return torch.cat([v.reshape(-1) for _, v in sorted(model.state_dict().items())]).numpy()


# -- resumption -----------------------------------------------------------------------


def test_a_resumed_recorder_continues_the_store_whatever_overwrite_says(tmp_path):
    """overwrite=True replaces whatever is at the store at a new training's first record; a recorder
    resumed from a checkpoint continues the store instead (it used to replace the store's 5 rows with one)."""
    path = tmp_path / "r.zarr"
    model = toy_model(0)
    rec = sa.Recorder(path, model, every=5, chunk_size=CHUNK, overwrite=True)
    for s in range(0, 25, 5):
        _moved(model, s)
        rec.record(s)
    again = sa.Recorder(path, model, every=5, chunk_size=CHUNK, overwrite=True)
    again.resume(22)  # after the store's last row, not a step it records
    _moved(model, 30)
    again.record(30)
    assert list(sa.open_run(path).checkpoint_steps) == [0, 5, 10, 15, 20, 30]


def test_a_step_killed_while_recorded_is_recorded_when_training_resumes_there(tmp_path):
    """The checkpoint of step 10 saved, then the process killed while recording step 10: the training
    resumed from it records step 10 at once (the model holds its weights), not a delta over 5..15."""
    ckpts = tmp_path / "ckpts"
    training(str(tmp_path / "ref.zarr"), str(tmp_path / "ref-ckpts"), "save first", steps=16, every=5)
    keys = count_writes(lambda: training(str(tmp_path / "count.zarr"), str(tmp_path / "count-ckpts"),
                                         "save first", steps=11, every=5))
    last_row = max(i for i, k in enumerate(keys) if "deltas/c/1/" in k) + 1  # the row of step 10
    path = tmp_path / "r.zarr"
    assert run_child(killed_training, str(path), str(ckpts), "save first", last_row, False, 11, 5) == KILLED
    assert list(sa.open_run(path).checkpoint_steps) == [0, 5]
    training(str(path), str(ckpts), "save first", steps=16, every=5)
    assert list(sa.open_run(path).checkpoint_steps) == [0, 5, 10, 15]
    assert_same_contents(_rows(path), _rows(tmp_path / "ref.zarr"))


@pytest.mark.parametrize("order", ["record first", "save first"])
def test_killed_at_any_write_while_recording_then_resumed_is_bit_identical(tmp_path, order):
    """SIGKILL at writes of a recording training (before or half-way through them), then the training
    resumed from its last checkpoint: the rows, base, last theta, commit and metrics equal an
    uninterrupted recording's."""
    reference = tmp_path / "reference.zarr"
    training(str(reference), str(tmp_path / "reference-ckpts"), order)
    want = _rows(reference)
    keys = count_writes(lambda: training(str(tmp_path / "count.zarr"), str(tmp_path / "count-ckpts"), order))
    rng = np.random.default_rng(len(keys))
    points = sorted(set(rng.choice(np.arange(1, len(keys) + 1), size=5, replace=False).tolist()))
    for n, torn in [(n, False) for n in points] + [(int(points[len(points) // 2]), True)]:
        what = f"{order}: killed at write {n} of {len(keys)} ({keys[n - 1]}){' half-way' if torn else ''}"
        path, ckpts = tmp_path / f"{n}-{torn}.zarr", tmp_path / f"{n}-{torn}-ckpts"
        assert run_child(killed_training, str(path), str(ckpts), order, n, torn) == KILLED, what
        training(str(path), str(ckpts), order)
        assert_same_contents(_rows(path), want, what)


def test_killed_at_any_write_of_a_resumption_that_drops_rows(tmp_path):
    """Training killed after recording step 14 (rows to 14, its last checkpoint 10), resumed: the rows 12 and
    14 are dropped, and 12 recorded again. Killed again at each write of that resumption, and resumed once
    more: the store equals an uninterrupted recording's (it was left damaged when the kill fell between
    the cleared rows and the commit that dropped them)."""
    reference = tmp_path / "reference.zarr"
    training(str(reference), str(tmp_path / "reference-ckpts"), "record first", steps=14)
    want = _rows(reference)
    stopped, stopped_ckpts = tmp_path / "stopped.zarr", tmp_path / "stopped-ckpts"
    training(str(stopped), str(stopped_ckpts), "record first", steps=15)
    assert list(sa.open_run(stopped).checkpoint_steps)[-1] == 14

    def resumption(path: Path) -> None:
        model = toy_model(0)
        model.load_state_dict(load_file(str(stopped_ckpts / "step_10.safetensors")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.RecordingWarning)
            sa.Recorder(path, model, every=2, chunk_size=CHUNK).resume(10)

    scratch = shutil.copytree(stopped, tmp_path / "count.zarr")
    keys = count_writes(lambda: resumption(scratch))
    assert list(sa.open_run(scratch).checkpoint_steps)[-1] == 10
    for n in range(1, len(keys) + 1):
        what = f"killed at write {n} of {len(keys)} of the resumption ({keys[n - 1]})"
        path, ckpts = tmp_path / f"{n}.zarr", tmp_path / f"{n}-ckpts"
        shutil.copytree(stopped, path)
        shutil.copytree(stopped_ckpts, ckpts)
        assert run_child(killed_training, str(path), str(ckpts), "record first", n, False, 14) == KILLED, what
        Store.open(path)  # not damaged
        training(str(path), str(ckpts), "record first", steps=14)
        assert_same_contents(_rows(path), want, what)



def test_a_tensor_without_values_is_refused_in_one_line(tmp_path):
    """A model whose weights are on the meta device (offloaded): refused as ingest refuses it in a file."""
    model = torch.nn.Linear(3, 2, device="meta")
    with pytest.raises(sa.CheckpointError) as caught:
        sa.Recorder(tmp_path / "r.zarr", model).record(0)
    assert str(caught.value) == (f"{tmp_path / 'r.zarr'} (recorded step 0): tensor 'weight' is on the meta device "
                                 "(it holds no values); record a model whose weights are whole in memory, or leave it out "
                                 "with exclude='weight'")
    assert not Store.exists(tmp_path / "r.zarr")


class _Shard(torch.Tensor):
    """A tensor subclass standing for a DTensor: the values it holds are one rank's shard."""


class _Sharded(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.whole = torch.nn.Parameter(torch.ones(4, 3))
        if kind == "subclass":
            self.part = torch.nn.Parameter(torch.ones(2, 3).as_subclass(_Shard))
        else:  # DeepSpeed ZeRO-3: an empty placeholder, the real shape kept aside
            self.part = torch.nn.Parameter(torch.empty(0))
            self.part.ds_shape, self.part.ds_id = torch.Size([4, 3]), 7


@pytest.mark.parametrize("kind, what", [("subclass", "a _Shard, which may hold one shard of the weight"),
                                        ("zero3", "a DeepSpeed ZeRO-3 partition")])
def test_a_sharded_weight_is_refused_in_one_line(tmp_path, kind, what):
    """A raw Recorder on a sharded model (FSDP2's DTensors, ZeRO-3's placeholders) would record a shard, or
    nothing, as the weight: refused, naming the tensor; no store is made."""
    model = _Sharded(kind)  # (state_dict() gives detached copies: without DeepSpeed's ds_shape)
    with pytest.raises(sa.CheckpointError) as caught:
        sa.Recorder(tmp_path / "r.zarr", model).record(0)
    assert str(caught.value).startswith(f"{tmp_path / 'r.zarr'} (recorded step 0): tensor 'part' is {what}")
    assert "\n" not in str(caught.value)
    assert not Store.exists(tmp_path / "r.zarr")


def test_killed_half_way_through_the_first_write_of_a_new_store(tmp_path):
    """Killed while writing the new store's root metadata: the folder holds its temporary file and the lock,
    and the training run again records the store anew (it was refused as a folder that is not a store)."""
    reference = tmp_path / "reference.zarr"
    training(str(reference), str(tmp_path / "reference-ckpts"), "record first")
    path, ckpts = tmp_path / "r.zarr", tmp_path / "ckpts"
    assert run_child(killed_training, str(path), str(ckpts), "record first", 1, True) == KILLED
    assert [f.name.startswith("zarr.") and f.name.endswith(".partial") for f in path.iterdir()
            if f.name != ".lock"] == [True]
    training(str(path), str(ckpts), "record first")
    assert_same_contents(_rows(path), _rows(reference))
