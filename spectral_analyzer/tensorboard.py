"""TensorBoard event files: logged scalars read as metrics, spectra written as scalars.

Reading and writing need the ``tensorboard`` package, an optional dependency
(``pip install "spectral-analyzer[tensorboard]"``); without it both raise a
one-line error that says so.

Reading. An event file is a TFRecord stream: each record is a little-endian
uint64 length, the masked CRC-32C of those 8 bytes, the payload (an ``Event``
protocol buffer) and its masked CRC-32C. The records are checked here, with
google-crc32c, and decoded with tensorboard's own ``Event`` message. A record
cut short, a checksum that does not match or a payload that is not an
``Event`` is an error naming the file: TensorBoard's loaders stop quietly at
such a record, since they expect files that are still being written.

Scalars are the values written by ``add_scalar`` of ``torch.utils.tensorboard``
or tensorboardX (``simple_value``) and by ``tf.summary.scalar`` (a one-element
tensor of the ``scalars`` plugin); images, histograms, text and the rest are
skipped. Every folder under the path that holds event files is a run, as
TensorBoard has it. A tag keeps its name when one run logs it; a tag logged by
several runs (``add_scalars`` writes one run per key) is named
``<run>/<tag>`` in each but the top folder's, the run being its folder
relative to the path.

A training resumed from a checkpoint logs the steps since that checkpoint
again, into a new file of the same run. TensorBoard's rule is followed: a
run's files are read in name order (``SummaryWriter`` names them after the
time they were created), each from start to end, and a value at step s of a
tag replaces every value of that tag read before at a step >= s. So a step
logged twice keeps the value written last, and the steps an abandoned
training logged after the restart point, which the resumed one has not
reached (or never logs), are dropped rather than shown beside the resumed
training's. Wall times are not used: a clock set back must not reorder a
run's values.

Writing. :func:`export_tensorboard` writes one event file of the events
``torch.utils.tensorboard.SummaryWriter`` writes, under a temporary name that
no reader takes for event data, and renames it once complete; its name ends
in :data:`EXPORT_SUFFIX`, which is how a later export recognises it. Other
event files in the folder are never touched.
"""

from __future__ import annotations

import importlib
import itertools
import os
import socket
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ExportError, MetricsError
from .exporting import refuse_inside_store

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "EVENT_PREFIX",
    "EXPORT_SUFFIX",
    "check_logdir",
    "event_files",
    "export_tensorboard",
    "is_event_file",
    "read_scalars",
]

EVENT_PREFIX = "events.out.tfevents."
EXPORT_SUFFIX = ".spectral-analyzer"
INSTALL_HINT = 'pip install "spectral-analyzer[tensorboard]"'
N_SIGMA = 4  # sigma_1 .. sigma_4 are written, as the spectra table prints them
# an export is written as .spectral-analyzer-export.<random>.partial: no reader takes it for event data
# (TensorBoard reads every file with "tfevents" in its name), and it is renamed once complete
TEMPORARY_LABEL = "spectral-analyzer-export"

_MASK_DELTA = 0xA282EAD8
_HEADER = 12  # uint64 length + uint32 masked CRC of it


def is_event_file(path: str | os.PathLike) -> bool:
    """Whether *path* is named as TensorBoard names its event files (``events.out.tfevents.*``)."""
    return Path(path).name.startswith(EVENT_PREFIX)


