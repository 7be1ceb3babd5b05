"""The wheel carries every subpackage (an explicit package list is easy to leave behind)."""

from __future__ import annotations

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
    assert listed == on_disk
    assert config["package-dir"]["spectral_analyzer.cli"] == "cli"
