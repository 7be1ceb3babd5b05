"""torch.distributed.checkpoint folders (FSDP, torchtitan), read tensor by tensor without a process group.

A DCP checkpoint is a folder of ``.metadata`` and ``__<rank>_<i>.distcp``
files. The metadata lists every tensor of the saved state (its shape, dtype
and chunks, one per shard) and where each chunk lies (file, byte offset,
length); each chunk is a ``torch.save`` of that shard. So a tensor is read
by loading its chunks with ``torch.load(weights_only=True)`` (each chunk's
small zip records, and the storages torch loads, checked against their
CRC-32: torch checks none) and copying each
into its place; no process group, no planner, and the optimizer state in the
same files is never read.

``.metadata`` is a plain pickle, which torch itself loads with
``pickle.load``; here it is unpickled with an allow-list of the few classes
DCP writes (its metadata dataclasses, ``torch.Size``, dtypes, paths), and
anything else is refused. Chunk boundaries, files and byte spans are checked
against the tensor's shape and the files before anything is read.

Which tensors are the model's: where the saved state has a ``model`` (or
``state_dict``, ``model_state_dict``) entry, as accelerate's FSDP checkpoints
(``pytorch_model_fsdp_0/``) and ``dcp.save({"model": ..., "optimizer": ...})``
have, only its tensors, under their names inside it; otherwise (torchtitan,
which saves the model's tensors at the top) every tensor except those under
``optimizer``, ``lr_scheduler``, ``dataloader``, ``train_state`` and the like. Weights left out with such
an entry (a model's module named ``scaler`` above its own submodule) are
told, as weights beside a pickle's state dict are.
The nesting is read from the metadata's ``planner_data``; a checkpoint saved
without it (``flatten_state_dict=False``) has only dotted names, and there a
leading ``model.`` is taken for a container only when every floating tensor
outside those entries has it: else (HF names, ``model.norm.weight`` beside
``lm_head.weight``) the names are kept whole.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsafeCheckpointError, printable
from .readers import (
    STATE_DICT_KEYS,
    CheckpointReader,
    KeyOptions,
    _add,
    _one_line,
    _read_span,
    _stored_step,
    require_regular_file,
    skip_unread,
)

__all__ = ["METADATA", "dcp_files", "load_metadata", "read_dcp"]

METADATA = ".metadata"
_DISTCP = re.compile(r"^__[0-9]+_[0-9]+\.distcp$")
# Top-level entries of a training state that are not model weights.
NOT_MODEL = frozenset({
    "optimizer", "optimizers", "optim", "optim_state", "optimizer_state_dict", "lr_scheduler", "lr_schedulers",
    "scheduler", "dataloader", "train_state", "rng", "rng_state", "rng_states", "extra_state", "scaler",
})
_STEP_ENTRIES = ("step", "global_step", "train_state.step")
_METADATA_MAX = 1 << 30

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING", "_StorageInfo",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: its own dataclasses, sizes, dtypes and paths, nothing else."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            if module.startswith("torch.distributed"):
                __import__(module)
            return getattr(__import__(module, fromlist=[name]), name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused to unpickle {printable(f'{module}.{name}')}; a torch.distributed.checkpoint .metadata holds "
            "only its metadata classes (save the checkpoint again with torch.distributed.checkpoint.save)"
        )


def load_metadata(path: Path) -> Any:
    """The ``Metadata`` of a DCP checkpoint, unpickled with the allow-list (see the module's notes)."""
    require_regular_file(path)
    if os.stat(path).st_size > _METADATA_MAX:
        raise CheckpointError(f"{path}: larger than {_METADATA_MAX >> 20} MiB; not a checkpoint's metadata")
    try:
        # from memory: a length in the pickle (a frame's, a string's) cannot then ask for more bytes than the file has
        md = _MetadataUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, ImportError, RecursionError, MemoryError, OverflowError, RuntimeError) as exc:
        # RuntimeError: a metadata class refusing its state (TensorProperties' memory format)
        raise CheckpointError(f"{path}: unreadable torch.distributed.checkpoint metadata ({_one_line(exc)})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict) or not isinstance(
        getattr(md, "storage_data", None), dict
    ):
        raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata (no tensor table or storage map)")
    return md


