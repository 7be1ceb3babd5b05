"""Training logs under a third review: float32 values against a threshold, a resumed TensorBoard run's
purge step, a run folder linked in, CSV headers as spreadsheets write them, numbers written in forms
that are not read, float steps beyond 2**53, and a threshold in percent on an accuracy in fractions."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import write_run

import spectral_analyzer as sa
from spectral_analyzer.errors import MetricError, MetricsError
from spectral_analyzer.ingest.metrics import read_metrics
from spectral_analyzer.weights.grok import grok_point


def _events(folder: Path, points, purge_step=None) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder), purge_step=purge_step)
    for tag, step, value in points:
        writer.add_scalar(tag, value, global_step=step)
    writer.close()


def _by_step(steps, values) -> dict[int, float]:
    """The logged values, as the decimals whose float32 they are."""
    return {int(s): float(str(np.float32(v))) for s, v in zip(steps, values) if not np.isnan(v)}


def test_a_float32_accuracy_reaches_the_threshold_it_was_logged_at(tmp_path):
    """0.95 is 0.949999988 as a float32, which never reached a threshold of 0.95: grokked two logs late."""
    _events(tmp_path / "tb", [("test_acc", 0, 0.5), ("test_acc", 10, 0.9), ("test_acc", 20, 0.95),
                              ("test_acc", 30, 0.97)])
    steps, series = read_metrics(tmp_path / "tb")
    assert series["test_acc"].tolist() == [float(np.float32(v)) for v in (0.5, 0.9, 0.95, 0.97)]  # kept exactly
    import xarray as xr

    ds = xr.Dataset({"test_acc": ("step", series["test_acc"])}, coords={"step": steps})
    assert grok_point(ds, "test_acc", 0.95, "tb") == (True, 20)
    assert grok_point(ds, "test_acc", 0.3, "tb") == (True, 0)
    assert grok_point(ds, "test_acc", 0.96, "tb") == (True, 30)
    logged = xr.Dataset({"test_acc": ("step", [0.5, 0.9499999999, 0.95])}, coords={"step": [0, 10, 20]})
    assert grok_point(logged, "test_acc", 0.95, "csv") == (True, 20)  # float64 values: compared as they are
    k = xr.Dataset({"test_acc": ("step", [0.25, 0.5, 0.75])}, coords={"step": [0, 10, 20]})  # k / 1024, float64
    assert grok_point(k, "test_acc", 0.5 + 1e-9, "csv") == (True, 20)


def test_a_purge_step_drops_every_tags_abandoned_values(tmp_path):
    """SummaryWriter(purge_step=20) of a resumed run: TensorBoard drops every tag's values from step 20 on,
    those of tags the resumed run does not log again too; they were kept, and grokked at 30."""
    _events(tmp_path / "tb", [(t, s, v) for s in range(0, 60, 10) for t, v in
                              (("loss", 1.0 - s / 100), ("test_acc", 0.2 if s < 30 else 0.99))])
    _events(tmp_path / "tb", [("loss", s, 5.0) for s in (20, 30)], purge_step=20)
    steps, series = read_metrics(tmp_path / "tb")
    assert _by_step(steps, series["test_acc"]) == {0: 0.2, 10: 0.2}
    assert _by_step(steps, series["loss"]) == {0: 1.0, 10: 0.9, 20: 5.0, 30: 5.0}


def test_a_run_folder_linked_into_the_log_folder_is_read(tmp_path):
    _events(tmp_path / "elsewhere" / "seed0", [("test_acc", 10, 0.5)])
    _events(tmp_path / "logs" / "train", [("loss", 10, 1.0)])
    (tmp_path / "logs" / "eval").symlink_to(tmp_path / "elsewhere" / "seed0", target_is_directory=True)
    (tmp_path / "logs" / "train" / "loop").symlink_to(tmp_path / "logs", target_is_directory=True)  # a cycle
    steps, series = read_metrics(tmp_path / "logs")
    assert sorted(series) == ["loss", "test_acc"] and steps.tolist() == [10]
    # a link to a run the folder holds itself (wandb's latest-run): that run, under its own name, once
    _events(tmp_path / "wandb" / "run-aaa", [("loss", 10, 1.0)])
    _events(tmp_path / "wandb" / "run-bbb", [("loss", 10, 2.0)])
    (tmp_path / "wandb" / "latest-run").symlink_to(tmp_path / "wandb" / "run-bbb", target_is_directory=True)
    steps, series = read_metrics(tmp_path / "wandb")
    assert sorted(series) == ["run-aaa/loss", "run-bbb/loss"]


@pytest.mark.parametrize("header", ["step, learning_rate, loss", "\ufeffstep,learning_rate,loss",
                                    "\ufefflearning_rate,step,loss", " step ,learning_rate ,loss"])
def test_csv_headers_as_spreadsheets_write_them_name_the_series(tmp_path, header):
    """' learning_rate' and '\\ufefflearning_rate' were series of their own: the learning rate went missing."""
    names = [n.strip().lstrip("\ufeff") for n in header.split(",")]
    rows = [dict(zip(["step", "learning_rate", "loss"], r)) for r in ((0, 0.001, 2.0), (10, 0.001, 1.5))]
    body = "\n".join(",".join(str(r[n]) for n in names) for r in rows)
    (tmp_path / "m.csv").write_text(header + "\n" + body + "\n", encoding="utf-8")
    steps, series = read_metrics(tmp_path / "m.csv")
    assert steps.tolist() == [0, 10] and sorted(series) == ["learning_rate", "loss"]
    assert series["learning_rate"].tolist() == [0.001, 0.001]


@pytest.mark.parametrize("cell", ['"1,000"', '"0,97"', "97%", '"12,345.5"'])
def test_a_column_of_numbers_in_a_form_not_read_is_refused_not_left_out(tmp_path, cell):
    (tmp_path / "m.csv").write_text(f"step,acc\n10,{cell}\n20,{cell}\n")
    with pytest.raises(MetricsError, match=r"m\.csv: record 1 has acc = .*a number in a form that is not read"):
        read_metrics(tmp_path / "m.csv")
    (tmp_path / "t.csv").write_text('step,phase,version,milestones,pair,day\n10,train,1.2.3,"30,60,90",1 2,2024 01 05\n'
                                    '20,eval,1.2.3,"30,60",3 4,2024 01 06\n')
    assert read_metrics(tmp_path / "t.csv")[1] == {}  # words, versions, lists, pairs, dates: text, left out


@pytest.mark.parametrize(("name", "text"), [("m.jsonl", '{"step": 9007199254740992, "loss": 2.0}\n'
                                                        '{"step": 9007199254740993.0, "loss": 1.0}\n'),
                                           ("m.csv", "step,loss\n9007199254740992,2.0\n9.007199254740993e15,1.0\n")])
def test_a_float_step_of_2_53_or_more_is_refused(tmp_path, name, text):
    """9007199254740993.0 was read as ...992 and merged with that step's row, one loss lost."""
    (tmp_path / name).write_text(text)
    with pytest.raises(MetricsError, match=r"record 2 has step .*a floating-point number of 2\*\*53 or more"):
        read_metrics(tmp_path / name)


