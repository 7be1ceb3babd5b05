"""What the command line chose for the user without a word: the first of several matrices a --wq glob
matches, a storage option written as Python writes False, a report named .csv, a grokking of several stores
analysing the first before refusing the second, a store made inside another store."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

import spectral_analyzer as sa
from spectral_analyzer.cli import main


@pytest.fixture(scope="module")
def grok(tmp_path_factory):
    root = tmp_path_factory.mktemp("grok")
    sa.ingest(FIXTURES / "grokking" / "wd1", root / "r.zarr")
    return root / "r.zarr"


def test_a_wq_glob_matching_several_matrices_is_refused(grok):
    """'*in_proj*' took in_proj_weight[k] ([k] sorts before [q]), and the table showed W_K's ratio as W_Q's."""
    out = CliRunner().invoke(main, ["grokking", str(grok), "--wq", "*in_proj*"])
    assert out.exit_code == 1
    assert "'*in_proj*' matches 3 weight matrices (layers.0.attn.in_proj_weight[k]" in out.output
    assert CliRunner().invoke(main, ["grokking", str(grok), "--wq", "*in_proj_weight[q]", "-q"]).exit_code == 0


def test_a_grokking_of_several_stores_refuses_a_missing_metric_before_any_analysis(tmp_path):
    first, other = tmp_path / "a.zarr", tmp_path / "o.zarr"
    sa.ingest(FIXTURES / "grokking" / "wd1", first)
    sa.ingest(FIXTURES / "grokking" / "wd1", other, metrics=_csv(tmp_path))
    out = CliRunner().invoke(main, ["grokking", str(first), str(other), "--metric", "test_acc"])
    assert out.exit_code == 1 and "o.zarr: metric 'test_acc' is not logged (metrics: loss)" in out.output
    assert not (first / "gram").exists()  # the first store was not analysed: no band cached


def _csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("step,loss\n0,1.0\n")
    return path


def test_storage_options_written_as_python_writes_booleans_are_booleans():
    from cli.main import _key_values

    assert _key_values({}, ["anon=False", "use_ssl=True", "key=false-ish"], "--storage-option") == {
        "anon": False, "use_ssl": True, "key": "false-ish"}


def test_a_report_named_other_than_html_is_refused(grok, tmp_path):
    out = CliRunner().invoke(main, ["report", str(grok), "-o", str(tmp_path / "x.csv")])
    assert out.exit_code == 2 and "the report is an HTML page" in out.output
    assert not (tmp_path / "x.csv").exists()


def test_a_store_is_not_made_inside_another_store(grok, tmp_path):
    before = sorted(p.relative_to(grok) for p in grok.rglob("*"))
    with pytest.raises(sa.StoreError, match=r"is inside the Zarr store .*r\.zarr; put the store outside it"):
        sa.ingest(FIXTURES / "grokking" / "wd1", grok / "deltas" / "nested.zarr")
    assert sorted(p.relative_to(grok) for p in grok.rglob("*")) == before


def test_info_of_a_store_whose_warnings_are_no_list_is_one_line(tmp_path):
    sa.ingest(FIXTURES / "grokking" / "wd1", tmp_path / "r.zarr")
    meta = json.loads((tmp_path / "r.zarr" / "zarr.json").read_text())
    meta["attributes"]["warnings"] = "a string"
    (tmp_path / "r.zarr" / "zarr.json").write_text(json.dumps(meta))
    out = CliRunner().invoke(main, ["info", str(tmp_path / "r.zarr")])
    assert out.exit_code == 1 and "the store is damaged" in out.output and len(out.output.splitlines()) == 1
