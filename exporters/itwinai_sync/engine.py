"""The target-independent sync engine: journal runs -> exporter sinks, exactly once.

For each (journal, target) the engine takes a lock at the target (or, for a target without a
directory of its own such as an MLflow server, in the savedir's ledger), and for each rank asks
the target for its committed cursor, streams the rank's records above it in seq order one
segment at a time (bounded memory), drops records the target does not show (kind) or that were
not meant for it (route), and hands batches to the sink together with the cursor they advance
to. The cursor never passes a gap in the seqs: what is missing is reported and the rank fails
until it is restored. A target run is only created once there is a record for it. A run that
fails is reported and skipped; the others go on.

Parallelism (`--workers N`): up to N runs are open at once (each holding its lock), and the
export work itself (one rank of one run, or all ranks of a run whose exporter takes them one at
a time) runs on one shared pool of N threads. So N bounds both the runs in progress and the
streams writing to the targets, whatever the mix of few big runs and many small ones, and the
memory held (one segment and one batch per stream). Each rank is still written by one thread,
in seq order, with its own cursor: parallel ranks change nothing about exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import filelock
import pyarrow as pa
import pyarrow.compute as pc

from itwinai_journal import Journal, RankInfo, RunInfo
from itwinai_journal.format.validate import JournalCorruption
from itwinai_journal.read.journal import RecordsMissing, names_run, records_after, runs_named
from itwinai_journal.read.liveness import writer_gone

from .api import (
    Exporter,
    ExportError,
    Notes,
    OptionError,
    TargetChanged,
    load_exporter,
    own_options,
)
from .ledger import Ledger

#: Destination names loggers declare that are not export targets.
NOT_TARGETS = {"console", "journal"}
#: How often one rank's export starts again after its target run was replaced by a concurrent
#: sync of the same journal (see TargetChanged) before giving up for this time.
MAX_RESTARTS = 5


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
    journal: str = ""  # the journal's identity
    path: str = ""  # the journal's run directory


@dataclass
class SyncRequest:
    """The engine's settings for one sync. Each target's own option values are in `options`,
    by target name; everything else here is the engine's."""

    savedir: Path
    targets: list[str] | None  # None: each run's declared destinations
    #: Target name -> values of that target's options that were given (see `own_options`).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_ids: list[str] | None = None
    ranks: str = "all"  # all | 0
    dry_run: bool = False
    workers: int = 4

    def __post_init__(self) -> None:
        flat = sorted(k for k, v in self.options.items() if not isinstance(v, dict))
        if flat:
            raise OptionError(f"options are given per target ({{'mlflow': {{'tracking_uri': "
                              f"...}}}}), not {', '.join(flat)} at the top level")


Progress = Callable[[int], None]


