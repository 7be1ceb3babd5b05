"""Checkpoint folders at fsspec URLs: memory:// and S3 (moto), read through their filesystems.

What every remote source shares (sources.py) is tested here too: tensors read by byte range, each once;
ranges kept for the next delta in memory or on local disk; pickles downloaded and deleted; retries, then one
line naming the file, with the rows committed so far kept.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, LAYOUTS, write_run
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.ingest import sources



@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(sources, "FIRST_WAIT", 0.01)


def upload(fs, local: Path, root: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{root}/{f.relative_to(local).as_posix()}", f.read_bytes())


def same_bits(a: sa.Run, b: sa.Run) -> None:
    np.testing.assert_array_equal(a.checkpoint_steps, b.checkpoint_steps)
    for name in ("deltas", "base"):
        x, y = getattr(a, name).values, getattr(b, name).values
        assert x.dtype == y.dtype == np.float32 and np.array_equal(x.view(np.uint32), y.view(np.uint32)), name
    assert list(a.tensors["tensor"].values) == list(b.tensors["tensor"].values)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_in_memory_is_bit_identical_to_the_local_folder(layout, memory, tmp_path):
    fs, root = memory
    upload(fs, FIXTURES / "layouts" / layout, root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remote = sa.ingest(f"memory://{root}", tmp_path / "r.zarr")
    # the Trainer's final save at the top holds the last checkpoint's tensors under other metadata: told
    # remotely, where no source names its bytes and it is not read to compare
    assert [str(w.message).split(": ")[0] for w in caught] == (
        [f"memory://{root}/model.safetensors"] if layout == "hf_trainer" else [])
    local = sa.ingest(FIXTURES / "layouts" / layout, tmp_path / "l.zarr")
    same_bits(remote, local)
    assert remote.provenance.get("model_config") == local.provenance.get("model_config")
    assert remote.provenance["source"] == f"memory://{root}"
    assert all(f["url"].startswith(f"memory://{root}/") for s in remote.sources for f in s["files"])


def test_an_s3_folder_is_bit_identical_to_the_local_one(s3, tmp_path):
    options, fs = s3
    write_run(tmp_path / "src", 6, {"layers.0.w": (40, 30), "layers.0.b": (30,), "head": (77,)}, seed=4)
    upload(fs, tmp_path / "src", "runs/ckpts-s3")
    run = sa.ingest("s3://runs/ckpts-s3", tmp_path / "r.zarr", chunk_size=500, source_options=options)
    same_bits(run, sa.ingest(tmp_path / "src", tmp_path / "l.zarr", chunk_size=500))
    assert all(f["ETag"] and f["url"].startswith("s3://runs/ckpts-s3/") for s in run.sources for f in s["files"])


def test_cli_reads_an_s3_folder_with_the_storage_options(s3, tmp_path):
    options, fs = s3
    write_run(tmp_path / "src", 4, {"w": (20, 10)}, seed=8)
    upload(fs, tmp_path / "src", "runs/ckpts-cli")
    from spectral_analyzer.cli.main import main

    flags = ["--storage-option", f"endpoint_url={options['endpoint_url']}", "--storage-option", "key=testing",
             "--storage-option", "secret=testing"]
    store = str(tmp_path / "cli.zarr")
    result = CliRunner().invoke(main, [*flags, "ingest", "s3://runs/ckpts-cli", "-o", store, "--no-progress"])
    assert result.exit_code == 0, result.output
    same_bits(sa.open_run(store), sa.ingest(tmp_path / "src", tmp_path / "l.zarr"))
    source_only = CliRunner().invoke(main, ["ingest", "s3://runs/ckpts-cli", "-o", str(tmp_path / "s.zarr"),
                                            "--no-progress", *[f.replace("--storage", "--source") for f in flags]])
    assert source_only.exit_code == 0, source_only.output
    absent = CliRunner().invoke(main, [*flags, "ingest", "s3://absent/ckpts", "-o", str(tmp_path / "x.zarr")])
    assert absent.exit_code == 1
    assert absent.output.strip().splitlines() == ["Error: s3://absent/ckpts: no such folder"]


def test_an_append_checks_the_remote_files_already_ingested(s3, tmp_path):
    options, fs = s3
    paths = write_run(tmp_path / "src", 5, {"w": (20, 10)}, seed=9)
    for p in paths[:3]:
        fs.pipe_file(f"runs/ckpts-append/{p.name}", p.read_bytes())
    store = tmp_path / "r.zarr"
    sa.ingest("s3://runs/ckpts-append", store, source_options=options)
    for p in paths[3:]:
        fs.pipe_file(f"runs/ckpts-append/{p.name}", p.read_bytes())
    assert list(sa.ingest("s3://runs/ckpts-append", store, source_options=options).checkpoint_steps) == [0, 10, 20, 30, 40]
    fs.pipe_file(f"runs/ckpts-append/{paths[1].name}", paths[2].read_bytes())  # step 10 replaced
    with pytest.raises(sa.StoreExistsError, match=r"the checkpoint at step 10, s3://runs/ckpts-append/step_10\."
                                                  r"safetensors, differs from the one ingested"):
        sa.ingest("s3://runs/ckpts-append", store, source_options=options)


def test_each_selected_tensor_is_read_once_and_nothing_else(memory, monkeypatch, tmp_path):
    """Byte ranges asked of the filesystem: the header, then each selected tensor once; never the optimizer
    state beside the weights, nor the excluded tensors."""
    fs, root = memory
    gen = torch.Generator().manual_seed(3)
    for step in (0, 10, 20):
        folder = tmp_path / "src" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"a.w": torch.randn(30, 20, generator=gen), "b.w": torch.randn(7, generator=gen),
                   "skip.w": torch.randn(50, generator=gen)}, str(folder / "model.safetensors"))
        torch.save({"state": torch.randn(100, generator=gen)}, folder / "optimizer.pt")
    (tmp_path / "src" / "checkpoint-0" / "config.json").write_text(
        json.dumps({"num_attention_heads": 2, "hidden_size": 20, "use_cache": True}))
    upload(fs, tmp_path / "src", root)
    asked: list[tuple[str, int, int]] = []
    real = MemoryFileSystem.cat_file

    def counting(self, path, start=None, end=None, **kwargs):
        asked.append((path, start, end))
        return real(self, path, start, end, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", counting)
    run = sa.ingest(f"memory://{root}", tmp_path / "r.zarr", exclude=["skip.*"])
    assert list(run.tensors["tensor"].values) == ["a.w", "b.w"]
    assert run.provenance["model_config"] == {"num_attention_heads": 2, "hidden_size": 20}  # as from a folder
    assert not any("optimizer" in path for path, _, _ in asked)
    for step in (0, 10, 20):
        path = f"{root}/checkpoint-{step}/model.safetensors"
        data = (tmp_path / "src" / f"checkpoint-{step}" / "model.safetensors").read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        spans = sorted((8 + n + header[k]["data_offsets"][0], 8 + n + header[k]["data_offsets"][1])
                       for k in ("a.w", "b.w"))
        assert sorted((a, b) for p, a, b in asked if p == path) == [(0, 8), (8, 8 + n), *spans]


def test_ranges_kept_on_local_disk_give_the_same_run_and_are_deleted(memory, monkeypatch, tmp_path):
    fs, root = memory
    write_run(tmp_path / "src", 5, {"w": (40, 30), "v": (9,)}, seed=2)
    upload(fs, tmp_path / "src", root)
    monkeypatch.setattr(sources, "KEEP_IN_MEMORY", 0)  # every kept range goes to the workspace
    kept: list[Path] = []
    real_keep = sources.Workspace.keep

    def watch(self, key, data):
        real_keep(self, key, data)
        kept.append(self.folder)

    monkeypatch.setattr(sources.Workspace, "keep", watch)
    same_bits(sa.ingest(f"memory://{root}", tmp_path / "r.zarr", chunk_size=300),
              sa.ingest(tmp_path / "src", tmp_path / "l.zarr", chunk_size=300))
    assert kept and not kept[0].exists()


def test_a_failing_read_is_retried_then_one_line_naming_the_file(memory, monkeypatch, tmp_path):
    fs, root = memory
    write_run(tmp_path / "src", 5, {"w": (40, 30)}, seed=6)
    upload(fs, tmp_path / "src", root)
    real = MemoryFileSystem.cat_file
    failures = {"left": 3}

    def flaky(self, path, start=None, end=None, **kwargs):
        if failures["left"] and (start or 0) > 8 and path.endswith("step_20.safetensors"):
            failures["left"] -= 1
            raise ConnectionResetError("connection reset by peer")
        return real(self, path, start, end, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", flaky)
    same_bits(sa.ingest(f"memory://{root}", tmp_path / "a.zarr"), sa.ingest(tmp_path / "src", tmp_path / "l.zarr"))
    failures["left"] = 10**6
    with pytest.raises(sa.SourceError) as caught:
        sa.ingest(f"memory://{root}", tmp_path / "b.zarr")
    assert re.fullmatch(
        rf"memory://{root}/step_20\.safetensors: reading bytes \d+\.\.\d+ still failed after {sources.ATTEMPTS} "
        r"attempts \(ConnectionResetError: connection reset by peer\); check the connection and run the same "
        r"ingest again: it resumes after the last committed checkpoint", str(caught.value)), str(caught.value)
    assert list(sa.open_run(tmp_path / "b.zarr").checkpoint_steps) == [0, 10]  # committed before it: kept
    failures["left"] = 0
    same_bits(sa.ingest(f"memory://{root}", tmp_path / "b.zarr"), sa.ingest(tmp_path / "src", tmp_path / "l2.zarr"))


def test_bad_remote_files_are_one_line_naming_the_url(memory, tmp_path):
    fs, root = memory
    paths = write_run(tmp_path / "src", 3, {"w": (20, 10)}, seed=1)
    upload(fs, tmp_path / "src", root)
    fs.pipe_file(f"{root}/step_10.safetensors", paths[1].read_bytes()[:-7])  # truncated
    with pytest.raises(sa.CheckpointError, match=rf"^memory://{root}/step_10\.safetensors: unreadable safetensors "
                                                 r"file \(the tensors end at byte \d+ of a file of \d+\)$"):
        sa.ingest(f"memory://{root}", tmp_path / "r.zarr")
    fs.pipe_file(f"{root}/step_10.safetensors", b"\xff" * 8 + b"{}")
    with pytest.raises(sa.CheckpointError, match=r"header of \d+ bytes in a file of 10\)$"):
        sa.ingest(f"memory://{root}", tmp_path / "r.zarr")
    with pytest.raises(sa.NoCheckpointsError, match=r"^memory:///absent: no such folder$"):
        sa.ingest("memory:///absent", tmp_path / "r.zarr")
    with pytest.raises(sa.StepError, match="revisions select the revisions of a hub repository"):
        sa.ingest(f"memory://{root}", tmp_path / "r.zarr", revisions="step*")
    assert not (tmp_path / "r.zarr").exists()


def test_pickles_are_downloaded_into_a_folder_deleted_afterwards(memory, monkeypatch, tmp_path):
    fs, root = memory
    upload(fs, FIXTURES / "layouts" / "plain_pt", root)
    made: list[str] = []
    real = sources.tempfile.mkdtemp
    monkeypatch.setattr(sources.tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    same_bits(sa.ingest(f"memory://{root}", tmp_path / "r.zarr"),
              sa.ingest(FIXTURES / "layouts" / "plain_pt", tmp_path / "l.zarr"))
    assert made and not any(Path(m).exists() for m in made)


def test_a_remote_pickle_whose_stored_step_contradicts_its_name_is_refused(memory, tmp_path):
    """Remote pickles after the first are opened only when their row is written: the check of the name's step
    against the stored one was skipped there (it ran for local files)."""
    fs, root = memory
    src = tmp_path / "src"
    src.mkdir()
    for step, stored in ((0, 0), (10, 10), (20, 25)):
        torch.save({"w": torch.randn(6), "step": stored}, src / f"step_{step}.pt")
    upload(fs, src, root)
    with pytest.raises(sa.StepError, match=r"step_20.pt: its name says step 20 and the file records step 25"):
        sa.ingest(f"memory://{root}", tmp_path / "r.zarr")


def test_a_file_at_another_url_is_the_same_only_by_its_content_fields(tmp_path):
    """Two objects of the same size written in the same second (LastModified has seconds) at two URLs are
    not the same file; an ETag or MD5 in common is; at its own URL the object's version fields decide."""
    from spectral_analyzer.ingest.remote import FsspecFile

    fs = MemoryFileSystem()

    def remote(path: str, **info) -> FsspecFile:
        return FsspecFile(fs, path, {"size": 40, **info}, workspace=None, parent=None)

    at_a = remote("/a/step_10.safetensors", LastModified="2026-12-03 10:00:00", ETag='"e1"').identity()
    timed = {k: v for k, v in at_a.items() if k != "ETag"}
    assert remote("/a/step_10.safetensors", LastModified="2026-12-03 10:00:00").matches(timed)
    assert not remote("/b/step_10.safetensors", LastModified="2026-12-03 10:00:00").matches(timed)
    assert remote("/b/step_10.safetensors", LastModified="2026-12-03 10:00:05", ETag='"e1"').matches(at_a)
    assert not remote("/b/step_10.safetensors", LastModified="2026-12-03 10:00:00", ETag='"e2"').matches(at_a)
    assert not remote("/b/step_10.safetensors").matches({"url": "memory:///a/step_10.safetensors", "size": 40})
    assert remote("/a/step_10.safetensors").matches({"url": "memory:///a/step_10.safetensors", "size": 40})
