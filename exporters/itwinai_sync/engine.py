"""The target-independent sync engine: journal runs -> exporter sinks, exactly once.

For each (run, target) the engine takes the (target key, run) lock, and for each rank asks the
target for its committed cursor, streams the rank's records above it in seq order one segment at
a time (bounded memory), drops records the target does not show (kind) or that were not meant
for it (route), and hands batches to the sink together with the cursor they advance to. A run
that fails is reported and skipped; the others go on.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock
import pyarrow as pa
import pyarrow.compute as pc

from itwinai_journal import Journal, RankInfo, RunInfo
from itwinai_journal.segments import JournalCorruption, iter_tables, read_index

from .exporter import Exporter, ExportError, Notes, load_exporter
from .ledger import Ledger

#: Destination names loggers declare that are not export targets.
NOT_TARGETS = {"console", "journal"}


@dataclass
class RunResult:
    run: str
    target: str
    where: str = ""
    status: str = "synced"  # synced | up-to-date | failed | busy | would-sync
    exported: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    error: str | None = None
    trace: str | None = None
    cursors: dict[int, int] = field(default_factory=dict)


@dataclass
class SyncRequest:
    savedir: Path
    targets: list[str] | None  # None: each run's declared destinations
    options: dict[str, Any] = field(default_factory=dict)
    run_ids: list[str] | None = None
    ranks: str = "all"  # all | 0
    dry_run: bool = False
    workers: int = 4


Progress = Callable[[int], None]


class SyncEngine:
    def __init__(self, request: SyncRequest, progress: Progress | None = None):
        self.req = request
        self.progress = progress or (lambda n: None)
        self.notes = Notes()
        self._exporters: dict[str, Exporter] = {}
        self._lock = threading.Lock()
        #: Runs found damaged by the last `runs()` (a bad run.json or manifest): reported as
        #: failed by `run()`, never synced.
        self.damaged: list[RunInfo] = []
        #: Set to stop after the batch in progress (Ctrl-C in --watch): what is committed stays.
        self.stop = threading.Event()

    # -- planning -----------------------------------------------------------------------------

    def runs(self) -> list[RunInfo]:
        runs = Journal(self.req.savedir).scan()
        if self.req.run_ids:
            wanted = set(self.req.run_ids)
            runs = [r for r in runs if r.run_id in wanted or r.key in wanted]
            missing = wanted - {r.run_id for r in runs} - {r.key for r in runs}
            if missing:
                raise ExportError(f"no run {', '.join(sorted(missing))} in {self.req.savedir}")
        self.damaged = [r for r in runs if r.error]
        return [r for r in runs if not r.error]

    def targets_for(self, run: RunInfo) -> list[str]:
        if self.req.targets:
            return list(self.req.targets)
        return [t for t in run.destinations() if t not in NOT_TARGETS]

    def exporter(self, name: str) -> Exporter:
        with self._lock:
            if name not in self._exporters:
                cls = load_exporter(name)
                self._exporters[name] = cls(self.req.savedir, self.req.options, self.notes)
            return self._exporters[name]

    def plan(self) -> list[tuple[RunInfo, str]]:
        return [(run, t) for run in self.runs() for t in self.targets_for(run)]

    def ranks_of(self, run: RunInfo) -> list[RankInfo]:
        return [r for r in run.ranks if self.req.ranks == "all" or r.rank == 0]

    # -- running ------------------------------------------------------------------------------

    def run(self, plan: list[tuple[RunInfo, str]] | None = None) -> list[RunResult]:
        plan = self.plan() if plan is None else plan
        for _, target in plan:
            self.exporter(target)  # fail early, once, on a missing target library
        serial = [(r, t) for r, t in plan if not self.exporter(t).parallel_runs]
        parallel = [(r, t) for r, t in plan if self.exporter(t).parallel_runs]
        results: list[RunResult] = []
        if parallel:
            workers = max(1, min(self.req.workers, len(parallel)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sync") as pool:
                results.extend(pool.map(lambda rt: self.sync_run(*rt), parallel))
        results.extend(self.sync_run(r, t) for r, t in serial)
        target = ", ".join(self.req.targets or ["-"])
        results.extend(RunResult(r.key, target, status="failed", error=f"damaged, not synced: "
                                 f"{r.error}") for r in self.damaged)
        return results

    def close(self) -> None:
        for exp in self._exporters.values():
            exp.close()
        self._exporters.clear()

    def sync_run(self, run: RunInfo, target: str) -> RunResult:
        exporter = self.exporter(target)
        result = RunResult(run.key, target)
        try:
            result.where = exporter.describe(run)
            ledger = Ledger(self.req.savedir, exporter.target_key(run), target)
            if self.req.dry_run:
                self._dry_run(exporter, run, result)
                return result
            lock = ledger.lock(run)
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                result.status = "busy"
                result.error = "being synced to this target by another process; skipped"
                return result
            try:
                for rank in self.ranks_of(run):
                    self._sync_rank(exporter, ledger, run, rank, result)
            finally:
                lock.release()
            if not result.exported and not result.skipped:
                result.status = "up-to-date"
        except Exception as e:  # noqa: BLE001 - one broken run must not stop the others
            result.status = "failed"
            result.error = _one_line(e)
            result.trace = traceback.format_exc()
        return result

    def _records(self, rank: RankInfo, after: int) -> Iterable[pa.Table]:
        index, problems = read_index(rank.path)
        if problems:
            raise JournalCorruption(f"{rank.path}: {problems[0]}")
        return iter_tables(rank.path / "segments", after, index)

    def _sync_rank(self, exporter: Exporter, ledger: Ledger, run: RunInfo, rank: RankInfo,
                   result: RunResult) -> None:
        sink = exporter.open(run, rank, create=True)
        assert sink is not None
        try:
            cursor = sink.cursor()
            for table in self._records(rank, cursor):
                for start in range(0, table.num_rows, exporter.batch_records):
                    if self.stop.is_set():
                        return
                    chunk = table.slice(start, exporter.batch_records)
                    keep, skipped = select(chunk, exporter)
                    last = chunk["seq"][chunk.num_rows - 1].as_py()
                    sink.export(keep, last)
                    cursor = last
                    ledger.record(run, rank.rank, cursor)
                    result.exported.update(_kind_counts(keep))
                    result.skipped.update(skipped)
                    self.progress(chunk.num_rows)
            result.cursors[rank.rank] = cursor
            ledger.record(run, rank.rank, cursor)
        finally:
            sink.close()

    def _dry_run(self, exporter: Exporter, run: RunInfo, result: RunResult) -> None:
        result.status = "would-sync"
        for rank in self.ranks_of(run):
            sink = exporter.open(run, rank, create=False)
            cursor = 0
            if sink is not None:
                try:
                    cursor = sink.cursor()
                finally:
                    sink.close()
            result.cursors[rank.rank] = cursor
            for table in self._records(rank, cursor):
                keep, skipped = select(table, exporter)
                result.exported.update(_kind_counts(keep))
                result.skipped.update(skipped)
                self.progress(table.num_rows)
        if not result.exported and not result.skipped:
            result.status = "up-to-date"


def select(table: pa.Table, exporter: Exporter) -> tuple[pa.Table, Counter]:
    """Records of `table` that go to this target, and counts per kind of those that do not:
    kinds the target does not show, and records routed only to other destinations."""
    skipped: Counter = Counter()
    kind_ok = pc.is_in(table["kind"], pa.array(sorted(exporter.kinds), pa.string()))
    routed = pc.fill_null(pc.match_substring(table["meta"], '"targets"'), False)
    if pc.any(routed).as_py():
        metas = table["meta"].to_pylist()
        flags = routed.to_pylist()
        allowed = [not f or exporter.name in json.loads(m)["targets"]
                   for m, f in zip(metas, flags)]
        mask = pc.and_(kind_ok, pa.array(allowed))
    else:
        mask = kind_ok
    dropped = table.filter(pc.invert(mask))
    skipped.update(_kind_counts(dropped))
    return table.filter(mask), skipped


def _kind_counts(table: pa.Table) -> Counter:
    if not table.num_rows:
        return Counter()
    counts = pc.value_counts(table["kind"])
    return Counter({d["values"]: d["counts"] for d in counts.to_pylist()})


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}" if not isinstance(e, ExportError) else first


def total_pending(engine: SyncEngine, plan: list[tuple[RunInfo, str]]) -> int:
    """Records still to look at, estimated from manifests and the local ledger (for the
    progress bar; the target's own cursor decides what is actually exported)."""
    total = 0
    for run, target in plan:
        try:
            exporter = engine.exporter(target)
            cursors = Ledger(engine.req.savedir, exporter.target_key(run), target).cursors(run)
        except Exception:  # noqa: BLE001 - an estimate only
            cursors = {}
        for rank in engine.ranks_of(run):
            total += max(0, rank.last_seq - cursors.get(rank.rank, 0))
    return total
