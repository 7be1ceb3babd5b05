from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

import spectral_analyzer as sa
from spectral_analyzer.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def test_ingest_then_info_with_default_store(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPECTRAL_ANALYZER_STORE", raising=False)
    result = runner.invoke(main, ["ingest", str(FIXTURES / "layouts" / "hf_trainer"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "spectral.zarr: 3 deltas over steps 0..30, p = 1,051 in 15 tensors" in result.output
    assert (tmp_path / "spectral.zarr").is_dir()
    result = runner.invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines() if line and not line.startswith(" "))
    assert lines["checkpoints"] == "4, steps 0..30"
    assert lines["deltas"] == "3"
    assert lines["params"].startswith("1,051 in 15 tensors")
    assert "eval_loss" in lines["metrics"]
    assert lines["warnings"] == "none"


def test_store_from_environment(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRAL_ANALYZER_STORE", str(tmp_path / "env.zarr"))
    result = runner.invoke(main, ["ingest", str(FIXTURES / "layouts" / "plain_pt"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sa.open_run(tmp_path / "env.zarr").n_deltas == 3
    result = runner.invoke(main, ["info", "--tensors"])
    assert result.exit_code == 0
    assert "layers.0.0.weight" in result.output and "24x8" in result.output


def test_ingest_options(runner, tmp_path):
    store = tmp_path / "r.zarr"
    result = runner.invoke(
        main,
        ["ingest", str(FIXTURES / "layouts" / "plain_pt"), "-o", str(store), "--include", "layers.*",
         "--exclude", "*.bias", "--chunk-size", "100", "--metrics", str(FIXTURES / "grokking" / "wd1" / "metrics.csv"),
         "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    run = sa.open_run(store)
    assert run.store.chunk_size == 100
    assert run.tensors.sizes["tensor"] == 4
    assert "test_acc" in run.metrics


def test_strip_prefix_option(runner, tmp_path):
    store = tmp_path / "r.zarr"
    result = runner.invoke(
        main, ["ingest", str(FIXTURES / "layouts" / "plain_pt"), "-o", str(store), "--strip-prefix", "module.layers.",
               "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    assert "0.0.weight" in sa.open_run(store).tensors["tensor"].values


@pytest.mark.parametrize(
    "args, message",
    [
        (["ingest", "{empty}", "-o", "{tmp}/r.zarr"], "Error: {empty}: no checkpoints found"),
        (["info", "{tmp}/missing.zarr"], "Error: {tmp}/missing.zarr: no store here"),
        (["ingest", str(FIXTURES / "layouts" / "hf_trainer"), "-o", "{tmp}/r.zarr", "--steps", "1,2"],
         "Error: " + str(FIXTURES / "layouts" / "hf_trainer") + ": 2 steps given for 4 checkpoints"),
    ],
)
def test_errors_are_one_line_with_exit_code(runner, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    fill = {"empty": str(tmp_path / "empty"), "tmp": str(tmp_path)}
    result = runner.invoke(main, [a.format(**fill) for a in args])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(message.format(**fill))
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_different_run_refused_then_overwritten(runner, tmp_path):
    store = str(tmp_path / "r.zarr")
    assert runner.invoke(main, ["ingest", str(FIXTURES / "layouts" / "hf_trainer"), "-o", store]).exit_code == 0
    result = runner.invoke(main, ["ingest", str(FIXTURES / "planted"), "-o", store, "--no-progress"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "holds a different run" in result.output
    result = runner.invoke(main, ["ingest", str(FIXTURES / "planted"), "-o", store, "--overwrite", "--no-progress"])
    assert result.exit_code == 0, result.output


def test_installed_command_exits_nonzero_without_traceback(tmp_path):
    exe = shutil.which("spectral-analyze")
    cmd = [exe] if exe else [sys.executable, "-m", "spectral_analyzer.cli"]
    proc = subprocess.run([*cmd, "info", str(tmp_path / "nope.zarr")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"Error: {tmp_path / 'nope.zarr'}: no store here "
                                                f"(run `spectral-analyze ingest CKPT_DIR -o {tmp_path / 'nope.zarr'}` first)"]
    assert "Traceback" not in proc.stderr


def test_spectra_table_and_exports(runner, tmp_path, monkeypatch):
    import json

    import xarray as xr

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPECTRAL_ANALYZER_STORE", raising=False)
    assert runner.invoke(main, ["ingest", str(FIXTURES / "planted"), "--no-progress"]).exit_code == 0
    result = runner.invoke(main, ["spectra", "--window", "10", "--no-progress", "-o", "s.nc"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "wrote s.nc"  # written before the table: `| head` loses nothing
    assert lines[1].split() == ["step", "k*", "R", "gap", "sigma_1", "sigma_2", "sigma_3", "sigma_4"]
    first = lines[2].split()
    assert first[0] == "1000" and first[1] == "3" and first[4] == "6.708"
    assert lines[17].startswith("k*: gap position") and lines[18].startswith("noise floor of R")
    r = [float(line.split()[2]) for line in lines[2:17]]
    at_peak = [line.split()[0] for line in lines[2:17] if float(line.split()[2]) == max(r)]
    summary = lines[19].split()
    assert summary[:3] == ["peak", "R", f"{max(r):.6g}"] and summary[5] in at_peak
    assert len(lines) == 20
    quiet = runner.invoke(main, ["spectra", "--window", "10", "--no-progress", "-q"])
    assert quiet.exit_code == 0 and quiet.output == ""
    nc = xr.open_dataset(tmp_path / "s.nc")
    assert nc["sigma"].shape == (15, 10) and int(nc["k_star"][0]) == 3
    nc.close()
    result = runner.invoke(main, ["spectra", "-w", "5", "--group-by", "layer", "--no-progress", "-o", "s.csv"])
    assert result.exit_code == 0, result.output
    header = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["group", "step", "k_star"] and "sigma_5" in header
    result = runner.invoke(main, ["spectra", "-w", "5", "--params", "head.*", "--no-progress", "-o", "s.json"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["attrs"]["params"] == "head.*" and len(data["records"]) == 20
    again = runner.invoke(main, ["spectra", "-w", "5", "--no-progress", "-o", "s.json"])
    assert again.exit_code == 1 and "s.json: exists" in again.output


def test_spectra_errors(runner, tmp_path):
    store = str(tmp_path / "r.zarr")
    assert runner.invoke(main, ["ingest", str(FIXTURES / "layouts" / "hf_trainer"), "-o", store]).exit_code == 0
    result = runner.invoke(main, ["spectra", store, "--window", "8"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {store}: window 8 needs at least 8 deltas; the store has 3 (between steps 0 and 30)"
    ]
    result = runner.invoke(main, ["spectra", store, "--window", "2", "-o", str(tmp_path / "x.parquet")])
    assert result.exit_code == 1 and "unknown output format '.parquet'" in result.output


def test_dynamics_prints_events_and_exports_both_tables(runner, tmp_path):
    import json

    import xarray as xr

    store = str(tmp_path / "g.zarr")
    assert runner.invoke(main, ["ingest", str(FIXTURES / "grokking" / "wd1"), "-o", store, "--no-progress"]).exit_code == 0
    out = tmp_path / "dyn.csv"
    result = runner.invoke(main, ["dynamics", store, "-w", "10", "--factor", "2", "--no-progress", "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("wrote ") and lines[1].split()[:6] == ["step", "phase", "k*", "R", "dC", "A"]
    assert "events (4):" in result.output
    events = (tmp_path / "dyn.events.csv").read_text().splitlines()
    assert events[0] == "step,kind,mode,value" and events[1].startswith("1160,gap_collapse_relative,1,")
    value = float(events[1].split(",")[3])  # printed to six digits, as every ratio
    assert f"step     1160  gap_collapse_relative  k*=1  R={value:.6g}" in result.output
    assert "alpha_1" in out.read_text().splitlines()[0]
    result = runner.invoke(main, ["dynamics", store, "-w", "10", "--no-progress", "-o", str(tmp_path / "d.nc")])
    assert result.exit_code == 0, result.output
    nc = xr.open_dataset(tmp_path / "d.nc")
    assert set(nc["event_kind"].values) == {"k_star_shift"} and nc["overlap"].dims == ("step", "mode_prev", "mode")
    nc.close()
    result = runner.invoke(main, ["dynamics", store, "-w", "10", "--no-progress", "-o", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.events.json").read_text())["records"][0]["kind"] == "k_star_shift"


def test_summary_of_a_peak_under_the_noise_floor_says_so():
    import xarray as xr

    from spectral_analyzer.cli.main import _summaries

    ds = xr.Dataset({"gap_ratio": ("step", [1.5, 2.6, 1.9]), "k_star": ("step", [1, 1, 1]), "null_q95": 3.0},
                    coords={"step": [10, 20, 30]})
    (line,) = _summaries(ds)
    assert "peak R 2.6 at step 20" in line and "never above the noise floor 3" in line and "back under" not in line
    ds["null_q95"] = 2.0
    assert "back under the noise floor 2 at step 30" in _summaries(ds)[0]
