"""TensorBoard event files: metrics read from them, spectra written to them, and the round trips."""

from __future__ import annotations

import csv
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import FIXTURES, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.tensorboard import SummaryWriter

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.errors import ExportError, MetricsError
from spectral_analyzer.ingest.metrics import read_metrics
from spectral_analyzer.tensorboard import EXPORT_SUFFIX, export_tensorboard, read_scalars

WD1 = FIXTURES / "grokking" / "wd1"
TAGS = {"train_loss": "train/loss", "train_acc": "train/acc", "test_loss": "test/loss", "test_acc": "test/acc",
        "lr": "lr"}
T0 = 1.7e9  # wall time of the first logged value


def _csv_metrics() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with open(WD1 / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
    return steps, {c: np.array([float(r[c]) for r in rows]) for c in TAGS}


def _stored(x) -> np.ndarray:
    """*x* as TensorBoard stores an ``add_scalar`` value: float32, read back as float64."""
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def _write(folder: Path, name: str, entries) -> Path:
    """An event file named *name* in *folder* holding ``(tag, value, step, wall_time, options)`` entries, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    writer = SummaryWriter(str(folder))
    for tag, value, step, wall_time, options in entries:
        writer.add_scalar(tag, value, global_step=step, walltime=wall_time, **options)
    writer.close()
    [written] = set(folder.iterdir()) - before
    return written.rename(folder / name)


def _training_logdir(root: Path) -> Path:
    """wd1's metrics.csv logged as a training job logs to TensorBoard, with a resumed run and duplicate steps.

    Expected reading: steps and values of metrics.csv under the tags of TAGS,
    float32 except ``test/acc`` (written in float64 as a tensor scalar).
    """
    steps, m = _csv_metrics()
    logdir = root / "logs"
    wall = {int(s): T0 + i for i, s in enumerate(steps)}
    # lr at the top folder; train/* in train/, test/* in test/: three runs, each tag in one of them
    _write(logdir, "events.out.tfevents.1000.host.1.0", [("lr", m["lr"][i], s, wall[s], {})
                                                        for i, s in enumerate(steps)])
    first = []
    for i, s in enumerate(steps):
        for col in ("train_loss", "train_acc"):
            if s <= 400:  # the same step twice: the one written last wins
                first.append((TAGS[col], -1.0, s, wall[s] + 5.0, {}))
            crashed = s >= 1600  # logged before a crash, logged again by the resumed run below
            first.append((TAGS[col], m[col][i] + 7.0 if crashed else m[col][i], s, wall[s], {}))
    _write(logdir / "train", "events.out.tfevents.1000.host.1.0", first)
    resumed = []
    for i, s in enumerate(steps):
        for col in ("train_loss", "train_acc"):
            if s >= 1600:  # the resumed run, in the file named after the first: it wins, whatever its wall times
                resumed.append((TAGS[col], m[col][i], s, T0 - 100.0, {}))
    _write(logdir / "train", "events.out.tfevents.2000.host.2.0", resumed)
    _write(logdir / "test", "events.out.tfevents.1000.host.1.0",
           [("test/loss", m["test_loss"][i], s, wall[s], {}) for i, s in enumerate(steps)]
           + [("test/acc", m["test_acc"][i], s, wall[s], {"new_style": True, "double_precision": True})
              for i, s in enumerate(steps)])
    other = SummaryWriter(str(logdir / "test"))  # not scalars: skipped
    other.add_text("notes", "lr 3e-3, wd 1", 0)
    other.add_histogram("weights", np.arange(10.0), 0)
    other.close()
    return logdir


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return _training_logdir(tmp_path_factory.mktemp("tb"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, logdir):
    return sa.ingest(WD1, tmp_path_factory.mktemp("store") / "wd1.zarr", metrics=logdir)


def _assert_training_metrics(metrics) -> None:
    steps, m = _csv_metrics()
    np.testing.assert_array_equal(metrics["step"].values, steps)
    assert metrics["step"].dtype == np.int64
    assert sorted(metrics.data_vars) == sorted(TAGS.values())
    for col, tag in TAGS.items():
        expected = m[col] if tag == "test/acc" else _stored(m[col])
        np.testing.assert_array_equal(metrics[tag].values, expected, err_msg=tag)


def test_ingest_reads_metrics_from_a_tensorboard_logdir(run):
    _assert_training_metrics(run.metrics)


def test_cli_ingest_reads_metrics_from_a_tensorboard_logdir(logdir, tmp_path):
    store = tmp_path / "cli.zarr"
    result = CliRunner().invoke(main, ["ingest", str(WD1), "-o", str(store), "--metrics", str(logdir), "--no-progress"])
    assert result.exit_code == 0, result.output
    _assert_training_metrics(sa.open_run(store).metrics)


def test_one_event_file_and_the_file_reader_agree(logdir):
    steps, m = _csv_metrics()
    one = logdir / "test" / "events.out.tfevents.1000.host.1.0"
    read_steps, series = read_metrics(one)
    np.testing.assert_array_equal(read_steps, steps)
    assert list(series) == ["test/loss", "test/acc"]
    np.testing.assert_array_equal(series["test/loss"], _stored(m["test_loss"]))
    np.testing.assert_array_equal(series["test/acc"], m["test_acc"])


def test_a_tag_of_several_runs_is_named_by_its_run(tmp_path):
    # add_scalars("loss", {"train": ..., "val": ...}) writes the tag "loss" into runs loss_train/ and loss_val/
    writer = SummaryWriter(str(tmp_path))
    for step in (0, 10, 20):
        writer.add_scalars("loss", {"train": 1.0 / (step + 1), "val": 2.0 / (step + 1)}, step)
        writer.add_scalar("loss", 3.0, step)
    writer.close()
    steps, series = read_scalars(tmp_path)
    np.testing.assert_array_equal(steps, [0, 10, 20])
    assert sorted(series) == ["loss", "loss_train/loss", "loss_val/loss"]
    np.testing.assert_array_equal(series["loss_val/loss"], _stored([2.0, 2.0 / 11, 2.0 / 21]))
    np.testing.assert_array_equal(series["loss"], [3.0, 3.0, 3.0])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b/c"]), st.integers(-5, 2**40), st.floats(width=32)),
                min_size=1, max_size=30),
       st.randoms(use_true_random=False))
def test_the_later_write_wins_and_preempts_later_steps_whatever_the_wall_times(tmp_path_factory, points, random):
    """TensorBoard's rule: in the order written, a value at step s of a tag drops that tag's values at steps
    >= s written before it; wall times play no part. Values and steps come back exact."""
    wall_times = [T0 + k for k in range(len(points))]
    random.shuffle(wall_times)
    folder = tmp_path_factory.mktemp("h")
    _write(folder, "events.out.tfevents.1.h", [(t, v, s, w, {}) for (t, s, v), w in zip(points, wall_times)])
    expected: dict[str, dict[int, float]] = {}
    for tag, step, value in points:
        kept = expected.setdefault(tag, {})
        expected[tag] = {**{s: v for s, v in kept.items() if s < step}, step: value}
    steps, series = read_scalars(folder)
    assert steps.tolist() == sorted({s for by_step in expected.values() for s in by_step})
    for tag, by_step in expected.items():
        want = np.full(steps.size, np.nan)
        for step, value in by_step.items():
            want[steps.tolist().index(step)] = value
        np.testing.assert_array_equal(series[tag], want)
    assert set(series) == set(expected)


def _read_back(folder: Path) -> dict[str, dict[int, float]]:
    steps, series = read_metrics(folder)
    return {name: {int(s): v for s, v in zip(steps, values) if not np.isnan(v)} for name, values in series.items()}


def _as_written(steps, values) -> dict[int, float]:
    return {int(s): float(v) for s, v in zip(steps, _stored(values)) if not np.isnan(v)}


def test_export_tb_round_trip(run, logdir, tmp_path):
    """export-tb into the training logdir: the metrics still read back, the spectra read back equal."""
    target = tmp_path / "logs"
    target.mkdir()
    for f in logdir.rglob("events.out.tfevents.*"):
        (target / f.relative_to(logdir)).parent.mkdir(parents=True, exist_ok=True)
        (target / f.relative_to(logdir)).write_bytes(f.read_bytes())
    theirs = snapshot(target)
    result = CliRunner().invoke(main, ["export-tb", str(run.path), str(target), "--window", "10", "--no-progress"])
    assert result.exit_code == 0, result.output
    [written] = target.glob(f"*{EXPORT_SUFFIX}")
    assert result.output.startswith(f"wrote {written}: 41 steps, ")
    ds, dyn = run.spectra(window=10), run.dynamics(window=10)
    back = _read_back(target)
    for name in ("gap_ratio", "k_star", "gap"):
        assert back[f"spectral/{name}"] == _as_written(ds["step"].values, ds[name].values), name
    for j in range(4):
        assert back[f"spectral/sigma_{j + 1}"] == _as_written(ds["step"].values, ds["sigma"].values[:, j])
    events = sa.events_table(dyn)
    assert events  # wd1 has k* shifts at W = 10
    for kind in {e["kind"] for e in events}:
        assert back[f"spectral/events/{kind}"] == {e["step"]: float(e["mode"]) for e in events if e["kind"] == kind}
    spectral = {n for n in back if n.startswith("spectral/")}
    assert spectral == {f"spectral/{n}" for n in ("gap_ratio", "k_star", "gap", "sigma_1", "sigma_2", "sigma_3",
                                                  "sigma_4")} | {f"spectral/events/{e['kind']}" for e in events}
    _assert_training_metrics(_metrics_dataset(target, exclude="spectral/"))

    # again: refused in one line, the folder as it was; with --overwrite only the export is replaced
    before = snapshot(target)
    result = CliRunner().invoke(main, ["export-tb", str(run.path), str(target), "--no-progress"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {target}: holds an export of spectra already ({written.name}); pass --overwrite to replace it, "
        "or give another folder"]
    assert snapshot(target) == before
    result = CliRunner().invoke(main, ["export-tb", str(run.path), str(target), "--group-by", "module", "--no-events",
                                       "--overwrite", "--no-progress"])
    assert result.exit_code == 0, result.output
    [replaced] = target.glob(f"*{EXPORT_SUFFIX}")
    assert replaced != written and not written.exists()
    assert {k: v for k, v in snapshot(target).items() if not k.endswith(EXPORT_SUFFIX)} == theirs
    grouped = run.spectra(window=10, group_by="module")
    back = _read_back(target)
    assert not any(n.startswith("spectral/events/") for n in back)
    for group in grouped["group"].values:
        part = grouped.sel(group=group)
        assert back[f"spectral/{group}/gap_ratio"] == _as_written(part["step"].values, part["gap_ratio"].values)
        assert back[f"spectral/{group}/sigma_4"] == _as_written(part["step"].values, part["sigma"].values[:, 3])


def _metrics_dataset(folder: Path, exclude: str) -> xr.Dataset:
    steps, series = read_metrics(folder)
    ds = xr.Dataset({k: ("step", v) for k, v in series.items() if not k.startswith(exclude)}, coords={"step": steps})
    return ds.dropna("step", how="all")


def test_export_tensorboard_nan_where_r_is_undefined(tmp_path):
    steps = np.array([10, 20, 30])
    sigma = np.array([[3.0, 1.0, 0.0], [2.0, 2.0, 2.0], [5.0, 0.5, 0.25]])
    ds = xr.Dataset({"gap_ratio": ("step", [3.0, np.nan, 10.0]), "k_star": ("step", [1, 0, 1]),
                     "gap": ("step", [2.0, np.nan, 4.5]), "sigma": (("step", "mode"), sigma)},
                    coords={"step": steps, "mode": [1, 2, 3]})
    path = export_tensorboard(ds, tmp_path / "new" / "logs")
    assert path.parent == tmp_path / "new" / "logs" and path.name.endswith(EXPORT_SUFFIX)
    read_steps, series = read_scalars(path)
    np.testing.assert_array_equal(read_steps, steps)
    assert list(series) == ["spectral/gap_ratio", "spectral/k_star", "spectral/gap", "spectral/sigma_1",
                            "spectral/sigma_2", "spectral/sigma_3"]  # W = 3: three sigmas
    np.testing.assert_array_equal(series["spectral/gap_ratio"], [3.0, np.nan, 10.0])
    np.testing.assert_array_equal(series["spectral/k_star"], [1.0, np.nan, 1.0])  # 0: not defined
    np.testing.assert_array_equal(series["spectral/sigma_3"], [0.0, 2.0, 0.25])
    with pytest.raises(ExportError, match="has no gap_ratio, sigma; pass the result of run.spectra"):
        export_tensorboard(ds.drop_vars(["gap_ratio", "sigma"]), tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="file: is a file; give a folder"):
        export_tensorboard(ds, tmp_path / "file")


def _without_tensorboard(monkeypatch) -> None:
    """Imports of tensorboard (and of torch.utils.tensorboard, which needs it) fail, as when it is not installed."""
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboard" or m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_tensorboard_is_a_one_line_error(logdir, tmp_path, monkeypatch):
    _without_tensorboard(monkeypatch)
    hint = 'pip install "spectral-analyzer[tensorboard]"'
    with pytest.raises(MetricsError) as exc:
        read_metrics(logdir)
    assert str(exc.value) == f"{logdir}: reading TensorBoard event files needs the tensorboard package: {hint}"
    result = CliRunner().invoke(main, ["ingest", str(WD1), "-o", str(tmp_path / "r.zarr"), "--metrics", str(logdir)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {exc.value}"]
    assert not (tmp_path / "r.zarr").exists()
    ds = xr.Dataset({"gap_ratio": ("step", [2.0]), "k_star": ("step", [1]), "gap": ("step", [1.0]),
                     "sigma": (("step", "mode"), [[2.0, 1.0]])}, coords={"step": [5], "mode": [1, 2]})
    with pytest.raises(ExportError) as exc:
        export_tensorboard(ds, tmp_path / "logs")
    logs = tmp_path / "logs"
    assert str(exc.value) == f"{logs}: writing TensorBoard event files needs the tensorboard package: {hint}"
    assert not logs.exists()


def _bad_files(logdir: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = (logdir / "test" / "events.out.tfevents.1000.host.1.0").read_bytes()
    second = 12 + struct.unpack_from("<Q", good)[0] + 4  # where record 2 starts
    n_records = 2 * len(_csv_metrics()[0]) + 1  # the file version, then two scalars a step
    cases = {
        "truncated": (good[:-5], f"truncated: the file ends inside record {n_records} (byte "),
        "cut in a header": (good + good[:7], f"truncated: the file ends inside record {n_records + 1} "
                                             f"(byte {len(good)} of {len(good) + 7})"),
        "not tfevents": (b"step,loss\n0,1.0\n10,0.5\n",
                         "not a TensorBoard event file (no TFRecord header at its start)"),
        "tiny": (b"abc", "not a TensorBoard event file (3 bytes, less than one record)"),
        "flipped bit": (good[: second + 13] + bytes([good[second + 13] ^ 1]) + good[second + 14 :],
                        f"corrupt: record 2 (byte {second} of {len(good)}) has a bad data checksum"),
    }
    out = {}
    for case, (data, message) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        path = folder / "events.out.tfevents.1.host"
        path.write_bytes(data)
        out[case] = (path, message)
    return out


def test_bad_event_files_are_one_line_errors_naming_the_file(logdir, tmp_path):
    for case, (path, message) in _bad_files(logdir, tmp_path).items():
        with pytest.raises(MetricsError) as exc:
            read_metrics(path.parent)
        assert str(exc.value).startswith(f"{path}: {message}"), case
        assert "\n" not in str(exc.value)
    (tmp_path / "cli").mkdir()
    path, message = _bad_files(logdir, tmp_path / "cli")["truncated"]
    result = CliRunner().invoke(main, ["ingest", str(WD1), "-o", str(tmp_path / "r.zarr"), "--metrics", str(path)])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"Error: {path}: {message}")
    assert not (tmp_path / "r.zarr").exists()


def test_metrics_folder_without_event_files_is_refused(tmp_path):
    (tmp_path / "logs" / "sub").mkdir(parents=True)
    (tmp_path / "logs" / "sub" / "metrics.csv").write_text("step,loss\n0,1\n")
    result = CliRunner().invoke(main, ["ingest", str(WD1), "-o", str(tmp_path / "r.zarr"),
                                       "--metrics", str(tmp_path / "logs")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {tmp_path / 'logs'}: not a regular file but a folder, with no TensorBoard event files "
        "(events.out.tfevents.*) in it or under it; give a metrics file (CSV, JSON-lines, trainer_state.json) "
        "or a TensorBoard log folder"]
    writer = SummaryWriter(str(tmp_path / "empty"))
    writer.add_text("notes", "no scalars", 0)
    writer.close()
    with pytest.raises(MetricsError, match="empty: the event files hold no scalars"):
        read_metrics(tmp_path / "empty")
