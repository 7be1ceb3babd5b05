"""Checkpoints that are not what their step says: identical files, and deltas far larger than their neighbours.

Public suites have served byte-identical weights under different step names
and replaced checkpoints; both leave a trace the ingest can see cheaply.

* Identical checkpoints: two checkpoints whose files have the same sha256,
  told before a tensor of the second is read (the hub cache names its blobs
  by their sha256, so there nothing is read at all). Any two checkpoints of
  one ingest are compared, and the first new one with the store's last.
* Outlying deltas: ``||d_i|| / (s_i - s_{i-1})``, the norm of a delta per
  step of its interval, above :data:`OUTLIER_FACTOR` times the median of the
  same rate over the :data:`OUTLIER_HISTORY` deltas before it (at least
  :data:`OUTLIER_MIN_HISTORY` of them). The rate rather than the norm, so
  that a suite whose intervals grow (Pythia's 1, 2, 4, ... 512, 1000) is not
  flagged for its longer intervals alone; with equal intervals it is the
  norm. A replaced checkpoint flags the delta into it and usually the one
  out of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["OUTLIER_FACTOR", "DeltaNorms", "identical_message", "squared_norm"]

OUTLIER_FACTOR = 20.0
OUTLIER_HISTORY = 5
OUTLIER_MIN_HISTORY = 3
_BLOCK = 1 << 20


def squared_norm(d: np.ndarray) -> float:
    """sum(d^2) of a float32 vector, accumulated in float64 a block at a time (no float64 copy of *d*)."""
    total = 0.0
    for k in range(0, d.size, _BLOCK):
        block = d[k : k + _BLOCK].astype(np.float64)
        total += float(block @ block)
    return total


def identical_message(first: tuple[int, str], second: tuple[int, str], digest: str) -> str:
    """*digest*: a file's sha256, or the name its source gives its bytes (``size:etag:value``, see
    :meth:`~.sources.RemoteFile.content_id`)."""
    if digest.count(":") >= 2:
        size, kind, value = digest.split(":", 2)
        what = f"the same {'git blob id' if kind == 'blob' else kind} {value.strip(chr(34))[:16]}... and size"
    else:
        what = f"sha256 {digest[:16]}..."
    return (
        f"checkpoints at steps {first[0]} ({first[1]}) and {second[0]} ({second[1]}) have identical contents: "
        f"byte-identical files ({what}), one of them stored under the wrong step?"
    )


class DeltaNorms:
    """The norm-per-step rates of the latest deltas, and the test of a new one against their median."""

    def __init__(self, history: Sequence[tuple[int, int, float]] = ()):
        # (start step, end step, norm) of earlier deltas, oldest first
        self.rates = [norm / (b - a) for a, b, norm in history if b > a][-OUTLIER_HISTORY:]

    def check(self, start: int, end: int, norm: float, label: str) -> str | None:
        """A message if the delta from *start* to *end* outlies the ones before it; then it joins them."""
        rate = norm / (end - start)
        message = None
        if len(self.rates) >= OUTLIER_MIN_HISTORY:
            median = float(np.median(self.rates))
            if median > 0 and math.isfinite(rate) and rate > OUTLIER_FACTOR * median:
                message = (
                    f"the delta at step {end} ({label}) has norm {norm:.3g} over {end - start} steps, "
                    f"{rate / median:.0f}x the median norm per step of the {len(self.rates)} deltas before it: "
                    f"is the checkpoint at step {end} (or {start}) replaced or mislabelled?"
                )
        self.rates = [*self.rates, rate][-OUTLIER_HISTORY:]
        return message