def dcp_files(folder: Path) -> tuple[Path, ...] | None:
    """The files of the DCP checkpoint in *folder* (``.metadata`` first, then the ``.distcp`` files).

    The checkpoint may be *folder* itself or one subfolder of it holding the
    model (accelerate's ``pytorch_model_fsdp_0/`` beside ``optimizer_0/``).
    ``None`` when there is none.
    """
    candidates = [folder] if (folder / METADATA).exists() else sorted(
        d for d in folder.iterdir()
        if d.is_dir() and (d / METADATA).exists() and not d.name.startswith(("optimizer", "optim"))
    )
    if len(candidates) != 1:
        return None
    root = candidates[0]
    shards = sorted((f for f in root.iterdir() if _DISTCP.match(f.name)), key=lambda f: [
        int(n) for n in re.findall(r"[0-9]+", f.name)
    ])
    return (root / METADATA, *shards)


def _spans_overlap(a: tuple, b: tuple) -> bool:
    return all(oa < ob + sb and ob < oa + sa for (oa, sa), (ob, sb) in zip(zip(*a), zip(*b)))


def _model_names(md, path: Path, told: dict[str, int] | None = None) -> dict[str, str]:
    """fqn -> the tensor's name in the model, for the tensors read (see the module's notes); *told* gets the
    entries of the training state left out that hold weights, with how many."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    planner = md.planner_data if isinstance(md.planner_data, dict) else {}
    paths = {}
    guessed = set()  # fqns without a path in planner_data: split on ".", which may split a flat name
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise CheckpointError(f"{path}: a tensor name is a {type(fqn).__name__}, not a string")
        if isinstance(entry, TensorStorageMetadata):
            keys = planner.get(fqn)
            ok = isinstance(keys, tuple) and keys and all(isinstance(k, (str, int)) for k in keys)
            if ok and ".".join(map(str, keys)) != fqn:  # DCP flattens a path to its fqn by joining it with "."
                raise CheckpointError(
                    f"{path}: tensor {fqn!r} has the planner path {keys!r}, which does not name it; the "
                    ".metadata is damaged"
                )
            paths[fqn] = tuple(str(k) for k in keys) if ok else tuple(fqn.split("."))
            if not ok:
                guessed.add(fqn)
    # a training state's other entries, at any depth (PyTorch's recipe {"app": {"model", "optim"}}, Megatron's
    # chained_0.optimizer...) and in flat names ("optimizer.state.exp_avg..." saved as one key); never inside a
    # model's container, nor a module so named that holds the parameter ("enc.scaler.weight"), nor one inside
    # a model's list of blocks ("blocks.0.scaler.0.weight"), nor a parameter so named ("rng")
    def training_state(p: tuple[str, ...]) -> str | None:
        """The entry of the training state that holds *p* (``optimizer``, ``app.optim``), or None."""
        parts = [part for key in p for part in key.split(".")]
        end = next((i for i, part in enumerate(parts) if part in STATE_DICT_KEYS), len(parts))
        at = next((i for i, part in enumerate(parts[:end]) if part in NOT_MODEL), None)
        if at is None or at >= len(parts) - 1 or any(part.isdigit() for part in parts[:at]) or (
                at == len(parts) - 2 and parts[-1].endswith(("weight", "bias"))):
            return None
        return ".".join(parts[: at + 1])

    state = {fqn: entry for fqn, p in paths.items() if (entry := training_state(p)) is not None}
    paths = {fqn: p for fqn, p in paths.items() if fqn not in state}
    weights = [fqn for fqn in paths if _floating(md.state_dict_metadata[fqn])]
    names = {fqn: ".".join(p) for fqn, p in paths.items()}
    for container in STATE_DICT_KEYS:
        inside = {fqn: ".".join(p[1:]) for fqn, p in paths.items() if p[0] == container and len(p) > 1}
        # a guessed container holds every weight: else its "model." is part of flat names (HF's "model.norm.weight"
        # beside "lm_head.weight"), which are kept whole
        if inside and (not guessed & set(inside) or all(fqn in inside for fqn in weights)):
            names = inside
            break
    if told is not None:  # weights left out with the training state: not an optimizer's entry for a weight
        kept = {*names, *names.values()}  # (optimizer.state.exp_avg.<name>, optim.state.<name>.exp_avg, ...)
        for fqn, entry in state.items():
            parts = fqn.split(".")
            if fqn.endswith(("weight", "bias")) and _floating(md.state_dict_metadata[fqn]) and not any(
                    ".".join(parts[i:]) in kept for i in range(1, len(parts))):
                told[entry] = told.get(entry, 0) + 1
    return names


def _floating(entry) -> bool:
    """Whether a tensor's entry records a floating dtype (or none readable: it is then refused when read)."""
    dtype = getattr(getattr(entry, "properties", None), "dtype", None)
    return not isinstance(dtype, torch.dtype) or dtype.is_floating_point


