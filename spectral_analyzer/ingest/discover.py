"""Find the checkpoints in a folder and the training step of each.

Layouts, detected automatically:

* one file per checkpoint: ``*.safetensors``, ``*.pt`` / ``*.pth`` / ``*.bin``
  state dicts, Lightning ``*.ckpt``; where a safetensors file and a pickle
  share a stem, the safetensors file is used;
* one folder per checkpoint (HF Trainer ``checkpoint-<step>/``): a
  ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
  or ``pytorch_model.bin`` (and its index); else a DeepSpeed checkpoint
  (``global_step<N>/mp_rank_00_model_states.pt``, see :mod:`.deepspeed`) or a
  torch.distributed.checkpoint folder (``.metadata`` and ``__*_*.distcp``, as
  FSDP and torchtitan write them, see :mod:`.dcp`). Optimizer, scheduler, RNG and
  training-argument pickles are never treated as checkpoints. Weight files at
  the top of such a folder with no step in their name (the Trainer's final
  copy of the model) are left out.

Steps come from the file or folder name (``step=1200``, ``checkpoint-500``,
else the last number in the name), else from a ``step`` / ``global_step``
stored in the file, else they must be given; they must fit a 64-bit integer.

A weight file that is not a regular file (a FIFO, a device) is listed all the
same, and refused with its name when it is opened, rather than skipped.

The same rules read a remote folder (:class:`~.sources.RemoteFolder`: a
folder at an fsspec URL, a hub revision), whose files are then
:class:`~.sources.RemoteFile` objects.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import NoCheckpointsError, StepError
from ..groups import natural_key
from .dcp import dcp_files
from .deepspeed import deepspeed_files
from .readers import shard_files
from .sources import RemoteFile, RemoteFolder

__all__ = ["Checkpoint", "checkpoint_files", "discover", "natural_key", "order_by_step", "step_from_name"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
NOT_WEIGHTS = (
    "optimizer*",
    "scheduler*",
    "scaler*",
    "rng_state*",
    "training_args*",
    "*.index.json",
    "trainer_state*",
)
_STEP_WORD = re.compile(r"(?:global_step|step|checkpoint|ckpt|iteration|iter)[=_\-]?(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: its files, the name its step is read from, and its step.

    *origin* is recorded with the checkpoint's files in provenance (a hub
    revision's name and commit); *digests* are the sha256 of its files where
    known without reading them (a hub cache's blob names), else None.
    """

    label: str  # path or URL shown in messages
    files: tuple[Path | RemoteFile, ...]
    step: int | None
    origin: Mapping[str, Any] = field(default_factory=dict)
    digests: tuple[str | None, ...] = ()


def step_from_name(name: str, last_number: bool = True) -> int | None:
    """The step in *name*: after ``step``, ``checkpoint``, ``iter``... else (with *last_number*) its last number."""
    match = _STEP_WORD.findall(name)
    if match:
        return int(match[-1])
    numbers = _NUMBER.findall(name) if last_number else []
    return int(numbers[-1]) if numbers else None


def _present(path: Path) -> bool:
    """Whether *path* is there and not a folder: a regular file, or a FIFO or device to be refused when read."""
    return path.exists() and not path.is_dir()


def _is_weight_file(path: Path) -> bool:
    return (
        _present(path)
        and path.suffix in WEIGHT_SUFFIXES
        and not any(fnmatch.fnmatchcase(path.name, g) for g in NOT_WEIGHTS)
    )


def checkpoint_files(folder: Path | RemoteFolder, root: Path | None = None) -> tuple[Path | RemoteFile, ...] | None:
    """The weight files of a one-checkpoint folder, safetensors first; ``None`` if it holds none.

    Shards named by an index must resolve inside *root* (default: *folder*).
    DeepSpeed and torch.distributed.checkpoint folders are found on local
    disk only: a remote folder's are not read.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if _present(folder / index_name):
            shards = shard_files(folder / index_name, root)
            if index_name.startswith("model.safetensors") or not _present(folder / "model.safetensors"):
                return tuple(shards)
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "model.bin"):
        if _present(folder / name):
            return (folder / name,)
    distributed = None if isinstance(folder, RemoteFolder) else deepspeed_files(folder) or dcp_files(folder)
    if distributed:
        return distributed
    files = sorted((f for f in folder.iterdir() if _is_weight_file(f)), key=lambda f: natural_key(f.name))
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    if safetensors:
        return tuple(safetensors)
    return tuple(files) if len(files) == 1 else None


def _top_level_files(folder: Path) -> list[Path]:
    by_stem: dict[str, Path] = {}
    for f in sorted(folder.iterdir(), key=lambda f: natural_key(f.name)):
        if not _is_weight_file(f):
            continue
        current = by_stem.get(f.stem)
        if current is None or f.suffix == ".safetensors":
            by_stem[f.stem] = f
    return list(by_stem.values())


def discover(src: str | Path | RemoteFolder, steps: Sequence[int] | None = None) -> list[Checkpoint]:
    """List the checkpoints under *src*, in order of natural name.

    Steps are those found in names; ``None`` where a name has none (the
    reader then looks inside the file). Explicit *steps* are assigned in
    natural name order and must increase.
    """
    src = src if isinstance(src, RemoteFolder) else Path(src)
    if not src.exists():
        raise NoCheckpointsError(f"{src}: no such folder")
    if not src.is_dir():
        raise NoCheckpointsError(
            f"{src}: is a file; ingest reads the folder that holds the checkpoints (e.g. {src.parent or '.'})"
        )
    found: list[Checkpoint] = []
    subdirs = sorted((d for d in src.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name))
    for d in subdirs:
        if _NUMBER.search(d.name) is None:
            continue
        files = checkpoint_files(d)
        if files:
            found.append(Checkpoint(str(d), files, step_from_name(d.name)))
    has_folders = bool(found)
    for f in _top_level_files(src):
        step = step_from_name(f.stem)
        if has_folders and step is None:
            continue  # the final model beside checkpoint-<step>/ folders
        found.append(Checkpoint(str(f), (f,), step))
    if not found:
        raise NoCheckpointsError(
            f"{src}: no checkpoints found (looked for {', '.join('*' + s for s in WEIGHT_SUFFIXES)} "
            "files and checkpoint-<step>/ folders)"
        )
    found.sort(key=lambda c: natural_key(Path(c.label).name))
    if steps is not None:
        steps = [int(s) for s in steps]
        if len(steps) != len(found):
            raise StepError(f"{src}: {len(steps)} steps given for {len(found)} checkpoints")
        found = [replace(c, step=s) for c, s in zip(found, steps)]
        for a, b in zip(found, found[1:]):
            if b.step <= a.step:
                raise StepError(f"steps given are not increasing: {a.step} ({a.label}) then {b.step} ({b.label})")
    return found


def order_by_step(checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    """Sort by step, refusing missing, duplicate and out-of-range steps with the files named."""
    for c in checkpoints:
        if c.step is None:
            raise StepError(
                f"{c.label}: no step in its name or contents; name files by step or pass steps explicitly"
            )
        if not -(2**63) <= c.step < 2**63:
            raise StepError(
                f"{c.label}: step {c.step} does not fit a 64-bit integer; name files by step or pass steps explicitly"
            )
    ordered = sorted(checkpoints, key=lambda c: c.step)
    for a, b in zip(ordered, ordered[1:]):
        if a.step == b.step:
            raise StepError(f"duplicate step {a.step}: {a.label} and {b.label}")
    return ordered
