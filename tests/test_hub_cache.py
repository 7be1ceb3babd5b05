"""The local Hugging Face hub cache: revisions in step order, bit-identical to the same tensors as local files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_run, snapshot, trajectory, write_safetensors_run
from safetensors.torch import save as safetensors_bytes

import spectral_analyzer as sa
from spectral_analyzer.cli import main
from spectral_analyzer.ingest import pipeline
from spectral_analyzer.ingest.hub_cache import list_cache

REPO = "models--EleutherAI--pythia-tiny"
CONFIG = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "num_attention_heads": 2,
          "hidden_size": 8, "num_hidden_layers": 1}


def _commit(revision: str) -> str:
    return hashlib.sha1(revision.encode()).hexdigest()


class Cache:
    """Writes a repository into a hub cache the way huggingface_hub lays it out."""

    def __init__(self, root: Path):
        self.repo = root / "hub" / REPO
        for sub in ("blobs", "refs", "snapshots"):
            (self.repo / sub).mkdir(parents=True, exist_ok=True)

    def blob(self, data: bytes, lfs: bool) -> str:
        # LFS files are named by their sha256, the rest by their git blob hash
        name = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (self.repo / "blobs" / name).write_bytes(data)
        return name

    def revision(self, revision: str, files: dict[str, bytes], commit: str | None = None) -> Path:
        commit = commit or _commit(revision)
        snap = self.repo / "snapshots" / commit
        for name, data in files.items():
            link = snap / name
            link.parent.mkdir(parents=True, exist_ok=True)
            blob = self.blob(data, lfs=not name.endswith(".json"))
            if not link.exists():
                link.symlink_to(os.path.relpath(self.repo / "blobs" / blob, link.parent))
        self.ref(revision, commit)
        return snap

    def ref(self, revision: str, commit: str) -> None:
        path = self.repo / "refs" / revision
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(commit)


def _config() -> bytes:
    return json.dumps(CONFIG).encode()


def _single(state) -> dict[str, bytes]:
    return {"model.safetensors": safetensors_bytes(state), "config.json": _config()}


def _sharded(state) -> dict[str, bytes]:
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    files = {f: safetensors_bytes({k: state[k] for k in ks}) for f, ks in parts.items()}
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    return {**files, "model.safetensors.index.json": json.dumps(index).encode(), "config.json": _config()}


def _pickled(state) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save(state, buf)
    return {"pytorch_model.bin": buf.getvalue(), "config.json": _config()}


PYTHIA_STEPS = [0, 1, 2, 4, 1000, 2000, 3000]


@pytest.fixture
def pythia(tmp_path):
    """A cache of Pythia-style revisions in three formats, main on the last, a PR left out; and the reference."""
    states = trajectory(PYTHIA_STEPS, dtype=torch.float16)
    cache = Cache(tmp_path)
    layouts = [_single, _sharded, _pickled]
    for i, (step, state) in enumerate(states.items()):
        cache.revision(f"step{step}", layouts[i % 3](state))
    cache.ref("main", _commit("step3000"))
    cache.revision("refs/pr/1", _single(states[3000]), commit=_commit("pr"))
    reference = sa.ingest(write_safetensors_run(tmp_path / "ref", states), tmp_path / "ref.zarr")
    return cache, states, reference


def test_cache_ingests_every_revision_bit_identical(pythia, tmp_path):
    cache, _, reference = pythia
    run = sa.ingest(cache.repo, tmp_path / "r.zarr")
    assert_same_run(run, reference)
    sources = run.sources
    assert [s["revision"] for s in sources] == [f"step{s}" for s in PYTHIA_STEPS]
    assert [s["commit"] for s in sources] == [_commit(f"step{s}") for s in PYTHIA_STEPS]
    assert sources[-1]["aliases"] == ["main"]
    for s in sources:  # the sha256 recorded is the blob's name
        assert all(Path(os.path.realpath(f["path"])).name == f["sha256"] for f in s["files"])
    hub = run.provenance["hub_cache"]
    assert hub["repo"] == "EleutherAI/pythia-tiny" and hub["config"] == CONFIG
    assert run.provenance["model_config"] == {"num_attention_heads": 2, "hidden_size": 8, "num_hidden_layers": 1,
                                             "model_type": "gpt_neox"}
    assert hub["left_out"] == [{"revision": "refs/pr/1", "commit": _commit("pr"), "reason": "no step in the revision name"}]


def test_huggingface_hub_sees_the_same_cache(pythia):
    scan = pytest.importorskip("huggingface_hub").scan_cache_dir
    cache, _, _ = pythia
    (repo,) = scan(cache.repo.parent).repos
    refs = {ref for revision in repo.revisions for ref in revision.refs}
    assert refs == {f"step{s}" for s in PYTHIA_STEPS} | {"main", "refs/pr/1"}
    assert [c.step for c in list_cache(cache.repo).checkpoints] == PYTHIA_STEPS


def test_selection_takes_the_uniform_grid(pythia, tmp_path):
    cache, states, _ = pythia
    run = sa.ingest(cache.repo, tmp_path / "every.zarr", every=1000)
    assert list(run.checkpoint_steps) == [0, 1000, 2000, 3000]
    ref = sa.ingest(write_safetensors_run(tmp_path / "grid", {s: states[s] for s in (0, 1000, 2000, 3000)}),
                    tmp_path / "grid.zarr")
    assert_same_run(run, ref)
    assert run.provenance["options"]["select"] == "every 1000"
    run = sa.ingest(cache.repo, tmp_path / "range.zarr", select="1000..")
    assert list(run.checkpoint_steps) == [1000, 2000, 3000]


def test_cli_notes_what_it_left_out(pythia, tmp_path):
    cache, _, _ = pythia
    result = CliRunner().invoke(main, ["ingest", str(cache.repo), "-o", str(tmp_path / "c.zarr"), "--no-progress",
                                       "--select", "0,1000..3000:1000"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "3 deltas over steps 0..3000" in lines[0]
    assert lines[1:] == [f"left out revision refs/pr/1 ({_commit('pr')[:12]}): no step in the revision name"]


def test_main_alone_on_its_own_commit_is_left_out(tmp_path):
    states = trajectory([0, 10])
    cache = Cache(tmp_path)
    cache.revision("step0", _single(states[0]))
    cache.revision("main", _single(states[10]))
    cache.revision("stage1-step10-tokens4B", _single(states[10]), commit=_commit("olmo"))
    listing = list_cache(cache.repo)
    assert [(c.step, c.origin["revision"]) for c in listing.checkpoints] == [(0, "step0"), (10, "stage1-step10-tokens4B")]
    assert [n["revision"] for n in listing.left_out] == ["main"]


def test_identical_revisions_warned_before_their_tensors_are_read(tmp_path, monkeypatch):
    states = trajectory([0, 1000, 2000, 3000])
    states[2000] = states[1000]  # a suite serving the same weights under two step names
    cache = Cache(tmp_path)
    for step, state in states.items():
        cache.revision(f"step{step}", _single(state))
    events = []
    opened = pipeline.open_checkpoint

    def spy_open(files, label, keys):
        reader = opened(files, label, keys)
        read = reader.read
        reader.read = lambda name: (events.append(("read", Path(label).name)), read(name))[1]
        return reader

    class Warnings:
        @staticmethod
        def warn(message, category, stacklevel=1):
            events.append(("warn", category.__name__))

    monkeypatch.setattr(pipeline, "open_checkpoint", spy_open)
    monkeypatch.setattr(pipeline, "warnings", Warnings)
    sa.ingest(cache.repo, tmp_path / "d.zarr")
    dup = events.index(("warn", "DuplicateCheckpointWarning"))
    assert ("read", _commit("step2000")) not in events[:dup] and ("read", _commit("step2000")) in events[dup:]
    assert events.count(("warn", "DuplicateCheckpointWarning")) == 1  # not again for the all-zero delta


def test_identical_revisions_warning_names_both(tmp_path):
    states = trajectory([0, 1000, 2000, 3000])
    states[3000] = states[1000]  # not adjacent: the delta is not zero, the files are the same
    cache = Cache(tmp_path)
    for step, state in states.items():
        cache.revision(f"step{step}", _single(state))
    with pytest.warns(sa.DuplicateCheckpointWarning, match=r"steps 1000 .*revision step1000.* and 3000 .*revision "
                                                            r"step3000.* identical contents"):
        run = sa.ingest(cache.repo, tmp_path / "d.zarr")
    assert len(run.warnings) == 1


def test_steps_given_for_a_cache_are_refused(pythia, tmp_path):
    cache, _, _ = pythia
    with pytest.raises(sa.StepError, match="revision names"):
        sa.ingest(cache.repo, tmp_path / "s.zarr", steps=list(range(len(PYTHIA_STEPS))))


def test_two_commits_under_one_step_are_refused(tmp_path):
    states = trajectory([0, 10])
    cache = Cache(tmp_path)
    cache.revision("step0", _single(states[0]))
    cache.revision("step10", _single(states[10]))
    cache.revision("stage2-step10", _single(states[0]), commit=_commit("other"))
    with pytest.raises(sa.StepError, match="stage2-step10 .* and step10 .* both have step 10|step10 .* and "
                                           "stage2-step10 .* both have step 10"):
        sa.ingest(cache.repo, tmp_path / "s.zarr")


def test_nothing_stepped_is_no_checkpoints(tmp_path):
    cache = Cache(tmp_path)
    cache.revision("main", _single(trajectory([0])[0]))
    with pytest.raises(sa.NoCheckpointsError, match="no cached revision with a step.*main: no step"):
        sa.ingest(cache.repo, tmp_path / "s.zarr")


def test_interrupted_download_is_named(pythia, tmp_path):
    cache, _, _ = pythia
    snap = cache.repo / "snapshots" / _commit("step1000")  # sharded: remove one shard's blob
    os.remove(os.path.realpath(snap / "model-00002-of-00002.safetensors"))
    result = CliRunner().invoke(main, ["ingest", str(cache.repo), "-o", str(tmp_path / "x.zarr")])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {snap / 'model-00002-of-00002.safetensors'}: links to a missing blob "
        f"({os.readlink(snap / 'model-00002-of-00002.safetensors')}); the download was interrupted: "
        "download the revision again"
    ]
    assert not (tmp_path / "x.zarr").exists()


def test_damaged_blob_refused_and_store_kept(pythia, tmp_path):
    cache, states, _ = pythia
    store = tmp_path / "r.zarr"
    sa.ingest(cache.repo, store)
    before = snapshot(store)
    snap = cache.revision("step4000", _single({k: v + 1e-3 for k, v in states[3000].items()}))
    blob = Path(os.path.realpath(snap / "model.safetensors"))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # a flipped bit in the last value: still a valid file, no longer its hash
    blob.write_bytes(bytes(data))
    with pytest.raises(sa.CheckpointError, match=f"{snap / 'model.safetensors'}: its sha256 is .* hub cache blob"):
        sa.ingest(cache.repo, store)
    assert snapshot(store) == before


def test_a_revision_not_downloaded_is_a_warning_in_python_too(pythia, tmp_path):
    """A stepped revision whose snapshot is not on disk: the store jumped from 1000 to 3000 and only the command
    line said so; run.warnings and the Python API said nothing."""
    cache, _, _ = pythia
    shutil.rmtree(cache.repo / "snapshots" / _commit("step2000"))
    with pytest.warns(sa.UnreadWeightsWarning, match=r"revision step2000 \(not downloaded \(no snapshot folder\)\) "
                                                      r"left out of the run; download it"):
        run = sa.ingest(cache.repo, tmp_path / "c.zarr")
    assert 2000 not in list(run.checkpoint_steps)
