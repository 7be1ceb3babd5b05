"""Stores in object storage: an S3 server on loopback (moto), reached through s3fs.

What is particular to object storage: the writer lock's conditional create,
read-ahead, an overwrite by copy, buckets, credentials, the CLI's storage
options, cluster workers. What every backend must do alike (create, append,
rollback, overwrite, the recorder, the caches, the lock) is in
test_conformance.py, against S3 too when pytest is given --runslow.
"""

from __future__ import annotations

from itertools import count

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, write_run

import spectral_analyzer as sa
from spectral_analyzer.store import Location, Store, writer_lock
from spectral_analyzer.store.lock import WriterLock

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

_names = count()


def _url() -> str:
    return f"s3://runs/r{next(_names)}.zarr"


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_the_server_refuses_a_second_conditional_create(s3):
    """The writer lock is an object created with If-None-Match: * (lock.py); the server must refuse a second one."""
    _, fs = s3
    key = _url().removeprefix("s3://") + "/.lock"
    fs.pipe_file(key, b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(key, b"second", mode="create")
    assert fs.cat_file(key) == b"first"
    fs.rm_file(key)


def test_a_second_writer_lock_in_s3_is_refused_until_the_first_is_released(s3):
    options, fs = s3
    url = _url()
    location = Location.of(url, options)
    with writer_lock(location):
        other = WriterLock(location)  # another writer (this thread would re-enter its own lock)
        with pytest.raises(sa.StoreBusyError, match=rf"^{url}: being written by pid \d+ on host .*; --wait"):
            other.acquire(wait=False)
        assert fs.exists(url.removeprefix("s3://") + "/.lock")
    other.acquire(wait=False)
    other.release()
    assert not fs.exists(url.removeprefix("s3://") + "/.lock")


@pytest.mark.parametrize("row", [2, 13])  # read on its own, and in a block read ahead
def test_a_flipped_byte_in_s3_names_the_delta(s3, tmp_path, row):
    options, fs = s3
    write_run(tmp_path / "src", 15, {"layers.0.w": (20, 15)}, seed=1)
    url = _url()
    run = sa.ingest(tmp_path / "src", url, chunk_size=100, storage_options=options)
    key = url.removeprefix("s3://") + f"/deltas/c/{row}/1"
    data = bytearray(fs.cat_file(key))
    data[17] ^= 0x10
    fs.pipe_file(key, bytes(data))
    message = rf"chunk {row}/1 of deltas \(the delta ending at step {10 * (row + 1)}\) fails its crc32c"
    with pytest.raises(sa.StoreError, match=message):
        run.band(max_lag=2)


def test_cli_ingest_and_spectra_on_s3(s3, tmp_path):
    options, _ = s3
    url = _url()
    src = tmp_path / "src"
    write_run(src, 12, {"layers.0.w": (24, 16), "layers.1.w": (24, 16), "head": (40,)}, seed=5)
    flags = [
        "--storage-option", f"endpoint_url={options['endpoint_url']}",
        "--storage-option", "key=testing",
        "--storage-option", "secret=testing",
        "--storage-option", 'client_kwargs={"region_name": "us-east-1"}',  # VALUE as JSON
    ]
    from spectral_analyzer.cli.main import main

    runner = CliRunner()
    result = runner.invoke(main, [*flags, "ingest", str(src), "-o", url, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert url in result.output
    remote = runner.invoke(main, [*flags, "spectra", url, "--window", "10", "--no-progress"])
    assert remote.exit_code == 0, remote.output
    runner.invoke(main, ["ingest", str(src), "-o", str(tmp_path / "l.zarr"), "--no-progress"])
    local = runner.invoke(main, ["spectra", str(tmp_path / "l.zarr"), "--window", "10", "--no-progress"])
    assert remote.output.replace(url, "STORE") == local.output.replace(str(tmp_path / "l.zarr"), "STORE")
    missing = runner.invoke(main, [*flags, "info", "s3://runs/absent.zarr"])
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines() == [
        "Error: s3://runs/absent.zarr: no store here (run `spectral-analyze ingest CKPT_DIR -o s3://runs/absent.zarr` first)"
    ]


def test_band_on_cluster_workers_reading_from_s3(s3, tmp_path):
    distributed = pytest.importorskip("distributed")
    options, _ = s3
    write_run(tmp_path / "src", 20, {"layers.0.w": (40, 21), "head": (77,)}, seed=7)
    local = sa.ingest(tmp_path / "src", tmp_path / "l.zarr", chunk_size=300).band(max_lag=5).values
    url = _url()
    sa.ingest(tmp_path / "src", url, chunk_size=300, storage_options=options)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, distributed.Client(cluster) as client:
        run = sa.open_run(url, storage_options=options, client=client)
        with distributed.get_task_stream(client) as stream:
            remote = run.band(max_lag=5).values
        workers = set(cluster.scheduler_info["workers"])
    ran = {t["worker"] for t in stream.data if "_band_task" in str(t["key"])}
    assert ran and ran <= workers  # worker processes read the chunks from the bucket
    assert np.array_equal(remote, local, equal_nan=True)


def test_a_missing_bucket_is_one_line_naming_the_store(s3, tmp_path):
    options, _ = s3
    with pytest.raises(sa.StoreError, match=r"^s3://absent/r\.zarr: cannot write the store \(.*bucket does not exist\)$"):
        sa.ingest(FIXTURES / "layouts" / "hf_trainer", "s3://absent/r.zarr", storage_options=options)
    with pytest.raises(sa.StoreError, match="no store here"):
        sa.open_run("s3://absent/r.zarr", storage_options=options)


def test_an_overwrite_interrupted_mid_copy_never_leaves_a_half_store(s3, tmp_path, monkeypatch):
    """Object stores have no rename: the new store is copied into place, its commit record last."""
    options, fs = s3
    write_run(tmp_path / "a", 4, {"w": (30,)}, seed=5)
    write_run(tmp_path / "b", 6, {"w": (30,)}, seed=6)
    url = _url()
    sa.ingest(tmp_path / "a", url, chunk_size=8, storage_options=options)
    real = type(fs)._cp_file

    async def flaky(self, path1, path2, **kwargs):
        if path2.endswith("/deltas/c/3/1"):
            raise ConnectionResetError("connection reset by peer")
        return await real(self, path1, path2, **kwargs)

    monkeypatch.setattr(type(fs), "_cp_file", flaky)
    with pytest.raises(sa.StoreError, match=rf"^{url}: cannot write the store \(.*reset by peer\)$"):
        sa.ingest(tmp_path / "b", url, chunk_size=8, overwrite=True, storage_options=options)
    monkeypatch.setattr(type(fs), "_cp_file", real)
    assert not Store.exists(url, options)  # not a store that reads row 3 as zeros
    finished = sa.open_run(url + ".overwrite-partial", storage_options=options)  # the new store, complete
    assert _same_bits(finished.deltas.values, sa.ingest(tmp_path / "b", tmp_path / "b.zarr", chunk_size=8).deltas.values)


def test_a_glitch_reading_the_store_never_makes_the_recorder_start_again(s3, monkeypatch):
    options, _ = s3
    url = _url()
    model = torch.nn.Linear(4, 3)
    rec = sa.Recorder(url, model, chunk_size=8, overwrite=True, storage_options=options)
    for step in range(3):
        with torch.no_grad():
            model.weight += 1.0
        rec.record(step)
    from spectral_analyzer.store.location import Location

    real = Location.open_group
    calls = {"n": 0}

    def glitch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("Service Unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(Location, "open_group", glitch)
    with torch.no_grad():
        model.weight += 1.0
    with pytest.raises(sa.StoreError, match=rf"^{url}: cannot access the store \(ConnectionError: Service Unavailable\)$"):
        rec.record(3)
    rec.record(3)
    assert list(sa.open_run(url, storage_options=options).checkpoint_steps) == [0, 1, 2, 3]


def test_a_store_is_never_the_bucket_itself(s3):
    options, fs = s3
    fs.pipe_file("runs/keep.txt", b"unrelated")
    with pytest.raises(sa.StoreError, match=r"^s3://runs: a store needs a name inside the bucket, e.g\. s3://runs/run\.zarr$"):
        sa.ingest(FIXTURES / "layouts" / "hf_trainer", "s3://runs", storage_options=options)
    with pytest.raises(sa.StoreError, match="a store needs a name inside the bucket"):
        sa.Recorder("s3://runs/", torch.nn.Linear(2, 2), overwrite=True, storage_options=options).record(0)
    assert fs.cat_file("runs/keep.txt") == b"unrelated"


def test_analysis_with_read_only_access_computes_without_caching(s3, tmp_path, monkeypatch):
    options, _ = s3
    url = _url()
    write_run(tmp_path / "src", 12, {"layers.0.w": (24, 16), "head": (40,)}, seed=6)
    sa.ingest(tmp_path / "src", url, storage_options=options)
    want = sa.ingest(tmp_path / "src", tmp_path / "l.zarr").band(max_lag=10).values

    def denied(*args, **kwargs):
        raise PermissionError("Access Denied")

    from spectral_analyzer.store import caches

    monkeypatch.setattr(caches.BandCache, "write", denied)
    monkeypatch.setattr(caches.ResultCache, "write", denied)
    run = sa.open_run(url, storage_options=options)
    with pytest.warns(sa.CacheWarning, match="Access Denied"):
        assert np.array_equal(run.band(max_lag=10).values, want, equal_nan=True)
    with pytest.warns(sa.CacheWarning, match="Access Denied"):
        assert run.spectra(window=10).sizes["mode"] == 10
    assert run.store.band_cache.lookup(10) is None  # nothing written


def test_file_urls_are_local_stores(tmp_path):
    url = f"file://{tmp_path}/r.zarr"
    run = sa.ingest(FIXTURES / "layouts" / "hf_trainer", url)
    assert run.path == f"{tmp_path}/r.zarr"
    assert run.spectra(window=3).sizes["step"] == 1


@pytest.mark.parametrize("kind", ["safetensors", "pickle"])
def test_a_file_replaced_while_it_is_read_is_refused(s3, tmp_path, monkeypatch, kind):
    """A safetensors file replaced on S3 between its header and its tensors was read as a mix of both versions,
    the old version's ETag recorded; a pickle replaced before its download was read new and recorded old, so the
    same command run again was refused as another run. Now the row is refused, the rows before it kept."""
    from safetensors.torch import save_file

    from spectral_analyzer.ingest import readers, remote

    options, fs = s3
    paths = write_run(tmp_path / "src", 4, {"w": (40, 30), "b": (30,)}, seed=1)
    folder = f"runs/replaced-{kind}"
    for p in paths:
        if kind == "pickle":
            from safetensors.torch import load_file

            torch.save(load_file(str(p)), tmp_path / "x.pt")
            fs.pipe_file(f"{folder}/{p.stem}.pt", (tmp_path / "x.pt").read_bytes())
        else:
            fs.pipe_file(f"{folder}/{p.name}", p.read_bytes())
    victim = sorted(fs.ls(folder))[2].rsplit("/", 1)[-1]
    other = tmp_path / "other" / "x.pt"  # a pickle's archive is named after its file: the same size as the others
    other.parent.mkdir()
    state = {"w": torch.randn(40, 30), "b": torch.randn(30)}
    save_file(state, str(other)) if kind == "safetensors" else torch.save(state, other)

    def replace(name: str) -> None:
        if name == victim:
            fs.pipe_file(f"{folder}/{victim}", other.read_bytes())

    if kind == "safetensors":
        header = readers._fetch_safetensors_header
        monkeypatch.setattr(readers, "_fetch_safetensors_header", lambda f: (header(f), replace(f.name))[0])
    else:
        download = remote.FsspecFile._download
        monkeypatch.setattr(remote.FsspecFile, "_download", lambda f, path: (replace(f.name), download(f, path))[1])
    with pytest.raises(sa.CheckpointError, match=rf"s3://{folder}/{victim}: replaced while it was read \(ETag "):
        sa.ingest(f"s3://{folder}", tmp_path / "r.zarr", source_options=options, progress=False)
    monkeypatch.undo()
    run = sa.ingest(f"s3://{folder}", tmp_path / "r.zarr", source_options=options, progress=False)  # settled
    assert run.n_deltas == 3
    assert [f["ETag"] for s in run.sources for f in s["files"] if f["url"].endswith(victim)] == [
        fs.info(f"{folder}/{victim}")["ETag"]]
