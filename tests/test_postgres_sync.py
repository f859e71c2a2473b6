"""Sync into a team's MLflow: an `mlflow server` backed by PostgreSQL, both on loopback and
started here. The ranks of a run are exported in parallel (`--workers`), and the cursor is
written once per batch of metrics rather than with every request (MLflow's SQL store keeps a
point sent twice once): every point must still be stored exactly once, after a clean sync and
after syncs killed at random moments."""

from __future__ import annotations

import math
import random
import sys
from collections import Counter

import pyarrow.compute as pc
import pytest
from conftest import spawn
from postgres_server import PostgresMlflowServer, PostgresServer
from test_fault_injection import (
    SEED,
    SYNC_CRASH_CHILD,
    check_mlflow_exact,
    cli,
    finish,
    kill_figures,
    kill_sync_repeatedly,
    last_seqs,
    ledger_progress,
    mlflow_cursor,
    mlflow_runs_of,
    procs,  # noqa: F401 - the fixture
    report,
    sync_command,
    sync_ok,
    write_journal,
)

from itwinai_journal import Journal
from itwinai_sync.targets.mlflow import TAG_CURSOR, BatchWriter, _sql_store

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("psycopg2")
MlflowClient = mlflow.MlflowClient


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    """A PostgreSQL cluster (in a directory of its own: PostgreSQL runs as its own user when
    the tests run as root) and an mlflow server with two workers on it."""
    with PostgresServer() as pg, PostgresMlflowServer(
            pg.uri, tmp_path_factory.mktemp("pg-mlflow"), workers=2) as server:
        server.pg = pg
        yield server


def test_the_stores_that_keep_a_repeated_point_once(pg_server, tmp_path):
    """The cursor may lag behind the points only where the store keeps a point sent again
    once: MLflow's SQL stores, directly or behind a server that says it has one."""
    assert _sql_store(pg_server.uri)
    assert _sql_store("postgresql+psycopg2://u@127.0.0.1:1/db")
    assert _sql_store(f"sqlite:///{tmp_path}/mlflow.db")
    assert not _sql_store(f"file://{tmp_path}/mlruns")
    assert not _sql_store(str(tmp_path / "mlruns"))
    assert not _sql_store("http://127.0.0.1:9")  # nothing answers: not known to dedupe


def test_ranks_in_parallel_each_point_once_cursor_per_batch(pg_server, tmp_path, monkeypatch):
    """8 ranks with --workers 4: one parent, a child per rank, every point, param and cursor
    exactly as in the journal. The requests of metrics alone go without the cursor, except the
    last of each batch; every request with params carries it."""
    savedir = tmp_path / "mllogs"
    experiment, run_id = "pg-parallel", "r8"
    # one segment a rank (the default segment holds 50 000 records): one batch for the sink
    write_journal(savedir, experiment, run_id, steps=3500, ranks=range(8), seal=20_000)
    requests: list[tuple[int, int, bool]] = []
    real = BatchWriter.__call__

    def counted(self, run_id, metrics, params, tags):
        assert self.rest  # the request body is built by the sync, not by MlflowClient
        requests.append((len(metrics), len(params), any(t.key == TAG_CURSOR for t in tags)))
        return real(self, run_id, metrics, params, tags)

    monkeypatch.setattr(BatchWriter, "__call__", counted)
    searches = []
    search_runs = MlflowClient.search_runs

    def counted_search(self, *args, **kwargs):
        searches.append(kwargs.get("filter_string"))
        return search_runs(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "search_runs", counted_search)
    out = sync_ok(savedir, "--to", "mlflow", "--tracking-uri", pg_server.uri, "--workers", "4")
    first_searches = list(searches)
    total = sum(last_seqs(savedir, run_id).values())
    assert f"exported {total} records" in out, out
    client = MlflowClient(pg_server.uri)
    figures = check_mlflow_exact(client, savedir, experiment, run_id)
    assert figures["records_checked"] == 8 * (3500 + 350)
    assert all(tagged for _, params, tagged in requests if params)
    # a rank: 3 850 points and 4 params in 4 requests of up to 1000 entities, the cursor one
    # of them; the first and the last hold params (the last the one logged at step 2999), the
    # 2 between metrics alone and no cursor
    assert Counter((bool(params), tagged) for _, params, tagged in requests) == {
        (True, True): 16, (False, False): 16}, requests
    # No search for runs in an experiment that does not exist yet; each new rank's run is
    # searched for once, to claim it; the parent twice (none found; claimed), and other
    # journals of the run key once.
    assert len(first_searches) == 8 + 2 + 1, first_searches
    searches.clear()
    code, out = cli(savedir, "--to", "mlflow", "--tracking-uri", pg_server.uri)
    resync_searches = list(searches)
    assert code == 0 and "up-to-date" in out and "exported 0 records" in out, out
    assert len(resync_searches) == 2, resync_searches  # the parent; the 8 ranks' runs at once
    assert check_mlflow_exact(client, savedir, experiment, run_id) == figures
    rows = pg_server.pg.psql("select count(*) from metrics m join runs r on m.run_uuid = "
                             "r.run_uuid where r.lifecycle_stage = 'active' and r.run_uuid in "
                             "(select run_uuid from tags where key = 'itwinai.run' and value = "
                             f"'{experiment}/{run_id}')")
    assert int(rows) == figures["records_checked"]  # in PostgreSQL itself, not only the API


