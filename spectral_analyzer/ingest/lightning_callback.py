"""Live recording from a Lightning ``Trainer``: :class:`LightningRecorderCallback`.

>>> trainer = L.Trainer(max_steps=5000,
...                     callbacks=[sa.LightningRecorderCallback("run.zarr", every=100)])   # doctest: +SKIP
>>> trainer.fit(module, train_loader)                                                      # doctest: +SKIP

The rows are bit-identical to ingesting the ``.ckpt`` files that
``ModelCheckpoint(every_n_train_steps=every, save_top_k=-1)`` saves, with no
checkpoint written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError as exc:
    raise ImportError("LightningRecorderCallback needs lightning: pip install lightning") from exc

from ..store import DEFAULT_CHUNK_SIZE
from .recorder import Recorder

__all__ = ["LightningRecorderCallback"]


class _Unprefixed:
    """A LightningModule's state dict named as ingest reads its ``.ckpt``.

    *prefix* is removed from every key when all of them have it (a module
    that holds its network as ``self.model``); other entries than tensors are
    left out.
    """

    def __init__(self, module: torch.nn.Module, prefix: str | None):
        self.module = module
        self.prefix = prefix

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.module.state_dict().items() if isinstance(v, torch.Tensor)}
        if self.prefix and state and all(k.startswith(self.prefix) for k in state):
            return {k[len(self.prefix) :]: v for k, v in state.items()}
        return state


class LightningRecorderCallback(Callback):
    """Record the LightningModule into *store* every *every* optimizer steps.

    Steps are ``trainer.global_step``, the number of optimizer steps taken, as
    in the ``step=<step>`` of ModelCheckpoint's file names. Rows are recorded
    at the steps ``ModelCheckpoint(every_n_train_steps=every)`` saves; at the
    last step of training when it is not one of them; and, with *initial*, at
    step 0, the weights before training, so that the first delta covers the
    first steps.

    Metrics: Lightning keeps the latest value of each metric logged with
    ``self.log`` in ``trainer.callback_metrics``; those values are taken at the
    trainer's logging steps (``log_every_n_steps``) and after each validation,
    so a metric logged less often holds its last value in between.

    In a distributed run only the global-zero process records; with data
    parallelism (DDP) every process holds the same weights. Sharded strategies
    (FSDP, DeepSpeed stage 3) are not supported: their full state dict is not
    held by one process.

    Parameters
    ----------
    store : path or URL
        A folder or an fsspec URL (with *storage_options*), created at the
        first record; an existing store of the same model is
        appended to (a resumed run continues it when its steps come after the
        store's last step).
    every : int
        Record every *every* optimizer steps (as ``every_n_train_steps``).
    initial : bool
        Record the weights at step 0 when training starts from scratch.
    lightning_prefix : str or None
        Removed from the module's tensor names when all have it, as ingest
        does for ``.ckpt`` files (``"model."`` for a module holding
        ``self.model``); pass the same value to both.
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
    Memory: one copy of the module's floating tensors on the CPU of the
    global-zero process.

    Examples
    --------
    >>> import spectral_analyzer as sa
    >>> callback = sa.LightningRecorderCallback("run.zarr", every=100)   # doctest: +SKIP
    >>> L.Trainer(max_steps=5000, callbacks=[callback]).fit(module, train_loader)   # doctest: +SKIP
    >>> sa.open_run("run.zarr").spectra(window=10)   # doctest: +SKIP
    """

    def __init__(
        self,
        store: str | os.PathLike,
        *,
        every: int,
        initial: bool = True,
        lightning_prefix: str | None = "model.",
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
        self.lightning_prefix = lightning_prefix
        self._options = {
            "include": include,
            "exclude": exclude,
            "chunk_size": chunk_size,
            "overwrite": overwrite,
            "storage_options": storage_options,
        }
        self.recorder: Recorder | None = None  # made on the global-zero process when training starts
        self._seen: int | None = None  # the last global step seen (micro-batches share one)
        self._recorded: int | None = None

    def _record(self, step: int) -> None:
        self.recorder.record(step)
        self._recorded = step

    def _log(self, trainer) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self.recorder.log(trainer.global_step, **values)

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or ("DeepSpeed" in strategy and getattr(trainer.strategy, "zero_stage_3", False)):
            raise ValueError(f"LightningRecorderCallback: sharded models ({strategy}) are not supported")
        weights = _Unprefixed(pl_module, self.lightning_prefix)
        if self.recorder is None:
            self.recorder = Recorder(self.store, weights, every=self.every, **self._options)
        else:  # training again: the same store goes on
            self.recorder.model = weights
        self._seen = trainer.global_step
        if trainer.global_step > 0:  # resumed from a checkpoint: the store may hold later rows
            self.recorder.resume(trainer.global_step)
            self._recorded = trainer.global_step  # in the store already, or not to be recorded again
        elif self.initial:
            self._record(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.recorder is None or step == self._seen:
            return  # not the main process, or no optimizer step in this batch
        self._seen = step
        if trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            self._log(trainer)
        if step % self.every == 0:
            self._record(step)

    def on_validation_end(self, trainer, pl_module):
        if self.recorder is not None and not trainer.sanity_checking:
            self._log(trainer)
            if trainer.state.fn != "fit":  # trainer.validate() after fit(): no train end will come to write it
                self.recorder.flush()

    def on_test_end(self, trainer, pl_module):
        """trainer.test() after fit(): its metrics at the step trained to, written at once."""
        if self.recorder is not None:
            self._log(trainer)
            self.recorder.flush()

    def on_train_end(self, trainer, pl_module):
        if self.recorder is None:
            return
        if trainer.global_step != self._recorded:
            self._record(trainer.global_step)
        self.recorder.flush()
