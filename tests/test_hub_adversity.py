"""The hub ingest path and its read-ahead into the next revision under faults (loopback hub).

The faults hit revision step2 only: its first tensors are fetched ahead while step1's row is written and
committed. Whatever happens to step2, step1's row must be committed, step2's failure must be one line naming
it, and a rerun must end bit-identical to ingesting the same tensors from local files.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from adversary_procs import assert_same_contents, contents, run_child
from safetensors.torch import save_file

import spectral_analyzer as sa
from spectral_analyzer.ingest import readers, sources

pytest.importorskip("huggingface_hub")

import hub_server  # noqa: E402 -- after the skip: it needs huggingface_hub's constants
from hub_server import Blob, LoopbackHub, patch_endpoint, pickle_bytes, pythia_states, safetensors_bytes  # noqa: E402

REPO = "adversity/tiny"
REVS = ["step0", "step1", "step2", "step4"]
CHUNK = 300


@pytest.fixture(scope="module")
def states():
    return pythia_states(REVS, identical=None)


def write_local(folder: Path, states: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for rev, t in states.items():
        save_file(t, str(folder / f"step_{rev.removeprefix('step')}.safetensors"))
    return folder


@pytest.fixture(scope="module")
def local(states, tmp_path_factory):
    """The same tensors ingested from local safetensors files: what every hub ingest must equal."""
    folder = write_local(tmp_path_factory.mktemp("local") / "ckpts", states)
    return sa.ingest(folder / ".", folder.parent / "local.zarr", chunk_size=CHUNK)


def same_bits(a: sa.Run, b: sa.Run) -> bool:
    if list(a.checkpoint_steps) != list(b.checkpoint_steps):
        return False
    for name in ("deltas", "base"):
        x, y = getattr(a, name).values, getattr(b, name).values
        if x.shape != y.shape or not np.array_equal(x.view(np.uint32), y.view(np.uint32)):
            return False
    return True


# -- a loopback hub whose storage can misbehave on chosen ranges -----------------------------------------

_real_bytes = hub_server._Handler._bytes


def _misbehaving_bytes(self, blob, headers, body):
    """The storage's answer, unless ``hub.hook(blob)`` names a fault for this ranged GET."""
    hook = getattr(self.hub, "hook", None)
    asked = self.headers.get("Range")
    action = hook(blob) if hook is not None and body and asked else None
    if action is None:
        return _real_bytes(self, blob, headers, body)
    start, stop = hub_server._parse_range(asked, blob.size)
    data = blob.data
    self.hub._record(hub_server.Logged("GET", self.path, asked, -1, 0))
    if action == "200":  # the whole file where a range was asked for
        self.send_response(200)
        self.send_header("Content-Length", str(blob.size))
        self.end_headers()
        self.wfile.write(data)
        return
    if action == "truncate":  # the whole length announced, half of it sent, the connection closed
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{blob.size}")
        self.send_header("Content-Length", str(stop - start))
        self.end_headers()
        self.wfile.write(data[start : start + (stop - start) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)
        return
    if action == "short":  # an honest but short answer: Content-Length three bytes short
        n = stop - start - 3
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{blob.size}")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        self.wfile.write(data[start : start + n])
        return
    if action == "badrange":  # the neighbouring range, and a Content-Range that says so
        a, b = start + 1, min(stop + 1, blob.size)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {a}-{b - 1}/{blob.size}")
        self.send_header("Content-Length", str(b - a))
        self.end_headers()
        self.wfile.write(data[a:b])
        return
    raise AssertionError(action)


@pytest.fixture
def hub(states, monkeypatch, tmp_path):
    """A fresh loopback hub per test (tests change what it serves), quick retries."""
    monkeypatch.setattr(hub_server._Handler, "_bytes", _misbehaving_bytes)
    monkeypatch.setattr(sources, "FIRST_WAIT", 0.01)
    home = tmp_path / "home"
    home.mkdir()
    with LoopbackHub() as hub:
        hub.hook = None
        for rev, t in states.items():
            hub.add_revision(REPO, rev, {"model.safetensors": safetensors_bytes(t)})
        patch_endpoint(monkeypatch, hub.url, home)
        yield hub


def fault_after_header(hub, revision: str, action: str, times: int | None) -> None:
    """Make the storage answer *action* to *times* ranged GETs of *revision*'s model.safetensors (every one:
    None), once its header (two ranges, read when the ingest is planned) has been answered."""
    sha = hub.repos[REPO][revision].files["model.safetensors"].sha256
    lock, seen = threading.Lock(), [0]

    def hook(blob):
        if blob.sha256 != sha:
            return None
        with lock:
            seen[0] += 1
            n = seen[0] - 2
        return action if n > 0 and (times is None or n <= times) else None

    hub.hook = hook


def steps_of(store: Path) -> list[int]:
    return [int(s) for s in sa.open_run(store).checkpoint_steps]


# -- faults on the read-ahead of the next revision -------------------------------------------------------


@pytest.mark.parametrize("action", ["200", "truncate", "badrange", 503])
def test_a_fault_on_the_next_revisions_read_ahead_keeps_the_rows_before_it(action, hub, local, tmp_path):
    """step2's tensors, fetched ahead while step1's row commits, always fail: step1's row is committed, the
    error is one line naming step2's file, and a rerun resumes to the local ingest's bits."""
    store = tmp_path / "hub.zarr"
    if action == 503:
        sha = hub.repos[REPO]["step2"].files["model.safetensors"].sha256
        hub.fail(f"/lfs/{sha}", None, after=2)
    else:
        fault_after_header(hub, "step2", action, None)
    with pytest.raises(sa.SourceError) as caught:
        sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"hf://{REPO}@step2/model.safetensors: "), message
    assert steps_of(store) == [0, 1]
    np.testing.assert_array_equal(sa.open_run(store).deltas.values, local.deltas.values[:1])
    hub.hook = None
    hub.clear_faults()
    assert same_bits(sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK), local)


