"""A flipped byte in a delta chunk is an error naming the row, never a silent wrong number."""

from __future__ import annotations

import pytest
from conftest import write_run

import spectral_analyzer as sa


@pytest.fixture
def corrupted(tmp_path):
    write_run(tmp_path / "src", 6, {"layers.0.w": (20, 15)}, seed=1)
    run = sa.ingest(tmp_path / "src", tmp_path / "r.zarr", chunk_size=100)
    chunk = tmp_path / "r.zarr" / "deltas" / "c" / "2" / "1"
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0x10
    chunk.write_bytes(bytes(data))
    return run


MESSAGE = r"r.zarr: chunk 2/1 of deltas \(the delta ending at step 30\) fails its crc32c check"


def test_band_build_names_the_corrupted_row(corrupted):
    with pytest.raises(sa.StoreError, match=MESSAGE):
        corrupted.band(max_lag=2)


def test_weight_reconstruction_names_the_corrupted_row(corrupted):
    with pytest.raises(sa.StoreError, match=MESSAGE):
        corrupted.weight_spectra("layers.0.w", cache=False)


def test_plain_reads_name_the_corrupted_row(corrupted):
    with pytest.raises(sa.StoreError, match=MESSAGE):
        _ = corrupted.deltas.values
    with pytest.raises(sa.StoreError, match=MESSAGE):
        _ = corrupted.delta("layers.0.w").values
