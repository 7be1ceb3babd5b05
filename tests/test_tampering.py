"""Damage to a store ends in a one-line error naming what is damaged, or the right numbers; never other numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_run

import spectral_analyzer as sa
from spectral_analyzer.cli import main

WINDOW = 4


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("tamper")
    write_run(root / "src", 10, {"a.w": (30, 7), "b.b": (50,)}, seed=9)
    path = root / "r.zarr"
    sa.ingest(root / "src", path, chunk_size=64)
    expected = sa.open_run(path).spectra(window=WINDOW, cache=False)
    shutil.rmtree(path / "gram", ignore_errors=True)
    return path, expected


def _root(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())


def _edit_root(path: Path, edit) -> None:
    meta = _root(path)
    edit(meta["attributes"])
    (path / "zarr.json").write_text(json.dumps(meta))


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    path.write_bytes(bytes(raw))


DAMAGE = {
    "delete a delta chunk": lambda p: (p / "deltas" / "c" / "5" / "1").unlink(),
    "delete a delta row": lambda p: shutil.rmtree(p / "deltas" / "c" / "5"),
    "flip a delta byte": lambda p: _flip(p / "deltas" / "c" / "3" / "0"),
    "swap two delta chunks": lambda p: shutil.copy(p / "deltas" / "c" / "2" / "0", p / "deltas" / "c" / "6" / "0"),
    "delete a base chunk": lambda p: (p / "base" / "c" / "0").unlink(),
    "flip a step byte": lambda p: _flip(p / "step" / "c" / "0"),
    "delete the steps": lambda p: (p / "step" / "c" / "0").unlink(),
    "flip a checksum byte": lambda p: _flip(p / "chunk_crc" / "c" / "0" / "0"),
    "edit n_deltas": lambda p: _edit_root(p, lambda a: a["commit"].update(n_deltas=a["commit"]["n_deltas"] - 2)),
    "grow n_deltas": lambda p: _edit_root(p, lambda a: a["commit"].update(n_deltas=a["commit"]["n_deltas"] + 3)),
    "edit an offset": lambda p: _edit_root(p, lambda a: a["tensors"][1].update(offset=a["tensors"][1]["offset"] + 1)),
    "edit n_params": lambda p: _edit_root(p, lambda a: a.update(n_params=a["n_params"] - 1)),
    "edit a shape": lambda p: _edit_root(p, lambda a: a["tensors"][0].update(shape=[7, 30])),
    "edit the chain": lambda p: _edit_root(p, lambda a: a["commit"].update(chain="0" * 16)),
    "edit the base step": lambda p: _edit_root(p, lambda a: a.update(base_step=5)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_named_or_harmless(pristine, tmp_path, damage):
    src, expected = pristine
    path = tmp_path / "r.zarr"
    shutil.copytree(src, path)
    DAMAGE[damage](path)
    result = CliRunner().invoke(main, ["spectra", str(path), "--window", str(WINDOW), "--no-progress"])
    if result.exit_code == 0:  # harmless damage: the numbers must be the right ones
        got = sa.open_run(path).spectra(window=WINDOW, cache=False)
        np.testing.assert_array_equal(got.sigma.values, expected.sigma.values)
        assert damage == "delete a base chunk"  # spectra do not read the base; weights do:
        with pytest.raises(sa.StoreError, match="chunk 0 of 'base'"):
            sa.open_run(path).weight_spectra(cache=False)
        return
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], result.output
    assert isinstance(result.exception, SystemExit)


def test_fuzz_random_flips_and_deletions(pristine, tmp_path):
    """Random byte flips and deletions: a one-line error or the right numbers, never other numbers."""
    src, expected = pristine
    rng = np.random.default_rng(1)
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file() and p.name != ".lock")
    for trial in range(25):
        path = tmp_path / f"f{trial}.zarr"
        shutil.copytree(src, path)
        victim = path / files[rng.integers(len(files))]
        if rng.random() < 0.5:
            victim.unlink()
        else:
            raw = bytearray(victim.read_bytes())
            if raw:
                raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
            victim.write_bytes(bytes(raw))
        try:
            got = sa.open_run(path).spectra(window=WINDOW, cache=False)
        except sa.SpectralAnalyzerError as exc:
            assert "\n" not in str(exc)
            continue
        np.testing.assert_array_equal(got.sigma.values, expected.sigma.values, err_msg=str(victim))
        np.testing.assert_array_equal(got.k_star.values, expected.k_star.values, err_msg=str(victim))
