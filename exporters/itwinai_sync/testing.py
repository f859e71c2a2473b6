"""An exporter that keeps what it receives in memory, for tests (as OpenTelemetry's
`InMemorySpanExporter`).

Tests of code that syncs journals (and of a new exporter, side by side with it) can run the
real engine against a target they can inspect without a tracker:

    from itwinai_sync.engine import SyncRequest
    from itwinai_sync.testing import InMemoryExporter, run_sync

    target = InMemoryExporter(savedir)
    run_sync(SyncRequest(savedir, ["memory"]), target)
    target.records(journal_id, 0)     # the rank's records, as dicts, in seq order
    target.cursor_of(journal_id, 0)   # the rank's cursor, as the target holds it

The exporter keeps the exporters' contract rather than assuming it: a batch must hold only
records above the rank's cursor, in seq order, none above the batch's cursor, and the cursor
never goes back; a batch that breaks it fails the rank with an ExportError (and stores
nothing), so a test of the engine finds such a bug here. Records and cursor of a batch are
stored in one step, so the target never holds one without the other. What it holds lives as
long as the instance: a re-run is another `run_sync` with the same instance.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_journal.format.schema import (
    ALL_KINDS,
    HISTOGRAM_KIND,
    SYSTEM_METRIC_KIND,
    TOPOLOGY_KIND,
)

from .api import Exporter, ExportError, Notes, RankSink
from .engine import RunResult, SyncEngine, SyncRequest


@dataclass
class Held:
    """What the target holds for one journal rank."""

    records: list[dict[str, Any]] = field(default_factory=list)
    cursor: int = 0
    #: (number of records, cursor) of every batch taken, empty ones included.
    batches: list[tuple[int, int]] = field(default_factory=list)


class InMemoryExporter(Exporter):
    """Takes every kind of record a journal holds; one `Held` per (journal identity, rank)."""

    name = "memory"
    kinds = frozenset({*ALL_KINDS, HISTOGRAM_KIND, TOPOLOGY_KIND, SYSTEM_METRIC_KIND})
    batch_records: ClassVar[int] = 10_000

    def __init__(self, savedir: Path, options: dict[str, Any] | None = None,
                 notes: Notes | None = None, kinds: Iterable[str] | None = None):
        super().__init__(savedir, options or {}, notes or Notes())
        if kinds is not None:  # to skip some, as a real target does
            self.kinds = frozenset(kinds)
        self.held: dict[tuple[str, int], Held] = {}
        self._guard = threading.Lock()

    def target_key(self, run: RunInfo) -> str:
        return f"memory:{id(self):x}"

    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        key = (run.journal_id, rank.rank)
        with self._guard:
            if key not in self.held:
                if not create:
                    return None
                self.held[key] = Held()
            return InMemorySink(self, run, rank, self.notes, self.held[key])

    def records(self, journal_id: str, rank: int) -> list[dict[str, Any]]:
        """The records the target holds for a journal rank ([] for none), in seq order."""
        held = self.held.get((journal_id, rank))
        return list(held.records) if held else []

    def cursor_of(self, journal_id: str, rank: int) -> int:
        held = self.held.get((journal_id, rank))
        return held.cursor if held else 0


class InMemorySink(RankSink):
    def __init__(self, exporter: InMemoryExporter, run: RunInfo, rank: RankInfo, notes: Notes,
                 held: Held):
        super().__init__(run, rank, notes)
        self.exporter = exporter
        self.held = held

    def cursor(self) -> int:
        return self.held.cursor

    def export(self, batch: pa.Table, cursor: int) -> None:
        rows = batch.to_pylist()
        seqs = [row["seq"] for row in rows]
        with self.exporter._guard:
            previous = self.held.cursor
            if cursor < previous:
                raise ExportError(f"contract: cursor {cursor} goes back from {previous}")
            if seqs and (seqs[0] <= previous or seqs[-1] > cursor
                         or any(b <= a for a, b in zip(seqs, seqs[1:]))):
                raise ExportError(f"contract: batch seqs {seqs[0]}..{seqs[-1]} are not in "
                                  f"order within ({previous}, {cursor}]")
            self.held.records.extend(rows)
            self.held.batches.append((len(rows), cursor))
            self.held.cursor = cursor


class _GivenExporters(SyncEngine):
    """The engine, with exporter instances given for some target names (the others are
    loaded from their entry points, as the CLI does)."""

    def __init__(self, request: SyncRequest, given: Iterable[Exporter]):
        super().__init__(request)
        self.given = {exporter.name: exporter for exporter in given}

    def exporter(self, name: str) -> Exporter:
        return self.given.get(name) or super().exporter(name)


def run_sync(request: SyncRequest, *exporters: Exporter) -> list[RunResult]:
    """One sync, as `itwinai-sync` runs it, into the given exporter instances (their `close`
    is called at the end, as the engine does for those it loads)."""
    engine = _GivenExporters(request, exporters)
    try:
        return engine.run()
    finally:
        engine.close()
        for exporter in exporters:
            exporter.close()
