"""Chunk files written directly: the same bytes Zarr writes, read back by Zarr, all-zero chunks absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from spectral_analyzer.store import chunk_writes, chunks
from spectral_analyzer.store.crc import crc32c

C = 1000  # chunk size
P = 2 * C + 337  # two whole chunks and a short last one


def _array(root: Path, shape: tuple[int, ...]) -> zarr.Array:
    chunk = (1, C) if len(shape) == 2 else (C,)
    return zarr.create_array(zarr.storage.LocalStore(root), shape=shape, chunks=chunk, dtype="float32",
                             fill_value=0.0, compressors=[Crc32cCodec()])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "zarr.json"}


@pytest.mark.parametrize("shape", [(3, P), (P,)])
def test_the_bytes_zarr_writes_and_reads(tmp_path, shape):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(shape).astype(np.float32)
    values[..., C : 2 * C] = 0.0  # an all-zero chunk: left absent
    if len(shape) == 2:
        values[1, :C] = -0.0  # zero values whose bytes are not zero: written
    by_zarr, direct = _array(tmp_path / "zarr", shape), _array(tmp_path / "direct", shape)
    by_zarr[...] = values
    folder = chunks.direct_layout(direct)
    assert folder is not None
    rows = [(r,) for r in range(shape[0])] if len(shape) == 2 else [()]
    for row in rows:
        for j, start in enumerate(range(0, P, C)):
            data = np.ascontiguousarray(values[row][start : start + C])
            assert chunk_writes.write_direct(folder, (*row, j), data, C) == crc32c(data)
    assert _files(tmp_path / "direct") == _files(tmp_path / "zarr")
    got = zarr.open_array(zarr.storage.LocalStore(tmp_path / "direct"))[...]
    np.testing.assert_array_equal(got.view(np.uint32), values.view(np.uint32))
    assert not any(name.endswith(".partial") for name in _files(tmp_path / "direct"))


def test_a_chunk_rewritten_as_zeros_is_removed(tmp_path):
    arr = _array(tmp_path, (1, P))
    folder = chunks.direct_layout(arr)
    chunk_writes.write_direct(folder, (0, 1), np.ones(C, dtype=np.float32), C)
    assert os.path.exists(os.path.join(folder, "0", "1"))
    chunk_writes.write_direct(folder, (0, 1), np.zeros(C, dtype=np.float32), C)
    assert not os.path.exists(os.path.join(folder, "0", "1"))
    np.testing.assert_array_equal(arr[0], np.zeros(P, dtype=np.float32))


def test_a_failed_write_leaves_the_old_chunk_and_no_temporary_file(tmp_path, monkeypatch):
    arr = _array(tmp_path, (1, P))
    folder = chunks.direct_layout(arr)
    old = np.arange(C, dtype=np.float32)
    chunk_writes.write_direct(folder, (0, 0), old, C)

    def no_space(fd, views):
        os.write(fd, views[0][:100])  # part of the chunk reached the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chunk_writes, "_write_all", no_space)
    with pytest.raises(OSError, match="No space"):
        chunk_writes.write_direct(folder, (0, 0), old + 1, C)
    assert os.listdir(os.path.join(folder, "0")) == ["0"]
    np.testing.assert_array_equal(arr[0, :C], old)


def test_short_writes_are_completed(tmp_path, monkeypatch):
    """writev may write less than asked (a signal, a pipe-sized limit): the rest follows."""
    arr = _array(tmp_path, (1, P))
    folder = chunks.direct_layout(arr)
    writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, views: writev(fd, [views[0][:777]]))
    values = np.random.default_rng(1).standard_normal(P).astype(np.float32)
    for j, start in enumerate(range(0, P, C)):
        chunk_writes.write_direct(folder, (0, j), values[start : start + C], C)
    np.testing.assert_array_equal(arr[0], values)


def test_what_is_not_one_whole_float32_chunk_is_refused(tmp_path):
    from spectral_analyzer.store import Store

    src = tmp_path / "ckpts"
    src.mkdir()
    import torch
    from safetensors.torch import save_file

    for step in (0, 1):
        save_file({"w": torch.full((P,), float(step))}, str(src / f"step{step}.safetensors"))
    import spectral_analyzer as sa

    sa.ingest(src, tmp_path / "run.zarr", chunk_size=C)
    st = Store.open(tmp_path / "run.zarr")
    for bad in (np.zeros(C, dtype=np.float64), np.zeros(C - 1, dtype=np.float32), np.zeros(2 * C, dtype=np.float32)[::2]):
        with pytest.raises(ValueError, match="not one whole chunk"):
            st.write_chunk("deltas", 0, 0, bad)
    with pytest.raises(IndexError):
        st.write_chunk("deltas", 5, 0, np.zeros(C, dtype=np.float32))


def test_temporary_files_of_a_killed_write_are_removed_and_not_counted(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    import spectral_analyzer as sa
    from spectral_analyzer.store import Store, location

    src = tmp_path / "ckpts"
    src.mkdir()
    for step in (0, 1, 2):
        save_file({"w": torch.full((P,), float(step + 1))}, str(src / f"step{step}.safetensors"))
        if step == 1:
            sa.ingest(src, tmp_path / "run.zarr", chunk_size=C)
    leftovers = [tmp_path / "run.zarr" / "base" / "c" / "1.0a1b.partial",
                 tmp_path / "run.zarr" / "last_theta" / "c" / "0" / "2.0a1b.partial"]
    for f in leftovers:
        f.write_bytes(b"half a chunk")
    walk = os.walk

    def listed_then_gone(top):  # a file listed that is renamed before its size is read
        for root, dirs, files in walk(top):
            yield root, dirs, [*files, "3.vanished.partial"]

    monkeypatch.setattr(location.os, "walk", listed_then_gone)
    assert Store.open(tmp_path / "run.zarr").size_on_disk() > 0
    monkeypatch.undo()
    sa.ingest(src, tmp_path / "run.zarr", chunk_size=C)  # the next writer clears them
    assert not any(f.exists() for f in leftovers)
