"""The checkpoint and metrics readers never serve a silently wrong number.

Damaged zip records, shard indexes that point outside their checkpoint,
float8 and zero-size tensors, non-regular files, awkward metrics files and
steps past int64: each is read correctly or refused with a one-line error
naming the file (and tensor or column), before anything is written.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import natural, save_state, snapshot
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.ingest.discover import discover, order_by_step
from spectral_analyzer.ingest.metrics import MetricsError, find_trainer_state, read_metrics
from spectral_analyzer.ingest.readers import KeyOptions, open_checkpoint

FLOAT8 = sorted((getattr(torch, n) for n in dir(torch) if n.startswith("float8_")), key=str)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "\r" not in text
    return text


def _finishes(call, seconds: float = 10.0):
    """Run *call* in a thread: its result or exception, or a test failure if it blocks (a FIFO)."""
    out: dict = {}

    def run():
        try:
            out["value"] = call()
        except BaseException as exc:  # handed back to the test's thread
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "blocked reading a non-regular file"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _two_checkpoints(folder: Path, suffix: str, first: dict, second: dict) -> Path:
    save_state(folder / f"step_0{suffix}", first)
    save_state(folder / f"step_10{suffix}", second)
    return folder


# -- 1. zip records shorter than their storage --------------------------------


def _rewrite_zip(src: Path, dst: Path, record_suffix: str, change) -> None:
    """Copy a torch zip record by record (a valid zip), passing one record through *change*."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, kind = zin.read(info.filename), zipfile.ZIP_STORED
            if info.filename.endswith(record_suffix):
                data, kind = change(data)
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), data, compress_type=kind)


