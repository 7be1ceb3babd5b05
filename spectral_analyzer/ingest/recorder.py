"""Live recording: deltas appended from the in-memory model, no checkpoint files.

>>> rec = sa.Recorder("run.zarr", model, every=100)          # doctest: +SKIP
>>> for step in range(steps):                                # doctest: +SKIP
...     train_step()
...     rec.step(step, loss=loss.item())

Each recorded step writes one committed delta row, exactly as ingesting a
checkpoint saved at that step would (the deltas are bit-identical), so the
band and spectra extend incrementally at O(p) per new delta.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .._version import __version__
from ..errors import (
    CheckpointError,
    MetricsError,
    RecordingWarning,
    SelectionError,
    StepError,
    StoreError,
    printable,
)
from ..store import DEFAULT_CHUNK_SIZE, Store, StoreWriter
from ..store.layout import check_chunk_size
from .discover import Checkpoint
from .model_config import attention_config
from .metrics import _check_names as _check_metric_names
from .pipeline import (
    _check_consistent,
    _check_finite,
    _check_names,
    _ChunkedRow,
    _crc_only,
    _manifest,
    _Planned,
    _stored_is_exact,
    _warn_unread,
    stored_unread,
    weights_crc,
    write_rows,
)
from .readers import CheckpointReader, KeyOptions, _add, _sharing, patterns, skip_unread

__all__ = ["Recorder"]


class Recorder:
    """Append a delta row to *store* every *every* steps, from a live ``torch.nn.Module``.

    Parameters
    ----------
    store : path or URL
        A folder or an fsspec URL (with *storage_options*). Created on the first record (refused if it holds something else,
        unless ``overwrite``); an existing store of the same model is appended to.
    model : torch.nn.Module
        Its floating-point ``state_dict`` entries are recorded, names
        canonicalised as in ingest (``module.``, ``_orig_mod.`` stripped).
    every : int
        ``step(s)`` records when ``s % every == 0``.
    include, exclude : globs on tensor names
    chunk_size : int
    storage_options : dict, optional
        Options of the fsspec filesystem of a URL store.
    wait : bool or seconds
        When another process is writing the store: wait for it (True, the
        default: a notebook caching its spectra holds the lock for moments,
        and must not stop the training), wait that many seconds, or fail at
        once (False). Each record holds the store's writer lock while it
        writes; readers never wait.

    Memory: one copy of the recorded tensors (the previous snapshot), so each
    delta is the exact difference of two snapshots.

    In a distributed training (a process group initialised), rank 0 records
    and the other ranks' recorders do nothing: every rank of a data-parallel
    training holds the same weights, and one writer keeps the store whole.
    Steps are integers (a float such as an epoch fraction is refused).
    """

    def __init__(
        self,
        store: str | os.PathLike,
        model: torch.nn.Module,
        *,
        every: int = 1,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        wait: bool | float = True,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        chunk_size = check_chunk_size(chunk_size)
        self.path = str(store)
        self.model = model
        self.every = every
        self.keys = KeyOptions(include=patterns(include), exclude=patterns(exclude))
        self.chunk_size = chunk_size
        self.overwrite = overwrite
        self.storage_options = storage_options
        self.wait = wait
        self._previous: CheckpointReader | None = None  # the model at the store's last step, when it was
        self._previous_at: tuple[int, str] | None = None  # that step and the store's commit chain then
        self._skip_through: int | None = None  # after a resume between rows: the store's last step, not recorded again
        self._diverged: str | None = None  # why recording cannot go on (a resumed training that differs)
        self._pending: dict[int, dict[str, float]] = {}  # logged, not yet in the store
        self._cut: int | None = None  # the store's series from this step on are superseded by this recorder's
        self._attempt: tuple[int, Any] | None = None  # step and commit chain of a record interrupted once committed
        self._continues = False  # resumed: the store goes on, whatever overwrite says
        self._told_unread = False  # whether the model's weights of no float dtype were told

    @staticmethod
    def _silent() -> bool:
        """Whether this process is a rank other than 0 of a distributed training (it records nothing)."""
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0

    def _step(self, step) -> int:
        """*step* as an int; a float that is not a whole number (an epoch fraction), a bool or a string is
        refused: cut to an int, it would file a value under another step."""
        if not isinstance(step, (bool, np.bool_)):
            try:
                return int(step.__index__())
            except (AttributeError, TypeError):
                pass
            if isinstance(step, (float, np.floating)) and float(step).is_integer():
                return int(step)
            if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
                return int(step.item())
        raise StepError(printable(f"{self.path}: step {step!r} is not a whole number; steps are the training's "
                                  "integer steps"))

    def step(self, step: int, /, **metrics: float) -> bool:
        """Record at multiples of ``every``; log *metrics* at every call. Returns whether it recorded."""
        step = self._step(step)
        self.log(step, **metrics)
        if step % self.every:
            return False
        self.record(step)
        return True

    def _snapshot(self, step: int) -> CheckpointReader:
        reader = CheckpointReader(f"{self.path} (recorded step {step})", {})
        seen_storage: set[tuple] = set()
        views: dict[int, list[tuple[torch.Tensor, str]]] = {}  # storage: the tensors taken on it, with their names
        # ZeRO-3 parameters are empty placeholders; their state_dict() copies lose the mark DeepSpeed sets
        named = getattr(self.model, "named_parameters", None)
        partitioned = {n for n, p in named() if hasattr(p, "ds_shape")} if callable(named) else set()
        state = self.model.state_dict()
        if (unmatched := self.keys.unmatched(map(self.keys.canonical, state))) is not None:  # as ingest does
            raise SelectionError(printable(f"{reader.label}: the {unmatched[0]} pattern {unmatched[1]!r} matches no "
                                           "tensor of the model; check it against its state_dict() names"))
        if (ambiguous := self.keys.ambiguous(map(self.keys.canonical, state))) is not None:
            raise SelectionError(printable(f"{reader.label}: {ambiguous} (the model's state_dict() names)"))
        _check_names([self.keys.canonical(n) for n in state], reader.label)
        for name, value in state.items():
            # Tied weights: the same storage under two names is one parameter, as the readers count it; of the
            # selected names the first is kept (a name left out by include / exclude hides no twin).
            canonical = self.keys.canonical(name)
            if not value.is_floating_point():  # an int8 quantised weight: left out, and told as ingest tells it
                skip_unread(reader, canonical, value.dtype, self.keys)
                continue
            if not self.keys.selected(canonical):
                continue
            if (what := _not_whole(value, name in partitioned)) is not None:  # refused, as ingest refuses it in a file
                raise CheckpointError(f"{reader.label}: tensor {canonical!r} is {what}; record a model whose "
                                      f"weights are whole in memory, or leave it out with exclude={canonical!r}")
            if value.numel() > 0:
                ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                         tuple(value.stride()))
                if ident in seen_storage:
                    continue
                seen_storage.add(ident)
                views.setdefault(ident[0], []).append((value, canonical))
            tensor = value.detach().to("cpu", copy=True)
            _add(reader, name, tensor.shape, tensor.dtype, tensor, self.keys, reader.label)
        for on_one in views.values():  # as ingest refuses them in a file
            if (shared := _sharing(on_one)) is not None:
                raise CheckpointError(
                    f"{reader.label}: tensors {shared[0]!r} and {shared[1]!r} are views of the same values (a packed "
                    "parameter registered beside its slices?), which would be counted twice; leave one out with "
                    f"exclude={shared[1]!r}")
        return reader

    def record(self, step: int) -> None:
        """Snapshot the model now and commit the delta from the previous snapshot."""
        step = self._step(step)
        if self._silent():
            return
        if self._diverged is not None:
            raise StepError(self._diverged)
        if self._skip_through is not None:  # resumed between rows: the store's rows up to its last are kept
            if step < self._skip_through:
                return
            if step == self._skip_through:  # the next delta goes from the weights recorded here: the same?
                self._check_replay(step)
                return
            # past it without having been there (another every, the last step): those weights unchecked
            self._diverged = (
                f"{self.path}: the training resumed before step {self._skip_through} (the store's last) recorded "
                f"no row there to check its weights against the store's, and step {step} would take its delta "
                "from them; resume from a checkpoint at a recorded step, or record into a new store")
            raise StepError(self._diverged)
        reader = self._snapshot(step)
        pending, cut = dict(self._pending), self._cut
        try:
            self._record(step, reader)
        except BaseException:
            # the metrics' commit went with the refused row (rolled back): they are written at the next write
            self._pending, self._cut = pending, cut
            raise

    def _record(self, step: int, reader: CheckpointReader) -> None:
        planned = _Planned(Checkpoint(reader.label, (), step), step, reader.tensors, unread=dict(reader.unread))
        if planned.unread and not self._told_unread:  # once a recorder: the same model at every step
            _warn_unread([planned])
            self._told_unread = True
        overwrite = self.overwrite and self._previous is None and not self._continues
        with StoreWriter(self.path, self.storage_options, overwrite=overwrite, wait=self.wait) as writer:
            store = writer.existing
            if store is not None:
                self._check_tensors(planned, store)
                last = store.last_checkpoint_step
                if step <= last:
                    raise StepError(f"{self.path}: step {step} is not after the store's last step {last}")
                previous = self._current_previous(store)
                if previous is None and not _stored_is_exact(store, store.commit_record):
                    raise StepError(
                        f"{self.path}: cannot append: this recorder holds no snapshot of the model at the store's "
                        f"last step {last}, and the store's float32 copy rounds its float64 values; call "
                        f"resume({last}) while the model holds that step's weights, or record into a new store"
                    )
                if self._previous is None and self._cut is None:  # only once the record is accepted
                    self._cut = int(step)
            elif self._previous is not None:  # once this recorder has written a row, the store is its own
                raise StoreError(f"{self.path}: the store this recorder was writing is gone")
            else:
                previous = None
                provenance = {"source": "recorder", "options": {"chunk_size": self.chunk_size},
                              "versions": {"spectral_analyzer": __version__, "torch": torch.__version__}}
                to_dict = getattr(getattr(self.model, "config", None), "to_dict", None)  # a transformers model's
                config = to_dict() if callable(to_dict) else None
                model_config = attention_config(config) if isinstance(config, Mapping) else {}
                if model_config:
                    provenance["model_config"] = model_config
                store = writer.create(_manifest(reader.tensors), self.chunk_size, {"provenance": provenance})
            # the metrics logged so far first: killed between the two commits, the store holds them and not
            # the row, and the training resumed before this step logs the steps after it again (the other
            # way round, the steps up to this one would be lost: a training resumed here does not log them)
            self._write_metrics(store)
            rows = store.n_deltas + 1
            try:  # a tensor whose dtype changed since the last snapshot, or the store's last row: told as ingest does
                write_rows(store, [], [planned], lambda p: reader, False, prev_reader=previous)
                self._keep(reader, store)  # before anything else can fail: the row is committed
            except KeyboardInterrupt:
                self._interrupted(store, int(step), rows)
                raise

    def _interrupted(self, store: Store, step: int, rows: int) -> None:
        """Interrupted while committing its row at *step*: where the commit landed (read while the writer
        lock is still held, so it is this recorder's), the row is remembered as its own by its commit chain.
        Any other failure rolls the row back, and a row found there later is another writer's."""
        try:
            now = store.reopen()
            record = now.commit_record
            if record is not None and now.last_checkpoint_step == step and now.n_deltas == rows:
                self._attempt = (step, record["chain"])
        except Exception:  # unreadable: the row is not claimed, and the next record refuses a store it cannot place
            pass

    def _keep(self, reader: CheckpointReader, store: Store) -> None:
        self._previous, self._previous_at = reader, (store.last_checkpoint_step, store.commit_record["chain"])

    def _current_previous(self, store: Store) -> CheckpointReader | None:
        """This recorder's snapshot if the store still ends at it (same step, same commit chain); None where
        the store ends at this recorder's own row, committed without the snapshot being kept (interrupted):
        the deltas then come from the store's own copy of it.

        Rows another writer appended or rewrote since this recorder's last row are refused: the next delta
        would be taken from another training's weights."""
        if self._previous is None or store.commit_record is None:
            return None
        now = (store.last_checkpoint_step, store.commit_record["chain"])
        if now == self._previous_at:
            return self._previous
        if self._attempt == now:
            return None
        raise StoreError(
            f"{self.path}: another writer changed the rows since this recorder's row at step "
            f"{self._previous_at[0]} (the store now ends at step {now[0]}); record each training into a store "
            "of its own"
        )

    def resume(self, step: int) -> None:
        """Go on with the store after training resumed at *step*; the model holds that step's weights now.

        Rows the store holds after *step* were recorded by the training being
        redone (a trainer resumed from an older checkpoint). When the store
        has a row at *step* itself, the model is checked against the weights
        recorded there (where the row recorded their checksum), then those
        later rows are dropped, with a warning, and recording continues from
        the model as it is now, exactly. When the store holds rows after
        *step* but none at it, the resume is refused, the store left as it is:
        the next delta would go from the abandoned training's weights to the
        resumed one's. When it ends before *step* (or there is none) and
        *step* is one it records (a multiple of ``every``), the model is
        recorded at *step* now: a training killed while recording that step,
        after saving the checkpoint it resumed from, lacks that row. The
        metrics the store holds after *step* (flushed by the abandoned
        training) are dropped at the next write, as the resumed training logs
        those steps again. Where the store holds the weights of *step* (its
        last row), the model is checked against them: resumed from other
        weights, the recorder refuses to go on. A resumed recorder continues
        the store: ``overwrite`` no longer applies.
        """
        step = self._step(step)
        if self._silent():
            return
        # A recorder that has recorded (a callback reused for a training resumed from a checkpoint) forgets
        # its snapshot, which is of the abandoned training, and what was logged after *step*.
        self._previous = self._previous_at = self._skip_through = self._diverged = None
        self._pending = {s: v for s, v in self._pending.items() if s <= step}
        self._continues = True
        if Store.exists(self.path, self.storage_options):
            with StoreWriter(self.path, self.storage_options, wait=self.wait) as writer:
                if writer.existing is not None:
                    self._resume(writer.existing, step)
        if self._previous is None and self._skip_through is None:
            # The store ends before *step*: the metrics it holds after *step* (flushed by the abandoned
            # training after its last row) are dropped at the next write, as the training logs them again.
            self._cut = int(step) + 1
            if step % self.every == 0:
                # A step it records: the training was killed while recording it, after saving the checkpoint
                # it resumed from. The model holds that step's weights: recorded now.
                self.record(step)

    def _resume(self, store: Store, step: int) -> None:
        steps = store.checkpoint_steps.tolist()
        if steps and steps[-1] == step:  # the model holds the store's last checkpoint: deltas from it exactly
            snapshot = self._snapshot(step)
            self._verified(snapshot, store, len(steps) - 1)
            self._keep(snapshot, store)
            self._cut = int(step) + 1
            return
        if not steps or steps[-1] < step:
            return
        if step in steps:
            keep = steps.index(step)
            snapshot = self._snapshot(step)
            self._verified(snapshot, store, keep)  # before a row is dropped
            warnings.warn(
                f"{self.path}: training resumed at step {step}: dropping the {len(steps) - 1 - keep} rows recorded "
                f"after it (steps {steps[keep + 1]}..{steps[-1]}), which that training redoes",
                RecordingWarning, stacklevel=2,
            )
            store.truncate(keep)
            self._cut = int(step) + 1
            self._keep(snapshot, store)
        else:
            warnings.warn(
                f"{self.path}: training resumed at step {step}, before the store's last step {steps[-1]}, which "
                f"holds no row at {step}: steps up to {steps[-1]} are not recorded again (the model is checked "
                f"against the weights recorded there when it gets there), and the metrics it holds after {step} "
                "are replaced by the ones the resumed training logs",
                RecordingWarning, stacklevel=2,
            )
            self._cut = int(step) + 1  # the abandoned training's metrics: the resumed one logs those steps again
            self._skip_through = steps[-1]

    def _check_replay(self, step: int) -> None:
        """After a resume between rows, at the store's last step: refuse to go on if the resumed training's
        weights are not the ones recorded there (a replay that differs: data order, dropout, a checkpoint
        of another run), since every later delta would be taken from them; else go on from them exactly."""
        with StoreWriter(self.path, self.storage_options, wait=self.wait) as writer:
            store = writer.existing
            if store is None or store.last_checkpoint_step != step:
                raise StoreError(f"{self.path}: the store this recorder resumed changed under it (it no longer "
                                 f"ends at step {step})")
            snapshot = self._snapshot(step)
            try:
                verified = self._verified(snapshot, store, store.n_deltas)
            except StepError:
                verified = False
            if not verified:
                self._diverged = (  # refused at every later record too, until resumed again
                    f"{self.path}: the training resumed before step {step} does not redo the one recorded, or "
                    "cannot be checked to: its weights there are not the ones the store recorded (a replay that "
                    "differs: data order, dropout; or a checkpoint of another run), and every later delta would be "
                    "taken from the store's; resume from a checkpoint at a recorded step, or record into a new store")
                raise StepError(self._diverged)
            self._keep(snapshot, store)  # the next delta from these weights, exactly (float64 models too)
        self._skip_through = None

    def _verified(self, snapshot: CheckpointReader, store: Store, index: int) -> bool:
        """Whether *snapshot*, the model at the store's checkpoint *index* (0 the base), is checked to hold the
        weights the store recorded there (their float32 chunks' checksums): True, or False where the store
        kept no checksum of that checkpoint's weights (a row an ingest wrote before its last, or a store of an
        earlier version). Weights of other tensors, shapes or dtypes, NaN or Inf, or other values are refused:
        a training resumed from another run's checkpoint (or one saved in lower precision) would have the
        store's later rows dropped, or its next delta taken from weights the store's rows do not sum to."""
        step = int(store.checkpoint_steps[index])
        self._check_tensors(_Planned(Checkpoint(snapshot.label, (), step), step, snapshot.tensors,
                                     unread=dict(snapshot.unread)), store)
        for t in store.manifest:  # NaN or Inf in the model: told as such, not as other weights
            _check_finite(snapshot.read(t.name), t.name, snapshot.label, step)
        record = store.commit_record or {}
        crcs = None
        if index == store.n_deltas and record.get("last_crc") and record.get("last_step") == step:
            crcs = self._crcs(snapshot, store)
            same = crcs == list(record["last_crc"])
        else:
            expected = (weights_crc(store.attrs["base_crc"]) if index == 0
                        else store.sources_at(index)[0].get("weights_crc"))
            if expected is None:
                return False
            same = weights_crc(self._crcs(snapshot, store)) == expected
        if not same:
            raise StepError(
                f"{self.path}: training resumed at step {step}, but the model's weights are not the ones the store "
                "recorded at that step (resumed from another run's checkpoint, or one saved in lower precision?); "
                "nothing was dropped; resume from that step's checkpoint, or record into a new store"
            )
        return True

    def _check_tensors(self, planned: _Planned, store: Store) -> None:
        """Refuse a snapshot whose tensors, shapes or dtypes are not the store's, on one line."""
        _check_consistent({t.name: (tuple(t.shape), t.dtype) for t in store.manifest}, self.path, planned,
                          ref_unread=stored_unread(store))

    @staticmethod
    def _crcs(snapshot: CheckpointReader, store: Store) -> list[int]:
        """The chunk crc32c values of *snapshot*'s weights in float32, as the store keeps a checkpoint's."""
        row = _ChunkedRow(store.chunk_size, store.n_params, _crc_only)
        for t in store.manifest:
            row.add(snapshot.read(t.name).to(torch.float32).reshape(-1).numpy())
        return row.crcs()

    def log(self, step: int, /, **metrics: float) -> None:
        """Keep *metrics* as logged at *step*; they are written with the next record, or by :meth:`flush`.

        A metric named ``step`` (a logger's own record of the step) is the index, not a series: left out."""
        step = self._step(step)
        metrics.pop("step", None)
        _check_metric_names(metrics, f"{self.path} (logged at step {step})")
        values = {}
        for k, v in metrics.items():
            try:
                values[k] = float(v)
            except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
                raise MetricsError(printable(f"{self.path}: metric {k!r} logged at step {step} is {v!r}, not a "
                                             f"number ({exc})")) from None
        if values and not self._silent():
            self._pending.setdefault(step, {}).update(values)

    def flush(self) -> None:
        """Write the metrics logged so far into the store (those logged after the last record, at the end of training)."""
        if (self._pending or self._cut is not None) and Store.exists(self.path, self.storage_options):  # nothing recorded: nowhere to write
            with StoreWriter(self.path, self.storage_options, wait=self.wait) as writer:
                if writer.existing is not None:
                    self._write_metrics(writer.existing)

    def _write_metrics(self, store: Store) -> None:
        """Write the pending metrics: appended after the stored ones (O(new rows)), or merged when they go back."""
        if not self._pending and self._cut is None:
            return
        last = store.last_logged_step
        first = min(self._pending, default=None)
        going_back = last is not None and ((first is not None and first <= last) or
                                           (self._cut is not None and self._cut <= last))
        if going_back:
            steps, series = store.read_metrics()
            rows: dict[int, dict[str, float]] = {}
            for i, s in enumerate(steps.tolist()):
                if self._cut is None or s < self._cut:
                    rows[s] = {k: float(v[i]) for k, v in series.items() if not np.isnan(v[i])}
            for s, row in self._pending.items():
                rows[s] = {**rows.get(s, {}), **row}
        else:
            rows = self._pending
        order = np.array(sorted(rows), dtype=np.int64)
        names = sorted({k for row in rows.values() for k in row})
        table = {n: np.array([rows[s].get(n, np.nan) for s in order.tolist()]) for n in names}
        if going_back:
            store.write_metrics(order, table)
        elif len(order):
            store.append_metrics(order, table)
        self._pending, self._cut = {}, None


def _not_whole(value: torch.Tensor, partitioned: bool = False) -> str | None:
    """Why *value* does not hold the whole tensor's values (None when it does): on the meta device, sparse,
    a tensor subclass (a DTensor holds one rank's shard of an FSDP2 / tensor-parallel weight), or a ZeRO-3
    partitioned parameter (an empty placeholder; DeepSpeed keeps its real shape in ``ds_shape``)."""
    if value.is_meta:
        return "on the meta device (it holds no values)"
    if value.layout != torch.strided:
        return f"{str(value.layout)[6:]}, not dense"
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        return f"a {type(value).__name__}, which may hold one shard of the weight (a sharded model)"
    if partitioned or hasattr(value, "ds_shape"):
        return "a DeepSpeed ZeRO-3 partition (an empty placeholder)"
    return None
