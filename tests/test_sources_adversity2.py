"""Checkpoint sources given inputs that would otherwise be read as the wrong numbers, or read in part.

Each case here was ingested without a word before: remote pickled shards that disagree with their index,
hub revisions whose step is a number followed by letters, a downloaded hub file whose bytes are not the
ones listed, torch.distributed.checkpoint chunks read from one another's bytes, one rank of a
model-parallel DeepSpeed checkpoint, and shards read without their index when one of them is missing.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import trajectory
from safetensors.torch import save as safetensors_bytes

import spectral_analyzer as sa
from spectral_analyzer.ingest import dcp as dcp_reader
from spectral_analyzer.ingest import sources

pytest.importorskip("huggingface_hub")

import hub_server  # noqa: E402 -- after the skip: it needs huggingface_hub's constants
from hub_server import Blob, LoopbackHub, patch_endpoint, pickle_bytes  # noqa: E402
from test_hub_cache import Cache  # noqa: E402

from spectral_analyzer.ingest.hub import select_revisions  # noqa: E402

SHARD_1, SHARD_2 = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(sources, "FIRST_WAIT", 0.01)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with LoopbackHub() as hub:
        patch_endpoint(monkeypatch, hub.url, home)
        yield hub


def _walk(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    state = {"a": torch.randn(4, 3, generator=gen), "b": torch.randn(5, generator=gen)}
    out = []
    for _ in range(n):
        state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        out.append(state)
    return out


def _bin_shards(state: dict[str, torch.Tensor], fault: str) -> dict[str, bytes]:
    """*state* as two pickled shards with their index, which disagrees with them as *fault* says:
    "missing", the index lists a tensor no shard holds (it would be left out of the run); "moved", the
    index puts ``b`` in shard 2, shard 1 holds it."""
    if fault == "missing":
        shards, weight_map = ({"a": state["a"]}, {"b": state["b"]}), {"a": SHARD_1, "b": SHARD_2, "c": SHARD_2}
    else:
        shards, weight_map = (state, {"z": torch.zeros(1)}), {"a": SHARD_1, "b": SHARD_2, "z": SHARD_2}
    index = {"metadata": {}, "weight_map": weight_map}
    return {SHARD_1: pickle_bytes(shards[0]), SHARD_2: pickle_bytes(shards[1]),
            "pytorch_model.bin.index.json": json.dumps(index).encode()}


@pytest.mark.parametrize("where", ["memory", "hub"])
@pytest.mark.parametrize("fault, message", [
    ("missing", re.escape(f"the weight_map puts tensor 'c' in shard '{SHARD_2}', which does not hold it")),
    ("moved", re.escape(f"the weight_map puts tensor 'b' in shard '{SHARD_2}', but it is in '{SHARD_1}'")),
], ids=["missing", "moved"])
def test_remote_pickled_shards_are_checked_against_their_index(where, fault, message, memory, request, tmp_path):
    """As local shards are: the same disagreement in every checkpoint would not change its tensor set."""
    states = _walk(3)
    if where == "memory":
        fs, root = memory
        for step, state in enumerate(states):
            for name, data in _bin_shards(state, fault).items():
                fs.pipe_file(f"{root}/checkpoint-{step}/{name}", data)
        src, index = f"memory://{root}", rf"memory://{root}/checkpoint-0/pytorch_model\.bin\.index\.json"
    else:
        hub = request.getfixturevalue("hub")
        for step, state in enumerate(states):
            hub.add_revision("lab/sharded", f"step{step}", _bin_shards(state, fault))
        src, index = "hf://lab/sharded", r"hf://lab/sharded@step0/pytorch_model\.bin\.index\.json"
    with pytest.raises(sa.CheckpointError, match=rf"^{index}: {message}$"):
        sa.ingest(src, tmp_path / "r.zarr")


def test_a_revision_whose_step_is_followed_by_letters_is_refused_not_read_as_its_digits(hub, tmp_path):
    """``step1k`` was read as step 1 (its digits), so the run's steps were 1, 2, 3 for 1000, 2000, 3000."""
    for i, state in enumerate(_walk(3), 1):
        hub.add_revision("lab/k", f"step{i}k", {"model.safetensors": safetensors_bytes(state)})
    with pytest.raises(sa.StepError, match=r"^hf://lab/k@step1k: 1k in its name is a number followed by letters, "
                                           r"not a step"):
        sa.ingest("hf://lab/k", tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()
    # a revision of that kind that is not selected stands in the way of none
    available = ["step1", "step2", "step2k-experiment", "main"]
    assert select_revisions("hf://lab/k", available, "step1..step2") == [("step1", 1), ("step2", 2)]
    with pytest.raises(sa.StepError, match=r"^hf://lab/k@step2k-experiment: 2k in its name"):
        select_revisions("hf://lab/k", available, "step*")


def test_a_downloaded_plain_git_file_whose_bytes_are_not_its_blob_id_is_refused(hub, monkeypatch, tmp_path):
    """A pickle the hub serves from git (not LFS) is listed with its git blob id; bytes of the same size but
    other values (a stale proxy's) were ingested as that revision."""
    monkeypatch.setattr(hub_server, "LFS_SUFFIXES", (".safetensors",))  # pytorch_model.bin: a plain git file
    states = _walk(3)
    for step, state in enumerate(states):
        hub.add_revision("lab/plain", f"step{step}", {"pytorch_model.bin": pickle_bytes(state)})
    revision = hub.repos["lab/plain"]["step1"]
    listed = revision.files["pytorch_model.bin"]
    other = pickle_bytes({k: v + 1 for k, v in states[1].items()})
    assert len(other) == listed.size
    revision.files["pytorch_model.bin"] = Blob(data=other, size=listed.size, sha256=listed.sha256,
                                               blob_id=listed.blob_id)
    store = tmp_path / "r.zarr"
    with pytest.raises(sa.SourceError, match=r"^hf://lab/plain@step1/pytorch_model\.bin: downloading still failed "
                                             rf".*git blob id [0-9a-f]{{40}}, not the {listed.blob_id} listed"):
        sa.ingest("hf://lab/plain", store)
    assert not store.exists() or 1 not in sa.open_run(store).checkpoint_steps


def _dcp_two_chunks_one_span(folder: Path, step: int) -> None:
    """Tensor ``a`` of shape (4, 2) in two chunks of two rows, the second chunk's location the first's bytes."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    rows = torch.arange(8.0).reshape(4, 2) + step
    with warnings.catch_warnings():  # torch: "torch.distributed is disabled ... assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save({"model": {"a": rows[:2].clone(), "b": rows[2:].clone()}}, checkpoint_id=folder, no_dist=True)
    meta = folder / ".metadata"
    md = dcp_reader.load_metadata(meta)
    entry = md.state_dict_metadata["model.a"]
    entry.size = torch.Size([4, 2])
    entry.chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 2])),
                    ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 2]))]
    first = next(k for k in md.storage_data if k.fqn == "model.a")
    md.storage_data[MetadataIndex("model.a", torch.Size([2, 0]))] = md.storage_data[first]
    del md.state_dict_metadata["model.b"]
    for key in [k for k in md.storage_data if k.fqn == "model.b"]:
        del md.storage_data[key]
    meta.write_bytes(pickle.dumps(md))


def test_dcp_chunks_read_from_the_same_bytes_are_refused(tmp_path):
    """Rows 2-3 of ``a`` were read from rows 0-1's bytes: a tensor of two copies of its first half."""
    for step in (0, 10):
        _dcp_two_chunks_one_span(tmp_path / "run" / f"checkpoint-{step}", step)
    file = tmp_path / "run" / "checkpoint-0" / "__0_0.distcp"
    with pytest.raises(sa.CheckpointError, match=rf"^{file}: the chunk of tensor 'model.a' at \(0, 0\) and that of "
                                                 r"'model.a' at \(2, 0\) share bytes \d+\.\.\d+; the checkpoint's "
                                                 r"\.metadata is damaged$"):
        sa.ingest(tmp_path / "run", tmp_path / "r.zarr")


def _deepspeed_states(state: dict, step: int, mp_world_size: int) -> dict:
    return {"module": state, "param_shapes": [{k: v.shape for k, v in state.items()}], "global_steps": step,
            "dp_world_size": 1, "mp_world_size": mp_world_size, "ds_version": "0.16.4"}


@pytest.mark.parametrize("case, message", [
    ("one rank of two", r"global_step100/mp_rank_00_model_states\.pt: a model-parallel DeepSpeed checkpoint "
                        r"\(mp_world_size 2, one mp_rank file\)"),
    ("rank 01 alone", r"global_step100/mp_rank_01_model_states\.pt: a model-parallel DeepSpeed checkpoint "
                      r"\(mp_rank_00 is missing\)"),
], ids=["one rank of two", "rank 01 alone"])
def test_one_rank_of_a_model_parallel_deepspeed_checkpoint_is_refused(case, message, tmp_path):
    """Each rank holds a slice of every tensor under the full names: one rank's file, read as the model,
    gave a run of consistent shapes and the wrong numbers."""
    states = trajectory([100, 200])
    for step, state in states.items():
        tag = tmp_path / "ds" / f"global_step{step}"
        tag.mkdir(parents=True)
        half = {k: v[: max(1, v.shape[0] // 2)].clone() for k, v in state.items()}
        rank = "01" if case == "rank 01 alone" else "00"
        torch.save(_deepspeed_states(half, step, 2), tag / f"mp_rank_{rank}_model_states.pt")
    with pytest.raises(sa.CheckpointError, match=message):
        sa.ingest(tmp_path / "ds", tmp_path / "r.zarr")
    assert not (tmp_path / "r.zarr").exists()


def test_a_cached_revision_with_a_shard_missing_and_no_index_is_refused(tmp_path):
    """A download cut short leaves shard 1 linked in the snapshot but neither shard 2 nor the index: the
    revision was read as the model without shard 2's tensors (every revision alike: no tensor-set change)."""
    cache = Cache(tmp_path)
    for step, state in enumerate(_walk(3)):
        shard = "model-00001-of-00002.safetensors"
        snap = cache.revision(f"step{step}", {shard: safetensors_bytes({"a": state["a"]})})
    with pytest.raises(sa.CheckpointError, match=r"snapshots/[0-9a-f]{40}: holds shards of model\.safetensors but "
                                                 r"not model-00002-of-00002\.safetensors, and no index"):
        sa.ingest(cache.repo, tmp_path / "r.zarr")
    assert snap.is_dir()
    # a local checkpoint folder alike
    run = tmp_path / "run" / "checkpoint-5"
    run.mkdir(parents=True)
    (run / "pytorch_model-00002-of-00003.bin").write_bytes(pickle_bytes({"b": torch.ones(2)}))
    with pytest.raises(sa.CheckpointError, match=rf"^{run}: holds shards of pytorch_model\.bin but not "
                                                 r"pytorch_model-00001-of-00003\.bin"):
        sa.ingest(tmp_path / "run", tmp_path / "l.zarr")


@pytest.mark.parametrize("where", ["memory", "s3"])
def test_identical_checkpoints_apart_are_told_from_remote_sources(where, memory, request, tmp_path):
    """step_20 holding step_0's bytes: told from a local folder (sha256), not from memory:// (no content key:
    now by the values read) nor from S3 (its content ETag now names the bytes)."""
    import shutil

    from conftest import write_run

    paths = write_run(tmp_path / "src", 4, {"w": (40, 30)}, seed=1)
    shutil.copyfile(paths[0], paths[2])
    if where == "memory":
        fs, root = memory
        options, src = None, f"memory://{root}"
        for p in paths:
            fs.pipe_file(f"{root}/{p.name}", p.read_bytes())
    else:
        options, fs = request.getfixturevalue("s3")
        src = "s3://runs/duplicates"
        for p in paths:
            fs.pipe_file(f"runs/duplicates/{p.name}", p.read_bytes())
    with pytest.warns(sa.DuplicateCheckpointWarning, match=r"steps 0 \(.*step_0\.safetensors\) and 20 \(.*step_20"
                                                           r"\.safetensors\) have identical contents"):
        run = sa.ingest(src, tmp_path / "r.zarr", source_options=options, progress=False)
    assert run.n_deltas == 3
