"""The wheel carries every subpackage (an explicit package list is easy to leave behind)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_for_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(("spectral_analyzer", *init.parent.relative_to(ROOT / "spectral_analyzer").parts)).rstrip(".")
        for init in (ROOT / "spectral_analyzer").rglob("__init__.py")
    }
    on_disk.add("spectral_analyzer.cli")  # cli/ installed under the package
    on_disk.add("spectral_analyzer.demo_run")  # the demo's checkpoints, as package data
    assert listed == on_disk
    assert config["package-dir"]["spectral_analyzer.cli"] == "cli"


def test_a_wheel_installed_outside_the_checkout_runs_the_demo(tmp_path):
    """Built, installed away from the repository (its dependencies from this environment), the demo runs."""
    wheels, site, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # built from a copy: setuptools leaves build/ in the source folder, whose stale files a later wheel would take
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.zarr"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # with this environment's setuptools (the test extras' setuptools>=77, as pyproject's build-system asks):
    # an isolated build would install it again for every run
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("spectral_analyzer-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    # -S: no site module, so no .pth file of this environment (an editable install of this checkout maps the
    # package here); its dependencies come from its site-packages on the path, after the installed wheel
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    python = [sys.executable, "-S"]
    where = subprocess.run([*python, "-c", "import spectral_analyzer.cli, spectral_analyzer.demo as d; "
                            "print(spectral_analyzer.cli.__file__); print(d.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(site)) for line in where.stdout.splitlines())  # the installed copy only
    demo = subprocess.run([*python, "-m", "spectral_analyzer.cli", "demo", "-o", "out"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "run.zarr").is_dir()
