"""Numbers as tables show them: the command line's and the report's, one convention.

A value that is not defined (NaN) shows as ``-``. Ratios near 1 keep the
digits that tell them from 1: the noise floor of R for p = 1e8 parameters is
1.00017, which four significant digits show as ``1``; R = 1.19996 falling
through tau = 1.2 must not read ``1.2``, nor R = 1.199996.

>>> number(0.123456), number(float("nan")), ratio(1.000169), ratio(1.199996), ratio(3.0), mode(0)
('0.1235', '-', '1.000169', '1.199996', '3', '-')
"""

from __future__ import annotations

import math

__all__ = ["MISSING", "mode", "number", "ratio"]

MISSING = "-"  # a value that is not defined (NaN) or not known, in every table


def _special(x: float) -> str | None:
    if math.isnan(x):
        return MISSING
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return None


def number(x: float) -> str:
    """Four significant digits."""
    x = float(x)
    return _special(x) or f"{x:.4g}"


def ratio(x: float) -> str:
    """A ratio (R, its noise floor, sigma_1 / sigma_2): six significant digits (more where six round to a
    shorter number: 1.199996 is not 1.2), and within 1e-3 of 1, as many decimals as show the distance from 1
    to three digits."""
    x = float(x)
    if (special := _special(x)) is not None:
        return special
    if x != 1 and abs(x - 1) < 1e-3:
        decimals = 2 - math.floor(math.log10(abs(x - 1)))
        text = f"{x:.{decimals}f}"
        while float(text) != x and len(text.rstrip("0").split(".")[1]) < decimals:
            decimals += 1  # the distance rounded to fewer digits (1.00019996 to 1.0002): more, as above
            text = f"{x:.{decimals}f}"
        return text
    digits = 6
    text = f"{x:.6g}"
    while float(text) != x and len(text.split("e")[0].replace("-", "").replace(".", "").strip("0")) < digits:
        digits += 1  # rounding to fewer digits than asked (1.199996 to 1.2): as many as tell it from that value
        text = f"{x:.{digits}g}"
    return text


def mode(k) -> str:
    """k* (1-based); 0, where no gap ratio is defined, shows as not defined."""
    k = int(k)
    return MISSING if k == 0 else str(k)
