"""Writers under review: a table and its events file replaced as a pair, interrupted between the two."""

from __future__ import annotations

import os

import pytest
from conftest import write_run

import spectral_analyzer as sa
from spectral_analyzer import exporting

SIZES = {"a.weight": (6, 5), "b.bias": (7,)}


class Killed(BaseException):
    """What a kill between two renames looks like from inside: nothing after it runs."""


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_table_is_never_left_beside_the_events_of_another_export(tmp_path, monkeypatch, suffix):
    """Overwriting ``dynamics.csv`` replaces it and ``dynamics.events.csv``: stopped after any of the renames,
    the files there are both the earlier export's, both the new one's, or one alone; never one of each."""
    write_run(tmp_path / "src", 8, SIZES)
    run = sa.ingest(tmp_path / "src", tmp_path / "run.zarr")
    ds = run.dynamics(window=3)
    table = tmp_path / f"dynamics{suffix}"
    events = tmp_path / f"dynamics.events{suffix}"
    renames = 0
    real = os.replace

    def counting(src, dst):
        nonlocal renames
        renames += 1
        return real(src, dst)

    monkeypatch.setattr(exporting.os, "replace", counting)
    sa.export(ds, table, overwrite=True)
    assert renames == 2
    for stop in (1, 2):
        earlier = {p: os.stat(p).st_ino for p in (table, events)}
        calls = 0

        def killed(src, dst):
            nonlocal calls
            calls += 1
            if calls == stop:
                raise Killed
            return real(src, dst)

        monkeypatch.setattr(exporting.os, "replace", killed)
        with pytest.raises(Killed):
            sa.export(ds, table, overwrite=True)
        kinds = {"earlier" if os.stat(p).st_ino == ino else "new" for p, ino in earlier.items() if p.exists()}
        assert len(kinds) == 1, (stop, {p.name: p.exists() for p in earlier})
        monkeypatch.setattr(exporting.os, "replace", real)
        sa.export(ds, table, overwrite=True)  # and the next export completes the pair
        assert table.exists() and events.exists()
