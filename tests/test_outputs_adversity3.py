"""Outputs under a third review: steps a float64 column would round, settings that differ between runs
compared side by side, an events table with no events, a demo overwrite that fails, warnings that never
reached the saved results."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_run
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer import demo, exporting
from spectral_analyzer.report import write_report

SIZES = {"a.weight": (6, 5), "b.bias": (7,)}
HUGE = 2**60  # float64 holds multiples of 256 here: step 2**60 + 10 would become 2**60


def _metrics(path: Path, steps, acc=None, lr=False) -> Path:
    rows = ["step,test_acc" + (",lr" if lr else "")]
    for i, s in enumerate(steps):
        rows.append(f"{s},{acc[i] if acc is not None else i / 10}" + (f",{0.01 / (i + 1)}" if lr else ""))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_grok_step_beyond_2_53_is_refused_not_rounded(tmp_path):
    write_run(tmp_path / "src", 6, SIZES, step0=HUGE)
    steps = [HUGE + 10 * i for i in range(6)]
    csv_path = _metrics(tmp_path / "m.csv", steps, acc=[0.1, 0.2, 0.3, 0.99, 0.99, 0.99])
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", metrics=csv_path, chunk_size=16)
    with pytest.raises(sa.StepError, match=rf"r\.zarr: step {HUGE + 30} is beyond 2\*\*53, and the grokking summary"):
        run.grokking(window=3)


def test_runs_side_by_side_refuse_steps_the_padding_would_round(tmp_path):
    """The outer join pads a run's window starts with NaN, as float64: 2**60 + 15 became 2**60 in silence."""
    write_run(tmp_path / "a", 6, SIZES, step0=HUGE)
    write_run(tmp_path / "b", 6, SIZES, step0=HUGE + 5, seed=1)
    for name in "ab":
        sa.ingest(tmp_path / name, tmp_path / f"{name}.zarr", chunk_size=16)
    runs = sa.open_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"])
    with pytest.raises(sa.StepError, match=r"step \d+ is beyond 2\*\*53, and window_start of runs compared side by "):
        runs.spectra(window=3)


def test_settings_the_runs_do_not_share_are_kept_for_each_run(tmp_path):
    """Concatenation dropped the attributes that differ: which learning rate each run's flow used was lost."""
    write_run(tmp_path / "a", 7, SIZES)
    write_run(tmp_path / "b", 7, SIZES, seed=1)
    sa.ingest(tmp_path / "a", tmp_path / "a.zarr", chunk_size=16,
              metrics=_metrics(tmp_path / "m.csv", range(0, 70, 10), lr=True))
    sa.ingest(tmp_path / "b", tmp_path / "b.zarr", chunk_size=16)
    own = [sa.open_run(tmp_path / f"{n}.zarr").dynamics(window=3).attrs for n in "ab"]
    assert own[0]["lr_source"] != own[1]["lr_source"]
    both = sa.open_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"]).dynamics(window=3)
    assert both["lr_source"].values.tolist() == [own[0]["lr_source"], own[1]["lr_source"]]
    assert "lr_source" not in both.attrs and both.attrs["window"] == 3
    assert both.sel(run="b")["lr_source"].item() == own[1]["lr_source"]
    out = exporting.export(both, tmp_path / "both.csv")
    rows = list(csv.DictReader(out.open()))
    assert {(r["run"], r["lr_source"]) for r in rows} == {("a", own[0]["lr_source"]), ("b", own[1]["lr_source"])}
    exporting.export(both, tmp_path / "both.nc")  # a coordinate of text along run: netCDF holds it


def test_an_events_table_with_no_events_has_the_events_columns(tmp_path):
    write_run(tmp_path / "a", 7, SIZES)
    sa.ingest(tmp_path / "a", tmp_path / "a.zarr", chunk_size=16)
    dyn = sa.open_run(tmp_path / "a.zarr").dynamics(window=3).isel(event=slice(0, 0))
    exporting.export(dyn, tmp_path / "d.csv")
    assert (tmp_path / "d.events.csv").read_text().splitlines() == ["step,kind,mode,value"]
    both = sa.open_runs([tmp_path / "a.zarr"]).dynamics(window=3).isel(event=slice(0, 0))
    exporting.export(both, tmp_path / "r.csv")
    assert (tmp_path / "r.events.csv").read_text().splitlines() == ["run,step,kind,mode,value"]


