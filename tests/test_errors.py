"""Error types, and the command line's promise: one plain line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, write_run
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer import errors
from spectral_analyzer.cli import main

cli_module = importlib.import_module("spectral_analyzer.cli.main")

EVIL = "evil\n\x1b[31m.weight"  # a tensor name with a newline and a terminal colour escape


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """A 6-checkpoint run of a 4-head model (8-row projections) whose learning rate was logged as NaN."""
    root = tmp_path_factory.mktemp("errors")
    src = root / "ckpts"
    write_run(src, 6, {"attn.q_proj.weight": (8, 4), "mlp.fc.weight": (4, 8)})
    rows = "".join(f"{10 * i},nan,{1 - i / 10}\n" for i in range(6))
    (src / "metrics.csv").write_text("step,learning_rate,loss\n" + rows)
    store = root / "small.zarr"
    sa.ingest(src, store)
    return {"root": root, "src": src, "store": str(store)}


def _one_line_error(result, printed_before: bool = False) -> str:
    """The one line on stderr of a failed command, checked for the promise.

    Unless *printed_before* (a table printed before an export failed), it is all the output.
    """
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert lines[0].isprintable()
    if not printed_before:
        assert result.output.splitlines() == lines
    return lines[0]


# -- (a) error types ----------------------------------------------------------


PACKAGE = Path(sa.__file__).parent
SOURCES = sorted([*PACKAGE.rglob("*.py"), *Path(cli_module.__file__).parent.rglob("*.py")])


def _exception_classes(path: Path) -> list[str]:
    """Public classes defined in *path* whose name or base says exception or warning (read, not imported).

    A leading underscore marks a module's own signal, caught where it is raised.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            names = [node.name] + [ast.unparse(b) for b in node.bases]
            if any(n.endswith(("Error", "Exception", "Warning")) for n in names):
                found.append(node.name)
    return found


def test_every_error_class_lives_in_errors_and_is_exported():
    defined_elsewhere = [
        f"{path}: {name}" for path in SOURCES if path.name != "errors.py" for name in _exception_classes(path)
    ]
    assert defined_elsewhere == []
    assert SOURCES and (PACKAGE / "errors.py") in SOURCES
    classes = {n: getattr(errors, n) for n in errors.__all__ if inspect.isclass(getattr(errors, n))}
    declared = {n for n, obj in vars(errors).items() if inspect.isclass(obj) and issubclass(obj, BaseException)}
    assert declared == set(classes)
    for name, cls in classes.items():
        assert getattr(sa, name) is cls and name in sa.__all__, name
        if name.endswith("Warning"):
            assert issubclass(cls, UserWarning) and not issubclass(cls, sa.SpectralAnalyzerError), name
        else:
            assert issubclass(cls, sa.SpectralAnalyzerError), name
    for name in ("WindowError", "SelectionError", "MetricError", "MetricsError", "ExportError", "StoreBusyError",
                 "CacheWarning"):
        assert name in classes
    assert issubclass(sa.StoreBusyError, sa.StoreError)


def test_printable_escapes_control_characters_only():
    assert errors.printable("a/b c.weight é") == "a/b c.weight é"
    assert errors.printable(EVIL) == "evil\\n\\x1b[31m.weight"
    assert errors.printable("tab\there\u202e\udcff") == "tab\\there\\u202e\\udcff"


# -- (b) every command: a bad argument is one line ----------------------------


@pytest.mark.parametrize("command", sorted(main.commands))
def test_bad_usage_of_every_command_is_one_line(command):
    result = CliRunner().invoke(main, [command, "--no-such-option"])
    line = _one_line_error(result)
    assert result.exit_code == 2
    assert "--no-such-option" in line and line.endswith(f" {command} --help')")


