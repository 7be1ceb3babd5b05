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
  copy of the model, sharded or not) are left out.

A folder with a number in its name that yields no model weights is refused
with what it holds when it looks like a checkpoint (a step word in its name,
weight files, pickles or a shard index in it), and passed over otherwise (a
``wandb_2`` log folder, a Zarr store such as ``step_1000.zarr``): a checkpoint
is never dropped from a run in silence.
So is a folder whose weights are ambiguous: several pickles with no index
naming them shards of one model, or two torch.distributed.checkpoint models.

Steps come from the file or folder name (``step=1200``, ``checkpoint-500``,
else the last number in the name, shard numbers ``-00001-of-00002`` and
precisions ``fp16`` never, nor numbers in Lightning's ``epoch=2-val_loss=0.35``),
else from a ``step`` / ``global_step`` stored in the file, else they must be
given; they must fit a 64-bit integer. A name whose step is a bare number
(``gpt2``) among names that say their step (``step_100``) is refused, and so is
a step in a name that the file's own stored step contradicts. A step number followed by a letter
(``ckpt_1k``, ``step2B``) is refused, not read as ``1`` or ``2``; so is one
written in other digits than 0-9 (full-width ``checkpoint-１０００``).

A weight file that is not a regular file (a FIFO, a device, a symlink to
nothing) is listed all the same, and refused with its name when it is opened,
rather than skipped.

The same rules read a remote folder (:class:`~.sources.RemoteFolder`: a
folder at an fsspec URL, a hub revision), whose files are then
:class:`~.sources.RemoteFile` objects.
"""

from __future__ import annotations

import filecmp
import fnmatch
import json
import os
import re
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, NoCheckpointsError, StepError, UnreadWeightsWarning, printable
from ..groups import natural_key
from .dcp import METADATA, dcp_files
from .deepspeed import deepspeed_files
from .readers import shard_files
from .sources import RemoteFile, RemoteFolder

__all__ = ["Checkpoint", "check_one_stage", "checkpoint_files", "copies_of", "discover", "natural_key",
           "order_by_step", "passed_over", "same_bytes", "step_from_name"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# torch.save's files as timm and the PyTorch ImageNet example name them (a torch zip or pickle, not a tar)
TORCH_TAR = (".pth.tar", ".pt.tar")
NOT_WEIGHTS = (
    "optimizer*",
    "scheduler*",
    "scaler*",
    "rng_state*",
    "training_args*",
    "*.index.json",
    "trainer_state*",
    "sampler*",  # Accelerate's save_state: the sampler's and the data loader's state
    "dl_state_dict*",
)
_STEP_WORD = re.compile(r"(?:global_step|step|checkpoint|ckpt|iteration|iter)[=_\-]?(\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")
_SHARD = re.compile(r"-[0-9]+-of-[0-9]+")  # model-00001-of-00002: the shard's place, not a step
# model.fp16, pytorch_model.bf16, weights-int8: a precision, not a step
_VERSION = re.compile(r"-v[0-9]+(?=(?:\.[A-Za-z]+)?$)")  # last-v1.ckpt: Lightning's second file of one name
_PRECISION = re.compile(r"(?<![^\W_])(?:fp|bf|float|int)(?:4|8|16|32|64)(?![^\W_])", re.IGNORECASE)
# A checkpoint compressed or archived (step_300.pt.gz, checkpoint-300.tar.zst): not read, so told
_PACKED = re.compile(r"(?:\.(?:safetensors|pt|pth|bin|ckpt)\.(?:gz|bz2|xz|zst|lz4|zip|7z)"
                     r"|(?<!\.pth)(?<!\.pt)\.tar|\.(?:tar\.(?:gz|bz2|xz|zst|lz4)|tgz|zip|7z))$", re.IGNORECASE)
_MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "model.bin")


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
    passed_over: tuple[str, ...] = ()  # weight files beside its files, not read (:func:`passed_over`)


def _numbers_of(name: str) -> str:
    """*name* without the numbers that are never steps: a shard's place, a precision, Lightning's version
    suffix (``last-v1``); the separators around a precision taken out become one (``ckpt_fp16_1000``)."""
    name = _PRECISION.sub("", _VERSION.sub("", _SHARD.sub("", name)))
    return re.sub(r"[_\-.]{2,}", lambda m: m.group()[0], name)


def has_step_word(name: str) -> bool:
    """Whether *name* says which number is its step (``step``, ``checkpoint``, ``iter``...)."""
    return _STEP_WORD.search(_numbers_of(name)) is not None


def step_from_name(name: str, last_number: bool = True, label: str | None = None) -> int | None:
    """The step in *name*: after ``step``, ``checkpoint``, ``iter``... else (with *last_number*) its last number.

    Shard numbers (``model-00001-of-00002``) and precisions (``model.fp16``)
    are never the step; nor is a number in a name of ``key=value`` parts
    with no step among them (Lightning's ``epoch=2-val_loss=0.35``: the
    step is read from the file). A step followed by a letter (``ckpt_1k``,
    ``step2B``) raises :class:`StepError` naming *label* (default: *name*)
    rather than guess what the letter means.

    >>> step_from_name("stage1-step1000-tokens4B")
    1000
    >>> step_from_name("model-00002-of-00002") is None
    True
    >>> step_from_name("epoch=2-val_loss=0.35") is None
    True
    """
    name = _numbers_of(name)
    found = [(m.group(1), m.end(1)) for m in _STEP_WORD.finditer(name)]
    if not found and last_number:  # numbers outside key=value parts (Lightning's epoch=2-val_loss=0.35)
        found = [(m.group(), m.end()) for m in _NUMBER.finditer(name)
                 if "=" not in re.split(r"[-_]", name[: m.end()])[-1] + re.split(r"[-_]", name[m.end():])[0]]
    if not found:
        return None
    digits, end = found[-1]
    if not digits.isascii():  # \d matches the digits of every script, and int() reads them
        raise StepError(
            f"{printable(label or name)}: its step {digits} is not written in the digits 0-9; rename it so that "
            "it is (a look-alike of a step is not read as one)"
        )
    suffix = re.match(r"[^\W\d_]*", name[end:]).group()  # letters right after the number
    if suffix:
        raise StepError(
            f"{printable(label or name)}: {digits}{printable(suffix)} in its name is a number followed by letters, "
            "not a step (1k is not read as 1000); name checkpoints by their whole step (ckpt_1000)"
        )
    return int(digits)


def _present(path: Path | RemoteFile) -> bool:
    """Whether *path* is there and not a folder: a regular file, or a FIFO, device or link to nothing that is
    refused, with its name, when read."""
    if isinstance(path, Path) and path.is_symlink():
        return not path.is_dir()
    return path.exists() and not path.is_dir()


def _is_weight_file(path: Path) -> bool:
    """A file with a weight suffix that is not optimizer, scheduler or trainer state; a hidden file on local
    disk (``.name``: a copy being written, an editor's or a sync tool's) is no checkpoint. A weight suffix in
    other letters (``step_2.PT``) is refused: passed over, the run would lose that checkpoint in silence."""
    if isinstance(path, Path) and path.name.startswith(".") or not _present(path):
        return False
    suffix = next((t for t in TORCH_TAR if path.name.lower().endswith(t)), PurePosixPath(path.name).suffix.lower())
    if (
        suffix not in (*WEIGHT_SUFFIXES, *TORCH_TAR)
        or any(fnmatch.fnmatch(path.name.lower(), g) for g in NOT_WEIGHTS)
    ):
        return False
    if not path.name.endswith(suffix):
        raise CheckpointError(printable(f"{path}: a weight file's suffix in capitals; rename it "
                                        f"{path.name[:-len(suffix)]}{suffix} to read it"))
    return True


_PRECISION_VARIANT = re.compile(r"\.(?:fp|bf|float|int)(?:4|8|16|32|64)$")  # model.fp16: the variant= infix
_DISTRIBUTED = re.compile(r"model_states\.pt$|\.distcp$|^\.metadata$")
# The model's weights in another format or precision, as from_pretrained chooses between them (variant=fp16),
# or as other tools export them (Mistral's consolidated, OpenVINO's): never a second model
_ALTERNATES = re.compile(r"^(?:model|pytorch_model|consolidated|openvino_model)(?:\.[a-z]+[0-9]+)?"
                         r"(?:-[0-9]+-of-[0-9]+)?(?:\.[0-9]+)?\.(?:safetensors|bin|pth?)$")


def passed_over(folder: Path | RemoteFolder, files: Sequence[Path | RemoteFile]) -> tuple[str, ...]:
    """The weight files of a checkpoint *folder* that its *files* leave out (an adapter beside the base model,
    an EMA copy, a second model), the same weights in the other format (``pytorch_model.bin`` beside
    ``model.safetensors``) apart: told to the user, and kept in provenance."""
    if not files or any(_DISTRIBUTED.search(f.name) for f in files) or all(
            isinstance(f, Path) and f.parent != folder for f in files):
        return ()  # DeepSpeed's and torch.distributed.checkpoint's files: their folders hold the ranks' state
    def base(name: str) -> str:  # the name without its format and precision: model.fp16.bin -> model
        return _PRECISION_VARIANT.sub("", name.rsplit(".", 1)[0])

    taken = {f.name for f in files}
    bases = {base(f.name) for f in files}  # a taken file in another format: torchtune's adapter_model.pt
    entries = sorted(folder.iterdir(), key=lambda f: natural_key(f.name))
    beside = [f.name for f in entries if f.name not in taken and _is_weight_file(f)
              and not _ALTERNATES.match(f.name) and base(f.name) not in bases]
    if isinstance(folder, Path):  # a model in a subfolder (ema/, teacher/); not the ranks' state of DeepSpeed or
        for d in entries:  # DCP, nor the model in another format (a hub snapshot's original/consolidated.00.pth)
            if d.is_dir() and not d.name.startswith("."):
                inside = sorted(d.iterdir(), key=lambda f: natural_key(f.name))
                if not any(_DISTRIBUTED.search(f.name) for f in inside):
                    beside += [f"{d.name}/{f.name}" for f in inside if _is_weight_file(f) and not (
                        _ALTERNATES.match(f.name) and not f.name.startswith(("model", "pytorch_model")))]
    return tuple(beside)


def checkpoint_files(folder: Path | RemoteFolder, root: Path | None = None) -> tuple[Path | RemoteFile, ...] | None:
    """The weight files of a one-checkpoint folder, safetensors first; ``None`` if it holds none.

    Shards named by an index must resolve inside *root* (default: *folder*).
    DeepSpeed and torch.distributed.checkpoint folders are found on local
    disk only: a remote folder's are not read.
    """
    # as from_pretrained looks for them: safetensors first (a stale pytorch_model.bin.index.json beside
    # model.safetensors is never read), and the single file before the index of shards
    for name in (_MODEL_FILES[0], "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                 *_MODEL_FILES[2:]):
        path = folder / name
        if not _present(path):
            continue
        if not name.endswith(".index.json"):
            return (path,)
        shards = shard_files(path, root)
        if not shards:
            raise CheckpointError(f"{printable(str(path))}: its weight_map names no shard files; the index is damaged")
        return tuple(shards)
    distributed = None if isinstance(folder, RemoteFolder) else deepspeed_files(folder) or dcp_files(folder)
    if distributed:
        return distributed
    files = sorted((f for f in folder.iterdir() if _is_weight_file(f)), key=lambda f: natural_key(f.name))
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    chosen = safetensors or (files if len(files) == 1 else None)
    if chosen:
        _check_shard_names(folder, chosen)
        if len(chosen) > 1 and len({(m["stem"], m["n"]) if (m := _SHARD_NAME.match(f.name)) else f.name
                                    for f in chosen}) > 1:  # weights.safetensors beside ema.safetensors
            names = ", ".join(f.name for f in chosen)
            raise CheckpointError(printable(
                f"{folder}: {len(chosen)} weight files ({names}) and no model.safetensors.index.json naming them "
                "shards of one model: which is the model is not known; restore the index or keep one file"))
    return tuple(chosen) if chosen else None


_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<k>[0-9]+)-of-(?P<n>[0-9]+)(?P<suffix>\.\w+)$")


def _check_shard_names(folder: Path | RemoteFolder, files: Sequence[Path | RemoteFile]) -> None:
    """Refuse shards (``model-00001-of-00002.safetensors``) read without their index when one of them is
    missing: the checkpoint would be read without that shard's tensors (a download cut short)."""
    shards: dict[tuple[str, str, str], set[int]] = {}
    for f in files:
        if m := _SHARD_NAME.match(f.name):
            shards.setdefault((m["stem"], m["n"], m["suffix"]), set()).add(int(m["k"]))
    for (stem, n, suffix), present in shards.items():
        missing = next((k for k in range(1, int(n) + 1) if k not in present), None)
        if missing is not None:
            name = f"{stem}-{missing:0{len(n)}d}-of-{n}{suffix}"
            raise CheckpointError(printable(
                f"{folder}: holds shards of {stem}{suffix} but not {name}, and no index naming its shards; "
                "restore the missing shard (or the index) and ingest again"
            ))


def _refusal(folder: Path | RemoteFolder) -> CheckpointError | None:
    """Why *folder*, named with a number but yielding no weights, is not read; ``None`` where it looks like no
    checkpoint (no step word in its name; no weight files, pickles, shard index or torch.distributed.checkpoint)."""
    entries = sorted(folder.iterdir(), key=lambda f: natural_key(f.name))
    weights = [f.name for f in entries if _is_weight_file(f)]
    distributed = [d.name for d in entries if d.is_dir() and (d / METADATA).exists()]
    models = [name for name in distributed if not name.startswith("optim")]
    if len(weights) > 1:
        why = (f"{len(weights)} weight files ({', '.join(weights)}) and no model.safetensors.index.json or "
               "pytorch_model.bin.index.json naming them shards of one model; restore the index or keep one file")
    elif len(models) > 1:
        why = (f"{len(models)} torch.distributed.checkpoint models ({', '.join(models)}), so which is the "
               "checkpoint is not known; keep one")
    else:
        material = distributed or any(
            f.name.endswith((*WEIGHT_SUFFIXES, ".index.json")) or f.name in (METADATA, "trainer_state.json")
            for f in entries
        )
        if not material and (_STEP_WORD.search(folder.name) is None or (folder / "zarr.json").exists()):
            return None  # a log folder, or a Zarr store (a store written into the run folder, say)
        held = ", ".join(f.name + "/" * f.is_dir() for f in entries[:8]) + (", ..." if len(entries) > 8 else "")
        why = (f"no model weights (it holds {held or 'nothing'}; looked for {', '.join(_MODEL_FILES)}, a shard "
               "index, a DeepSpeed or torch.distributed.checkpoint folder); optimizer, scheduler, RNG and "
               "training-argument files are not the model. Restore the weights, or move the folder out of the run")
    return CheckpointError(printable(f"{folder}: not a checkpoint: {why}"))


def _check_utf8(path: Path) -> None:
    """Refuse a file whose name holds bytes that are not UTF-8 (``os.fsdecode`` shows them as lone surrogates):
    the safetensors and torch readers cannot open it by that name."""
    try:
        str(path).encode()
    except UnicodeEncodeError:
        raise CheckpointError(
            f"{printable(str(path))}: its name is not valid UTF-8, and checkpoints are read by UTF-8 names; rename it"
        ) from None


def _top_level_files(folder: Path, numbered: bool) -> list[Path]:
    """The weight files of *folder* (*numbered*: those with a number in their name), one per name: a
    ``.safetensors`` file before a pickle of its name (the same weights converted); two pickles of one name
    and no safetensors beside them are refused."""
    by_stem: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir(), key=lambda f: natural_key(f.name)):
        if _is_weight_file(f) and (not numbered or _NUMBER.search(_numbers_of(f.stem)) is not None):
            by_stem.setdefault(f.stem, []).append(f)
    chosen = []
    for files in by_stem.values():
        safe = [f for f in files if f.suffix == ".safetensors"]
        if not safe and len(files) > 1:
            raise CheckpointError(printable(f"{files[0]} and {files[1].name}: two checkpoints of one name; move "
                                            "one of them out of the folder"))
        chosen.append((safe or files)[0])
    return chosen


