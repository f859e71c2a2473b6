"""Identifiers that become paths or tracker keys: validation and time-sortable run ids."""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

#: A run id or an encoded experiment name is at most this many bytes of UTF-8. File names are
#: limited to 255 bytes; the journal and the sync side add at most 55 bytes to these names in a
#: path component (the sync ledger's `.json`/`.lock` suffixes and the temporary
#: `.<name>.<random>.tmp` of an atomic write), so whatever `log()` accepted, sync can store.
MAX_PATH_COMPONENT_BYTES = 200

#: A lone surrogate (U+D800..U+DFFF): what `os.fsdecode` makes of bytes that are not UTF-8.
#: It has no UTF-8 encoding, so no journal file, Parquet column or tracker can store it.
SURROGATE = re.compile("[\ud800-\udfff]")


def check_name(name: object, what: str = "identifier") -> str:
    """Return `name` if it can be stored as a record's name, else raise saying why. Anything a
    UTF-8 string can hold is stored as given (names a tracker rejects are mapped at export);
    a lone surrogate cannot be, and a name is an identifier: it is not rewritten."""
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if not name.isascii():
        bad = SURROGATE.search(name)
        if bad is not None:
            raise ValueError(
                f"{what} {name[:80]!r} contains the lone surrogate {bad.group()!r} at "
                f"position {bad.start()}, which has no UTF-8 form (os.fsdecode makes such "
                "characters of bytes that are not UTF-8): decode the name with "
                "errors='replace' first")
    return name


def _check_no_control_characters(name: str, what: str) -> None:
    """Names that become file or directory names carry no control characters (a NUL cannot
    be in a path at all)."""
    bad = [c for c in name if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise ValueError(f"{what} {name[:80]!r} contains control character {bad[0]!r}")


def check_path_component(name: object, what: str) -> str:
    """Return `name` if it is safe as one directory name below savedir."""
    check_name(name, what)
    assert isinstance(name, str)
    if not name:
        raise ValueError(f"{what} must not be empty")
    _check_no_control_characters(name, what)
    size = len(name.encode())
    if size > MAX_PATH_COMPONENT_BYTES:
        raise ValueError(f"{what} {name[:40]!r}... is {size} bytes in UTF-8, too long for a "
                         f"directory name (limit {MAX_PATH_COMPONENT_BYTES} bytes)")
    if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(
            f"{what} {name!r} cannot be used as a directory name: it must not contain '/' or "
            "'\\', nor start with '.'"
        )
    return name


def safe_relpath(identifier: str, what: str = "identifier") -> Path:
    """Return `identifier` as a relative path that stays below the directory it is joined to."""
    check_name(identifier, what)
    if not identifier:
        raise ValueError(f"{what} must not be empty")
    _check_no_control_characters(identifier, what)
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
    if not experiment:
        raise ValueError("experiment name must not be empty")
    encoded = quote(experiment, safe=_DIR_SAFE)
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    if len(encoded) > MAX_PATH_COMPONENT_BYTES:  # ASCII once percent-encoded
        raise ValueError(f"experiment name {experiment[:80]!r}... is too long (limit "
                         f"{MAX_PATH_COMPONENT_BYTES} bytes once encoded for the file system)")
    return encoded
