"""Every number a user reads back, against the Dataset it came from.

Exports are reloaded with the standard readers (``xarray.open_dataset``, the ``csv`` module, ``json``) and compared
with the result value by value: float64 bit for bit in netCDF; in CSV and JSON a float parses back to the same
float64 (-0.0 kept, NaN an empty cell or null, inf the text ``inf``). Command-line tables and the HTML reports
print each value as its Dataset holds it, to four significant digits, ``-`` only where it is not defined.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner
from conftest import write_run
from matplotlib.figure import Figure

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.errors import ExportError
from spectral_analyzer.exporting import export
from spectral_analyzer.report import write_comparison

SIZES = {f"layers.0.attn.{m}_proj.weight": (8, 8) for m in "qkvo"} | {"layers.0.mlp.weight": (8, 8)}
KEYS = ("run", "group", "matrix", "layer", "head", "series", "step", "lag")
SPREAD = ("mode", "rank")


def _ingest(root: Path, name: str, n: int, every: int, seed: int) -> Path:
    """*n* checkpoints every *every* steps, test_acc reaching 1 at two thirds of the run."""
    src = root / name
    write_run(src, n, SIZES, seed=seed, every=every)
    rows = [f"{every * i},{1.0 if i >= 2 * n // 3 else 0.1 * i},{1.0 / (1 + i)}" for i in range(n)]
    (src / "metrics.csv").write_text("step,test_acc,test_loss\n" + "\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sa.ingest(src, root / f"{name}.zarr", progress=False)
    return root / f"{name}.zarr"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    """Two runs on different step grids (every 10 and every 15 steps)."""
    root = tmp_path_factory.mktemp("exactness")
    return _ingest(root, "a", 10, 10, seed=1), _ingest(root, "b", 8, 15, seed=2)


@pytest.fixture(scope="module")
def results(stores) -> dict[str, xr.Dataset]:
    run = sa.open_run(stores[0])
    return {
        "spectra": run.spectra(window=3),
        "grouped": run.spectra(window=3, group_by="module"),
        "dynamics": run.dynamics(window=3),
        "weights": run.weight_spectra(),
        "grokking": run.grokking(window=3),
        "attention": run.attention_spectra(heads=2),
        "qk grokking": run.grokking(operator="qk", heads=2),
        "correlate": run.correlate("test_loss", window=3, max_lag=2),
    }


def _same(got, want) -> bool:
    """Equal as the reader gets them: floats bit for bit (-0.0 is not 0.0; NaN is NaN), others by value."""
    if isinstance(want, (float, np.floating)):
        return isinstance(got, float) and (math.isnan(got) and math.isnan(want) or
                                           (got == want and math.copysign(1, got) == math.copysign(1, want)))
    return got == want


def _cell(text, want):
    """A CSV cell or JSON value read back as the type of *want*."""
    if isinstance(want, (float, np.floating)):
        return float("nan") if text in ("", None) else float(text)
    if isinstance(want, (bool, np.bool_)):
        return text in (True, "True")
    if isinstance(want, (int, np.integer)):
        return int(text)
    return text


def _assert_records_hold(ds: xr.Dataset, records: list[dict]) -> None:
    """Each record holds, at its keys, every variable and coordinate over the key dims (``name_j`` along mode or
    rank), and every (key) combination a run holds has its record."""
    keys = [d for d in KEYS if d in ds.dims]
    seen = set()
    for rec in records:
        at = {d: list(map(str, ds[d].values)).index(str(rec[d])) for d in keys}
        seen.add(tuple(at.values()))
        for name, var in ds.variables.items():
            if name in ds.dims or not set(var.dims) <= set(keys) | set(SPREAD):
                continue
            value = var.isel({d: i for d, i in at.items() if d in var.dims})
            extra = [d for d in value.dims]
            if not extra:
                want = value.values.item()
                assert _same(_cell(rec[name], want), want), (name, rec[name], want)
            elif len(extra) == 1:
                for j, label in enumerate(ds[extra[0]].values):
                    want = value.values[j].item()
                    assert _same(_cell(rec[f"{name}_{label}"], want), want), (name, label, rec[f"{name}_{label}"])
    if "run" not in keys:
        assert len(seen) == len(records) == int(np.prod([ds.sizes[d] for d in keys]))


def _assert_netcdf_holds(ds: xr.Dataset, path: Path) -> None:
    with xr.open_dataset(path) as back:
        back = back.load()
    assert set(back.variables) == set(ds.variables)
    for name, var in ds.variables.items():
        got = back[name].transpose(*var.dims)  # an empty dim leads in netCDF3
        if var.dtype.kind == "f":
            assert got.dtype == np.float64 and np.array_equal(got.values.view(np.int64), var.values.view(np.int64)), name
        else:  # a run's missing phase (NaN, outer join) is the empty string netCDF has for it
            want = np.where(var.values == var.values, var.values, "") if var.dtype == object else var.values
            assert np.array_equal(got.values.astype(var.dtype), want), name
            kinds = {"i": "if", "U": "UO"}.get(var.dtype.kind, var.dtype.kind)  # int32, or float64 beyond it
            assert got.dtype.kind in kinds, (name, got.dtype, var.dtype)
        assert got.attrs == var.attrs, name
    assert {k: str(v) for k, v in back.attrs.items()} == {k: str(int(v) if isinstance(v, bool) else v)
                                                         for k, v in ds.attrs.items()}


def _reload_and_compare(ds: xr.Dataset, folder: Path) -> None:
    folder.mkdir()
    _assert_netcdf_holds(ds, export(ds, folder / "x.nc"))
    with open(export(ds, folder / "x.csv"), newline="", encoding="utf-8") as f:
        _assert_records_hold(ds, list(csv.DictReader(f)))
    doc = json.loads(export(ds, folder / "x.json").read_text(encoding="utf-8"))
    _assert_records_hold(ds, doc["records"])
    assert doc["attrs"] == {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in ds.attrs.items()}


@pytest.mark.parametrize("kind", ["spectra", "grouped", "dynamics", "weights", "grokking", "attention",
                                  "qk grokking", "correlate"])
def test_every_result_reads_back_exactly_from_every_format(results, tmp_path, kind):
    """Correlations included: their r, best lag and best r along series and lag (CSV and JSON used to hold only
    k_star_cross); grokked reads back a boolean from netCDF."""
    _reload_and_compare(results[kind], tmp_path / "out")


def test_hostile_values_and_names_read_back_exactly(tmp_path):
    ds = xr.Dataset(
        {"gap_ratio": ("step", [-0.0, np.nan, np.inf, -np.inf, 5e-324], {"long_name": "gap ratio R", "units": "1"}),
         "gap": ("step", [1.7976931348623157e308, 0.1 + 0.2, 1e-310, 0.0, 2.0 ** -1074 * 3]),
         "k_star": ("step", np.array([0, 1, 2, 3, 2**31], dtype=np.int64)),
         "phase": ("step", ["rise", "", "plat,eau", 'col"lapse\nx', "ünï ☃"]),
         "sigma": (("group", "step", "mode"), np.arange(20.0).reshape(2, 5, 2) / 7)},
        coords={"step": np.array([0, 10, 2**31, 2**40, 2**53], dtype=np.int64), "mode": [1, 2],
                "group": ['a,b "q"\nnl', "ünï ☃"]},
        attrs={"window": 3, "center": False, "factor": float("nan"), "steps": ""},
    )
    _reload_and_compare(ds, tmp_path / "out")


def test_a_step_netcdf3_cannot_hold_exactly_is_refused(tmp_path):
    """netCDF3 keeps integers as int32 or float64: 2**53 + 1 would read back as 2**53."""
    ds = xr.Dataset({"gap_ratio": ("step", [1.5, 2.5])}, coords={"step": np.array([10, 2**53 + 1], dtype=np.int64)})
    with pytest.raises(ExportError, match=r"x\.nc: step holds 9007199254740993.*\.csv or \.json"):
        export(ds, tmp_path / "x.nc")
    assert os.listdir(tmp_path) == []
    with open(export(ds, tmp_path / "x.csv"), newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [10, 2**53 + 1]


def test_runs_side_by_side_export_only_the_steps_each_run_holds(stores, tmp_path):
    """Runs on different step grids are outer-joined on step: no record for a step a run does not hold, the
    events of each run led by the run, and netCDF takes results read back from the store."""
    runs = sa.open_runs(list(map(str, stores)))
    for kind in ("spectra", "dynamics"):
        getattr(runs, kind)(window=3)  # computed and cached: the second call reads the store
        ds = getattr(runs, kind)(window=3)
        _reload_and_compare(ds, tmp_path / kind)
        with open(tmp_path / kind / "x.csv", newline="") as f:
            held = {(r["run"], int(r["step"])) for r in csv.DictReader(f)}
        own = {(label, int(s)) for label, run in runs.runs.items() for s in getattr(run, kind)(window=3)["step"].values}
        assert held == own
    events = json.loads((tmp_path / "dynamics" / "x.events.json").read_text())["records"]
    want = [(label, int(s), str(k)) for label, run in runs.runs.items()
            for s, k in zip(run.dynamics(window=3)["event_step"].values, run.dynamics(window=3)["event_kind"].values)]
    assert [(e["run"], e["step"], e["kind"]) for e in events] == want


def test_csv_and_report_are_utf8_whatever_the_locale(tmp_path):
    """A name outside ASCII, written under the C locale: the CSV in UTF-8 (not a UnicodeEncodeError), the page in
    the charset it declares."""
    code = (  # the page writer alone: a stand-in for the weights module keeps torch out of the child's start-up
        "import sys, types, xarray as xr; from pathlib import Path; from spectral_analyzer.exporting import export;"
        "sys.modules['spectral_analyzer.weights'] = types.SimpleNamespace(find_wq=None);"
        "from spectral_analyzer.report import _write_page;"
        "ds = xr.Dataset({'gap_ratio': (('group', 'step'), [[1.5]])}, coords={'step': [10], 'group': ['\\xfcn\\u2603']});"
        "export(ds, sys.argv[1] + '/x.csv'); _write_page(Path(sys.argv[1]) / 'r.html', ['<p>\\xfcn\\u2603</p>'])"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.csv").read_text(encoding="utf-8").splitlines()[1] == "ün☃,10,1.5"
    assert "<p>ün☃</p>" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_a_csv_cell_a_spreadsheet_would_run_is_written_after_an_apostrophe(tmp_path):
    """Tensor, group and metric names such as =HYPERLINK(...) landed as they were in the CSV exports, where a
    spreadsheet runs them; numbers, -inf among them, keep their text, and JSON keeps the names as they are."""
    from spectral_analyzer.exporting import export

    names = ['=HYPERLINK("http://x","y")', "+cmd|' /C calc'!A0", "@SUM(1)", "-x", "\tx", "plain"]
    ds = xr.Dataset({"gap_ratio": (("group", "step"), [[-np.inf]] * 5 + [[1.5]]),
                     "=m": (("group", "step"), [[1.0]] * 6)}, coords={"step": [10], "group": names})
    export(ds, tmp_path / "x.csv")
    rows = list(csv.reader((tmp_path / "x.csv").open(encoding="utf-8", newline="")))
    assert rows[0] == ["group", "step", "gap_ratio", "'=m"]
    assert [r[0] for r in rows[1:]] == ["'" + n for n in names[:-1]] + ["plain"]
    assert [r[2] for r in rows[1:]] == ["-inf"] * 5 + ["1.5"]
    export(ds, tmp_path / "x.json")
    assert [r["group"] for r in json.loads((tmp_path / "x.json").read_text())["records"]] == names


def _printed(text: str, header: str) -> list[dict[str, str]]:
    """The rows of the table whose header line starts with *header*, by column."""
    lines = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]  # columns: two spaces apart
    start = next(i for i, cells in enumerate(lines) if cells[0] == header)
    names = lines[start]
    rows = []
    for cells in lines[start + 1:]:
        if len(cells) != len(names) or not cells[0].lstrip("-").isdigit() and header == "step":
            break
        rows.append(dict(zip(names, cells)))
    return rows


def _shown(value: float) -> str:
    return "-" if math.isnan(value) else ("inf" if value == math.inf else f"{value:.4g}")


def _ratio_shown(value: float) -> str:
    """A ratio: six significant digits, and near 1 the digits that show its distance from 1."""
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        return _shown(value)
    if value != 1 and abs(value - 1) < 1e-3:
        text = f"{value:.{2 - math.floor(math.log10(abs(value - 1)))}f}"
        assert abs((float(text) - 1) / (value - 1) - 1) < 5e-3  # its distance from 1 to three digits
        return text
    digits = 6  # never fewer digits than six, unless the value is that shorter number
    while float(f"{value:.{digits}g}") != value and len(f"{value:.{digits}g}".split("e")[0].replace("-", "")
                                                         .replace(".", "").strip("0")) < digits:
        digits += 1
    return f"{value:.{digits}g}"


def _k_shown(k) -> str:
    return "-" if int(k) == 0 else str(int(k))


def test_cli_tables_print_each_value_to_four_digits_and_dash_only_where_undefined(stores, results, monkeypatch):
    """0, -0.0, inf and -inf are printed as numbers; NaN alone is '-'."""
    spectra = results["spectra"].copy(deep=True)
    spectra["gap_ratio"].values[:4] = [np.inf, np.nan, 0.0, 1234.56789]
    spectra["gap"].values[:4] = [-0.0, 0.0, -np.inf, 0.000123456]
    monkeypatch.setattr(sa.Run, "spectra", lambda self, *a, **k: spectra)
    out = CliRunner().invoke(main, ["spectra", str(stores[0]), "-w", "3"]).output
    rows = _printed(out, "step")
    assert [r["step"] for r in rows] == [str(s) for s in spectra["step"].values]
    for r, i in zip(rows, range(spectra.sizes["step"])):
        assert r["k*"] == _k_shown(spectra["k_star"].values[i])
        assert r["R"] == _ratio_shown(spectra["gap_ratio"].values[i]) and r["gap"] == _shown(spectra["gap"].values[i])
        assert [r[f"sigma_{j}"] for j in (1, 2, 3)] == [_shown(v) for v in spectra["sigma"].values[i, :3]]
    assert [rows[0]["R"], rows[1]["R"], rows[2]["R"], rows[3]["R"]] == ["inf", "-", "0", "1234.57"]
    assert [rows[0]["gap"], rows[1]["gap"], rows[2]["gap"], rows[3]["gap"]] == ["-0", "0", "-inf", "0.0001235"]
    monkeypatch.undo()

    weights = results["weights"]
    rows = _printed(CliRunner().invoke(main, ["weights", str(stores[0]), "--no-progress"]).output, "step")
    assert len(rows) == weights.sizes["step"] * weights.sizes["matrix"]
    for r in rows:
        w = weights.sel(step=int(r["step"]), matrix=r["matrix"])
        assert [r["sigma_1"], r["sigma_2"], r["g12"], r["g23"], r["stable_rank"]] == [
            _shown(float(v)) for v in (w["sigma"][0], w["sigma"][1], w["g12"], w["g23"], w["stable_rank"])]
        assert r["s1/s2"] == _ratio_shown(w["sigma_ratio_12"])

    att = results["attention"]
    rows = _printed(CliRunner().invoke(main, ["attention", str(stores[0]), "--heads", "2"]).output, "step")
    assert len(rows) == att.sizes["step"] * att.sizes["head"]
    for r in rows:
        a = att.sel(step=int(r["step"]), layer=r["layer"], head=int(r["head"]))
        assert [r["|l1|"], r["|l2|"], r["|l3|"], r["|l2|-|l3|"], r["qk_s1"], r["ov_s1"]] == [
            _shown(float(v)) for v in (*a["qk_eig_abs"][:3], a["qk_gap_23"], a["qk_sigma"][0], a["ov_sigma"][0])]
        assert r["|l1|/|l2|"] == _ratio_shown(a["qk_ratio_12"])

    dyn = results["dynamics"]
    rows = _printed(CliRunner().invoke(main, ["dynamics", str(stores[0]), "-w", "3", "--no-progress"]).output, "step")
    assert [int(r["step"]) for r in rows] == list(dyn["step"].values)
    for r, t in zip(rows, range(dyn.sizes["step"])):
        assert [r["dC"], r["A"]] == [_shown(float(dyn[v].values[t])) for v in ("dC_norm", "adiabatic")]
        assert r["R"] == _ratio_shown(dyn["gap_ratio"].values[t]) and r["k*"] == _k_shown(dyn["k_star"].values[t])
        assert [r[f"alpha_{j}"] for j in (1, 2, 3)] == [_shown(v) for v in dyn["alpha"].values[t, :3]]
        assert [r[f"rot_{j}"] for j in (1, 2, 3)] == [_shown(v) for v in dyn["rotation_tracked"].values[t, :3]]

    grok = results["grokking"]
    (row,) = _printed(CliRunner().invoke(main, ["grokking", str(stores[0]), "-w", "3"]).output, "store")
    columns = {"g23_decline": "g23_decline", "R_early": "R_early", "R_grok": "R_grok", "k*": "k_star_mode",
               "WQ s1/s2 grok": "wq_sigma_ratio_grok", "WQ s1/s2 end": "wq_sigma_ratio_end"}
    assert {c: row[c] for c in columns} == {c: (_ratio_shown if v.startswith(("R_", "wq_")) else _shown)(
        float(grok[v])) for c, v in columns.items()}
    assert row["grok_step"] == str(int(grok["grok_step"]))


def test_an_undefined_k_star_shows_as_undefined_and_ratios_near_1_keep_their_digits(stores, results, monkeypatch):
    """k* = 0 (no gap ratio in the window) printed as 0, and counted as two shifts of k*; a noise floor of
    1.000169 (p = 1e8) printed as 1, and R = 1.19996 as 1.2 beside tau = 1.2."""
    spectra = results["spectra"].copy(deep=True)
    k = np.array([1, 1, 0, 0, 1, 2, 0] + [2] * (spectra.sizes["step"] - 7))
    spectra["k_star"].values[:] = k
    spectra["gap_ratio"].values[k == 0] = np.nan
    spectra["gap_ratio"].values[0] = 1.19996
    spectra["null_q95"] = spectra["null_q95"] * 0 + 1.000169
    monkeypatch.setattr(sa.Run, "spectra", lambda self, *a, **kw: spectra)
    out = CliRunner().invoke(main, ["spectra", str(stores[0]), "-w", "3"]).output
    rows = _printed(out, "step")
    assert [r["k*"] for r in rows] == [_k_shown(v) for v in k] and rows[2]["k*"] == "-"
    assert rows[0]["R"] == "1.19996"
    assert "noise floor of R (Wishart 95% quantile, W=3): 1.000169" in out
    assert "k* changes 1 time (first at step" in out  # 1 -> 2; never through the undefined windows
    centred = CliRunner().invoke(main, ["spectra", str(stores[0]), "-w", "3", "--center"]).output
    assert "noise floor of R (Wishart 95% quantile, W-1=2, centred): 1.000169" in centred  # its null's rank


def _tables(page: str) -> dict[str, list[dict[str, str]]]:
    """Each table of the page under its heading, row by row, cells by column name (HTML unescaped)."""
    out = {}
    for title, head, body in re.findall(r"<h2>([^<]*)</h2><table><thead><tr>(.*?)</tr></thead><tbody>(.*?)</tbody>",
                                        page):
        names = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", head)]
        out[html.unescape(title)] = [dict(zip(names, map(html.unescape, re.findall(r"<td>(.*?)</td>", row))))
                                     for row in re.findall(r"<tr>(.*?)</tr>", body)]
    return out


def test_comparison_report_prints_each_run_s_grokking_summary(stores, tmp_path):
    """Every number of the comparison's grokking table, W_Q's sigma1/sigma2 at grokking among them, is the run's."""
    runs = sa.open_runs(list(map(str, stores)))
    tables = _tables(write_comparison(runs, tmp_path / "c.html", window=3).read_text(encoding="utf-8"))
    grok = runs.grokking(window=3)
    rows = tables["Grokking (test_acc)"]
    assert [r["run"] for r in rows] == list(grok["run"].values)
    columns = {"g23 decline": "g23_decline", "R_early": "R_early", "R_grok": "R_grok", "modal k*": "k_star_mode",
               "W_Q s1/s2 at grok": "wq_sigma_ratio_grok", "W_Q s1/s2 at end": "wq_sigma_ratio_end"}
    for r in rows:
        g = grok.sel(run=r["run"])
        assert r["grok step"] == (str(int(g["grok_step"])) if bool(g["grokked"]) else "-")
        assert {c: r[c] for c in columns} == {c: (_ratio_shown if v.startswith(("R_", "wq_")) else _shown)(
            float(g[v])) for c, v in columns.items()}


def test_plots_draw_the_dataset_s_values_with_gaps_where_undefined(results):
    """The gap-ratio line is the Dataset's series, its NaN stretch left undrawn (not bridged)."""
    spectra = results["spectra"].copy(deep=True)
    spectra["gap_ratio"].values[2:4] = np.nan
    ax = spectra.spectral.plot_gap_ratio(ax=Figure().subplots())
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "gap ratio R"]
    assert np.array_equal(line.get_xdata(), spectra["step"].values)
    assert np.array_equal(line.get_ydata(), spectra["gap_ratio"].values, equal_nan=True)
    assert ax.get_ylabel() == "R" and ax.get_xlabel() == "step"
