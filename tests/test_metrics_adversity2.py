"""Training logs of resumed trainings, and files that are no training log.

A training resumed from a checkpoint logs the steps since that checkpoint
again. TensorBoard's rule is followed for every log: in the order written,
a value at step s of a series replaces the values that series holds at
steps >= s (the abandoned training's), so no value of the abandoned training
after the restart point survives beside the resumed one's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import spectral_analyzer as sa

from spectral_analyzer.errors import MetricsError
from spectral_analyzer.ingest.metrics import read_metrics
from spectral_analyzer.tensorboard import read_scalars


def _event_file(folder: Path, name: str, points) -> None:
    """An event file *name* in *folder* of ``(tag, step, value, wall_time)`` points, written in order."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    writer = SummaryWriter(str(folder))
    for tag, step, value, wall_time in points:
        writer.add_scalar(tag, value, global_step=step, walltime=wall_time)
    writer.close()
    [written] = set(folder.iterdir()) - before
    written.rename(folder / name)


def _by_step(steps, values) -> dict[int, float]:
    return {int(s): float(v) for s, v in zip(steps, values) if not np.isnan(v)}


def test_a_resumed_tensorboard_run_drops_the_abandoned_steps_after_the_restart(tmp_path):
    # logged steps 0..200, killed; resumed from the checkpoint at 100 and stopped at 150
    _event_file(tmp_path, "events.out.tfevents.1000.h.1.0", [("loss", s, 1.0, 1e9 + s) for s in range(0, 201, 10)])
    _event_file(tmp_path, "events.out.tfevents.2000.h.2.0", [("loss", s, 2.0, 2e9 + s) for s in range(100, 151, 10)])
    steps, series = read_scalars(tmp_path)
    expected = {**{s: 1.0 for s in range(0, 100, 10)}, **{s: 2.0 for s in range(100, 151, 10)}}
    assert _by_step(steps, series["loss"]) == expected
    assert steps.tolist() == sorted(expected)


def test_tensorboard_values_are_taken_in_the_order_written_not_by_wall_time(tmp_path):
    # a clock set back between two writes: the value written last still wins, and nothing is purged
    _event_file(tmp_path, "events.out.tfevents.1.h", [("acc", 10, 0.1, 500.0), ("acc", 20, 0.2, 100.0),
                                                      ("acc", 20, 0.3, 50.0), ("acc", 30, 0.4, 60.0)])
    steps, series = read_scalars(tmp_path)
    assert _by_step(steps, series["acc"]) == {10: np.float32(0.1), 20: np.float32(0.3), 30: np.float32(0.4)}


def test_the_restart_of_one_tag_leaves_other_tags_alone(tmp_path):
    # a tag logged per epoch beside one logged per step: each tag's own steps decide
    _event_file(tmp_path, "events.out.tfevents.1.h", [("loss", 100, 1.0, 1.0), ("epoch_loss", 1, 5.0, 2.0),
                                                      ("loss", 200, 2.0, 3.0), ("epoch_loss", 2, 6.0, 4.0)])
    steps, series = read_scalars(tmp_path)
    assert _by_step(steps, series["loss"]) == {100: 1.0, 200: 2.0}
    assert _by_step(steps, series["epoch_loss"]) == {1: 5.0, 2: 6.0}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_resumed_text_log_drops_the_abandoned_steps_after_the_restart(tmp_path, suffix):
    records = [{"step": s, "loss": 1.0} for s in range(0, 201, 10)]
    records += [{"step": s, "loss": 2.0} for s in range(100, 151, 10)]
    path = tmp_path / f"log{suffix}"
    if suffix == ".csv":
        path.write_text("step,loss\n" + "".join(f"{r['step']},{r['loss']}\n" for r in records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    steps, series = read_metrics(path)
    expected = {**{s: 1.0 for s in range(0, 100, 10)}, **{s: 2.0 for s in range(100, 151, 10)}}
    assert _by_step(steps, series["loss"]) == expected
    assert steps.tolist() == sorted(expected)


def test_records_at_one_step_merge_and_a_restart_drops_only_its_own_series(tmp_path):
    # Lightning's CSVLogger: train and validation rows at the same step, blanks where not logged
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,loss,step,val_loss\n0,0.5,4,\n0,,4,0.7\n1,0.4,9,\n1,,9,0.6\n"
                    "1,0.45,6,\n")  # the loss series restarts at 6: its step 9 goes, val_loss's stays
    steps, series = read_metrics(path)
    assert _by_step(steps, series["loss"]) == {4: 0.5, 6: 0.45}
    assert _by_step(steps, series["val_loss"]) == {4: 0.7, 9: 0.6}
    assert _by_step(steps, series["epoch"]) == {4: 0.0, 6: 1.0}  # logged in the restarted row too


def test_a_json_object_without_log_history_is_refused(tmp_path):
    # a config.json given by mistake would otherwise replace the store's metrics by none
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 4, "step": 3}))
    with pytest.raises(MetricsError, match=r"config\.json.*log_history"):
        read_metrics(path)


