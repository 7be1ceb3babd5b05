"""``spectral-analyze``: a thin command line over the library.

Each command parses its arguments, calls one library function and prints.
Errors from bad input (the package's errors, OS errors on the paths given,
bad usage) become one line on stderr, ``Error: ...``, and a non-zero exit
code: 1, or 2 for bad usage as click has it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import warnings
from pathlib import Path

import click

import spectral_analyzer as sa
from spectral_analyzer.errors import DeviceError, SchedulerError, SpectralAnalyzerError, printable, printable_name
from spectral_analyzer.formatting import MISSING, mode, number, ratio
from spectral_analyzer.store import DEFAULT_CHUNK_SIZE

# Importing this module imports no torch, dask, xarray, zarr or matplotlib: `--help`
# and `info` answer at once, and each command imports what it uses.

STORE_ENV = "SPECTRAL_ANALYZER_STORE"
STORAGE_OPTIONS_ENV = "SPECTRAL_ANALYZER_STORAGE_OPTIONS"
DEFAULT_STORE = "spectral.zarr"
SCHEDULER_TIMEOUT = 5.0  # seconds to reach a --scheduler before giving up (dask's default is 30)

# click >= 8.2 raises this for a bare `spectral-analyze`, to print the help (not an error)
_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Group(click.Group):
    """The command group; errors in parsing or running a command become one line (see :func:`_one_line_errors`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context):
        with _one_line_errors(), warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return super().invoke(ctx)


def _one_line_warnings(show):
    """A ``warnings.showwarning`` that prints the package's warnings as ``warning: <one line>``, others by *show*."""

    shown = set()  # a warning given twice in one command (the band's cache, then the spectra's) is printed once

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if category.__module__ == "spectral_analyzer.errors":
            if str(message) in shown:
                return
            shown.add(str(message))
            tqdm = sys.modules.get("tqdm")
            with tqdm.tqdm.external_write_mode(file=sys.stderr) if tqdm else contextlib.nullcontext():
                click.echo(f"warning: {printable(str(message))}", err=True)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


@contextlib.contextmanager
def _one_line_errors():
    """Report a user's error as ``Error: <one line>`` on stderr and exit, with no traceback."""
    try:
        yield
    except _HELP:
        raise
    except click.ClickException as exc:  # bad usage: one line instead of click's usage block
        ctx = getattr(exc, "ctx", None)
        message = exc.format_message()
        if isinstance(exc, click.UsageError) and ctx is not None:
            message = f"{message.rstrip('.')} (see '{ctx.command_path} --help')"
        _fail(message, exc.exit_code)
    except SpectralAnalyzerError as exc:
        _fail(str(exc), 1)
    except MemoryError as exc:
        _fail(f"out of memory: {exc or 'an allocation failed'}", 1)
    except KeyboardInterrupt:
        _fail("interrupted; what was committed before is kept (a store's rows, its caches)", 130)
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise  # output piped into a closed reader (`| head`): click's own quiet exit
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", 1)


def _fail(message: str, code: int) -> None:
    # printable: names from files may hold newlines or terminal escapes; the library
    # says "pass overwrite" (its keyword), the command line has the --overwrite flag
    click.echo(f"Error: {printable(message).replace('pass overwrite', 'pass --overwrite')}", err=True)
    sys.exit(code)


def _device(ctx, param, value: str) -> str:
    """auto, cpu, cuda or cuda:N, refused here when torch cannot use it."""
    import torch

    if value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {value!r}; use --device auto, cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("cuda requested but torch sees no CUDA device; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{value} requested but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return value


def _scheduler(ctx, param, address: str | None):
    """A dask.distributed client of the scheduler at *address*, closed with the command."""
    if address is None:
        return None
    from distributed import Client

    try:
        client = Client(address, timeout=SCHEDULER_TIMEOUT, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        raise SchedulerError(
            f"cannot reach the dask scheduler at {address} ({' '.join(str(exc).split())}); "
            "check the address, or leave out --scheduler to compute here"
        ) from None
    ctx.call_on_close(client.close)
    return client


def _above(bound: float, or_equal: bool = False):
    """A click callback that takes a finite number greater than *bound* (or equal to it, *or_equal*), or None
    (the option not given)."""

    def check(ctx, param, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and (value >= bound if or_equal else value > bound)):
            raise click.BadParameter(f"{value:g} is not a finite number {'at least' if or_equal else 'greater than'} "
                                     f"{bound:g}")
        return value

    return check


def _storage_options(ctx, param, values) -> dict:
    """``KEY=VALUE`` pairs over the JSON object of the environment variable.

    VALUE stays a string (a secret or a profile may look like a number)
    unless it is true, false or a JSON object or list (``client_kwargs={...}``).
    """
    env = os.environ.get(STORAGE_OPTIONS_ENV)
    try:
        options = json.loads(env) if env else {}
    except json.JSONDecodeError:
        options = None
    if not isinstance(options, dict):
        raise click.BadParameter(f"{STORAGE_OPTIONS_ENV} is not a JSON object: {env}")
    return _key_values(options, values, "--storage-option")


def _source_options(ctx, param, values) -> dict | None:
    """``--source-option KEY=VALUE`` pairs, as ``--storage-option`` takes them; None when none is given."""
    return _key_values({}, values, "--source-option") if values else None


def _key_values(options: dict, values, hint: str) -> dict:
    """*options* with the ``KEY=VALUE`` items of *values* added (the option *hint* named in errors)."""
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"not KEY=VALUE: {item}", param_hint=hint)
        if value.lower() in ("true", "false"):  # False, as Python writes it, is no string s3fs would take as false
            options[key] = value.lower() == "true"
        elif value.startswith(("{", "[")):
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                raise click.BadParameter(f"{key}: not JSON: {value}", param_hint=hint) from None
        else:
            options[key] = value
    return options


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(sa.__version__, prog_name="spectral-analyze")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
              callback=_storage_options, expose_value=True,
              help=f"fsspec option for a store given as a URL, e.g. endpoint_url=http://host:9000 or "
                   f"anon=true (repeatable; env {STORAGE_OPTIONS_ENV} takes a JSON object).")