def _safetensors_body(path: Path) -> tuple[dict, int] | None:
    """A safetensors file's tensor table (its ``__metadata__`` left out) and where its data starts; None
    where the file is no such file."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:
                return None
            table = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    if not isinstance(table, dict):
        return None
    table.pop("__metadata__", None)
    return table, 8 + n


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two weight files hold the same tensors: the same bytes, or, for safetensors, the same tensor
    table and data whatever their metadata (``{"format": "pt"}`` in one of two saves of one model)."""
    if not isinstance(b, Path):
        return False
    try:
        if a.suffix == b.suffix == ".safetensors":
            heads = _safetensors_body(a), _safetensors_body(b)
            if None in heads or heads[0][0] != heads[1][0]:
                return False
            with open(a, "rb") as fa, open(b, "rb") as fb:
                fa.seek(heads[0][1])
                fb.seek(heads[1][1])
                while (x := fa.read(1 << 20)) == fb.read(1 << 20):
                    if not x:
                        return True
                return False
        return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _warn_final_model(src: Path | RemoteFolder, subdirs: Sequence[Path | RemoteFolder],
                      found: Sequence[Checkpoint]) -> None:
    """Tell the weights beside a run's ``checkpoint-<step>/`` folders that name no step and are not the bytes
    of a checkpoint's file of their name: the HF Trainer's final save at a step past the last checkpoint,
    the best checkpoint reloaded by ``load_best_model_at_end``, a ``final_model/`` folder. Their step cannot
    be known: they are not read. (A final save equal to the last checkpoint, the usual case, loses nothing.)"""
    saved: dict[str, list[Path | RemoteFile]] = {}
    for f in (f for c in found for f in c.files):
        saved.setdefault(f.name, []).append(f)

    def lost(f) -> bool:  # a remote file: by the name its source gives its bytes, where it gives one
        if isinstance(f, RemoteFile):
            return f.content_id() is None or f.content_id() not in {g.content_id() for g in saved.get(f.name, ())}
        return not any(_same_weights(f, g) for g in saved.get(f.name, ()))

    def weights(folder) -> list:
        try:
            return [f for f in sorted(folder.iterdir(), key=lambda f: natural_key(f.name))
                    if not f.is_dir() and _is_weight_file(f)]
        except OSError:  # a folder of no checkpoint that cannot be listed (lost+found): nothing to tell of
            return []

    left = [f.name for f in weights(src) if _NUMBER.search(_numbers_of(f.stem)) is None and lost(f)]
    left += [f"{d.name}/" for d in subdirs if _NUMBER.search(d.name) is None and not d.name.startswith(".")
             and any(map(lost, weights(d)))]
    if left:
        more = f" and {len(left) - 1} more" if len(left) > 1 else ""
        warnings.warn(printable(
            f"{src}/{left[0]}{more}: weights beside the checkpoint folders whose step no name gives (a final "
            "save, or the best checkpoint reloaded at the end), not read; move them into a folder named by "
            "their step to make them part of the run"), UnreadWeightsWarning, stacklevel=4)


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
    named = steps is None  # explicit steps replace the names'
    saving = [d for d in subdirs if d.name.startswith("tmp-checkpoint-")]
    if saving:  # the HF Trainer saves into tmp-checkpoint-<step>/ and renames it when the save is whole
        warnings.warn(printable(f"{saving[0]}{f' and {len(saving) - 1} more' if len(saving) > 1 else ''}: a save "
                                "in progress (or cut short), not read; its checkpoint is read once the trainer "
                                "has renamed it"), UnreadWeightsWarning, stacklevel=3)
    for d in subdirs:
        if _NUMBER.search(d.name) is None or d in saving:
            continue
        files = checkpoint_files(d)
        if files:
            found.append(Checkpoint(str(d), files, step_from_name(d.name, label=str(d)) if named else None,
                                    passed_over=passed_over(d, files)))
        elif (refusal := _refusal(d)) is not None:
            raise refusal
    # beside checkpoint-<step>/ folders, files without a number are the final model (its shards, a copy in
    # another precision)
    if found:
        _warn_final_model(src, subdirs, found)
    for f in _top_level_files(src, numbered=bool(found)):
        found.append(Checkpoint(str(f), (f,), step_from_name(f.stem, label=str(f)) if named else None))
    packed = [f.name for f in sorted(src.iterdir(), key=lambda f: natural_key(f.name))
              if _PACKED.search(f.name) and _NUMBER.search(f.name) and not f.name.startswith(".") and not f.is_dir()]
    told = (f"{packed[0]}{f' and {len(packed) - 1} more' if len(packed) > 1 else ''}: compressed or archived "
            f"checkpoint{'s' * (len(packed) > 1)}, not read; unpack {'them' if len(packed) > 1 else 'it'} to "
            "make them part of the run") if packed else ""
    if not found:
        raise NoCheckpointsError(printable(
            f"{src}: no checkpoints found (looked for {', '.join('*' + s for s in WEIGHT_SUFFIXES)} "
            f"files and checkpoint-<step>/ folders){f'; {told}' if told else ''}"
        ))
    if packed:
        warnings.warn(printable(f"{src}/{told}"), UnreadWeightsWarning, stacklevel=3)
    found.sort(key=lambda c: natural_key(Path(c.label).name))
    for f in (f for c in found for f in c.files if isinstance(f, Path)):
        _check_utf8(f)
    if named:
        _check_one_naming(found)
    if steps is not None:
        steps = [int(s) for s in steps]
        if len(steps) != len(found):
            raise StepError(f"{src}: {len(steps)} steps given for {len(found)} checkpoints")
        found = [replace(c, step=s) for c, s in zip(found, steps)]
        for a, b in zip(found, found[1:]):
            if b.step <= a.step:
                raise StepError(f"steps given are not increasing: {a.step} ({a.label}) then {b.step} ({b.label})")
    return found


