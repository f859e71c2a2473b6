"""Reading journals without any tracker: runs from manifests, records as pyarrow Tables."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from . import segments
from .fsutil import read_json
from .manifest import session_status

#: Directories never searched for runs: they are inside runs, or hold tracker exports.
_NOT_RUNS = {"segments", "blobs", "__pycache__"}
METRIC_COLUMNS = ["seq", "time", "name", "step", "batch_idx", "value"]


@dataclass
class RankInfo:
    rank: int
    path: Path
    manifest: dict[str, Any]

    @property
    def status(self) -> str:
        return session_status(self.manifest)

    @property
    def last_seq(self) -> int:
        """Highest seq known without opening segments: the last closed session or the index."""
        sessions = self.manifest.get("sessions") or []
        closed = max((s.get("last_seq") or 0 for s in sessions), default=0)
        return max(closed, _index_last_seq(self.path))


@dataclass
class RunInfo:
    experiment: str
    run_id: str
    path: Path
    info: dict[str, Any]
    ranks: list[RankInfo] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.run_id}"

    @property
    def status(self) -> str:
        """'running' while any rank runs; else the worst final status of the ranks."""
        statuses = {r.status for r in self.ranks}
        for s in ("running", "failed", "interrupted"):
            if s in statuses:
                return s
        return "finished" if statuses else "empty"

    @property
    def records(self) -> int:
        return sum(r.last_seq for r in self.ranks)

    def destinations(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for r in self.ranks:
            for target, opts in (r.manifest.get("destinations") or {}).items():
                merged.setdefault(target, opts)
        return merged

    def rank(self, rank: int) -> RankInfo:
        for r in self.ranks:
            if r.rank == rank:
                return r
        raise KeyError(f"run {self.key} has no rank {rank}")


def _index_last_seq(rank_dir: Path) -> int:
    """last_seq of the index's final line, read from the end of the file (cheap for `ls`)."""
    path = rank_dir / segments.INDEX_NAME
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    import json

    for line in reversed(tail):
        if line.strip():
            try:
                return int(json.loads(line).get("last_seq") or 0)
            except ValueError:
                continue
    return 0


def load_run(run_dir: Path) -> RunInfo:
    info = read_json(run_dir / "run.json")
    run = RunInfo(info.get("experiment", run_dir.parent.name), info.get("run_id", run_dir.name),
                  run_dir, info)
    for entry in sorted(os.scandir(run_dir), key=lambda e: e.name):
        if entry.is_dir() and entry.name.startswith("rank-"):
            rank_dir = Path(entry.path)
            mpath = rank_dir / "manifest.json"
            manifest = read_json(mpath) if mpath.exists() else {}
            run.ranks.append(RankInfo(int(entry.name[5:]), rank_dir, manifest))
    return run


def find_run_dirs(savedir: Path) -> Iterator[Path]:
    """Every directory holding a run.json below `savedir`, at any depth, in sorted order."""
    for root, dirs, files in os.walk(savedir):
        if "run.json" in files:
            dirs[:] = []
            yield Path(root)
            continue
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS and not d.startswith("."))


class Journal:
    """All runs below a savedir. Listing uses manifests only; records come from the segments."""

    def __init__(self, savedir: str | os.PathLike):
        self.savedir = Path(savedir)
        if not self.savedir.is_dir():
            raise FileNotFoundError(f"no journal directory at {self.savedir}")

    def runs(self) -> list[RunInfo]:
        return [load_run(d) for d in find_run_dirs(self.savedir)]

    def run(self, run_id: str) -> RunInfo:
        """A run by id, or by 'experiment/run_id' when ids repeat across experiments."""
        found = [r for r in self.runs() if run_id in (r.run_id, r.key)]
        if not found:
            raise KeyError(f"no run {run_id!r} in {self.savedir}")
        if len(found) > 1:
            raise KeyError(f"run id {run_id!r} exists in several experiments; use "
                           f"experiment/run_id: {', '.join(r.key for r in found)}")
        return found[0]

    def _select(self, experiment: str | None, run_id: str | None, rank: int | None
                ) -> Iterator[tuple[RunInfo, RankInfo]]:
        for run in self.runs():
            if experiment is not None and run.experiment != experiment:
                continue
            if run_id is not None and run_id not in (run.run_id, run.key):
                continue
            for r in run.ranks:
                if rank is None or r.rank == rank:
                    yield run, r

    def records(self, experiment: str | None = None, run_id: str | None = None,
                rank: int | None = None, kinds: Iterable[str] | None = None) -> pa.Table:
        """Every record (sealed and active segments) with experiment, run_id and rank columns."""
        kinds = list(kinds) if kinds is not None else None
        tables = []
        for run, r in self._select(experiment, run_id, rank):
            for t in segments.iter_tables(r.path / "segments"):
                if kinds is not None:
                    t = t.filter(pc.is_in(t["kind"], pa.array(kinds, pa.string())))
                if t.num_rows:
                    tables.append(_label(t, run, r))
        if not tables:
            return _label(segments.ARROW_SCHEMA.empty_table(), None, None)
        return pa.concat_tables(tables)

    def metrics(self, experiment: str | None = None, run_id: str | None = None,
                rank: int | None = None, name: str | None = None) -> pa.Table:
        """Metric points: experiment, run_id, rank, seq, time, name, step, batch_idx, value."""
        t = self.records(experiment, run_id, rank, kinds=["metric"])
        if name is not None:
            t = t.filter(pc.equal(t["name"], name))
        return t.select(["experiment", "run_id", "rank", *METRIC_COLUMNS])


def _label(t: pa.Table, run: RunInfo | None, r: RankInfo | None) -> pa.Table:
    n = t.num_rows
    t = t.add_column(0, "rank", pa.array([r.rank if r else 0] * n, pa.int32()))
    t = t.add_column(0, "run_id", pa.array([run.run_id if run else ""] * n, pa.string()))
    return t.add_column(0, "experiment", pa.array([run.experiment if run else ""] * n,
                                                  pa.string()))
