"""spectral-analyzer: spectral edge analysis of training trajectories.

>>> import spectral_analyzer as sa
>>> run = sa.ingest("ckpts/", "run.zarr")    # doctest: +SKIP
>>> run = sa.open_run("run.zarr")            # doctest: +SKIP

Importing the package is cheap (its errors and version only): torch, dask,
xarray and zarr are imported on first use of a name that needs them, e.g.
``sa.open_run``. The ``ds.spectral`` accessor of result Datasets is
registered with the first such use (or ``import spectral_analyzer.plot``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from ._version import __version__
from .errors import (
    CacheWarning,
    CheckpointError,
    DeviceError,
    DuplicateCheckpointWarning,
    ExportError,
    HeadCountError,
    InconsistentCheckpointsError,
    MetricError,
    MetricsError,
    MixedIntervalsWarning,
    ModelCopyWarning,
    NoCheckpointsError,
    NonFiniteError,
    OutlierDeltaWarning,
    PrecisionChangeWarning,
    RecordingWarning,
    SchedulerError,
    SelectionError,
    SourceError,
    SpectralAnalyzerError,
    StepError,
    StoreBusyError,
    StoreError,
    StoreExistsError,
    StoreRewrittenError,
    StoreVersionError,
    UnderflowWarning,
    UnreadWeightsWarning,
    TiedWeightsWarning,
    UnsafeCheckpointError,
    WindowError,
)

# Public names whose modules import the heavy libraries: imported on first use.
_LAZY = {
    "events_table": ".exporting",
    "export": ".exporting",
    "export_tensorboard": ".tensorboard",
    "ingest": ".ingest",
    "Recorder": ".ingest.recorder",
    "Run": ".run",
    "Runs": ".runs",
    "open_run": ".run",
    "open_runs": ".runs",
}

__all__ = [
    "CacheWarning",
    "CheckpointError",
    "DeviceError",
    "DuplicateCheckpointWarning",
    "ExportError",
    "HeadCountError",
    "InconsistentCheckpointsError",
    "MetricError",
    "MetricsError",
    "MixedIntervalsWarning",
    "NoCheckpointsError",
    "NonFiniteError",
    "OutlierDeltaWarning",
    "PrecisionChangeWarning",
    "Recorder",
    "RecordingWarning",
    "Run",
    "Runs",
    "SchedulerError",
    "SelectionError",
    "SourceError",
    "SpectralAnalyzerError",
    "StepError",
    "StoreBusyError",
    "StoreError",
    "StoreExistsError",
    "StoreRewrittenError",
    "StoreVersionError",
    "UnderflowWarning",
    "UnreadWeightsWarning",
    "TiedWeightsWarning",
    "ModelCopyWarning",
    "UnsafeCheckpointError",
    "WindowError",
    "__version__",
    "events_table",
    "export",
    "export_tensorboard",
    "ingest",
    "open_run",
    "open_runs",
    "plot",
]

# Callbacks for training libraries that are optional dependencies: imported on
# first use, and left out of __all__ so that a star import does not need them.
_CALLBACKS = {
    "HFRecorderCallback": (".ingest.hf_callback", "transformers"),
    "LightningRecorderCallback": (".ingest.lightning_callback", "lightning"),
}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the subpackage spectral_analyzer.ingest binds it here, under the name of the function.
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _CALLBACKS:  # looked up each time: the training library may come and go (tests, notebooks)
        return getattr(importlib.import_module(_CALLBACKS[name][0], __name__), name)
    if name in _LAZY:
        importlib.import_module(".plot", __name__)  # registers the ds.spectral accessor
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name == "plot":
        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # only the callbacks whose library is installed: dir() feeds help() and inspect, which must not raise
    usable = [name for name, (_, lib) in _CALLBACKS.items() if importlib.util.find_spec(lib) is not None]
    return sorted({*globals(), *_LAZY, "plot", *usable})