def _check_one_naming(found: Sequence[Checkpoint]) -> None:
    """Refuse a checkpoint whose step is a bare number in its name (``gpt2``, ``final_3``) beside checkpoints
    whose names say their step (``step_100``): it is another file among the checkpoints, not one of them."""
    worded = next((c for c in found if has_step_word(Path(c.label).stem)), None)
    if worded is None:
        return
    for c in found:
        name = Path(c.label).stem if Path(c.label).suffix in WEIGHT_SUFFIXES else Path(c.label).name
        if c.step is not None and not has_step_word(name):
            raise StepError(printable(
                f"{c.label}: its name has no step word, where {Path(worded.label).name} says its step "
                f"({_STEP_WORD.search(_numbers_of(Path(worded.label).name)).group()}); {c.step} in its name is not "
                "read as a step. Move it out of the run, rename it (step_<N>), or give the steps"
            ))


_STAGE = re.compile(r"(?:^|[-_.])stage([0-9]+)(?=[-_.]|$)", re.IGNORECASE)


def check_one_stage(where: str, names: Sequence[str], hint: str = "select one stage's revisions ('stage1-*')"
                    ) -> None:
    """Refuse revisions of several training stages (OLMo's ``stage1-step1000``, ``stage2-...-step500``): each
    stage counts its steps from its own start, so ordered by step they would interleave."""
    stages: dict[int, str] = {}
    for name in names:
        if match := _STAGE.search(name):
            stages.setdefault(int(match[1]), name)
    if len(stages) > 1:
        a, b = list(stages.values())[:2]
        raise StepError(printable(
            f"{where}: revisions {a} and {b} are of different training stages, each counting its steps from its "
            f"own start (in step order they would interleave); {hint}"))


