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
# where an overwrite keeps the earlier output until the new run completes (removed then; put back if it fails):
# moved file by file into MOVING, which is renamed PREVIOUS once whole, and DISCARDED before it is removed
PREVIOUS, MOVING, DISCARDED = ".earlier-output.partial", ".earlier-output-moving.partial", ".discarded.partial"
NAMES = ".names"  # in PREVIOUS: the earlier output's files, so that a restore cut short can be done again


def run_demo(output: str | os.PathLike = "spectral-demo", *, source: str | os.PathLike | None = None,
             window: int = 10, overwrite: bool = False) -> dict[str, Path]:
    """Ingest, spectra, dynamics, weights, grokking and report on a checkpoint folder.

    Writes ``run.zarr``, ``spectra.nc``, ``dynamics.nc``, ``dynamics.csv`` and
    ``dynamics.events.csv``, ``weights.nc``, ``grokking.csv`` and ``report.html``
    into *output*, which must be new (or empty) unless *overwrite*, which
    replaces a folder holding these files (and nothing else) only.
    Returns the paths written. An overwrite keeps the earlier output until the
    new run completes: a run that fails (or is killed, then run again) leaves
    it as it was.
    """
    src = Path(source) if source is not None else FIXTURE
    if not src.is_dir():
        raise NoCheckpointsError(
            f"{src}: no checkpoint folder here; pass a folder of checkpoints as the source"
        )
    from .exporting import folder_lock, refuse_inside_store

    out = Path(output)
    refuse_inside_store(out)  # before the folder is made
    _check_replaceable(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    busy = f"{out}: another demo run is writing this folder; wait for it to end, or choose another folder"
    with folder_lock(out, busy=busy):  # its own exports into out take the lock again
        _check_replaceable(out, overwrite)
        return _replace(src, out, window, overwrite)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that is not empty unless *overwrite*, and one holding files the demo does not
    write (a folder of the user's: never emptied for them)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise StoreExistsError(f"{out}: exists and is not empty; pass overwrite to replace it")
        entries = {e.name for e in out.iterdir()}
        others = sorted(e for e in entries - set(WRITES) if not (e.startswith(".") and e.endswith(".partial")))
        if others:
            shown = ", ".join(printable(e) for e in others[:3]) + (", ..." if len(others) > 3 else "")
            raise StoreExistsError(f"{out}: holds files the demo does not write ({shown}); overwrite replaces a "
                                   "demo's output only: choose another folder")


def _replace(src: Path, out: Path, window: int, overwrite: bool) -> dict[str, Path]:
    """The demo's run into *out* (locked), the earlier output kept aside until it completes."""
    if overwrite:
        _restore(out)  # an earlier overwrite killed before it completed: its output comes back first
        moving = out / MOVING
        for name in sorted(os.listdir(out)):
            if name in WRITES:  # kept until the new run completes: a run that fails leaves them as they were
                moving.mkdir(exist_ok=True)
                os.replace(out / name, moving / name)
            elif name.endswith(".partial"):  # a killed export's temporary file, or an earlier output discarded
                _remove(out / name)
        if moving.exists():  # every file moved: named, then renamed the earlier output, whole
            (moving / NAMES).write_text("\n".join(sorted(n for n in os.listdir(moving) if n != NAMES)))
            os.replace(moving, out / PREVIOUS)
    try:
        paths = _run(src, out, window)
    except BaseException:
        if overwrite:
            _restore(out)
        raise
    if (out / PREVIOUS).exists():
        os.replace(out / PREVIOUS, out / DISCARDED)  # one rename: never taken for the earlier output again
        _remove(out / DISCARDED)
    return paths


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _restore(out: Path) -> None:
    """Put back the earlier output an overwrite moved aside: from :data:`PREVIOUS` (the new run begun, what
    it wrote removed first) or from :data:`MOVING` (killed while moving it aside: the new run not begun)."""
    aside, moving = out / PREVIOUS, out / MOVING
    if aside.is_dir():
        # Each step may be cut short and done again: a file of the earlier output already put back (no longer
        # aside) stays; the new run's files go where the earlier output has one still aside, or has none.
        # no list: the restore was done but for removing the folder (the list goes last), so nothing in place
        # is the new run's but what is still aside
        earlier = set((aside / NAMES).read_text().split("\n")) if (aside / NAMES).exists() else set(WRITES)
        for name in os.listdir(out):
            new = name in WRITES and (name not in earlier or os.path.lexists(aside / name))
            if new or (name.endswith(".partial") and name not in (PREVIOUS, MOVING)):
                _remove(out / name)
        for name in os.listdir(aside):
            if name != NAMES:
                os.replace(aside / name, out / name)
        (aside / NAMES).unlink(missing_ok=True)
        aside.rmdir()
    if moving.is_dir():
        for name in os.listdir(moving):  # the rest of the earlier output is still in place
            if name != NAMES:  # the list of what was moved, written last: no file of the output
                os.replace(moving / name, out / name)
        (moving / NAMES).unlink(missing_ok=True)
        moving.rmdir()


def _run(src: Path, out: Path, window: int) -> dict[str, Path]:
    import xarray as xr

    from . import ingest
    from .exporting import export
    from .report import ACCURACY_METRICS, write_report
    from .store import Store
    from .weights import find_wq

    run = ingest(src, out / "run.zarr")
    wq = find_wq(Store.open(run.path), None)  # the query matrix, whatever its naming (None: every 2-D weight)
    paths = {"store": out / "run.zarr"}
    paths["spectra"] = export(run.spectra(window=window), out / "spectra.nc")
    dyn = run.dynamics(window=window)
    paths["dynamics"] = export(dyn, out / "dynamics.nc")
    paths["table"] = export(dyn, out / "dynamics.csv")
    paths["events"] = out / "dynamics.events.csv"
    paths["weights"] = export(run.weight_spectra(wq), out / "weights.nc")
    accuracy = next((m for m in ACCURACY_METRICS if m in run.metrics), None)
    if accuracy is not None:
        summary = run.grokking(metric=accuracy, window=window)
        paths["grokking"] = export(xr.concat([summary], dim="run").assign_coords(run=[str(src)]), out / "grokking.csv")
    paths["report"] = write_report(run, out / "report.html", window=window)
    return paths
