"""Identifiers that become paths or tracker keys: validation and time-sortable run ids."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

#: Longest identifier accepted at log time. Longer names are a user error, not something to
#: truncate silently: trackers would show a different name from the one that was logged.
MAX_NAME_LEN = 4096


def check_name(name: object, what: str = "identifier") -> str:
    """Return `name` if it is a usable identifier, else raise a ValueError saying why."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise ValueError(f"{what} is {len(name)} characters long (limit {MAX_NAME_LEN})")
    bad = [c for c in name if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise ValueError(f"{what} {name[:80]!r} contains control character {bad[0]!r}")
    return name


def check_path_component(name: object, what: str) -> str:
    """Return `name` if it is safe as one directory name below savedir."""
    check_name(name, what)
    assert isinstance(name, str)
    if len(name) > 200:
        raise ValueError(f"{what} {name[:80]!r}... is too long for a directory name (limit 200)")
    if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(
            f"{what} {name!r} cannot be used as a directory name: it must not contain '/' or "
            "'\\', nor start with '.'"
        )
    return name


def safe_relpath(identifier: str, what: str = "identifier") -> Path:
    """Return `identifier` as a relative path that stays below the directory it is joined to."""
    check_name(identifier, what)
    p = Path(identifier)
    if p.is_absolute() or identifier.startswith(("/", "\\")):
        raise ValueError(
            f"{what} {identifier!r} is an absolute path; give a path relative to savedir"
        )
    if any(part == ".." for part in p.parts):
        raise ValueError(f"{what} {identifier!r} contains '..' and would escape savedir")
    return p


def new_run_id() -> str:
    """A fresh run id that sorts by creation time: `YYYYmmdd-HHMMSS-<8 hex>`."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)


def run_id_from_environment() -> str | None:
    """The run id shared by every rank of a job, read from the launcher's variables, if any."""
    explicit = os.environ.get("ITWINAI_RUN_ID")
    if explicit:
        return explicit
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return f"torchelastic-{elastic}"
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        step = os.environ.get("SLURM_STEP_ID")
        return f"slurm-{job}" + (f".{step}" if step else "")
    return None


def broadcast_run_id(candidate: str) -> str:
    """Rank 0's `candidate` when torch.distributed is up, so all ranks agree without a tracker."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return candidate
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return candidate
    holder = [candidate]
    dist.broadcast_object_list(holder, src=0)
    return str(holder[0])


_DIR_SAFE = " -_.,+=@()[]"


def experiment_dirname(experiment: str) -> str:
    """Experiment names are free text (MLflow allows '/'); their directory name is the name
    percent-encoded, a deterministic and reversible mapping. run.json keeps the original."""
    from urllib.parse import quote

    check_name(experiment, "experiment name")
    encoded = quote(experiment, safe=_DIR_SAFE)
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if len(encoded) > 200:
        raise ValueError(f"experiment name {experiment[:80]!r}... is too long (limit 200 bytes "
                         "once encoded for the file system)")
    return encoded
