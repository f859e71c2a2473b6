"""`itwinai-sync live SAVEDIR --run EXP/RUN --parent PID`: live sync's sidecar, started by
the training process itself when live sync is on (see `itwinai_journal.writer.live`).

It is the `--watch` loop of one run with three differences, all for running unattended beside
a job whose tracker may come and go:
- outages are expected, not errors: a pass that fails (the tracker unreachable, refusing
  connections, timing out, answering 5xx) is retried after a bounded, growing delay
  (`interval`, doubled per failure, at most MAX_BACKOFF), each with one status line, and the
  sidecar never gives up while the training process runs. A pass resumes from the cursor the
  target itself committed, so what an interrupted pass sent is never sent twice;
- its lifetime is the training process's: it asks the kernel for a signal when its parent
  ends (PR_SET_PDEATHSIG) and also checks the parent's pid before each pass (the signal is
  tied to the thread that started it, and a sidecar started by hand has another parent). Once
  the parent is gone it exports what is left, retrying for at most `drain` seconds, and exits;
  what it could not send stays in the journal for a later `itwinai-sync` (exit code 1);
- it says where it is: a status file beside its log under `<savedir>/.sync/live/` (per target:
  records still to send, last pass that reached it, since when it is behind and why), which
  `itwinai-sync ls` shows.

A sidecar killed at any moment loses nothing: the journal is the write-ahead log, the target
holds the cursor, and the next sync (a new sidecar or `itwinai-sync`) continues from it.
Credentials come from the tracker's usual variables in the inherited environment; nothing this
module writes holds one (status and log lines are scrubbed).
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from itwinai_journal.errors import UsageError
from itwinai_journal.format.fsio import read_json, write_json_atomic
from itwinai_journal.format.redaction import redact, scrub
from itwinai_journal.read.follow import written_seq
from itwinai_journal.read.liveness import pid_alive
from itwinai_journal.writer.live import live_paths

from ..api import ExportError, TargetUnavailable
from .common import SAVEDIR, counts

# The engine and exporters (pyarrow, filelock) are imported by the sidecar itself, not by `ls`,
# which only reads status files.
if TYPE_CHECKING:
    from ..engine import RunResult

#: Longest wait between two tries while a target is unreachable.
MAX_BACKOFF = 60.0
#: MLflow retries a failed HTTP call 7 times with a backoff factor of 2 (minutes per call) and
#: waits 120 s for an answer by default: in an outage that would hold a pass for many minutes.
#: The sidecar retries whole passes itself, so its own calls give up sooner (unless the
#: environment says otherwise).
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
_PR_SET_PDEATHSIG = 1
#: The status entry of a failure to read the run itself (not one target's).
JOURNAL = "(journal)"
#: States of a sidecar that has not ended.
RUNNING = ("starting", "following", "draining")
#: Sent by the kernel when the parent ends: it only wakes the loop, which then drains.
PARENT_SIGNAL = signal.SIGUSR1


@dataclass
class TargetState:
    """How far live sync to one target has got (the status file's per-target entry)."""

    where: str = ""
    exported: int = 0  # records this sidecar exported
    #: Records the target does not hold yet after the last pass (see `written`).
    pending: int = 0
    last_ok: float | None = None  # end of the last pass that reached the target
    behind_since: float | None = None  # first failed pass of the current outage
    error: str | None = None


def ask_for_parent_signal(parent: int) -> bool:
    """Have the kernel send PARENT_SIGNAL when the parent ends (Linux); False elsewhere or when
    the parent is not `parent` (already gone, or a sidecar started by hand)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(PARENT_SIGNAL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return os.getppid() == parent  # after prctl: a parent gone before it is seen here


@click.command("live")
@click.argument("savedir", type=SAVEDIR)
@click.option("--run", "run_key", required=True, metavar="EXPERIMENT/RUN_ID",
              help="The run to follow.")
@click.option("--to", "targets", multiple=True, metavar="TARGET",
              help="Target, repeatable. Default: the destinations the run's loggers declared.")
@click.option("--parent", type=click.IntRange(min=1), required=True, metavar="PID",
              help="The training process: followed while it runs, drained after it ends.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              metavar="S", envvar="ITWINAI_SYNC_LIVE_INTERVAL",
              help="Seconds between passes; also the first retry delay after a failure "
                   "(doubled per failure up to 60 s). Env: ITWINAI_SYNC_LIVE_INTERVAL.")
@click.option("--drain", type=click.FloatRange(min=0), default=120.0, show_default=True,
              metavar="S", envvar="ITWINAI_SYNC_LIVE_DRAIN",
              help="After the training process ends, how long to keep trying to export "
                   "what is left. Env: ITWINAI_SYNC_LIVE_DRAIN.")
def live_cmd(savedir: Path, run_key: str, targets: tuple[str, ...], parent: int,
             interval: float, drain: float) -> None:
    """The live sync sidecar of one run, which the loggers start themselves with
    `live_sync=True` or ITWINAI_SYNC_LIVE (see the README): follows the run to its trackers
    while the training process runs, rides out outages, exits after the training does."""
    sys.exit(LiveSync(savedir, run_key, list(targets), parent, interval, drain).run())


class LiveSync:
    def __init__(self, savedir: Path, run: str, targets: list[str], parent: int,
                 interval: float, drain: float, out: Any = None):
        experiment, _, run_id = run.rpartition("/")
        self.savedir = savedir
        self.run_key = run
        self.parent = parent
        self.interval = interval
        self.drain = drain
        self.out = out or sys.stdout
        from ..engine import SyncEngine, SyncRequest

        self.engine = SyncEngine(SyncRequest(savedir=savedir, targets=targets or None,
                                             run_ids=[run], workers=1))
        #: Woken by a signal through a pipe, never a lock: a handler runs in the main thread
        #: between two bytecodes, where a threading.Event's own lock may be held by the loop's
        #: wait or clear (a sidecar was found blocked for good on it, in its parent-death handler).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.states: dict[str, TargetState] = {}
        #: The parent must already run when the sidecar starts: a later process with its pid
        #: (reused after it ended) is not it.
        self.started = time.time()
        self.state = "starting"
        self._notes_said = 0
        _, self.status_path = live_paths(savedir, experiment or "", run_id)

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # The handler first: the signal's default action would end the sidecar undrained.
        signal.signal(PARENT_SIGNAL, lambda *_: self._wake())
        watched = ask_for_parent_signal(self.parent)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        targets = ", ".join(self.engine.req.targets or ["the declared destinations"])
        self.say(f"live sync of {self.run_key} to {targets} (pid {os.getpid()}), following "
                 f"training pid {self.parent}" + ("" if watched else " by polling"))
        self._write_status()
        failures = 0
        drain_until: float | None = None
        try:
            while True:
                parent_gone = not pid_alive(self.parent, self.started)
                if parent_gone and drain_until is None:
                    drain_until = time.monotonic() + self.drain
                    self.state = "draining"
                    self.say("the training process has ended: exporting its last records")
                try:
                    ok, finished = self._pass()
                except (UsageError, TargetUnavailable) as e:
                    # An unknown target, a missing library: no retry can help.
                    return self._end("failed", f"cannot sync: {e}", 2)
                if self.engine.stop.is_set():
                    return self._end("stopped", "stopped by a signal; what was exported is "
                                     "committed, `itwinai-sync` continues from there", 130)
                if ok and (finished or parent_gone):
                    return self._end("done", "every record is exported; done", 0)
                if drain_until is not None and time.monotonic() >= drain_until:
                    left = sum(s.pending for s in self.states.values())
                    return self._end("left", f"the training process has ended and a target "
                                     f"still fails after {self.drain:.0f} s: {left} record(s) "
                                     "left in the journal for `itwinai-sync`", 1)
                failures = 0 if ok else failures + 1
                delay = (self.interval if ok
                         else min(MAX_BACKOFF, self.interval * 2 ** min(failures - 1, 20)))
                if drain_until is not None:
                    delay = min(delay, max(0.1, drain_until - time.monotonic()))
                if not ok:
                    self._say_behind(delay)
                self._sleep(delay)
        finally:
            self.engine.close()

    def _on_stop(self, signum: int, frame: Any) -> None:
        # An Event's set takes its lock: a second signal arriving inside the first's set would
        # wait for it forever. The engine only reads the flag (without the lock).
        if not self.engine.stop.is_set():
            self.engine.stop.set()
        self._wake()

    def _wake(self) -> None:
        """End the loop's sleep now (from a signal handler)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the loop is woken already
            pass

    def _sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, less when woken; then forget the wake-ups."""
        select.select([self._wake_r], [], [], seconds)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _pass(self) -> tuple[bool, bool]:
        """One sync pass: (whether every target took everything it was given, whether every
        rank of the run had ended before the pass began)."""
        self.engine.forget_unreachable()
        try:
            plan = self.engine.plan()
            finished = bool(plan) and not any(self.engine.still_running(r) for r, _ in plan)
            results = self.engine.run(plan)
        except (ExportError, OSError) as e:  # the run is not readable now: retried
            self._account_failure(JOURNAL, str(e))
            return False, False
        self.states.pop(JOURNAL, None)
        ok = True
        for result in results:
            ok = self._account(result, plan) and ok
        self._say_notes()
        self._write_status()
        return ok, finished

    # -- bookkeeping ----------------------------------------------------------------------------

    def _account(self, result: RunResult, plan: list) -> bool:
        from ..engine import total_pending

        state = self.states.setdefault(result.target, TargetState())
        state.where = result.where or state.where
        state.exported += sum(result.exported.values())
        items = [(run, t) for run, t in plan if t == result.target]
        try:
            state.pending = total_pending(self.engine, items, written_seq)
        except Exception:  # noqa: BLE001 - an estimate for the status only
            pass
        if result.status in ("failed", "busy"):
            self._account_failure(result.target, result.error or result.status)
            return False
        if state.behind_since is not None:
            self.say(f"{result.target}: reachable again after "
                     f"{time.time() - state.behind_since:.0f} s behind; resumed")
        if result.exported:
            self.say(f"{result.target}: exported {counts(result.exported)}")
        state.behind_since, state.error, state.last_ok = None, None, time.time()
        return True

    def _account_failure(self, target: str, error: str) -> None:
        state = self.states.setdefault(target, TargetState())
        if state.behind_since is None:
            state.behind_since = time.time()
            self.say(f"{target}: cannot export: {error}")  # in full, once per outage
        state.error = outage_reason(error)

    def _say_behind(self, delay: float) -> None:
        for target, s in self.states.items():
            if s.behind_since is not None:
                self.say(f"{target}: BEHIND since {_clock(s.behind_since)}, {s.pending} "
                         f"record(s) not synced: {s.error}; next try in {delay:.1f} s")
        self._write_status()

    def _say_notes(self) -> None:
        for note in self.engine.notes.lines[self._notes_said:]:
            self.say(f"note: {note}")
        self._notes_said = len(self.engine.notes.lines)

    def _end(self, state: str, message: str, code: int) -> int:
        self.state = state
        self.say(message)
        self._write_status()
        return code

    def say(self, line: str) -> None:
        print(f"{_clock(time.time())} {scrub(line)}", file=self.out, flush=True)

    def _write_status(self) -> None:
        status = {"pid": os.getpid(), "host": socket.gethostname(), "parent": self.parent,
                  "run": self.run_key, "started": self.started, "updated": time.time(),
                  "state": self.state,
                  "targets": {t: asdict(s) for t, s in self.states.items()}}
        try:
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.status_path, redact(status), fsync=False)
        except OSError as e:
            self.say(f"cannot write the status file {self.status_path}: {e}")
        if self.state == "starting":
            self.state = "following"


#: What an outage looks like in the errors of tracker clients, and its one-line name.
_OUTAGES = ((re.compile(r"connection refused", re.I), "connection refused"),
            (re.compile(r"timed? ?out|timeout|no connection within", re.I), "timed out"),
            (re.compile(r"too many (5\d\d) error responses|error code (5\d\d)|"
                        r"status(?: code)?:? (5\d\d)", re.I), "HTTP {}"),
            (re.compile(r"name or service not known|not resolved|not found", re.I),
             "host not found"))


def outage_reason(error: str) -> str:
    """A failed pass's error in a few words (`connection refused`, `timed out`, `HTTP 503`)
    when it is an outage, else its first line (at most 200 characters)."""
    for pattern, reason in _OUTAGES:
        found = pattern.search(error)
        if found:
            return reason.format(next((g for g in found.groups() if g), ""))
    first = (error.strip().splitlines() or [""])[0]
    return first if len(first) <= 200 else first[:197] + "..."


def read_status(savedir: Path, experiment: str, run_id: str) -> dict[str, Any] | None:
    """The live sync status of a run (for `ls`), or None when it never had one. A sidecar
    that ended without saying so (killed) is marked `gone`."""
    _, path = live_paths(savedir, experiment, run_id)
    try:
        status = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or not isinstance(status.get("targets"), dict):
        return None
    pid = status.get("pid")
    if (status.get("state") in RUNNING
            and status.get("host") == socket.gethostname() and isinstance(pid, int)
            and not pid_alive(pid, status.get("started"))):
        status["state"] = "gone"
    return status


def status_lines(status: dict[str, Any]) -> list[str]:
    """`ls` lines for one run's live sync: per target, up to date or behind since when."""
    running = status.get("state") in RUNNING
    when = (f"since {_clock(status.get('started'))}" if running
            else f"ended {_clock(status.get('updated'))}")
    lines = [f"live sync: {status.get('state')} (pid {status.get('pid')} on "
             f"{status.get('host')}, {when})"]
    for target, s in sorted(status["targets"].items()):
        if not isinstance(s, dict):
            continue
        if not running:  # what it last knew; a later sync may have done the rest ('synced to')
            target = f"{target}, when it ended"
        if s.get("behind_since"):
            lines.append(f"  {target}: behind since {_clock(s['behind_since'])}, "
                         f"{s.get('pending')} record(s) not synced: {s.get('error')}")
        else:
            lines.append(f"  {target}: reached at {_clock(s.get('last_ok'))}, "
                         f"{s.get('pending')} record(s) not synced then, "
                         f"{s.get('exported')} exported live")
    return lines


def _clock(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