def test_a_recorder_resumed_after_its_last_row_drops_the_abandoned_metrics_after_the_restart(tmp_path):
    # a loop that flushes its metrics as it goes, killed at 17 with rows at 0 and 10 only; resumed at 15
    import torch

    import spectral_analyzer as sa

    model = torch.nn.Linear(2, 1)

    def train(rec, steps, loss):
        for s in steps:
            with torch.no_grad():
                model.weight.add_(0.01)
            rec.step(s, loss=loss)
            rec.flush()

    train(sa.Recorder(tmp_path / "r.zarr", model, every=10), range(18), 1.0)
    resumed = sa.Recorder(tmp_path / "r.zarr", model, every=10)
    resumed.resume(15)
    train(resumed, range(15, 17), 2.0)
    metrics = sa.open_run(tmp_path / "r.zarr").metrics
    assert _by_step(metrics["step"].values, metrics["loss"].values) == {**{s: 1.0 for s in range(15)}, 15: 2.0,
                                                                          16: 2.0}


def test_a_series_named_beyond_a_file_name_s_length_is_kept_under_its_name(tmp_path):
    # a file name holds at most 255 bytes: a longer series name is stored under a short array name
    from spectral_analyzer.store import Store, StoreWriter
    from spectral_analyzer.store.layout import TensorEntry

    long = "eval/" + "\u00e9" * 200  # 405 bytes in UTF-8
    with StoreWriter(tmp_path / "s.zarr") as writer:
        store = writer.create([TensorEntry("w", 0, 4, (4,), "float32")], 64, {})
        store.write_metrics([0, 1], {long: [1.0, 2.0], "loss": [3.0, 4.0]})
        store.append_metrics([2], {long + "x": [5.0]})
    steps, series = Store.open(tmp_path / "s.zarr").read_metrics()
    assert steps.tolist() == [0, 1, 2]
    assert series[long][:2].tolist() == [1.0, 2.0] and series["loss"][:2].tolist() == [3.0, 4.0]
    assert series[long + "x"][2] == 5.0


@pytest.mark.parametrize("text, refusal", [
    ("step,loss\n0,1.0\n100,tensor(0.8)\n200,0.5\n", "record 2 has loss = 'tensor(0.8)', which is not a number"),
    ("step,acc,loss\n0,0.5,1.0\n100,0.8,,0.2\n", "row 3 has 4 cells where the header has 3"),
    ("step,acc,loss\n0,0.5,1.0\n100,0.8\n", "row 3 has 2 cells where the header has 3"),
])
def test_csv_cells_that_are_no_numbers_are_refused_not_dropped(tmp_path, text, refusal):
    """A cell of a numeric series that is no number, a row with a cell to spare (its values shifted), a row cut
    short (a file being written): the value was dropped, or the row read shifted, in silence."""
    path = tmp_path / "log.csv"
    path.write_text(text)
    with pytest.raises(sa.MetricsError, match=re.escape(f"{path}: {refusal}")):
        read_metrics(path)
    path.write_text("step,loss,split,note\n0,1.0,train,\n100,,eval,\n200,0.5,train,x\n")  # text columns, empty cells
    steps, series = read_metrics(path)
    assert list(steps) == [0, 100, 200] and list(series) == ["loss"]
    np.testing.assert_array_equal(series["loss"], [1.0, np.nan, 0.5])


