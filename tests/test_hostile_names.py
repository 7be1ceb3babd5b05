"""Hostile names end to end: file, folder, store, tensor and metric names that hold newlines, terminal escapes,
bytes that are not UTF-8, look-alike digits or glob characters. Each is read exactly or refused with one line
that names it, and every line printed stays one line per item."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import snapshot, write_run
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.groups import natural_key
from spectral_analyzer.ingest.discover import step_from_name
from spectral_analyzer.ingest.hub import step_from_revision

FORGED = "\n\x1b[31mFORGED"  # a newline and a terminal colour escape: a forged line if printed as it is
SHOWN = "\\n\\x1b[31mFORGED"


def _ingest(src: Path, store: Path, *args: str):
    return CliRunner().invoke(main, ["ingest", str(src), "-o", str(store), "--no-progress", *args])


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and lines[0].isprintable(), result.output
    return lines[0]


def _lines(result) -> list[str]:
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(line.isprintable() for line in lines), result.output
    return lines


@pytest.mark.parametrize("digits", ["１０００", "١٠٠٠", "1０00"])  # full-width, Arabic-Indic, mixed
def test_a_step_in_look_alike_digits_is_refused(tmp_path, digits):
    src = tmp_path / "ckpts"
    write_run(src, 2, {"w": (3, 3)})
    folder = src / f"checkpoint-{digits}"
    folder.mkdir()
    save_file({"w": torch.zeros(3, 3)}, str(folder / "model.safetensors"))
    line = _one_line_error(_ingest(src, tmp_path / "s.zarr"))
    assert f"checkpoint-{digits}: its step {digits} is not written in the digits 0-9" in line
    assert not (tmp_path / "s.zarr").exists()


def test_look_alike_digits_in_names_and_revisions():
    with pytest.raises(sa.StepError, match="not written in the digits 0-9"):
        step_from_name("step_١٠")
    with pytest.raises(sa.StepError, match="not written in the digits 0-9"):
        step_from_revision("step１０００")
    assert step_from_name("step_1000\u202e") == 1000 and step_from_revision("step1000") == 1000


def test_natural_order_of_names_with_superscript_digits(tmp_path):
    assert natural_key("scale_10²") == ["scale_", 10, "²"]
    src = tmp_path / "ckpts"
    write_run(src, 3, {"scale_10²": (2, 2), "scale_2": (2, 2)})
    assert _ingest(src, tmp_path / "s.zarr").exit_code == 0
    assert list(sa.open_run(tmp_path / "s.zarr").tensors["tensor"].values) == ["scale_2", "scale_10²"]


def test_library_errors_are_one_line_whatever_the_names(tmp_path):
    src = tmp_path / f"run{FORGED}"
    src.mkdir()
    with pytest.raises(sa.NoCheckpointsError) as info:
        sa.ingest(src, tmp_path / "s.zarr")
    assert str(info.value).isprintable() and f"run{SHOWN}: no checkpoints found" in str(info.value)


def test_printed_paths_stay_one_line(tmp_path):
    src = tmp_path / "ckpts"
    write_run(src, 6, {"layers.0.attn.q_proj.weight": (8, 4), "mlp.fc.weight": (4, 8)})
    rows = "".join(f"{10 * i},{i / 5}\n" for i in range(6))
    (src / "metrics.csv").write_text(f'step,"acc{FORGED}"\n' + rows)
    store = tmp_path / f"s{FORGED}.zarr"
    assert _lines(_ingest(src, store))[0].startswith(f"{tmp_path}/s{SHOWN}.zarr: 5 deltas over steps 0..50")
    out = tmp_path / f"w{FORGED}.csv"
    lines = _lines(CliRunner().invoke(main, ["weights", str(store), "--no-progress", "-o", str(out)]))
    assert lines[0] == f"wrote {tmp_path}/w{SHOWN}.csv" and out.exists()
    result = CliRunner().invoke(main, ["grokking", str(store), "-w", "3", "--metric", f"acc{FORGED}",
                                       "--threshold", "0.5"])
    lines = _lines(result)
    assert len(lines) == 4 and lines[2].endswith(f"(grokked: acc{SHOWN} >= 0.5)")


def test_a_file_name_that_is_not_utf8_is_refused_by_its_name(tmp_path):
    src = tmp_path / "ckpts"
    write_run(src, 3, {"w": (3, 3)})
    save_file({"w": torch.zeros(3, 3)}, str(src / "step_40.safetensors"))
    try:
        os.rename(os.fsencode(src / "step_40.safetensors"), os.fsencode(src / "step_40") + b"\xff.safetensors")
    except OSError:
        pytest.skip("this file system does not hold names that are not UTF-8")
    line = _one_line_error(_ingest(src, tmp_path / "s.zarr"))
    assert line == f"Error: {src}/step_40\\udcff.safetensors: its name is not valid UTF-8, and checkpoints are read " \
                   "by UTF-8 names; rename it"
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("name, why", [("w\udcff", "has a name that is not Unicode text"),
                                       # numpy's strings drop trailing NULs: w and w\x00 were one label
                                       ("v\x00", "has a NUL character in its name")])
def test_a_tensor_name_that_is_no_unicode_text_is_refused_at_ingest(tmp_path, name, why):
    src = tmp_path / "ckpts"
    src.mkdir()
    for step in (0, 10, 20):  # a pickle keeps a lone surrogate, which no UTF-8 export can
        torch.save({name: torch.full((3, 3), float(step)), "v": torch.ones(3)}, src / f"step_{step}.pt")
    line = _one_line_error(_ingest(src, tmp_path / "s.zarr"))
    assert f"step_0.pt: tensor {name!r} {why}" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("name, why", [("lo\ud800ss", "has a name that is not Unicode text"),
                                       ("loss\x00", "has a NUL character in its name")])
def test_a_metric_name_that_is_no_unicode_text_is_refused(tmp_path, name, why):
    src = tmp_path / "ckpts"
    write_run(src, 3, {"w": (3, 3)})
    records = [{"step": 10 * i, name: i / 3, "loss": 1.0} for i in range(3)]  # JSON's \ud800 escape: valid JSON
    (src / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    store = tmp_path / "s.zarr"
    line = _one_line_error(_ingest(src, store))
    assert f"metrics.jsonl: series {name!r} {why}" in line
    assert not store.exists()


def test_a_store_inside_the_run_folder_is_not_taken_for_a_checkpoint(tmp_path):
    src = tmp_path / "ckpts"
    write_run(src, 3, {"w": (3, 3)})
    store = src / "step_1000.zarr"  # a step word in its name, as a checkpoint folder's
    assert _ingest(src, store).exit_code == 0
    write_run(src, 4, {"w": (3, 3)})
    assert _ingest(src, store).exit_code == 0, "appending the next checkpoint"
    assert list(sa.open_run(store).checkpoint_steps) == [0, 10, 20, 30]


def test_a_store_equal_to_the_run_folder_is_refused_and_left_alone(tmp_path):
    src = tmp_path / "ckpts"
    write_run(src, 3, {"w": (3, 3)})
    before = snapshot(src)
    line = _one_line_error(_ingest(src, src, "--overwrite"))
    assert f"{src}: exists and is not a spectral-analyzer store" in line
    assert snapshot(src) == before


def test_a_store_named_with_glob_characters_opens_as_named(tmp_path):
    src = tmp_path / "ckpts"
    write_run(src, 3, {"w": (3, 3)})
    store = tmp_path / "wd[1].zarr"
    assert _ingest(src, store).exit_code == 0
    runs = sa.open_runs(str(store))
    assert len(runs) == 1 and np.array_equal(next(iter(runs)).checkpoint_steps, [0, 10, 20])


def test_the_ingest_hint_quotes_a_store_path(tmp_path):
    line = _one_line_error(CliRunner().invoke(main, ["info", str(tmp_path / "my run.zarr")]))
    assert line.endswith(f"-o '{tmp_path}/my run.zarr'` first)")


def test_a_folder_named_like_an_option_is_read_after_a_double_dash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "--overwrite", 3, {"w": (3, 3)})
    result = CliRunner().invoke(main, ["ingest", "--no-progress", "-o", "-o", "--", "--overwrite"])
    assert _lines(result) == ["-o: 2 deltas over steps 0..20, p = 9 in 1 tensors"]
    assert list(sa.open_run(tmp_path / "-o").checkpoint_steps) == [0, 10, 20]


def test_two_pickles_of_one_name_are_refused(tmp_path):
    """step_20.pt and step_20.bin holding other weights: the .bin was ingested and the .pt left out in silence.
    A .safetensors file of the name is still taken before its pickle (the same weights converted)."""
    src = tmp_path / "ckpts"
    src.mkdir()
    for step in (0, 10, 20):
        torch.save({"w": torch.full((3, 3), float(step))}, src / f"step_{step}.pt")
    torch.save({"w": torch.full((3, 3), -1.0)}, src / "step_20.bin")
    line = _one_line_error(_ingest(src, tmp_path / "s.zarr"))
    assert line == f"Error: {src}/step_20.bin and step_20.pt: two checkpoints of one name; move one of them out " \
                   "of the folder"
    assert not (tmp_path / "s.zarr").exists()
    (src / "step_20.bin").unlink()
    save_file({"w": torch.full((3, 3), 20.0)}, src / "step_20.safetensors")
    assert _ingest(src, tmp_path / "s.zarr").exit_code == 0
    assert [s["files"][0]["path"].rsplit("/", 1)[1] for s in sa.open_run(tmp_path / "s.zarr").sources] == [
        "step_0.pt", "step_10.pt", "step_20.safetensors"]


def test_names_as_long_as_the_filesystem_takes(tmp_path):
    """A store or output named with 245-250 bytes (the limit is 255): the names written beside them
    (.overwrite-partial, .<name>.<hex>.partial) were longer, and the ingest failed, leaving an empty store."""
    src = tmp_path / "ckpts"
    write_run(src, 4, {"w": (4, 4)})
    store = tmp_path / ("s" * 245 + ".zarr")
    for args in ([], ["--overwrite"]):
        assert _ingest(src, store, *args).exit_code == 0
    write_run(src, 5, {"w": (4, 4)})
    assert _ingest(src, store).exit_code == 0 and sa.open_run(store).n_deltas == 4
    out = tmp_path / ("x" * 240 + ".csv")
    done = CliRunner().invoke(main, ["spectra", str(store), "-w", "3", "-q", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert out.read_text().startswith("step,")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpts", store.name, out.name])
    events = tmp_path / ("y" * 248 + ".csv")  # its events table, y...y.events.csv, would pass 255 bytes
    line = _one_line_error(CliRunner().invoke(main, ["dynamics", str(store), "-w", "2", "-q", "-o", str(events)]))
    assert line.endswith(".events.csv: its name is longer than the 255 bytes a file name may have; choose a "
                         "shorter one")


def test_a_store_name_that_is_not_utf8_is_written_beside_as_it_is(tmp_path):
    """The names written beside a store are measured in the bytes on disk: a store named with a byte that is
    not UTF-8 (r\\xe9sultats.zarr) raised UnicodeEncodeError and left a folder holding only its lock."""
    src = tmp_path / "ckpts"
    write_run(src, 3, {"w": (3, 3)})
    store = tmp_path / os.fsdecode(b"r\xe9sultats.zarr")
    try:
        store.mkdir()
        store.rmdir()
    except OSError:
        pytest.skip("this file system does not hold names that are not UTF-8")
    sa.ingest(src, store)
    sa.ingest(src, store, overwrite=True)
    assert sa.open_run(store).n_deltas == 2
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpts", store.name])


def test_nul_characters_are_refused_from_the_recorder_and_tensorboard(tmp_path):
    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.ones(2)))
    model.register_parameter("w\x00", torch.nn.Parameter(torch.ones(2)))
    with pytest.raises(sa.CheckpointError, match=r"tensor 'w\\x00' has a NUL character in its name"):
        sa.Recorder(tmp_path / "r.zarr", model).record(0)
    recorder = sa.Recorder(tmp_path / "s.zarr", torch.nn.Linear(2, 2))
    with pytest.raises(sa.MetricsError, match=r"series 'loss\\x00' has a NUL character in its name"):
        recorder.log(0, **{"loss\x00": 1.0})
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from spectral_analyzer.ingest.metrics import read_metrics

    with SummaryWriter(str(tmp_path / "tb")) as writer:
        for step in range(3):
            writer.add_scalar("loss\x00", 1.0, step)
    with pytest.raises(sa.MetricsError, match=r"series 'loss\\x00' has a NUL character in its name"):
        read_metrics(tmp_path / "tb")
