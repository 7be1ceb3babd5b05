"""DeepSpeed checkpoint folders: ``global_step<N>/mp_rank_00_model_states.pt`` and its ``module`` state dict.

DeepSpeed saves under a ``save_dir`` one tag folder per checkpoint
(``global_step<N>``, the step in its name), a ``latest`` file naming the
newest tag, and a copy of ``zero_to_fp32.py``. Without ZeRO stage 3 the tag
folder holds ``mp_rank_00_model_states.pt``, a pickle whose ``module`` entry is
the model's full state dict (in the model's own dtype: fp16/bf16 under mixed
precision, the fp32 master weights being in the optimizer shards) beside
``global_steps`` and DeepSpeed's bookkeeping; ZeRO-1/2 add
``zero_pp_rank_*_mp_rank_00_optim_states.pt`` optimizer shards, never read.

Under ZeRO-3 the parameters themselves are partitioned:
``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` hold placeholders for them,
and the weights exist only split across the optimizer shards. Such folders
are refused with the one command that consolidates them, DeepSpeed's
``zero_to_fp32.py``. So are model-parallel checkpoints (``mp_rank_01`` ...),
whose tensors are split across files in layouts DeepSpeed does not record.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import torch

from ..errors import CheckpointError
from .readers import CheckpointReader, KeyOptions, _torch_load, add_state_dict

__all__ = ["deepspeed_files", "is_model_states", "read_deepspeed"]

_MODEL_STATES = re.compile(r"^mp_rank_([0-9]+)_model_states\.pt$")
_ZERO3_STATES = re.compile(r"^zero_pp_rank_[0-9]+_mp_rank_[0-9]+_model_states\.pt$")
_TAG = re.compile(r"^global_step[0-9]+$")
_EXPERT_STATES = re.compile(r"^(?:layer_[0-9]+_)?expert_[0-9]+_mp_rank_[0-9]+_model_states\.pt$")


def is_model_states(path: Path) -> bool:
    return _MODEL_STATES.match(path.name) is not None


def _consolidate(folder: Path) -> str:
    """The command that writes a consolidated fp32 copy of the checkpoint in tag folder *folder*."""
    save_dir = folder.parent
    out = save_dir.parent / f"{save_dir.name}-fp32" / folder.name
    words = ["python", str(save_dir / "zero_to_fp32.py"), str(save_dir), str(out), "-t", folder.name]
    return " ".join(shlex.quote(w) for w in words)  # a folder named "my run" stays one argument


def _refuse_zero3(folder: Path, file: Path) -> CheckpointError:
    return CheckpointError(
        f"{file}: a DeepSpeed ZeRO-3 checkpoint, its parameters partitioned across ranks; consolidate it first "
        f"with: {_consolidate(folder)} (then ingest {folder.parent.name}-fp32/)"
    )


def _tag_folder(folder: Path) -> Path | None:
    """The DeepSpeed tag folder of *folder*: itself, the one ``latest`` names, or its only ``global_step*``."""
    if any(_MODEL_STATES.match(f.name) or _ZERO3_STATES.match(f.name) for f in folder.iterdir()):
        return folder
    latest = folder / "latest"
    if latest.is_file() and latest.stat().st_size < 4096:
        try:
            tag = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            tag = ""
        if tag and "/" not in tag and tag not in (".", "..") and (folder / tag).is_dir():
            return folder / tag
    tags = [d for d in folder.iterdir() if d.is_dir() and _TAG.match(d.name)]
    return tags[0] if len(tags) == 1 else None


def deepspeed_files(folder: Path) -> tuple[Path, ...] | None:
    """``(mp_rank_00_model_states.pt,)`` of the DeepSpeed checkpoint in *folder*, ``None`` if it holds none.

    *folder* is a tag folder (``global_step<N>``) or one holding tag folders
    and ``latest`` (an HF Trainer's ``checkpoint-<N>`` under DeepSpeed). ZeRO-3
    and model-parallel checkpoints are refused here, naming the file.
    """
    tag = _tag_folder(folder)
    if tag is None:
        return None
    names = sorted(f.name for f in tag.iterdir())
    ranks = sorted(f for f in names if _MODEL_STATES.match(f))
    zero3 = [f for f in names if _ZERO3_STATES.match(f)]
    if not ranks and zero3:
        raise _refuse_zero3(tag, tag / zero3[0])
    if not ranks:
        return None
    if len(ranks) > 1 or ranks[0] != "mp_rank_00_model_states.pt":
        raise _refuse_model_parallel(tag / ranks[-1], f"{len(ranks)} mp_rank files" if len(ranks) > 1 else
                                     "mp_rank_00 is missing")
    experts = [f for f in names if _EXPERT_STATES.match(f)]
    if experts:  # DeepSpeed MoE takes the experts out of mp_rank_00's module: read alone, they would be lost
        raise CheckpointError(
            f"{tag / experts[0]}: a DeepSpeed mixture-of-experts checkpoint, whose experts are saved apart from "
            f"{ranks[0]} ({len(experts)} expert files); these are not read: consolidate the model into one "
            "state dict (zero_to_fp32.py, or save it gathered) and ingest that")
    return (tag / ranks[0],)


def _refuse_model_parallel(file: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{file}: a model-parallel DeepSpeed checkpoint ({why}); its tensors are split across the mp_rank files: "
        "merge them into one state dict (or save with the model gathered) first"
    )


def read_deepspeed(path: Path, label: str, keys: KeyOptions) -> CheckpointReader:
    """The ``module`` state dict of ``mp_rank_00_model_states.pt``, its step from ``global_steps``.

    A file saved by one rank of several model-parallel ones (``mp_world_size`` above 1) holds part of
    each tensor and is refused. A ``module`` whose parameters are empty placeholders where ``param_shapes``
    records real shapes (ZeRO-3 states under another name) is refused with
    the consolidation command.
    """
    obj = _torch_load(path)
    module = obj.get("module") if isinstance(obj, dict) else None
    if not isinstance(module, dict) or not any(isinstance(v, torch.Tensor) for v in module.values()):
        raise CheckpointError(f"{path}: no 'module' state dict, which DeepSpeed model states hold")
    mp = obj.get("mp_world_size")
    if isinstance(mp, int) and not isinstance(mp, bool) and mp > 1:  # the other ranks' files are not beside it
        raise _refuse_model_parallel(path, f"mp_world_size {mp}, one mp_rank file")
    shapes: dict = {}
    for group in obj.get("param_shapes") or ():
        if isinstance(group, dict):
            shapes.update(group)
    for name, t in module.items():
        shape = shapes.get(name)
        real = isinstance(shape, (tuple, list)) and all(isinstance(s, int) for s in shape) and math.prod(shape) > 0
        if isinstance(t, torch.Tensor) and t.numel() == 0 and real:
            raise _refuse_zero3(path.parent, path)
    reader = CheckpointReader(label, {})
    add_state_dict(reader, {"state_dict": module, "global_step": obj.get("global_steps")}, path, keys)
    return reader
