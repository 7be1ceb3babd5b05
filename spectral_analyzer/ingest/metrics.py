"""Training logs: HF ``trainer_state.json`` log history, CSV, JSON-lines and TensorBoard event files.

Each becomes a step-indexed table of numeric series: the union of logged steps
and NaN where a series was not logged at a step.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import MetricsError, printable
from ..tensorboard import is_event_file, read_scalars
from .readers import require_regular_file

__all__ = ["MetricsError", "find_trainer_state", "read_metrics"]


def _number(value) -> float | None:
    if isinstance(value, (bool, int, float)):
        try:
            return float(value)
        except OverflowError:  # an int beyond float64, as a float64 can hold it
            return math.inf if value > 0 else -math.inf
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# numbers written with thousands separators, a decimal comma or a percent sign: "1,000", "0,97", "97%"
_NUMBER_FORMS = (re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?"), re.compile(r"[+-]?\d+,\d+"),
                 re.compile(r"[+-]?\d+(\.\d+)?\s?%"))


def _step(value) -> int | None:
    """A record's step as an exact int: an int, an integral float, or a string of either. A float from 2**53 on
    raises OverflowError: it may be a rounded step (9007199254740993.0 is read as ...992)."""
    if isinstance(value, str):
        try:
            return int(value)  # exact, where float() would round a large step
        except ValueError:
            value = _number(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        if 2**53 <= abs(value) < 2**63:  # 2**53 itself is also what 2**53 + 1 rounds to (beyond int64: refused)
            raise OverflowError(value)
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_names(names: Iterable[str], origin: Path) -> None:
    """Refuse empty names and names that are no Unicode text (a lone surrogate, which JSON's ``\\ud800`` escape
    makes); any other text is kept as it is: the store names its arrays safely."""
    for name in names:
        if not name:
            raise MetricsError(f"{origin}: a series has an empty name; name every column")
        try:
            name.encode()
        except UnicodeEncodeError:
            raise MetricsError(f"{origin}: series {name!r} has a name that is not Unicode text (a lone surrogate); "
                               "rename it") from None
        if "\x00" in name:  # numpy's strings drop it at the end: two series would be one label
            raise MetricsError(f"{origin}: series {name!r} has a NUL character in its name; rename it")


def _table(records: Iterable[Mapping], origin: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The records as a table, each value preempting its series' steps >= its own (see :func:`read_metrics`)."""
    rows: dict[int, dict[str, float]] = {}
    names: list[str] = []
    logged: dict[str, list[int]] = {}  # each series' steps, increasing
    text: dict[str, tuple[int, object]] = {}  # each key's first value that is no number: (record, value)
    words: dict[str, list] = {}  # each key's values that are no number
    firsts: dict[str, int] = {}  # each series' first step
    for i, record in enumerate(records):
        try:
            step = _step(record.get("step"))
        except OverflowError:
            raise MetricsError(f"{origin}: record {i + 1} has step {record.get('step')!r}, a floating-point number "
                               "of 2**53 or more, which may have been rounded from another step; write steps as "
                               "integers") from None
        if step is None:
            raise MetricsError(f"{origin}: record {i + 1} has no integer 'step'")
        if not -(2**63) <= step < 2**63:
            shown = str(step) if len(str(step)) <= 30 else f"of {len(str(step))} digits"
            raise MetricsError(f"{origin}: record {i + 1} has step {shown}, which does not fit a 64-bit integer")
        row = rows.setdefault(step, {})
        for key, value in record.items():
            x = _number(value)
            if key == "step":
                continue
            if x is None:
                if value is not None and value != "":  # null and an empty cell: not logged at this step
                    text.setdefault(key, (i, value))
                    words.setdefault(key, []).append(value)
                continue
            if key not in names:
                names.append(key)
            kept = logged.setdefault(key, [])
            first = firsts.setdefault(key, step)
            if kept and kept[-1] > step and step <= first:  # no resumption: it would drop the whole series
                raise MetricsError(printable(
                    f"{origin}: record {i + 1} logs {key} at step {step} after step {kept[-1]}, back at or before "
                    f"its first step {first}: rows out of step order, or a second run from its start (sort the "
                    "rows by step; give one run's log)"))
            while kept and kept[-1] >= step:  # a restart: the abandoned training's later steps go
                later = kept.pop()
                if later > step:
                    del rows[later][key]
                    if not rows[later]:
                        del rows[later]
            kept.append(step)
            row[key] = x
    _check_names(names, origin)
    for key, (i, value) in text.items():  # a series of numbers with a value that is none: refused, not dropped
        if key not in names and any(all(isinstance(w, str) and form.fullmatch(w.strip()) for w in words[key])
                                    for form in _NUMBER_FORMS):  # every value one such number
            raise MetricsError(printable(
                f"{origin}: record {i + 1} has {key} = {value[:40]!r}, a number in a form that is not read (a "
                "thousands separator, a decimal comma, a percent sign): the column would be left out as text; "
                "write plain numbers (1000, 0.97)"))
        if key in names:
            raise MetricsError(printable(f"{origin}: record {i + 1} has {key} = {str(value)[:40]!r}, which is not "
                                         f"a number, where its other records hold numbers; write it as a number "
                                         "(or leave it empty: not logged)"))
    steps = np.array(sorted(rows), dtype=np.int64)
    series = {name: np.array([rows[s].get(name, np.nan) for s in steps], dtype=np.float64) for name in names}
    return steps, series


