"""Training logs: HF ``trainer_state.json`` log history, CSV and JSON-lines files.

Each becomes a step-indexed table of numeric series: the union of logged steps
and NaN where a series was not logged at a step.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import SpectralAnalyzerError

__all__ = ["MetricsError", "find_trainer_state", "read_metrics"]


class MetricsError(SpectralAnalyzerError):
    """A metrics file is unreadable or has no usable ``step`` column."""


def _number(value) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _table(records: Iterable[Mapping], origin: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rows: dict[int, dict[str, float]] = {}
    names: list[str] = []
    for i, record in enumerate(records):
        step = _number(record.get("step"))
        if step is None or not math.isfinite(step) or step != int(step):
            raise MetricsError(f"{origin}: record {i + 1} has no integer 'step'")
        row = rows.setdefault(int(step), {})
        for key, value in record.items():
            x = _number(value)
            if key == "step" or x is None:
                continue
            if key not in names:
                names.append(key)
            row[key] = x  # a later record at the same step wins
    steps = np.array(sorted(rows), dtype=np.int64)
    series = {name: np.array([rows[s].get(name, np.nan) for s in steps], dtype=np.float64) for name in names}
    return steps, series


def read_metrics(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read a metrics file into ``(steps, {name: values})``.

    Accepts ``trainer_state.json`` (its ``log_history``), ``*.csv`` with a
    header holding ``step``, and ``*.jsonl`` with one object per line.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise MetricsError(f"{path}: cannot read metrics ({exc.strerror})") from None
    try:
        if path.suffix == ".csv":
            records = list(csv.DictReader(text.splitlines()))
            if records and "step" not in records[0]:
                raise MetricsError(f"{path}: no 'step' column (columns: {', '.join(records[0])})")
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            records = data.get("log_history", []) if isinstance(data, dict) else data
    except ValueError as exc:
        raise MetricsError(f"{path}: not valid {path.suffix.lstrip('.') or 'json'} ({exc})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise MetricsError(f"{path}: expected a list of records with a 'step' field")
    return _table(records, path)


def find_trainer_state(src: Path, checkpoint_labels: Iterable[str]) -> Path | None:
    """The metrics log of a checkpoint folder, if it has one.

    The newest ``trainer_state.json`` (labels in step order; its log history is
    cumulative, so it covers the whole run), else ``trainer_state.json``,
    ``metrics.csv`` or ``metrics.jsonl`` at the top of *src*.
    """
    candidates = [Path(label) / "trainer_state.json" for label in checkpoint_labels]
    candidates = [c for c in candidates if c.is_file()]
    if candidates:
        return candidates[-1]
    for name in ("trainer_state.json", "metrics.csv", "metrics.jsonl"):
        if (src / name).is_file():
            return src / name
    return None
