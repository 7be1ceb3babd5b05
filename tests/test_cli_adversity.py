"""The command line under hostile input, after a review: an output written into the store being read, a
threshold that is no number, a lag far past the run, a closed standard error, unreadable files and folders,
Ctrl-C and a warning given twice. Each is one line, a non-zero exit, and the store as it was."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FIXTURES, snapshot

import spectral_analyzer as sa
from spectral_analyzer.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def grok_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    sa.ingest(FIXTURES / "grokking" / "wd1", path, progress=False)
    return path


def _copy(store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "s.zarr"
    shutil.copytree(store, dst)
    return dst


def _one_line_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[-1]


@pytest.mark.parametrize("command, target", [
    (["spectra", "-w", "4"], "zarr.json"),
    (["weights"], "base/zarr.json"),
    (["report"], "report.html"),
    (["export-tb"], ""),
])
def test_an_output_inside_the_store_is_refused(grok_store, tmp_path, command, target):
    """`spectra s.zarr -o s.zarr/zarr.json --overwrite` replaced the store's metadata with the export: the
    store was gone."""
    store = _copy(grok_store, tmp_path)
    before = snapshot(store)
    output = store / target if target else store
    args = [command[0], str(store), *(["-o", str(output)] if command[0] != "export-tb" else [str(output)]),
            *command[1:], "--overwrite"]
    message = _one_line_error(CliRunner().invoke(main, args))
    assert f"is inside the Zarr store {store}; write outputs outside it" in message
    assert snapshot(store) == before


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf"])
def test_a_threshold_that_is_no_finite_number_is_refused(grok_store, threshold):
    """--threshold nan said no run grokked, -inf that every run grokked at its first step."""
    message = _one_line_error(CliRunner().invoke(main, ["grokking", str(grok_store), "--threshold", threshold]))
    assert "threshold must be a finite number" in message


def test_a_lag_far_past_the_run_costs_no_more_than_the_run(grok_store, tmp_path):
    """--max-lag 10**14 asked numpy for 728 TiB (a traceback); a lag past the deltas holds no product."""
    store = _copy(grok_store, tmp_path)
    run = sa.open_run(store)
    n = run.n_deltas
    assert n - 1 > 16
    band = run.band(max_lag=n + 50)
    assert band.sizes["lag"] == n  # lags 0 .. n - 1: past them, no product
    reference = sa.open_run(_copy(grok_store, tmp_path / "ref")).band(max_lag=n - 1)
    np.testing.assert_array_equal(band.values, reference.values)
    result = CliRunner().invoke(main, ["spectra", str(store), "-w", "4", "--max-lag", str(10 ** 14), "-q"])
    assert result.exit_code == 0, result.output


def test_persistence_past_int64_finds_no_event_without_a_traceback(grok_store):
    """numpy's isfinite could not take an int past int64: a TypeError traceback. No event lasts that long."""
    result = CliRunner().invoke(main, ["dynamics", str(grok_store), "-w", "4", "--persistence",
                                       "999999999999999999999", "--no-progress"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output


def test_ingest_with_standard_error_closed_writes_the_store(tmp_path):
    """Under a daemon with stderr closed, the progress bar's write failed and the ingest with it, silently."""
    out = tmp_path / "s.zarr"
    code = "import sys; from spectral_analyzer.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "ingest", str(FIXTURES / "grokking" / "wd1"), "-o", str(out)],
                          stderr=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=ROOT, close_fds=True,
                          preexec_fn=lambda: os.close(2), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert sa.open_run(out).n_deltas > 0


@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root reads any file")
def test_an_unreadable_checkpoint_says_permission_denied(tmp_path):
    """safetensors called a file it may not open 'No such file or directory'."""
    src = tmp_path / "run"
    shutil.copytree(FIXTURES / "grokking" / "wd1", src)
    victim = sorted(src.rglob("*.safetensors"))[1]
    victim.chmod(0)
    code = "import sys; from spectral_analyzer.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", code, "ingest", str(src), "-o", str(tmp_path / "s.zarr"), "--no-progress"]
    if os.geteuid() == 0:  # drop the capability that lets root read it
        command = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,"
                   "-dac_read_search", *command]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"Error: {victim}: cannot read (Permission denied)"


def test_ctrl_c_is_one_line(tmp_path):
    """Ctrl-C printed a blank line and 'Aborted!'."""
    code = ("import sys, time; from spectral_analyzer.cli import main\n"
            "import importlib; p = importlib.import_module('spectral_analyzer.ingest.pipeline')\n"
            "def slow(*a, **k):\n    print('writing', flush=True)\n    time.sleep(60)\n"
            "p.write_rows = slow\nsys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", code, "ingest", str(FIXTURES / "grokking" / "wd1"), "-o",
                             str(tmp_path / "s.zarr"), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline() == "writing\n"  # inside the ingest's writes
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["Error: interrupted; what was committed before is kept (a store's rows, "
                                        "its caches)"]


@pytest.mark.filterwarnings("always::UserWarning")
def test_a_warning_given_twice_in_one_command_is_printed_once(tmp_path, monkeypatch):
    """A store that cannot be written: the band's cache and the spectra's each said so, in the same words."""
    import errno

    from spectral_analyzer.store import caches

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    store = tmp_path / "s.zarr"
    sa.ingest(FIXTURES / "grokking" / "wd1", store, progress=False)  # nothing cached yet
    monkeypatch.setattr(caches, "writer_lock", read_only)
    result = CliRunner().invoke(main, ["spectra", str(store), "-w", "4", "-q", "--no-progress"])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: {store}: computed without caching: the store cannot be written (Read-only file "
                      "system)"]
