"""What a rank records about itself: identity, environment, sessions, declared destinations.

Secrets never reach disk: argv, job variables and declared destinations go through
`redaction` before the manifest is written.

The manifest and the index vouch for each other (see `verify`): each session records the index
head (line count and hash of the last line) at its start and end, and each index entry records
the digests of run.json and of the declared destinations at sealing time (`anchors`).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from itwinai_journal.format.reprs import safe_repr

from . import segments
from .fsio import read_bytes, read_json
from .redaction import redact, redact_argv
from .validate import DAMAGED, check_manifest

_VERSIONED = ("itwinai-sync", "torch", "numpy", "pyarrow")


def _versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for dist in _VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _job_environment() -> dict[str, str]:
    keep = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_JOB_NAME", "SLURM_NODELIST",
            "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "ITWINAI_RUN_ID")
    return redact({k: os.environ[k] for k in keep if k in os.environ})


def new_manifest(rank: int, world_size: int) -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        user = None
    return {
        "rank": rank,
        "world_size": world_size,
        "host": socket.gethostname(),
        "user": user,
        "versions": _versions(),
        # What a tracker's own client records about the machine (W&B's run metadata): the
        # exporters show these instead of the exporting machine's.
        "os": platform.platform(aliased=True),
        "python_implementation": platform.python_implementation(),
        "executable": sys.executable,
        "git_commit": _git_commit(),
        "job": _job_environment(),
        "destinations": {},
        "sessions": [],
        "dropped_records": 0,
    }


def new_session(first_seq: int, index_start: dict[str, Any]) -> dict[str, Any]:
    return {
        "start": time.time(),
        "end": None,
        "status": "running",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "argv": redact_argv(list(sys.argv)),
        "cwd": os.getcwd(),
        "first_seq": first_seq,
        "index_start": index_start,
    }


def load_for_session(rank_dir: Path, rank: int, world_size: int, last_seq: int
                     ) -> dict[str, Any]:
    """The manifest a new session of this rank continues. A damaged one (cut by a crash before
    manifests were fsynced, or edited) does not stop the job: it is kept aside as
    `manifest.json.damaged-<time>-<pid>` and rebuilt, with one session of status `unknown`
    standing for the lost ones (seq 1..`last_seq`, what the segments and index hold). What only
    the damaged file knew (host, argv, destinations of earlier sessions) is in the copy."""
    path = manifest_path(rank_dir)
    try:
        return check_manifest(read_json(path))
    except FileNotFoundError:
        return new_manifest(rank, world_size)
    except DAMAGED as e:
        reason = str(e).split("\n")[0][:200]
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-"
                           f"{os.getpid()}")
    os.replace(path, aside)
    manifest = new_manifest(rank, world_size)
    manifest["rebuilt"] = {"time": time.time(), "damaged_copy": aside.name, "reason": reason}
    if last_seq:
        manifest["sessions"].append({"status": "unknown", "start": None, "end": None,
                                     "first_seq": 1, "last_seq": last_seq,
                                     "index_end": segments.index_head(rank_dir)})
    warnings.warn(f"itwinai-journal: {path} was damaged ({reason}); it is kept as {aside.name} "
                  f"and rebuilt from the index and segments (records 1..{last_seq} kept)",
                  RuntimeWarning, stacklevel=4)
    return manifest


def declarable(options: dict[str, Any]) -> dict[str, Any]:
    """A logger's declared options (constructor arguments, `create_logger_context` keywords)
    as the manifest can always hold them, secrets redacted: each value as JSON, an object JSON
    cannot hold by its repr (as `destinations_digest` digests it), and a value JSON cannot
    hold at all (a self-referencing list, a dict with tuple keys) as its repr. Declared
    options are only descriptive: a repr never stops the manifest from being written."""
    return redact({str(k): _json_value(v) for k, v in options.items()})


def _json_value(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=safe_repr))
    except (TypeError, ValueError, RecursionError):
        return safe_repr(value)


def anchors(run_dir: Path, destinations: dict[str, Any]) -> dict[str, str]:
    """What an index entry records about the files the hash chain does not cover otherwise:
    the sha256 of run.json and of the declared destinations (canonical JSON)."""
    try:
        run = hashlib.sha256(read_bytes(run_dir / "run.json")).hexdigest()
    except OSError:  # missing, or not a regular file (never waited on)
        run = ""
    return {"run_sha256": run, "destinations_sha256": destinations_digest(destinations)}


def destinations_digest(destinations: Any) -> str:
    text = json.dumps(destinations, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def session_ended(session: dict[str, Any]) -> bool:
    """Whether a session has ended and says where its records end (`last_seq`): its writer
    recorded how (finished, failed, interrupted, each with an end time), or it stands for
    sessions rebuilt from a damaged manifest (`unknown`). A session SIGTERM marked `interrupted`
    without an end is still open: its process may go on writing (a SIGTERM handler of the
    user's let training continue) until it ends or is killed."""
    status = session.get("status")
    return status != "running" and (status != "interrupted" or session.get("end") is not None)


def session_status(manifest: dict[str, Any]) -> str:
    """Status of a rank: its last session's, or 'running' when it never started one."""
    sessions = manifest.get("sessions") or []
    return sessions[-1]["status"] if sessions else "running"


def manifest_path(rank_dir: Path) -> Path:
    return rank_dir / "manifest.json"