BAD_INPUT = {
    "ingest": (["ingest", "{tmp}/nowhere", "-o", "{tmp}/r.zarr"], "nowhere: no such folder"),
    "info": (["info", "{tmp}/none.zarr"], "no store here"),
    "spectra": (["spectra", "{store}", "-w", "9", "--no-progress"], "window 9 needs at least 9 deltas"),
    "dynamics": (["dynamics", "{store}", "-w", "5", "--no-progress"], "need at least 6 deltas"),
    "weights": (["weights", "{store}", "--match", "nothing*"], "no 2-D weight matches"),
    "attention": (["attention", "{store}"], "no attention layer recognised"),
    "grokking": (["grokking", "{store}", "-w", "3", "--metric", "test_acc"], "metric 'test_acc' is not logged"),
    "report": (["report", "{store}", "-o", "{tmp}/r.html", "--metric", "acc"], "metric 'acc' is not logged"),
    "demo": (["demo", "-o", "{tmp}/full"], "exists and is not empty; pass --overwrite to replace it"),
    "train-example": (["train-example", "{tmp}/a_file/run"], "a_file"),
    "export-tb": (["export-tb", "{store}", "{tmp}/tb", "-w", "9", "--no-events"], "window 9 needs at least 9 deltas"),
}


@pytest.mark.parametrize("command", sorted(main.commands))
def test_bad_input_to_every_command_is_one_line(command, small, tmp_path):
    if command not in BAD_INPUT:
        pytest.fail(f"add a bad input for the new command {command!r} to BAD_INPUT")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("")
    (tmp_path / "a_file").write_text("")
    args, expected = BAD_INPUT[command]
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path, store=small["store"]) for a in args])
    assert expected in _one_line_error(result)


# -- (c) the cases, one by one --------------------------------------------------


def test_heads_that_do_not_divide_the_rows(small, tmp_path):
    src = tmp_path / "src"
    write_run(src, 3, {f"attn.{n}_proj.weight": (8, 8) for n in "qkvo"})
    store = str(tmp_path / "layer.zarr")
    sa.ingest(src, store)
    result = CliRunner().invoke(main, ["weights", store, "--heads", "5"])
    line = _one_line_error(result)
    assert "'attn.q_proj.weight' has 8 rows, which do not split into 5 heads" in line
    assert store in line
    with pytest.raises(sa.SelectionError, match="do not split into 3 heads"):
        sa.open_run(store).weight_spectra("*q_proj*", heads=3)
    # heads split attention projections: a store with none says so, naming itself
    line = _one_line_error(CliRunner().invoke(main, ["weights", small["store"], "--heads", "4"]))
    assert small["store"] in line and "no attention layer recognised" in line


@pytest.mark.parametrize("command", ["spectra", "dynamics", "weights"])
def test_output_into_a_missing_folder_is_refused_before_any_work(command, small, tmp_path):
    target = tmp_path / "missing_dir" / "x.nc"
    result = CliRunner().invoke(main, [command, small["store"], "-o", str(target)])
    line = _one_line_error(result)
    assert line == f"Error: {target}: the folder {target.parent} does not exist; create it or choose another path"
    assert not target.parent.exists()


def test_unwritable_output_names_the_path(small, tmp_path, monkeypatch):
    export_module = importlib.import_module("spectral_analyzer.exporting")

    target = tmp_path / "w.csv"

    def denied(records, path, suffix, attrs=None):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(export_module, "_write_records", denied)
    result = CliRunner().invoke(main, ["weights", small["store"], "--no-progress", "-o", str(target)])
    assert _one_line_error(result, printed_before=True) == f"Error: {target}: cannot write (Permission denied)"


def test_all_nan_learning_rate_leaves_the_adiabatic_parameter_nan(small):
    run = sa.open_run(small["store"])
    assert np.isnan(run.metrics["learning_rate"].values).all()
    ds = run.dynamics(window=2)
    assert np.isnan(ds["adiabatic"].values).all() and ds.attrs["lr_source"] == ""
    assert np.isfinite(ds["alpha"].values).any()
    given = run.dynamics(window=2, lr=0.1)
    assert np.isfinite(given["adiabatic"].values).any()
    result = CliRunner().invoke(main, ["dynamics", small["store"], "-w", "2", "--no-progress"])
    assert result.exit_code == 0, result.output