@click.pass_context
def main(ctx: click.Context, storage_options: dict) -> None:
    """Spectral edge analysis of training checkpoints.

    A store is a folder or an fsspec URL (s3://bucket/run.zarr, gs://...).
    """
    ctx.obj = {"storage_options": storage_options or None}


def _storage() -> dict | None:
    """The storage options given to the command group."""
    return (click.get_current_context().find_root().obj or {}).get("storage_options")


def _open_run(store: str):
    return sa.open_run(store, storage_options=_storage())


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


@main.command()
@click.argument("ckpt_dir")
@click.option("-o", "--output", "store", envvar=STORE_ENV, default=DEFAULT_STORE, show_default=True,
              help=f"Store to create or append to (env {STORE_ENV}).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=DEFAULT_CHUNK_SIZE,
              show_default=True, help="Elements per chunk of a delta row.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only tensors whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out tensors whose name matches (repeatable).")
@click.option("--metrics", type=click.Path(exists=True), default=None,
              help="CSV / JSONL with a step column, trainer_state.json, or TensorBoard event files: one "
                   "events.out.tfevents.* file or a log folder holding them (tags become names; needs "
                   "pip install \"spectral-analyzer[tensorboard]\").")
@click.option("--steps", default=None, metavar="S0,S1,...",
              help="Steps of the checkpoints in name order, when names hold none.")
@click.option("--select", default=None, metavar="A..B[:K]|S0,S1,...",
              help="Only the checkpoints at these steps: a range (both ends included, every K-th step from A), "
                   "single steps, or both, comma-separated.")
@click.option("--every", type=click.IntRange(min=1), default=None, metavar="K",
              help="Only the checkpoints whose step is a multiple of K (Pythia's uniform grid: --every 1000).")
@click.option("--strip-prefix", multiple=True, metavar="PREFIX",
              help="Tensor-name prefixes to strip [default: module. and _orig_mod.].")
@click.option("--weights", "weight_globs", multiple=True, metavar="GLOB",
              help="Record singular values of these 2-D weights while reading (repeatable).")
@click.option("--lightning-prefix", default="model.", show_default=True,
              help="Prefix stripped from Lightning .ckpt keys when every key has it ('' to keep).")
@click.option("--revisions", default=None, metavar="SPEC",
              help="hf:// sources: revisions to ingest, comma-separated names, globs ('step*') or step ranges "
                   "(step1000..step143000:1000) [default: every revision named by a step].")
@click.option("--source-option", "source_options", multiple=True, metavar="KEY=VALUE", callback=_source_options,
              help="fsspec option for a CKPT_DIR given as a URL, when it differs from the --storage-option "
                   "ones (repeatable).")