def test_a_dropped_read_ahead_is_retried(hub, local, tmp_path):
    fault_after_header(hub, "step2", "truncate", 3)
    assert same_bits(sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", chunk_size=CHUNK), local)


@pytest.mark.parametrize("fault", ["short", "expired"])
def test_a_short_answer_or_an_expired_storage_url_is_retried(fault, hub, local, tmp_path):
    """A short or malformed answer, and a 401/403/404/410 from the storage (a signed URL that expired), are
    retried (the file resolved again), not the end of the ingest at their first occurrence."""
    if fault == "short":
        fault_after_header(hub, "step2", "short", 2)
    else:
        sha = hub.repos[REPO]["step2"].files["model.safetensors"].sha256
        hub.fail(f"/lfs/{sha}", 1, 403, after=3)
    assert same_bits(sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", chunk_size=CHUNK), local)


# -- content that changes after it was listed ------------------------------------------------------------


def _on_commit(monkeypatch, step: int, action):
    """Run *action* right after the row of *step* is committed (the next revision's read-ahead under way);
    returns what undoes this."""
    commit_rows = sa.store.Store.commit_rows

    def committed(self, record, steps, *args, **kwargs):
        out = commit_rows(self, record, steps, *args, **kwargs)
        if int(steps[-1]) == step:
            action()
        return out

    monkeypatch.setattr(sa.store.Store, "commit_rows", committed)
    return lambda: monkeypatch.setattr(sa.store.Store, "commit_rows", commit_rows)


def test_lfs_content_changed_under_its_commit_is_refused_not_mixed(hub, states, local, monkeypatch, tmp_path):
    """Once step1 is committed, step2's file is replaced under the same commit, and its old storage URL
    fails once: the file is resolved again, the ETag differs from the one listed: one line, rows kept."""
    monkeypatch.setattr(readers, "AHEAD_BYTES", 1)  # step2's first tensor only is fetched before the commit
    revision = hub.repos[REPO]["step2"]
    old = revision.files["model.safetensors"]
    changed = Blob.of(safetensors_bytes({k: v + 1 if v.is_floating_point() else v for k, v in states["step2"].items()}))

    def replace():
        revision.files["model.safetensors"] = changed
        hub.blobs[changed.sha256] = changed
        hub.fail(f"/lfs/{old.sha256}", 1)

    undo = _on_commit(monkeypatch, 1, replace)
    store = tmp_path / "hub.zarr"
    with pytest.raises(sa.SourceError, match=rf"^hf://{REPO}@step2/model\.safetensors: the hub serves ETag "
                                             r".*but listed .*the revision changed while it was read"):
        sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK)
    assert steps_of(store) == [0, 1]
    revision.files["model.safetensors"] = old
    undo()
    assert same_bits(sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK), local)