def test_a_demo_overwrite_that_fails_leaves_the_earlier_output(tmp_path, monkeypatch):
    """The earlier output was deleted before the new run could fail: a typo in --source, a full disk, a kill."""
    src = tmp_path / "src"
    write_run(src, 6, SIZES)
    out = tmp_path / "demo"
    out.mkdir()
    for name in demo.WRITES[1:]:
        (out / name).write_text(f"earlier {name}")
    (out / "run.zarr").mkdir()
    (out / "run.zarr" / "zarr.json").write_text("{}")

    def contents() -> dict[str, str]:
        return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}

    earlier = contents()

    # a failure once the new store is begun (here: the disk full when the weights are exported)
    real = exporting.export

    def full_disk(ds, path, *args, **kwargs):
        if Path(path).name == "weights.nc":
            raise OSError(28, "No space left on device", str(path))
        return real(ds, path, *args, **kwargs)

    monkeypatch.setattr(exporting, "export", full_disk)
    with pytest.raises(OSError, match="No space left"):
        demo.run_demo(out, source=src, window=3, overwrite=True)
    assert contents() == earlier
    # killed halfway: the earlier output aside, part of the new one in its place; the next run puts it back
    (out / demo.PREVIOUS).mkdir()
    for name in demo.WRITES:
        (out / name).rename(out / demo.PREVIOUS / name)
    (out / "run.zarr").mkdir()
    (out / "run.zarr" / "zarr.json").write_text("{\"new\": 1}")
    with pytest.raises(OSError, match="No space left"):
        demo.run_demo(out, source=src, window=3, overwrite=True)
    assert contents() == earlier
    # killed while moving the earlier output aside: part of it moved, part in place; all of it comes back
    (out / demo.MOVING).mkdir()
    for name in demo.WRITES[:4]:
        (out / name).rename(out / demo.MOVING / name)
    with pytest.raises(OSError, match="No space left"):
        demo.run_demo(out, source=src, window=3, overwrite=True)
    assert contents() == earlier
    # killed while putting the earlier output back: half of it back, half still aside beside the new run's
    (out / demo.PREVIOUS).mkdir()
    (out / demo.PREVIOUS / demo.NAMES).write_text("\n".join(demo.WRITES))
    for name in demo.WRITES[:4]:
        (out / name).rename(out / demo.PREVIOUS / name)
        (out / name).mkdir() if name.endswith(".zarr") else (out / name).write_text("the new run's")
    with pytest.raises(OSError, match="No space left"):
        demo.run_demo(out, source=src, window=3, overwrite=True)
    assert contents() == earlier
    # killed once the earlier output was back and its list of names removed, before the empty folder was:
    # nothing is aside, and what is in place is the earlier output (it was all deleted as the new run's)
    (out / demo.PREVIOUS).mkdir()
    with pytest.raises(OSError, match="No space left"):
        demo.run_demo(out, source=src, window=3, overwrite=True)
    assert contents() == earlier
    # killed after listing what was moved aside, before the folder was renamed: the list does not come back
    # with the files (a file the demo does not write, it refused every later overwrite)
    (out / demo.MOVING).mkdir()
    for name in demo.WRITES[:2]:
        (out / name).rename(out / demo.MOVING / name)
    (out / demo.MOVING / demo.NAMES).write_text("\n".join(demo.WRITES[:2]))
    with pytest.raises(OSError, match="No space left"):
        demo.run_demo(out, source=src, window=3, overwrite=True)
    assert contents() == earlier
    # killed while removing the output an overwrite replaced: that half folder is never taken for an output
    (out / demo.DISCARDED).mkdir()
    (out / demo.DISCARDED / "report.html").write_text("half removed")
    with pytest.raises(OSError, match="No space left"):
        demo.run_demo(out, source=src, window=3, overwrite=True)
    assert contents() == earlier


