"""A log_batch request into MLflow's sqlite store, written as the rows MLflow's store writes.

`SqlAlchemyStore.log_batch` builds an ORM object per point and flushes them one by one
through SQLAlchemy's unit of work: about 100 µs a point on this project's VM, 96% of a sync
into sqlite, nearly all of it Python (in a profile of 20 000 points, sqlite's own statements
and commits were 0.52 s of 8.4 s). A request of metric points (with the cursor tag, or no tag)
is written here instead as the same rows in one transaction: the points with one INSERT
executed for all of them, then `latest_metrics` and the tags as the store updates them. The
tables are MLflow's own definitions and the session is the store's own (its PRAGMAs: foreign
keys, busy timeout), so the database holds afterwards what `log_batch` would have left in it
(tests/test_sqlite_rows.py compares the two after every request, row by row), and it is
MLflow's tooling that reads it. The cursor tag is committed in the same transaction as the
points it covers, where the store commits them apart.

What the store does per request and how it is done here:
- A point is stored once per (run, name, timestamp, step, value): NaN as 0 with `is_nan`,
  +-infinity as +-1.7976931348623157e308 (MLflow 3's `sanitize_metric_value`, which MLflow 2
  does inline). A point the run holds already, or an identical one earlier in the request, is
  left out by the INSERT (ON CONFLICT DO NOTHING), so a sync sending again what it stored past
  its cursor stays on this path. (MLflow's store fails on the primary key and looks the
  batch's points up; before MLflow 3.x's fix of that lookup, a stored NaN point was never
  found, and a request repeating one failed every time.)
- `latest_metrics` holds, per name, the point greatest by (step, timestamp, value) over
  everything logged, the earlier kept on a tie. Folding a stored point in again changes
  nothing: the row is already at least as great, and a tie keeps it.
- A tag's value is replaced, the last given in a request winning.

Everything else goes to MLflow's own `log_batch` (False is returned and nothing is written):
a request with params, a tag MLflow truncates or treats apart (`mlflow.runName` renames the
run), a name it refuses, a value that is not a number, a negative timestamp, a step outside
int64, and a run that is not active or does not exist (log_batch raises MLflow's error). The
caller keeps a request within MLflow's limits (1000 entities), as log_batch requires. Only
MLflow's `SqlAlchemyStore` on sqlite is written this way (compat.mlflow_sqlite_tables), where
sqlite's database lock serialises writers from a transaction's first write to its commit;
`ITWINAI_SYNC_SQLITE_ROWS=0` sends every request to `log_batch`.
"""

from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace
from typing import Any

from itwinai_sync import compat
from itwinai_sync.api import INT64_MAX, INT64_MIN

#: Set to 0 to send every request to MLflow's `SqlAlchemyStore.log_batch`.
ENV = "ITWINAI_SYNC_SQLITE_ROWS"
#: Names per `IN (...)` of a query, as MLflow's store chunks them: sqlite before 3.32 binds at
#: most 999 variables a statement.
_KEYS_PER_QUERY = 500


