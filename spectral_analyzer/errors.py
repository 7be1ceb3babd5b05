"""Exception types. Every message names the file, tensor, step or store at fault."""

from __future__ import annotations

__all__ = [
    "SpectralAnalyzerError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "InconsistentCheckpointsError",
    "NonFiniteError",
    "StepError",
    "NoCheckpointsError",
    "StoreError",
    "StoreVersionError",
    "StoreExistsError",
    "DuplicateCheckpointWarning",
    "RecordingWarning",
]


class SpectralAnalyzerError(Exception):
    """Base class of the errors this package raises for bad input."""


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


class StoreError(SpectralAnalyzerError):
    """A store is missing, damaged or does not match what was asked of it."""


class StoreVersionError(StoreError):
    """A store was written by an unknown format version."""


class StoreExistsError(StoreError):
    """The output path holds something else; overwriting it takes a flag."""


class DuplicateCheckpointWarning(UserWarning):
    """Two consecutive checkpoints have identical contents (an all-zero delta)."""


class RecordingWarning(UserWarning):
    """Live recording went on after training resumed before the store's last step."""
