"""Step selection at ingest (select=, every=) and step ranges in the analyses, with the mixed-interval warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import trajectory, write_safetensors_run
from hypothesis import given
from hypothesis import strategies as st

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.steps import StepRange, StepSelection, delta_rows, parse_step_range

PYTHIA = [0, 1, 2, 4, 8, 16, 1000, 2000, 3000, 4000, 5000, 6000]
SMALL = {"layers.0.weight": (6, 4), "layers.0.bias": (6,), "head.weight": (3, 6)}


@pytest.mark.parametrize("spec, kept", [
    ("1000..143000:1000", [1000, 2000, 3000]),
    ("..4", [0, 1, 2, 4]),
    ("2..", [2, 4, 512, 1000, 1500, 2000, 3000]),
    ("0,2,1000", [0, 2, 1000]),
    ("0, 1000..2000", [0, 1000, 1500, 2000]),
    ("1..3000:1000", [1]),  # counted from A
])
def test_selection_specs(spec, kept):
    steps = [0, 1, 2, 4, 512, 1000, 1500, 2000, 3000]
    assert [s for s in steps if StepSelection.parse(spec).keeps(s)] == kept


def test_every_is_multiples_and_combines_with_select():
    steps = [0, 1, 2, 4, 512, 1000, 1500, 2000, 3000]
    assert [s for s in steps if StepSelection.parse(None, every=1000).keeps(s)] == [0, 1000, 2000, 3000]
    assert [s for s in steps if StepSelection.parse("1..2500", every=500).keeps(s)] == [1000, 1500, 2000]
    assert StepSelection.parse(None) is None and StepSelection.parse([]) is None
    assert str(StepSelection.parse("0,1000..:1000", every=2)) == "1000..:1000,0 every 2"


@pytest.mark.parametrize("spec, message", [
    ("1..x", "'1..x' is neither a step nor a range"),
    ("10..5", "'10..5' ends before it starts"),
    ("1..5:0", "the stride of '1..5:0' must be at least 1"),
    ("1,,2", "has an empty item"),
    ("99999999999999999999", "does not fit a 64-bit integer"),
])
def test_bad_selection_specs(spec, message):
    with pytest.raises(sa.SelectionError, match=message):
        StepSelection.parse(spec)


def test_step_ranges_for_the_analyses():
    assert parse_step_range("1000..") == parse_step_range(slice(1000, None)) == parse_step_range((1000, None))
    for bad in ("1..5:2", "7", slice(0, 10, 2), (1, 2, 3), (5, 1)):
        with pytest.raises(sa.SelectionError):
            parse_step_range(bad)


@given(st.lists(st.integers(0, 10**6), min_size=2, max_size=30, unique=True),
       st.none() | st.integers(0, 10**6), st.none() | st.integers(0, 10**6))
def test_delta_rows_are_the_deltas_inside_the_range(steps, a, b):
    steps = sorted(steps)
    rows = delta_rows(steps, StepRange(a, b))
    inside = [i for i in range(len(steps) - 1)
              if (a is None or steps[i] >= a) and (b is None or steps[i + 1] <= b)]
    assert list(range(rows.start, rows.stop)) == inside


@pytest.fixture(scope="module")
def pythia_run(tmp_path_factory):
    """A run at Pythia's steps: log-spaced to 16, then every 1000 (a store and its source folder)."""
    root = tmp_path_factory.mktemp("pythia")
    src = write_safetensors_run(root / "ckpts", trajectory(PYTHIA, shapes=SMALL, seed=3))
    return src, sa.ingest(src, root / "all.zarr")