def same_bytes(a: Sequence[Path | RemoteFile], b: Sequence[Path | RemoteFile]) -> bool:
    """Whether two local checkpoints' files are the same bytes: one file through a link, or equal contents."""
    if len(a) != len(b) or not all(isinstance(f, Path) for f in (*a, *b)):
        return False
    try:
        return all(os.path.samefile(x, y) or filecmp.cmp(x, y, shallow=False) for x, y in zip(a, b))
    except OSError:
        return False


def copies_of(checkpoints: Sequence[Checkpoint], from_contents: Collection[str],
              same: Callable[[Checkpoint, Checkpoint], bool] | None = None) -> dict[str, str]:
    """Checkpoints that copy another: label of the copy -> label of the checkpoint it copies.

    A copy's step was read from its contents (its label in *from_contents*: Lightning's ``last.ckpt``,
    saved again, or linked, beside the newest ``epoch=E-step=S.ckpt``), the other's from its name, and
    they hold the same weights: *same* (default: the same bytes; Lightning's second save differs in its
    callbacks' state, so the ingest compares the tensors' values). The copy is not read twice; two
    checkpoints of one step that are not such a pair are refused by :func:`order_by_step`.
    """
    same = same or (lambda a, b: same_bytes(a.files, b.files))
    named: dict[int, Checkpoint] = {}
    for c in checkpoints:
        if c.label not in from_contents:
            named.setdefault(c.step, c)
    out = {}
    for c in checkpoints:
        if c.label in from_contents and (other := named.get(c.step)) is not None and same(c, other):
            out[c.label] = other.label
    return out


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
            raise StepError(printable(f"duplicate step {a.step}: {a.label} and {b.label}; move the one that is "
                                      "not this run's checkpoint of that step out of the folder"))
    return ordered
