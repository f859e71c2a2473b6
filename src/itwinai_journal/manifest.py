"""What a rank records about itself: identity, environment, sessions, declared destinations.

Secrets never reach disk: any environment-derived value whose name looks like a credential is
replaced before the manifest is written.
"""

from __future__ import annotations

import getpass
import os
import platform
import re
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

_SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL", re.IGNORECASE)
REDACTED = "<redacted>"
_VERSIONED = ("itwinai-sync", "torch", "numpy", "pyarrow")


def _secret_values() -> set[str]:
    return {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 4}


def redact(obj: Any) -> Any:
    """`obj` (JSON-like) with every secret environment value found in its strings replaced, and
    the values of secret-looking keys hidden: what loggers declare (tracking URIs may embed
    credentials) goes through here before it reaches the manifest."""
    secrets = _secret_values()

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            for s in secrets:
                if s in value:
                    value = value.replace(s, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: (REDACTED if _SECRET_NAME.search(str(k)) and v is not None else walk(v))
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    return walk(obj)


def redact_argv(argv: list[str]) -> list[str]:
    """Hide values of secret-looking options (`--api-key X`, `--token=X`) and any argument that
    contains the value of a secret environment variable."""
    secret_values = _secret_values()
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and _SECRET_NAME.search(arg):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(REDACTED if any(s in arg for s in secret_values) else arg)
    return out


def redact_mapping(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (REDACTED if _SECRET_NAME.search(k) else v) for k, v in values.items()}


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
    return redact_mapping({k: os.environ[k] for k in keep if k in os.environ})


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


def new_session() -> dict[str, Any]:
    return {
        "start": time.time(),
        "end": None,
        "status": "running",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "argv": redact_argv(list(sys.argv)),
        "cwd": os.getcwd(),
    }


def session_status(manifest: dict[str, Any]) -> str:
    """Status of a rank: its last session's, or 'running' when it never started one."""
    sessions = manifest.get("sessions") or []
    return sessions[-1]["status"] if sessions else "running"


def manifest_path(rank_dir: Path) -> Path:
    return rank_dir / "manifest.json"
