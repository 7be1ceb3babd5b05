"""Attributes and metadata the numbers depend on, edited or damaged; a snapshot whose store changed layout.

Each test edits what a reader takes on trust from the store's metadata (the names of the recorded
weight matrices, the names of the logged series, the model config that says how attention matrices
are packed) or damages the metadata of the weight record, and checks that the tool gives the numbers
of a store without that trust (computed again from the rows) or a one-line error naming the damage:
never another matrix's or another series' numbers under a name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_run
from safetensors.torch import save_file

import spectral_analyzer as sa

W = 3


def _edit(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta["attributes"])
    path.write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A run with the singular values of two weights of one shape recorded at ingest, and two logged series."""
    root = tmp_path_factory.mktemp("recorded")
    write_run(root / "src", 8, {"a.weight": (6, 5), "b.weight": (6, 5), "c.bias": (7,)}, seed=4)
    (root / "m.csv").write_text("step,test_acc,lr\n" + "".join(f"{10 * i},{i / 7},{0.01 * (i + 1)}\n" for i in range(8)))
    path = root / "r.zarr"
    sa.ingest(root / "src", path, weights=["a.weight", "b.weight"], metrics=root / "m.csv", chunk_size=32)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_weight_record_whose_matrix_names_were_swapped_is_not_served(recorded, tmp_path):
    """The record's ``matrices`` attribute reordered: each column of the record is another matrix's singular
    values. They are not served under the swapped names; the matrices are rebuilt from the rows."""
    path = _copy(recorded, tmp_path / "r.zarr")
    _edit(path / "weights" / "zarr.json", lambda a: a.update(matrices=a["matrices"][::-1]))
    got = sa.open_run(path).weight_spectra(["a.weight", "b.weight"], cache=False)
    bare = _copy(recorded, tmp_path / "bare.zarr")
    shutil.rmtree(bare / "weights")
    want = sa.open_run(bare).weight_spectra(["a.weight", "b.weight"], cache=False)
    assert list(got.matrix.values) == ["a.weight", "b.weight"]
    np.testing.assert_array_equal(got.sigma.values, want.sigma.values)
    assert got.attrs["source"] == want.attrs["source"]