def test_warnings_are_kept_in_the_results_and_shown_in_the_report(tmp_path):
    """A mixed-interval warning was told once, on the screen, and was in neither the result nor the report."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) for k, s in SIZES.items()}
    (tmp_path / "src").mkdir()
    for step in (0, 1, 2, 3, 4, 5, 50, 100, 150, 200, 250):
        state = {k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        save_file(state, str(tmp_path / "src" / f"step_{step}.safetensors"))
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=16)
    for _ in range(2):  # computed, then read from the cache
        with pytest.warns(sa.MixedIntervalsWarning) as told:
            spectra = run.spectra(window=3)
        assert spectra.attrs["warnings"] == str(told[0].message)
    with pytest.warns(sa.MixedIntervalsWarning):
        assert "mix step intervals" in run.dynamics(window=3).attrs["warnings"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.MixedIntervalsWarning)
        page = write_report(run, tmp_path / "report.html", window=3).read_text()
    assert "<h2>Warnings</h2>" in page and "mix step intervals differing by more than 2x" in page
    exporting.export(spectra, tmp_path / "s.nc")
    import xarray as xr
    with xr.open_dataset(tmp_path / "s.nc") as back:
        assert back.attrs["warnings"] == spectra.attrs["warnings"]
    assert np.isfinite(spectra["gap_ratio"].values).all()


def test_the_report_shows_the_last_window_and_says_why_a_comparison_has_no_grokking_table(tmp_path):
    """Every other window of 42 was shown, and the last one (the end of training) was not; a comparison of a run
    logging an accuracy with one that logs none left its grokking table out without a word."""
    from spectral_analyzer.report import write_comparison

    write_run(tmp_path / "a", 45, {"w": (3, 2)})
    write_run(tmp_path / "b", 45, {"w": (3, 2)}, seed=1)
    steps = [10 * i for i in range(45)]
    a = sa.ingest(tmp_path / "a", tmp_path / "a.zarr", metrics=_metrics(tmp_path / "m.csv", steps,
                                                                         acc=[i / 44 for i in range(45)]))
    sa.ingest(tmp_path / "b", tmp_path / "b.zarr")
    last = int(a.spectra(window=3)["step"].values[-1])
    page = write_report(a, tmp_path / "a.html", window=3).read_text()
    assert "every 2 windows, and the last" in page and f"<td>{last}</td>" in page
    both = write_comparison(sa.open_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"]), tmp_path / "c.html",
                            window=3).read_text()
    assert "no accuracy series is logged under one name by every run" in both


def test_a_report_of_a_run_logging_accuracy_in_percent_finds_its_grok_step(tmp_path):
    """The report asked for grokking at 0.95 and refused an accuracy in percent, with no option to say 95."""
    from click.testing import CliRunner

    from spectral_analyzer.cli import main

    write_run(tmp_path / "a", 8, {"w": (3, 2)})
    acc = [10.0, 20.0, 40.0, 80.0, 96.0, 97.0, 99.0, 99.0]
    run = sa.ingest(tmp_path / "a", tmp_path / "a.zarr", metrics=_metrics(tmp_path / "m.csv", range(0, 80, 10), acc))
    def grokking(page: str) -> str:
        return page.split("<h2>Grokking</h2>")[1].split("<h2>")[0]

    page = write_report(run, tmp_path / "a.html", window=3).read_text()
    assert "<td>yes</td><td>40</td>" in grokking(page)  # 96 >= 95 at step 40
    out = CliRunner().invoke(main, ["report", str(tmp_path / "a.zarr"), "-o", str(tmp_path / "b.html"),
                                    "--window", "3", "--threshold", "98"])
    assert out.exit_code == 0, out.output
    assert "<td>yes</td><td>60</td>" in grokking((tmp_path / "b.html").read_text())


def test_results_of_runs_side_by_side_are_not_exported_to_tensorboard(tmp_path):
    """A run selected from runs side by side kept the other runs' steps: 25 phantom NaN points written."""
    from spectral_analyzer.tensorboard import export_tensorboard

    write_run(tmp_path / "a", 6, SIZES)
    write_run(tmp_path / "b", 6, SIZES, seed=1, step0=5)
    for name in "ab":
        sa.ingest(tmp_path / name, tmp_path / f"{name}.zarr", chunk_size=16)
    both = sa.open_runs([tmp_path / "a.zarr", tmp_path / "b.zarr"]).spectra(window=3)
    for ds in (both, both.sel(run="b")):
        with pytest.raises(sa.ExportError, match="runs compared side by side; export each run's own"):
            export_tensorboard(ds, tmp_path / "tb")
    assert not (tmp_path / "tb").exists() or not any((tmp_path / "tb").iterdir())