def test_a_selection_keeps_the_runs_newest_trainer_state(tmp_path):
    """select='0..200' on checkpoints 0..400: the metrics came from checkpoint-200's trainer_state.json and
    stopped at step 200 (eval_accuracy reaching 1.0 at 300 was lost: grokking read as never reached)."""
    rng = np.random.default_rng(0)
    history = []
    for step in range(0, 401, 100):
        if step:
            history.append({"eval_accuracy": step / 400, "step": step})
        folder = tmp_path / "out" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.from_numpy(rng.standard_normal(6).astype(np.float32))}, str(folder / "model.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": list(history)}))
    run = sa.ingest(tmp_path / "out", tmp_path / "a.zarr", select="0..200")
    assert list(run.checkpoint_steps) == [0, 100, 200]
    assert list(run.metrics["step"].values) == [100, 200, 300, 400]
    np.testing.assert_array_equal(run.metrics["eval_accuracy"].values, [0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("names, found", [
    (["train/learning_rate"], True),  # HF's TensorBoard tag
    (["lr-AdamW"], True),  # Lightning's LearningRateMonitor, one parameter group
    (["lr-AdamW", "lr-AdamW-momentum", "lr-AdamW-weight_decay"], True),  # log_momentum, log_weight_decay
    (["lr-AdamW/pg1", "lr-AdamW/pg2"], False),  # two groups: no one learning rate
])
def test_a_learning_rate_logged_under_a_path_or_a_monitor_s_name_is_found(tmp_path, names, found):
    """The adiabatic parameter took the learning rate from 'learning_rate' or 'lr' only: NaN throughout for a
    run whose HF TensorBoard log names it train/learning_rate."""
    src = tmp_path / "c"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        save_file({"w": torch.from_numpy(rng.standard_normal(20).astype(np.float32))}, str(src / f"step_{i}.safetensors"))
    (tmp_path / "log.csv").write_text("step," + ",".join(names) + "\n"
                                      + "".join(f"{i},{','.join(['0.003'] * len(names))}\n" for i in range(6)))
    run = sa.ingest(src, tmp_path / "r.zarr", metrics=tmp_path / "log.csv")
    got = run.dynamics(window=3)["adiabatic"].values
    if found:
        np.testing.assert_array_equal(got, run.dynamics(window=3, lr=0.003)["adiabatic"].values)
        assert np.isfinite(got).all()
    else:
        assert np.isnan(got).all()


@pytest.mark.parametrize("text", [
    "step,loss\n200,0.5\n100,0.8\n0,1.0\n",  # newest first: read as restarts, it left step 0 alone
    "step,loss,seed\n0,1.0,0\n100,0.8,0\n0,1.1,1\n100,0.9,1\n",  # two seeds: the second replaced the first
])
def test_a_series_that_goes_back_to_its_first_step_is_refused(tmp_path, text):
    path = tmp_path / "log.csv"
    path.write_text(text)
    with pytest.raises(sa.MetricsError, match=r"record \d logs \w+ at step \d+ after step \d+, back at or before its "
                                              r"first step"):
        read_metrics(path)
    path.write_text("step,loss\n0,1.0\n100,0.8\n200,0.7\n100,0.75\n200,0.6\n")  # resumed at 100: kept as before
    steps, series = read_metrics(path)
    np.testing.assert_array_equal(series["loss"], [1.0, 0.75, 0.6])
