"""Hub revisions (``hf://org/name``) from a hub on loopback (tests/hub_server.py), read through huggingface_hub.

Nothing of huggingface_hub is replaced: its HfApi lists the refs and each revision's files,
get_hf_file_metadata reads the resolve answers (X-Repo-Commit, X-Linked-Etag, Location), and its HTTP
session makes the ranged GETs, against a server that speaks the same endpoints as the hub. The model is a
small GPT-NeoX (Pythia's architecture) under Pythia's revision names; step2000 and step3000 serve the same
bytes on purpose, as revisions of public suites have.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from adversary_procs import assert_same_contents, contents, count_writes, hub_ingest_child, run_child
from click.testing import CliRunner
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.ingest import sources
from spectral_analyzer.ingest.hub import select_revisions, step_from_revision

pytest.importorskip("huggingface_hub")

from hub_server import (  # noqa: E402 -- after the skip: it needs huggingface_hub's constants
    PYTHIA_REVISIONS,
    LoopbackHub,
    gpt_neox_config,
    patch_endpoint,
    pickle_bytes,
    pythia_states,
    safetensors_bytes,
    sharded,
)

REPO = "EleutherAI/pythia-tiny"  # model.safetensors (+ an optimizer state that must never be fetched)
BIN = "EleutherAI/pythia-tiny-bin"  # pytorch_model.bin, as Pythia's revisions hold
SHARDED = "EleutherAI/pythia-tiny-sharded"  # model-0000k-of-00003.safetensors + index
SHARDED_BIN = "EleutherAI/pythia-tiny-sharded-bin"  # pytorch_model-0000k-of-00002.bin + index
STAGES = "allenai/olmo-tiny"  # OLMo's revision names
PRIVATE = "lab/private-tiny"
BROKEN = "EleutherAI/pythia-tiny-broken"  # pytorch_model.bin; step2 lacks a tensor
TOKEN = "hf_loopbacktoken"
CHUNK = 500


def duplicate():
    """step2000 and step3000 serve the same bytes: the ingest warns."""
    return pytest.warns(sa.DuplicateCheckpointWarning, match=r"steps 2000 \(.*step_?2000\S*\) and 3000")


@pytest.fixture(scope="module")
def states():
    return pythia_states(PYTHIA_REVISIONS)


@pytest.fixture(scope="module")
def hub(states):
    config = json.dumps(gpt_neox_config(16, 1, 40)).encode()
    optimizer = pickle_bytes({"exp_avg": torch.randn(5000), "exp_avg_sq": torch.randn(5000)})
    with LoopbackHub() as hub:
        for rev, t in states.items():
            hub.add_revision(REPO, rev, {"model.safetensors": safetensors_bytes(t), "config.json": config,
                                         "optimizer.pt": optimizer})
            hub.add_revision(BIN, rev, {"pytorch_model.bin": pickle_bytes(t), "config.json": config})
            hub.add_revision(SHARDED, rev, {**sharded(t, 3), "config.json": config})
            hub.add_revision(SHARDED_BIN, rev, {**sharded(t, 2, "bin"), "config.json": config})
            stage = f"stage1-step{step_from_revision(rev)}-tokens{step_from_revision(rev) * 4}M"
            hub.add_revision(STAGES, stage, {"model.safetensors": safetensors_bytes(t)})
        hub.add_revision(REPO, "main", {"model.safetensors": safetensors_bytes(states["step3000"])})
        for rev in PYTHIA_REVISIONS[:3]:
            hub.add_revision(PRIVATE, rev, {"model.safetensors": safetensors_bytes(states[rev])})
            tensors = {k: v for k, v in states[rev].items() if rev != "step2" or k != "embed_out.weight"}
            hub.add_revision(BROKEN, rev, {"pytorch_model.bin": pickle_bytes(tensors)})
        hub.private[PRIVATE] = TOKEN
        yield hub


@pytest.fixture(autouse=True)
def endpoint(hub, monkeypatch, tmp_path):
    patch_endpoint(monkeypatch, hub.url, tmp_path)
    monkeypatch.setattr(sources, "FIRST_WAIT", 0.01)
    hub.clear_faults()


@pytest.fixture(scope="module")
def local(states, tmp_path_factory):
    """The same tensors as local safetensors files, and their ingest: what every hub ingest must equal."""
    folder = tmp_path_factory.mktemp("local")
    for rev, t in states.items():
        save_file(t, str(folder / f"step_{step_from_revision(rev)}.safetensors"))
    with duplicate():
        run = sa.ingest(folder / ".", folder.parent / "local.zarr", chunk_size=CHUNK)
    return folder, run


def same_bits(a: sa.Run, b: sa.Run) -> None:
    np.testing.assert_array_equal(a.checkpoint_steps, b.checkpoint_steps)
    for name in ("deltas", "base"):
        x, y = getattr(a, name).values, getattr(b, name).values
        assert x.dtype == y.dtype == np.float32 and np.array_equal(x.view(np.uint32), y.view(np.uint32)), name
    assert list(a.tensors["tensor"].values) == list(b.tensors["tensor"].values)


@pytest.mark.parametrize("repo", [REPO, BIN, SHARDED, SHARDED_BIN])
def test_revisions_are_bit_identical_to_the_same_tensors_in_local_safetensors(repo, hub, local, tmp_path):
    with duplicate() as caught:  # told from the sha256 the hub lists, before step3000's tensors are fetched
        run = sa.ingest(f"hf://{repo}", tmp_path / "hub.zarr", chunk_size=CHUNK)  # every revision named by a step
    assert len(caught) == 1 and "byte-identical files (sha256" in str(caught[0].message)
    same_bits(run, local[1])
    assert run.n_params == local[1].n_params  # the bool causal-mask buffers are not parameters
    assert run.provenance["source"] == f"hf://{repo}"
    assert run.provenance["model_config"] == {"num_attention_heads": 4, "hidden_size": 16, "num_hidden_layers": 1,
                                             "model_type": "gpt_neox"}
    record = run.provenance["hub"]
    assert record["repo"] == repo and record["endpoint"] == hub.url
    assert record["config"]["architectures"] == ["GPTNeoXForCausalLM"]
    assert record["left_out"] == ([{"revision": "main", "commit": hub.repos[repo]["main"].commit,
                                    "reason": "no step in the revision name"}] if repo == REPO else [])
    assert [s["label"] for s in run.sources] == [f"hf://{repo}@{r}" for r in PYTHIA_REVISIONS]
    for source, rev in zip(run.sources, PYTHIA_REVISIONS):
        revision = hub.repos[repo][rev]
        names = sorted(n for n in revision.files if n.endswith((".safetensors", ".bin")))
        assert (source["revision"], source["commit"]) == (rev, revision.commit)
        assert source["files"] == [
            {"url": f"hf://{repo}@{rev}/{name}", "size": revision.files[name].size,
             "sha256": revision.files[name].sha256, "etag": revision.files[name].sha256} for name in names]


def test_stage_names_give_steps_in_step_order(local, tmp_path):
    run = sa.ingest(f"hf://{STAGES}", tmp_path / "hub.zarr", revisions="stage1-*-tokens[0-9]M,*step4-*",
                    chunk_size=CHUNK)
    assert list(run.checkpoint_steps) == [0, 1, 2, 4]  # step order, whatever the order asked in
    np.testing.assert_array_equal(run.deltas.values, local[1].deltas.values[:3])


def test_selecting_revisions_by_list_glob_and_step_range():
    names = ["main", "step0", "step1", "step2", "step4", "step1000", "step2000", "step3000", "v1.0"]
    pick = lambda spec: [n for n, _ in select_revisions("hf://o/m", names, spec)]  # noqa: E731
    assert pick(None) == ["step0", "step1", "step2", "step4", "step1000", "step2000", "step3000"]
    assert pick("step3000,step0") == ["step0", "step3000"]
    assert pick(["step1*", "step2"]) == ["step1", "step2", "step1000"]
    assert pick("step1000..step3000:1000") == ["step1000", "step2000", "step3000"]
    assert pick("1000..3000:2000") == ["step1000", "step3000"]
    assert pick("step1..step4") == ["step1", "step2", "step4"]  # every revision in the range
    assert select_revisions("hf://o/m", ["stage1-step20-tokens4B", "stage1-step10-tokens2B"], None) == [
        ("stage1-step10-tokens2B", 10), ("stage1-step20-tokens4B", 20)]
    with pytest.raises(sa.SourceError, match=r"^hf://o/m: no revision for step 1500, which 'step1000\.\.step2000:500'"):
        pick("step1000..step2000:500")
    with pytest.raises(sa.SourceError, match=r"^hf://o/m: no revision matches 'step9\*'$"):
        pick("step9*")
    with pytest.raises(sa.StepError, match=r"^hf://o/m@main: no step in the revision's name"):
        pick("main,step0")
    with pytest.raises(sa.StepError, match="the range ends before it starts"):
        pick("step2000..step1000")
    assert step_from_revision("ckpt_120") == 120 and step_from_revision("v1.1") is None


def test_a_step_grid_leaves_out_the_log_spaced_revisions(local, tmp_path):
    with duplicate():
        run = sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", revisions="step1000..step3000:1000", chunk_size=CHUNK)
    assert list(run.checkpoint_steps) == [1000, 2000, 3000]
    reference = local[1]
    np.testing.assert_array_equal(run.deltas.values[0], reference.deltas.values[4])  # 1000 -> 2000


def test_each_selected_tensor_is_fetched_once_and_nothing_else(hub, states, tmp_path):
    """The bytes the storage sent: each selected tensor's span once, the header once, and never the excluded
    tensors, the causal-mask buffers or the optimizer state."""
    hub.log.clear()
    revisions = ["step0", "step1", "step2", "step1000"]
    sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", revisions=",".join(revisions), chunk_size=CHUNK,
              exclude=["embed_out.*"])
    optimizer = hub.repos[REPO]["step0"].files["optimizer.pt"]
    assert hub.ranges(optimizer.sha256) == []
    for rev in revisions:
        blob = hub.repos[REPO][rev].files["model.safetensors"]
        data = safetensors_bytes(states[rev])
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        wanted = [(0, 8), (8, 8 + n)] + sorted(
            (8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1])
            for name, e in header.items()
            if name != "__metadata__" and e["dtype"] == "F16" and not name.startswith("embed_out")
        )
        assert sorted(hub.ranges(blob.sha256)) == wanted, rev
    assert not any(e.token for e in hub.log if e.path.startswith("/lfs/"))  # no credentials to the storage


def test_the_read_ahead_goes_on_into_the_next_revision_before_a_row_is_committed(hub, monkeypatch, tmp_path):
    """The transfer does not stop between revisions: the next revision's first tensors are asked for while the
    current one is still being ingested, before its row is committed (and, as above, each only once)."""
    events: list[tuple] = []
    fetch_ahead, commit_rows = sources.Workspace.fetch_ahead, sa.store.Store.commit_rows

    def asked(self, key, fetch):
        events.append(("ahead", key[0]))
        return fetch_ahead(self, key, fetch)

    def committed(self, record, steps, *args, **kwargs):
        events.append(("commit", int(steps[-1])))
        return commit_rows(self, record, steps, *args, **kwargs)

    monkeypatch.setattr(sources.Workspace, "fetch_ahead", asked)
    monkeypatch.setattr(sa.store.Store, "commit_rows", committed)
    revisions = ["step0", "step1", "step2", "step4", "step1000"]
    sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", revisions=",".join(revisions), chunk_size=CHUNK)
    commits = [i for i, e in enumerate(events) if e[0] == "commit"]
    assert [events[i][1] for i in commits] == [1, 2, 4, 1000]
    for row, rev in enumerate(revisions[2:]):  # revision rev is asked for before the row before it commits
        first = next(i for i, e in enumerate(events) if e[0] == "ahead" and f"@{rev}/" in e[1])
        assert first < commits[row], (rev, events)


def test_an_append_checks_the_revisions_already_ingested(hub, states, tmp_path):
    store = tmp_path / "hub.zarr"
    sa.ingest(f"hf://{REPO}", store, revisions="step0,step1,step2", chunk_size=CHUNK)
    hub.log.clear()
    run = sa.ingest(f"hf://{REPO}", store, revisions="step0..step1000", chunk_size=CHUNK)
    assert list(run.checkpoint_steps) == [0, 1, 2, 4, 1000]
    # step0, step1 and step2: their headers only (checked, not read); step4 and step1000 appended, the first
    # new delta taken from the store's exact float32 copy of its last revision, step2, not fetched again
    fetched = {r: len(hub.ranges(hub.repos[REPO][r].files["model.safetensors"].sha256)) for r in
               ("step0", "step1", "step2", "step4", "step1000")}
    n_tensors = len([k for k, v in states["step0"].items() if v.is_floating_point()])
    assert fetched == {"step0": 2, "step1": 2, "step2": 2, "step4": 2 + n_tensors,
                       "step1000": 2 + n_tensors}
    changed = {**states["step1"], "embed_out.weight": states["step1"]["embed_out.weight"] + 1}
    saved = hub.repos[REPO]["step1"]
    try:
        hub.add_revision(REPO, "step1", {"model.safetensors": safetensors_bytes(changed)})  # the branch is rewritten
        with pytest.raises(sa.StoreExistsError, match=r"the checkpoint at step 1, hf://EleutherAI/pythia-tiny@step1,"
                                                      r" differs from the one ingested"):
            sa.ingest(f"hf://{REPO}", store, revisions="step0..step2000", chunk_size=CHUNK)
    finally:
        hub.repos[REPO]["step1"] = saved
    assert list(sa.open_run(store).checkpoint_steps) == [0, 1, 2, 4, 1000]


def test_a_transient_failure_is_retried(hub, local, tmp_path):
    hub.fail("/lfs/", 3, after=20)  # three answers 503 from the storage, part-way
    hub.fail(f"/api/models/{REPO}/refs", 1, "drop")  # and a dropped connection while listing
    with duplicate():
        run = sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", revisions="step*", chunk_size=CHUNK)
    same_bits(run, local[1])


def test_a_revision_that_keeps_failing_is_one_line_naming_it_and_a_rerun_resumes(hub, local, tmp_path):
    store = tmp_path / "hub.zarr"
    blob = hub.repos[REPO]["step1000"].files["model.safetensors"]
    hub.fail(f"/lfs/{blob.sha256}", None, after=2)  # its header answers; then every request fails
    with pytest.raises(sa.SourceError) as caught:
        sa.ingest(f"hf://{REPO}", store, revisions="step*", chunk_size=CHUNK)
    message = str(caught.value)
    assert "\n" not in message
    assert re.match(rf"hf://{REPO}@step1000/model\.safetensors: reading bytes \d+\.\.\d+ still failed after "
                    rf"{sources.ATTEMPTS} attempts \(HfHubHTTPError: .*503.*\); check the connection and run the "
                    "same ingest again", message), message
    kept = sa.open_run(store)
    assert list(kept.checkpoint_steps) == [0, 1, 2, 4]  # the revisions before it, committed
    np.testing.assert_array_equal(kept.deltas.values, local[1].deltas.values[:3])
    hub.clear_faults()
    with duplicate():
        run = sa.ingest(f"hf://{REPO}", store, revisions="step*", chunk_size=CHUNK)
    same_bits(run, local[1])


def test_a_failure_before_anything_is_committed_leaves_no_store(hub, tmp_path):
    blob = hub.repos[REPO]["step0"].files["model.safetensors"]
    hub.fail(f"/lfs/{blob.sha256}", None, after=2)
    with pytest.raises(sa.SourceError, match=r"^hf://EleutherAI/pythia-tiny@step0/model\.safetensors: reading"):
        sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", revisions="step*", chunk_size=CHUNK)
    assert not (tmp_path / "hub.zarr").exists()


def test_a_server_that_ignores_ranges_is_refused_at_once(hub, tmp_path):
    hub.log.clear()
    hub.fail("/lfs/", None, 200, after=4)  # a 200 (the whole file) to every range request after the headers
    with pytest.raises(sa.SourceError, match=r"^hf://EleutherAI/pythia-tiny@step0/model\.safetensors: the server "
                                             r"answered HTTP 200 where a range \(206\) was asked for$"):
        sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", revisions="step0,step1", chunk_size=CHUNK)
    refused = [(e.path, e.range) for e in hub.log if e.status == 200 and e.path.startswith("/lfs/")]
    assert refused and len(set(refused)) == len(refused)  # none tried again


def test_cli_ingests_revisions_and_fails_in_one_line(hub, tmp_path):
    from spectral_analyzer.cli.main import main

    runner = CliRunner()
    store = str(tmp_path / "cli.zarr")
    ok = runner.invoke(main, ["ingest", f"hf://{REPO}", "--revisions", "step0,step1000..step2000:1000", "-o", store,
                              "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert f"{store}: 2 deltas over steps 0..2000" in ok.output
    missing = runner.invoke(main, ["ingest", "hf://EleutherAI/absent", "-o", str(tmp_path / "x.zarr")])
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines() == [
        f"Error: hf://EleutherAI/absent: no such repository at {hub.url} (a private one needs a login: hf auth "
        "login, or HF_TOKEN)"]
    gap = runner.invoke(main, ["ingest", f"hf://{REPO}", "--revisions", "step0..step4:1", "-o", str(tmp_path / "y.zarr")])
    assert gap.exit_code == 1
    assert gap.output.strip().splitlines() == [
        f"Error: hf://{REPO}: no revision for step 3, which 'step0..step4:1' asks for"]
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def test_a_private_repository_is_read_with_hf_token(hub, monkeypatch, tmp_path):
    with pytest.raises(sa.SourceError, match=rf"^hf://{PRIVATE}: no such repository .*HF_TOKEN\)$"):
        sa.ingest(f"hf://{PRIVATE}", tmp_path / "p.zarr")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.log.clear()
    run = sa.ingest(f"hf://{PRIVATE}", tmp_path / "p.zarr")
    assert list(run.checkpoint_steps) == [0, 1, 2]
    assert all(e.token for e in hub.log if not e.path.startswith("/lfs/"))
    assert not any(e.token for e in hub.log if e.path.startswith("/lfs/"))


def test_pickles_are_downloaded_two_revisions_at_a_time_and_deleted(hub, local, tmp_path, monkeypatch):
    seen: list[int] = []
    real = sources.Workspace.download_folder

    def watch(self, group):
        folder = real(self, group)
        seen.append(len([p for p in self.folder.iterdir() if p.name.startswith("download-")]))
        return folder

    monkeypatch.setattr(sources.Workspace, "download_folder", watch)
    made = []
    real_mkdtemp = sources.tempfile.mkdtemp
    monkeypatch.setattr(sources.tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    hub.log.clear()
    with duplicate():
        run = sa.ingest(f"hf://{BIN}", tmp_path / "hub.zarr", revisions="step*", chunk_size=CHUNK)
    same_bits(run, local[1])
    assert max(seen) <= 2
    assert made and not any(__import__("os").path.exists(m) for m in made)  # the workspace is gone
    downloads = [e for e in hub.log if e.path.startswith("/lfs/") and e.method == "GET"]
    assert len(downloads) == len(PYTHIA_REVISIONS) and all(e.range is None for e in downloads)  # each once


def test_a_bad_pickled_revision_found_when_it_is_read_leaves_the_store_as_it_was(tmp_path):
    """A remote pickle is downloaded only when its row is written: its tensors are checked then."""
    store = tmp_path / "hub.zarr"
    sa.ingest(f"hf://{BROKEN}", store, revisions="step0", chunk_size=CHUNK)
    before = contents(store)
    with pytest.raises(sa.InconsistentCheckpointsError, match=rf"^tensor 'embed_out\.weight' is in hf://{BROKEN}@step0 "
                                                              rf"but missing from hf://{BROKEN}@step2$"):
        sa.ingest(f"hf://{BROKEN}", store, revisions="step*", chunk_size=CHUNK)
    assert_same_contents(contents(store), before)


def test_killed_and_run_again_a_hub_ingest_ends_bit_identical(hub, tmp_path):
    src, revisions = f"hf://{REPO}", "step0..step1000"
    reference = tmp_path / "reference.zarr"
    writes = count_writes(lambda: sa.ingest(src, reference, revisions=revisions, chunk_size=CHUNK))
    want = contents(reference)
    for kill_at in (len(writes) // 4, 3 * len(writes) // 4):  # in the base's row, and in a later one
        store = tmp_path / f"killed-{kill_at}.zarr"
        assert run_child(hub_ingest_child, hub.url, src, str(store), revisions, CHUNK, kill_at) == -9
        sa.ingest(src, store, revisions=revisions, chunk_size=CHUNK)
        assert_same_contents(contents(store), want, f"killed at write {kill_at}")


def test_revisions_of_several_stages_are_refused_not_interleaved():
    """OLMo's stage2 counts its steps anew: stage2-...-step500 came before stage1-step1000."""
    names = ["main", "stage1-step1000-tokens5B", "stage1-step2000-tokens9B", "stage2-ingredient1-step500-tokens2B"]
    with pytest.raises(sa.StepError, match=r"hf://o/m: revisions stage1-step1000-tokens5B and "
                                           r"stage2-ingredient1-step500-tokens2B are of different training stages"):
        select_revisions("hf://o/m", names, None)
    assert [n for n, _ in select_revisions("hf://o/m", names, "stage1-*")] == names[1:3]
