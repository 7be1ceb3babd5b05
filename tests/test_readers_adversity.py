"""Checkpoints that are well-formed files but mislead a reader.

Tied weights under a selection, DCP folders saved without planner data,
shard indexes that disagree with their shards, sparse and meta tensors,
torch zips whose bytes no longer match their CRC-32, and names that carry
control characters: each is read correctly or refused with a one-line
error naming the file and the tensor, escaped, before a number is written.
"""

from __future__ import annotations

import json
import struct
import warnings
import zipfile
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import save_state, snapshot
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import spectral_analyzer as sa
from spectral_analyzer.ingest.dcp import dcp_files, load_metadata
from spectral_analyzer.ingest.readers import KeyOptions, open_checkpoint


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    return text


# -- 1. tied weights and the selection ------------------------------------------


def _tied(path: Path) -> dict[str, torch.Tensor]:
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    state = {"embed.weight": emb, "layer.weight": torch.ones(4, 4), "lm_head.weight": emb}
    torch.save(state, path)
    return state


@pytest.mark.parametrize(
    "keys",
    [KeyOptions(exclude=("embed*",)), KeyOptions(include=("lm_head*", "layer*"))],
    ids=["exclude", "include"],
)
def test_tied_tensor_kept_when_its_twin_is_not_selected(tmp_path, keys):
    state = _tied(tmp_path / "step_1.pt")
    reader = open_checkpoint([tmp_path / "step_1.pt"], "step_1", keys)
    assert sorted(reader.tensors) == ["layer.weight", "lm_head.weight"]
    assert torch.equal(reader.read("lm_head.weight"), state["lm_head.weight"])


def test_tied_tensors_both_selected_keep_the_first_name(tmp_path):
    _tied(tmp_path / "step_1.pt")
    reader = open_checkpoint([tmp_path / "step_1.pt"], "step_1", KeyOptions())
    assert sorted(reader.tensors) == ["embed.weight", "layer.weight"]


# -- 2. DCP without planner data --------------------------------------------------


