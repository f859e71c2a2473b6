"""Reading journals without any tracker: runs from manifests, records as pyarrow Tables."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import segments
from .fsutil import read_json

#: Directories never searched for runs: they are inside runs, or hold tracker exports.
_NOT_RUNS = {"segments", "blobs", "__pycache__"}
METRIC_COLUMNS = ["seq", "time", "name", "step", "batch_idx", "value"]
_JOURNAL_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class RankInfo:
    rank: int
    path: Path
    manifest: dict[str, Any]

    @property
    def status(self) -> str:
        # Imported here: manifest.py pulls in importlib.metadata, subprocess and socket, which
        # listing runs does not need.
        from .manifest import session_status

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

    @functools.cached_property
    def journal_id(self) -> str:
        """This journal's identity (32 hex digits): run.json's `journal_id`, or, for journals
        written before it existed, the sha256 of run.json's bytes (cut to 32 digits). run.json
        is written once and never changed, so both stay the same for a resumed job and for a
        copy of the journal, and differ between two journals that share an experiment and a
        run id (run.json holds its creation time to the microsecond)."""
        given = self.info.get("journal_id")
        if isinstance(given, str) and _JOURNAL_ID.match(given):
            return given
        try:
            data = (self.path / "run.json").read_bytes()
        except OSError:
            data = json.dumps(self.info, sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()[:32]

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
    try:
        fd = os.open(os.path.join(rank_dir, segments.INDEX_NAME), os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        tail = os.pread(fd, 4096, max(0, size - 4096)).split(b"\n")
    finally:
        os.close(fd)
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
    with os.scandir(run_dir) as entries:
        rank_entries = sorted((e for e in entries if e.name.startswith("rank-") and e.is_dir()),
                              key=lambda e: e.name)
    for entry in rank_entries:
        try:
            manifest = read_json(os.path.join(entry.path, "manifest.json"))
        except FileNotFoundError:
            manifest = {}
        run.ranks.append(RankInfo(int(entry.name[5:]), Path(entry.path), manifest))
    return run


def find_run_dirs(savedir: Path) -> Iterator[Path]:
    """Every directory holding a run.json below `savedir`, at any depth, in sorted order.
    A run directory is not listed here (it may hold thousands of ranks), nor searched further;
    unreadable directories and symlinks to directories are skipped, as `os.walk` does."""
    savedir = Path(savedir)
    if os.path.isfile(savedir / "run.json"):
        yield savedir
        return
    try:
        with os.scandir(savedir) as entries:
            subdirs = sorted(e.name for e in entries
                             if e.is_dir(follow_symlinks=False) and e.name not in _NOT_RUNS
                             and not e.name.startswith("."))
    except OSError:
        return
    for name in subdirs:
        yield from find_run_dirs(savedir / name)


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
        import pyarrow.compute as pc  # not at module level: listing runs does not need it

        kinds = list(kinds) if kinds is not None else None
        tables = []
        for run, r in self._select(experiment, run_id, rank):
            for t in segments.iter_tables(r.path / "segments"):
                if kinds is not None:
                    wanted = (pc.equal(t["kind"], kinds[0]) if len(kinds) == 1
                              else pc.is_in(t["kind"], pa.array(kinds, pa.string())))
                    if not pc.all(wanted).as_py():  # a segment of wanted kinds only is kept whole
                        t = t.filter(wanted)
                if t.num_rows:
                    tables.append(_label(t, run, r))
        if not tables:
            return _label(segments.ARROW_SCHEMA.empty_table(), None, None)
        return pa.concat_tables(tables)

    def metrics(self, experiment: str | None = None, run_id: str | None = None,
                rank: int | None = None, name: str | None = None) -> pa.Table:
        """Metric points: experiment, run_id, rank, seq, time, name, step, batch_idx, value."""
        import pyarrow.compute as pc

        t = self.records(experiment, run_id, rank, kinds=["metric"])
        if name is not None:
            t = t.filter(pc.equal(t["name"], name))
        return t.select(["experiment", "run_id", "rank", *METRIC_COLUMNS])


def _label(t: pa.Table, run: RunInfo | None, r: RankInfo | None) -> pa.Table:
    n = t.num_rows
    t = t.add_column(0, "rank", pa.repeat(pa.scalar(r.rank if r else 0, pa.int32()), n))
    t = t.add_column(0, "run_id", pa.repeat(pa.scalar(run.run_id if run else ""), n))
    return t.add_column(0, "experiment", pa.repeat(pa.scalar(run.experiment if run else ""), n))