class SeqGap(ExportError):
    """Records of a rank are missing from the journal: the export stops before them."""


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
        """The journals to sync, one per identity: two copies of one journal below the savedir
        (an rsync copy beside the original) are one journal, synced from the larger copy."""
        runs = Journal(self.req.savedir).scan()
        if self.req.run_ids:
            runs = runs_named(runs, self.req.run_ids)
            missing = {n for n in self.req.run_ids if not any(names_run(n, r) for r in runs)}
            if missing:
                raise ExportError(f"no run {', '.join(sorted(missing))} in {self.req.savedir}")
        self.damaged = [r for r in runs if r.error]
        chosen: dict[str, RunInfo] = {}
        for run in runs:
            if run.error:
                continue
            other = chosen.get(run.journal_id)
            if other is None:
                chosen[run.journal_id] = run
                continue
            keep, drop = (run, other) if run.records > other.records else (other, run)
            chosen[run.journal_id] = keep
            self.notes.add(f"{drop.path} is a copy of the journal at {keep.path} (same journal "
                           "id); synced from the latter, which holds more records")
        return list(chosen.values())

    def targets_for(self, run: RunInfo) -> list[str]:
        wanted = (list(self.req.targets) if self.req.targets
                  else [t for t in run.destinations() if t not in NOT_TARGETS])
        return [t for t in wanted if self.ranks_for(run, t)]

    def ranks_for(self, run: RunInfo, target: str) -> list[RankInfo]:
        """The ranks of `run` that go to `target`: all, or rank 0 with `--ranks 0`, less the
        ranks whose records reach that target through another journal of their
        LoggersCollection (see `rank_takes`)."""
        return [r for r in run.ranks
                if (self.req.ranks == "all" or r.rank == 0) and rank_takes(r, target)]

    def exporter(self, name: str) -> Exporter:
        with self._lock:
            if name not in self._exporters:
                cls = load_exporter(name)
                options = own_options(cls, self.req.options.get(name, {}))
                self._exporters[name] = cls(self.req.savedir, options, self.notes)
            return self._exporters[name]

    def plan(self) -> list[tuple[RunInfo, str]]:
        return [(run, t) for run in self.runs() for t in self.targets_for(run)]

    def still_running(self, run: RunInfo) -> bool:
        """Whether a rank of `run` may still be written: its session is open and its writer is
        not known to be gone (a writer killed by SIGKILL never closes its session; see
        itwinai_journal.read.liveness). Each rank found dead is noted once."""
        running = False
        for rank in run.ranks:
            if rank.status != "running":
                continue
            why = writer_gone(rank.path, rank.manifest)
            if why is None:
                running = True
            else:
                self.notes.add(f"{run.key} rank {rank.rank}: {why}; its session stays "
                               "'running' in the journal, the sync treats it as ended")
        return running

    # -- running ------------------------------------------------------------------------------

    def run(self, plan: list[tuple[RunInfo, str]] | None = None) -> list[RunResult]:
        plan = self.plan() if plan is None else plan
        for _, target in plan:
            self.exporter(target)  # fail early, once, on a missing target library
        serial = [(r, t) for r, t in plan if not self.exporter(t).parallel_runs]
        parallel = [(r, t) for r, t in plan if self.exporter(t).parallel_runs]
        results: list[RunResult] = []
        if parallel:
            workers = max(1, self.req.workers)
            with (ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sync") as streams,
                  ThreadPoolExecutor(max_workers=min(workers, len(parallel)),
                                     thread_name_prefix="sync-run") as runs):
                results.extend(runs.map(lambda rt: self.sync_run(*rt, streams=streams),
                                        parallel))
        results.extend(self.sync_run(r, t) for r, t in serial)
        target = ", ".join(self.req.targets or ["-"])
        results.extend(RunResult(r.key, target, status="failed", error=f"damaged, not synced: "
                                 f"{r.error}") for r in self.damaged)
        return results

    def forget_unreachable(self) -> None:
        """Let targets found unreachable be tried again by the next pass (live sync outlives
        outages; a one-off sync reports an unreachable target once and moves on)."""
        with self._lock:
            for exp in self._exporters.values():
                exp.forget_unreachable()

    def close(self) -> None:
        for exp in self._exporters.values():
            exp.close()
        self._exporters.clear()

    def sync_run(self, run: RunInfo, target: str,
                 streams: ThreadPoolExecutor | None = None) -> RunResult:
        """Export `run` to `target`; its ranks on `streams` (in parallel when the exporter
        takes them so, else all in one task), or in this thread when there is no pool."""
        exporter = self.exporter(target)
        result = RunResult(run.key, target, journal=run.journal_id, path=str(run.path))
        try:
            # The exporter sees the ranks it gets: one rank is one MLflow run, several a parent
            # with a child per rank.
            view = dataclasses.replace(run, ranks=self.ranks_for(run, target))
            result.where = exporter.describe(view)
            ledger = Ledger(self.req.savedir, exporter.target_key(view), target)
            if self.req.dry_run:
                self._dry_run(exporter, view, result)
                return result
            lock = target_lock(exporter, ledger, view)
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                result.status = "busy"
                result.error = "being synced to this target by another process; skipped"
                return result
            try:
                exporter.connect(view)
                errors = self._sync_ranks(exporter, ledger, view, result, streams)
            finally:
                lock.release()
            if errors:
                more = f" (and {len(errors) - 1} more rank(s))" if len(errors) > 1 else ""
                raise ExportError(errors[0] + more)
            if not result.exported and not result.skipped:
                result.status = "up-to-date"
        except Exception as e:  # noqa: BLE001 - one broken run must not stop the others
            result.status = "failed"
            result.error = _one_line(e)
            result.trace = traceback.format_exc()
        return result

    def _sync_ranks(self, exporter: Exporter, ledger: Ledger, run: RunInfo, result: RunResult,
                    streams: ThreadPoolExecutor | None) -> list[str]:
        """Export every rank of `run` and add up what they did into `result`; the errors, one
        line per failed rank, in rank order. Each rank counts into a result of its own, merged
        here by this one thread once the rank is done."""

        def one(rank: RankInfo) -> tuple[RunResult, str | None]:
            part = RunResult(run.key, result.target)
            try:
                self._sync_rank(exporter, ledger, run, rank, part)
            except (ExportError, JournalCorruption) as e:
                return part, f"rank {rank.rank}: {_one_line(e)}"
            return part, None

        def serially(ranks: list[RankInfo]) -> list[tuple[RunResult, str | None]]:
            return [one(rank) for rank in ranks]

        if streams is None:
            outcomes = serially(run.ranks)
        else:
            if exporter.parallel_ranks:
                futures = [streams.submit(serially, [rank]) for rank in run.ranks]
            else:
                futures = [streams.submit(serially, run.ranks)]
            # Every rank ends (its sink closed) before the run's lock is released, also when
            # one of them raised something unexpected: that is raised once all are done.
            wait(futures)
            outcomes = [o for f in futures if f.exception() is None for o in f.result()]
        errors = []
        for part, error in outcomes:
            result.exported.update(part.exported)
            result.skipped.update(part.skipped)
            result.cursors.update(part.cursors)
            if error is not None:
                errors.append(error)
        if streams is not None:
            for f in futures:
                f.result()  # raises what a rank raised that is not an export error
        return errors

    def _sync_rank(self, exporter: Exporter, ledger: Ledger, run: RunInfo, rank: RankInfo,
                   result: RunResult) -> None:
        for attempt in range(MAX_RESTARTS + 1):
            try:
                return self._sync_rank_once(exporter, ledger, run, rank, result)
            except TargetChanged as e:
                if attempt == MAX_RESTARTS:
                    raise ExportError(f"{e}; gave up after {MAX_RESTARTS} restarts") from e
                self.notes.add(f"{exporter.name}: {run.key} rank {rank.rank}: {e}; continued "
                               "in the run that was kept")

    def _sync_rank_once(self, exporter: Exporter, ledger: Ledger, run: RunInfo,
                        rank: RankInfo, result: RunResult) -> None:
        sink = exporter.open(run, rank, create=True)
        assert sink is not None
        sink.taken = partial(self._taken, exporter, rank)
        try:
            cursor = sink.cursor()
            # A target run is created by the first batch that holds a record for it: until
            # then batches of records this target does not take are not handed to the sink.
            holds = cursor > 0
            for table in self._records(rank, cursor):
                for start in range(0, table.num_rows, exporter.batch_records):
                    if self.stop.is_set():
                        return
                    chunk = table.slice(start, exporter.batch_records)
                    keep, skipped = select(chunk, exporter)
                    last = chunk["seq"][chunk.num_rows - 1].as_py()
                    if keep.num_rows or holds:
                        sink.export(keep, last)
                        holds = True
                        ledger.record(run, rank.rank, last)
                    cursor = last
                    result.exported.update(_kind_counts(keep))
                    result.skipped.update(skipped)
                    self.progress(chunk.num_rows)
            result.cursors[rank.rank] = cursor
        finally:
            sink.close()

    def _records(self, rank: RankInfo, after: int) -> Iterator[pa.Table]:
        """The rank's records above `after`, in seq order, up to the first gap in the seqs
        (where SeqGap is raised once the records before it have been consumed)."""
        try:
            yield from records_after(rank, after)
        except RecordsMissing as e:
            raise SeqGap(f"{e}; exported up to seq {e.last_ok}, the rest follows once they "
                         "are restored") from None

    def _taken(self, exporter: Exporter, rank: RankInfo, after: int,
               upto: int) -> Iterator[pa.Table]:
        """`RankSink.taken`: what the target took of the rank in (after, upto]. Records lost
        from the journal since they were exported are not there to be seen again: the tables
        end before them, and a note says so."""
        try:
            for table in records_after(rank, after):
                if table.num_rows and table["seq"][0].as_py() > upto:
                    return
                yield select(table.filter(pc.less_equal(table["seq"], upto)), exporter)[0]
        except RecordsMissing as e:
            self.notes.add(f"{exporter.name}: {rank.path}: what was exported before is read "
                           f"back only up to seq {e.last_ok} ({e}); names first seen after it "
                           "are taken as new")

    def _dry_run(self, exporter: Exporter, run: RunInfo, result: RunResult) -> None:
        result.status = "would-sync"
        for rank in run.ranks:
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


