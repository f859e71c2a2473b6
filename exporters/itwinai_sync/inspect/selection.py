"""Which runs and which metric points: the runs a command names, and their metric points as
one tidy table (sampled system metrics included when asked for by name)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from itwinai_journal import Journal
from itwinai_journal.format.schema import ARROW_SCHEMA
from itwinai_journal.read.journal import RunInfo
from itwinai_sync.targets import system_metrics

from . import ViewError

#: Columns of the tidy metrics table (`Journal.metrics()` and `itwinai-sync export`).
METRIC_TABLE_COLUMNS = ["experiment", "run_id", "rank", "seq", "time", "name", "step",
                        "batch_idx", "value"]
#: Name prefix under which `show` and `plot` present sampled system metrics.
SYSTEM_PREFIX = "system/"


def select_runs(journal: Journal, run_ids: Sequence[str] | None) -> list[RunInfo]:
    """The runs named (id or experiment/id), in the order given; every run when none is."""
    if not run_ids:
        return journal.runs()
    try:
        return [journal.run(r) for r in dict.fromkeys(run_ids)]
    except KeyError as e:
        raise ViewError(str(e.args[0])) from None


def wanted(name: str, patterns: Sequence[str] | None) -> bool:
    """Whether a metric name matches one of the fnmatch `patterns` (every name when none)."""
    return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def metrics_table(journal: Journal, runs: Sequence[RunInfo],
                  patterns: Sequence[str] | None = None) -> pa.Table:
    """Metric points of `runs` (names matching any of the fnmatch `patterns`), sorted by
    experiment, run, rank and seq. Sampled system metrics are points `system/<field>`,
    included when a pattern asks for them by that prefix (`'system/*'`, `'system/gpu*'`)."""
    tables = [journal.metrics(experiment=r.experiment, run_id=r.run_id) for r in runs]
    if any(p.startswith(SYSTEM_PREFIX) for p in patterns or ()):
        tables += [system_points(journal.records(experiment=r.experiment, run_id=r.run_id,
                                                 kinds=[system_metrics.KIND])) for r in runs]
    t = pa.concat_tables(tables) if tables else journal.metrics(run_id="\0")
    if patterns:
        keep = sorted(n for n in set(t["name"].unique().to_pylist()) if wanted(n, patterns))
        t = t.filter(pc.is_in(t["name"], pa.array(keep, pa.string())))
    if t.num_rows:
        t = t.take(pc.sort_indices(t, [("experiment", "ascending"), ("run_id", "ascending"),
                                       ("rank", "ascending"), ("seq", "ascending")]))
    return t


def system_points(records: pa.Table) -> pa.Table:
    """The `system_metric` records of a records table as metric points: one per field of each
    sample, named `system/<field>`, at the sample's time and step (its ordinal in the rank),
    with the columns of `Journal.metrics()`."""
    records = records.filter(pc.equal(records["kind"], system_metrics.KIND))
    rows: dict[str, list] = {c: [] for c in METRIC_TABLE_COLUMNS}
    cols = [records[c].to_pylist() for c in ("experiment", "run_id", "rank", "seq", "time",
                                             "step", "text")]
    for exp, run, rank, seq, tm, step, text in zip(*cols):
        for name, value in sorted(system_metrics.sample(text).items()):
            for c, v in zip(METRIC_TABLE_COLUMNS, (exp, run, rank, seq, tm, SYSTEM_PREFIX + name,
                                                   step, None, value)):
                rows[c].append(v)
    return pa.Table.from_pydict(rows, schema=records.select(METRIC_TABLE_COLUMNS).schema)


def metrics_schema() -> pa.Schema:
    """The schema of `Journal.metrics()` (and of the exported tables)."""
    return pa.schema(
        [("experiment", pa.string()), ("run_id", pa.string()), ("rank", pa.int32())]
        + [ARROW_SCHEMA.field(c) for c in METRIC_TABLE_COLUMNS[3:]])
