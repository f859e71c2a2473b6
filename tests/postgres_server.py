"""Run a throw-away PostgreSQL on loopback for tests and benchmarks that need a SQL server.

Usage::

    with PostgresServer() as pg, PostgresMlflowServer(pg.uri, workers=2) as server:
        pg.uri        # postgresql+psycopg2://postgres@127.0.0.1:<port>/mlflow
        server.uri    # http://127.0.0.1:<port>
        pg.psql("select count(*) from metrics")

What it does, and why:

* ``initdb`` a fresh cluster into a new temporary directory (``--auth=trust``, UTF8, C locale,
  ``--no-sync``: nothing of it must survive the test) and replace ``pg_hba.conf`` with one line,
  ``host all all 127.0.0.1/32 trust``: no unix socket, no IPv6, no other client.
* Run ``postgres`` itself (not ``pg_ctl start``, which detaches the postmaster into a session of
  its own and exits) with ``start_new_session=True``, so that we hold the postmaster's pid, as
  ``MlflowServer`` holds uvicorn's. Unlike uvicorn's workers, every child of the postmaster
  (checkpointer, walwriter, one backend per connection) calls ``setsid()`` and leads a session
  of its own: killing the postmaster's group does not reach them. ``stop()`` therefore notes the
  children (pid and start time, from /proc) before it stops the server and signals each one
  still alive afterwards (they also exit by themselves once they see the postmaster gone).
  ``listen_addresses=127.0.0.1``, ``unix_socket_directories=''`` (the Debian default
  ``/var/run/postgresql`` may not exist or be writable), a free port (retried when taken).
* PostgreSQL refuses to run as root. When this process is root (CI), every PostgreSQL program
  runs as the ``postgres`` user (``Popen(user=, group=, extra_groups=[])``, no ``runuser``
  needed), the data directory is created by us and chowned to that user, and the directories
  above it are checked to be traversable by it (a pytest ``tmp_path`` below ``/tmp/pytest-of-root``
  is mode 0700 and is not: a clear error then, rather than initdb's "could not access"). As any
  other user, everything runs as that user.
* The database ``mlflow`` is created with ``createdb`` over TCP; readiness is ``pg_isready``.
  No Python driver is needed here; the process that talks to the database (``mlflow server``)
  needs the driver named in :attr:`PostgresServer.uri` (``psycopg2-binary`` by default).
* ``stop()``: ``pg_ctl stop -m fast -w`` (rolls back open transactions, checkpoints, exits), then
  SIGTERM/SIGKILL to whatever is left in the process group. Idempotent.

The binaries are taken from ``PG_BINDIR``, else ``/usr/lib/postgresql/15/bin``, else
``pg_config --bindir``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mlflow_server import MlflowServer, start_on_a_port

__all__ = ["PostgresMlflowServer", "PostgresServer", "PostgresServerError", "find_bindir"]

DEFAULT_BINDIR = Path("/usr/lib/postgresql/15/bin")
#: Settings for a disposable cluster: small, loopback only, no unix socket. Durability stays as
#: a real server has it (fsync, synchronous_commit on) so that commit costs are realistic;
#: pass ``settings={"synchronous_commit": "off"}`` for a faster, less faithful store.
BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "100",
    "shared_buffers": "64MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class PostgresServerError(RuntimeError):
    """The cluster could not be created or started (the message ends with its log's tail)."""


def find_bindir() -> Path:
    """The directory holding initdb, postgres, pg_ctl, pg_isready and createdb."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    if (DEFAULT_BINDIR / "postgres").is_file():
        return DEFAULT_BINDIR
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    raise PostgresServerError("PostgreSQL binaries not found: set PG_BINDIR or install "
                              "postgresql (e.g. /usr/lib/postgresql/15/bin)")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), or None."""
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return st[st.rfind(")") + 2:].split()


def _children(pid: int) -> set[tuple[int, str]]:
    """(pid, start time) of the live children of ``pid``. PostgreSQL's children each call
    setsid(), so the postmaster's process group holds the postmaster alone: its children
    (checkpointer, walwriter, backends) are found by parent and stopped one by one."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.add((int(entry.name), fields[19]))
    return found


def _alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` is a live process (the same one, when its start time is given)."""
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X") and (started in (None, fields[19]))


def _traversable_by(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory from ``/`` down to ``path`` that ``uid``/``gid`` cannot enter."""
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return d
    return None


class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1; :attr:`uri` is valid inside the ``with``."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        database: str = "mlflow",
        driver: str = "psycopg2",
        host: str = "127.0.0.1",
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        run_as: str = "postgres",
        startup_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        keep_workdir: bool = False,
    ) -> None:
        """Configure (but do not start) the cluster.

        Args:
            workdir: Directory for ``data/`` (the cluster) and ``postgres.log``. ``None``: a new
                temporary directory, removed on exit. A given directory must be enterable by
                ``run_as`` when this process is root.
            database: Database created after start-up (the path of :attr:`uri`).
            driver: SQLAlchemy driver named in :attr:`uri` (``psycopg2`` or ``psycopg``).
            host: Loopback address to listen on (``127.x.y.z`` only).
            port: TCP port; ``None`` picks a free one (retried when taken meanwhile).
            settings: Extra ``postgres -c name=value`` settings, over :data:`BASE_SETTINGS`.
            run_as: User that runs PostgreSQL when this process is root.
            startup_timeout: Seconds for the server to accept connections.
            stop_timeout: Seconds for ``pg_ctl stop -m fast`` before the group is killed.
            keep_workdir: Keep an auto-created ``workdir`` after exit.
        """
        if not host.startswith("127."):
            raise ValueError(f"PostgresServer only listens on loopback, not {host!r}")
        self.bindir = find_bindir()
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pg-server-")).resolve()
        self.database = database
        self.driver = driver
        self.host = host
        self.settings = {**BASE_SETTINGS, "listen_addresses": host, **(settings or {})}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.keep_workdir = keep_workdir
        self._requested_port = port
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._user: pwd.struct_passwd | None = pwd.getpwnam(run_as) if os.geteuid() == 0 else None

    # -- locations ---------------------------------------------------------------------------

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    @property
    def uri(self) -> str:
        """SQLAlchemy URI of the database (user ``postgres``, trust auth, no password), naming
        the driver: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3
        (sqlalchemy/dialects/postgresql/__init__.py:99), not to psycopg2."""
        if self.port is None:
            raise RuntimeError("PostgresServer is not started")
        return (f"postgresql+{self.driver}://postgres@{self.host}:{self.port}/"
                f"{self.database}")

    @property
    def pid(self) -> int | None:
        """Pid of the postmaster, also the process group id of all its backends."""
        return None if self._proc is None else self._proc.pid

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            self._remove_owned_workdir()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        self._remove_owned_workdir()

    def _remove_owned_workdir(self) -> None:
        if self._owns_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _as_user(self) -> dict[str, object]:
        """Popen arguments that drop root to ``run_as`` (none when not root)."""
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", TZ="UTC", PGUSER="postgres", PGCONNECT_TIMEOUT="5")
        if self._user is not None:
            env.update(HOME=str(self.workdir), USER=self._user.pw_name,
                       LOGNAME=self._user.pw_name)
        return env

    def _run(self, args: Sequence[str], timeout: float = 120.0) -> str:
        """Run a PostgreSQL program to completion (as ``run_as`` when root)."""
        done = subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.workdir,
                              env=self._env(), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, **self._as_user())  # type: ignore[call-overload]
        if done.returncode != 0:
            raise PostgresServerError(f"{args[0]} failed ({done.returncode}): "
                                      f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done.stdout

    def _prepare(self) -> None:
        """Create the workdir (owned by ``run_as`` when root) and the cluster in it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            uid, gid = self._user.pw_uid, self._user.pw_gid
            os.chown(self.workdir, uid, gid)
            blocked = _traversable_by(self.workdir, uid, gid)
            if blocked is not None:
                raise PostgresServerError(
                    f"{self.workdir}: user {self._user.pw_name!r} cannot enter {blocked} "
                    f"(mode {stat.filemode(blocked.stat().st_mode)}); PostgreSQL refuses to run "
                    "as root, so its directory must be reachable by that user: use workdir=None "
                    "(a new directory in the system temp dir)")
        os.chmod(self.workdir, 0o700)
        self._run(["initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                   "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"])
        (self.datadir / "pg_hba.conf").write_text(
            "# written by PostgresServer: TCP from loopback only, no password\n"
            f"host all all {self.host}/32 trust\n")

    def start(self) -> None:
        """Create the cluster, start it, wait until it accepts connections, create the database.

        Raises:
            PostgresServerError: When a step fails; what was started is stopped again.
        """
        if self._proc is not None:
            raise RuntimeError("PostgresServer is already started")
        if not (self.datadir / "PG_VERSION").exists():
            self._prepare()
        start_on_a_port(self, self._wait_ready, PostgresServerError)
        try:
            self._run(["createdb", "-h", self.host, "-p", str(self.port), "-U", "postgres",
                       self.database])
        except PostgresServerError:
            self.stop()
            raise

    def _spawn(self, port: int) -> None:
        args = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(port)]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        with self.log_path.open("ab") as log:
            if self._user is not None:
                os.chown(self.log_path, self._user.pw_uid, self._user.pw_gid)
            log.write(f"\n=== PostgresServer starting on port {port} ===\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args, cwd=self.workdir, env=self._env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                **self._as_user())  # type: ignore[call-overload]
        self.port = port

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise PostgresServerError(f"postgres exited with code {code} during start-up\n"
                                          f"--- log (tail) ---\n{self.log_tail()}")
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port),
                 "-t", "2"], env=self._env(), stdin=subprocess.DEVNULL, check=False)
            if ready.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise PostgresServerError(
                    f"postgres on {self.host}:{self.port} not ready after "
                    f"{self.startup_timeout:g} s\n--- log (tail) ---\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; then SIGTERM, and SIGKILL, to the postmaster and to each of
        its children (each in a session of its own) that is left. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        children = _children(proc.pid)
        try:
            if proc.poll() is None:
                try:
                    self._run(["pg_ctl", "stop", "-D", str(self.datadir), "-m", "fast", "-w",
                               "-t", str(int(self.stop_timeout))], timeout=self.stop_timeout + 5)
                except (PostgresServerError, subprocess.TimeoutExpired):
                    pass  # killed below
            for sig, wait in ((None, 2.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
                left = [pid for pid, started in children if _alive(pid, started)]
                if proc.poll() is None:
                    left.append(proc.pid)
                for pid in left if sig is not None else ():
                    try:
                        (os.killpg if pid == proc.pid else os.kill)(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and (
                        proc.poll() is None or any(_alive(p, s) for p, s in children)):
                    time.sleep(0.05)
                if proc.poll() is not None and not any(_alive(p, s) for p, s in children):
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            self._proc = None

    # -- diagnostics -------------------------------------------------------------------------

    def psql(self, sql: str) -> str:
        """Run ``sql`` with psql (unaligned, tuples only) and return its output."""
        return self._run(["psql", "-h", self.host, "-p", str(self.port), "-U", "postgres",
                          "-d", self.database, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                          "-c", sql])

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        where = f"{self.host}:{self.port}" if self.port is not None else "not started"
        return f"PostgresServer({where}, workdir={str(self.workdir)!r})"


class PostgresMlflowServer(MlflowServer):
    """``MlflowServer`` (tests/mlflow_server.py) on a PostgreSQL backend.

    Everything else is MlflowServer's: own session, ``hermetic_mlflow_env()`` (telemetry off,
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``, the caller's tracking variables removed),
    ``/health`` polling, proxied artifacts in ``workdir``. The interpreter running it (the one
    beside ``sys.executable``'s ``mlflow``) needs the driver the URI names (``psycopg2-binary``
    for ``postgresql+psycopg2://``; a bare ``postgresql://`` means psycopg 3 in SQLAlchemy 2.1).
    The ``mlflow server`` process creates the schema (alembic migrations, a few seconds on an
    empty database) before it spawns the uvicorn workers (``initialize_backend_stores``,
    mlflow/cli/__init__.py:709), so workers never race on it.
    """

    def __init__(self, backend_uri: str, workdir: str | os.PathLike[str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self._backend_uri = backend_uri

    @property
    def backend_uri(self) -> str:
        return self._backend_uri

