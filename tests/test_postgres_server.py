"""Tests of PostgresServer / PostgresMlflowServer (need PostgreSQL binaries; the MLflow test also
needs psycopg2-binary in this interpreter, which runs the server)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import pytest
from postgres_server import (
    PostgresMlflowServer,
    PostgresServer,
    PostgresServerError,
    _alive,
    _children,
)


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(pid)


def _gone(procs: set[tuple[int, str]], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p, s) for p, s in procs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_starts_on_loopback_as_postgres_and_stops_everything() -> None:
    with PostgresServer() as pg:
        assert pg.uri == f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/mlflow"
        assert pg.psql("select current_database(), current_user").strip() == "mlflow|postgres"
        assert pg.psql("show listen_addresses").strip() == "127.0.0.1"
        assert pg.psql("show unix_socket_directories").strip() == ""
        hba = [line for line in (pg.datadir / "pg_hba.conf").read_text().splitlines()
               if line and not line.startswith("#")]
        assert hba == ["host all all 127.0.0.1/32 trust"]
        if os.geteuid() == 0:
            assert _uid(pg.pid) == _uid_of("postgres")
        with socket.create_connection(("127.0.0.1", pg.port), timeout=2):
            pass
        procs = _children(pg.pid) | {(pg.pid, "")}
        assert len(procs) >= 4  # checkpointer, background writer, walwriter, ... + postmaster
        workdir, postmaster = pg.workdir, pg.pid
    assert not workdir.exists()
    assert not _alive(postmaster)
    assert _gone({(p, s) for p, s in procs if s})


def test_stop_after_the_postmaster_was_killed() -> None:
    """A crashed postmaster leaves its children: stop() still ends them all."""
    with PostgresServer() as pg:
        pg.psql("select 1")
        children = _children(pg.pid)
        os.kill(pg.pid, signal.SIGKILL)
        time.sleep(0.2)
    assert _gone(children)


def test_port_in_use_is_reported() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(PostgresServerError, match="(?i)address already in use|not ready"):
            with PostgresServer(port=busy.getsockname()[1], startup_timeout=10):
                pass


@pytest.mark.skipif(os.geteuid() != 0, reason="only root must hand the directory to postgres")
def test_unreachable_workdir_is_a_clear_error() -> None:
    private = Path(tempfile.mkdtemp())  # mode 0700, owned by root: postgres cannot enter it
    try:
        with pytest.raises(PostgresServerError, match="cannot enter"):
            PostgresServer(private / "pg").start()
    finally:
        shutil.rmtree(private)


def test_mlflow_server_on_postgres_stores_in_postgres() -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    with PostgresServer() as pg, PostgresMlflowServer(pg.uri, workers=2) as server:
        assert "--workers" in server.command(1) and server.command(1)[
            server.command(1).index("--workers") + 1] == "2"
        client = MlflowClient(server.uri)
        run = client.create_run(client.create_experiment("e"))
        points = [Metric("loss", 1.0 / (i + 1), 1000 + i, i) for i in range(500)]
        client.log_batch(run.info.run_id, metrics=points)
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(i, 1.0 / (i + 1)) for i in range(500)]
        count = pg.psql(f"select count(*) from metrics where run_uuid = '{run.info.run_id}'")
        assert int(count) == 500
        mlflow_pid = server.pid
    assert not _alive(mlflow_pid)


def _uid_of(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid
