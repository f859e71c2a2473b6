"""Run a throw-away ``mlflow server`` on loopback for tests that replay into MLflow over HTTP.

Usage::

    with MlflowServer(tmp_path / "mlflow") as server:
        client = mlflow.MlflowClient(server.uri)
        ...

The server (MLflow 3.x, uvicorn) is started as::

    mlflow server --host 127.0.0.1 --port P --workers W (1 unless asked)
        --backend-store-uri sqlite:///<dir>/mlflow.db
        --serve-artifacts --artifacts-destination <dir>/artifacts

``--serve-artifacts`` (the default since MLflow 2.0, passed explicitly here) makes new
experiments get the artifact root ``mlflow-artifacts:/``, so clients upload and download
artifacts through the server's HTTP proxy and need no access to ``<dir>/artifacts``.

It runs in its own session / process group (``start_new_session=True``): the ``mlflow`` CLI
process spawns a ``uvicorn`` child, and stopping sends SIGTERM to the whole group, then
SIGKILL to whatever is left after ``stop_timeout`` seconds.

The child environment is made hermetic and quiet:

* ``MLFLOW_DISABLE_TELEMETRY=true`` and ``DO_NOT_TRACK=true``: otherwise ``mlflow server``
  records a ``TrackingServerStartEvent`` and fetches
  ``https://config.mlflow-telemetry.io/<version>.json`` at start (``mlflow/cli/__init__.py``,
  ``mlflow/telemetry/client.py``). MLflow only honours ``DO_NOT_TRACK`` spelled ``true``.
* ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: with a SQL backend MLflow 3 otherwise starts a
  job runner and seven ``huey_consumer`` processes (which probe ``/var/run/docker.sock`` and
  take seconds to shut down).
* ``MLFLOW_TRACKING_URI`` and friends are removed so the server cannot pick up the caller's
  tracking configuration, and ``DOCKER_HOST`` so its start-up sandbox-container cleanup (run
  when a ``docker`` executable exists) can only reach the local Docker socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["MlflowServer", "MlflowServerError", "hermetic_mlflow_env"]

#: Environment variables set in the server process (and recommended for test clients too).
HERMETIC_ENV: dict[str, str] = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PYTHONUNBUFFERED": "1",
}

#: Environment variables removed from the server process.
_DROPPED_ENV: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_RUN_ID",
    # The uvicorn app reaps MLflow assistant sandbox containers at start-up whenever a ``docker``
    # executable is on PATH; keep that on the local Docker socket, never a remote daemon.
    "DOCKER_HOST",
)


class MlflowServerError(RuntimeError):
    """The server could not be started (it died, or ``/health`` never answered)."""


def hermetic_mlflow_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return a copy of ``base`` (default ``os.environ``) suitable for an offline MLflow.

    Args:
        base: Environment to start from.

    Returns:
        A new mapping with telemetry and server job execution disabled and the caller's
        MLflow tracking configuration removed.
    """
    env = dict(os.environ if base is None else base)
    for name in _DROPPED_ENV:
        env.pop(name, None)
    env.update(HERMETIC_ENV)
    return env


def start_on_a_port(server: Any, wait: Callable[[], None], error: type[Exception]) -> None:
    """Spawn `server` (its `_spawn(port)`, `stop()`, `log_tail()`) on its requested port, or on
    a free one, and `wait` until it serves. A free port can be taken by another process between
    the choice and the bind: then (the server's log says "address already in use") up to three
    ports are tried; any other failure, or a requested port, raises `error` at once."""
    attempts = 1 if server._requested_port is not None else 3
    for attempt in range(1, attempts + 1):
        server._spawn(server._requested_port or _free_port(server.host))
        try:
            wait()
            return
        except error:
            in_use = "address already in use" in server.log_tail().lower()
            server.stop()
            if not (in_use and attempt < attempts):
                raise


