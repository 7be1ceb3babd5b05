"""The command line starts at once: `--help`, every `COMMAND --help` and `info` import no heavy library."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import FIXTURES

import spectral_analyzer as sa

HEAVY = ("torch", "dask", "distributed", "xarray", "zarr", "matplotlib", "pandas", "numpy", "scipy")

_BLOCKED = (
    "import sys\n"
    f"for name in {HEAVY!r}:\n"
    "    sys.modules[name] = None  # importing it now raises ImportError\n"
    "sys.argv = ['spectral-analyze', *sys.argv[1:]]\n"
    "from spectral_analyzer.cli import main\n"
    "main()\n"
)


def _cli_without_heavy_modules(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKED, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("startup") / "wd1.zarr"
    sa.ingest(FIXTURES / "grokking" / "wd1", path)
    return path


def test_help_of_every_command_imports_no_heavy_library():
    from spectral_analyzer.cli import main

    for command in [None, *main.commands]:
        result = _cli_without_heavy_modules(*([command] if command else []), "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "Usage:" in result.stdout


def test_info_reads_the_store_without_heavy_libraries(store):
    result = _cli_without_heavy_modules("info", str(store), "--tensors")
    assert result.returncode == 0, result.stderr
    run = sa.open_run(store)
    steps = run.checkpoint_steps
    assert f"{steps.size}, steps {steps[0]}..{steps[-1]}" in result.stdout
    assert f"{run.n_params:,} in {run.tensors.sizes['tensor']} tensors" in result.stdout
    for name in run.tensors["tensor"].values:
        assert name in result.stdout
    assert ", ".join(run.metrics.data_vars) in result.stdout


def test_info_errors_are_one_line_without_heavy_libraries(tmp_path):
    result = _cli_without_heavy_modules("info", str(tmp_path / "missing.zarr"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "no store here" in result.stderr


def test_importing_the_package_imports_no_heavy_library():
    code = "import sys, spectral_analyzer; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_every_lazy_name_imports_first_in_a_fresh_interpreter():
    """Whichever public name a session touches first, its modules import (no circular import)."""
    names = ["export", "ingest", "open_runs"]  # one per module of the lazy names: exporting, ingest, run(s)
    procs = {n: subprocess.Popen([sys.executable, "-c", f"import spectral_analyzer as sa; sa.{n}"],
                                 stderr=subprocess.PIPE, text=True) for n in names}
    failed = {n: p.communicate(timeout=300)[1].strip().splitlines()[-1:] for n, p in procs.items()}
    assert {n: e for n, e in failed.items() if procs[n].returncode} == {}


def test_public_functions_survive_importing_their_subpackages():
    code = ("import spectral_analyzer.ingest.pipeline, spectral_analyzer.exporting\n"
            "import spectral_analyzer as sa\n"
            "assert callable(sa.ingest) and callable(sa.export), (sa.ingest, sa.export)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
