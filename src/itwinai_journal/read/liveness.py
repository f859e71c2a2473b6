"""Whether the process writing a rank is still there: what `--watch` needs to stop following a
run whose writer was killed (SIGKILL, a node that died) and so never closed its session.

A writer records its host and pid in the session, and its flusher thread touches the active
segment every `HEARTBEAT_SECONDS` (appends touch it too). From the sync side:
- on the writer's own host, the pid answers: no such process, or a process started after the
  session began (the pid was reused), means the writer is gone;
- on another host (a login node reading a compute node's journal), only the heartbeat can tell:
  no change to the active segment, the index or the manifest for `SILENT_AFTER` seconds (ten
  heartbeats: room for NFS attribute caching and clock skew) means the writer is presumed gone.
  Sessions written before the heartbeat existed carry no `heartbeat` field and are never
  presumed gone from another host.
A writer that is only slow (a long evaluation without logging) keeps beating, so it is not
mistaken for a dead one; a frozen node is, after `SILENT_AFTER`.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

HEARTBEAT_SECONDS = 30.0
#: Silence after which a writer on another host is presumed gone (at least ten heartbeats).
SILENT_AFTER = 300.0


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def process_start(pid: int) -> float | None:
    """Unix time at which process `pid` started (Linux /proc), or None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return boot + int(fields[19]) / _clock_ticks()
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, since: float | None) -> bool:
    """Whether `pid` is a live process that was already running at time `since`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    if since is None:
        return True
    started = process_start(pid)
    # /proc start times have a resolution of one clock tick and btime of one second.
    return started is None or started <= since + 2.0


def last_activity(rank_dir: Path) -> float:
    """Newest modification time of what a live writer touches: the active segment (appends,
    heartbeat), the index (seals) and the manifest."""
    newest = 0.0
    candidates = [rank_dir / "manifest.json", rank_dir / "index.jsonl"]
    try:
        candidates += [e for e in (rank_dir / "segments").iterdir() if e.suffix == ".jsonl"]
    except OSError:
        pass
    for path in candidates:
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    return newest


def writer_gone(rank_dir: Path, manifest: dict[str, Any], now: float | None = None
                ) -> str | None:
    """Why the writer of a rank whose last session is still 'running' is known or presumed
    gone, or None when it may be alive (or the session has ended)."""
    sessions = manifest.get("sessions") or []
    if not sessions or not isinstance(sessions[-1], dict):
        return None
    session = sessions[-1]
    if session.get("status") != "running":
        return None
    host, pid, start = session.get("host"), session.get("pid"), session.get("start")
    start = float(start) if isinstance(start, (int, float)) else None
    if host == socket.gethostname() and isinstance(pid, int) and pid > 0:
        if pid_alive(pid, start):
            return None
        return f"its writer (pid {pid} on {host}) is gone and never closed its session"
    beat = session.get("heartbeat")
    if not isinstance(beat, (int, float)) or beat <= 0:
        return None
    quiet = (time.time() if now is None else now) - last_activity(rank_dir)
    if quiet < max(SILENT_AFTER, 10 * beat):
        return None
    return (f"its writer (pid {pid} on {host}) has shown no sign of life for {quiet:.0f} s "
            "and is presumed gone")