def test_parallel_ranks_killed_then_exact(pg_server, tmp_path, procs):  # noqa: F811
    """`--workers 4` syncs of a 3-rank run SIGKILLed at random moments, while ranks are among
    requests sent without the cursor: the committed cursor never goes back (checked after each
    kill), and the final sync completes the run with each point once."""
    savedir, experiment, run_id = tmp_path / "mllogs", "pg-kill", "k3"
    # segments of 4 000 records: batches of 4 requests, 3 of them without the cursor
    write_journal(savedir, experiment, run_id, steps=4000, ranks=(0, 1, 2), seal=4000)
    total = sum(last_seqs(savedir, run_id).values())
    client = MlflowClient(pg_server.uri)
    target = ["--to", "mlflow", "--tracking-uri", pg_server.uri, "--workers", "4"]
    rng = random.Random(SEED + 19)
    # The first kill lands 1.5 to 4 s after the start, the others up to 1 s after a batch's
    # cursor was committed, among the next batch's requests (each under a second here).
    stats = kill_sync_repeatedly(
        sync_command(savedir, *target), procs, total=total, kills=4, rng=rng,
        first_delay=(1.5, 4.0), jitter=1.0, poll=0.02,
        committed=lambda: mlflow_cursor(client, experiment, run_id),
        progress=lambda: ledger_progress(savedir, experiment, run_id))
    sync_ok(savedir, *target)
    figures = check_mlflow_exact(client, savedir, experiment, run_id)
    code, out = cli(savedir, *target)
    assert code == 0 and "up-to-date" in out and "exported 0 records" in out, out
    report("SIGKILL of parallel-rank syncs to MLflow on PostgreSQL",
           **kill_figures(stats, total), cursors=stats.cursors, **figures)
    assert stats.kills + stats.exited_before_kill == 4
    runs = mlflow_runs_of(client, experiment, run_id)
    assert Counter(r.data.tags.get("itwinai.role") for r in runs) == {"parent": 1, "rank": 3}


CRASH_AMONG_UNTAGGED = """
from itwinai_sync.targets.mlflow import BatchWriter
real_log_batch = BatchWriter.__call__
untagged = [0]
def log_batch(self, run_id, metrics, params, tags):
    done = real_log_batch(self, run_id, metrics, params, tags)
    if metrics and not tags:
        untagged[0] += 1
        if untagged[0] == 5:
            os._exit(9)  # points stored past the cursor the store holds
    return done
BatchWriter.__call__ = log_batch
"""


