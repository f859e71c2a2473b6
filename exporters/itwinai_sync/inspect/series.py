"""Metric points as series (one metric of one rank of one run), and the numbers drawn from
them: x values (step, wall time, time since the run started) and smoothing."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

X_MODES = ("step", "time", "relative")
X_TITLES = {"step": "step", "time": "wall time", "relative": "seconds since the run started"}


@dataclass
class Series:
    """The points of one metric of one rank of one run, in seq order."""

    experiment: str
    run_id: str
    rank: int
    name: str
    time: list[float] = field(default_factory=list)
    step: list[int | None] = field(default_factory=list)
    value: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.run_id} rank {self.rank}"

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.run_id}/{self.rank}/{self.name}"

    def __len__(self) -> int:
        return len(self.value)


def series_of(t: pa.Table) -> list[Series]:
    """Group a sorted metrics table into series: by (experiment, run, rank, name)."""
    out: dict[tuple, Series] = {}
    cols = [t[c].to_pylist() for c in ("experiment", "run_id", "rank", "name", "time", "step",
                                       "value")]
    for exp, run, rank, name, tm, step, value in zip(*cols):
        key = (exp, run, rank, name)
        s = out.get(key)
        if s is None:
            s = out[key] = Series(exp, run, rank, name)
        s.time.append(tm)
        s.step.append(step)
        s.value.append(float("nan") if value is None else value)
    return list(out.values())


def by_metric(series: Iterable[Series]) -> dict[str, list[Series]]:
    grouped: dict[str, list[Series]] = {}
    for s in series:
        grouped.setdefault(s.name, []).append(s)
    return dict(sorted(grouped.items()))


def ema(values: Sequence[float], alpha: float) -> list[float]:
    """Exponential moving average with weight `alpha` on the past (TensorBoard's smoothing
    slider: 0 = raw, 0.99 = heavy), debiased so that the first points are not pulled towards
    zero. Non-finite values do not enter the average; their points stay as they are."""
    if not alpha:
        return list(values)
    out = []
    acc = 0.0
    n = 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        acc = acc * alpha + (1 - alpha) * v
        n += 1
        out.append(acc / (1 - alpha ** n))
    return out


def x_values(s: Series, mode: str, t0: float | None = None) -> list[float]:
    """x of each point: its step (its position in the series when it has none), its wall time
    (Unix seconds), or seconds since `t0` (the run's first record)."""
    if mode == "step":
        return [float(i if st is None else st) for i, st in enumerate(s.step)]
    if mode == "time":
        return list(s.time)
    base = t0 if t0 is not None else (s.time[0] if s.time else 0.0)
    return [tm - base for tm in s.time]


def run_starts(series: Iterable[Series]) -> dict[tuple[str, str], float]:
    """The time of each run's first point, (experiment, run_id) -> Unix seconds."""
    starts: dict[tuple[str, str], float] = {}
    for s in series:
        if s.time:
            k = (s.experiment, s.run_id)
            starts[k] = min(starts.get(k, math.inf), s.time[0])
    return starts
