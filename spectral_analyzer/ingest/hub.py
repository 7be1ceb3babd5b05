"""The revisions of a Hugging Face hub repository as checkpoints: ``hf://org/name``.

Pythia, OLMo and LLM360 publish their training trajectories as branches of
one model repository (``step1000``, ``stage1-step1000-tokens4B``,
``ckpt_120``); each selected revision is one checkpoint, its step read from
its name, in step order. A revision holds one checkpoint folder as
discover.py's :func:`~.discover.checkpoint_files` reads it: sharded
``*.safetensors`` or ``pytorch_model*.bin`` with their index, as on the hub.

The requests, all through huggingface_hub (the ``[hub]`` extra) and its HTTP
session, so that its authentication (``HF_TOKEN``, a saved login) and its
endpoint (``HF_ENDPOINT``) apply:

* refs: :meth:`HfApi.list_repo_refs`, ``GET /api/models/{repo}/refs``:
  branches and tags, each with its commit;
* the files of a revision: :meth:`HfApi.list_repo_tree` at that commit,
  ``GET /api/models/{repo}/tree/{commit}``: size, git blob id and, for LFS
  files, sha256;
* a file, at its first read: :func:`get_hf_file_metadata` of
  :func:`hf_hub_url` at the commit, ``HEAD /{repo}/resolve/{commit}/{file}``:
  ``X-Repo-Commit`` must be the listed commit and the ETag
  (``X-Linked-Etag`` for LFS files) the listed sha256 or blob id;
  ``Location`` is where the bytes are (storage, for LFS files);
* bytes: ``GET`` of that location with a ``Range`` header; only a 206
  answer whose ``Content-Range`` is the range asked for is read (a 200
  would be the whole file). An answer of 401/403/404/410 from a storage
  location (a signed URL that expired) resolves the file again.

Every URL names the revision's commit, never its branch: a branch that moves
during an ingest cannot mix two revisions, and the store records each
revision's commit and each file's sha256 (or blob id), which an append
checks again.

Why byte ranges rather than downloading each revision into a temporary
folder: the ingest then fetches only the selected tensors (an ``--include``
of the attention weights fetches those), holds no whole file on local disk
(a tensor is kept, in memory or in the workspace, only until the next delta
has read it: sources.py), and fetches each byte once, where a download would
write and then read every byte again. Pickles (``pytorch_model.bin``) cannot
be read by range: they are downloaded into the workspace, the previous and
the current revision's at a time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import NoCheckpointsError, SourceError, StepError, printable
from .discover import Checkpoint, check_one_stage, checkpoint_files, passed_over
from .sources import RemoteFile, RemoteFolder, Source, Workspace, read_config, retrying

__all__ = ["HubSource", "select_revisions", "step_from_revision"]

_REPO = re.compile(r"hf://(?:models/)?([A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)/?")
_REVISION_STEP = re.compile(r"(?:^|[^a-z])(?:global_step|step|checkpoint|ckpt|iteration|iter)[=_\-]?(\d+)",
                            re.IGNORECASE)
_RANGE = re.compile(r"(?P<a>[^.:]+)\.\.(?P<b>[^.:]+)(?::(?P<k>\d+))?")
_GLOB = re.compile(r"[*?\[]")
_LETTERS = re.compile(r"[^\W\d_]+")  # letters right after a step's number


def step_from_revision(name: str) -> int | None:
    """The step in a revision's name: ``step1000``, ``stage1-step1000-tokens4B``, ``ckpt_120``; None without one.

    Only a number after a step word counts (``main`` and ``v1.1`` have no step). A step followed by a
    letter (``step1k``, ``ckpt_2B``) raises :class:`StepError`, as a folder's name does
    (:func:`~.discover.step_from_name`): ``step1k`` is not step 1.

    >>> step_from_revision("stage1-step1000-tokens4B"), step_from_revision("main")
    (1000, None)
    """
    found = list(_REVISION_STEP.finditer(name))
    if not found:
        return None
    digits = found[-1][1]
    if not digits.isascii():  # \d matches the digits of every script, and int() reads them
        raise StepError(f"{printable(name)}: its step {digits} is not written in the digits 0-9; select revisions "
                        "named by their step in 0-9 (a look-alike of a step is not read as one)")
    letters = _LETTERS.match(name, found[-1].end(1))
    if letters:
        raise StepError(
            f"{printable(name)}: {digits}{printable(letters[0])} in its name is a number followed by "
            "letters, not a step (1k is not read as 1000); select revisions named by their whole step (step1000)"
        )
    return int(digits)


def _steps(available: Sequence[str]) -> tuple[dict[str, int | None], dict[str, StepError]]:
    """The step of each revision name (None without one), and the names whose step cannot be read."""
    steps: dict[str, int | None] = {}
    unreadable: dict[str, StepError] = {}
    for name in available:
        try:
            steps[name] = step_from_revision(name)
        except StepError as exc:
            steps[name], unreadable[name] = None, exc
    return steps, unreadable


def _range_end(text: str, item: str) -> int:
    if text.isdigit():
        return int(text)
    step = step_from_revision(text)
    if step is None:
        raise StepError(f"revisions {item!r}: {text!r} is neither a step nor a revision named by its step")
    return step


def select_revisions(repo: str, available: Sequence[str], spec: str | Sequence[str] | None) -> list[tuple[str, int]]:
    """The revisions of *available* that *spec* selects, as ``(name, step)`` in step order.

    *spec*: None (every revision with a step in its name), or comma-separated
    items (a string) or a sequence of items, each

    * a name (``step1000``) or a glob on names (``'step*'``);
    * a range of steps ``A..B``: every revision with a step from A to B;
    * ``A..B:K``: the steps A, A+K, ... up to B, each of which must have a
      revision. A and B are steps or revision names (``step1000..step143000:1000``).

    >>> select_revisions("hf://org/m", ["main", "step0", "step1000", "step2000", "step3000"], "step1000..step3000:2000")
    [('step1000', 1000), ('step3000', 3000)]
    """
    steps, unreadable = _steps(available)
    if spec is None:
        chosen = [n for n in available if steps[n] is not None or n in unreadable]
        if not chosen:
            raise SourceError(f"{repo}: no revision is named by a step (revisions: {', '.join(sorted(available)[:10])})")
    else:
        items = [i.strip() for i in (spec.split(",") if isinstance(spec, str) else spec)]
        chosen = []
        for item in items:
            picked = _select(repo, item, available, steps)
            chosen.extend(n for n in picked if n not in chosen)
    for name in chosen:
        if name in unreadable:
            raise StepError(f"{repo}@{unreadable[name]}")
        if steps[name] is None:
            raise StepError(f"{repo}@{name}: no step in the revision's name; select revisions named by their step "
                            "(step1000, stage1-step1000-tokens4B, ckpt_120)")
    check_one_stage(repo, chosen)
    return sorted(((n, steps[n]) for n in chosen), key=lambda pair: pair[1])


def _select(repo: str, item: str, available: Sequence[str], steps: Mapping[str, int | None]) -> list[str]:
    if not item:
        raise StepError(f"{repo}: an empty item in the revisions asked for")
    by_step: dict[int, list[str]] = {}
    for name in available:
        if steps[name] is not None:
            by_step.setdefault(steps[name], []).append(name)
    match = _RANGE.fullmatch(item)
    if match:
        a, b = _range_end(match["a"], item), _range_end(match["b"], item)
        if b < a:
            raise StepError(f"revisions {item!r}: the range ends before it starts")
        if match["k"] is None:
            picked = [n for s in sorted(by_step) if a <= s <= b for n in by_step[s]]
        else:
            k = int(match["k"])
            if k < 1:
                raise StepError(f"revisions {item!r}: the step of a range must be at least 1")
            missing = next((s for s in range(a, b + 1, k) if s not in by_step), None)
            if missing is not None:
                raise SourceError(f"{repo}: no revision for step {missing}, which {item!r} asks for")
            picked = [n for s in range(a, b + 1, k) for n in by_step[s]]
    elif _GLOB.search(item):
        picked = [n for n in available if fnmatch.fnmatchcase(n, item)]
    else:
        picked = [item] if item in available else []
    if not picked:
        raise SourceError(f"{repo}: no revision matches {item!r}")
    return picked


def _http_module():
    """httpx, or the httpx2 of huggingface_hub >= 2: the module of the session huggingface_hub uses."""
    from huggingface_hub.utils import get_session

    return importlib.import_module(type(get_session()).__module__.partition(".")[0])


def _transient(exc: Exception) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):  # HF_HUB_OFFLINE: a ConnectionError that no retry mends
        return False
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is not None and (status in (408, 429) or status >= 500)
    return isinstance(exc, (_http_module().TransportError))


class HubFile(RemoteFile):
    """A file of a hub revision, pinned to the revision's commit, read by ranged GETs."""

    def __init__(self, revision: HubRevision, entry, workspace: Workspace):
        from huggingface_hub import hf_hub_url

        source = revision.source
        super().__init__(f"{revision.label}/{entry.path}", entry.path, entry.size, workspace, revision)
        self.source, self.revision, self.commit = source, revision.revision, revision.commit
        self.sha256 = entry.lfs.sha256 if entry.lfs is not None else None
        self.etag = self.sha256 or entry.blob_id  # the hub's ETag: sha256 of an LFS file, else its git blob id
        self.url = hf_hub_url(source.repo_id, entry.path, revision=self.commit, endpoint=source.endpoint)
        self._location: str | None = None
        self._resolving = threading.Lock()  # ranges are fetched on several threads: one HEAD per file

    def content_id(self) -> str | None:
        return f"{self.size}:blob:{self.etag}" if self.etag else None

    @property
    def key(self) -> tuple:
        """The label with the revision and path apart: the label alone is ambiguous, a revision name may
        hold a "/" (``@a`` with ``b/model.safetensors`` and ``@a/b`` with ``model.safetensors`` read alike)."""
        return (self.label, self.revision, self.name)

    def _resolve(self) -> str:
        from huggingface_hub import get_hf_file_metadata

        with self._resolving:
            if self._location is not None:
                return self._location
            meta = get_hf_file_metadata(self.url, endpoint=self.source.endpoint)
            if meta.commit_hash != self.commit:
                raise SourceError(f"{self.label}: the hub answered for commit {meta.commit_hash}, not the "
                                  f"revision's {self.commit}")
            if meta.etag != self.etag:
                raise SourceError(f"{self.label}: the hub serves ETag {meta.etag}, but listed {self.etag}; the "
                                  "revision changed while it was read: run the ingest again")
            self._location = meta.location
            return self._location

    def _headers(self, location: str) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        headers = {"Accept-Encoding": "identity"}
        if urlsplit(location).netloc == urlsplit(self.source.endpoint).netloc:
            headers.update(build_hf_headers())  # the token goes to the hub, never to a storage URL it signed
        return headers

    def _get(self, location: str, headers: Mapping[str, str]):
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        return get_session().stream("GET", location, headers=dict(headers), timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)

    def _refused(self, response, location: str) -> Exception:
        """The error for a response that is not the one expected."""
        from huggingface_hub.utils import hf_raise_for_status

        status = response.status_code
        if location != self.url and status in (401, 403, 404, 410):
            return ConnectionError(f"HTTP {status} from the storage location (expired?)")
        if status >= 400:
            response.read()  # an error's body, for huggingface_hub's message
            try:
                hf_raise_for_status(response)
            except Exception as exc:  # noqa: BLE001 -- huggingface_hub's error for this status
                return exc
        # not read: a 200 to a range request would be the whole file
        return SourceError(f"{self.label}: the server answered HTTP {status} where "
                           f"{'a range (206)' if 'Range' in response.request.headers else 'the file (200)'} "
                           "was asked for")

    def _fetch(self, start: int, stop: int, out: memoryview) -> None:
        location = self._resolve()
        headers = {**self._headers(location), "Range": f"bytes={start}-{stop - 1}"}
        with self._get(location, headers) as response:
            if response.status_code != 206:
                raise self._refused(response, location)
            expected = f"bytes {start}-{stop - 1}/{self.size}"
            if response.headers.get("Content-Range") != expected:
                raise ConnectionError(f"Content-Range {response.headers.get('Content-Range')!r}, not {expected!r}")
            self._check_served(response, location)
            position = 0
            for chunk in response.iter_bytes():
                end = position + len(chunk)
                if end > len(out):
                    raise ConnectionError(f"more than the {len(out)} bytes asked for")
                out[position:end] = chunk
                position = end
        if position != len(out):
            raise ConnectionError(f"{position} of {len(out)} bytes")

    def _check_served(self, response, location: str) -> None:
        """An answer of the hub itself (a file not in LFS, served from the repository) names the commit and
        ETag it is of: each range must be of the listed ones, or ranges of two versions would be mixed.
        (A storage location is addressed by the content's sha256, checked when it was resolved.)"""
        if urlsplit(location).netloc != urlsplit(self.source.endpoint).netloc:
            return
        commit = response.headers.get("X-Repo-Commit")
        etag = response.headers.get("X-Linked-Etag") or response.headers.get("ETag")
        etag = None if etag is None else etag.removeprefix("W/").strip('"')
        if (commit is not None and commit != self.commit) or (etag is not None and etag != self.etag):
            raise SourceError(f"{self.label}: the hub served commit {commit} ETag {etag}, but listed {self.commit} "
                              f"ETag {self.etag}; the revision changed while it was read: run the ingest again")

    def _download(self, path: Path) -> None:
        location = self._resolve()
        # what the listing promised: the sha256 of an LFS file, else git's blob id (sha1 of "blob <size>\0" + bytes)
        digest = hashlib.sha256() if self.sha256 is not None else hashlib.sha1(b"blob %d\0" % self.size)
        size = 0
        with self._get(location, self._headers(location)) as response, open(path, "wb") as f:
            if response.status_code != 200:
                raise self._refused(response, location)
            self._check_served(response, location)
            for chunk in response.iter_bytes():
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        if size != self.size:
            raise ConnectionError(f"downloaded {size} bytes of {self.size}")
        if digest.hexdigest() != self.etag:
            what = "sha256" if self.sha256 is not None else "git blob id"
            raise ConnectionError(f"downloaded bytes have {what} {digest.hexdigest()}, not the {self.etag} listed")

    def _transient(self, exc: Exception) -> bool:
        """The hub's transient answers, and this file's own: a short or overlong body, a wrong
        Content-Range, a download of the wrong size or sha256, an expired storage location (the
        retry resolves the file again); never HF_HUB_OFFLINE."""
        from huggingface_hub.errors import OfflineModeIsEnabled

        return _transient(exc) or (isinstance(exc, ConnectionError) and not isinstance(exc, OfflineModeIsEnabled))

    def _reset(self) -> None:
        self._location = None

    def identity(self) -> dict[str, Any]:
        """The file's URL, size, sha256 (LFS files) and ETag; its revision and commit are its checkpoint's."""
        return {"url": self.label, "size": self.size, "sha256": self.sha256, "etag": self.etag}

    def matches(self, recorded: Mapping[str, Any]) -> bool:
        """The same size and content: sha256 for LFS files (also against a local file's), else the git blob id."""
        same = recorded.get("etag") == self.etag or (self.sha256 is not None and recorded.get("sha256") == self.sha256)
        return recorded.get("size") == self.size and same


