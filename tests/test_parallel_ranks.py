"""The engine's parallelism, with a recording exporter (a narrow unit test: the real targets are
tested in test_postgres_sync.py and test_mlflow_export.py): `--workers N` bounds the ranks being
exported at once over all runs, the ranks of one run do run at once, each rank is exported once,
in seq order, by one thread at a time, and what they did adds up in the run's result."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_journal.loggers import MLFlowLogger
from itwinai_sync.api import Exporter, RankSink
from itwinai_sync.engine import SyncEngine, SyncRequest

WORKERS = 3


class Recorder:
    """What the sinks saw: batches per (run, rank), and how many ranks were being exported at
    once. The first WORKERS exports wait for each other (a barrier), which they pass only if
    that many ranks really are exported at the same time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.opened: Counter = Counter()
        self.seqs: dict[tuple[str, int], list[int]] = {}
        self.barrier = threading.Barrier(WORKERS, timeout=30)
        self.calls = 0

    def enter(self) -> None:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.calls += 1
            first = self.calls <= WORKERS
        if first:
            self.barrier.wait()

    def leave(self) -> None:
        with self.lock:
            self.active -= 1


class RecordingSink(RankSink):
    def __init__(self, run: RunInfo, rank: RankInfo, exporter: RecordingExporter):
        super().__init__(run, rank, exporter.notes)
        self.recorder = exporter.recorder
        self.seqs = self.recorder.seqs.setdefault((run.run_id, rank.rank), [])

    def cursor(self) -> int:
        return self.seqs[-1] if self.seqs else 0

    def export(self, batch: pa.Table, cursor: int) -> None:
        self.recorder.enter()
        try:
            self.seqs.extend(batch["seq"].to_pylist())
        finally:
            self.recorder.leave()


class RecordingExporter(Exporter):
    name = "recording"
    kinds = frozenset({"metric", "param"})
    batch_records = 50
    parallel_ranks = True

    def __init__(self, savedir: Path, options: dict[str, Any], notes: Any):
        super().__init__(savedir, options, notes)
        self.recorder = Recorder()

    def target_key(self, run: RunInfo) -> str:
        return "recording:"

    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        with self.recorder.lock:
            self.recorder.opened[(run.run_id, rank.rank)] += 1
        return RecordingSink(run, rank, self)


def test_workers_bound_the_ranks_exported_at_once_over_all_runs(tmp_path):
    savedir = tmp_path / "mllogs"
    for run_id, ranks in (("a", 5), ("b", 4)):
        for rank in range(ranks):
            lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id=run_id,
                              log_freq="batch", log_on_workers=-1)
            lg.create_logger_context(rank=rank)
            lg.save_hyperparameters({"rank": rank})
            for i in range(120 + rank):
                lg.log(float(i), "loss", step=i)
            lg.destroy_logger_context()
    engine = SyncEngine(SyncRequest(savedir=savedir, targets=["recording"], workers=WORKERS))
    exporter = RecordingExporter(savedir, {}, engine.notes)
    engine._exporters["recording"] = exporter
    results = {r.run: r for r in engine.run()}
    rec = exporter.recorder
    assert rec.most == WORKERS  # never more at once, and that many did run at once
    assert rec.opened == Counter({("a", r): 1 for r in range(5)} | {("b", r): 1 for r in range(4)})
    for (run_id, rank), seqs in rec.seqs.items():
        assert seqs == list(range(1, 120 + rank + 2)), (run_id, rank)  # 1 param + the points
    assert {k: (r.status, dict(r.exported), r.cursors) for k, r in results.items()} == {
        "exp/a": ("synced", {"metric": sum(120 + r for r in range(5)), "param": 5},
                  {r: 121 + r for r in range(5)}),
        "exp/b": ("synced", {"metric": sum(120 + r for r in range(4)), "param": 4},
                  {r: 121 + r for r in range(4)}),
    }
