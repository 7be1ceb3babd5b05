"""Choosing training steps: which checkpoints to ingest, which deltas to analyse.

Pure Python, shared by ingest and the analyses (and cheap to import for the
command line). Two kinds of choice:

* :class:`StepSelection`, at ingest: ranges ``A..B[:K]`` (both ends
  included, every K-th step counted from A), single steps, and ``every=K``
  (steps that are multiples of K), so ``every=1000`` keeps Pythia's uniform
  1000-step grid (step 0 included) and drops its log-spaced early revisions.
* :func:`delta_rows`, in analysis: the deltas between the checkpoints whose
  steps lie in ``[A, B]``, a contiguous run of rows windows are formed from.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import SelectionError, StepError

__all__ = ["StepRange", "StepSelection", "delta_rows", "exact_in_float", "parse_step_range"]

_RANGE = re.compile(r"^(-?\d+)?\.\.(-?\d+)?(?::(\d+))?$")
_INT64 = range(-(2**63), 2**63)


FLOAT_EXACT = 2**53  # the largest magnitude up to which float64 holds every integer


def exact_in_float(steps: Iterable[int], origin: str, what: str) -> None:
    """Refuse steps that a float64 column (one that NaN can mark empty) would round: beyond 2**53 in magnitude.

    Raises :class:`StepError` naming *origin*, the step and *what* holds it.
    """
    top = max((abs(int(s)) for s in steps), default=0)
    if top > FLOAT_EXACT:
        raise StepError(f"{origin}: step {top} is beyond 2**53, and {what} holds steps as float64 (NaN where there "
                        "is none), which would round it")


def _int(text: str, spec: str) -> int:
    value = int(text)
    if value not in _INT64:
        raise SelectionError(f"step selection {spec!r}: {text} does not fit a 64-bit integer")
    return value


@dataclass(frozen=True)
class StepRange:
    """Steps ``start <= s <= stop`` (either end open when None), every *stride*-th counted from *start* (or 0).

    Examples
    --------
    >>> r = StepRange(1000, 5000, 1000)
    >>> [s for s in (512, 1000, 1500, 2000, 5000, 6000) if s in r]
    [1000, 2000, 5000]
    """

    start: int | None = None
    stop: int | None = None
    stride: int | None = None

    def __contains__(self, step: int) -> bool:
        if self.start is not None and step < self.start:
            return False
        if self.stop is not None and step > self.stop:
            return False
        return self.stride is None or (step - (self.start or 0)) % self.stride == 0

    def __str__(self) -> str:
        text = f"{'' if self.start is None else self.start}..{'' if self.stop is None else self.stop}"
        return text if self.stride is None else f"{text}:{self.stride}"


def _parse_item(item: str, spec: str) -> StepRange | int:
    match = _RANGE.match(item)
    if match is None:
        try:
            return _int(item, spec)
        except ValueError:
            raise SelectionError(
                f"step selection {spec!r}: {item!r} is neither a step nor a range A..B[:K]"
            ) from None
    start, stop, stride = (None if g is None else _int(g, spec) for g in match.groups())
    if stride is not None and stride < 1:
        raise SelectionError(f"step selection {spec!r}: the stride of {item!r} must be at least 1")
    if start is not None and stop is not None and stop < start:
        raise SelectionError(f"step selection {spec!r}: {item!r} ends before it starts")
    return StepRange(start, stop, stride)


def parse_step_range(spec: str | slice | Sequence[int | None] | None) -> StepRange | None:
    """A step range for the analyses: ``"A..B"``, ``slice(A, B)`` or ``(A, B)``, both ends included.

    Examples
    --------
    >>> parse_step_range("1000..")
    StepRange(start=1000, stop=None, stride=None)
    >>> parse_step_range(slice(None, 5000))
    StepRange(start=None, stop=5000, stride=None)
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        item = _parse_item(spec.strip(), spec)
        if isinstance(item, int) or item.stride is not None:
            raise SelectionError(f"step range {spec!r}: give A..B (either end may be left out), no stride")
        return item
    if isinstance(spec, slice):
        if spec.step is not None:
            raise SelectionError(f"step range {spec!r} has a stride; windows are made of consecutive deltas "
                                 "(stride= sets the distance between windows)")
        bounds = (spec.start, spec.stop)
    else:
        bounds = tuple(spec)
        if len(bounds) != 2:
            raise SelectionError(f"step range {spec!r}: give (first, last)")
    for b in bounds:
        if b is not None and (isinstance(b, bool) or int(b) != b):
            raise SelectionError(f"step range {spec!r}: {b!r} is not a step")
    start, stop = (None if b is None else int(b) for b in bounds)
    if start is not None and stop is not None and stop < start:
        raise SelectionError(f"step range {spec!r} ends before it starts")
    return StepRange(start, stop)