class HubRevision(RemoteFolder):
    """The top folder of one revision of a hub repository, at the revision's commit."""

    def __init__(self, source: HubSource, revision: str, commit: str):
        super().__init__(f"{source.url}@{revision}")
        self.source, self.revision, self.commit = source, revision, commit

    def exists(self) -> bool:
        return True

    def _list(self) -> dict[str, RemoteFile | RemoteFolder]:
        from huggingface_hub.hf_api import RepoFile

        entries = retrying(self.label, "listing files", lambda: list(
            self.source.api.list_repo_tree(self.source.repo_id, revision=self.commit)), _transient)
        return {e.path: HubFile(self, e, self.source.workspace) for e in entries if isinstance(e, RepoFile)}


class HubSource(Source):
    """The selected revisions of a hub model repository, one checkpoint each."""

    def __init__(self, url: str, revisions: str | Sequence[str] | None, workspace: Workspace):
        match = _REPO.fullmatch(url)
        if match is None:
            raise SourceError(f"{url}: not a hub model repository; write hf://org/name and select revisions "
                              "with revisions (--revisions)")
        try:
            from huggingface_hub import HfApi
        except ImportError:
            raise SourceError(f"{url}: reading the hub needs huggingface_hub: "
                              "pip install 'spectral-analyzer[hub]'") from None
        self.repo_id = match[1]
        self.url = f"hf://{self.repo_id}"
        self.revisions = revisions
        self.workspace = workspace
        self.api = HfApi()
        self.endpoint = self.api.endpoint
        self.record: dict[str, Any] = {}

    def _refs(self) -> dict[str, str]:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        def list_refs():
            try:
                return self.api.list_repo_refs(self.repo_id)
            except GatedRepoError:
                raise SourceError(f"{self.url}: a gated repository; accept its terms on the hub and log in "
                                  "(hf auth login) or set HF_TOKEN") from None
            except RepositoryNotFoundError:
                raise SourceError(f"{self.url}: no such repository at {self.endpoint} (a private one needs a "
                                  "login: hf auth login, or HF_TOKEN)") from None

        refs = retrying(self.url, "listing revisions", list_refs, _transient)
        available: dict[str, str] = {}
        for ref in [*refs.branches, *refs.tags]:
            available.setdefault(ref.name, ref.target_commit)
        return available

    def checkpoints(self, steps: Sequence[int] | None = None) -> list[Checkpoint]:
        """One checkpoint per selected revision, in step order.

        Each records its revision and commit (and, as ``aliases``, the
        revisions without a step at the same commit) and, as digests, the
        sha256 the hub lists for its files: byte-identical revisions are told
        before a tensor is fetched. Revisions without a step that no selected
        revision shares a commit with are left out (when no revisions are
        asked for), and recorded so.
        """
        if steps is not None:
            raise StepError(f"{self.url}: steps come from the revisions' names; select revisions instead")
        available = self._refs()
        chosen = select_revisions(self.url, list(available), self.revisions)
        unstepped = [n for n, step in _steps(list(available))[0].items() if step is None]
        found = []
        for name, step in chosen:
            commit = available[name]
            revision = HubRevision(self, name, commit)
            files = checkpoint_files(revision)
            if not files:
                raise NoCheckpointsError(
                    f"{revision.label}: no weights (looked for model.safetensors, pytorch_model.bin, their shard "
                    "indexes and other *.safetensors / *.bin files at the top of the revision)"
                )
            origin: dict[str, Any] = {"revision": name, "commit": commit}
            aliases = [n for n in unstepped if available[n] == commit]
            if aliases:
                origin["aliases"] = aliases
            found.append(Checkpoint(revision.label, files, step, origin, tuple(f.sha256 for f in files),
                                    passed_over(revision, files)))
        commits = {available[n] for n, _ in chosen}
        left_out = [] if self.revisions is not None else [
            {"revision": n, "commit": available[n], "reason": "no step in the revision name"}
            for n in unstepped if available[n] not in commits]
        config = read_config(found[0].files[0].parent) if found else None
        self.record = {"repo": self.repo_id, "endpoint": self.endpoint, "left_out": left_out,
                       **({"config": config} if config is not None else {})}
        return found

    def provenance(self) -> dict[str, Any]:
        """``{"hub": ...}``: the repository, the endpoint, the revisions left out and the first revision's
        ``config.json`` (architecture, heads, widths), as a hub cache records its own."""
        return {"hub": self.record}

    def close(self) -> None:
        self.workspace.close()