def event_files(path: str | os.PathLike) -> list[Path]:
    """The event files under *path* (a folder, searched recursively, or one event file), in name order per folder.

    Raises :class:`MetricsError` for a folder that holds none.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise MetricsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISDIR(mode):
        if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
            raise MetricsError(f"{path}: not a regular file; give an event file or a TensorBoard log folder")
        return [path]
    # A run's folder linked in is a run too; a folder the tree holds itself is read under its own name, not
    # a link's (wandb's latest-run), and a link back up the tree or a second link to one folder is read once.
    own = {os.path.realpath(folder): folder for folder, _, _ in os.walk(path)}
    found, seen = [], set()
    for folder, subfolders, names in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or own.get(real, folder) != folder:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()
        candidates = (Path(folder) / n for n in sorted(names) if n.startswith(EVENT_PREFIX))
        found += [f for f in candidates if f.is_file()]
    if not found:
        raise MetricsError(
            f"{path}: not a regular file but a folder, with no TensorBoard event files ({EVENT_PREFIX}*) in it "
            "or under it; give a metrics file (CSV, JSON-lines, trainer_state.json) or a TensorBoard log folder"
        )
    return found


def _event_message(error: type[Exception], doing: str):
    """tensorboard's ``Event`` message class, or *error* saying what to install."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
    except ImportError:
        raise error(f"{doing} needs the tensorboard package: {INSTALL_HINT}") from None
    return Event


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _records(path: Path) -> Iterator[bytes]:
    """The payloads of the TFRecord file at *path*, every length and checksum verified."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        index, pos = 0, 0
        while header := f.read(_HEADER):
            index += 1
            where = f"record {index} (byte {pos} of {size})"
            if len(header) < _HEADER:
                if index == 1:
                    raise MetricsError(f"{path}: not a TensorBoard event file ({size} bytes, less than one record)")
                raise MetricsError(f"{path}: truncated: the file ends inside {where}; if a writer is still "
                                   "writing it, read it again once the writer has flushed or closed it")
            (length,) = struct.unpack_from("<Q", header)
            if _masked_crc(header[:8]) != struct.unpack_from("<I", header, 8)[0]:
                if index == 1:
                    raise MetricsError(f"{path}: not a TensorBoard event file (no TFRecord header at its start)")
                raise MetricsError(f"{path}: corrupt: {where} has a bad length checksum")
            body = f.read(length + 4)
            if len(body) < length + 4:
                raise MetricsError(f"{path}: truncated: the file ends inside {where}; if a writer is still "
                                   "writing it, read it again once the writer has flushed or closed it")
            payload = body[:length]
            if _masked_crc(payload) != struct.unpack_from("<I", body, length)[0]:
                raise MetricsError(f"{path}: corrupt: {where} has a bad data checksum")
            yield payload
            pos += _HEADER + length + 4


def _tensor_value(tensor) -> float | None:
    """The number in a one-element tensor, or None for any other tensor."""
    from tensorboard.util import tensor_util

    array = tensor_util.make_ndarray(tensor)
    if array.size != 1 or array.dtype.kind not in "fiub":
        return None
    return float(array.reshape(-1)[0])


def _run_scalars(files: list[Path], Event) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of one run's files, read in order, each value preempting its tag's steps >= its own."""
    from google.protobuf.message import DecodeError

    scalars: dict[str, dict[int, float]] = {}
    plugins: dict[str, str] = {}  # a tag's plugin, from the first value that names one (writers name it once)
    for path in files:
        for index, payload in enumerate(_records(path), start=1):
            try:
                event = Event.FromString(payload)
            except DecodeError as exc:
                raise MetricsError(f"{path}: record {index} is not a TensorBoard event ({exc})") from None
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                # SummaryWriter(purge_step=s) of a resumed training: every tag's values at steps >= s go, as
                # TensorBoard drops them (those of tags the resumed training does not log again too)
                for points in scalars.values():
                    while points and next(reversed(points)) >= event.step:
                        points.popitem()
                continue
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name:
                    plugins.setdefault(value.tag, value.metadata.plugin_data.plugin_name)
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    x = float(value.simple_value)  # float32, exactly (0.95 logged is 0.949999988)
                elif kind == "tensor" and plugins.get(value.tag) == "scalars":
                    try:
                        x = _tensor_value(value.tensor)
                    except (TypeError, ValueError) as exc:
                        raise MetricsError(f"{path}: record {index}: the scalar {value.tag!r} cannot be "
                                           f"decoded ({exc})") from None
                    if x is None:
                        continue
                else:
                    continue
                points = scalars.setdefault(value.tag, {})  # in increasing step order, as inserted
                while points and next(reversed(points)) >= event.step:  # a restart: the abandoned steps go
                    points.popitem()
                points[event.step] = x
    return scalars