def test_a_plain_git_file_changed_under_its_commit_is_refused_not_mixed(hub, states, local, monkeypatch, tmp_path):
    """A file the hub serves itself (no LFS: its ranges are GETs of resolve/{commit}/{file}) whose bytes change
    under the commit after step2's first tensor was fetched ahead: each ranged answer's ETag and
    X-Repo-Commit are checked, so either version is ingested whole or there is an error, never a mix."""
    monkeypatch.setattr(hub_server, "LFS_SUFFIXES", (".bin",))  # model.safetensors: a plain git file
    monkeypatch.setattr(readers, "AHEAD_BYTES", 1)
    revision = hub.repos[REPO]["step2"]
    new2 = {k: v + 1 if v.is_floating_point() else v for k, v in states["step2"].items()}
    new_local = sa.ingest(write_local(tmp_path / "new", {**states, "step2": new2}) / ".", tmp_path / "new.zarr",
                          chunk_size=CHUNK)
    changed = Blob.of(safetensors_bytes(new2))
    _on_commit(monkeypatch, 1, lambda: revision.files.__setitem__("model.safetensors", changed))
    store = tmp_path / "hub.zarr"
    try:
        run = sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK)
    except sa.SourceError as exc:
        assert str(exc).startswith(f"hf://{REPO}@step2/") and steps_of(store) == [0, 1]
    else:
        assert same_bits(run, local) or same_bits(run, new_local), "step2 mixes the bytes of two versions"


def test_a_revision_deleted_after_listing_is_one_line_and_keeps_the_rows_before_it(hub, local, monkeypatch,
                                                                                   tmp_path):
    monkeypatch.setattr(readers, "AHEAD_BYTES", 1)
    revisions = hub.repos[REPO]
    deleted = revisions["step2"]
    sha = deleted.files["model.safetensors"].sha256

    def delete():
        del revisions["step2"]
        del hub.blobs[sha]

    undo = _on_commit(monkeypatch, 1, delete)
    store = tmp_path / "hub.zarr"
    with pytest.raises(sa.SourceError) as caught:
        sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"hf://{REPO}@step2/model.safetensors: "), message
    assert steps_of(store) == [0, 1]
    revisions["step2"] = deleted
    hub.blobs[sha] = deleted.files["model.safetensors"]
    undo()
    assert same_bits(sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK), local)


# -- what is fetched ahead, and for whom -----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::spectral_analyzer.UnreadWeightsWarning")  # the int32 A.weight, told
def test_a_float_and_an_integer_tensor_under_one_canonical_name_read_as_locally(monkeypatch, tmp_path):
    """An int32 tensor 'module.A.weight' (canonical 'A.weight', after the float 'A.weight' in sorted order)
    must not take the float tensor's byte span: read as the local reader reads it (the float tensor), from
    a memory:// folder too, never the integers' bytes as float32."""
    monkeypatch.setattr(sources, "FIRST_WAIT", 0.01)
    gen = torch.Generator().manual_seed(1)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in range(3):
        save_file({"A.weight": torch.randn(4, generator=gen), "module.A.weight": torch.arange(4, dtype=torch.int32),
                   "z.weight": torch.randn(6, generator=gen)}, str(folder / f"step_{step}.safetensors"))
    want = sa.ingest(folder / ".", tmp_path / "local.zarr", chunk_size=CHUNK)
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/adversity-{os.getpid()}-{time.monotonic_ns()}"
    for f in folder.iterdir():
        fs.pipe_file(f"{root}/{f.name}", f.read_bytes())
    try:
        got = sa.ingest(f"memory://{root}", tmp_path / "remote.zarr", chunk_size=CHUNK)
    finally:
        fs.rm(root, recursive=True)
    assert same_bits(got, want), f"base {got.base.values[:4]} != {want.base.values[:4]}"


