"""`itwinai-sync tail`: metric records as they arrive, one line (or JSON object) each, each
record once. Following the journal is `itwinai_journal.read.follow`'s; this module chooses the
metric records and prints them."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from itwinai_journal.read.follow import Follower
from itwinai_journal.read.journal import RunInfo

from . import ViewError
from .selection import wanted


@dataclass
class Point:
    """One metric record as `tail` prints it."""

    time: float
    experiment: str
    run_id: str
    rank: int
    seq: int
    name: str
    step: int | None
    batch_idx: int | None
    value: float

    def line(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        stamp += f".{int((self.time % 1) * 1000):03d}"
        where = f"{self.experiment}/{self.run_id} rank {self.rank}"
        step = "" if self.step is None else f"  step {self.step}"
        batch = "" if self.batch_idx is None else f"  batch {self.batch_idx}"
        return f"{stamp}  {where}  #{self.seq}{step}{batch}  {self.name} = {self.value:.6g}"

    def json(self) -> str:
        d = {k: getattr(self, k) for k in ("experiment", "run_id", "rank", "seq", "time",
                                             "name", "step", "batch_idx", "value")}
        return json.dumps(d)


_COLUMNS = ["seq", "time", "name", "step", "batch_idx", "value"]


class Tail:
    """New metric records of the runs under a savedir (or of one run), whose names match
    `patterns` (all when none), each (run, rank, seq) once, also while segments are sealed."""

    def __init__(self, savedir: Path, run_id: str | None = None,
                 patterns: Sequence[str] | None = None):
        self.patterns = list(patterns or [])
        self._follower = Follower(savedir, run_id, select=self._metrics)

    def _metrics(self, t: pa.Table) -> pa.Table:
        t = t.filter(pc.equal(t["kind"], "metric"))
        if self.patterns and t.num_rows:
            names = [n for n in t["name"].unique().to_pylist() if wanted(n, self.patterns)]
            t = t.filter(pc.is_in(t["name"], pa.array(names, pa.string())))
        return t.select(_COLUMNS)

    def runs(self) -> list[RunInfo]:
        try:
            return self._follower.runs()
        except KeyError as e:
            raise ViewError(str(e.args[0])) from None

    def poll(self, last: int | None = None) -> list[Point]:
        """Metric records not returned before, ordered by time. `last`: return only the `last`
        newest ones (reading only the newest segments needed for them)."""
        try:
            polled = self._follower.poll(last)
        except KeyError as e:
            raise ViewError(str(e.args[0])) from None
        points = [Point(tm, new.run.experiment, new.run.run_id, new.rank, seq, name, step,
                        batch_idx, math.nan if value is None else value)
                  for new in polled
                  for seq, tm, name, step, batch_idx, value in zip(
                      *(new.table[c].to_pylist() for c in _COLUMNS))]
        points.sort(key=lambda p: (p.time, p.experiment, p.run_id, p.rank, p.seq))
        if last is not None:
            points = points[-last:] if last > 0 else []
        return points

