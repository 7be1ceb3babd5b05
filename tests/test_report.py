from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import FIXTURES

import spectral_analyzer as sa
from spectral_analyzer.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _image(data: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(data), format="png")


def _not_blank(img: np.ndarray) -> bool:
    rgb = img[..., :3]
    return float((rgb < 0.9).mean()) > 0.01 and float(rgb.std()) > 0.05


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(main, ["demo", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_demo_writes_everything(demo):
    for name in ("run.zarr", "spectra.nc", "dynamics.nc", "dynamics.csv", "dynamics.events.csv", "weights.nc",
                 "grokking.csv", "report.html"):
        assert (demo / name).exists(), name
    grok = (demo / "grokking.csv").read_text().splitlines()
    assert grok[1].split(",")[1:3] == ["True", "1400.0"]  # steps as floats: NaN where a run never groks
    ws = xr.open_dataset(demo / "weights.nc")
    assert list(ws["matrix"].values) == ["layers.0.attn.in_proj_weight[q]"]
    ws.close()
    again = CliRunner().invoke(main, ["demo", "-o", str(demo)])
    assert again.exit_code == 1 and "exists and is not empty" in again.output


def test_report_embeds_every_plot(demo):
    page = (demo / "report.html").read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    titles = [t for t, _ in images]
    assert titles[:3] == ["Singular values of the window", "Ratios, k* and events", "Gap ratio and test_acc"]
    assert "Stability per mode" in titles and "Mode 1 energy by module" in titles
    assert any("in_proj_weight[q]" in t for t in titles)
    for title, data in images:
        assert _not_blank(_image(base64.b64decode(data))), title
    assert "<h2>Grokking</h2>" in page and "<h2>Events</h2>" in page
    assert "http" not in page.split("<body>")[1]  # self-contained


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(demo, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,4200", f"--screenshot={shot}",
         (demo / "report.html").as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    img = _image(shot.read_bytes())
    assert img.shape[0] == 4200 and img.shape[1] == 1000
    # the page is drawn: six plots stacked down the page, none of the bands blank
    bands = np.array_split(img[600:3600], 6)
    assert all(_not_blank(b) for b in bands)


def test_report_command(tmp_path):
    store = tmp_path / "r.zarr"
    sa.ingest(FIXTURES / "planted", store)
    result = CliRunner().invoke(main, ["report", str(store), "-o", str(tmp_path / "r.html"), "-w", "8"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert page.count("<img ") == 5  # no query projection in the planted run
    again = CliRunner().invoke(main, ["report", str(store), "-o", str(tmp_path / "r.html")])
    assert again.exit_code == 1 and "exists" in again.output


def test_accessor_plots(demo):
    from matplotlib.figure import Figure

    run = sa.open_run(demo / "run.zarr")
    spectra = run.spectra(window=10)
    dyn = run.dynamics(window=10)
    for draw in (spectra.spectral.plot_sigma, spectra.spectral.plot_ratios, spectra.spectral.plot_gap_ratio,
                 dyn.spectral.plot_alpha, dyn.spectral.plot_energy):
        ax = Figure().subplots()
        assert draw(ax=ax) is ax and ax.has_data()


def test_plots_draw_each_run_and_group_or_refuse(demo, tmp_path):
    from matplotlib.figure import Figure

    run = sa.open_run(demo / "run.zarr")
    other = tmp_path / "other.zarr"
    shutil.copytree(demo / "run.zarr", other)
    runs = sa.open_runs([demo / "run.zarr", other])
    both = runs.spectra(window=10)
    ax = Figure().subplots()
    both.spectral.plot_gap_ratio(ax=ax)
    assert len(ax.get_lines()) >= 2 and {"R (run)", "R (other)"} <= {line.get_label() for line in ax.get_lines()}
    grouped = run.spectra(window=10, group_by="module")
    ax = Figure().subplots()
    grouped.spectral.plot_gap_ratio(ax=ax)
    labels = {line.get_label() for line in ax.get_lines()}
    assert {f"R ({g})" for g in grouped["group"].values} <= labels  # every group, not the first only
    with pytest.raises(sa.SelectionError, match="one group at a time: pass group="):
        grouped.spectral.plot_sigma(ax=Figure().subplots())
    grouped.spectral.plot_sigma(group=str(grouped["group"].values[1]), ax=Figure().subplots())
    with pytest.raises(sa.SelectionError, match="one run at a time: pass run= one of run, other"):
        both.spectral.plot_ratios(ax=Figure().subplots())
    with pytest.raises(sa.SelectionError, match="plot_alpha draws the result of run.dynamics"):
        run.spectra(window=10).spectral.plot_alpha(ax=Figure().subplots())
    with pytest.raises(sa.MetricError, match="needs the series it is read from: pass metrics=run.metrics"):
        run.spectra(window=10).spectral.plot_gap_ratio(metric="test_acc", ax=Figure().subplots())
    with pytest.raises(sa.MetricError, match="'nope' is not logged"):
        run.spectra(window=10).spectral.plot_gap_ratio(run.metrics, "nope", ax=Figure().subplots())


def test_grok_step_is_marked(demo):
    from matplotlib.figure import Figure

    run = sa.open_run(demo / "run.zarr")
    grok = run.grokking(window=10)
    ax = Figure().subplots()
    run.spectra(window=10).spectral.plot_gap_ratio(grok=grok, ax=ax)
    marks = [line for line in ax.get_lines() if line.get_label() == "grok step"]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == float(grok.grok_step)


def test_report_of_two_runs_compares_them(tmp_path):
    for name in ("wd1", "wd0"):
        sa.ingest(FIXTURES / "grokking" / name, tmp_path / f"{name}.zarr")
    out = tmp_path / "both.html"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "wd1.zarr"), str(tmp_path / "wd0.zarr"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "2 runs compared" in page
    rows = re.findall(r"<tr><td>(wd[01])</td><td>(yes|no)</td><td>([^<]*)</td>", page)
    assert rows == [("wd1", "yes", "1400"), ("wd0", "no", "-")]  # the grokking summary of each run
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(_not_blank(_image(base64.b64decode(i))) for i in images)
    if CHROMIUM is not None:
        shot = tmp_path / "both.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1600", f"--screenshot={shot}",
                        out.as_uri()], check=True, capture_output=True, timeout=120)
        assert _not_blank(_image(shot.read_bytes())[300:1500])
    bad = CliRunner().invoke(main, ["report", str(tmp_path / "wd1.zarr"), str(tmp_path / "wd0.zarr"),
                                    "-o", str(tmp_path / "x.html"), "--metric", "nope"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: metric 'nope' is not logged by wd1, wd0")


def test_demo_overwrite_replaces_a_demo_s_output_only(tmp_path):
    """--overwrite empties a folder that holds what the demo writes, never one holding anything else."""
    from spectral_analyzer.demo import WRITES, run_demo

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("mine")
    (mine / "report.html").write_text("old")
    result = CliRunner().invoke(main, ["demo", "-o", str(mine), "--overwrite"])
    assert result.exit_code == 1 and "holds files the demo does not write (chapter1.tex)" in result.output
    assert (mine / "chapter1.tex").read_text() == "mine" and (mine / "report.html").read_text() == "old"
    old = tmp_path / "old-demo"
    old.mkdir()
    for name in WRITES[1:]:
        (old / name).write_text("from an earlier demo")
    (old / "run.zarr").mkdir()
    (old / ".report.html.0a1b2c3d.partial").write_text("left by a killed export")
    paths = run_demo(old, overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == sorted(WRITES)
    assert paths["report"].read_text() != "from an earlier demo"
