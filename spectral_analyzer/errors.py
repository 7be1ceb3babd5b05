"""Exception and warning types of the package, one base class for the errors.

Every message names the file, tensor, step or store at fault and what to do
about it; :func:`printable` makes a message one safe line for a terminal.
"""

from __future__ import annotations

__all__ = [
    "SpectralAnalyzerError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "InconsistentCheckpointsError",
    "NonFiniteError",
    "StepError",
    "NoCheckpointsError",
    "SourceError",
    "StoreError",
    "StoreRewrittenError",
    "StoreVersionError",
    "StoreExistsError",
    "StoreBusyError",
    "WindowError",
    "SelectionError",
    "HeadCountError",
    "MetricError",
    "MetricsError",
    "ExportError",
    "DeviceError",
    "SchedulerError",
    "CacheWarning",
    "DuplicateCheckpointWarning",
    "OutlierDeltaWarning",
    "UnderflowWarning",
    "PrecisionChangeWarning",
    "MixedIntervalsWarning",
    "RecordingWarning",
    "UnreadWeightsWarning",
    "TiedWeightsWarning",
    "ModelCopyWarning",
    "printable",
]


class SpectralAnalyzerError(Exception):
    """Base class of the errors this package raises for bad input.

    Its message is one line whatever names it holds (see :func:`printable`).
    """

    def __str__(self) -> str:
        return printable(super().__str__())


class CheckpointError(SpectralAnalyzerError):
    """A checkpoint file is unreadable, truncated or corrupt."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle-based checkpoint holds something other than tensors and plain containers."""


class InconsistentCheckpointsError(SpectralAnalyzerError):
    """The set, shape or layout of tensors changes between checkpoints."""


class NonFiniteError(SpectralAnalyzerError):
    """A tensor holds NaN or Inf."""


class StepError(SpectralAnalyzerError):
    """Training steps are missing, duplicated or out of order."""


class NoCheckpointsError(SpectralAnalyzerError):
    """A folder holds no checkpoint this package can read."""


class SourceError(SpectralAnalyzerError):
    """A remote source of checkpoints (an fsspec URL, a hub repository) cannot be listed or read: no such
    repository, revision or file, no access, or a transfer that still fails after its retries."""


class StoreError(SpectralAnalyzerError):
    """A store is missing, damaged or does not match what was asked of it."""


class StoreVersionError(StoreError):
    """A store was written by an unknown format version."""


class StoreExistsError(StoreError):
    """The output path holds something else; overwriting it takes a flag."""


class StoreRewrittenError(StoreError):
    """A store was overwritten, or its rows rewritten, by another process since it was opened."""


class StoreBusyError(StoreError):
    """Another process is writing the store."""


class WindowError(SpectralAnalyzerError):
    """A window does not fit the run (too few deltas, W < 2)."""


class SelectionError(SpectralAnalyzerError):
    """A parameter or step selection, grouping or head split matches nothing or does not fit."""


class HeadCountError(SelectionError):
    """The number of attention heads is not known (no model config, none given) or does not fit a projection."""


class MetricError(SpectralAnalyzerError):
    """A metric is not logged, or not at enough steps."""


class MetricsError(SpectralAnalyzerError):
    """A metrics file (or TensorBoard log) is unreadable, has no usable ``step``, or needs a package not installed."""


class ExportError(SpectralAnalyzerError):
    """An output path with an unknown extension, one that exists, one that cannot be written, or a format
    whose optional package is not installed."""


class DeviceError(SpectralAnalyzerError):
    """The computing device asked for is unknown or not available."""


class SchedulerError(SpectralAnalyzerError):
    """The dask.distributed scheduler asked for cannot be reached."""


class CacheWarning(UserWarning):
    """A cached band or result could not be written; the numbers were computed and returned without caching."""


class DuplicateCheckpointWarning(UserWarning):
    """Two consecutive checkpoints have identical contents (an all-zero delta)."""


class OutlierDeltaWarning(UserWarning):
    """A delta's norm per step is far above that of the deltas before it: a replaced or mislabelled checkpoint?"""


class UnderflowWarning(UserWarning):
    """Changes of a float64 parameter below float32's range, which the store's float32 deltas hold as 0 or
    with fewer digits."""


class PrecisionChangeWarning(UserWarning):
    """A tensor's dtype changes between checkpoints: the delta across the change holds its rounding."""


class MixedIntervalsWarning(UserWarning):
    """A window's deltas span step intervals of very different lengths, so its spectrum mixes unlike updates."""


class UnreadWeightsWarning(UserWarning):
    """Weights in the checkpoints that are not read: files beside a checkpoint's own (an adapter, an EMA copy, a
    second model), a save still in progress, or tensors that are not floating point (int8 quantised weights,
    complex parameters)."""


class TiedWeightsWarning(UserWarning):
    """Two tensors have the same update at every step ingested: one tied weight saved under both names
    (torch.distributed.checkpoint keeps both; so does a state dict cloned to save as safetensors), counted twice."""


class ModelCopyWarning(UserWarning):
    """Tensors under a name such as ``model_ema.`` or ``teacher.`` repeat the names and shapes of the model's
    own: a copy of the model (an EMA, a teacher or target network) saved beside it, read as parameters of
    its own, whose updates are summed into every Gram."""


class RecordingWarning(UserWarning):
    """Live recording went on after training resumed before the store's last step."""


def printable(text: str) -> str:
    """*text* as one line of plain text: each non-printable character as its ``repr`` escape.

    Names that come from files (tensor names, paths) may hold newlines or
    terminal escape sequences; ``printable`` makes them visible instead of
    letting them break a line or recolour a terminal. (Messages name tensors
    with ``repr``, which escapes a backslash too; :func:`printable_name` is for
    tables.)

    >>> printable("layer\\n\\x1b[31mq")
    'layer\\\\n\\\\x1b[31mq'
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def printable_name(name: str) -> str:
    """A name (tensor, group, matrix) as tables show it: :func:`printable` with a backslash escaped too (a
    name holding a newline and one holding a backslash and ``n`` read apart), quoted where it is empty or
    starts or ends with a space (``a`` and ``a `` read apart).

    >>> printable_name("a"), printable_name("a "), printable_name(""), printable_name("x\\n")
    ('a', "'a '", "''", 'x\\\\n')
    """
    shown = printable(name.replace("\\", "\\\\"))
    return shown if shown and shown == shown.strip() else f"'{shown}'"
