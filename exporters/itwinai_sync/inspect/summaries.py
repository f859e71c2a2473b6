"""What `show` prints per metric: last value and step, min, max, point count, a sparkline."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from .series import series_of

SPARK_CHARS = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_.-:=+*#"


@dataclass
class Summary:
    count: int
    last: float
    last_step: int | None
    min: float
    max: float


def summarize(values: Sequence[float], steps: Sequence[int | None]) -> Summary:
    """Last value (and its step), min and max. NaN is left out of min/max (nan when every
    value is NaN); +-inf counts, it is what was logged."""
    real = [v for v in values if not math.isnan(v)]
    return Summary(len(values), values[-1], steps[-1],
                   min(real) if real else math.nan, max(real) if real else math.nan)


def _spark_charset() -> str:
    """Block characters when stdout can print them, else ASCII ones."""
    enc = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        SPARK_CHARS.encode(enc)
        return SPARK_CHARS
    except (UnicodeEncodeError, LookupError):
        return SPARK_ASCII


def sparkline(values: Sequence[float], width: int = 24, chars: str | None = None) -> str:
    """The series in `width` characters: the mean of each of `width` equal slices of the
    points (every point when there are fewer), scaled from the finite min to max. A slice
    with no finite value is a space."""
    chars = chars or SPARK_CHARS
    n = len(values)
    if n == 0:
        return ""
    width = min(width, n)
    cells: list[float | None] = []
    for i in range(width):
        lo, hi = i * n // width, (i + 1) * n // width
        finite = [v for v in values[lo:hi] if math.isfinite(v)]
        cells.append(sum(finite) / len(finite) if finite else None)
    real = [c for c in cells if c is not None]
    if not real:
        return " " * width
    lo_v, hi_v = min(real), max(real)
    span = hi_v - lo_v
    top = len(chars) - 1
    out = []
    for c in cells:
        if c is None:
            out.append(" ")
        elif span <= 0 or not math.isfinite(span):
            out.append(chars[top // 2])
        else:
            out.append(chars[min(top, int((c - lo_v) / span * top + 0.5))])
    return "".join(out)


def metric_summary_lines(t: pa.Table, indent: str = "    ", width: int = 24) -> list[str]:
    """One line per metric of a (one-rank) metrics table: last value and step, min, max, point
    count and a sparkline."""
    chars = _spark_charset()
    rows = []
    for s in series_of(t):
        sm = summarize(s.value, s.step)
        head = f"{s.name} = {sm.last:.6g}" + ("" if sm.last_step is None
                                              else f"  (step {sm.last_step})")
        rows.append((head, f"min {sm.min:.6g}  max {sm.max:.6g}  {sm.count} pts",
                     sparkline(s.value, width, chars)))
    rows.sort()
    w1 = max((len(r[0]) for r in rows), default=0)
    w2 = max((len(r[1]) for r in rows), default=0)
    return [f"{indent}{a:<{w1}}  {b:<{w2}}  {c}".rstrip() for a, b, c in rows]