class SqliteRows:
    """Writes log_batch requests of metrics and tags into MLflow's sqlite store."""

    @classmethod
    def of(cls, store: Any) -> SqliteRows | None:
        """The writer for `store`, or None where requests go to its log_batch."""
        if os.environ.get(ENV, "1") == "0":
            return None
        tables = compat.mlflow_sqlite_tables(store)
        return cls(tables) if tables is not None else None

    def __init__(self, tables: SimpleNamespace):
        self.t = tables
        #: Names MLflow's validation accepted (a run has a handful).
        self._names: set[str] = set()

    def __call__(self, run_id: str, metrics: list[tuple[str, float, int, int]],
                 tags: list[Any]) -> bool:
        """Write the points (name, value, timestamp in ms, step) and tags of one request in
        one transaction; False, with nothing written, when MLflow's log_batch must take it."""
        from sqlalchemy import select
        from sqlalchemy.dialects.sqlite import insert
        from sqlalchemy.exc import IntegrityError

        if not (self._plain_tags(tags) and self._plain_points(metrics)):
            return False
        rows, latest = _rows(run_id, metrics)
        runs = self.t.runs
        with self.t.session() as session:
            try:
                if rows:  # first: sqlite's write lock is held from here to the commit
                    session.execute(insert(self.t.metrics).on_conflict_do_nothing(), rows)
                self._latest(session, run_id, latest)
                self._tags(session, run_id, {t.key: t.value for t in tags})
                # Last, so that it is read under the write lock a tags-only request takes too.
                stage = session.execute(select(runs.c.lifecycle_stage)
                                        .where(runs.c.run_uuid == run_id)).scalar()
            except IntegrityError:  # no such run (a foreign key), or a concurrent writer
                stage = None
            if stage != self.t.active:
                session.rollback()
                return False
        return True

    def _plain_points(self, metrics: list[tuple[str, float, int, int]]) -> bool:
        """Whether every point is one MLflow's validation accepts and sqlite can bind: a float
        or int64 value, a timestamp in [0, 2**63), an int64 step, a name MLflow takes."""
        for key, value, timestamp, step in metrics:
            if (type(timestamp) is not int or type(step) is not int
                    or not 0 <= timestamp <= INT64_MAX or not INT64_MIN <= step <= INT64_MAX
                    or not (type(value) is float
                            or type(value) is int and INT64_MIN <= value <= INT64_MAX)):
                return False
            if key not in self._names:
                if not compat.mlflow_accepts_metric_name(key):
                    return False
                self._names.add(key)
        return True

    @staticmethod
    def _plain_tags(tags: list[Any]) -> bool:
        """Whether MLflow's store would set every tag as given (see compat.mlflow_keeps_tag)."""
        return all(isinstance(t.key, str) and isinstance(t.value, str)
                   and compat.mlflow_keeps_tag(t.key, t.value) for t in tags)

    def _latest(self, session: Any, run_id: str,
                latest: dict[str, tuple[int, int, float, bool]]) -> None:
        """Fold the request's greatest point of each name into `latest_metrics`."""
        from sqlalchemy import insert, select

        table = self.t.latest_metrics
        query = select(table.c.key, table.c.step, table.c.timestamp, table.c.value)
        keys = list(latest)
        stored = {}
        for i in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[i:i + _KEYS_PER_QUERY]
            for row in session.execute(query.where(table.c.run_uuid == run_id,
                                                   table.c.key.in_(chunk))):
                stored[row.key] = (row.step, row.timestamp, row.value)
        new = []
        for key, (step, timestamp, value, is_nan) in latest.items():
            columns = {"step": step, "timestamp": timestamp, "value": value, "is_nan": is_nan}
            if key not in stored:
                new.append({"run_uuid": run_id, "key": key, **columns})
            elif (step, timestamp, value) > stored[key]:
                session.execute(table.update().where(table.c.run_uuid == run_id,
                                                     table.c.key == key).values(**columns))
        if new:
            session.execute(insert(table), new)

    def _tags(self, session: Any, run_id: str, tags: dict[str, str]) -> None:
        """Replace the values of the run's tags that exist, insert the others."""
        from sqlalchemy import insert

        table = self.t.tags
        new = []
        for key, value in tags.items():
            changed = session.execute(table.update().where(
                table.c.run_uuid == run_id, table.c.key == key).values(value=value))
            if not changed.rowcount:
                new.append({"run_uuid": run_id, "key": key, "value": value})
        if new:
            session.execute(insert(table), new)


def _rows(run_id: str, metrics: list[tuple[str, float, int, int]]
          ) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int, float, bool]]]:
    """The `metrics` rows of a request, and per name its greatest point by (step, timestamp,
    value), the earlier kept on a tie."""
    rows = []
    latest: dict[str, tuple[int, int, float, bool]] = {}
    for key, value, timestamp, step in metrics:
        is_nan = math.isnan(value)
        if is_nan:
            value = 0
        elif math.isinf(value):
            value = sys.float_info.max if value > 0 else -sys.float_info.max
        rows.append({"run_uuid": run_id, "key": key, "value": value, "timestamp": timestamp,
                     "step": step, "is_nan": is_nan})
        best = latest.get(key)
        if best is None or (step, timestamp, value) > best[:3]:
            latest[key] = (step, timestamp, value, is_nan)
    return rows, latest