def _dcp_flat(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    with warnings.catch_warnings():  # torch: "torch.distributed is disabled ... assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save(dict(state), checkpoint_id=folder, no_dist=True, planner=DefaultSavePlanner(flatten_state_dict=False))
    return folder


def test_dcp_hf_names_without_planner_data_are_kept_whole(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(4, 2, generator=gen), "model.norm.weight": torch.randn(2),
             "lm_head.weight": torch.randn(4, 2, generator=gen)}
    folder = _dcp_flat(tmp_path / "step-1", state)
    reader = open_checkpoint(dcp_files(folder), str(folder), KeyOptions())
    assert sorted(reader.tensors) == sorted(state)
    for name, value in state.items():
        assert torch.equal(reader.read(name), value)


def test_dcp_model_prefix_on_every_weight_without_planner_data_is_a_container(tmp_path):
    state = {"model.a.weight": torch.randn(3), "model.b.weight": torch.randn(2), "optimizer.lr": torch.tensor(0.1)}
    folder = _dcp_flat(tmp_path / "step-1", state)
    reader = open_checkpoint(dcp_files(folder), str(folder), KeyOptions())
    assert sorted(reader.tensors) == ["a.weight", "b.weight"]
    assert torch.equal(reader.read("a.weight"), state["model.a.weight"])


# -- 3. shard indexes against their shards ---------------------------------------------

_SHARDED = {"s1": ["a.weight"], "s2": ["b.weight", "c.weight"]}
_INDEXES = {".safetensors": "model.safetensors.index.json", ".bin": "pytorch_model.bin.index.json"}


def _sharded_run(root: Path, suffix: str, shards: dict[str, list[str]], weight_map: dict[str, str]) -> Path:
    """Two checkpoints whose shards hold *shards* and whose index says *weight_map* (names without suffix)."""
    for step in (100, 200):
        d = root / f"checkpoint-{step}"
        gen = torch.Generator().manual_seed(step)
        state = {k: torch.randn(4, generator=gen) for k in ("a.weight", "b.weight", "c.weight")}
        for shard, names in shards.items():
            save_state(d / f"{shard}{suffix}", {n: state[n] for n in names})
        index = {"metadata": {}, "weight_map": {k: f"{v}{suffix}" for k, v in weight_map.items()}}
        (d / _INDEXES[suffix]).write_text(json.dumps(index))
    return root


_MISMATCHES = {
    # index lists c.weight in s2, which does not hold it: c.weight would be silently missing
    "listed_not_saved": ({"s1": ["a.weight"], "s2": ["b.weight"]},
                         {"a.weight": "s1", "b.weight": "s2", "c.weight": "s2"},
                         ["'c.weight'", "'s2", "does not hold it"]),
    # s1 holds c.weight, which the index does not list: it would be ingested on no one's word
    "saved_not_listed": ({"s1": ["a.weight", "c.weight"], "s2": ["b.weight"]},
                         {"a.weight": "s1", "b.weight": "s2"},
                         ["'c.weight'", "'s1", "does not list"]),
    "wrong_shard": ({"s1": ["a.weight", "c.weight"], "s2": ["b.weight"]},
                    {"a.weight": "s2", "b.weight": "s2", "c.weight": "s1"},
                    ["'a.weight'", "'s1", "'s2"]),
    "in_two_shards": ({"s1": ["a.weight", "b.weight"], "s2": ["b.weight", "c.weight"]},
                      {"a.weight": "s1", "b.weight": "s2", "c.weight": "s2"},
                      ["'b.weight'", "two shards", "'s1", "'s2"]),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("case", list(_MISMATCHES))
def test_index_disagreeing_with_its_shards_is_refused(tmp_path, suffix, case):
    shards, weight_map, expected = _MISMATCHES[case]
    src = _sharded_run(tmp_path / "ckpts", suffix, shards, weight_map)
    with pytest.raises(sa.CheckpointError) as exc:
        sa.ingest(src, tmp_path / "run.zarr")
    text = _one_line(exc)
    assert str(src / "checkpoint-100" / _INDEXES[suffix]) in text
    assert all(part in text for part in expected), text
    assert "stripping prefixes" not in text
    assert not (tmp_path / "run.zarr").exists()


def test_index_agreeing_with_its_shards_is_read(tmp_path):
    src = _sharded_run(tmp_path / "ckpts", ".safetensors", _SHARDED,
                       {"a.weight": "s1", "b.weight": "s2", "c.weight": "./s2"})
    run = sa.ingest(src, tmp_path / "run.zarr")
    assert list(run.tensors["tensor"].values) == ["a.weight", "b.weight", "c.weight"]


@pytest.mark.parametrize("case", ["listed_not_saved", "saved_not_listed", "wrong_shard"])
def test_remote_index_disagreeing_with_its_shards_is_refused(tmp_path, case):
    shards, weight_map, expected = _MISMATCHES[case]
    src = _sharded_run(tmp_path / "ckpts", ".safetensors", shards, weight_map)
    fs = fsspec.filesystem("memory")
    root = f"/readers-adversity-{case}"
    for f in sorted(src.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{root}/{f.relative_to(src).as_posix()}", f.read_bytes())
    try:
        with pytest.raises(sa.CheckpointError) as exc:
            sa.ingest(f"memory://{root}", tmp_path / "run.zarr")
    finally:
        fs.rm(root, recursive=True)
    text = _one_line(exc)
    assert "model.safetensors.index.json" in text and all(part in text for part in expected), text


def test_tensor_in_two_unindexed_files_names_both(tmp_path):
    d = tmp_path / "ckpts" / "checkpoint-1"
    first = save_state(d / "part-a.safetensors", {"w": torch.ones(3)})
    second = save_state(d / "part-b.safetensors", {"w": torch.zeros(3)})
    with pytest.raises(sa.CheckpointError) as exc:
        open_checkpoint([first, second], str(d), KeyOptions())
    text = _one_line(exc)
    assert str(first) in text and str(second) in text and "'w'" in text and "stripping prefixes" not in text


# -- 4. sparse and meta tensors ---------------------------------------------------------

def _quietly(make):
    with warnings.catch_warnings():  # torch: "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        return make()


_NOT_DENSE = {
    "sparse_coo": (lambda: torch.eye(3).to_sparse(), "sparse_coo"),
    "sparse_csr": (lambda: _quietly(torch.eye(3).to_sparse_csr), "sparse_csr"),
    "meta": (lambda: torch.empty(3, device="meta"), "meta device"),
}


@pytest.mark.parametrize("kind", list(_NOT_DENSE))
def test_tensor_without_dense_values_is_refused(tmp_path, kind):
    make, words = _NOT_DENSE[kind]
    src = tmp_path / "ckpts"
    for step in (1, 2):
        save_state(src / f"step_{step}.pt", {"w": torch.randn(4), "odd\x1b[31m": make()})
    with pytest.raises(sa.CheckpointError) as exc:
        sa.ingest(src, tmp_path / "run.zarr")
    text = _one_line(exc)
    assert str(src / "step_1.pt") in text and repr("odd\x1b[31m") in text and words in text
    assert not (tmp_path / "run.zarr").exists()


@pytest.mark.parametrize("kind", list(_NOT_DENSE))
def test_tensor_without_dense_values_can_be_left_out(tmp_path, kind):
    make, _ = _NOT_DENSE[kind]
    path = save_state(tmp_path / "step_1.pt", {"w": torch.arange(4.0), "odd": make()})
    reader = open_checkpoint([path], str(path), KeyOptions(exclude=("odd",)))
    assert list(reader.tensors) == ["w"] and torch.equal(reader.read("w"), torch.arange(4.0))


# -- 5. torch zips whose bytes no longer match their CRC-32 ---------------------------


def _data_start(path: Path, record_suffix: str) -> tuple[zipfile.ZipInfo, int]:
    """A record of a zip and the offset of its first data byte in the file."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    blob = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
    return info, info.header_offset + 30 + name_len + extra_len


def _flip(path: Path, record_suffix: str, at: int = 4) -> str:
    """Flip one bit in the data of a record, as a bad disk or transfer would; the record's name."""
    info, start = _data_start(path, record_suffix)
    blob = bytearray(path.read_bytes())
    blob[start + at] ^= 0x40
    path.write_bytes(bytes(blob))
    return info.filename


def test_flipped_bit_in_a_tensor_is_refused_on_read(tmp_path):
    path = save_state(tmp_path / "step_1.pt", {"a": torch.arange(8, dtype=torch.float32), "b": torch.ones(5)})
    record = _flip(path, "/data/0")
    reader = open_checkpoint([path], str(path), KeyOptions())  # the header alone reads no tensor bytes
    assert torch.equal(reader.read("b"), torch.ones(5))
    with pytest.raises(sa.CheckpointError) as exc:
        reader.read("a")
    text = _one_line(exc)
    assert str(path) in text and "'a'" in text and repr(record) in text and "CRC-32" in text


def test_flipped_bit_in_a_later_checkpoint_leaves_the_store_as_it_was(tmp_path):
    src = tmp_path / "ckpts"
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        save_state(src / f"step_{step}.pt", {"w": torch.randn(64, generator=gen), "v": torch.randn(8, generator=gen)})
    store = tmp_path / "run.zarr"
    sa.ingest(src, store)
    before = snapshot(store)
    save_state(src / "step_4.pt", {"w": torch.randn(64, generator=gen), "v": torch.randn(8, generator=gen)})
    _flip(src / "step_4.pt", "/data/0", at=40)
    with pytest.raises(sa.CheckpointError) as exc:
        sa.ingest(src, store)
    assert str(src / "step_4.pt") in _one_line(exc)
    assert snapshot(store) == before


def test_flipped_bit_in_a_compressed_record_is_refused(tmp_path):
    state = {"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(50)}
    good = save_state(tmp_path / "good.pt", state)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(deflated, "w") as zout:
        for info in zin.infolist():
            kind = zipfile.ZIP_DEFLATED if info.filename.endswith("/data/0") else zipfile.ZIP_STORED
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), zin.read(info.filename),
                          compress_type=kind)
    record = _flip(deflated, "/data/1", at=8)  # a stored record beside the compressed one
    with pytest.raises(sa.CheckpointError) as exc:
        open_checkpoint([deflated], str(deflated), KeyOptions())
    text = _one_line(exc)
    assert str(deflated) in text and repr(record) in text


# -- 6. names in messages ----------------------------------------------------------------


def test_names_from_files_are_escaped_in_index_messages(tmp_path):
    name = "evil\x1b[2J\rname"
    d = tmp_path / "ckpts" / "checkpoint-1"
    save_state(d / "s1.safetensors", {"a": torch.ones(2), name: torch.ones(2)})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    with pytest.raises(sa.CheckpointError) as exc:
        sa.ingest(tmp_path / "ckpts", tmp_path / "run.zarr", steps=[1])
    assert repr(name) in _one_line(exc)


def test_class_names_from_dcp_metadata_are_escaped(tmp_path):
    def short(text: str) -> bytes:
        data = text.encode()
        return b"\x8c" + bytes([len(data)]) + data

    meta = tmp_path / ".metadata"
    meta.write_bytes(b"\x80\x04" + short("evil\x1b[2J") + short("run\rthis") + b"\x93.")
    with pytest.raises(sa.UnsafeCheckpointError) as exc:
        load_metadata(meta)
    text = _one_line(exc)
    assert str(meta) in text and "evil\\x1b[2J.run\\rthis" in text


def test_recorder_keeps_a_tied_tensor_whose_twin_is_not_selected(tmp_path):
    """The recorder de-duplicates tied weights among the selected names too."""
    import spectral_analyzer as sa

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(6, 4)
            self.layer = torch.nn.Linear(4, 4, bias=False)
            self.lm_head = torch.nn.Linear(4, 6, bias=False)
            self.lm_head.weight = self.embed.weight

    rec = sa.Recorder(tmp_path / "r.zarr", Tied(), exclude=("embed*",))
    rec.record(0)
    assert [t for t in sa.open_run(tmp_path / "r.zarr").tensors["tensor"].values] == ["layer.weight", "lm_head.weight"]


# -- views that share values, tensors of no dense layout, quantised weights --------


def _views_run(tmp_path: Path, make) -> Path:
    src = tmp_path / "run"
    src.mkdir()
    for step in (0, 1):
        torch.save(make(torch.randn(6, 4, generator=torch.Generator().manual_seed(step))), src / f"step_{step}.pt")
    return src


@pytest.mark.parametrize("make", [
    lambda p: {"in_proj_weight": p, "q": p[0:2], "k": p[2:4], "v": p[4:6]},  # a packed parameter and its slices
    lambda p: {"w": p, "w_t": p.t()},  # a weight beside its transpose
    lambda p: {"w": p, "flat": p.view(24)[3:9]},
    lambda p: {"even": p[:, ::2], "cols": p[:, 1:3]},  # interleaved views sharing column 2
])
def test_views_that_share_values_are_refused(tmp_path, make):
    """A packed parameter saved beside its slices was counted twice (24 values of one 6 x 4 storage read as 48)."""
    src = _views_run(tmp_path, make)
    with pytest.raises(sa.CheckpointError, match=r"step_0\.pt: tensors '\w+' and '\w+' are views of the same "
                                                 r"values .* which would be counted twice") as exc:
        sa.ingest(src, tmp_path / "r.zarr")
    _one_line(exc)
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("make, n", [
    (lambda p: {"even": p[:, ::2], "odd": p[:, 1::2]}, 24),  # interleaved columns: disjoint
    (lambda p: {"a": p.view(24)[:10], "b": p.view(24)[10:]}, 24),  # FSDP's flat parameter
    (lambda p: {"w": p, "tied": p}, 24),  # tied: one parameter
])
def test_disjoint_views_of_one_storage_are_read_once_each(tmp_path, make, n):
    src = _views_run(tmp_path, make)
    run = sa.ingest(src, tmp_path / "r.zarr")
    assert int(run.tensors.size.sum()) == n
    d = (torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
         - torch.randn(6, 4, generator=torch.Generator().manual_seed(0))).double()
    assert float(run.band(max_lag=1).sum("tensor").values[0, 0]) == pytest.approx(float(d.square().sum()), rel=1e-6)


def test_a_nested_tensor_is_refused_in_one_line(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    for step in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the prototype API's notice
            nested = torch.nested.nested_tensor([torch.ones(2) * step, torch.ones(3)])
        torch.save({"w": nested, "b": torch.ones(2) * step}, src / f"step_{step}.pt")
    with pytest.raises(sa.CheckpointError, match=r"step_0\.pt: tensor 'w' is a nested tensor; save its values as a "
                                                 "dense tensor") as exc:
        sa.ingest(src, tmp_path / "r.zarr")
    _one_line(exc)


@pytest.mark.parametrize("weight, kind", [
    (lambda: {"fc.weight": torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8)}, "qint8"),
    (lambda: {"fc.weight_packed": torch.zeros(4, 1, dtype=torch.int32),  # compressed-tensors' packing
              "fc.weight_shape": torch.tensor([4, 4])}, "int32"),
    (lambda: {"fc.weight": torch.zeros(4, 4, dtype=torch.int16)}, "int16"),
    (lambda: {"layer.W_q": torch.zeros(4, 4, dtype=torch.uint8)}, "uint8"),  # HQQ
])
@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning")  # torch.load of a quantised tensor
def test_weights_of_any_integer_dtype_are_told(tmp_path, weight, kind):
    """A qint8 weight, compressed-tensors' int32 weight_packed and an int16 weight went unread in silence, the
    run made of the float scales beside them."""
    src = tmp_path / "run"
    src.mkdir()
    for step in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's deprecation of quantised tensors
            state = weight()
        torch.save({**state, "fc.weight_scale": torch.ones(4) * (step + 1)}, src / f"step_{step}.pt")
    with pytest.warns(sa.UnreadWeightsWarning, match=rf"step_0\.pt: tensor '[\w.]+' \({kind}\).* not read"):
        sa.ingest(src, tmp_path / "r.zarr")


def test_a_refused_pickle_names_the_class_it_holds(tmp_path):
    import fractions

    src = tmp_path / "run"
    src.mkdir()
    for step in (0, 1):
        torch.save({"w": torch.ones(2) * step, "meta": fractions.Fraction(1, 3)}, src / f"step_{step}.pt")
    with pytest.raises(sa.UnsafeCheckpointError, match=r"step_0\.pt: refused to unpickle: "
                                                       r"torch.load\(weights_only=True\) found a fractions\.Fraction, "
                                                       "not only tensors") as exc:
        sa.ingest(src, tmp_path / "r.zarr")
    assert "weights_only=False" not in _one_line(exc)