def read_metrics(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read a metrics file, or a TensorBoard log folder, into ``(steps, {name: values})``.

    Accepts ``trainer_state.json`` (its ``log_history``), ``*.csv`` with a
    header holding ``step``, ``*.jsonl`` with one object per line, and
    TensorBoard event files (``events.out.tfevents.*``): one, or a folder
    holding them in it or under it, read by
    :func:`spectral_analyzer.tensorboard.read_scalars` (tags become names).
    Steps must be integers that fit int64; names are returned as they are,
    but an empty name is refused. A JSON object without ``log_history`` is
    no training log and is refused.

    Records are read in order, and records at one step merge, a value
    written later replacing an earlier one of the same series. A training
    resumed from a checkpoint logs the steps since that checkpoint again: as
    TensorBoard has it, a value at step s of a series drops that series'
    values at later steps read before it, which belong to the abandoned
    training (other series keep theirs). A series that goes back to or
    before its first step is refused: rows newest first, or a second run
    from its start, would leave one value of it.

    In a CSV file, a first column with no name beside a ``step`` column is
    the index that pandas' ``df.to_csv()`` writes, and is ignored. Without a
    ``step`` column it is refused rather than taken for the step: a pandas
    index counts rows, not training steps.
    """
    path = Path(path)
    if path.is_dir() or is_event_file(path):
        steps, series = read_scalars(path)
        _check_names(series, path)  # TensorBoard tags: the same rules as a table's columns
        return steps, series
    require_regular_file(path, MetricsError)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's CSV) is no part of a name
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8
        raise MetricsError(f"{path}: cannot read metrics ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        if path.suffix == ".csv":
            records = _csv_records(text, path)
        elif path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            if isinstance(data, dict) and "log_history" not in data:
                raise MetricsError(f"{path}: a JSON object without 'log_history' is not a trainer_state.json; "
                                   "give a training log (trainer_state.json, CSV, JSON-lines or event files)")
            records = data["log_history"] if isinstance(data, dict) else data
    except (ValueError, csv.Error, RecursionError) as exc:  # RecursionError: JSON nested too deep
        what = " ".join(str(exc).split())
        raise MetricsError(f"{path}: not valid {path.suffix.lstrip('.') or 'json'} ({what})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise MetricsError(f"{path}: expected a list of records with a 'step' field")
    return _table(records, path)


def _csv_records(text: str, path: Path) -> list[dict]:
    """The rows of a CSV file as records, its columns checked (see :func:`read_metrics`)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # names as written between the commas, less the spaces around them ("step, lr": the series lr)
    columns = reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
    records = list(reader)
    if columns and "step" not in columns:
        hint = (
            "; its first column has no name: if it is a pandas index, write the file with "
            "df.to_csv(index=False), or name the step column 'step'"
            if columns[0] == "" else ""
        )
        raise MetricsError(f"{path}: no 'step' column (columns: {', '.join(map(repr, columns))}){hint}")
    pandas_index = bool(columns) and columns[0] == ""
    for j, name in enumerate(columns):
        if name == "" and not (j == 0 and pandas_index):
            raise MetricsError(f"{path}: column {j + 1} has no name; name it in the header")
        if columns.index(name) != j:
            raise MetricsError(f"{path}: column {name!r} appears twice in the header")
    for i, record in enumerate(records):  # a row cut short (a file still being written) or with cells to spare
        if None in record or None in record.values():
            n = len(columns) + len(record.get(None, ())) - sum(v is None for v in record.values())
            raise MetricsError(f"{path}: row {i + 2} has {n} cells where the header has {len(columns)}; every row "
                               "needs one cell per column (empty where nothing was logged)")
    if pandas_index:
        for record in records:
            del record[""]
    return records


def find_trainer_state(src: Path, checkpoint_labels: Iterable[str]) -> Path | None:
    """The metrics log of a checkpoint folder, if it has one.

    The newest ``trainer_state.json`` (labels in step order; its log history is
    cumulative, so it covers the whole run), else ``trainer_state.json``,
    ``metrics.csv`` or ``metrics.jsonl`` at the top of *src*. A
    ``trainer_state.json`` at the top whose log history extends the newest
    checkpoint's (``save_state()`` after the last checkpoint, an
    ``evaluate()`` after ``train()``) is taken instead: it holds more.
    """
    candidates = [Path(label) / "trainer_state.json" for label in checkpoint_labels]
    candidates = [c for c in candidates if c.exists()]  # a FIFO or folder is refused when read, not skipped
    if candidates:
        top = src / "trainer_state.json"
        return top if top.is_file() and _extends(top, candidates[-1]) else candidates[-1]
    for name in ("trainer_state.json", "metrics.csv", "metrics.jsonl"):
        if (src / name).exists():
            return src / name
    return None


def _extends(longer: Path, shorter: Path) -> bool:
    """Whether the log history of the trainer state *longer* is that of *shorter* with more records after it."""
    try:
        a, b = (json.loads(p.read_text(encoding="utf-8-sig"))["log_history"] for p in (longer, shorter))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False  # refused, if it is the one taken, when it is read
    return isinstance(a, list) and isinstance(b, list) and len(a) > len(b) and a[: len(b)] == b