def test_a_revision_named_like_another_revisions_folder_is_not_read_from_it(hub, states, local, tmp_path):
    """A revision name may hold "/": revision ``step1`` listing ``step2/model.safetensors`` and revision
    ``step1/step2`` (step 2) listing ``model.safetensors`` have the same label and byte ranges; step1's
    ranges, kept for the next delta, must not be taken as step2's (the delta 1 -> 2 would be zero)."""
    del hub.repos[REPO]["step2"], hub.repos[REPO]["step4"]
    hub.add_revision(REPO, "step1", {"step2/model.safetensors": safetensors_bytes(states["step1"])})
    hub.add_revision(REPO, "step1/step2", {"model.safetensors": safetensors_bytes(states["step2"])})
    run = sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", chunk_size=CHUNK)
    assert list(run.checkpoint_steps) == [0, 1, 2]
    np.testing.assert_array_equal(run.deltas.values.view(np.uint32), local.deltas.values[:2].view(np.uint32))


def _track_workspace(monkeypatch) -> tuple[list, dict]:
    """Record, at each workspace's close, what it still keeps; and the most bytes fetched ahead at once."""
    at_close: list[dict] = []
    ahead = {"now": 0, "peak": 0, "sizes": {}}
    lock = threading.Lock()
    close, fetch_ahead, fetched = sources.Workspace.close, sources.Workspace.fetch_ahead, sources.Workspace.fetched

    def closing(self):
        with self._lock:
            kept = dict(self._kept)
        at_close.append({"keys": list(kept), "bytes": sum(v.nbytes if isinstance(v, np.ndarray) else v.stat().st_size
                                                          for v in kept.values())})
        return close(self)

    def asked(self, key, fetch):
        with self._lock:
            new = key not in self._kept and key not in self._fetching
        if new:
            with lock:
                ahead["sizes"][key] = key[-1] - key[-2]
                ahead["now"] += key[-1] - key[-2]
                ahead["peak"] = max(ahead["peak"], ahead["now"])
        return fetch_ahead(self, key, fetch)

    def taken(self, key):
        with lock:
            ahead["now"] -= ahead["sizes"].pop(key, 0)
        return fetched(self, key)

    monkeypatch.setattr(sources.Workspace, "close", closing)
    monkeypatch.setattr(sources.Workspace, "fetch_ahead", asked)
    monkeypatch.setattr(sources.Workspace, "fetched", taken)
    return at_close, ahead


def test_the_read_ahead_into_the_next_revision_stays_within_its_budget(hub, states, local, monkeypatch, tmp_path):
    """With a budget of one byte, at most the tensor being read and one more (the next revision's first,
    larger than the budget) are in flight; nothing fetched ahead is left behind."""
    monkeypatch.setattr(readers, "AHEAD_BYTES", 1)
    at_close, ahead = _track_workspace(monkeypatch)
    assert same_bits(sa.ingest(f"hf://{REPO}", tmp_path / "hub.zarr", chunk_size=CHUNK), local)
    largest = max(v.nbytes for v in states["step0"].values() if v.is_floating_point())
    assert 0 < ahead["peak"] <= 2 * largest and ahead["now"] == 0 and not ahead["sizes"]


def test_a_resumed_ingest_keeps_at_most_one_revisions_ranges(hub, states, local, monkeypatch, tmp_path):
    """On an append the store's last revision is opened again as the first previous checkpoint, read once:
    nothing of it is kept for a second read, so a resumed ingest ends keeping only its last revision's
    ranges, as a fresh one does (not two revisions': twice the promised bound on memory and local disk)."""
    store = tmp_path / "hub.zarr"
    sa.ingest(f"hf://{REPO}", store, revisions="step0,step1", chunk_size=CHUNK)
    at_close, _ = _track_workspace(monkeypatch)
    assert same_bits(sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK), local)
    revisions = {k[0].split("@")[1].split("/")[0] for k in at_close[-1]["keys"]}
    assert revisions <= {"step4"}, f"ranges still kept at the end: {sorted(revisions)}"


