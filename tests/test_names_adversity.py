"""Store paths and names that read as something else: glob characters in a store URL, a path ending in ``.``,
``~`` from the environment, names that print alike."""

from __future__ import annotations

import os

import fsspec
import pytest
from click.testing import CliRunner
from conftest import write_run

import spectral_analyzer as sa
from cli.main import main
from spectral_analyzer.errors import printable, printable_name
from spectral_analyzer.store.location import Location


def test_a_store_url_with_glob_characters_is_refused_and_its_sibling_untouched(tmp_path):
    """fsspec's rm globs: the rollback of memory://runs/run[1].zarr deleted run1.zarr's objects."""
    write_run(tmp_path / "c", 3, {"w": (3, 3)})
    fs = fsspec.filesystem("memory")
    try:
        sa.ingest(tmp_path / "c", "memory://names-glob/run1.zarr", progress=False)
        before = sorted(fs.find("/names-glob/run1.zarr"))
        for name in ("run[1].zarr", "run?.zarr", "run*.zarr"):
            with pytest.raises(sa.StoreError, match=r"a store URL cannot hold \*, \? or \["):
                sa.ingest(tmp_path / "c", f"memory://names-glob/{name}", progress=False, overwrite=True)
        assert sorted(fs.find("/names-glob/run1.zarr")) == before
        assert sa.open_run("memory://names-glob/run1.zarr").n_deltas == 2
    finally:
        fs.rm("/names-glob", recursive=True)


def test_a_store_path_ending_in_a_dot_is_the_folder_itself(tmp_path, monkeypatch):
    """-o st/. --overwrite made its new store inside the old one (st/..overwrite-partial), then failed."""
    write_run(tmp_path / "c", 3, {"w": (3, 3)})
    sa.ingest(tmp_path / "c", tmp_path / "st", progress=False)
    assert Location.of(f"{tmp_path}/st/.").path == str(tmp_path / "st")
    sa.ingest(tmp_path / "c", f"{tmp_path}/st/.", progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "st"]
    assert not [n for n in os.listdir(tmp_path / "st") if "overwrite" in n]
    monkeypatch.chdir(tmp_path / "st")  # an overwrite would remove the current directory
    result = CliRunner().invoke(main, ["ingest", str(tmp_path / "c"), "-o", ".", "--overwrite", "--no-progress"])
    assert result.exit_code == 1 and "holds the current directory" in result.output
    assert sa.open_run(tmp_path / "st").n_deltas == 2


def test_a_store_path_from_the_environment_expands_the_home_folder(tmp_path, monkeypatch):
    """SPECTRAL_ANALYZER_STORE='~/run.zarr' (no shell to expand it) made a folder named ~ here."""
    write_run(tmp_path / "c", 3, {"w": (3, 3)})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPECTRAL_ANALYZER_STORE", "~/run.zarr")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    result = CliRunner().invoke(main, ["ingest", str(tmp_path / "c"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "run.zarr" / "zarr.json").exists() and not (tmp_path / "~").exists()


def test_names_that_differ_print_apart():
    """A name holding a newline and one holding a backslash and n printed alike in tables, as did a and a ."""
    assert printable_name("x\ny") == printable("x\ny") == "x\\ny"
    assert printable_name("x\\ny") == "x\\\\ny"
    assert [printable_name(n) for n in ("a", "a ", " a", "")] == ["a", "'a '", "' a'", "''"]
