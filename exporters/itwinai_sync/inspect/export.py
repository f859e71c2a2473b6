"""`itwinai-sync export`: each run's metrics as one tidy Parquet or CSV table, and reading such
a file back with the exact column types of `Journal.metrics()`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from itwinai_journal import Journal
from itwinai_journal.format.fsio import write_atomic
from itwinai_journal.format.names import experiment_dirname
from itwinai_journal.read.journal import RunInfo

from . import ViewError
from .selection import metrics_schema, metrics_table, select_runs

FORMATS = ("parquet", "csv")


def export_metrics(journal: Journal, out_dir: Path, fmt: str,
                   run_ids: Sequence[str] | None = None) -> list[tuple[RunInfo, Path, int]]:
    """Write each selected run's metrics as one tidy table,
    `out_dir/<experiment>/<run_id>.<fmt>` (the experiment directory named as in the journal),
    with the columns of `Journal.metrics()`. Files are replaced atomically. Returns (run, path,
    rows) per run written."""
    if fmt not in FORMATS:
        raise ViewError(f"unknown format {fmt!r}: use parquet or csv")
    written = []
    for run in select_runs(journal, run_ids):
        t = metrics_table(journal, [run])
        path = out_dir / experiment_dirname(run.experiment) / f"{run.run_id}.{fmt}"
        buf = io.BytesIO()
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(t, buf, compression="zstd")
        else:
            import pyarrow.csv as pacsv

            pacsv.write_csv(t, buf)
        write_atomic(path, buf.getvalue(), fsync=False)
        written.append((run, path, t.num_rows))
    return written


def read_export(path: Path) -> pa.Table:
    """An exported file back as a table with the exact column types of `Journal.metrics()`."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    import pyarrow.csv as pacsv

    schema = metrics_schema()
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={f.name: f.type for f in schema}, null_values=[""],
        strings_can_be_null=False, quoted_strings_can_be_null=False))