# -- killed while the next revision is fetched ahead ---------------------------------------------------------


def killed_child(endpoint: str, store: str, when: str, scratch: str) -> None:
    """Ingest REPO; SIGKILL at *when*: 'ahead' (step2's first read-ahead, step1's row not committed yet) or
    'committed' (right after step1's commit, step2's read-ahead in flight on a slow link)."""
    from huggingface_hub import constants

    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    tempfile.tempdir = scratch  # the workspace a killed process leaves behind goes with the test's folder
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if when == "ahead":
        fetch_ahead = sources.Workspace.fetch_ahead

        def asked(self, key, fetch):
            if "@step2/" in key[0]:
                fetch_ahead(self, key, fetch)
                time.sleep(0.05)  # the transfer under way
                die()
            return fetch_ahead(self, key, fetch)

        sources.Workspace.fetch_ahead = asked
    else:
        commit_rows = sa.store.Store.commit_rows

        def committed(self, record, steps, *args, **kwargs):
            out = commit_rows(self, record, steps, *args, **kwargs)
            if int(steps[-1]) == 1:
                die()
            return out

        sa.store.Store.commit_rows = committed
    sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK)


@pytest.mark.parametrize("when", ["ahead", "committed"])
def test_killed_during_the_read_ahead_into_the_next_revision_resumes_bit_identical(when, hub, local, tmp_path):
    reference = tmp_path / "reference.zarr"
    sa.ingest(f"hf://{REPO}", reference, chunk_size=CHUNK)
    store = tmp_path / "killed.zarr"
    assert run_child(killed_child, hub.url, str(store), when, str(tmp_path)) == -9
    assert steps_of(store) == ([0] if when == "ahead" else [0, 1])
    assert same_bits(sa.ingest(f"hf://{REPO}", store, chunk_size=CHUNK), local)
    assert_same_contents(contents(store), contents(reference), f"killed at {when}")


# -- hostile file names ------------------------------------------------------------------------------------

HOSTILE = {
    "absolute": "/tmp/adversity-escape/pytorch_model.bin",
    "unicode": "модель-ß-e\u0301.bin",
    "backslashes": "..\\..\\escape.bin",
    "dot-prefixed": "..bin",
    "newline": "a\nb.bin",
    "parent": "../../../../adversity-escape.bin",  # the URL's dot segments go: a 404, or a read of the right file
}


def test_hostile_file_names_stay_inside_the_workspace(hub, states, local, monkeypatch, tmp_path):
    """A revision whose one weight file (a pickle: downloaded) has a hostile name: the download goes into
    the workspace under the name's last part, nothing is written outside it, and the ingest is the local one
    or a one-line error naming the file."""
    scratch = tmp_path / "tmp" / "a" / "b"
    scratch.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = {p for p in Path("/tmp").iterdir()}
    for kind, name in HOSTILE.items():
        repo = f"adversity/hostile-{kind}"
        for rev, t in states.items():
            hub.add_revision(repo, rev, {name: pickle_bytes(t)})
        try:
            run = sa.ingest(f"hf://{repo}", tmp_path / f"{kind}.zarr", chunk_size=CHUNK)
        except sa.SourceError as exc:
            assert kind == "parent" and str(exc).startswith(f"hf://{repo}@step0/"), (kind, str(exc))
        else:
            assert same_bits(run, local), kind
        assert list(scratch.iterdir()) == [], kind  # the workspace is gone
        assert [p for p in tmp_path.rglob("*") if "escape" in p.name] == [], kind
    assert {p for p in Path("/tmp").iterdir() if "adversity-escape" in p.name} - before == set()


def test_a_file_name_of_255_bytes_is_downloaded(hub, states, local, tmp_path):
    """A pickle whose name is legal but near the limit (255 bytes) is downloaded (its temporary name is
    short, not the name plus a suffix)."""
    repo = "adversity/long-name"
    for rev, t in states.items():
        hub.add_revision(repo, rev, {"x" * 251 + ".bin": pickle_bytes(t)})
    assert same_bits(sa.ingest(f"hf://{repo}", tmp_path / "long.zarr", chunk_size=CHUNK), local)