def _free_port(host: str) -> int:
    """Ask the kernel for a currently unused TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _mlflow_command() -> list[str]:
    """Return the argv prefix running the ``mlflow`` CLI of the current interpreter."""
    script = Path(sys.executable).with_name("mlflow")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "mlflow"]


def _group_members(pgid: int, *, include_zombies: bool = False) -> list[int]:
    """Return the pids of processes whose process group is ``pgid``.

    Reads ``/proc`` so that zombies (orphans already dead but not yet reaped by pid 1) can be
    told apart from live processes. Falls back to ``killpg(pgid, 0)`` where ``/proc`` is
    unavailable (then zombies cannot be distinguished).

    Args:
        pgid: Process group id.
        include_zombies: Also report dead-but-unreaped processes.
    """
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Format: "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) < 3 or int(fields[2]) != pgid:
            continue
        if include_zombies or fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class MlflowServer:
    """A local ``mlflow server`` with a SQLite backend and proxied artifact storage.

    Use it as a context manager; :attr:`uri` is valid between ``__enter__`` and ``__exit__``.
    All files (database, artifacts, server log) live in ``workdir``; if no ``workdir`` is
    given a temporary directory is created and removed again on exit (unless ``keep_workdir``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
        keep_workdir: bool = False,
        workers: int = 1,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Configure (but do not start) the server.

        Args:
            workdir: Directory for ``mlflow.db``, ``artifacts/`` and ``server.log``. Created if
                missing. ``None`` means a fresh temporary directory.
            host: Loopback address to bind; must lie in ``127.0.0.0/8``.
            port: TCP port; ``None`` picks a free one (retried if it gets taken meanwhile).
            startup_timeout: Seconds to wait for ``GET /health`` to answer ``200``.
            stop_timeout: Seconds to wait after SIGTERM before sending SIGKILL.
            keep_workdir: Keep an auto-created temporary ``workdir`` after exit.
            workers: uvicorn worker processes. More than 1 is how MLflow serves by default
                (4), and how uvicorn's supervisor serves: its connections lose TCP_NODELAY
                (uvicorn issue #3149), unlike those of a single worker.
            extra_args: Further ``mlflow server`` options.
            extra_env: Extra environment variables for the server process.
        """
        if not host.startswith("127."):
            raise ValueError(f"MlflowServer only binds loopback addresses, not {host!r}")
        self._owns_workdir = workdir is None
        self.workdir = Path(
            tempfile.mkdtemp(prefix="mlflow-server-") if workdir is None else workdir
        ).resolve()
        self.host = host
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.keep_workdir = keep_workdir
        self.workers = workers
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(extra_env or {})
        self._requested_port = port
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None

    # -- locations ---------------------------------------------------------------------------

    @property
    def db_path(self) -> Path:
        """Path of the SQLite database file."""
        return self.workdir / "mlflow.db"

    @property
    def backend_uri(self) -> str:
        """SQLAlchemy URI of the backend store (``sqlite:////abs/path/mlflow.db``).

        Usable directly as a tracking URI (``MlflowClient(server.backend_uri)``) to inspect
        the store without HTTP; artifact URIs stay ``mlflow-artifacts:/...`` then.
        """
        return f"sqlite:///{self.db_path}"

    @property
    def artifacts_dir(self) -> Path:
        """Directory where the server stores proxied artifacts."""
        return self.workdir / "artifacts"

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout and stderr."""
        return self.workdir / "server.log"

    @property
    def uri(self) -> str:
        """Tracking URI of the running server, ``http://127.0.0.1:<port>``."""
        if self.port is None:
            raise RuntimeError("MlflowServer is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the ``mlflow server`` process (also the process group id), if started."""
        return None if self._proc is None else self._proc.pid

    @property
    def pgid(self) -> int | None:
        """Process group id of the server and its children, if started."""
        return self._pgid

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> MlflowServer:
        """Start the server and wait until it is healthy.

        If start-up fails the server is stopped and an auto-created ``workdir`` removed (the
        raised :class:`MlflowServerError` carries the tail of the server log).
        """
        try:
            self.start()
        except BaseException:
            self._remove_owned_workdir()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server and remove an auto-created ``workdir``."""
        self.stop()
        self._remove_owned_workdir()

    def _remove_owned_workdir(self) -> None:
        """Delete ``workdir`` if this object created it and ``keep_workdir`` is false."""
        if self._owns_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def command(self, port: int) -> list[str]:
        """Return the argv used to start the server on ``port``."""
        return [
            *_mlflow_command(),
            "server",
            "--host",
            self.host,
            "--port",
            str(port),
            "--workers",
            str(self.workers),
            "--backend-store-uri",
            self.backend_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts_dir),
            *self.extra_args,
        ]

    def start(self) -> None:
        """Start the server and block until ``GET /health`` answers.

        Raises:
            MlflowServerError: If the process exits early or is not healthy within
                ``startup_timeout`` seconds. The server is stopped before raising and the
                message ends with the tail of the server log.
        """
        if self._proc is not None:
            raise RuntimeError("MlflowServer is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        start_on_a_port(self, self._wait_healthy, MlflowServerError)

    def _spawn(self, port: int) -> None:
        """Launch the server process on ``port`` in a new session."""
        env = hermetic_mlflow_env()
        env.update(self.extra_env)
        with self.log_path.open("ab") as log:
            log.write(f"\n=== MlflowServer starting on port {port} ===\n".encode())
            log.flush()
            # The child keeps its own copy of the descriptor; ours can be closed at once.
            self._proc = subprocess.Popen(
                self.command(port),
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._pgid = self._proc.pid  # session leader: pgid == pid
        self.port = port

    def _wait_healthy(self) -> None:
        """Poll ``/health`` until it answers 200, the process dies, or the timeout expires."""
        assert self._proc is not None
        # Never route loopback health checks through an HTTP proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + self.startup_timeout
        last_error: str = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise MlflowServerError(
                    f"mlflow server exited with code {code} during start-up\n"
                    f"--- server log (tail) ---\n{self.log_tail()}"
                )
            try:
                with opener.open(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as err:
                last_error = repr(err)
            if time.monotonic() >= deadline:
                raise MlflowServerError(
                    f"mlflow server at {self.uri} not healthy after {self.startup_timeout:g} s"
                    f" (last error: {last_error})\n"
                    f"--- server log (tail) ---\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Terminate the whole process group: SIGTERM, wait, then SIGKILL. Idempotent."""
        proc, pgid = self._proc, self._pgid
        if proc is None or pgid is None:
            return
        try:
            self._signal_group(pgid, signal.SIGTERM)
            if not self._wait_group_gone(proc, pgid, self.stop_timeout):
                self._signal_group(pgid, signal.SIGKILL)
                self._wait_group_gone(proc, pgid, 10.0)
            # Orphaned grandchildren are reaped by pid 1; give it a moment so that ``ps`` shows
            # no ``<defunct>`` leftovers either (best effort: they are dead already).
            self._wait_group_gone(proc, pgid, 2.0, include_zombies=True)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            self._proc = None
            self._pgid = None

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        """Send ``sig`` to process group ``pgid``, ignoring an already empty group."""
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _wait_group_gone(
        proc: subprocess.Popen[bytes], pgid: int, timeout: float, *, include_zombies: bool = False
    ) -> bool:
        """Reap ``proc`` and wait up to ``timeout`` s until no process is left in ``pgid``."""
        deadline = time.monotonic() + timeout
        while True:
            proc.poll()  # reap our direct child so it does not linger as a zombie
            gone = not _group_members(pgid, include_zombies=include_zombies)
            if proc.returncode is not None and gone:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    # -- diagnostics -------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the server log (empty if there is none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        """Show the URI (if started) and the working directory."""
        where = self.uri if self.port is not None else "not started"
        return f"MlflowServer({where}, workdir={str(self.workdir)!r})"
