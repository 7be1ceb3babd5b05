"""A Hugging Face hub on loopback: the HTTP endpoints huggingface_hub calls to list refs, list and resolve files.

Served, as huggingface_hub (2.x; the same endpoints since 1.0) requests and checks them:

* ``GET /api/models/{repo}/refs``: ``{"branches": [{"name", "ref", "targetCommit"}], "converts": [], "tags": []}``
  (:meth:`HfApi.list_repo_refs`);
* ``GET /api/models/{repo}/tree/{revision}``: the top folder's files, ``{"type": "file", "path", "size", "oid"}``
  and, for LFS files, ``"lfs": {"oid": sha256, "size", "pointerSize"}`` (:meth:`HfApi.list_repo_tree`), one
  page (no ``Link`` header);
* ``HEAD`` / ``GET /{repo}/resolve/{revision}/{path}``: ``X-Repo-Commit`` on every answer. A weight file (LFS:
  ``*.safetensors``, ``*.bin``, ``*.pt``) answers 302 with ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and
  ``Location`` (the storage's ``/lfs/{sha256}``); another file answers 200 with
  ``ETag`` (its git blob id) and the bytes. A revision or file that is not there answers 404 with
  ``X-Error-Code`` ``RevisionNotFound`` / ``EntryNotFound`` (``RepoNotFound`` for a repository);
* ``GET /lfs/{sha256}`` on a second port, standing for the hub's storage (another origin, as the hub's
  storage is: huggingface_hub does not follow a redirect to another origin when it reads a file's metadata, and
  sends no token there): the bytes, with ``Range: bytes=a-b`` answered 206 and ``Content-Range``.

Every answer is logged (method, path, range, status, body bytes sent) for the tests that count bytes;
:meth:`LoopbackHub.fail` makes chosen requests answer 503 (or drop the connection) a number of times.
``LoopbackHub(link=bytes_per_second)`` sends the storage's bytes at that rate, shared by all connections, as
a network link between the hub and the user would (the benchmark's distant hub).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import torch

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
POINTER_SIZE = 134  # bytes of a git-lfs pointer file


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    """A file's content: bytes in memory, or a file on disk (sent with sendfile)."""

    data: bytes | None = None
    path: Path | None = None
    size: int = 0
    sha256: str = ""
    blob_id: str = ""

    @classmethod
    def of(cls, data: bytes) -> Blob:
        return cls(data=data, size=len(data), sha256=hashlib.sha256(data).hexdigest(), blob_id=git_blob_id(data))

    @classmethod
    def on_disk(cls, path: Path, sha256: str | None = None) -> Blob:
        """A file served from disk; its blob id is not computed (it is an LFS file)."""
        if sha256 is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
            sha256 = h.hexdigest()
        return cls(path=path, size=path.stat().st_size, sha256=sha256, blob_id=hashlib.sha1(sha256.encode()).hexdigest())


@dataclass
class Revision:
    commit: str
    files: dict[str, Blob] = field(default_factory=dict)


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    sent: int  # body bytes (logged as the body starts to go)
    token: bool = False  # whether an Authorization header came with it