def target_lock(exporter: Exporter, ledger: Ledger, run: RunInfo) -> filelock.BaseFileLock:
    """The lock a sync holds while it exports `run` to a target: per journal, at the target
    itself when it lives in a directory (so that syncs reading two copies of a savedir exclude
    each other too), else in the savedir's ledger."""
    where = exporter.lock_dir(run)
    if where is None:
        return ledger.lock(run)
    where.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(where / f"{run.journal_id}.lock"))


def rank_takes(rank: RankInfo, target: str) -> bool:
    """Whether this rank's journal is where `target` takes its records from.

    A LoggersCollection whose members write to different savedirs (a Prov4MLLogger writes to
    its own provenance_save_dir) makes several journals of one run, and a record accepted by
    several members is in several of them. Each journal records the collection's destinations
    and whether it is the primary one (the first member's). A target of the collection takes
    its records from the journal its own logger wrote; a target outside it (`--to` a tracker
    no member logs to) from the primary journal. Journals without that record (written
    outside a collection, or before it existed) take every target."""
    collection = rank.manifest.get("collection")
    if not isinstance(collection, dict):
        return True
    declared = rank.manifest.get("destinations") or {}
    if isinstance(declared, dict) and target in declared:
        return True
    group = collection.get("destinations")
    if isinstance(group, list) and target in group:
        return False
    return collection.get("primary") is True