def test_weight_record_with_an_edited_match_is_not_served(recorded, tmp_path):
    """``match`` and ``matrices`` edited to one matrix, the record holding two columns: the first column (a's
    values) is not taken for b's; a one-line error naming the weight record."""
    path = _copy(recorded, tmp_path / "r.zarr")
    _edit(path / "weights" / "zarr.json", lambda a: a.update(match=["b.weight"], matrices=["b.weight"]))
    with pytest.raises(sa.StoreError, match="the weight record") as caught:
        sa.open_run(path).weight_spectra("b.weight", cache=False)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("target", ["weights/sigma/zarr.json", "weights/row_crc/zarr.json", "weights/zarr.json"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_weight_record_metadata_is_one_line_or_rebuilt(recorded, tmp_path, target, damage):
    """Metadata of the weight record flipped, cut short or deleted: a one-line StoreError naming the weight
    record, or the singular values rebuilt from the rows; never a traceback of Zarr's or JSON's."""
    path = _copy(recorded, tmp_path / "r.zarr")
    victim = path / target
    raw = victim.read_bytes()
    if damage == "flip":
        flipped = bytearray(raw)
        flipped[len(raw) // 3] ^= 0x10
        victim.write_bytes(bytes(flipped))
    elif damage == "truncate":
        victim.write_bytes(raw[: len(raw) // 2])
    else:
        victim.unlink()
    try:
        got = sa.open_run(path).weight_spectra(["a.weight", "b.weight"], cache=False)
    except sa.StoreError as exc:
        assert "\n" not in str(exc) and "weight record" in str(exc), str(exc)
        return
    bare = _copy(recorded, tmp_path / "bare.zarr")
    shutil.rmtree(bare / "weights")
    want = sa.open_run(bare).weight_spectra(["a.weight", "b.weight"], cache=False)
    if got.attrs["source"] == want.attrs["source"]:
        np.testing.assert_array_equal(got.sigma.values, want.sigma.values)
    else:
        np.testing.assert_array_equal(got.sigma.values, sa.open_run(recorded).weight_spectra(
            ["a.weight", "b.weight"], cache=False).sigma.values)


def test_metric_names_swapped_in_the_commit_record_are_an_error(recorded, tmp_path):
    """The metrics record's ``names`` (array key -> series name) swapped: each series would read as the other
    (the learning rate as the accuracy). A one-line error naming the metrics, not swapped series."""
    path = _copy(recorded, tmp_path / "r.zarr")

    def swap(a):
        names = a["metrics"]["names"]
        (k1, k2) = list(names)
        names[k1], names[k2] = names[k2], names[k1]

    _edit(path / "zarr.json", swap)
    with pytest.raises(sa.StoreError, match="metrics") as caught:
        sa.open_run(path).metrics
    assert "\n" not in str(caught.value)


# -- the model config says how packed attention matrices split: part of a weight result's key -------------


def _neox(tmp_path: Path, heads: int) -> Path:
    """A run with a GPT-NeoX ``query_key_value`` (q, k, v interleaved per head), and a config.json."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "num_attention_heads": heads,
                                                 "hidden_size": 8}))
    gen = torch.Generator().manual_seed(3)
    state = {"gpt_neox.layers.0.attention.query_key_value.weight": torch.randn(24, 8, generator=gen),
             "gpt_neox.layers.0.attention.dense.weight": torch.randn(8, 8, generator=gen)}
    for i in range(5):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        save_file(state, str(src / f"step_{10 * i}.safetensors"))
    path = tmp_path / "r.zarr"
    sa.ingest(src, path, chunk_size=64)
    return path


def test_weight_results_cached_under_another_model_config_are_not_served(tmp_path):
    """The head count in the kept model config decides how query_key_value splits into q, k and v; a weight
    result cached under one config is not served after the config says another."""
    path = _neox(tmp_path, heads=2)
    sa.open_run(path).weight_spectra("*query_key_value*")  # cached with 2 heads
    _edit(path / "zarr.json", lambda a: a["provenance"]["model_config"].update(num_attention_heads=4))
    run = sa.open_run(path)
    got = run.weight_spectra("*query_key_value*")
    want = run.weight_spectra("*query_key_value*", cache=False)
    np.testing.assert_array_equal(got.sigma.values, want.sigma.values)


# -- a snapshot whose store was overwritten with another chunking --------------------------------------------


def test_band_of_a_snapshot_after_an_overwrite_with_smaller_chunks_is_one_line(tmp_path):
    """A Run opened, then ``ingest --overwrite`` of the same checkpoints with smaller chunks: the open Run's
    band is a one-line StoreError saying the store changed since it was opened (not a numpy traceback)."""
    write_run(tmp_path / "src", 8, {"a.weight": (12, 9), "b.weight": (10, 7)}, seed=1)
    path = tmp_path / "r.zarr"
    sa.ingest(tmp_path / "src", path, chunk_size=64)
    old = sa.open_run(path)
    sa.ingest(tmp_path / "src", path, chunk_size=32, overwrite=True)
    with pytest.raises(sa.StoreError, match="since this store was opened") as caught:
        old.spectra(window=W)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("chunk", [64, 32])  # 32: the new store's chunk files are shorter than the old ones
def test_base_of_a_snapshot_after_an_overwrite_by_another_run_says_so(tmp_path, chunk):
    """A Run opened, then ``ingest --overwrite`` of another run of the same shape: reading the open Run's base
    (weights rebuilt, Run.base) fails in one line saying the store was overwritten, not that it is damaged
    (which would send the user to ingest again a store that is whole)."""
    sizes = {"a.weight": (12, 9), "b.weight": (10, 7)}
    write_run(tmp_path / "one", 6, sizes, seed=1)
    write_run(tmp_path / "two", 6, sizes, seed=2)
    path = tmp_path / "r.zarr"
    sa.ingest(tmp_path / "one", path, chunk_size=64)
    old = sa.open_run(path)
    sa.ingest(tmp_path / "two", path, chunk_size=chunk, overwrite=True)
    for read in (lambda: old.base.values, lambda: old.weight_spectra(cache=False)):
        with pytest.raises(sa.StoreError, match="overwritten since this store was opened") as caught:
            read()
        assert "damaged" not in str(caught.value) and "\n" not in str(caught.value)
