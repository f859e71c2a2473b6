"""A log_batch request into MLflow's sqlite store, written as the rows MLflow's store writes.

`SqlAlchemyStore.log_batch` builds an ORM object per point and flushes them one by one
through SQLAlchemy's unit of work: about 100 µs a point on this project's VM, 96% of a sync
into sqlite, nearly all of it Python (in a profile of 20 000 points, sqlite's own statements
and commits were 0.52 s of 8.4 s). A request of metric points (with the cursor tag, or no tag)
is written here instead as the same rows in one transaction: the points with one INSERT
executed for all of them, then `latest_metrics` and the tags as the store updates them. The
tables are MLflow's own definitions and the session is the store's own (its PRAGMAs: foreign
keys, busy timeout), so the database holds afterwards what `log_batch` would have left in it
(tests/test_sqlite_rows.py compares the two, row by row), and it is MLflow's tooling that
reads it. The cursor tag is committed in the same transaction as the points it covers, where
the store commits them apart.

What the store does per request and how it is done here:
- A point is stored once per (run, name, timestamp, step, value): NaN as 0 with `is_nan`,
  +-infinity as +-1.7976931348623157e308, the first of identical points in a request kept.
- `latest_metrics` holds, per name, the point greatest by (step, timestamp, value) over
  everything logged, the earlier kept on a tie.
- A tag's value is replaced, the last given in a request winning.

Everything else goes to MLflow's own `log_batch` (False is returned and nothing is written):
a request with params, a tag MLflow would truncate or treats apart, a name it refuses, a
value that is not a number, a negative timestamp, a step outside int64, a run that is not
active (log_batch raises MLflow's error), and a point the run already holds, which fails on
the primary key and is rolled back (log_batch keeps what is stored and adds the rest, as it
does for any repeated point). Only MLflow's `SqlAlchemyStore` on sqlite is written this way
(compat.mlflow_sqlite_tables), where sqlite's database lock serialises writers from the first
INSERT to the commit; `ITWINAI_SYNC_SQLITE_ROWS=0` sends every request to `log_batch`.
"""

from __future__ import annotations

import math
import os
from typing import Any

from itwinai_sync import compat

#: Set to 0 to send every request to MLflow's `SqlAlchemyStore.log_batch`.
ENV = "ITWINAI_SYNC_SQLITE_ROWS"
#: What MLflow's SQL store stores for +-infinity (a double SQL can hold).
_MAX_DOUBLE = 1.7976931348623157e308
#: The longest tag value MLflow stores untruncated in every tested version.
_MAX_TAG_VALUE = 5000
_INT64 = (-(2**63), 2**63 - 1)


class SqliteRows:
    """Writes log_batch requests of metrics and tags into one run's MLflow sqlite store."""

    @classmethod
    def of(cls, store: Any) -> SqliteRows | None:
        """The writer for `store`, or None where requests go to its log_batch."""
        if os.environ.get(ENV, "1") == "0":
            return None
        tables = compat.mlflow_sqlite_tables(store)
        return cls(tables) if tables is not None else None

    def __init__(self, tables: Any):
        self.t = tables
        #: Names MLflow's validation accepted (a run has a handful).
        self._names: set[str] = set()

    def __call__(self, run_id: str, metrics: list[tuple[str, float, int, int]],
                 tags: list[Any]) -> bool:
        """Write the points (name, value, timestamp in ms, step) and tags of one request in
        one transaction; False, with nothing written, when MLflow's log_batch must take it."""
        from sqlalchemy import insert, select
        from sqlalchemy.exc import IntegrityError

        if not (self._plain_tags(tags) and self._plain_points(metrics)):
            return False
        rows, latest = _rows(run_id, metrics)
        runs = self.t.runs
        with self.t.session() as session:
            try:
                if rows:  # first: sqlite's write lock is held from here to the commit
                    session.execute(insert(self.t.metrics), rows)
                stage = session.execute(select(runs.c.lifecycle_stage)
                                        .where(runs.c.run_uuid == run_id)).scalar()
                if stage != "active":
                    session.rollback()
                    return False
                self._latest(session, run_id, latest)
                self._tags(session, run_id, {t.key: t.value for t in tags})
            except IntegrityError:
                session.rollback()
                return False
        return True

    def _plain_points(self, metrics: list[tuple[str, float, int, int]]) -> bool:
        """Whether every point is one MLflow's validation accepts and sqlite can bind: a float
        or int64 value, a timestamp in [0, 2**63), an int64 step, a name MLflow takes."""
        lo, hi = _INT64
        for key, value, timestamp, step in metrics:
            if (type(timestamp) is not int or type(step) is not int
                    or not 0 <= timestamp <= hi or not lo <= step <= hi
                    or not (type(value) is float or type(value) is int and lo <= value <= hi)):
                return False
            if key not in self._names:
                if not compat.mlflow_accepts_metric_name(key):
                    return False
                self._names.add(key)
        return True

    @staticmethod
    def _plain_tags(tags: list[Any]) -> bool:
        return all(len(t.value) <= _MAX_TAG_VALUE and compat.mlflow_accepts_tag(t.key, t.value)
                   for t in tags)

    def _latest(self, session: Any, run_id: str,
                latest: dict[str, tuple[int, int, float, bool]]) -> None:
        """Fold the request's greatest point of each name into `latest_metrics`."""
        from sqlalchemy import insert, select

        if not latest:
            return
        table = self.t.latest
        stored = {row.key: (row.step, row.timestamp, row.value) for row in session.execute(
            select(table.c.key, table.c.step, table.c.timestamp, table.c.value)
            .where(table.c.run_uuid == run_id, table.c.key.in_(list(latest))))}
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
        from sqlalchemy import insert, select

        if not tags:
            return
        table = self.t.tags
        stored = set(session.execute(select(table.c.key).where(
            table.c.run_uuid == run_id, table.c.key.in_(list(tags)))).scalars())
        for key in stored:
            session.execute(table.update().where(table.c.run_uuid == run_id, table.c.key == key)
                            .values(value=tags[key]))
        new = [{"run_uuid": run_id, "key": k, "value": v} for k, v in tags.items()
               if k not in stored]
        if new:
            session.execute(insert(table), new)


def _rows(run_id: str, metrics: list[tuple[str, float, int, int]]
          ) -> tuple[list[dict[str, Any]], dict[str, tuple[int, int, float, bool]]]:
    """The `metrics` rows of a request (the first of identical points), and per name its
    greatest point by (step, timestamp, value), the earlier kept on a tie."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    latest: dict[str, tuple[int, int, float, bool]] = {}
    for key, value, timestamp, step in metrics:
        is_nan = math.isnan(value)
        if is_nan:
            value = 0
        elif math.isinf(value):
            value = _MAX_DOUBLE if value > 0 else -_MAX_DOUBLE
        identity = (key, timestamp, step, value, is_nan)
        if identity not in rows:
            rows[identity] = {"run_uuid": run_id, "key": key, "value": value,
                              "timestamp": timestamp, "step": step, "is_nan": is_nan}
        best = latest.get(key)
        if best is None or (step, timestamp, value) > best[:3]:
            latest[key] = (step, timestamp, value, is_nan)
    return list(rows.values()), latest
