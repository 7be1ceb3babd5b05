"""The local Hugging Face hub cache: every cached revision of one model, in step order.

What ``from_pretrained(repo, revision=...)`` leaves on disk, in
huggingface_hub's layout::

    models--<org>--<name>/
      refs/<revision>          a file holding the revision's commit hash
      snapshots/<commit>/      the revision's files, links into ../../blobs/
      blobs/<hash>             the contents; large (LFS) files named by their sha256

Each revision whose name holds a step (``step1000``, ``stage1-step1000-tokens4B``,
``ckpt_100``) is one checkpoint, read from its snapshot like any checkpoint
folder (sharded safetensors or ``pytorch_model*.bin`` with their index, as on
the hub). Revisions without a step (``main``, a pull request) are left out
with a note, unless their commit is a stepped revision's, which they then
name too. The revision, its commit and (from the blob names) each weight
file's sha256 go into provenance; the sha256 lets identical checkpoints be
found before a tensor is read. ``config.json`` of the first revision is kept
in provenance.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, NoCheckpointsError, StepError, UnreadWeightsWarning, printable
from ..groups import natural_key
from .discover import (WEIGHT_SUFFIXES, Checkpoint, check_one_stage, checkpoint_files, passed_over,
                       step_from_name)

__all__ = ["CacheListing", "is_hub_cache", "list_cache"]

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REF_TEMP = re.compile(r"\.[0-9a-f]{8}\.tmp$")  # huggingface_hub writes refs through a temporary file
_CONFIG_MAX = 1 << 20


def is_hub_cache(src: Path) -> bool:
    """Whether *src* is one repository's folder of a hub cache (``refs/`` and ``snapshots/``)."""
    try:
        return (src / "refs").is_dir() and (src / "snapshots").is_dir()
    except OSError:  # an unreadable folder: no hub cache can be told there (listing it says why)
        return False


@dataclass
class CacheListing:
    """The checkpoints of a cached repository, the revisions left out (and why), and its config."""

    repo: str
    checkpoints: list[Checkpoint]
    left_out: list[dict[str, str]] = field(default_factory=list)
    config: dict[str, Any] | None = None

    def provenance(self) -> dict[str, Any]:
        record: dict[str, Any] = {"repo": self.repo, "left_out": self.left_out}
        if self.config is not None:
            record["config"] = self.config
        return record


def _repo_id(folder: Path) -> str:
    parts = folder.name.split("--")
    return "/".join(parts[1:]) if len(parts) > 1 and parts[0] in ("models", "datasets", "spaces") else folder.name