class Link:
    """A link of *rate* bytes per second shared by every body sent: each piece waits for its turn."""

    PIECE = 1 << 20

    def __init__(self, rate: float):
        self.rate = float(rate)
        self._free_at = 0.0
        self._lock = threading.Lock()

    def wait(self, n: int) -> None:
        """Block until *n* more bytes have had their time on the link."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + n / self.rate
            done = self._free_at
        time.sleep(max(0.0, done - time.monotonic()))


class LoopbackHub:
    """Model repositories served on 127.0.0.1; use as a context manager (or start / stop).

    *link*: the storage's bytes per second, shared by all connections (None: as fast as loopback goes).
    """

    def __init__(self, link: float | None = None):
        self.link = None if link is None else Link(link)
        self.repos: dict[str, dict[str, Revision]] = {}
        self.private: dict[str, str] = {}  # repo id: the token that reads it (401 RepoNotFound without)
        self.blobs: dict[str, Blob] = {}
        self.log: list[Logged] = []
        self._faults: list[list] = []  # [substring, remaining (None: always), status or "drop", to let through]
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # -- content ----------------------------------------------------------------

    def add_revision(self, repo_id: str, revision: str, files: dict[str, bytes | Blob]) -> str:
        """Publish *files* as branch *revision* of *repo_id*; returns its commit hash."""
        blobs = {name: b if isinstance(b, Blob) else Blob.of(b) for name, b in files.items()}
        digest = hashlib.sha1(repo_id.encode() + revision.encode())
        for name in sorted(blobs):
            digest.update(name.encode() + blobs[name].sha256.encode())
        commit = digest.hexdigest()
        self.repos.setdefault(repo_id, {})[revision] = Revision(commit, blobs)
        for blob in blobs.values():
            self.blobs[blob.sha256] = blob
        return commit

    def fail(self, substring: str, times: int | None, status: int | str = 503, after: int = 0) -> None:
        """Answer *status* (or drop the connection: ``"drop"``) to *times* requests whose path holds
        *substring* (every one: None), once *after* such requests have been answered."""
        with self._lock:
            self._faults.append([substring, times, status, after])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def sent(self, prefix: str = "/lfs/") -> int:
        """Body bytes sent for the requests whose path starts with *prefix*."""
        with self._lock:
            return sum(e.sent for e in self.log if e.path.startswith(prefix))

    def ranges(self, sha256: str) -> list[tuple[int, int]]:
        """The byte ranges ``[a, b)`` of blob *sha256* sent so far (a whole file: ``(0, size)``)."""
        out = []
        with self._lock:
            for e in self.log:
                if e.path == f"/lfs/{sha256}" and e.method == "GET" and e.status in (200, 206):
                    a, b = _parse_range(e.range, self.blobs[sha256].size) if e.status == 206 else (0, e.sent)
                    out.append((a, b))
        return out

    # -- serving ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The hub's endpoint (``HF_ENDPOINT``)."""
        host, port = self._servers[0].server_address[:2]
        return f"http://{host}:{port}"

    @property
    def storage_url(self) -> str:
        host, port = self._servers[1].server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        for name in ("loopback-hub", "loopback-storage"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True, name=name).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _fault(self, path: str) -> int | str | None:
        with self._lock:
            for fault in self._faults:
                substring, remaining, status, after = fault
                if substring not in path or remaining == 0:
                    continue
                if after:
                    fault[3] -= 1
                    continue
                if remaining is not None:
                    fault[1] -= 1
                return status
        return None

    def _record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``[a, b)`` of a single-range header; None when it is not satisfiable."""
    m = _RANGE.fullmatch(header.strip())
    if m is None:
        return None
    a, b = m.groups()
    if a == "":
        start, stop = max(0, size - int(b)), size
    else:
        start, stop = int(a), size if b == "" else min(int(b) + 1, size)
    return (start, stop) if start < stop else None


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms wait for a delayed ACK

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # -- answers --------------------------------------------------------------------

    def _answer(self, status: int, headers: dict[str, str], body: bytes = b"", send: bool = True) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        # logged before the body goes: once a client has its answer, the log holds it
        self.hub._record(Logged(self.command, self.path.split("?")[0], self.headers.get("Range"), status,
                                len(body) if send else 0, "authorization" in self.headers))
        self.end_headers()
        if send and body:
            self.wfile.write(body)

    def _json(self, value, send: bool) -> None:
        self._answer(200, {"Content-Type": "application/json"}, json.dumps(value).encode(), send)

    def _not_found(self, code: str, send: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": f"{code} (loopback hub)", "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._answer(404, headers, json.dumps({"error": code}).encode(), send)

    def _serve(self, body: bool) -> None:
        path = urlsplit(self.path).path
        fault = self.hub._fault(path)
        if fault == "drop":
            self.hub._record(Logged(self.command, path, self.headers.get("Range"), 0, 0, "authorization" in self.headers))
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault is not None:
            self._answer(int(fault), {"Content-Type": "text/plain"}, b"service unavailable (injected)", body)
            return
        repo = next((r for r in self.hub.private if f"/{r}/" in path + "/"), None)
        if repo is not None and self.headers.get("authorization") != f"Bearer {self.hub.private[repo]}":
            headers = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Invalid credentials in Authorization header"}
            return self._answer(401, headers, b'{"error": "Invalid credentials"}', body)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs", path):
            return self._refs(m[1], body)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path):
            return self._tree(m[1], unquote(m[2]), body)
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(m[1], unquote(m[2]), unquote(m[3]), body)
        if m := re.fullmatch(r"/lfs/([0-9a-f]{64})", path):
            blob = self.hub.blobs.get(m[1])
            if blob is None:
                return self._answer(404, {}, b"", body)
            return self._bytes(blob, {"ETag": f'"{blob.sha256}"'}, body)
        self._answer(404, {}, b"", body)

    def _revision(self, repo_id: str, revision: str) -> Revision | None:
        revisions = self.hub.repos[repo_id]
        if revision in revisions:
            return revisions[revision]
        return next((r for r in revisions.values() if r.commit == revision), None)

    def _refs(self, repo_id: str, body: bool) -> None:
        if repo_id not in self.hub.repos:
            return self._not_found("RepoNotFound", body)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": r.commit}
                    for n, r in self.hub.repos[repo_id].items()]
        self._json({"branches": branches, "converts": [], "tags": []}, body)

    def _tree(self, repo_id: str, revision: str, body: bool) -> None:
        if repo_id not in self.hub.repos:
            return self._not_found("RepoNotFound", body)
        rev = self._revision(repo_id, revision)
        if rev is None:
            return self._not_found("RevisionNotFound", body)
        entries = []
        for name, blob in sorted(rev.files.items()):
            entry = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": POINTER_SIZE}
            entries.append(entry)
        self._json(entries, body)

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        if repo_id not in self.hub.repos:
            return self._not_found("RepoNotFound", body)
        rev = self._revision(repo_id, revision)
        if rev is None:
            return self._not_found("RevisionNotFound", body)
        blob = rev.files.get(name)
        if blob is None:
            return self._not_found("EntryNotFound", body, rev.commit)
        if name.endswith(LFS_SUFFIXES):
            headers = {"X-Repo-Commit": rev.commit, "X-Linked-Etag": f'"{blob.sha256}"',
                       "X-Linked-Size": str(blob.size), "ETag": f'"{blob.blob_id}"',
                       "Location": f"{self.hub.storage_url}/lfs/{blob.sha256}"}
            return self._answer(302, headers, b"", body)
        self._bytes(blob, {"X-Repo-Commit": rev.commit, "ETag": f'"{blob.blob_id}"'}, body)

    def _bytes(self, blob: Blob, headers: dict[str, str], body: bool) -> None:
        """The blob, or the range asked for (206)."""
        asked = self.headers.get("Range")
        start, stop, status = 0, blob.size, 200
        if asked is not None:
            span = _parse_range(asked, blob.size)
            if span is None:
                return self._answer(416, {"Content-Range": f"bytes */{blob.size}"}, b"", body)
            (start, stop), status = span, 206
            headers = {**headers, "Content-Range": f"bytes {start}-{stop - 1}/{blob.size}"}
        self.send_response(status)
        for k, v in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(stop - start)}.items():
            self.send_header(k, v)
        self.hub._record(Logged(self.command, urlsplit(self.path).path, asked, status, stop - start if body else 0,
                                "authorization" in self.headers))
        self.end_headers()
        if not body:
            return
        link = self.hub.link
        piece = max(stop - start, 1) if link is None else Link.PIECE
        with contextlib.nullcontext() if blob.data is not None else open(blob.path, "rb") as f:
            for a in range(start, stop, piece):
                n = min(piece, stop - a)
                if link is not None:
                    link.wait(n)
                if blob.data is not None:
                    self.wfile.write(memoryview(blob.data)[a : a + n])
                else:
                    self.connection.sendfile(f, a, n)


# -- a GPT-NeoX-shaped model under Pythia-style revisions ---------------------------------------------

PYTHIA_REVISIONS = ["step0", "step1", "step2", "step4", "step1000", "step2000", "step3000"]


def gpt_neox_shapes(hidden: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """The floating tensors of a GPT-NeoX causal LM (as Pythia's checkpoints name them), with their shapes."""
    shapes: dict[str, tuple[int, ...]] = {"gpt_neox.embed_in.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "input_layernorm.bias": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,), p + "post_attention_layernorm.bias": (hidden,),
            p + "attention.query_key_value.weight": (3 * hidden, hidden), p + "attention.query_key_value.bias": (3 * hidden,),
            p + "attention.dense.weight": (hidden, hidden), p + "attention.dense.bias": (hidden,),
            p + "attention.rotary_emb.inv_freq": (hidden // 8,),
            p + "mlp.dense_h_to_4h.weight": (4 * hidden, hidden), p + "mlp.dense_h_to_4h.bias": (4 * hidden,),
            p + "mlp.dense_4h_to_h.weight": (hidden, 4 * hidden), p + "mlp.dense_4h_to_h.bias": (hidden,),
        })
    shapes.update({"gpt_neox.final_layer_norm.weight": (hidden,), "gpt_neox.final_layer_norm.bias": (hidden,),
                   "embed_out.weight": (vocab, hidden)})
    return shapes


def gpt_neox_config(hidden: int, layers: int, vocab: int, heads: int = 4) -> dict:
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": 4 * hidden,
            "vocab_size": vocab, "rotary_pct": 0.25, "torch_dtype": "float16"}


