"""MLflow's sqlite store written as the rows its log_batch writes (targets/sqlite_rows.py): the
same requests sent through it and through MLflow's own `log_batch` leave the same rows in two
databases; what it does not take goes to log_batch, with nothing written by it; a sync into
the embedded store goes through it and is exact, also after a kill."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import child_env
from test_mlflow_export import assert_histories_equal_journal, sync, write_journal

from itwinai_sync import compat
from itwinai_sync.targets import sqlite_rows
from itwinai_sync.targets.mlflow import TAG_CURSOR, BatchWriter

os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: E402
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH  # noqa: E402

T0 = 1_700_000_000_000
AWKWARD = [0.5, -0.0, 0.0, math.nan, math.inf, -math.inf, sys.float_info.max,
           -sys.float_info.max, 5e-324, 1 / 3, 1e-300, 12345678901234567.0]
STEPS = [0, 1, -5, 2**63 - 1, -(2**63), 7, 8, 9, 10, 11, 12, 3]


def requests() -> list[tuple[list[tuple[str, float, int, int]], list[RunTag]]]:
    """Requests of (points, tags) that exercise every rule the store applies: awkward doubles,
    int64 steps at both ends, timestamp 0, non-ASCII names, identical points in a request
    (NaN twice, 0.0 and -0.0), a NaN and a 0.0 at the same step and time (a tie for the latest
    value, in one request and across two), values at one step and time (the greatest is the
    latest), the latest value moving forward, backward and staying, a tag given twice, a tag
    replaced, and points the run already holds (a NaN among them)."""
    first = [(key, v, T0 + i, s) for key in ("loss", "välid/äcc 1")
             for i, (v, s) in enumerate(zip(AWKWARD, STEPS))]
    dupes = [("dup", math.nan, T0, 4), ("dup", math.nan, T0, 4), ("dup", 0.0, T0, 4),
             ("dup", -0.0, T0, 4), ("dup", 2.0, 0, 4), ("dup", 2.0, 0, 4),
             ("tie", math.nan, T0, 4), ("tie", 0.0, T0, 4), ("tie2", math.nan, T0, 4),
             ("v", 1.0, T0, 1), ("v", 3.0, T0, 1), ("v", 2.0, T0, 1)]
    later = [("loss", 9.0, T0 + 100, 5), ("loss", 1.0, T0 + 100, 2**63 - 1),
             ("loss", 0.0, T0 + 101, 2**63 - 1), ("new", -1.0, T0, -3), ("new", -2.0, T0, -3),
             ("tie2", 0.0, T0, 4), ("v", 2.5, T0, 1)]
    older = [("loss", 8.0, T0, -1), ("new", -3.0, T0 - 1, -3), ("dup", math.nan, T0 + 1, 4),
             ("v", 4.0, T0, 1)]
    return [
        (first, [RunTag(TAG_CURSOR, "24")]),
        (dupes, [RunTag(TAG_CURSOR, "25"), RunTag("other", "ä"), RunTag(TAG_CURSOR, "30")]),
        (later, []),
        (older, [RunTag(TAG_CURSOR, "40")]),
        ([], [RunTag(TAG_CURSOR, "41")]),
        (later[:3] + dupes[:2] + [("fresh", 1.0, T0, 0)],  # resent in part
         [RunTag(TAG_CURSOR, "41"), RunTag(TAG_CURSOR, "42")]),
    ]


def dump(db: Path, run_id: str) -> dict[str, list[tuple]]:
    """Every row a run has in the tables log_batch writes, in a comparable order (doubles by
    repr, so -0.0 and the subnormals are told apart)."""
    with sqlite3.connect(db) as con:
        def rows(sql: str) -> list[tuple]:
            return sorted(tuple(repr(c) if isinstance(c, float) else c for c in row)
                          for row in con.execute(sql, (run_id,)))
        return {"metrics": rows("SELECT key, value, timestamp, step, is_nan FROM metrics "
                                "WHERE run_uuid = ?"),
                "latest": rows("SELECT key, value, timestamp, step, is_nan FROM latest_metrics "
                               "WHERE run_uuid = ?"),
                "tags": rows("SELECT key, value FROM tags WHERE run_uuid = ? "
                             "AND key NOT LIKE 'mlflow.%'")}


def new_run(tmp_path: Path, name: str) -> tuple[Path, mlflow.MlflowClient, str]:
    db = tmp_path / name / "mlflow.db"
    db.parent.mkdir()
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    return db, client, client.create_run(client.create_experiment("rows")).info.run_id


@pytest.fixture
def store_calls(monkeypatch):
    """The requests MLflow's own SqlAlchemyStore.log_batch took, as (points, params, tags)."""
    calls: list[tuple[int, int, int]] = []
    real = SqlAlchemyStore.log_batch

    def counted(self, run_id, metrics, params, tags):
        calls.append((len(metrics), len(params), len(tags)))
        return real(self, run_id, metrics, params, tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", counted)
    return calls


def test_the_rows_are_those_mlflow_log_batch_writes(tmp_path, store_calls):
    """The same requests, one by one, through sqlite_rows and through MLflow's own log_batch:
    after each, the two runs' rows are the same."""
    ours_db, ours_client, ours = new_run(tmp_path, "ours")
    theirs_db, theirs_client, theirs = new_run(tmp_path, "theirs")
    writer = BatchWriter(ours_client)
    assert writer.rows is not None
    for points, tags in requests():
        writer(ours, points, [], tags)
        assert store_calls == []  # all written as rows, also the points stored already
        theirs_client.log_batch(theirs, metrics=[Metric(*p) for p in points], tags=tags)
        store_calls.clear()
        assert dump(ours_db, ours) == dump(theirs_db, theirs), (points, tags)

    # The rules were exercised, not just agreed on.
    rows = dump(ours_db, ours)
    dup = [r for r in rows["metrics"] if r[0] == "dup"]
    assert dup == sorted([("dup", "0.0", T0, 4, 1), ("dup", "0.0", T0, 4, 0),
                          ("dup", "2.0", 0, 4, 0), ("dup", "0.0", T0 + 1, 4, 1)])
    assert len(rows["metrics"]) == 2 * len(AWKWARD) + 9 + 7 + 4 + 1
    assert ("loss", "0.0", T0 + 101, 2**63 - 1, 0) in rows["latest"]
    assert ("new", "-1.0", T0, -3, 0) in rows["latest"]  # -2.0 and -3.0 are smaller
    assert ("dup", "0.0", T0 + 1, 4, 1) in rows["latest"]
    assert ("v", "4.0", T0, 1, 0) in rows["latest"]
    # A NaN is stored as 0: a 0.0 at its step and time ties with it, and the earlier stays.
    assert {("tie", "0.0", T0, 4, 1), ("tie2", "0.0", T0, 4, 1)} <= set(rows["latest"])
    assert rows["tags"] == [(TAG_CURSOR, "42"), ("other", "ä")]
    # And MLflow reads them back as it reads its own.
    for key in ("loss", "välid/äcc 1", "dup", "new", "fresh", "tie", "tie2", "v"):
        assert (sorted(repr((m.timestamp, m.step, m.value))
                       for m in ours_client.get_metric_history(ours, key))
                == sorted(repr((m.timestamp, m.step, m.value))
                          for m in theirs_client.get_metric_history(theirs, key)))


def test_a_request_of_many_names_binds_what_old_sqlite_binds(tmp_path, store_calls):
    """999 names in one request, on a connection limited to 999 variables a statement (the
    default of sqlite before 3.32): written as rows, as log_batch writes them."""
    from sqlalchemy import event

    _, client, run_id = new_run(tmp_path, "names")
    writer = BatchWriter(client)

    @event.listens_for(writer.store.engine, "connect")
    def limit(connection, _):
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    writer.store.engine.dispose()
    writer(run_id, [(f"layer{i}/grad_norm", float(i), T0, 0) for i in range(999)], [],
           [RunTag(TAG_CURSOR, "999")])
    assert store_calls == []
    assert client.get_run(run_id).data.metrics == {f"layer{i}/grad_norm": float(i)
                                                   for i in range(999)}


def test_what_it_does_not_take_goes_to_log_batch_untouched(tmp_path, store_calls, monkeypatch):
    """Params, a name MLflow refuses (its characters, its length), a negative timestamp, a
    value that is not a number, a step outside int64, a tag MLflow would truncate or treats
    apart, and a run that is not active go to MLflow's log_batch (which stores, or raises its
    own error), with nothing written by sqlite_rows first."""
    db, client, run_id = new_run(tmp_path, "store")
    writer = BatchWriter(client)
    writer(run_id, [("a", 1.0, T0, 0)], [Param("lr", "0.1")], [RunTag(TAG_CURSOR, "1")])
    assert store_calls == [(1, 1, 1)]
    for tag in (RunTag("long", "x" * (MAX_TAG_VAL_LENGTH + 1)), RunTag("mlflow.runName", "b"),
                RunTag("none", None)):
        assert writer.rows(run_id, [("b", 1.0, T0, 0)], [tag]) is False
    for refused in ([("../up", 1.0, T0, 0)], [("x" * 251, 1.0, T0, 0)], [("a", 1.0, -1, 0)],
                    [("a", True, T0, 0)], [("a", 1.0, T0, 2**63)], [("a", None, T0, 0)]):
        assert writer.rows(run_id, refused, []) is False
        with pytest.raises(MlflowException):
            writer(run_id, refused, [], [])
    client.delete_run(run_id)
    assert writer.rows(run_id, [("c", 1.0, T0, 0)], [RunTag(TAG_CURSOR, "2")]) is False
    with pytest.raises(MlflowException, match="active"):
        writer(run_id, [("c", 1.0, T0, 0)], [], [RunTag(TAG_CURSOR, "2")])
    assert dump(db, run_id) == {"metrics": [("a", "1.0", T0, 0, 0)],
                                "latest": [("a", "1.0", T0, 0, 0)],
                                "tags": [(TAG_CURSOR, "1")]}
    monkeypatch.setenv(sqlite_rows.ENV, "0")
    assert BatchWriter(client).rows is None


def test_only_mlflows_sqlite_store_is_written_as_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    file_store = mlflow.MlflowClient(f"file://{tmp_path / 'mlruns'}")
    assert BatchWriter(file_store).rows is None
    sqlite = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    assert BatchWriter(sqlite).rows is not None
    # An MLflow whose tables have other columns than the ones written here: log_batch.
    columns = {**compat._MLFLOW_COLUMNS, "metrics": compat._MLFLOW_COLUMNS["metrics"] | {"new"}}
    monkeypatch.setattr(compat, "_MLFLOW_COLUMNS", columns)
    assert BatchWriter(sqlite).rows is None


def test_a_sync_into_the_embedded_store_writes_rows_and_is_exact(tmp_path, store_calls):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=2500, ranks=(0, 1))
    sync(savedir)
    client = mlflow.MlflowClient(f"sqlite:///{savedir / 'mlflow.db'}")
    assert_histories_equal_journal(client, savedir)
    # Only each rank's request with the params (save_hyperparameters) went to log_batch.
    assert [params for _, params, _ in store_calls] == [3, 3]
    sync(savedir)  # nothing to do
    assert_histories_equal_journal(client, savedir)