@click.option("--overwrite", is_flag=True, help="Replace the store at the output path (never other files).")
@click.option("--wait", is_flag=True, help="Wait while another process writes the store, instead of failing.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def ingest(ckpt_dir, store, chunk_size, include, exclude, metrics, steps, select, every, strip_prefix, weight_globs,
           lightning_prefix, revisions, source_options, overwrite, wait, progress):
    """Ingest a folder of checkpoints into a store of parameter deltas.

    CKPT_DIR may also be one model's folder of the Hugging Face hub cache
    (~/.cache/huggingface/hub/models--ORG--NAME): every cached revision with
    a step in its name is ingested in step order; a folder at an fsspec URL
    (s3://bucket/ckpts, read with the --storage-option or --source-option
    options); or hf://org/name: the revisions of a hub model repository
    (--revisions), read through huggingface_hub (HF_TOKEN, HF_ENDPOINT apply).

    Metrics come from --metrics, else from the newest checkpoint's
    trainer_state.json, else from trainer_state.json, metrics.csv or
    metrics.jsonl at the top of CKPT_DIR. A TensorBoard log folder given to
    --metrics is searched recursively; its scalars keep their tags as names
    (run/tag for a tag that several runs log). In every log, a step logged
    again (a resumed training) keeps the value written last, and the steps
    after it that the abandoned training logged are dropped, as TensorBoard
    shows them.
    """
    try:
        step_list = [int(s) for s in steps.split(",")] if steps else None
    except ValueError:
        hint = "; to choose checkpoints by step, use --select A..B[:K]" if ".." in steps else ""
        raise click.BadParameter(f"not a comma-separated list of integers: {steps}{hint}", param_hint="--steps") from None
    options = {"strip_prefix": strip_prefix} if strip_prefix else {}
    run = sa.ingest(
        ckpt_dir, store, chunk_size=chunk_size, include=include, exclude=exclude, metrics=metrics,
        steps=step_list, select=select, every=every, weights=list(weight_globs) or None,
        lightning_prefix=lightning_prefix or None,
        overwrite=overwrite, progress=progress, wait=wait,
        storage_options=_storage(), revisions=revisions, source_options=source_options,
        **options,
    )
    steps_ = run.checkpoint_steps
    click.echo(
        f"{printable(run.path)}: {run.n_deltas} deltas over steps {steps_[0]}..{steps_[-1]}, "
        f"p = {run.n_params:,} in {run.tensors.sizes['tensor']} tensors"
    )
    source = run.provenance.get("hub_cache") or run.provenance.get("hub") or {}
    for note in source.get("left_out", []):
        name = f"revision {note['revision']}" if note["revision"] else "snapshot"
        commit = f" ({note['commit'][:12]})" if note["commit"] else ""
        click.echo(f"left out {printable(name)}{printable(commit)}: {printable(note['reason'])}")


