"""One self-contained HTML page: every plot embedded, with the summary tables."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np

from . import plot
from ._version import __version__
from .errors import ExportError, MetricError
from .exporting import check_output, events_table, replacing
from .formatting import mode, number, ratio
from .weights import find_wq

__all__ = ["ACCURACY_METRICS", "write_comparison", "write_report"]

ACCURACY_METRICS = ("test_acc", "eval_accuracy", "eval_acc", "val_acc", "test_accuracy", "accuracy")
LOSS_METRICS = ("test_loss", "eval_loss", "val_loss", "loss", "train_loss")


def _png(output: Path, title: str, draw, width: float = 9.0, height: float = 3.6) -> str:
    """The figure *draw* makes, as base64 PNG; one that matplotlib cannot render is an :class:`ExportError`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    draw(fig.subplots())
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png")
    except (ValueError, RuntimeError) as exc:  # text matplotlib cannot lay out (mathtext, a missing TeX)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ExportError(f"{output}: cannot draw the figure {title!r} ({reason})") from None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, (float, np.floating)):
            x = float(x)
            return number(x)  # one convention, as on the command line
        return html.escape(str(x))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _first(names, candidates):
    return next((c for c in candidates if c in names), None)


def _threshold(metrics_of, accuracy: str, threshold: float | None) -> float:
    """*threshold*, or by default 0.95 of an accuracy logged as a fraction, 95 of one logged in percent (a value
    above 1 in any of the runs' *metrics_of*)."""
    if threshold is not None:
        return threshold
    top = max((float(np.nanmax(m[accuracy].values)) for m in metrics_of if np.isfinite(m[accuracy].values).any()),
              default=0.0)
    return 95.0 if top > 1 else 0.95


