"""spectral-analyzer: spectral edge analysis of training trajectories.

>>> import spectral_analyzer as sa
>>> run = sa.ingest("ckpts/", "run.zarr")    # doctest: +SKIP
>>> run = sa.open_run("run.zarr")            # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util

from ._version import __version__
from .errors import (
    CacheWarning,
    CheckpointError,
    DeviceError,
    DuplicateCheckpointWarning,
    ExportError,
    InconsistentCheckpointsError,
    MetricError,
    MetricsError,
    NoCheckpointsError,
    NonFiniteError,
    RecordingWarning,
    SchedulerError,
    SelectionError,
    SpectralAnalyzerError,
    StepError,
    StoreBusyError,
    StoreError,
    StoreExistsError,
    StoreVersionError,
    UnsafeCheckpointError,
    WindowError,
)
from .export import events_table, export
from . import plot  # registers the ds.spectral accessor
from .ingest import ingest
from .ingest.recorder import Recorder
from .run import Run, open_run

__all__ = [
    "CacheWarning",
    "CheckpointError",
    "DeviceError",
    "DuplicateCheckpointWarning",
    "ExportError",
    "InconsistentCheckpointsError",
    "MetricError",
    "MetricsError",
    "NoCheckpointsError",
    "NonFiniteError",
    "Recorder",
    "RecordingWarning",
    "Run",
    "SchedulerError",
    "SelectionError",
    "SpectralAnalyzerError",
    "StepError",
    "StoreBusyError",
    "StoreError",
    "StoreExistsError",
    "StoreVersionError",
    "UnsafeCheckpointError",
    "WindowError",
    "__version__",
    "events_table",
    "export",
    "ingest",
    "open_run",
    "plot",
]

# Callbacks for training libraries that are optional dependencies: imported on
# first use, and left out of __all__ so that a star import does not need them.
_CALLBACKS = {
    "HFRecorderCallback": (".ingest.hf_callback", "transformers"),
    "LightningRecorderCallback": (".ingest.lightning_callback", "lightning"),
}


def __getattr__(name: str):
    if name in _CALLBACKS:
        return getattr(importlib.import_module(_CALLBACKS[name][0], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # only the callbacks whose library is installed: dir() feeds help() and inspect, which must not raise
    usable = [name for name, (_, lib) in _CALLBACKS.items() if importlib.util.find_spec(lib) is not None]
    return sorted([*globals(), *usable])