@main.command()
@click.argument("store", required=False, envvar=STORE_ENV, default=DEFAULT_STORE)
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor.")
def info(store, show_tensors):
    """Describe a store: steps, parameters, tensors, size, metrics, warnings."""
    from spectral_analyzer.store.summary import summarize

    s = summarize(store, _storage())
    dtypes = sorted({t.dtype for t in s.tensors})
    first_last = s.checkpoint_steps
    rows = [
        ("store", f"{printable(s.path)} (format {s.format_version})"),
        ("checkpoints", f"{s.n_checkpoints}, steps {first_last[0]}..{first_last[1]}" if first_last else "none"),
        ("deltas", f"{s.n_deltas}"),
        ("params", f"{s.n_params:,} in {len(s.tensors)} tensors ({', '.join(dtypes)})"),
        ("on disk", _human_bytes(s.size_on_disk)),
        ("metrics", f"{printable(', '.join(s.metrics))} ({s.logged_steps} steps)" if s.metrics else "none"),
        ("warnings", str(len(s.warnings)) if s.warnings else "none"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    for message in s.warnings:
        click.echo(f"warning: {printable(message)}")
    if show_tensors:
        nw = max(len(printable_name(t.name)) for t in s.tensors)
        for t in s.tensors:
            shape = "x".join(map(str, t.shape)) or "scalar"
            click.echo(f"  {printable_name(t.name):<{nw}}  {shape:>14}  {t.dtype:>9}  offset {t.offset}")


def _format(x) -> str:
    if isinstance(x, str):
        return x or MISSING
    return number(x) if isinstance(x, float) else str(x)


_QUIET = click.option("-q", "--quiet", is_flag=True, help="Print no table (only what was written).")


def _summaries(ds, events=None) -> list[str]:
    """One line per group: the peak of R and its step, where R falls back under its noise floor, the k* shifts;
    and the first collapse among the *events* (a dynamics Dataset; default *ds*)."""
    import numpy as np

    groups = list(ds["group"].values) if "group" in ds["gap_ratio"].dims else [None]
    lines = []
    for g in groups:
        part = ds.sel(group=g) if g is not None else ds
        r, k, steps = part["gap_ratio"].values, part["k_star"].values, part["step"].values
        prefix = "" if g is None else f"{printable_name(str(g))}: "
        if not np.isfinite(r).any():
            lines.append(f"{prefix}R is not defined in any window")
            continue
        peak = int(np.nanargmax(r))
        text = f"{prefix}peak R {ratio(r[peak])} at step {steps[peak]} (k*={mode(k[peak])})"
        floor = float(part["null_q95"]) if "null_q95" in part else float("nan")
        if np.isfinite(floor) and r[peak] < floor:
            text += f"; never above the noise floor {ratio(floor)}"
        elif np.isfinite(floor):
            under = np.nonzero(r[peak:] < floor)[0]
            text += (f"; back under the noise floor {ratio(floor)} at step {steps[peak + under[0]]}" if under.size
                     else f"; above the noise floor {ratio(floor)} to the end")
        defined = k > 0  # k* = 0: no gap ratio in that window, not a position of its own
        k, steps = k[defined], steps[defined]
        shifts = np.nonzero(np.diff(k))[0] + 1
        text += f"; k* changes {shifts.size} time{'s' if shifts.size != 1 else ''}"
        if shifts.size:
            first = shifts[0]
            text += f" (first at step {steps[first]}: {k[first - 1]} -> {k[first]})"
        lines.append(text)
    events = ds if events is None else events
    if "event_kind" in events:  # dynamics: the events name the collapse
        kinds = [str(k) for k in events["event_kind"].values]
        collapse = next((i for i, kind in enumerate(kinds) if "collapse" in kind), None)
        if collapse is not None:
            lines.append(f"first collapse of R at step {int(events['event_step'].values[collapse])}")
    return lines


def _print_table(ds, n_sigma: int = 4) -> None:
    """step, k*, R, gap, sigma_1..sigma_4 (and group when grouped)."""
    groups = list(ds["group"].values) if "group" in ds.dims else [None]
    n_sigma = min(n_sigma, ds.sizes["mode"])
    header = (["group"] if groups[0] is not None else []) + ["step", "k*", "R", "gap"] + [
        f"sigma_{j}" for j in range(1, n_sigma + 1)
    ]
    rows = []
    for g in groups:
        part = ds.sel(group=g) if g is not None else ds
        for i, step in enumerate(part["step"].values):
            row = [printable_name(str(g))] if g is not None else []
            row += [str(int(step)), mode(part["k_star"].values[i]), ratio(part["gap_ratio"].values[i]),
                    _format(float(part["gap"].values[i]))]
            row += [_format(float(v)) for v in part["sigma"].values[i, :n_sigma]]
            rows.append(row)
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    click.echo("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        click.echo("  ".join(v.rjust(w) for v, w in zip(r, widths)))


@main.command()
@click.argument("store", required=False, envvar=STORE_ENV, default=DEFAULT_STORE)
@click.option("-w", "--window", type=click.IntRange(min=2), default=10, show_default=True, help="Window W in deltas.")
@click.option("--params", multiple=True, metavar="GLOB", help="Only tensors whose name matches (repeatable).")
@click.option("--group-by", type=click.Choice(["tensor", "layer", "module"]), default=None,
              help="One spectrum per group.")
@click.option("--center", is_flag=True, help="Mean-centre each window (H G H).")
@click.option("--stride", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--steps", "step_range", default=None, metavar="A..B",
              help="Only the deltas between the checkpoints at steps A..B (both included; A.. or ..B open-ended).")
@click.option("--max-lag", type=click.IntRange(min=1), default=None,
              help="Lags L of the band to build (default max(16, W)).")
@click.option("--device", default="auto", show_default=True, callback=_device, help="auto, cpu or cuda.")
@click.option("--scheduler", default=None, metavar="ADDRESS", callback=_scheduler,
              help="dask.distributed scheduler address.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Export to .nc, .csv or .json.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_QUIET
def spectra(store, window, params, group_by, center, stride, step_range, max_lag, device, scheduler, output, overwrite,
            progress, quiet):
    """Windowed spectra: k*, gap ratio R, gap and singular values per step."""
    import numpy as np
    from spectral_analyzer.exporting import check_output, export

    if output:
        check_output(output, overwrite=overwrite)
    run = _open_run(store)
    ds = run.spectra(
        window=window, params=list(params) or None, group_by=group_by, center=center, stride=stride,
        steps=step_range, max_lag=max_lag, device=device, scheduler=scheduler, progress=progress,
    )
    if output:
        export(ds, output, overwrite=overwrite)
        click.echo(f"wrote {printable(output)}")
    if quiet:
        return
    _print_table(ds)
    click.echo("k*: gap position; R: sigma_k* / sigma_k*+1; gap: sigma_k* - sigma_k*+1; -: not defined")
    floors = [ratio(v) for v in np.atleast_1d(ds["null_q95"].values)]
    if "group" in ds.dims:
        floors = [f"{printable_name(str(g))} {f}" for g, f in zip(ds["group"].values, floors)]
    null = f"W-1={window - 1}, centred" if center else f"W={window}"  # a centred window's Gram has rank W-1
    click.echo(f"noise floor of R (Wishart 95% quantile, {null}): " + ", ".join(floors))
    if stride > 1:  # windows end every `stride` deltas from the first: the last deltas may be in none
        from spectral_analyzer.spectra import step_rows

        steps = run.store.steps[step_rows(run.store, step_range)]
        if int(ds["step"].values[-1]) < int(steps[-1]):
            click.echo(f"stride {stride}: the last window ends at step {int(ds['step'].values[-1])}; the deltas "
                       f"after it, to step {int(steps[-1])}, are in no window")
    for line in _summaries(ds):
        click.echo(line)


@main.command()
@click.argument("store", required=False, envvar=STORE_ENV, default=DEFAULT_STORE)
@click.option("-w", "--window", type=click.IntRange(min=2), default=10, show_default=True, help="Window W in deltas.")
@click.option("--params", multiple=True, metavar="GLOB", help="Only tensors whose name matches (repeatable).")
@click.option("--group-by", type=click.Choice(["tensor", "layer", "module"]), default="module", show_default=True,
              help="Groups of the mode energy.")
@click.option("--tau", type=float, default=1.2, show_default=True, callback=_above(0),
              help="Threshold on R for collapse / opening (> 0).")
@click.option("--factor", type=float, default=None, callback=_above(1),
              help="Also report R falling below its running peak / FACTOR (> 1).")
@click.option("--persistence", type=click.IntRange(min=1), default=2, show_default=True,
              help="Windows an event must hold for.")
@click.option("--lr", type=float, default=None, callback=_above(0),
              help="Learning rate (> 0) for the adiabatic parameter (default: metrics).")
@click.option("--constant", type=float, default=1.0, show_default=True, callback=_above(0),
              help="C (> 0) of the Davis-Kahan stability.")
@click.option("--steps", "step_range", default=None, metavar="A..B",
              help="Only the deltas between the checkpoints at steps A..B (both included; A.. or ..B open-ended).")
@click.option("--device", default="auto", show_default=True, callback=_device)
@click.option("--scheduler", default=None, metavar="ADDRESS", callback=_scheduler)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Export to .nc, .csv or .json (+ <stem>.events.csv|json).")
@click.option("--overwrite", is_flag=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@_QUIET
def dynamics(store, window, params, group_by, tau, factor, persistence, lr, constant, step_range, device, scheduler,
             output, overwrite, progress, quiet):
    """Stability, rotation, gap flow, mode energy and events of the spectrum."""
    from spectral_analyzer.exporting import check_output, events_table, export

    if output:
        check_output(output, overwrite=overwrite, events=True)
    run = _open_run(store)
    ds = run.dynamics(
        window=window, params=list(params) or None, group_by=group_by, tau=tau, factor=factor,
        persistence=persistence, lr=lr, constant=constant, steps=step_range, device=device, scheduler=scheduler,
        progress=progress,
    )
    if output:
        export(ds, output, overwrite=overwrite)
        click.echo(f"wrote {printable(output)}")
    if quiet:
        return
    top = min(3, window)
    header = ["step", "phase", "k*", "R", "dC", "A"] + [f"alpha_{j}" for j in range(1, top + 1)] + [
        f"rot_{j}" for j in range(1, top + 1)
    ]
    rows = []
    for t, step in enumerate(ds["step"].values):
        rows.append(
            [str(int(step)), str(ds["phase"].values[t]) or "-", mode(ds["k_star"].values[t]),
             ratio(ds["gap_ratio"].values[t]), _format(float(ds["dC_norm"].values[t])),
             _format(float(ds["adiabatic"].values[t]))]
            + [_format(float(v)) for v in ds["alpha"].values[t, :top]]
            + [_format(float(v)) for v in ds["rotation_tracked"].values[t, :top]]
        )
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(header)]
    click.echo("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        click.echo("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    events = events_table(ds)
    click.echo(f"events ({len(events)}):" if events else "events: none")
    for e in events:
        click.echo(f"  step {e['step']:>8}  {e['kind']:<22} k*={mode(e['mode'])}  R={ratio(e['value'])}")
    click.echo("dC: ||dC||_F, the rank-two change d_i d_i^T - d_i-W d_i-W^T of the window covariance; "
               "A: adiabatic parameter ||dC||_F / (eta g^2); "
               "alpha_j: Davis-Kahan stability of mode j; rot_j: rotation of mode j since the last window (rad); "
               "-: not defined")
    # The events and phases are those of every window; the table starts at the second, which has one before
    # it: the summary is of every window too, from the spectra of the same windows (the band is cached).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.MixedIntervalsWarning)  # told once, by the dynamics
        series = run.spectra(window=window, params=list(params) or None, steps=step_range, device=device,
                             scheduler=scheduler)
    click.echo(f"the first window, ending at step {int(series['step'].values[0])}, has none before it to compare "
               "with: it is not in the table; the events, the phases and the summary take it")
    for line in _summaries(series, events=ds):
        click.echo(line)


@main.command("export-tb")
@click.argument("store")
@click.argument("logdir", type=click.Path(dir_okay=True, file_okay=False))
@click.option("-w", "--window", type=click.IntRange(min=2), default=10, show_default=True, help="Window W in deltas.")
@click.option("--params", multiple=True, metavar="GLOB", help="Only tensors whose name matches (repeatable).")
@click.option("--group-by", type=click.Choice(["tensor", "layer", "module"]), default=None,
              help="One set of tags per group: spectral/<group>/gap_ratio, ...")
@click.option("--events/--no-events", default=True, show_default=True,
              help="Also write the dynamics events (needs W + 1 deltas).")
@click.option("--tau", type=float, default=1.2, show_default=True, callback=_above(0),
              help="Threshold on R for collapse / opening (> 0).")
@click.option("--factor", type=float, default=None, callback=_above(1),
              help="Also report R falling below its running peak / FACTOR (> 1).")
@click.option("--persistence", type=click.IntRange(min=1), default=2, show_default=True,
              help="Windows an event must hold for.")
@click.option("--device", default="auto", show_default=True, callback=_device)
@click.option("--overwrite", is_flag=True, help="Replace this command's earlier export in LOGDIR.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def export_tb(store, logdir, window, params, group_by, events, tau, factor, persistence, device, overwrite, progress):
    """Write the spectra as TensorBoard scalars into LOGDIR, beside the loss curves.

    \b
    Tags, at each window's end step (spectral/<group>/... with --group-by):
      spectral/gap_ratio   R = sigma_k* / sigma_k*+1
      spectral/k_star      k*
      spectral/gap         sigma_k* - sigma_k*+1
      spectral/sigma_1..4  the top singular values
      spectral/events/<kind> = k* at each dynamics event (gap_collapse, gap_opening,
                             gap_collapse_relative, k_star_shift)

    One event file, events.out.tfevents.*.spectral-analyzer, in float32 as
    TensorBoard stores scalars. An earlier one in LOGDIR is replaced only with
    --overwrite; other event files there are left alone. View with
    `tensorboard --logdir LOGDIR`.
    """
    from spectral_analyzer.tensorboard import check_logdir, export_tensorboard

    replaced = check_logdir(logdir, overwrite=overwrite)
    run = _open_run(store)
    selection = list(params) or None
    ds = run.spectra(window=window, params=selection, group_by=group_by, device=device, progress=progress)
    dyn = (run.dynamics(window=window, params=selection, tau=tau, factor=factor, persistence=persistence,
                        device=device, progress=progress) if events else None)
    path = export_tensorboard(ds, logdir, dyn, overwrite=overwrite)
    n_events = dyn.sizes.get("event", 0) if dyn is not None else 0
    groups = f", {ds.sizes['group']} groups" if "group" in ds.dims else ""
    click.echo(f"wrote {printable(str(path))}: {ds.sizes['step']} steps{groups}, "
               f"{n_events} event{'s' if n_events != 1 else ''}")
    if replaced:
        click.echo("replaced the earlier export: restart a TensorBoard that is running, which keeps drawing the "
                   "points it read from the removed file beside the new ones")


def _echo_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(header)]
    click.echo("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        click.echo("  ".join(v.rjust(w) for v, w in zip(r, widths)))


@main.command()
@click.argument("store", required=False, envvar=STORE_ENV, default=DEFAULT_STORE)
@click.option("--match", multiple=True, metavar="GLOB", help="Weights to decompose (repeatable) [default: all 2-D].")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Keep the top singular values.")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Also split each attention projection into its heads (W_K, W_V: key/value heads; W_O: columns).")
@click.option("--device", default="auto", show_default=True, callback=_device)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Export to .nc, .csv or .json.")
@click.option("--overwrite", is_flag=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@_QUIET
def weights(store, match, top, heads, device, output, overwrite, progress, quiet):
    """Singular values of weight matrices at every checkpoint."""
    from spectral_analyzer.exporting import check_output, export

    if output:
        check_output(output, overwrite=overwrite)
    run = _open_run(store)
    ds = run.weight_spectra(list(match) or None, top=top, heads=heads, device=device, progress=progress)
    if output:
        export(ds, output, overwrite=overwrite)
        click.echo(f"wrote {printable(output)}")
    if quiet:
        return
    rows = []
    for name in ds["matrix"].values:
        part = ds.sel(matrix=name)
        for t, step in enumerate(ds["step"].values):
            s = part["sigma"].values[t]
            rows.append([str(int(step)), printable_name(str(name)), _format(float(s[0])),
                         _format(float(s[1])) if s.size > 1 else MISSING,
                         ratio(part["sigma_ratio_12"].values[t]), _format(float(part["g12"].values[t])),
                         _format(float(part["g23"].values[t])), _format(float(part["stable_rank"].values[t]))])
    _echo_table(["step", "matrix", "sigma_1", "sigma_2", "s1/s2", "g12", "g23", "stable_rank"], rows)
    click.echo("s1/s2: sigma_1 / sigma_2; g12, g23: sigma_1 - sigma_2, sigma_2 - sigma_3; "
               "stable_rank: ||W||_F^2 / sigma_1^2; -: not defined")


@main.command()
@click.argument("store", required=False, envvar=STORE_ENV, default=DEFAULT_STORE)
@click.option("--layer", multiple=True, metavar="GLOB",
              help="Attention layers (module prefix or query matrix) to analyse (repeatable) [default: all].")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="Query heads per layer [default: from the model config kept at ingest].")
@click.option("--device", default="auto", show_default=True, callback=_device)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Export to .nc, .csv or .json.")
@click.option("--overwrite", is_flag=True)
@_QUIET
def attention(store, layer, heads, device, output, overwrite, quiet):
    """QK and OV circuit spectra of every attention head at every checkpoint."""
    from spectral_analyzer.exporting import check_output, export

    if output:
        check_output(output, overwrite=overwrite)
    run = _open_run(store)
    ds = run.attention_spectra(list(layer) or None, heads=heads, device=device)
    if output:
        export(ds, output, overwrite=overwrite)
        click.echo(f"wrote {printable(output)}")
    if quiet:
        return
    rank = ds.sizes["rank"]
    lam, qk, ov = ds["qk_eig_abs"].values, ds["qk_sigma"].values, ds["ov_sigma"].values
    rows = []
    for i, name in enumerate(ds["layer"].values):
        for h in range(int(ds["n_heads"].values[i])):
            for t, step in enumerate(ds["step"].values):
                rows.append([str(int(step)), printable_name(str(name)), str(h)]
                            + [_format(float(lam[t, i, h, j])) if j < rank else MISSING for j in range(3)]
                            + [ratio(ds["qk_ratio_12"].values[t, i, h]),
                               _format(float(ds["qk_gap_23"].values[t, i, h])),
                               _format(float(qk[t, i, h, 0])), _format(float(ov[t, i, h, 0]))])
    _echo_table(["step", "layer", "head", "|l1|", "|l2|", "|l3|", "|l1|/|l2|", "|l2|-|l3|", "qk_s1", "ov_s1"], rows)
    click.echo("|lj|: moduli of the eigenvalues of the QK circuit W_Q^h^T W_K^h; qk_s1, ov_s1: largest singular "
               "values of the QK and OV (W_O^h W_V^h) circuits; -: not defined")


@main.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--metric", default="test_acc", show_default=True, help="The accuracy metric that defines grokking.")
@click.option("--threshold", type=float, default=0.95, show_default=True)
@click.option("-w", "--window", type=click.IntRange(min=3), default=10, show_default=True)
@click.option("--wq", default=None, metavar="GLOB",
              help="The W_Q matrix [default: first q projection found]; with --operator qk, its layer.")
@click.option("--operator", type=click.Choice(["trajectory", "qk"]), default="trajectory", show_default=True,
              help="trajectory: the window Gram of the updates; qk: eigenvalues of the QK circuits, per head.")
@click.option("--heads", type=click.IntRange(min=1), default=None,
              help="With --operator qk: query heads per layer [default: from the model config].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Export to .nc, .csv or .json.")
@click.option("--overwrite", is_flag=True)
@_QUIET
def grokking(stores, metric, threshold, window, wq, operator, heads, output, overwrite, quiet):
    """One summary row per run (per head with --operator qk): did it grok, when, and what the spectrum did before."""
    import xarray as xr
    from spectral_analyzer.exporting import check_output, export
    from spectral_analyzer.runs import per_run_attrs

    if output:
        check_output(output, overwrite=overwrite)
    options = {"operator": "qk", "heads": heads} if operator == "qk" else {}
    runs = [_open_run(s) for s in stores]
    for s, run in zip(stores, runs):  # refused before any run is analysed (and its band cached)
        if metric not in run.metrics.data_vars:
            logged = ", ".join(map(str, run.metrics.data_vars)) or "none"
            raise sa.MetricError(f"{s}: metric {metric!r} is not logged (metrics: {logged})")
    summaries = [run.grokking(metric=metric, threshold=threshold, window=window, wq=wq, **options) for run in runs]
    if output:
        table = per_run_attrs(xr.concat(summaries, dim="run", combine_attrs="drop_conflicts")
                              .assign_coords(run=list(stores)), summaries)
        export(table, output, overwrite=overwrite)
        click.echo(f"wrote {printable(output)}")
    if quiet:
        return
    if operator == "qk":
        _print_qk_grokking(stores, summaries, metric, threshold)
        return
    header = ["store", "grokked", "grok_step", "g23_decline", "R_early", "R_grok", "k*", "WQ s1/s2 grok", "WQ s1/s2 end"]
    rows = [
        [printable(s), "yes" if bool(g["grokked"]) else "no", str(int(g["grok_step"])) if bool(g["grokked"]) else MISSING,
         _format(float(g["g23_decline"])), ratio(g["R_early"]), ratio(g["R_grok"]),
         _format(float(g["k_star_mode"])), ratio(g["wq_sigma_ratio_grok"]), ratio(g["wq_sigma_ratio_end"])]
        for s, g in zip(stores, summaries)
    ]
    _echo_table(header, rows)
    click.echo(f"g23_decline: g23 at its pre-grok peak / at grokking; R_early: mean R before grokking; k*: most "
               f"frequent; WQ s1/s2: sigma_1 / sigma_2 of W_Q; -: not defined "
               f"(grokked: {printable(metric)} >= {threshold})")
    grokked = [(int(g["grok_step"]), s) for s, g in zip(stores, summaries) if bool(g["grokked"])]
    if grokked:
        step, where = min(grokked)
        click.echo(f"grokked: {len(grokked)} of {len(stores)} runs; earliest at step {step} ({printable(where)})")
    else:
        click.echo(f"grokked: none of {len(stores)} runs")


def _print_qk_grokking(stores, summaries, metric: str, threshold: float) -> None:
    """One row per run and head of the QK-operator grokking summaries."""
    rows = []
    for s, g in zip(stores, summaries):
        grokked = bool(g["grokked"])
        for h in g["head"].values:
            part = g.sel(head=h)
            rows.append([printable(s), printable(g.attrs["layer"]), str(int(h)), "yes" if grokked else "no",
                         str(int(g["grok_step"])) if grokked else MISSING]
                        + [_format(float(part["qk_gap_23_decline"]))]
                        + [ratio(part[k]) for k in ("qk_ratio_12_early", "qk_ratio_12_grok", "qk_ratio_12_end")])
    _echo_table(["store", "layer", "head", "grokked", "grok_step", "gap23_decline", "l1/l2 early", "l1/l2 grok",
                 "l1/l2 end"], rows)
    click.echo(f"gap23_decline: |l2|-|l3| of W_Q^h^T W_K^h at its pre-grok peak / at grokking; l1/l2: "
               f"|l1|/|l2|, mean before grokking, at grokking, at the end; -: not defined "
               f"(grokked: {printable(metric)} >= {threshold})")


@main.command()
@click.argument("stores", nargs=-1)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="report.html", show_default=True)
@click.option("-w", "--window", type=click.IntRange(min=3), default=10, show_default=True)
@click.option("--metric", default=None, help="Metric drawn beside the gap ratio [default: accuracy or loss].")
@click.option("--threshold", type=float, default=None,
              help="Accuracy that counts as grokked [default: 0.95, or 95 for an accuracy logged in percent].")
@click.option("--overwrite", is_flag=True)
def report(stores, output, window, metric, threshold, overwrite):
    """One self-contained HTML page with every plot and the summary tables; several STORES are compared."""
    from spectral_analyzer.report import write_comparison, write_report

    stores = stores or (os.environ.get(STORE_ENV) or DEFAULT_STORE,)  # empty: the default, as elsewhere
    if not output.lower().endswith((".html", ".htm")):
        raise click.BadParameter(f"{output}: the report is an HTML page; name it .html", param_hint="-o")
    if len(stores) == 1:
        path = write_report(_open_run(stores[0]), output, window=window, metric=metric, threshold=threshold,
                            overwrite=overwrite)
    else:
        runs = sa.open_runs(list(stores), storage_options=_storage())
        path = write_comparison(runs, output, window=window, metric=metric, threshold=threshold,
                                overwrite=overwrite)
    click.echo(f"wrote {printable(str(path))}")


@main.command()
@click.option("-o", "--output", type=click.Path(file_okay=False), default="spectral-demo", show_default=True,
              help="A new folder for the store, the exports and the report.")
@click.option("--source", type=click.Path(file_okay=False, exists=True), default=None,
              help="Checkpoint folder [default: the shipped grokking fixture].")
@click.option("-w", "--window", type=click.IntRange(min=3), default=10, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an earlier demo's output (a folder holding only that).")
def demo(output, source, window, overwrite):
    """The whole pipeline on the shipped grokking run: ingest to report."""
    from spectral_analyzer.demo import run_demo

    paths = run_demo(output, source=source, window=window, overwrite=overwrite)
    for name, path in paths.items():
        click.echo(f"{name:<9} {printable(str(path))}")
    click.echo(f"open {printable(str(paths['report']))} in a browser")


@main.command("train-example")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--task", type=click.Choice(["modular", "dyck"]), default="modular", show_default=True)
@click.option("--operation", type=click.Choice(["add", "sub", "mul", "sq"]), default="add", show_default=True,
              help="Modular task: a+b, a-b, a*b or a^2+b^2 mod p.")
@click.option("--p", "modulus", type=click.IntRange(min=2), default=97, show_default=True)
@click.option("--weight-decay", type=float, default=1.0, show_default=True, callback=_above(0.0, or_equal=True))
@click.option("--steps", type=click.IntRange(min=1), default=None, help="[default: 6000 modular, 3000 dyck]")
@click.option("--every", type=click.IntRange(min=1), default=100, show_default=True, help="Checkpoint interval.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True, help="Transformer blocks.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads [default: 1, faster for these small models on a shared CPU].")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train_example(output, task, operation, modulus, weight_decay, steps, every, seed, layers, threads, progress):
    """Train a grokking example and save HF-Trainer-style checkpoints into OUTPUT."""
    from spectral_analyzer import examples

    if task == "modular":
        config = examples.ModularConfig(p=modulus, operation=operation, weight_decay=weight_decay,
                                        steps=steps or 6000, every=every, seed=seed, layers=layers)
        examples.train_modular(output, config, progress=progress, threads=threads)
    else:
        config = examples.DyckConfig(weight_decay=weight_decay, steps=steps or 3000, every=every, seed=seed,
                                     layers=layers)
        examples.train_dyck(output, config, progress=progress, threads=threads)
    state = sorted(Path(output).glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))[-1]
    last = json.loads((state / "trainer_state.json").read_text())["log_history"][-1]
    click.echo(f"{printable(output)}: {config.steps // every + 1} checkpoints; "
               f"final train_acc {last['train_acc']:.3f}, test_acc {last['test_acc']:.3f}")