def _refs(folder: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """revision -> commit for every ref, and the refs that hold no commit hash."""
    refs, bad = {}, []
    root = folder / "refs"
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            revision = path.relative_to(root).as_posix()
            if _REF_TEMP.search(name):
                continue
            try:
                text = path.read_text(encoding="ascii").strip() if path.stat().st_size <= 256 else ""
            except (OSError, UnicodeDecodeError):
                text = ""
            if _COMMIT.match(text):
                refs[revision] = text
            else:
                bad.append({"revision": revision, "commit": "", "reason": "its ref holds no commit hash"})
    return refs, bad


def _digest(path: Path) -> str | None:
    """The sha256 a hub cache names *path*'s blob by, if it is a link to such a blob."""
    try:
        target = os.readlink(path)
    except OSError:
        return None
    name = Path(target).name
    return name if _SHA256.match(name) else None


def _check_links(snapshot: Path) -> None:
    """Refuse weight files that link to a missing blob (an interrupted download)."""
    for entry in snapshot.rglob("*"):
        if entry.suffix in (*WEIGHT_SUFFIXES, ".json") and entry.is_symlink() and not entry.exists():
            raise CheckpointError(
                f"{entry}: links to a missing blob ({os.readlink(entry)}); the download was interrupted: "
                "download the revision again"
            )


def _config(snapshot: Path) -> dict[str, Any] | None:
    path = snapshot / "config.json"
    try:
        if not path.is_file() or path.stat().st_size > _CONFIG_MAX:
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def list_cache(folder: str | os.PathLike) -> CacheListing:
    """The cached revisions of the repository at *folder* that hold a step, as checkpoints in step order.

    A revision is left out (with its reason in :attr:`CacheListing.left_out`)
    when its name holds no step and its commit is no stepped revision's, when
    its snapshot is not on disk or holds no weight files. Two revisions of
    different commits under one step are refused; two of one commit under
    one step are one checkpoint.
    """
    folder = Path(folder)
    refs, left_out = _refs(folder)
    by_commit: dict[str, list[str]] = defaultdict(list)
    for revision, commit in refs.items():
        by_commit[commit].append(revision)
    referenced = set(by_commit)
    for snapshot in sorted((folder / "snapshots").iterdir(), key=lambda d: d.name):
        if snapshot.is_dir() and snapshot.name not in referenced:
            left_out.append({"revision": "", "commit": snapshot.name,
                             "reason": "no ref names this snapshot (downloaded by commit hash)"})
    checkpoints: dict[int, Checkpoint] = {}
    for commit in sorted(by_commit):
        names = sorted(by_commit[commit], key=natural_key)
        steps: dict[int, list[str]] = defaultdict(list)
        for name in names:
            step = step_from_name(name, last_number=False)
            if step is not None:
                steps[step].append(name)
        unstepped = [n for n in names if step_from_name(n, last_number=False) is None]
        if not steps:
            left_out.extend({"revision": n, "commit": commit, "reason": "no step in the revision name"}
                            for n in unstepped)
            continue
        snapshot = folder / "snapshots" / commit
        if not snapshot.is_dir():
            left_out.extend({"revision": n, "commit": commit, "reason": "not downloaded (no snapshot folder)"}
                            for n in names)
            continue
        _check_links(snapshot)
        files = checkpoint_files(snapshot, root=folder)
        if not files:
            left_out.extend({"revision": n, "commit": commit, "reason": "no weight files in its snapshot"}
                            for n in names)
            continue
        digests = tuple(_digest(f) for f in files)
        for step, stepped in sorted(steps.items()):
            if step in checkpoints:
                other = checkpoints[step].origin
                raise StepError(
                    f"{folder}: revisions {other['revision']} (commit {other['commit'][:12]}) and {stepped[0]} "
                    f"(commit {commit[:12]}) both have step {step}; remove one of their refs/ files"
                )
            origin: dict[str, Any] = {"revision": stepped[0], "commit": commit}
            aliases = stepped[1:] + unstepped
            if aliases:
                origin["aliases"] = aliases
            checkpoints[step] = Checkpoint(str(snapshot), files, step, origin, digests, passed_over(snapshot, files))
    if not checkpoints:
        notes = "; ".join(f"{n['revision'] or n['commit'][:12]}: {n['reason']}" for n in left_out[:3])
        raise NoCheckpointsError(
            f"{folder}: no cached revision with a step in its name to ingest" + (f" ({notes})" if notes else "")
        )
    ordered = [checkpoints[s] for s in sorted(checkpoints)]
    # stepped revisions whose weights are not here: a gap in the trajectory (what names no step is no checkpoint)
    missing = [n for n in left_out if n["revision"] and n["reason"] != "no step in the revision name"]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        warnings.warn(printable(f"{folder}: revision {missing[0]['revision']} ({missing[0]['reason']}){more} left "
                                "out of the run; download it (from_pretrained(..., revision=...)) to ingest it"),
                      UnreadWeightsWarning, stacklevel=4)
    check_one_stage(str(folder), [c.origin["revision"] for c in ordered],
                    "ingest one stage: the hub's revisions with --revisions 'stage1-*', or this cache with the "
                    "other stages' refs/ files moved out")
    return CacheListing(_repo_id(folder), ordered, left_out, _config(Path(ordered[0].label)))