def test_unselected_checkpoints_are_never_opened(tmp_path):
    src = write_safetensors_run(tmp_path / "c", trajectory([0, 10, 20, 30], shapes=SMALL))
    (src / "step_5.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(sa.CheckpointError, match="step_5.safetensors"):
        sa.ingest(src, tmp_path / "a.zarr")
    run = sa.ingest(src, tmp_path / "b.zarr", select="10..")
    assert list(run.checkpoint_steps) == [10, 20, 30]
    assert run.provenance["options"]["select"] == "10.."
    run = sa.ingest(src, tmp_path / "c.zarr", select=[0, 20, 30])
    assert list(run.checkpoint_steps) == [0, 20, 30]


def test_an_append_without_the_stores_selection_names_it(tmp_path):
    """The store was made from a selection; an append of the same folder without it meets the steps left out,
    and the one-line refusal says which selection to give again."""
    src = write_safetensors_run(tmp_path / "c", trajectory([0, 10, 20, 30], shapes=SMALL))
    sa.ingest(src, tmp_path / "a.zarr", select="0,20")
    with pytest.raises(sa.StepError) as refused:
        sa.ingest(src, tmp_path / "a.zarr")
    assert str(refused.value).endswith("was made with the step selection '0,20', and this append gives none (every "
                                       "checkpoint); give the same --select / --every (select= / every=) again to "
                                       "append")
    assert list(sa.ingest(src, tmp_path / "a.zarr", select="0,20,30").checkpoint_steps) == [0, 20, 30]
    with pytest.raises(sa.StepError) as refused:  # a selection that leaves out a step before the last
        sa.ingest(src, tmp_path / "a.zarr", select="0,20,30,10")
    assert "step 10 is before the store's last step 30 but not in the store" in str(refused.value)


def test_an_append_of_rotated_checkpoints_keeps_the_stores_grid(tmp_path):
    """A store made with every=20 (steps 0..60); the trainer then keeps only its newest checkpoints, 60..100 by
    10. Appended without every=, steps 70 and 90 joined the 20-step grid in silence (0, 20, 40, 60, 70, 80, ...);
    now refused, the store as it was, and with every=20 given again the grid goes on."""
    steps = list(range(0, 110, 10))
    src = write_safetensors_run(tmp_path / "c", trajectory(steps, shapes=SMALL))
    later = tmp_path / "later"
    later.mkdir()
    for step in steps[7:]:
        (src / f"step_{step}.safetensors").rename(later / f"step_{step}.safetensors")
    store = tmp_path / "a.zarr"
    sa.ingest(src, store, every=20)
    for step in steps[:6]:
        (src / f"step_{step}.safetensors").unlink()
    for f in later.iterdir():
        f.rename(src / f.name)
    before = sorted((p.relative_to(store), p.read_bytes()) for p in store.rglob("*") if p.is_file())
    with pytest.raises(sa.StepError, match="made with the step selection 'every 20', and this append gives none"):
        sa.ingest(src, store)
    assert sorted((p.relative_to(store), p.read_bytes()) for p in store.rglob("*") if p.is_file()) == before
    assert list(sa.ingest(src, store, every=20).checkpoint_steps) == [0, 20, 40, 60, 80, 100]


def test_selected_steps_must_exist(tmp_path):
    src = write_safetensors_run(tmp_path / "c", trajectory([0, 10, 20], shapes=SMALL))
    with pytest.raises(sa.SelectionError, match="no checkpoint at step 25"):
        sa.ingest(src, tmp_path / "a.zarr", select="0,10,25")
    with pytest.raises(sa.SelectionError, match="keeps none of its checkpoints"):
        sa.ingest(src, tmp_path / "a.zarr", select="100..")
    assert not (tmp_path / "a.zarr").exists()


def test_cli_selection(tmp_path):
    src = write_safetensors_run(tmp_path / "c", trajectory([0, 1, 2, 4, 1000, 2000, 3000], shapes=SMALL))
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", str(src), "-o", str(tmp_path / "e.zarr"), "--every", "1000", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3 deltas over steps 0..3000" in result.output
    result = runner.invoke(main, ["ingest", str(src), "-o", str(tmp_path / "s.zarr"), "--select", "2..2000",
                                  "--no-progress"])
    assert result.exit_code == 0 and "3 deltas over steps 2..2000" in result.output
    result = runner.invoke(main, ["ingest", str(src), "-o", str(tmp_path / "x.zarr"), "--select", "1..x"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "neither a step nor a range" in result.output
    result = runner.invoke(main, ["ingest", str(src), "-o", str(tmp_path / "x.zarr"), "--steps", "1000..2000"])
    assert result.exit_code == 2 and "use --select A..B[:K]" in result.output


def test_windows_over_mixed_intervals_warn_once(pythia_run):
    _, run = pythia_run
    with pytest.warns(sa.MixedIntervalsWarning) as caught:
        ds = run.spectra(window=3)
    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        f"{run.path}: 4 of 9 windows of 3 deltas mix step intervals differing by more than 2x, the first from "
        "step 1 to 8 (intervals of 1 to 4 steps)"
    )
    assert ds.sizes["step"] == 9
    run.spectra(window=3, interval_factor=None)  # no check, no warning
    with pytest.warns(sa.MixedIntervalsWarning, match=r"2 of 9 .* by more than 100x, the first from step 4 to 1000 "
                                                      r"\(intervals of 4 to 984 steps\)"):
        run.spectra(window=3, interval_factor=100)


def test_step_range_equals_a_store_of_those_steps(pythia_run, tmp_path):
    src, run = pythia_run
    part = sa.ingest(src, tmp_path / "grid.zarr", select="1000..")
    ranged = run.spectra(window=3, steps=slice(1000, None))  # no warning: equal intervals
    alone = part.spectra(window=3)
    assert list(ranged.step.values) == list(alone.step.values) == [4000, 5000, 6000]
    assert list(ranged.window_start.values) == [1000, 2000, 3000]
    np.testing.assert_allclose(ranged.sigma.values, alone.sigma.values, rtol=1e-12)
    assert ranged.attrs["steps"] == "1000..6000" and alone.attrs["steps"] == ""
    dyn, dyn_alone = run.dynamics(window=2, steps=(1000, 6000)), part.dynamics(window=2)
    assert list(dyn.step.values) == list(dyn_alone.step.values)
    np.testing.assert_allclose(dyn["lambda"].values, dyn_alone["lambda"].values, rtol=1e-12)
    np.testing.assert_allclose(dyn.alpha.values, dyn_alone.alpha.values, rtol=1e-9, atol=1e-12)


def test_step_range_is_part_of_the_cache_key(pythia_run):
    _, run = pythia_run
    first = run.spectra(window=3, steps="2000..5000")
    full = run.spectra(window=3, interval_factor=None)
    again = run.spectra(window=3, steps="2000..5000")
    assert list(first.step.values) == list(again.step.values) == [5000]
    assert full.sizes["step"] == 9
    with pytest.raises(sa.WindowError, match="window 3 needs at least 3 deltas; the step range holds 2 "
                                             r"\(between steps 2000 and 4000\)"):
        run.spectra(window=3, steps="2000..4000")


def test_cli_step_range(pythia_run):
    _, run = pythia_run
    runner = CliRunner()
    result = runner.invoke(main, ["spectra", run.path, "-w", "3", "--steps", "1000..", "--no-progress"])
    assert result.exit_code == 0 and "warning" not in result.output
    rows = [line.split()[0] for line in result.output.splitlines()[1:4]]
    assert rows == ["4000", "5000", "6000"]
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as outside the tests: shown, not raised
        result = runner.invoke(main, ["dynamics", run.path, "-w", "2", "--no-progress", "-q"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("warning: ")] == [
        line for line in result.stderr.splitlines() if "mix step intervals" in line
    ] != []