class _Chunks:
    """Where the chunks of one tensor are, checked, and how to assemble them."""

    def __init__(self, fqn: str, entry, locations: dict, folder: Path, files: dict[str, Path], meta: Path):
        self.fqn, self.meta = fqn, meta
        self.shape = tuple(int(s) for s in entry.size)
        self.dtype = entry.properties.dtype
        self.parts = []
        volume = 0
        boxes = []
        for chunk in entry.chunks:
            offsets, sizes = tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)
            if len(offsets) != len(self.shape) or len(sizes) != len(self.shape) or any(
                o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, self.shape)
            ):
                raise CheckpointError(
                    f"{meta}: tensor {fqn!r} of shape {self.shape} has a chunk at {offsets} of size {sizes} "
                    "outside it"
                )
            if any(_spans_overlap((offsets, sizes), box) for box in boxes):
                raise CheckpointError(f"{meta}: tensor {fqn!r} has overlapping chunks (one at {offsets})")
            boxes.append((offsets, sizes))
            n = 1
            for s in sizes:
                n *= s
            volume += n
            info = locations.get((fqn, offsets))
            if info is None:
                raise CheckpointError(f"{meta}: tensor {fqn!r}: no file is recorded for its chunk at {offsets}")
            name, start, length = info.relative_path, info.offset, info.length
            if not isinstance(name, str) or name not in files:
                raise CheckpointError(
                    f"{meta}: tensor {fqn!r}: its chunk at {offsets} is in {name!r}, which is not a .distcp file of "
                    f"{folder}"
                )
            if not all(isinstance(v, int) and v >= 0 for v in (start, length)):
                raise CheckpointError(f"{meta}: tensor {fqn!r}: its chunk at {offsets} has no valid byte span")
            if getattr(info, "transform_descriptors", None):
                how = ", ".join(map(repr, info.transform_descriptors))
                raise CheckpointError(
                    f"{files[name]}: tensor {fqn!r} is stored transformed ({how}); only plain torch.save chunks "
                    "are read: save without storage extensions"
                )
            self.parts.append((offsets, sizes, files[name], start, length))
        total = 1
        for s in self.shape:
            total *= s
        if volume != total:
            raise CheckpointError(
                f"{meta}: tensor {fqn!r} of shape {self.shape} has chunks covering {volume} of its {total} elements"
            )

    def check_spans(self, sizes: dict[Path, int]) -> None:
        for _, _, file, start, length in self.parts:
            if start + length > sizes[file]:
                raise CheckpointError(
                    f"{file}: truncated: tensor {self.fqn!r} needs bytes {start}..{start + length}, the file has "
                    f"{sizes[file]}"
                )

    def _load(self, offsets, sizes, file: Path, start: int, length: int) -> torch.Tensor:
        data = _read_span(file, start, start + length).tobytes()
        stored, loaded = [], []

        def note(storage, location):
            loaded.append(storage)
            return storage

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:  # torch checks no record's CRC-32; zipfile does
                for info in archive.infolist():
                    parts = info.filename.split("/")
                    if len(parts) == 3 and parts[1] == "data":  # a storage: checked below, as torch loads it
                        stored.append(info.CRC)
                        continue
                    with archive.open(info) as record:  # the pickle and version records, small
                        while record.read(1 << 24):
                            pass
            t = torch.load(io.BytesIO(data), map_location=note, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{file}: refused to unpickle the chunk of tensor {self.fqn!r} at {offsets} ({_one_line(exc)})"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError, LookupError, AttributeError, TypeError, AssertionError,
                OverflowError, zipfile.BadZipFile) as exc:  # OverflowError: a damaged size in the chunk's zip
            raise CheckpointError(
                f"{file}: unreadable chunk of tensor {self.fqn!r} at bytes {start}..{start + length} ({_one_line(exc)})"
            ) from None
        # what torch gave, against the records' CRC-32: a damaged length in the chunk's zip can make torch return
        # bytes that are not the record's (uninitialised memory), where zipfile reads the record intact
        got = sorted(zlib.crc32(torch.empty(0, dtype=torch.uint8).set_(s).numpy()) for s in loaded)
        if got != sorted(stored):
            raise CheckpointError(
                f"{file}: the chunk of tensor {self.fqn!r} at bytes {start}..{start + length} does not load as the "
                "bytes its zip records hold (their CRC-32); the file is damaged: save or copy the checkpoint again"
            )
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(sizes) or t.dtype != self.dtype:
            what = f"a {type(t).__name__}" if not isinstance(t, torch.Tensor) else f"{tuple(t.shape)} {t.dtype}"
            raise CheckpointError(
                f"{file}: the chunk of tensor {self.fqn!r} at {offsets} holds {what}, not {tuple(sizes)} {self.dtype}"
            )
        return t

    def read(self) -> torch.Tensor:
        if len(self.parts) == 1 and self.parts[0][1] == self.shape:
            return self._load(*self.parts[0])
        out = torch.empty(self.shape, dtype=self.dtype)
        for offsets, sizes, file, start, length in self.parts:
            piece = self._load(offsets, sizes, file, start, length)
            out[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = piece
            del piece
        return out


def _stored_step_of(md, locations: dict, files: dict[str, Path], meta: Path) -> int | None:
    """A step saved beside the weights (``step``, ``global_step``, ``train_state.step``), if any."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    for key in _STEP_ENTRIES:
        entry = md.state_dict_metadata.get(key)
        scalar = isinstance(entry, TensorStorageMetadata) and tuple(entry.size) == ()
        if scalar and not entry.properties.dtype.is_floating_point:
            info = locations.get((key, ()))
        elif isinstance(entry, BytesStorageMetadata):
            info = locations.get((key, None))
        else:
            continue
        if info is None or info.relative_path not in files or getattr(info, "transform_descriptors", None):
            continue
        file = files[info.relative_path]
        try:
            buf = _read_span(file, info.offset, info.offset + info.length)
            value = torch.load(io.BytesIO(buf.tobytes()), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, LookupError, AttributeError,
                TypeError, AssertionError, CheckpointError):
            continue  # a hint only: the step may come from the folder's name
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        step = _stored_step(value, key, meta)
        if step is not None:
            return step
    return None


def read_dcp(files: Sequence[Path], label: str, keys: KeyOptions) -> CheckpointReader:
    """A reader of the model tensors of a DCP checkpoint (*files*: ``.metadata``, then its ``.distcp`` files)."""
    meta = Path(files[0])
    md = load_metadata(meta)
    try:
        return _reader(md, meta, files, label, keys)
    except (AttributeError, TypeError, ValueError) as exc:  # fields of the wrong type in a damaged .metadata
        raise CheckpointError(f"{meta}: malformed torch.distributed.checkpoint metadata ({_one_line(exc)})") from None


def _reader(md, meta: Path, files: Sequence[Path], label: str, keys: KeyOptions) -> CheckpointReader:
    from torch.distributed.checkpoint.metadata import MetadataIndex

    on_disk = {f.name: f for f in files[1:]}
    locations = {}
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not all(
            hasattr(info, a) for a in ("relative_path", "offset", "length")
        ):
            raise CheckpointError(f"{meta}: its storage map holds an entry that is not a chunk location")
        offset = None if index.offset is None else tuple(int(o) for o in index.offset)
        locations[(index.fqn, offset)] = info
    reader = CheckpointReader(label, {})
    reader.step_hint = _stored_step_of(md, locations, on_disk, meta)
    read: list[_Chunks] = []
    told: dict[str, int] = {}
    names = _model_names(md, meta, told)
    reader.beside.update({(meta.name, entry): n for entry, n in told.items()})
    for fqn, name in names.items():
        entry = md.state_dict_metadata[fqn]
        dtype = getattr(entry.properties, "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{meta}: tensor {fqn!r} has no dtype")
        if not dtype.is_floating_point:  # an int8 weight told, as the other readers tell it
            skip_unread(reader, keys.canonical(name), dtype, keys)
            continue
        tensor = _Chunks(fqn, entry, locations, meta.parent, on_disk, meta)
        before = len(reader.tensors)
        _add(reader, name, tensor.shape, tensor.dtype, tensor.read, keys, str(meta))
        if len(reader.tensors) > before:
            read.append(tensor)
    sizes: dict[Path, int] = {}
    for tensor in read:
        for part in tensor.parts:
            if part[2] not in sizes:
                require_regular_file(part[2])
                sizes[part[2]] = os.stat(part[2]).st_size
        tensor.check_spans(sizes)
    _check_disjoint(read)
    return reader


def _check_disjoint(tensors: Sequence[_Chunks]) -> None:
    """Refuse chunks whose byte spans in a file overlap: DCP writes each chunk's bytes once, so two chunks
    read from the same bytes (a damaged ``.metadata``) would give one chunk's values in two places."""
    spans = sorted((file, start, start + length, t.fqn, offsets)
                   for t in tensors for offsets, _, file, start, length in t.parts if length)
    for (file, _, end, fqn, offsets), (other, start, end2, fqn2, offsets2) in zip(spans, spans[1:]):
        if file == other and start < end:
            raise CheckpointError(
                f"{file}: the chunk of tensor {fqn!r} at {offsets} and that of {fqn2!r} at {offsets2} share bytes "
                f"{start}..{min(end, end2)}; the checkpoint's .metadata is damaged"
            )