def test_short_zip_record_is_refused_naming_file_and_tensor(tmp_path):
    good = save_state(tmp_path / "good.pt", {"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(50)})
    bad = tmp_path / "bad.pt"
    _rewrite_zip(good, bad, "/data/0", lambda data: (data[:40], zipfile.ZIP_STORED))
    with pytest.raises(RuntimeError, match="record size"):  # torch itself refuses it without mmap
        torch.load(bad, weights_only=True)
    with pytest.raises(sa.CheckpointError) as exc:
        open_checkpoint([bad], str(bad), KeyOptions())
    assert str(bad) in _one_line(exc) and "'a'" in str(exc.value) and "40 bytes" in str(exc.value)


def test_compressed_zip_record_is_read_decompressed(tmp_path):
    state = {"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(50)}
    good = save_state(tmp_path / "good.pt", state)
    deflated = tmp_path / "deflated.pt"
    _rewrite_zip(good, deflated, "/data/0", lambda data: (data, zipfile.ZIP_DEFLATED))
    reader = open_checkpoint([deflated], str(deflated), KeyOptions())
    assert torch.equal(reader.read("a"), state["a"]) and torch.equal(reader.read("b"), state["b"])


# -- 2. shard indexes -----------------------------------------------------------


def _sharded(root: Path, index_name: str) -> tuple[Path, Path]:
    """checkpoint-0 and checkpoint-10, each two shards and an index; and a file outside both."""
    suffix = ".safetensors" if index_name.startswith("model.safetensors") else ".bin"
    stem = "model" if suffix == ".safetensors" else "pytorch_model"
    for step in (0, 10):
        d = root / "run" / f"checkpoint-{step}"
        weight_map = {}
        for i, name in enumerate(["a", "b"]):
            shard = f"{stem}-0000{i + 1}-of-00002{suffix}"
            save_state(d / shard, {name: torch.full((3,), float(step + i))})
            weight_map[name] = shard
        (d / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    outside = save_state(root / f"outside{suffix}", {"b": torch.full((3,), 99.0)})
    return root / "run", outside


@pytest.mark.parametrize("index_name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
@pytest.mark.parametrize("where", ["dotdot", "absolute", "sibling", "symlink"])
def test_shard_outside_checkpoint_folder_is_refused(tmp_path, index_name, where):
    run, outside = _sharded(tmp_path, index_name)
    d = run / "checkpoint-10"
    shard_b = json.loads((d / index_name).read_text())["weight_map"]["b"]
    entry = {
        "dotdot": f"../../{outside.name}",
        "absolute": str(outside),
        "sibling": f"../checkpoint-0/{shard_b}",
        "symlink": "link" + outside.suffix,
    }[where]
    if where == "symlink":
        (d / entry).symlink_to(outside)
    (d / index_name).write_text(json.dumps({"weight_map": {"a": shard_b.replace("00002-of", "00001-of"), "b": entry}}))
    with pytest.raises(sa.CheckpointError) as exc:
        discover(run)
    text = _one_line(exc)
    assert str(d / index_name) in text and repr(entry) in text and "outside the checkpoint folder" in text


@pytest.mark.parametrize(
    "index",
    [
        {"weight_map": {"a": 5}},
        {"weight_map": {"a": ["model-00001-of-00002.safetensors"]}},
        {"weight_map": {"a": None}},
        {"weight_map": {"a": ""}},
        {"weight_map": ["model-00001-of-00002.safetensors"]},
        {"weight_map": None},
        {"weight_map": "model-00001-of-00002.safetensors"},
        {"no_weight_map": {}},
        [1, 2],
        "deep",
    ],
)
def test_malformed_shard_index_is_one_line_error(tmp_path, index):
    run, _ = _sharded(tmp_path, "model.safetensors.index.json")
    path = run / "checkpoint-10" / "model.safetensors.index.json"
    path.write_text("[" * 100_000 + "]" * 100_000 if index == "deep" else json.dumps(index))
    with pytest.raises(sa.CheckpointError) as exc:
        discover(run)
    assert str(path) in _one_line(exc)


def test_shards_inside_the_folder_still_read(tmp_path):
    run, _ = _sharded(tmp_path, "model.safetensors.index.json")
    d = run / "checkpoint-10"
    (d / "sub").mkdir()
    (d / "model-00002-of-00002.safetensors").rename(d / "sub" / "b.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "./model-00001-of-00002.safetensors", "b": "sub/../sub/b.safetensors"}}
    ))
    found = discover(run)
    assert [f.name for f in found[1].files] == ["model-00001-of-00002.safetensors", "b.safetensors"]


# -- 3. float8 -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_float8_tensors_ingest_upcast(tmp_path, suffix):
    gen = torch.Generator().manual_seed(0)
    first = {f"w_{str(dt)[6:]}": torch.rand(4, 3, generator=gen).to(dt) for dt in FLOAT8}
    second = {k: (v.float() * 2).to(v.dtype) for k, v in first.items()}
    src = _two_checkpoints(tmp_path / "src", suffix, first, second)
    run = sa.ingest(src, tmp_path / "run.zarr")
    names = sorted(first, key=natural)  # the manifest's order
    assert run.tensors.tensor.values.tolist() == names
    assert run.tensors.dtype.values.tolist() == [str(first[k].dtype)[6:] for k in names]
    expected = np.concatenate([(second[k].float() - first[k].float()).reshape(-1).numpy() for k in names])
    np.testing.assert_array_equal(run.deltas.values[0], expected)
    np.testing.assert_array_equal(
        run.base.values, np.concatenate([first[k].float().reshape(-1).numpy() for k in names])
    )


def test_float8_nan_is_caught(tmp_path):
    first = {"w": torch.ones(4).to(torch.float8_e4m3fn)}
    second = {"w": torch.tensor([1.0, float("nan"), 1.0, 1.0]).to(torch.float8_e4m3fn)}
    src = _two_checkpoints(tmp_path / "src", ".safetensors", first, second)
    with pytest.raises(sa.NonFiniteError, match="'w' at step 10"):
        sa.ingest(src, tmp_path / "run.zarr")
    assert not (tmp_path / "run.zarr").exists()


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="no float4 in this torch")
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_float_that_cannot_be_upcast_is_refused_not_dropped(tmp_path, suffix):
    packed = torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = save_state(tmp_path / f"step_0{suffix}", {"w": torch.ones(3), "q": packed})
    with pytest.raises(sa.CheckpointError) as exc:
        open_checkpoint([path], str(path), KeyOptions())
    assert str(path) in _one_line(exc) and "'q'" in str(exc.value) and "exclude" in str(exc.value)
    reader = open_checkpoint([path], str(path), KeyOptions(exclude=("q",)))
    assert list(reader.tensors) == ["w"]


# -- 4. zero-size tensors ------------------------------------------------------


def test_zero_size_tensor_is_read_the_same_from_safetensors_and_pt(tmp_path):
    first = {"w": torch.arange(12.0).reshape(3, 4), "empty": torch.zeros(0, 5)}
    second = {"w": first["w"] + 1, "empty": torch.zeros(0, 5)}
    runs = {}
    for suffix in (".safetensors", ".pt"):
        src = _two_checkpoints(tmp_path / suffix.lstrip("."), suffix, first, second)
        runs[suffix] = sa.ingest(src, tmp_path / f"{suffix.lstrip('.')}.zarr")
    for run in runs.values():
        assert run.tensors.tensor.values.tolist() == ["empty", "w"]
        assert run.tensors["shape"].values.tolist() == [(0, 5), (3, 4)]
        np.testing.assert_array_equal(run.deltas.values, np.ones((1, 12), dtype=np.float32))


# -- 5. non-regular files ------------------------------------------------------


def _no_open(monkeypatch):
    """Fail instead of reading: a regression must not block on a FIFO or read /dev/zero until memory runs out."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{self} was opened")

    monkeypatch.setattr(Path, "read_text", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_metrics_file_that_is_not_regular_is_refused(tmp_path, monkeypatch, kind, suffix):
    if kind == "/dev/zero":
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero")
        path = tmp_path / f"metrics{suffix}"
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        path = tmp_path / f"metrics{suffix}"
        os.mkfifo(path)
    else:
        path = tmp_path / f"metrics{suffix}"
        path.mkdir()
    _no_open(monkeypatch)
    with pytest.raises(MetricsError) as exc:
        _finishes(lambda: read_metrics(path))
    assert str(path) in _one_line(exc) and "not a regular file" in str(exc.value)


def test_metrics_fifo_given_to_ingest_is_refused(tmp_path, monkeypatch):
    src = _two_checkpoints(tmp_path / "src", ".safetensors", {"w": torch.zeros(3)}, {"w": torch.ones(3)})
    os.mkfifo(tmp_path / "metrics.csv")
    _no_open(monkeypatch)
    with pytest.raises(MetricsError, match="metrics.csv: not a regular file"):
        _finishes(lambda: sa.ingest(src, tmp_path / "run.zarr", metrics=tmp_path / "metrics.csv"))
    assert not (tmp_path / "run.zarr").exists()


def test_trainer_state_fifo_is_refused_not_skipped(tmp_path):
    src = tmp_path / "src"
    for step in (0, 10):
        save_state(src / f"checkpoint-{step}" / "model.safetensors", {"w": torch.full((3,), float(step))})
    (src / "checkpoint-0" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 0, "loss": 1}]}))
    os.mkfifo(src / "checkpoint-10" / "trainer_state.json")
    path = find_trainer_state(src, [str(src / "checkpoint-0"), str(src / "checkpoint-10")])
    assert path == src / "checkpoint-10" / "trainer_state.json"  # the newest, not the older regular one
    with pytest.raises(MetricsError) as exc:
        _finishes(lambda: read_metrics(path))
    assert str(path) in _one_line(exc)


@pytest.mark.parametrize("layout", ["top-level file", "folder file", "shard index", "shard"])
def test_checkpoint_that_is_not_regular_is_refused_not_skipped(tmp_path, layout):
    src = tmp_path / "src"
    if layout == "top-level file":
        _two_checkpoints(src, ".pt", {"w": torch.zeros(3)}, {"w": torch.ones(3)})
        fifo = src / "step_20.pt"
    elif layout == "folder file":
        for step in (0, 10):
            save_state(src / f"checkpoint-{step}" / "model.safetensors", {"w": torch.full((3,), float(step))})
        (src / "checkpoint-20").mkdir()
        fifo = src / "checkpoint-20" / "model.safetensors"
    else:
        src, _ = _sharded(tmp_path, "model.safetensors.index.json")
        name = "model.safetensors.index.json" if layout == "shard index" else "model-00002-of-00002.safetensors"
        fifo = src / "checkpoint-10" / name
        fifo.unlink()
    os.mkfifo(fifo)
    with pytest.raises(sa.CheckpointError) as exc:
        _finishes(lambda: sa.ingest(src, tmp_path / "run.zarr"))
    assert str(fifo) in _one_line(exc) and "not a regular file (a FIFO)" in str(exc.value)
    assert not (tmp_path / "run.zarr").exists()


# -- 6. metrics parsing --------------------------------------------------------


def test_pandas_csv_index_column_is_ignored_beside_step(tmp_path):
    path = tmp_path / "metrics.csv"
    pd.DataFrame({"step": [10, 20, 30], "loss": [3.0, 2.0, 1.0]}).to_csv(path)  # header ',step,loss'
    assert path.read_text().startswith(",step,loss")
    steps, series = read_metrics(path)
    assert steps.tolist() == [10, 20, 30]
    assert list(series) == ["loss"] and series["loss"].tolist() == [3.0, 2.0, 1.0]


def test_pandas_csv_named_index_is_the_step(tmp_path):
    path = tmp_path / "metrics.csv"
    pd.DataFrame({"step": [10, 20], "loss": [3.0, 2.0]}).set_index("step").to_csv(path)
    steps, series = read_metrics(path)
    assert steps.tolist() == [10, 20] and list(series) == ["loss"]


def test_pandas_csv_index_without_step_is_refused(tmp_path):
    path = tmp_path / "metrics.csv"
    pd.DataFrame({"loss": [3.0, 2.0]}).to_csv(path)
    with pytest.raises(MetricsError) as exc:
        read_metrics(path)
    assert str(path) in _one_line(exc) and "no 'step' column" in str(exc.value) and "index=False" in str(exc.value)


@pytest.mark.parametrize(
    "header, pattern",
    [("step,,loss", "column 2 has no name"), ("step,loss,loss", "column 'loss' appears twice")],
)
def test_csv_unnamed_or_repeated_column_is_refused(tmp_path, header, pattern):
    path = tmp_path / "metrics.csv"
    path.write_text(f"{header}\n1,2,3\n")
    with pytest.raises(MetricsError, match=pattern) as exc:
        read_metrics(path)
    assert str(path) in _one_line(exc)


def test_names_that_collide_as_array_keys_round_trip_through_the_store(tmp_path):
    src = _two_checkpoints(tmp_path / "src", ".safetensors", {"w": torch.zeros(3)}, {"w": torch.ones(3)})
    names = ["train/loss", "train.loss", "zarr.json", "step.", "__meta", ".."]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, **{n: s + i for i, n in enumerate(names)}}) + "\n" for s in (0, 10)))
    run = sa.ingest(src, tmp_path / "run.zarr", metrics=path)
    m = sa.open_run(run.path).metrics
    assert sorted(m.data_vars) == sorted(names)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(m[n].values, [0 + i, 10 + i])


def test_names_unsafe_as_array_keys_are_read_as_they_are(tmp_path):
    names = ["zarr.json", ".", "..", "__meta", "eval/loss", "a\nb"]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, **{n: s + i for i, n in enumerate(names)}}) + "\n" for s in (1, 2)))
    steps, series = read_metrics(path)
    assert steps.tolist() == [1, 2] and list(series) == names
    assert series[".."].tolist() == [3.0, 4.0]


def test_empty_name_is_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "": 2}) + "\n")
    with pytest.raises(MetricsError, match="empty name") as exc:
        read_metrics(path)
    assert str(path) in _one_line(exc)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deeply_nested_json_is_refused(tmp_path, suffix):
    path = tmp_path / f"metrics{suffix}"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(MetricsError) as exc:
        read_metrics(path)
    assert str(path) in _one_line(exc)


@pytest.mark.parametrize(
    "name, text",
    [
        ("metrics.csv", "step,loss\n1,2\n9223372036854775808,3\n"),
        ("metrics.jsonl", '{"step": 1, "loss": 2}\n{"step": 99999999999999999999, "loss": 3}\n'),
        ("metrics.jsonl", '{"step": 1e20, "loss": 3}\n'),
        ("trainer_state.json", json.dumps({"global_step": 2**64, "log_history": [{"step": 2**64, "loss": 1}]})),
    ],
)
def test_metrics_step_beyond_int64_is_refused(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(MetricsError, match="does not fit a 64-bit integer") as exc:
        read_metrics(path)
    assert str(path) in _one_line(exc)


def test_metrics_steps_at_int64_edges_are_exact(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(f"step,loss\n{-(2**63)},1\n{2**63 - 1},{10**400}\n")
    steps, series = read_metrics(path)
    assert steps.tolist() == [-(2**63), 2**63 - 1]
    assert series["loss"].tolist() == [1.0, float("inf")]


# -- 7. checkpoint steps beyond int64 ------------------------------------------


def test_checkpoint_folder_step_beyond_int64_is_refused(tmp_path):
    src = tmp_path / "src"
    for step in ("0", "99999999999999999999"):
        save_state(src / f"checkpoint-{step}" / "model.safetensors", {"w": torch.zeros(3)})
    with pytest.raises(sa.StepError) as exc:
        sa.ingest(src, tmp_path / "run.zarr")
    assert "checkpoint-99999999999999999999" in _one_line(exc) and "64-bit" in str(exc.value)
    assert not (tmp_path / "run.zarr").exists()


def test_steps_given_beyond_int64_are_refused_when_ordered(tmp_path):
    src = _two_checkpoints(tmp_path / "src", ".safetensors", {"w": torch.zeros(3)}, {"w": torch.ones(3)})
    with pytest.raises(sa.StepError, match="step_10.safetensors: step 18446744073709551616 does not fit"):
        order_by_step(discover(src, steps=[0, 2**64]))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_stored_step_beyond_int64_is_refused(tmp_path, suffix):
    path = tmp_path / "src" / f"final{suffix}"
    path.parent.mkdir()
    if suffix == ".safetensors":
        save_file({"w": torch.zeros(3)}, str(path), metadata={"global_step": "99999999999999999999"})
    else:
        torch.save({"state_dict": {"w": torch.zeros(3)}, "global_step": 2**70}, path)
    with pytest.raises(sa.StepError) as exc:
        sa.ingest(path.parent, tmp_path / "run.zarr")
    assert str(path) in _one_line(exc) and "global_step" in str(exc.value)


def test_rejected_inputs_leave_an_existing_store_as_it_was(tmp_path):
    src = _two_checkpoints(tmp_path / "src", ".safetensors", {"w": torch.zeros(3)}, {"w": torch.ones(3)})
    store = tmp_path / "run.zarr"
    sa.ingest(src, store)
    before = snapshot(store)
    save_state(src / "step_20.safetensors", {"w": torch.full((3,), 2.0)})
    (tmp_path / "metrics.csv").write_text("step,loss,loss\n0,1,1\n")
    with pytest.raises(MetricsError):
        sa.ingest(src, store, metrics=tmp_path / "metrics.csv")
    assert snapshot(store) == before