def read_scalars(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The scalars of a TensorBoard event file, or of every event file under a folder, as ``(steps, {name: values})``.

    Steps are the union of the logged steps, as exact int64; each series is
    float64, NaN where it was not logged. Names are tags, ``<run>/<tag>`` for
    a tag that several runs log; a value at step s replaces the values of its
    tag and run read before at steps >= s (a resumed training: see the
    module's notes). A series that would be named
    ``step`` (a loop that logs its step as a scalar) is left out: the steps
    are the index, and a series of that name would clash with it.

    Examples
    --------
    >>> steps, series = read_scalars("lightning_logs/version_0")   # doctest: +SKIP
    >>> series["train/loss"]                                       # doctest: +SKIP
    """
    path = Path(path)
    Event = _event_message(MetricsError, f"{path}: reading TensorBoard event files")
    files = event_files(path)
    root = path if path.is_dir() else path.parent
    runs: dict[str, list[Path]] = {}
    for f in files:
        runs.setdefault(f.parent.relative_to(root).as_posix(), []).append(f)
    try:
        by_run = {run: _run_scalars(fs, Event) for run, fs in runs.items()}
    except OSError as exc:
        raise MetricsError(f"{exc.filename or path}: cannot read ({exc.strerror or exc})") from None
    logged_by: dict[str, int] = {}
    for scalars in by_run.values():
        for tag in scalars:
            logged_by[tag] = logged_by.get(tag, 0) + 1
    named: dict[str, dict[int, float]] = {}
    for run, scalars in by_run.items():
        for tag, points in scalars.items():
            if not tag:
                raise MetricsError(f"{path}: a scalar of run {run!r} has an empty tag; give every scalar a tag")
            name = tag if logged_by[tag] == 1 or run == "." else f"{run}/{tag}"
            if name == "step":  # the step itself, logged as a scalar: the index repeated, left out
                continue
            if name in named:
                raise MetricsError(f"{path}: two series would be named {name!r} (one of them tag {tag!r} of run "
                                   f"{run!r}); read the runs' folders one at a time")
            named[name] = points
    if not named:
        only = " but the step" if any("step" in scalars for scalars in by_run.values()) else ""
        raise MetricsError(f"{path}: the event files hold no scalars{only}")
    steps = np.array(sorted(set().union(*named.values())), dtype=np.int64)
    index = {int(s): i for i, s in enumerate(steps)}
    series = {}
    for name, points in named.items():
        values = np.full(steps.size, np.nan)
        for step, x in points.items():
            values[index[step]] = x
        series[name] = values
    return steps, series


def check_logdir(logdir: str | os.PathLike, *, overwrite: bool = False) -> list[Path]:
    """This package's earlier export files in *logdir*, refused before any work is done unless *overwrite*.

    Refused also: a *logdir* that is a file. A folder that does not exist is
    fine (the export creates it); event files written by anything else are
    neither counted nor touched.
    """
    logdir = Path(logdir)
    if logdir.exists() and not logdir.is_dir():
        raise ExportError(f"{logdir}: is a file; give a folder for the TensorBoard logs")
    refuse_inside_store(logdir)
    ours = sorted(f for f in logdir.glob(f"{EVENT_PREFIX}*{EXPORT_SUFFIX}") if f.is_file()) if logdir.is_dir() else []
    if ours and not overwrite:
        raise ExportError(f"{logdir}: holds an export of spectra already ({ours[0].name}); "
                          "pass overwrite to replace it, or give another folder")
    return ours


def _scalars(spectra: xr.Dataset, dynamics: xr.Dataset | None) -> Iterator[tuple[str, int, float]]:
    """``(tag, step, value)`` of everything :func:`export_tensorboard` writes, group by group, step by step."""
    grouped = "group" in spectra["gap_ratio"].dims
    n_sigma = min(N_SIGMA, spectra.sizes["mode"])
    for group in spectra["group"].values if grouped else [None]:
        part = spectra.sel(group=group) if grouped else spectra
        prefix = "spectral/" if group is None else f"spectral/{group}/"
        columns = {
            "gap_ratio": part["gap_ratio"].values,
            "k_star": np.where(part["k_star"].values > 0, part["k_star"].values, np.nan),  # 0: not defined
            "gap": part["gap"].values,
            **{f"sigma_{j + 1}": part["sigma"].values[:, j] for j in range(n_sigma)},
        }
        for i, step in enumerate(part["step"].values):
            for name, values in columns.items():
                yield f"{prefix}{name}", int(step), float(values[i])
    if dynamics is not None and "event" in dynamics.dims:
        for step, kind, mode in zip(dynamics["event_step"].values, dynamics["event_kind"].values,
                                    dynamics["event_mode"].values):
            yield f"spectral/events/{kind}", int(step), float(mode)


def export_tensorboard(
    spectra: xr.Dataset,
    logdir: str | os.PathLike,
    dynamics: xr.Dataset | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write spectra (and the events of *dynamics*) into *logdir* as TensorBoard scalars, along ``step``.

    Tags, at each step of *spectra* (``spectral/<group>/...`` per group when
    it has a ``group`` dim):

    * ``spectral/gap_ratio``: R = sigma_k* / sigma_k*+1
    * ``spectral/k_star``: k* = argmax_j sigma_j / sigma_j+1
    * ``spectral/gap``: sigma_k* - sigma_k*+1
    * ``spectral/sigma_1`` .. ``spectral/sigma_4``: the top singular values

    and, at each event of *dynamics*, ``spectral/events/<kind>`` = k* at the
    event (``gap_collapse``, ``gap_opening``, ``gap_collapse_relative``,
    ``k_star_shift``: the new k*). Values are stored as TensorBoard stores
    scalars, in float32; NaN where R is not defined.

    The events are those ``torch.utils.tensorboard.SummaryWriter`` writes
    (its ``scalar`` summaries, framed by tensorboard's ``RecordWriter``),
    into ``.spectral-analyzer-export.<random>.partial`` in *logdir*, a name
    no reader takes for event data; once complete and on disk, the file is
    renamed to ``events.out.tfevents.*.spectral-analyzer``. So an export cut
    short by an error, a full disk or a kill leaves no event file (an error
    removes the temporary; a kill may leave it, and it may be deleted). An
    earlier export in *logdir* is refused unless *overwrite*, and then
    removed once the new one is in place (a TensorBoard already running
    keeps the points it read from the removed file, drawn with the new ones,
    until it is restarted). Other event files in *logdir* are left alone.
    Results of runs compared side by side are refused: export each run's
    own. Returns the path of the file written.

    Examples
    --------
    >>> export_tensorboard(run.spectra(window=10), "runs/exp1", run.dynamics(window=10))  # doctest: +SKIP
    >>> # tensorboard --logdir runs/exp1: spectral/gap_ratio beside the loss curves
    """
    missing = [v for v in ("gap_ratio", "k_star", "gap", "sigma") if v not in spectra]
    if missing:
        raise ExportError(f"the spectra Dataset has no {', '.join(missing)}; pass the result of run.spectra(...)")
    for what, ds in (("spectra", spectra), ("dynamics", dynamics)):
        if ds is not None and "run" in ds.coords:  # padded to the other runs' steps: phantom points
            raise ExportError(f"the {what} Dataset is of runs compared side by side; export each run's own "
                              "(sa.open_run(store).spectra(...)) into a folder of its own")
    logdir = Path(logdir)
    check_logdir(logdir, overwrite=overwrite)
    try:  # what _write_events takes, before anything is made
        for module in ("tensorboard.compat.proto.event_pb2", "tensorboard.summary.writer.record_writer",
                       "torch.utils.tensorboard.summary"):
            importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{logdir}: writing TensorBoard event files needs the tensorboard package: "
                          f"{INSTALL_HINT}") from None
    from .exporting import folder_lock

    try:
        logdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"{logdir}: cannot create the folder ({exc.strerror or exc})") from None
    with folder_lock(logdir):  # another export into logdir goes before or after: checked again
        return _write_events(logdir, check_logdir(logdir, overwrite=overwrite), spectra, dynamics)


def _write_events(logdir: Path, previous: list[Path], spectra: xr.Dataset, dynamics: xr.Dataset | None) -> Path:
    """:func:`export_tensorboard`'s file, written into *logdir* (locked), then *previous* removed."""
    from tensorboard.compat.proto.event_pb2 import Event  # (their absence told by the caller)
    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard.summary import scalar

    from .exporting import replacing

    written = _export_name(logdir)
    try:
        with replacing(written, label=TEMPORARY_LABEL) as tmp, open(tmp, "wb") as f:
            records = RecordWriter(f)
            records.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
            for tag, step, value in _scalars(spectra, dynamics):
                event = Event(wall_time=time.time(), step=step, summary=scalar(tag, value))
                records.write(event.SerializeToString())
    except OSError as exc:
        raise ExportError(f"{exc.filename or written}: cannot write ({exc.strerror or exc})") from None
    for f in previous:
        f.unlink(missing_ok=True)
    return written


def _export_name(logdir: Path) -> Path:
    """A name for a new export in *logdir*, as ``SummaryWriter`` names its files, taken by no file there."""
    stem = f"{EVENT_PREFIX}{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    return next(path for i in itertools.count() if not (path := logdir / f"{stem}.{i}{EXPORT_SUFFIX}").exists())