def write_report(run, output: str | os.PathLike, *, window: int = 10, metric: str | None = None,
                 threshold: float | None = None, overwrite: bool = False) -> Path:
    """Write ``output`` (HTML) with the spectra, dynamics, weight spectra and summaries of *run*.

    Figures: sigma_j(t) (log), ratios with k* and events, the gap ratio with a
    metric on a second axis, alpha per mode, the mode-1 energy by module, and
    W_Q's sigma1/sigma2 when the model has a query projection. Tables: the
    run, the events, the grokking summary (when an accuracy metric is
    logged) and the spectra every few windows.
    """
    output = Path(output)
    check_output(output, overwrite=overwrite, formats=None)
    metrics = run.metrics
    names = list(metrics.data_vars)
    if metric is not None and metric not in metrics.data_vars:
        raise MetricError(f"{run.path}: metric {metric!r} is not logged (metrics: {', '.join(names) or 'none'})")
    spectra = run.spectra(window=window)
    dyn = run.dynamics(window=window) if run.n_deltas > window else None
    accuracy = _first(names, ACCURACY_METRICS)
    shown = metric or accuracy or _first(names, LOSS_METRICS)
    wq = find_wq(run.store, None)
    grok = None if accuracy is None else run.grokking(
        metric=accuracy, window=window, threshold=_threshold([metrics], accuracy, threshold))
    drawn = [
        ("Singular values of the window", lambda ax: plot.plot_sigma(spectra, ax=ax)),
        ("Ratios, k* and events", lambda ax: plot.plot_ratios(spectra, events=dyn, ax=ax)),
        ("Gap ratio" + (f" and {shown}" if shown else ""),
         lambda ax: plot.plot_gap_ratio(spectra, metrics=metrics if shown else None, metric=shown, events=dyn,
                                        grok=grok, ax=ax)),
    ]
    if dyn is not None:
        drawn.append(("Stability per mode", lambda ax: plot.plot_alpha(dyn, ax=ax)))
        drawn.append(("Mode 1 energy by module", lambda ax: plot.plot_energy(dyn, mode=1, ax=ax)))
    if wq is not None:
        ws = run.weight_spectra(wq)
        drawn.append((f"{wq}: sigma1 / sigma2", lambda ax: plot.plot_weight_ratio(ws, grok=grok, ax=ax)))
    figures = [(title, _png(output, title, draw)) for title, draw in drawn]
    steps = run.checkpoint_steps
    parts = [
        f"<h1>spectral-analyzer report</h1><p>{html.escape(run.path)} &middot; version {__version__}</p>",
        "<h2>Run</h2>",
        _table(["checkpoints", "steps", "deltas", "parameters", "tensors", "window", "metrics"],
               [[steps.size, f"{steps[0]}..{steps[-1]}", run.n_deltas, f"{run.n_params:,}",
                 run.tensors.sizes["tensor"], window, ", ".join(names) or "none"]]),
    ]
    told = list(dict.fromkeys([*run.warnings, *(ds.attrs["warnings"] for ds in (spectra, dyn)
                                                  if ds is not None and ds.attrs.get("warnings"))]))
    if told:  # what ingest and the analyses warned of: duplicate checkpoints, mixed step intervals, ...
        parts += ["<h2>Warnings</h2>", "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in told) + "</ul>"]
    if grok is not None:
        g = grok
        parts += ["<h2>Grokking</h2>", _table(
            ["metric", "grokked", "grok step", "g23 decline", "R_early", "R_grok", "modal k*", "W_Q s1/s2 at grok",
             "W_Q s1/s2 at end"],
            [[accuracy, "yes" if bool(g["grokked"]) else "no", int(g["grok_step"]) if bool(g["grokked"]) else "-",
              float(g["g23_decline"]), ratio(g["R_early"]), ratio(g["R_grok"]), float(g["k_star_mode"]),
              ratio(g["wq_sigma_ratio_grok"]), ratio(g["wq_sigma_ratio_end"])]])]
    if dyn is not None:
        events = events_table(dyn)
        parts += ["<h2>Events</h2>", _table(["step", "kind", "k*", "R"],
                                            [[e["step"], e["kind"], mode(e["mode"]), ratio(e["value"])]
                                             for e in events])
                  if events else "<p>none</p>"]
    parts += [_figure(title, data) for title, data in figures]
    every = max(1, spectra.sizes["step"] // 20)
    rows = [[int(s), mode(k), ratio(r), float(gp), float(s1)] for s, k, r, gp, s1 in zip(
        spectra["step"].values, spectra["k_star"].values, spectra["gap_ratio"].values, spectra["gap"].values,
        spectra["sigma"].values[:, 0])]
    shown_rows = rows[::every] + (rows[-1:] if (len(rows) - 1) % every else [])  # the last window always
    parts += [f"<h2>Spectra (every {every} window{'s' if every > 1 else ''}"
              f"{', and the last' if len(shown_rows) > len(rows[::every]) else ''})</h2>",
              _table(["step", "k*", "R", "gap", "sigma_1"], shown_rows)]
    return _write_page(output, parts)


def _figure(title: str, data: str) -> str:
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _write_page(output: Path, parts: list[str]) -> Path:
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>spectral-analyzer report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    try:
        with replacing(output) as tmp:  # complete or not at all: a full disk leaves the earlier page
            tmp.write_text(page, encoding="utf-8")  # the charset the page declares, whatever the locale
    except OSError as exc:
        raise ExportError(f"{output}: cannot write the report ({exc.strerror or exc})") from None
    return output


def write_comparison(runs, output: str | os.PathLike, *, window: int = 10, metric: str | None = None,
                     threshold: float | None = None, overwrite: bool = False) -> Path:
    """Write ``output`` (HTML) comparing several runs (:class:`~spectral_analyzer.runs.Runs`) side by side.

    Figures: the gap ratio of every run (with *metric*, or the first accuracy
    or loss series all runs log, on a second axis, and each run's grok step),
    and W_Q's sigma1/sigma2 of every run when they all have the same query
    projection. Tables: the runs, and the grokking summary of each.
    """
    output = Path(output)
    check_output(output, overwrite=overwrite, formats=None)
    common = set.intersection(*(set(run.metrics.data_vars) for run in runs))
    if metric is not None and metric not in common:
        missing = [label for label, run in runs.runs.items() if metric not in run.metrics]
        raise MetricError(f"metric {metric!r} is not logged by {', '.join(missing)}")
    accuracy = _first(common, ACCURACY_METRICS)
    shown = metric or accuracy or _first(common, LOSS_METRICS)
    spectra = runs.spectra(window=window)
    grok = None if accuracy is None else runs.grokking(
        metric=accuracy, window=window, threshold=_threshold([run.metrics for run in runs], accuracy, threshold))
    metrics = runs.metrics if shown else None
    title = "Gap ratio of each run" + (f", with {shown}" if shown else "")
    figures = [(title, _png(output, title, lambda ax: plot.plot_gap_ratio(spectra, metrics=metrics, metric=shown,
                                                                          grok=grok, ax=ax), height=4.2))]
    wqs = {find_wq(run.store, None) for run in runs}
    if len(wqs) == 1 and None not in wqs:
        (wq,) = wqs
        ws = runs.weight_spectra(wq)
        title = f"{wq}: sigma1 / sigma2 of each run"
        figures.append((title, _png(output, title, lambda ax: plot.plot_weight_ratio(ws, grok=grok, ax=ax))))
    rows = []
    for label, run in runs.runs.items():
        steps = run.checkpoint_steps
        rows.append([label, run.path, steps.size, f"{steps[0]}..{steps[-1]}", f"{run.n_params:,}"])
    parts = [f"<h1>spectral-analyzer: {len(runs)} runs compared</h1><p>window {window} &middot; version "
             f"{__version__}</p>", "<h2>Runs</h2>", _table(["run", "store", "checkpoints", "steps", "parameters"], rows)]
    if grok is None and any(_first(run.metrics.data_vars, ACCURACY_METRICS) for run in runs):
        parts += ["<h2>Grokking</h2>", "<p>none: no accuracy series is logged under one name by every run "
                  f"({', '.join(ACCURACY_METRICS)}); compare the runs that share one</p>"]
    if grok is not None:
        parts += [f"<h2>Grokking ({html.escape(accuracy)})</h2>", _table(
            ["run", "grokked", "grok step", "g23 decline", "R_early", "R_grok", "modal k*", "W_Q s1/s2 at grok",
             "W_Q s1/s2 at end"],
            [[label, "yes" if bool(g["grokked"]) else "no", int(g["grok_step"]) if bool(g["grokked"]) else "-",
              float(g["g23_decline"]), ratio(g["R_early"]), ratio(g["R_grok"]), float(g["k_star_mode"]),
              ratio(g["wq_sigma_ratio_grok"]), ratio(g["wq_sigma_ratio_end"])]
             for label, g in ((str(r), grok.sel(run=r)) for r in grok["run"].values)])]
    parts += [_figure(title, data) for title, data in figures]
    return _write_page(output, parts)
