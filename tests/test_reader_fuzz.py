"""Byte-level damage to every checkpoint format: each reader refuses it or reads exactly what was saved.

A small valid checkpoint of each format (safetensors, one file and sharded
with an index; torch zip; torch's legacy pickle; Lightning ``.ckpt``;
DeepSpeed model states; a torch.distributed.checkpoint folder; safetensors
read by byte range from an fsspec URL) is damaged one way at a time: a byte
XORed with 0xFF, 0x01 or 0x80, the file cut short, bytes appended. Opening
it and reading every tensor must then either raise a one-line error of this
package naming a file of the checkpoint, or give the saved tensors.

"The saved tensors" depends on what the format can detect. Where a byte is
covered by a CRC-32 (every record of a torch zip, DCP chunks included) the
values must be bit-identical. Elsewhere a flip inside tensor data, a tensor's
name or a stored step cannot be told from a saved value, so a read that
succeeds must give the same shapes and dtypes (safetensors, whose header is
checked against the data's size), or merely not fail otherwise (torch's
legacy pickle, which has no checksum: a flipped stride reads other values).

Each case runs under a time limit, and the sweep's peak memory is bounded:
a damaged length must not make a reader allocate what it says. The default
sweep is a seeded sample (a few seconds); ``SPECTRAL_FUZZ=all`` runs every
byte, every damage and every length (minutes). Regressions found by the
sweep follow it as plain tests.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import resource
import signal
import struct
import warnings
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.ingest.dcp import dcp_files
from spectral_analyzer.ingest.readers import KeyOptions, open_checkpoint, shard_files
from spectral_analyzer.ingest.remote import FsspecFolder
from spectral_analyzer.ingest.sources import Workspace

EXHAUSTIVE = os.environ.get("SPECTRAL_FUZZ") == "all"
SAMPLES = 120  # damaged copies per file in the sampled sweep
SECONDS = 10  # per case
XORS = (0xFF, 0x01, 0x80)


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"layer.0.weight": torch.randn(5, 3, generator=gen), "layer.0.bias": torch.randn(3, generator=gen),
            "head": torch.randn(4, generator=gen).half(), "count": torch.tensor([7])}


def _dcp_save(state: dict, folder: Path) -> None:
    with warnings.catch_warnings():  # torch: "torch.distributed is disabled ... assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, no_dist=True)


def _write(fmt: str, root: Path) -> list[Path]:
    """Save the state in format *fmt* under *root*; the files to open (an index stands for its shards)."""
    root.mkdir(parents=True)
    state = _state()
    if fmt in ("safetensors", "remote"):
        save_file(state, str(root / "model.safetensors"), metadata={"step": "5"})
        return [root / "model.safetensors"]
    if fmt == "sharded":
        shards = {"model-00001-of-00002.safetensors": ["layer.0.weight", "count"],
                  "model-00002-of-00002.safetensors": ["layer.0.bias", "head"]}
        for name, keys in shards.items():
            save_file({k: state[k] for k in keys}, str(root / name))
        weight_map = {k: name for name, keys in shards.items() for k in keys}
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return [root / "model.safetensors.index.json"]
    if fmt == "zip":
        torch.save(state, root / "pytorch_model.bin")
        return [root / "pytorch_model.bin"]
    if fmt == "legacy":
        torch.save(state, root / "model.pt", _use_new_zipfile_serialization=False)
        return [root / "model.pt"]
    if fmt == "lightning":
        lightning = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "global_step": 5,
                     "pytorch-lightning_version": "2.0"}
        torch.save(lightning, root / "last.ckpt")
        return [root / "last.ckpt"]
    if fmt == "deepspeed":
        (root / "global_step5").mkdir()
        path = root / "global_step5" / "mp_rank_00_model_states.pt"
        torch.save({"module": state, "global_steps": 5, "mp_world_size": 1}, path)
        return [path]
    assert fmt == "dcp"
    _dcp_save({"model": state}, root / "dcp")
    return [root / "dcp"]


def _open(fmt: str, made: list[Path]):
    if fmt == "sharded":
        return open_checkpoint(shard_files(made[0]), "ckpt", KeyOptions())
    if fmt == "dcp":
        return open_checkpoint(list(dcp_files(made[0])), "ckpt", KeyOptions())
    if fmt == "remote":
        fs = fsspec.filesystem("memory")
        fs.pipe_file("/reader-fuzz/model.safetensors", made[0].read_bytes())
        folder = FsspecFolder(fs, "/reader-fuzz", Workspace())
        return open_checkpoint([folder.children()["model.safetensors"]], "ckpt", KeyOptions())
    return open_checkpoint(made, "ckpt", KeyOptions())


@contextmanager
def _time_limit(seconds: float):
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _read_all(fmt: str, made: list[Path]) -> tuple[dict, int | None]:
    """Each tensor's (shape, dtype, bytes) by name, and the stored step."""
    with _time_limit(SECONDS):
        reader = _open(fmt, made)
        out = {}
        for name in reader.tensors:
            t = reader.read(name).contiguous()
            out[name] = (tuple(t.shape), t.dtype, t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return out, reader.step_hint


def _data_spans(fmt: str, path: Path) -> list[tuple[int, int]]:
    """Byte spans of *path* whose flips only change values (safetensors' data section)."""
    if path.suffix != ".safetensors":
        return []
    return [(8 + int.from_bytes(path.read_bytes()[:8], "little"), path.stat().st_size)]


def _check(fmt: str, made: list[Path], path: Path, damaged: bytes, what: str, reference, spans) -> None:
    original = path.read_bytes()
    path.write_bytes(damaged)
    try:
        got = _read_all(fmt, made)
    except sa.SpectralAnalyzerError as exc:
        text = str(exc)
        assert "\n" not in text and "\r" not in text, (what, text)
        assert str(path.parent) in text or "memory://" in text, (what, text)
        return
    finally:
        path.write_bytes(original)
    if got == reference or fmt == "legacy":  # legacy pickles carry no checksum
        return
    if sorted(v for v in got[0].values()) == sorted(v for v in reference[0].values()):
        unchecked = path.suffix == ".json" or path.name == ".metadata"  # files without a CRC-32
        assert fmt not in ("zip", "lightning", "deepspeed", "dcp") or unchecked, what
        return  # a name or a stored step changed: nothing tells it from a saved one
    same_layout = {k: v[:2] for k, v in got[0].items()} == {k: v[:2] for k, v in reference[0].items()}
    assert same_layout and got[1] == reference[1], (what, {k: v[:2] for k, v in got[0].items()}, got[1])
    assert "flip@" in what and any(a <= int(what.split("@")[1].split("^")[0]) < b for a, b in spans), what


def _damages(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """(what, damaged bytes): flips at every byte and every truncation, or a seeded sample of them."""
    def flip(i, x):
        out = bytearray(data)
        out[i] ^= x
        return f"flip@{i}^{x:#x}", bytes(out)

    cases = [(i, x) for i in range(len(data)) for x in XORS]
    cuts = list(range(len(data)))
    if not EXHAUSTIVE:
        head = [(i, x) for i, x in cases if i < 96]  # headers, lengths and the first names: most often sampled
        cases = rng.sample(head, min(len(head), SAMPLES // 2)) + rng.sample(cases, min(len(cases), SAMPLES // 2))
        cuts = [0, 1, 7, 8, 9, len(data) - 1] + rng.sample(cuts, min(len(cuts), 12))
    return ([flip(i, x) for i, x in cases] + [(f"cut@{n}", data[:n]) for n in cuts]
            + [("append 1", data + b"\0"), ("append 1000", data + bytes(rng.randrange(256) for _ in range(1000)))])


FORMATS = ["safetensors", "sharded", "zip", "legacy", "lightning", "deepspeed", "dcp", "remote"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_bytes_are_refused_or_read_as_saved(tmp_path, fmt):
    made = _write(fmt, tmp_path / "ckpt")
    reference = _read_all(fmt, made)
    rng = random.Random(f"reader-fuzz-{fmt}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for path in sorted(p for p in (tmp_path / "ckpt").rglob("*") if p.is_file()):
        spans = _data_spans(fmt, path)
        for what, damaged in _damages(path.read_bytes(), rng):
            _check(fmt, made, path, damaged, f"{path.name} {what}", reference, spans)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak  # KiB
    assert grown < 256 << 10, f"peak memory grew by {grown >> 10} MiB"


# -- regressions the sweep found ------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "\r" not in text
    return text


def _replace_once(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


def test_flipped_stride_in_a_zip_pickle_is_refused(tmp_path):
    """torch reads data.pkl without checking its CRC-32: a stride of (2, 1) for (3, 1) read other values."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.arange(15.0).reshape(5, 3)}, path)
    _replace_once(path, b"K\x03K\x01\x86", b"K\x02K\x01\x86")  # BININT1 3, BININT1 1, TUPLE2: the stride
    with pytest.raises(sa.CheckpointError) as exc:
        open_checkpoint([path], "ckpt", KeyOptions())
    assert str(path) in _one_line(exc) and "data.pkl" in str(exc.value)


def test_zip_record_shifted_onto_the_next_one_is_refused(tmp_path):
    """A local header's extra-field length moved record data/0's start onto data/1's, of the same size and with
    a valid CRC-32: the tensor on data/0 read data/1's values."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.ones(2), "b": torch.full((2,), 2.0)}, path)
    with zipfile.ZipFile(path) as archive:
        first, second = (archive.getinfo(f"pytorch_model/data/{k}") for k in "01")
    data = bytearray(path.read_bytes())

    def start(info):
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
        return info.header_offset + 30 + name_len + extra_len, extra_len

    (begin, extra), (target, _) = start(first), start(second)
    data[first.header_offset + 28 : first.header_offset + 30] = struct.pack("<H", extra + target - begin)
    path.write_bytes(bytes(data))
    with pytest.raises(sa.CheckpointError, match="both start at byte") as exc:
        open_checkpoint([path], "ckpt", KeyOptions())
    assert str(path) in _one_line(exc)


def test_tensors_saved_requiring_grad_are_ingested(tmp_path):
    """``torch.save(dict(model.named_parameters()))`` (or one flipped bit in a saved requires_grad flag)."""
    (tmp_path / "run").mkdir()
    for step in range(3):
        weight = torch.nn.Parameter(torch.full((4, 3), float(step)))
        torch.save({"w": weight, "b": torch.ones(3).requires_grad_()}, tmp_path / "run" / f"step_{step}.pt")
    run = sa.ingest(tmp_path / "run", tmp_path / "r.zarr")
    assert run.deltas.shape[0] == 2


def test_legacy_pickle_naming_a_storage_it_never_loaded_is_refused(tmp_path):
    """torch raises AssertionError where a legacy file's storage key does not match its list of storages."""
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    keys_at = data.index(b"\x80\x02]")  # the pickle of the storage keys, after the state's
    key = pickle.loads(data[keys_at:])[0].encode()
    path.write_bytes(data[:keys_at] + data[keys_at:].replace(key, str(int(key) ^ 1).encode()))
    with pytest.raises(sa.CheckpointError) as exc:
        open_checkpoint([path], "ckpt", KeyOptions())
    assert str(path) in _one_line(exc)


def _dcp_folder(tmp_path: Path) -> Path:
    _dcp_save({"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}}, tmp_path / "dcp")
    return tmp_path / "dcp"


def _damage_metadata(folder: Path, change: Callable[[bytes], bytes]) -> None:
    meta = folder / ".metadata"
    meta.write_bytes(change(meta.read_bytes()))


@pytest.mark.parametrize("damage", ["frame-length", "field-name", "memory-format"])
def test_damaged_dcp_metadata_is_refused(tmp_path, damage):
    folder = _dcp_folder(tmp_path)
    data = (folder / ".metadata").read_bytes()
    if damage == "frame-length":  # protocol 4's 8-byte frame length, past what an int can hold
        assert data[2:3] == b"\x95"
        damaged = data[:3] + struct.pack("<Q", 2**63 + 5) + data[11:]
    elif damage == "field-name":
        damaged = data.replace(b"state_dict_metadata", b"state_dict_metadatb")
    else:  # the second TensorProperties' state (..., BINGET <memory format>, NEWFALSE, TUPLE) gets another memo
        found = re.search(rb"\x89h(.)\x89t", data, re.DOTALL)
        damaged = data[: found.start(1)] + bytes([found[1][0] + 1]) + data[found.end(1) :]
    _damage_metadata(folder, lambda _: damaged)
    with pytest.raises(sa.CheckpointError) as exc:
        open_checkpoint(list(dcp_files(folder)), "ckpt", KeyOptions()).read("w")
    assert str(folder / ".metadata") in _one_line(exc)


def test_dcp_metadata_frame_length_allocates_nothing(tmp_path):
    """A frame length of 64 GiB in a 1 KiB file: read from memory, the unpickler finds the file short."""
    folder = _dcp_folder(tmp_path)
    _damage_metadata(folder, lambda d: d[:3] + struct.pack("<Q", 64 << 30) + d[11:])
    with pytest.raises(sa.CheckpointError, match="truncated") as exc:
        open_checkpoint(list(dcp_files(folder)), "ckpt", KeyOptions())
    assert str(folder / ".metadata") in _one_line(exc)


def test_flipped_stride_in_a_dcp_chunk_is_refused(tmp_path):
    folder = _dcp_folder(tmp_path)
    chunk = folder / "__0_0.distcp"
    _replace_once(chunk, b"K\x03K\x01\x86", b"K\x02K\x01\x86")
    reader = open_checkpoint(list(dcp_files(folder)), "ckpt", KeyOptions())
    with pytest.raises(sa.CheckpointError, match="'model.w'") as exc:
        reader.read("w")
    assert str(chunk) in _one_line(exc)


def test_a_dcp_chunk_that_loads_other_bytes_than_its_record_is_refused(tmp_path):
    """A flip in the zip structure of a chunk (byte 1320 of this file with this torch) that Python's zipfile
    reads past, record and CRC-32 intact, while torch returns uninitialised memory for the tensor."""
    made = _write("dcp", tmp_path / "ckpt")
    reference = _read_all("dcp", made)
    chunk = made[0] / "__0_0.distcp"
    damaged = bytearray(chunk.read_bytes())
    damaged[1320] ^= 0xFF
    _check("dcp", made, chunk, bytes(damaged), "flip@1320^0xff", reference, [])


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_remote_safetensors_dtype_that_is_not_a_string_is_refused(tmp_path, dtype):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["w"]["dtype"] = dtype
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    with pytest.raises(sa.CheckpointError, match="unknown dtype") as exc:
        _open("remote", [path])
    assert "memory://" in _one_line(exc)



@pytest.mark.parametrize("metadata", [0, "", []])
def test_remote_safetensors_metadata_that_is_no_object_is_refused_as_locally(tmp_path, metadata):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = {"__metadata__": metadata, **json.loads(data[8 : 8 + n])}
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    with pytest.raises(sa.CheckpointError):
        _open("safetensors", [path])
    with pytest.raises(sa.CheckpointError, match="__metadata__ is not an object of strings") as exc:
        _open("remote", [path])
    assert "memory://" in _one_line(exc)