def select(table: pa.Table, exporter: Exporter) -> tuple[pa.Table, Counter]:
    """Records of `table` that go to this target, and counts per kind of those that do not:
    kinds the target does not show, and records routed only to other destinations (a
    record's route is the `targets` list at the top level of its meta, which only the journal
    writer sets; a user's keyword argument of that name is kept under meta's `kwargs`)."""
    skipped: Counter = Counter()
    kind_ok = pc.is_in(table["kind"], pa.array(sorted(exporter.kinds), pa.string()))
    if exporter.texts_logged_as is not None:
        texts = pc.equal(table["kind"], "text")
        if pc.any(texts).as_py():
            taken = exporter.texts_logged_as
            kind_ok = pc.and_(kind_ok, pa.array(
                [not text or _logged_as(meta) in taken
                 for meta, text in zip(table["meta"].to_pylist(), texts.to_pylist())]))
    maybe = pc.fill_null(pc.match_substring(table["meta"], '"targets"'), False)
    if pc.any(maybe).as_py():
        allowed = [not m or exporter.name in _route(meta)
                   for meta, m in zip(table["meta"].to_pylist(), maybe.to_pylist())]
        mask = pc.and_(kind_ok, pa.array(allowed))
    else:
        mask = kind_ok
    dropped = table.filter(pc.invert(mask))
    skipped.update(_kind_counts(dropped))
    return table.filter(mask), skipped


class _Everywhere:
    def __contains__(self, name: object) -> bool:
        return True


_EVERYWHERE = _Everywhere()


def _route(meta: str) -> Any:
    """The destinations a record is restricted to (a container of names), or everywhere when
    its meta has no top-level `targets`. A `targets` that is not a list of names (a damaged or
    crafted journal) restricts the record to nowhere: it is counted as not for this target."""
    try:
        d = json.loads(meta)
    except ValueError:
        return _EVERYWHERE
    if not isinstance(d, dict) or "targets" not in d:
        return _EVERYWHERE
    targets = d["targets"]
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return set(targets)
    return set()


def _logged_as(meta: str | None) -> Any:
    """The kind a text record's object was logged as (meta['logged_as']), or None."""
    try:
        d = json.loads(meta) if meta else None
    except ValueError:
        return None
    logged_as = d.get("logged_as") if isinstance(d, dict) else None
    return logged_as if isinstance(logged_as, str) else None


def _kind_counts(table: pa.Table) -> Counter:
    if not table.num_rows:
        return Counter()
    counts = pc.value_counts(table["kind"])
    return Counter({d["values"]: d["counts"] for d in counts.to_pylist()})


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}" if not isinstance(e, ExportError) else first


def total_pending(engine: SyncEngine, plan: list[tuple[RunInfo, str]],
                  written: Callable[[RankInfo], int] = lambda rank: rank.last_seq) -> int:
    """Records still to look at, estimated from what each rank has `written` (by default what
    its manifest and index say) and the local ledger (for the progress bar and live sync's
    status; the target's own cursor decides what is actually exported)."""
    total = 0
    for run, target in plan:
        ranks = engine.ranks_for(run, target)
        try:
            exporter = engine.exporter(target)
            view = dataclasses.replace(run, ranks=ranks)
            cursors = Ledger(engine.req.savedir, exporter.target_key(view), target).cursors(view)
        except Exception:  # noqa: BLE001 - an estimate only
            cursors = {}
        for rank in ranks:
            total += max(0, written(rank) - cursors.get(rank.rank, 0))
    return total

