"""Outputs under adversity: a full disk or a kill while exporting, names that matplotlib or a terminal would
read as markup, a logged series named ``step``, failed commands and nonsense options.

What every test holds to: an export is complete or absent (the earlier file, if any, as it was, and no
temporary left that reads as a result); a user's error is one line, with a non-zero exit code, and leaves
the store byte for byte as it was.
"""

from __future__ import annotations

import builtins
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from adversary_procs import run_child, start_fork_server
from click.testing import CliRunner
from conftest import snapshot, write_run
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.errors import ExportError, MetricsError
from spectral_analyzer.exporting import table
from spectral_analyzer.ingest.metrics import read_metrics
from spectral_analyzer.tensorboard import EXPORT_SUFFIX, export_tensorboard, read_scalars

SIZES = {"layers.0.attn.q_proj.weight": (8, 8), "layers.0.mlp.weight": (8, 8)}
WINDOW = "3"
KILLED = -signal.SIGKILL
N_STEPS = 41


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    start_fork_server()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Ten checkpoints with a metrics.csv (test_acc reaches 0.95 at step 60, lr)."""
    folder = tmp_path_factory.mktemp("ckpts")
    write_run(folder, 10, SIZES)
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "test_acc", "lr"])
        for i in range(10):
            writer.writerow([10 * i, min(1.0, 0.1 + 0.15 * i), 1e-3])
    return folder


@pytest.fixture(scope="module")
def ingested(source, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "run.zarr"
    sa.ingest(source, path)
    return path


@pytest.fixture
def store(ingested, tmp_path) -> Path:
    """A fresh copy of the ingested store, with no band or result cached yet."""
    return Path(shutil.copytree(ingested, tmp_path / "run.zarr"))


def _one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# -- a disk that fills up while an export is written ------------------------------


class _FillingFile:
    """A file opened for writing on a disk with *room* bytes left: the write that does not fit writes what
    does, then fails with ENOSPC, as write(2) does."""

    def __init__(self, f, room: list[int]):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room[0]:
            self._f.write(data[: self._room[0]])
            self._f.flush()
            self._room[0] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room[0] -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _written_under(file, mode: str, folder: Path) -> bool:
    """Whether ``open(file, mode)`` opens a file under *folder* for writing (*file*: a path, or a descriptor)."""
    return (isinstance(file, (str, bytes, os.PathLike)) and bool(set(mode) & set("wax+"))
            and Path(os.fsdecode(file)).resolve().is_relative_to(folder.resolve()))


def _fill_disk(monkeypatch, folder: Path, room: int) -> None:
    """Every file opened for writing under *folder* shares *room* bytes; past them, writes fail with ENOSPC."""
    real = io.open
    left = [room]

    def opened(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        return _FillingFile(f, left) if _written_under(file, mode, folder) else f

    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(io, "open", opened)


@pytest.mark.parametrize("command, name", [
    (["spectra", "-w", WINDOW, "-q", "--no-progress"], "s.csv"),
    (["spectra", "-w", WINDOW, "-q", "--no-progress"], "s.json"),
    (["spectra", "-w", WINDOW, "-q", "--no-progress"], "s.nc"),
    (["dynamics", "-w", WINDOW, "-q", "--no-progress"], "d.csv"),
    (["dynamics", "-w", WINDOW, "-q", "--no-progress"], "d.json"),
    (["weights", "-q", "--no-progress"], "w.csv"),
    (["report", "-w", WINDOW], "r.html"),
])
def test_a_full_disk_during_an_overwrite_leaves_the_earlier_export(store, tmp_path, monkeypatch, command, name):
    out = tmp_path / "out"
    out.mkdir()
    args = [command[0], str(store), *command[1:], "-o", str(out / name)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    before = snapshot(out)
    assert before and all(v for v in before.values())
    _fill_disk(monkeypatch, out, room=100)
    line = _one_line_error(CliRunner().invoke(main, [*args, "--overwrite"]))
    assert line.endswith("No space left on device)"), line
    assert str(out / name) in line
    monkeypatch.undo()
    assert snapshot(out) == before  # the earlier files, whole, and no temporary beside them


def test_a_full_disk_on_a_first_export_leaves_nothing(store, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _fill_disk(monkeypatch, out, room=100)
    with pytest.raises(ExportError, match="No space left on device"):
        sa.export(sa.open_run(store).dynamics(window=int(WINDOW)), out / "d.csv")
    monkeypatch.undo()
    assert list(out.iterdir()) == []


def test_dynamics_exports_its_two_tables_together(store, tmp_path, monkeypatch):
    """The per-step table fits, the events table does not: neither replaces the earlier one."""
    out = tmp_path / "out"
    out.mkdir()
    dyn = sa.open_run(store).dynamics(window=int(WINDOW), factor=1.01)
    assert dyn.sizes["event"]
    sa.export(dyn, out / "d.csv")
    before = snapshot(out)
    assert set(before) == {"d.csv", "d.events.csv"}
    later = dyn.isel(step=slice(1, None))
    sizes = {f.name: f.stat().st_size for f in [sa.export(later, tmp_path / "d.csv"), tmp_path / "d.events.csv"]}
    _fill_disk(monkeypatch, out, room=sizes["d.csv"] + sizes["d.events.csv"] // 2)
    with pytest.raises(ExportError, match="No space left on device"):
        sa.export(later, out / "d.csv", overwrite=True)
    monkeypatch.undo()
    assert snapshot(out) == before


# -- a TensorBoard export killed part-way ------------------------------------------


def _spectra(n: int = N_STEPS, scale: float = 1.0) -> xr.Dataset:
    rng = np.random.default_rng(0)
    sigma = np.sort(rng.uniform(0.1, 2.0, (n, 5)), axis=1)[:, ::-1] * scale
    ratio = sigma[:, :-1] / sigma[:, 1:]
    k = ratio.argmax(axis=1)
    rows = np.arange(n)
    return xr.Dataset({"gap_ratio": ("step", ratio[rows, k]), "k_star": ("step", k + 1),
                       "gap": ("step", sigma[rows, k] - sigma[rows, k + 1]), "sigma": (("step", "mode"), sigma)},
                      coords={"step": 10 * (rows + 1), "mode": np.arange(1, 6)})


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def export_killed(logdir: str, kill: str, overwrite: bool) -> None:
    """``export_tensorboard`` into *logdir*, SIGKILLed: once *kill* (``bytes:<n>``) bytes of files opened for
    writing under *logdir* are flushed, or (``rename``) at its first rename of a file there."""
    real_open, real_replace = io.open, os.replace
    folder = Path(logdir)
    if kill == "rename":
        def replace(src, dst, *args, **kwargs):
            if _written_under(dst, "w", folder):
                _die()
            return real_replace(src, dst, *args, **kwargs)

        os.replace = replace
    else:
        left = [int(kill.split(":")[1])]

        class Dying(_FillingFile):
            def write(self, data):
                if len(data) > self._room[0]:
                    self._f.write(data[: self._room[0]])
                    self._f.flush()
                    _die()
                self._room[0] -= len(data)
                return self._f.write(data)

        def opened(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return Dying(f, left) if _written_under(file, mode, folder) else f

        builtins.open = io.open = opened
    export_tensorboard(_spectra(), logdir, overwrite=overwrite)


def _event_files(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if "tfevents" in f.name]  # what TensorBoard reads


@pytest.mark.parametrize("kill", ["bytes:0", "bytes:40", "bytes:2000", "bytes:9000", "rename"])
def test_a_killed_tensorboard_export_leaves_no_event_file(tmp_path, kill):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "logs"
    assert run_child(export_killed, str(logdir), kill, False) == KILLED
    assert _event_files(logdir) == []
    with pytest.raises(MetricsError, match="no TensorBoard event files"):
        read_metrics(logdir)
    written = export_tensorboard(_spectra(), logdir)  # no --overwrite needed: nothing reads as an export
    steps, series = read_scalars(logdir)
    assert written.name.endswith(EXPORT_SUFFIX) and _event_files(logdir) == [written]
    np.testing.assert_array_equal(steps, _spectra()["step"].values)
    assert not np.isnan(series["spectral/sigma_4"]).any()


@pytest.mark.parametrize("kill", ["bytes:40", "bytes:5000", "rename"])
def test_a_killed_tensorboard_overwrite_leaves_the_earlier_export(tmp_path, kill):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "logs"
    earlier = export_tensorboard(_spectra(scale=3.0), logdir)
    content = earlier.read_bytes()
    assert run_child(export_killed, str(logdir), kill, True) == KILLED
    assert _event_files(logdir) == [earlier] and earlier.read_bytes() == content
    steps, series = read_scalars(logdir)
    np.testing.assert_allclose(series["spectral/sigma_1"], 3.0 * _spectra()["sigma"].values[:, 0], rtol=1e-6)


def test_the_cli_export_tb_after_a_kill(store, tmp_path):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "logs"
    assert run_child(export_killed, str(logdir), "bytes:3000", False) == KILLED
    result = CliRunner().invoke(main, ["export-tb", str(store), str(logdir), "-w", WINDOW, "--no-progress"])
    assert result.exit_code == 0, result.output
    [written] = _event_files(logdir)
    assert result.output.startswith(f"wrote {written}: 7 steps")


# -- a logged series named step ----------------------------------------------------


def _tensorboard_log(folder: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for s in range(0, 100, 10):
        writer.add_scalar("test_acc", min(1.0, 0.1 + 0.015 * s), s)
        writer.add_scalar("step", s, s)
    writer.close()
    return folder


def test_a_tensorboard_tag_named_step_is_left_out(source, tmp_path):
    pytest.importorskip("tensorboard")
    logs = _tensorboard_log(tmp_path / "tb")
    steps, series = read_scalars(logs)
    assert list(series) == ["test_acc"]
    np.testing.assert_array_equal(steps, np.arange(0, 100, 10))
    store = tmp_path / "r.zarr"
    result = CliRunner().invoke(main, ["ingest", str(source), "-o", str(store), "--metrics", str(logs),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    run = sa.open_run(store)
    assert list(run.metrics.data_vars) == ["test_acc"]
    assert bool(run.grokking(metric="test_acc", window=3)["grokked"])
    result = CliRunner().invoke(main, ["report", str(store), "-w", WINDOW, "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output


def test_a_store_holding_a_series_named_step_still_reads(source, tmp_path, monkeypatch):
    """A store written while a series named step was kept: its metrics read, and every consumer works."""
    from spectral_analyzer.ingest import pipeline
    from spectral_analyzer.store import metrics as store_metrics

    steps = np.arange(0, 100, 10)
    table = (steps, {"test_acc": np.minimum(1.0, 0.1 + 0.015 * steps), "step": steps.astype(np.float64)})
    monkeypatch.setattr(pipeline, "read_metrics", lambda path: table)  # the series as an earlier version kept them
    monkeypatch.setattr(store_metrics, "_without_step", dict, raising=False)
    store = tmp_path / "r.zarr"
    sa.ingest(source, store)
    monkeypatch.undo()
    assert "step" in sa.open_run(store).store.read_metrics()[1]
    metrics = sa.open_run(store).metrics
    assert list(metrics.data_vars) == ["test_acc"]
    np.testing.assert_array_equal(metrics["step"].values, np.arange(0, 100, 10))
    result = CliRunner().invoke(main, ["grokking", str(store), "-w", WINDOW, "-q"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["report", str(store), "-w", WINDOW, "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(main, ["info", str(store)])
    assert info.exit_code == 0 and "test_acc" in info.output and "test_acc, step" not in info.output
    assert "test_acc" in sa.open_run(store)._repr_html_() and ", step<" not in sa.open_run(store)._repr_html_()


# -- names that matplotlib reads as math ------------------------------------------


MATH = "layers.$\\frac{$.q_proj.weight"


def test_report_draws_names_that_look_like_math(tmp_path):
    folder = tmp_path / "ckpts"
    gen = torch.Generator().manual_seed(0)
    state = {MATH: torch.randn(8, 8, generator=gen), "$x$.mlp.weight": torch.randn(8, 8, generator=gen)}
    folder.mkdir()
    for i in range(8):
        if i:
            state = {k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        save_file(state, str(folder / f"step_{10 * i}.safetensors"))
    (folder / "metrics.csv").write_text("step,$\\frac{$acc\n" + "".join(f"{10 * i},{i / 7}\n" for i in range(8)))
    store = tmp_path / "r.zarr"
    sa.ingest(folder, store)
    out = tmp_path / "r.html"
    result = CliRunner().invoke(main, ["report", str(store), "-w", WINDOW, "-o", str(out), "--metric", "$\\frac{$acc"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {out}"
    page = out.read_text()
    assert page.count("<img") == 6  # sigma, ratios, gap ratio, alpha, energy, and W_Q
    assert "$\\frac{$.q_proj.weight: sigma1 / sigma2" in page


def test_a_figure_that_cannot_be_drawn_is_a_one_line_error(store, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def fails(self, *args, **kwargs):
        raise ValueError("\n$x^$\n  ^\nParseSyntaxException: Expected end of text")

    monkeypatch.setattr(Figure, "savefig", fails)
    out = tmp_path / "r.html"
    line = _one_line_error(CliRunner().invoke(main, ["report", str(store), "-w", WINDOW, "-o", str(out)]))
    assert line.startswith(f"Error: {out}: cannot draw the figure 'Singular values of the window' ($x^$ ^ "), line
    assert not out.exists()


# -- failed commands leave the store as it was -------------------------------------


@pytest.mark.parametrize("args, message", [
    (["spectra", "{store}", "-w", WINDOW, "--params", "nomatch*", "-q", "--no-progress"],
     "Error: no tensor matches 'nomatch*'"),
    (["spectra", "{store}", "-w", WINDOW, "--params", "nomatch*", "--group-by", "layer", "-q", "--no-progress"],
     "Error: no tensor matches 'nomatch*'"),
    (["dynamics", "{store}", "-w", WINDOW, "--params", "nomatch*", "-q", "--no-progress"],
     "Error: no tensor matches 'nomatch*'"),
    (["export-tb", "{store}", "{tmp}/tb", "-w", WINDOW, "--params", "nomatch*", "--no-progress"],
     "Error: no tensor matches 'nomatch*'"),
    (["grokking", "{store}", "-w", WINDOW, "--metric", "nope", "-q"], "Error: {store}: metric 'nope' is not logged"),
    (["grokking", "{store}", "-w", WINDOW, "--wq", "nomatch*", "-q"], "Error: no weight matrix matches 'nomatch*'"),
])
def test_a_failed_command_leaves_the_store_as_it_was(store, tmp_path, args, message):
    before = snapshot(store)
    fill = {"store": str(store), "tmp": str(tmp_path)}
    line = _one_line_error(CliRunner().invoke(main, [a.format(**fill) for a in args]))
    assert line.startswith(message.format(**fill)), line
    assert snapshot(store) == before
    assert not (tmp_path / "tb").exists()


def test_library_grokking_checks_before_computing(store):
    run = sa.open_run(store)
    before = snapshot(store)
    with pytest.raises(sa.MetricError, match="metric 'nope' is not logged"):
        run.grokking(metric="nope", window=3)
    with pytest.raises(sa.SelectionError, match="no weight matrix matches 'nomatch"):
        run.grokking(window=3, wq="nomatch*")
    with pytest.raises(sa.SelectionError, match="unknown grouping 'head'"):
        run.spectra(window=3, group_by="head")
    assert snapshot(store) == before


# -- numeric options ---------------------------------------------------------------


EVENT_OPTIONS = [("--tau", "nan", 0), ("--tau", "inf", 0), ("--tau", "0", 0), ("--tau", "-1.2", 0),
                 ("--factor", "0", 1), ("--factor", "1", 1), ("--factor", "nan", 1)]
DYNAMICS_OPTIONS = [("--lr", "-1", 0), ("--lr", "0", 0), ("--lr", "inf", 0),
                    ("--constant", "-5", 0), ("--constant", "0", 0), ("--constant", "nan", 0)]


@pytest.mark.parametrize("command, option, value, bound",
                         [("dynamics", *o) for o in EVENT_OPTIONS + DYNAMICS_OPTIONS]
                         + [("export-tb", *o) for o in EVENT_OPTIONS])
def test_numeric_options_out_of_range_are_refused(store, tmp_path, command, option, value, bound):
    before = snapshot(store)
    args = [command, str(store), *([str(tmp_path / "tb")] if command == "export-tb" else ["-q"]), "-w", WINDOW,
            option, value, "--no-progress"]
    line = _one_line_error(CliRunner().invoke(main, args), code=2)
    assert line.startswith(f"Error: Invalid value for '{option}': {value} is not a finite number greater than "
                           f"{bound}"), line
    assert snapshot(store) == before
    assert not (tmp_path / "tb").exists()


def test_numeric_options_in_range_are_taken(store):
    result = CliRunner().invoke(main, ["dynamics", str(store), "-w", WINDOW, "--tau", "1.5", "--factor", "1.5",
                                       "--lr", "0.01", "--constant", "0.5", "--no-progress"])
    assert result.exit_code == 0, result.output


# -- names from files printed by ingest --------------------------------------------


def test_ingest_prints_a_left_out_snapshot_name_escaped(tmp_path):
    root = tmp_path / "hub" / "models--org--tiny"
    gen = torch.Generator().manual_seed(0)
    state = {"w.weight": torch.randn(4, 4, generator=gen)}
    for step in (0, 10, 20):
        commit = hashlib.sha1(str(step).encode()).hexdigest()
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / f"step{step}").write_text(commit)
        (root / "snapshots" / commit).mkdir(parents=True)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        save_file(state, str(root / "snapshots" / commit / "model.safetensors"))
    (root / "snapshots" / "\x1b[31mEVIL\nFAKE LINE").mkdir()
    result = CliRunner().invoke(main, ["ingest", str(root), "-o", str(tmp_path / "r.zarr"), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2 and "\x1b" not in result.output
    assert lines[1].startswith("left out snapshot (\\x1b[31mEVIL\\nFA): no ref names this snapshot")


# -- CSV and JSON keep the coordinates along step ----------------------------------


@pytest.mark.parametrize("command", ["spectra", "dynamics"])
def test_csv_and_json_exports_hold_the_window_start(store, tmp_path, command):
    ds = getattr(sa.open_run(store), command)(window=int(WINDOW))
    assert "window_start" in ds.coords and "window_start" not in ds.dims
    for suffix in (".csv", ".json"):
        path = tmp_path / f"out{suffix}"
        sa.export(ds, path)
        if suffix == ".csv":
            with open(path, newline="") as f:
                records = list(csv.DictReader(f))
        else:
            records = json.loads(path.read_text())["records"]
        starts = dict(zip(ds["step"].values.tolist(), ds["window_start"].values.tolist()))
        assert {int(r["step"]) for r in records} == set(starts)  # dynamics: a row per group and step
        assert all(int(r["window_start"]) == starts[int(r["step"])] for r in records)


def test_a_grouped_export_holds_the_window_start_in_every_row(store, tmp_path):
    ds = sa.open_run(store).spectra(window=int(WINDOW), group_by="layer")
    records = table(ds)
    assert len(records) == ds.sizes["group"] * ds.sizes["step"]
    starts = dict(zip(ds["step"].values.tolist(), ds["window_start"].values.tolist()))
    assert all(r["window_start"] == starts[r["step"]] for r in records)