def pythia_states(revisions: list[str], hidden: int = 16, layers: int = 1, vocab: int = 40, seed: int = 0,
                  identical: tuple[str, str] | None = ("step2000", "step3000"),
                  dtype: torch.dtype = torch.float16) -> dict[str, dict[str, torch.Tensor]]:
    """A random walk of GPT-NeoX states, one per revision; the revisions in *identical* hold the same tensors.

    Each layer also holds the causal-mask buffer ``attention.bias`` (bool), which is not a parameter.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = gpt_neox_shapes(hidden, layers, vocab)
    state = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    out = {}
    for name in revisions:
        if out and not (identical and name == identical[1]):
            state = {k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        tensors = {k: v.to(dtype) for k, v in state.items()}
        for i in range(layers):
            tensors[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        out[name] = tensors
    return out


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata or {"format": "pt"})


def pickle_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def sharded(tensors: dict[str, torch.Tensor], n: int, fmt: str = "safetensors") -> dict[str, bytes]:
    """*tensors* split into *n* shards with their index, named as transformers names them."""
    names = sorted(tensors)
    groups = [names[i::n] for i in range(n)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    files, weight_map = {}, {}
    for i, group in enumerate(groups, 1):
        shard = f"{stem}-{i:05d}-of-{n:05d}.{ext}"
        part = {k: tensors[k] for k in group}
        files[shard] = safetensors_bytes(part) if fmt == "safetensors" else pickle_bytes(part)
        weight_map.update({k: shard for k in group})
    index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
    files[f"{stem}.{ext}.index.json"] = json.dumps(index).encode()
    return files


def float_state(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items() if v.is_floating_point()}


def patch_endpoint(monkeypatch, url: str, home: Path) -> None:
    """Point huggingface_hub at *url*: ``HF_ENDPOINT`` for new processes, and the constants read from it at
    import (``constants.ENDPOINT``, and the resolve-URL template built from it) in this one. No token but
    ``HF_TOKEN``: a login saved on this machine (its token file) is not read (the file is looked for in the
    empty folder *home*)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