def test_a_threshold_in_percent_on_an_accuracy_in_fractions_is_refused(tmp_path):
    import xarray as xr

    ds = xr.Dataset({"test_acc": ("step", [0.2, 0.99])}, coords={"step": [0, 10]})
    with pytest.raises(MetricError, match=r"reaches 0\.99 at most, an accuracy as a fraction, while the threshold 95 "
                                          r"is in percent; pass threshold=0\.95"):
        grok_point(ds, "test_acc", 95, "r.zarr")
    assert grok_point(ds, "test_acc", 0.95, "r.zarr") == (True, 10)
    assert sa.MetricError is MetricError


def test_a_trainer_state_at_the_top_that_extends_the_newest_checkpoints_is_taken(hf_copy, tmp_path):
    """An evaluate() after train(), saved with save_state(), is in the run folder's own trainer_state.json only:
    the newest checkpoint's was taken, and the final evaluation never reached the store."""
    import json

    newest = json.loads((hf_copy / "checkpoint-30" / "trainer_state.json").read_text())
    final = {**newest, "log_history": [*newest["log_history"], {"step": 30, "final_accuracy": 0.875}]}
    (hf_copy / "trainer_state.json").write_text(json.dumps(final))
    run = sa.ingest(hf_copy, tmp_path / "r.zarr")
    assert run.metrics["final_accuracy"].sel(step=30).item() == 0.875
    stale = {**newest, "log_history": [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}] * 20}  # another run's
    (hf_copy / "trainer_state.json").write_text(json.dumps(stale))
    again = sa.ingest(hf_copy, tmp_path / "s.zarr")
    assert "final_accuracy" not in again.metrics and 1 not in again.metrics["step"].values


@pytest.mark.parametrize("text", ["", "step,loss,acc\n", "step\n0\n10\n"])
def test_a_metrics_file_with_no_values_is_refused_and_the_stored_ones_kept(tmp_path, text):
    """An empty --metrics file, or a header alone (a log a restarted trainer has just created), was read as
    no series; on an append it replaced the store's logged loss and accuracy with nothing."""
    write_run(tmp_path / "src", 4, {"w": (5, 3)})
    full = tmp_path / "full.csv"
    full.write_text("step,loss,acc\n0,1.0,0.1\n10,0.9,0.2\n")
    run = sa.ingest(tmp_path / "src", tmp_path / "s.zarr", metrics=full)
    write_run(tmp_path / "src", 6, {"w": (5, 3)})
    empty = tmp_path / "new.csv"
    empty.write_text(text)
    with pytest.raises(MetricsError, match=r"new\.csv: holds no logged values"):
        sa.ingest(tmp_path / "src", tmp_path / "s.zarr", metrics=empty)
    run = sa.open_run(tmp_path / "s.zarr")
    assert list(run.checkpoint_steps) == [0, 10, 20, 30]
    assert sorted(run.metrics) == ["acc", "loss"]


def test_a_trainer_state_that_has_logged_nothing_keeps_the_stored_metrics(hf_copy, tmp_path):
    """The newest checkpoint's trainer_state.json with an empty log_history (found, not given) is no training
    log: the store's metrics stay."""
    run = sa.ingest(hf_copy, tmp_path / "s.zarr")
    before = {k: np.asarray(v) for k, v in run.metrics.items()}
    assert before
    last = max(hf_copy.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    new = hf_copy / "checkpoint-40"
    shutil.copytree(last, new)
    state = json.loads((new / "trainer_state.json").read_text())
    (new / "trainer_state.json").write_text(json.dumps({**state, "global_step": 40, "log_history": []}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the copied checkpoint: identical to the one before
        run = sa.ingest(hf_copy, tmp_path / "s.zarr")
    assert list(run.checkpoint_steps)[-1] == 40
    after = {k: np.asarray(v) for k, v in run.metrics.items()}
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k], equal_nan=True) for k in after)