@dataclass(frozen=True)
class StepSelection:
    """Which checkpoints an ingest keeps, by step.

    A step is kept when it is in one of *ranges* or among *exact* (any step
    when neither is given) and, with *every*, is a multiple of it. Each of
    *exact* must be the step of a checkpoint.

    Examples
    --------
    >>> sel = StepSelection.parse("0,1000..5000:2000")
    >>> [s for s in (0, 1, 512, 1000, 2000, 3000, 5000) if sel.keeps(s)]
    [0, 1000, 3000, 5000]
    >>> sel = StepSelection.parse(None, every=1000)
    >>> [s for s in (0, 1, 512, 1000, 2000) if sel.keeps(s)]
    [0, 1000, 2000]
    """

    ranges: tuple[StepRange, ...] = ()
    exact: tuple[int, ...] = ()
    every: int | None = None

    @classmethod
    def parse(
        cls, select: str | Sequence[int] | StepSelection | None, every: int | None = None
    ) -> StepSelection | None:
        """From a spec (``"A..B[:K]"``, ``"S0,S1,..."``, items mixed), a sequence of steps, and *every*.

        ``None`` when nothing is selected (every checkpoint is kept).
        """
        if every is not None and (isinstance(every, bool) or int(every) != every or every < 1):
            raise SelectionError(f"every={every!r}: give a positive number of steps")
        if isinstance(select, StepSelection):
            return select if every is None else cls(select.ranges, select.exact, int(every))
        ranges: list[StepRange] = []
        exact: list[int] = []
        if isinstance(select, str):
            items = [s.strip() for s in select.split(",")]
            if not any(items):
                raise SelectionError(f"step selection {select!r} is empty")
            for item in items:
                if not item:
                    raise SelectionError(f"step selection {select!r} has an empty item")
                parsed = _parse_item(item, select)
                (exact.append if isinstance(parsed, int) else ranges.append)(parsed)
        elif select is not None:
            for s in select:
                if isinstance(s, bool) or int(s) != s or int(s) not in _INT64:
                    raise SelectionError(f"step selection: {s!r} is not a step")
                exact.append(int(s))
        if not ranges and not exact and every is None:
            return None
        return cls(tuple(ranges), tuple(sorted(set(exact))), None if every is None else int(every))

    def keeps(self, step: int) -> bool:
        chosen = (not self.ranges and not self.exact) or step in self.exact or any(step in r for r in self.ranges)
        return chosen and (self.every is None or step % self.every == 0)

    def check_exact(self, steps: Iterable[int], where: str) -> None:
        """Refuse steps named one by one that no checkpoint has."""
        have = set(steps)
        missing = [s for s in self.exact if s not in have]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise SelectionError(f"{where}: no checkpoint at step {shown} (selected by name)")

    def __str__(self) -> str:
        items = ",".join([str(r) for r in self.ranges] + [str(s) for s in self.exact])
        every = f"every {self.every}" if self.every is not None else ""
        return " ".join(part for part in (items, every) if part)


def delta_rows(checkpoint_steps: Sequence[int], steps: StepRange | None) -> slice:
    """The deltas between checkpoints with steps in *steps*: rows i with s_i >= A (its start) and s_{i+1} <= B.

    *checkpoint_steps* are s_0 < ... < s_N; delta row i runs from s_i to
    s_{i+1}. The rows are contiguous (steps increase).

    Examples
    --------
    >>> delta_rows([0, 1, 2, 4, 1000, 2000, 3000], StepRange(1000, None))
    slice(4, 6, None)
    """
    n = len(checkpoint_steps) - 1
    if steps is None:
        return slice(0, n)
    first = next((i for i in range(n) if steps.start is None or checkpoint_steps[i] >= steps.start), n)
    last = next((i for i in range(n, 0, -1) if steps.stop is None or checkpoint_steps[i] <= steps.stop), 0)
    return slice(first, max(first, last))