def test_steps_beyond_int64_are_a_step_error(tmp_path):
    src = FIXTURES / "layouts" / "hf_trainer"
    steps = ",".join(str(2**63 + i) for i in range(4))
    result = CliRunner().invoke(main, ["ingest", str(src), "-o", str(tmp_path / "r.zarr"), "--steps", steps])
    assert _one_line_error(result) == (
        f"Error: {src}: step {2**63} is out of range; steps must fit in a signed 64-bit integer"
    )
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("args", [["spectra", "-w", "2"], ["dynamics", "-w", "2"], ["weights"]])
def test_cuda_without_a_cuda_device(args, small, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, [*args, small["store"], "--device", "cuda"])
    assert _one_line_error(result) == "Error: cuda requested but torch sees no CUDA device; use --device cpu"
    result = CliRunner().invoke(main, [*args, small["store"], "--device", "gpu"])
    assert _one_line_error(result) == "Error: unknown device 'gpu'; use --device auto, cpu or cuda"


def test_unreachable_scheduler_fails_fast(small, monkeypatch):
    monkeypatch.setattr(cli_module, "SCHEDULER_TIMEOUT", 0.5)
    start = time.monotonic()
    result = CliRunner().invoke(main, ["spectra", small["store"], "-w", "2", "--scheduler", "tcp://127.0.0.1:1"])
    line = _one_line_error(result)
    assert time.monotonic() - start < 5
    assert line.startswith("Error: cannot reach the dask scheduler at tcp://127.0.0.1:1 (")
    assert line.endswith("check the address, or leave out --scheduler to compute here")


def test_events_file_is_not_overwritten_without_the_flag(small, tmp_path):
    table, events = tmp_path / "d.csv", tmp_path / "d.events.csv"
    events.write_text("mine\n")
    args = ["dynamics", small["store"], "-w", "2", "--no-progress", "-o", str(table)]
    result = CliRunner().invoke(main, args)
    assert _one_line_error(result) == f"Error: {events}: exists; pass --overwrite to replace it"
    assert events.read_text() == "mine\n" and not table.exists()
    with pytest.raises(sa.ExportError, match="pass overwrite"):
        sa.export(sa.open_run(small["store"]).dynamics(window=2), table)
    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert events.read_text().startswith("step,kind,mode,value") and table.exists()


def test_existing_output_asks_for_the_flag_by_its_name(small, tmp_path):
    target = tmp_path / "w.json"
    target.write_text("{}")
    result = CliRunner().invoke(main, ["weights", small["store"], "-o", str(target)])
    assert _one_line_error(result) == f"Error: {target}: exists; pass --overwrite to replace it"
    assert target.read_text() == "{}"


def test_names_from_files_are_escaped_in_the_one_line(tmp_path):
    src = tmp_path / "ckpts"
    src.mkdir()
    gen = torch.Generator().manual_seed(0)
    for step in (0, 10, 20):
        save_file({EVIL: torch.randn(4, 3, generator=gen)}, str(src / f"step_{step}.safetensors"))
    store = str(tmp_path / "evil.zarr")
    assert CliRunner().invoke(main, ["ingest", str(src), "-o", store, "--no-progress"]).exit_code == 0
    result = CliRunner().invoke(main, ["weights", store, "--match", "nothing*"])
    line = _one_line_error(result)
    assert "evil\\n\\x1b[31m.weight" in line and "\x1b" not in line
    info = CliRunner().invoke(main, ["info", store, "--tensors"])
    assert info.exit_code == 0 and "evil\\n\\x1b[31m.weight" in info.output and "\x1b" not in info.output


def test_os_error_on_a_given_path_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(main, ["train-example", str(tmp_path / "a_file" / "run"), "--steps", "1"])
    assert _one_line_error(result) == f"Error: {tmp_path / 'a_file' / 'run'}: Not a directory"


def test_package_warnings_are_one_line_each(tmp_path):
    src = tmp_path / "dup"
    src.mkdir()
    for step, value in ((0, 1.0), (10, 1.0), (20, 2.0)):  # steps 0 and 10: identical contents
        save_file({"w": torch.full((2, 2), value)}, str(src / f"step_{step}.safetensors"))
    def as_python_shows(message, category, filename, lineno, file=None, line=None):  # not as pytest records
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = as_python_shows
        result = CliRunner().invoke(main, ["ingest", str(src), "-o", str(tmp_path / "d.zarr"), "--no-progress"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("warning: ") and "identical contents" in line for line in lines)