def test_crash_among_requests_without_cursor_then_exact(pg_server, tmp_path, procs):  # noqa: F811
    """A sync that dies right after its fifth request sent without the cursor (forced here,
    in two ranks exported at once) leaves points in the store past the cursor; the next sync
    sends them again, and PostgreSQL holds each point once."""
    savedir, experiment, run_id = tmp_path / "mllogs", "pg-crash", "c2"
    write_journal(savedir, experiment, run_id, steps=5000, ranks=(0, 1), seal=20_000)
    target = [str(savedir), "--to", "mlflow", "--tracking-uri", pg_server.uri, "--workers", "2"]
    proc = spawn(SYNC_CRASH_CHILD.format(patch=CRASH_AMONG_UNTAGGED, args=target),
                 MLFLOW_DISABLE_TELEMETRY="true")
    procs.append(proc)
    _, err = finish(proc, 300)
    assert proc.returncode == 9, err
    client = MlflowClient(pg_server.uri)
    stored = covered = 0
    for child in mlflow_runs_of(client, experiment, run_id):
        if child.data.tags.get("itwinai.role") != "rank":
            continue
        rank, cursor = int(child.data.tags["itwinai.rank"]), int(child.data.tags[TAG_CURSOR])
        stored += sum(len(client.get_metric_history(child.info.run_id, key))
                      for key in child.data.metrics)
        covered += Journal(savedir).metrics(run_id=run_id, rank=rank).filter(
            pc.field("seq") <= cursor).num_rows
    assert stored > covered, (stored, covered)  # the crash left points past the cursor
    sync_ok(savedir, "--to", "mlflow", "--tracking-uri", pg_server.uri, "--workers", "2")
    figures = check_mlflow_exact(client, savedir, experiment, run_id)
    report("crash among requests without the cursor (PostgreSQL)",
           resent_points=stored - covered, **figures)


def test_request_bodies_store_what_mlflow_client_stores(pg_server):
    """The sync builds its log_batch requests to a server itself (BatchWriter) rather than
    through MlflowClient.log_batch: the same points, params and tags sent both ways into two
    runs of the server must be stored identically, down to the awkward doubles (NaN, infinities,
    -0.0, the largest and the smallest), int64 steps at both ends and non-ASCII names."""
    from mlflow.entities import Metric, Param, RunTag

    from itwinai_sync.targets.mlflow import BatchWriter

    client = MlflowClient(pg_server.uri)
    experiment_id = client.create_experiment("pg-bodies")
    values = [0.5, -0.0, math.nan, math.inf, -math.inf, sys.float_info.max,
              -sys.float_info.max, 5e-324, 1 / 3, 1e-300, 12345678901234567.0]
    steps = [0, 1, -5, 2**63 - 1, -(2**63), 7, 8, 9, 10, 11, 12]
    points = [(key, v, 1_700_000_000_000 + i, s) for key in ("loss", "välid/äcc 1")
              for i, (v, s) in enumerate(zip(values, steps))]
    params = [Param("lr", "0.001"), Param("name", "naïve ✓"), Param("empty", "")]
    tags = [RunTag("itwinai.cursor", "42"), RunTag("note", "ünïcode")]
    ours = client.create_run(experiment_id).info.run_id
    theirs = client.create_run(experiment_id).info.run_id
    writer = BatchWriter(client)
    assert writer.rest
    writer(ours, points, params, tags)
    client.log_batch(theirs, metrics=[Metric(*p) for p in points], params=params, tags=tags)

    def stored(run_id: str) -> tuple:
        run = client.get_run(run_id)
        history = {key: sorted((m.timestamp, m.step, repr(m.value))
                               for m in client.get_metric_history(run_id, key))
                   for key in ("loss", "välid/äcc 1")}
        own_tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        return history, run.data.params, own_tags, run.data.metrics

    assert stored(ours) == stored(theirs)
    history = stored(ours)[0]["loss"]
    assert len(history) == len(values)
    assert {v for _, _, v in history} >= {"nan", "5e-324", repr(sys.float_info.max)}
