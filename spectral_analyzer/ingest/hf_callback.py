"""Live recording from a transformers ``Trainer``: :class:`HFRecorderCallback`.

>>> trainer = Trainer(model, args, train_dataset=train,
...                   callbacks=[sa.HFRecorderCallback("run.zarr", every=100)])   # doctest: +SKIP
>>> trainer.train()                                                              # doctest: +SKIP

The rows are bit-identical to ingesting the ``checkpoint-<step>/`` folders a
Trainer with ``save_steps=every`` saves, with no checkpoint written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as exc:
    raise ImportError(
        "HFRecorderCallback needs transformers (and accelerate, which its Trainer uses): "
        "pip install transformers accelerate"
    ) from exc

from ..store import DEFAULT_CHUNK_SIZE
from .recorder import Recorder

__all__ = ["HFRecorderCallback"]


def _zero3() -> bool:
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


class HFRecorderCallback(TrainerCallback):
    """Record the Trainer's model into *store* every *every* optimizer steps.

    Steps are the Trainer's ``state.global_step``, the number of optimizer
    steps taken, as in the names of its ``checkpoint-<step>`` folders. Rows are
    recorded at the steps a Trainer with ``save_steps=every`` saves: every
    *every* steps and the last step of training (``max_steps``); and, with
    *initial*, at step 0, the weights before training, which the Trainer never
    saves, so that the first delta covers the first steps.

    Everything the Trainer logs (``loss``, ``learning_rate``, ``grad_norm``,
    ``epoch``, ``eval_*``, the final ``train_*`` summary) becomes the store's
    metrics at the step it was logged.

    ``Trainer(model_init=...)`` is not supported: the Trainer hands its
    callbacks the model made when it was created, not the one ``train()``
    makes, so every row would be zero (each gives a
    :class:`~spectral_analyzer.DuplicateCheckpointWarning`).

    In a distributed run only the main process (world rank 0) records; with
    data parallelism (DDP) every process holds the same weights. Sharded
    models (FSDP, DeepSpeed ZeRO-3) are not supported: their full state dict
    is not held by one process.

    Parameters
    ----------
    store : path or URL
        A folder or an fsspec URL (with *storage_options*), created at the
        first record; an existing store of the same model is
        appended to (a resumed run continues it when its steps come after the
        store's last step).
    every : int
        Record every *every* optimizer steps (as ``save_steps``).
    initial : bool
        Record the weights at step 0 when training starts from scratch.
    include, exclude : sequence of str
        Globs on tensor names, as in :func:`spectral_analyzer.ingest`.
    chunk_size : int
        Elements per chunk of a delta row.
    overwrite : bool
        Replace whatever is at *store* at the first record.
    storage_options : dict, optional
        Options of the fsspec filesystem of a URL store.

    Notes
    -----
    Tensor names are those of ``model.state_dict()`` (``module.`` and
    ``_orig_mod.`` stripped), as the Trainer saves them. Memory: one copy of
    the model's floating tensors on the CPU of the main process.

    Examples
    --------
    >>> import spectral_analyzer as sa
    >>> callback = sa.HFRecorderCallback("run.zarr", every=100)   # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=train, callbacks=[callback]).train()   # doctest: +SKIP
    >>> sa.open_run("run.zarr").spectra(window=10)   # doctest: +SKIP
    """

    def __init__(
        self,
        store: str | os.PathLike,
        *,
        every: int,
        initial: bool = True,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.store = store
        self.every = every
        self.initial = initial
        self._options = {
            "include": include,
            "exclude": exclude,
            "chunk_size": chunk_size,
            "overwrite": overwrite,
            "storage_options": storage_options,
        }
        self.recorder: Recorder | None = None  # made on the main process when training starts
        self._training = False  # logs outside training (trainer.evaluate() after train()) are written at once

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        if getattr(args, "fsdp", None) or _zero3():
            raise ValueError("HFRecorderCallback: sharded models (FSDP, DeepSpeed ZeRO-3) are not supported")
        if self.recorder is None:
            self.recorder = Recorder(self.store, model, every=self.every, **self._options)
        else:  # training again: the same store goes on
            self.recorder.model = model
        self._training = True
        if state.global_step > 0:  # resumed from a checkpoint: the store may hold later rows
            self.recorder.resume(state.global_step)
            # what was logged up to the checkpoint, kept in its trainer_state.json: the logs of its own step
            # come after its record, and a training killed before writing them does not log them again
            for entry in state.log_history:
                step = entry.get("step")
                if isinstance(step, int) and step <= state.global_step:
                    numbers = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
                    self.recorder.log(step, **numbers)
        elif self.initial:
            self.recorder.record(0)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.recorder is not None and (step % self.every == 0 or step >= state.max_steps):
            self.recorder.record(step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.recorder is not None and logs:
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            self.recorder.log(state.global_step, **numbers)
            if not self._training:  # no train end will come to write it
                self.recorder.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False
        if self.recorder is not None:
            self.recorder.flush()