#: A sync whose cursor is written only at the end of a batch of a million records, so that a
#: kill mid-way leaves points stored past the cursor.
LONG_BATCHES = ("import sys; from itwinai_sync.targets.mlflow import MlflowExporter; "
                "MlflowExporter.batch_records = 1_000_000; from itwinai_sync.cli import main; "
                "sys.exit(main())")


def test_killed_mid_sync_then_rerun_is_exact(tmp_path, store_calls, monkeypatch):
    """SIGKILL while a rank's rows are written, past its cursor, then a full sync: every point
    once. The rerun sends again, as rows, what was stored past the cursor, and the INSERT
    leaves those points out."""
    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=200_000)  # 220 000 points
    db = savedir / "mlflow.db"
    proc = subprocess.Popen([sys.executable, "-c", LONG_BATCHES, str(savedir), "--to", "mlflow"],
                            env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    stored, deadline = 0, time.monotonic() + 120
    while stored < 5000 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            # read-only: a connection must not create the file the sync is about to create
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
                stored = con.execute("SELECT count(*) FROM metrics").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet, or locked
            pass
    assert proc.poll() is None, "the sync ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as con:
        killed_at = con.execute("SELECT count(*) FROM metrics").fetchone()[0]
        (cursor,), = con.execute("SELECT value FROM tags WHERE key = ?", (TAG_CURSOR,))
    # The cursor covers the first request only (the one with the params, which carries it).
    assert 5000 <= killed_at < 200_000 and int(cursor) < 1010
    as_rows = []
    real = sqlite_rows.SqliteRows.__call__

    def counted(self, run_id, metrics, tags):
        written = real(self, run_id, metrics, tags)
        as_rows.append(len(metrics) if written else 0)
        return written

    monkeypatch.setattr(sqlite_rows.SqliteRows, "__call__", counted)
    sync(savedir)
    with sqlite3.connect(db) as con:
        total = con.execute("SELECT count(*) FROM metrics").fetchone()[0]
    assert total == 220_000
    # Everything past the cursor (the first request) was sent again, as rows, and stored once.
    assert store_calls == []
    assert sum(as_rows) - (total - killed_at) > killed_at - 1000
    assert_histories_equal_journal(mlflow.MlflowClient(f"sqlite:///{db}"), savedir)
