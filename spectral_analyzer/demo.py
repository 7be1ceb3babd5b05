"""The whole pipeline on the shipped grokking fixture, into a fresh folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import NoCheckpointsError, StoreExistsError, printable

__all__ = ["FIXTURE", "run_demo"]



def _fixture() -> Path:
    """The shipped grokking run: package data in an installed wheel, fixtures/ in a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "demo_run"
    return installed if installed.is_dir() else here.parent / "fixtures" / "grokking" / "wd1"


FIXTURE = _fixture()


# what the demo writes into its folder: all that an overwrite removes
WRITES = ("run.zarr", "spectra.nc", "dynamics.nc", "dynamics.csv", "dynamics.events.csv", "weights.nc",
          "grokking.csv", "report.html")


def run_demo(output: str | os.PathLike = "spectral-demo", *, source: str | os.PathLike | None = None,
             window: int = 10, overwrite: bool = False) -> dict[str, Path]:
    """Ingest, spectra, dynamics, weights, grokking and report on a checkpoint folder.

    Writes ``run.zarr``, ``spectra.nc``, ``dynamics.nc``, ``dynamics.csv`` and
    ``dynamics.events.csv``, ``weights.nc``, ``grokking.csv`` and ``report.html``
    into *output*, which must be new (or empty) unless *overwrite*, which
    replaces a folder holding these files (and nothing else) only.
    Returns the paths written.
    """
    import xarray as xr

    from . import ingest
    from .exporting import export
    from .report import ACCURACY_METRICS, write_report

    src = Path(source) if source is not None else FIXTURE
    if not src.is_dir():
        raise NoCheckpointsError(
            f"{src}: no checkpoint folder here; pass a folder of checkpoints as the source"
        )
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise StoreExistsError(f"{out}: exists and is not empty; pass overwrite to replace it")
        entries = {e.name for e in out.iterdir()}
        others = sorted(e for e in entries - set(WRITES) if not (e.startswith(".") and e.endswith(".partial")))
        if others:  # a folder of the user's: never emptied for them
            shown = ", ".join(printable(e) for e in others[:3]) + (", ..." if len(others) > 3 else "")
            raise StoreExistsError(f"{out}: holds files the demo does not write ({shown}); overwrite replaces a "
                                   "demo's output only: choose another folder")
        for name in entries:
            target = out / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    run = ingest(src, out / "run.zarr", weights=["*q_proj.weight", "*in_proj_weight[q]"])
    paths = {"store": out / "run.zarr"}
    paths["spectra"] = export(run.spectra(window=window), out / "spectra.nc")
    dyn = run.dynamics(window=window)
    paths["dynamics"] = export(dyn, out / "dynamics.nc")
    paths["table"] = export(dyn, out / "dynamics.csv")
    paths["events"] = out / "dynamics.events.csv"
    paths["weights"] = export(run.weight_spectra(["*q_proj.weight", "*in_proj_weight[q]"]), out / "weights.nc")
    accuracy = next((m for m in ACCURACY_METRICS if m in run.metrics), None)
    if accuracy is not None:
        summary = run.grokking(metric=accuracy, window=window)
        paths["grokking"] = export(xr.concat([summary], dim="run").assign_coords(run=[str(src)]), out / "grokking.csv")
    paths["report"] = write_report(run, out / "report.html", window=window)
    return paths
