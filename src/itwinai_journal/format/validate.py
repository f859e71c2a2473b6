"""What a reader accepts from a journal. A journal is untrusted input (it may come from another
user, an rsync of unknown history, or a hand edit): every identifier and reference read from it
is checked here, by the same rules the writer applies, before it names a path or a target.

Readers pass through these checks at their one entry point each: `reader.load_run` (run.json,
rank directories, manifests), `segments.iter_tables` (blob references and file names in
records), `BlobStore.path` and `BlobStore.tree` (blob references, directory listings). Exporters
therefore need no checks of their own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from itwinai_journal.errors import ItwinaiSyncError

from .names import check_path_component, experiment_dirname

if TYPE_CHECKING:
    import pyarrow as pa

BLOB_REF = re.compile(r"[0-9a-f]{64}")
RANK_DIR = re.compile(r"rank-(\d{5,})")
#: Session statuses a writer records; `unknown` marks sessions rebuilt from a damaged manifest.
SESSION_STATUSES = frozenset({"running", "finished", "failed", "interrupted", "unknown"})
#: meta fields that name a file or directory when an exporter writes the blob out.
_FILE_NAME_FIELDS = ("file_name", "dir_name")


class JournalCorruption(ItwinaiSyncError):
    """A file of a journal cannot be read as the format says, or names something it must not;
    the message names the file and the reason."""


#: What reading and checking a small JSON file of a journal raises when the file is damaged
#: (FileNotFoundError, also an OSError, is caught before these where absence means something).
DAMAGED = (OSError, ValueError, RecursionError, JournalCorruption)


def check_blob_ref(sha: object, where: str = "") -> str:
    """A blob reference: the 64 lowercase hex digits of a sha256, nothing else (never a path)."""
    if not isinstance(sha, str) or not BLOB_REF.fullmatch(sha):
        raise JournalCorruption(f"{where}{': ' if where else ''}blob reference {sha!r:.80} is "
                                "not a sha256 (64 lowercase hex digits)")
    return sha


def check_file_name(name: object, what: str, allow_empty: bool = False) -> str:
    """A file or directory name recorded in meta: one path component (empty only where the
    writer records '' for a directory without a name, e.g. '.')."""
    if not isinstance(name, str) or (not name and not allow_empty):
        raise JournalCorruption(f"{what} {name!r:.80} is not a file name")
    if name in (".", "..") or "/" in name or "\0" in name:
        raise JournalCorruption(f"{what} {name!r:.80} is not a single file name")
    return name


def check_tree_path(path: object, what: str) -> str:
    """A relative path inside a stored directory tree: no absolute path, no '..', not empty."""
    if not isinstance(path, str) or "\0" in path:
        raise JournalCorruption(f"{what} {path!r:.80} is not a relative path")
    p = PurePosixPath(path)
    if p.is_absolute() or not p.parts or ".." in p.parts:
        raise JournalCorruption(f"{what} {path!r:.80} is not a relative path inside the tree")
    return path


def check_tree(listing: object, where: str) -> list[dict[str, Any]]:
    """The files of a directory listing blob (`BlobStore.put_tree`), each checked."""
    files = listing.get("files") if isinstance(listing, dict) else None
    if not isinstance(files, list):
        raise JournalCorruption(f"{where}: not a directory listing")
    for f in files:
        if not isinstance(f, dict):
            raise JournalCorruption(f"{where}: not a directory listing")
        check_tree_path(f.get("path"), f"{where}: listed path")
        check_blob_ref(f.get("sha256"), where)
    return files


def check_records(table: pa.Table, where: str) -> None:
    """Blob references and recorded file names of a table of records. Vectorised, and free for
    tables without blobs or meta (metrics)."""
    n = table.num_rows
    blob, meta = table["blob"], table["meta"]
    if blob.null_count < n:
        import pyarrow.compute as pc

        ok = pc.match_substring_regex(blob, "^[0-9a-f]{64}$")
        if not pc.all(ok).as_py():
            bad = table.filter(pc.invert(pc.fill_null(ok, True)))
            check_blob_ref(bad["blob"][0].as_py(), f"{where}: record seq {bad['seq'][0]}")
    if meta.null_count < n:
        import pyarrow.compute as pc

        named = table.filter(pc.fill_null(pc.match_substring(meta, '_name"'), False))
        for seq, text in zip(named["seq"].to_pylist(), named["meta"].to_pylist()):
            try:
                fields = json.loads(text)
            except ValueError as e:
                raise JournalCorruption(f"{where}: record seq {seq}: meta is not JSON") from e
            if not isinstance(fields, dict):
                raise JournalCorruption(f"{where}: record seq {seq}: meta is not an object")
            for key in _FILE_NAME_FIELDS:
                if key in fields:
                    check_file_name(fields[key], f"{where}: record seq {seq}: {key}",
                                    allow_empty=key == "dir_name")


def check_run_info(info: object, run_dir: Path) -> tuple[str, str]:
    """(experiment, run_id) of a run.json, valid as directory names the way the writer makes
    them (`experiment_dirname`, `check_path_component`). Older journals without the fields
    take them from the directory names."""
    if not isinstance(info, dict):
        raise JournalCorruption("run.json is not a JSON object")
    experiment = info.get("experiment", run_dir.parent.name)
    run_id = info.get("run_id", run_dir.name)
    try:
        if not isinstance(experiment, str) or not isinstance(run_id, str):
            raise ValueError("experiment and run_id must be strings")
        experiment_dirname(experiment)
        check_path_component(run_id, "run id")
    except (TypeError, ValueError) as e:
        raise JournalCorruption(f"run.json: {e}") from None
    return experiment, run_id


def check_manifest(m: object) -> dict[str, Any]:
    """A rank manifest whose fields readers use (sessions' status and seq range, destinations)
    have the types the writer gives them. `itwinai-sync ls` checks thousands of manifests:
    plain type tests, no helper calls per session."""
    if type(m) is not dict:
        raise JournalCorruption("manifest.json is not a JSON object")
    sessions = m.get("sessions", [])
    if type(sessions) is not list:
        raise JournalCorruption("manifest.json: 'sessions' is not a list")
    for s in sessions:
        if type(s) is not dict or s.get("status") not in SESSION_STATUSES:
            raise JournalCorruption("manifest.json: a session is not a valid session")
        for seq in (s.get("first_seq"), s.get("last_seq")):
            if seq is not None and (type(seq) is not int or seq < 0):
                raise JournalCorruption(f"manifest.json: a session's seq {seq!r:.40} is not a "
                                        "seq")
    destinations = m.get("destinations", {})
    if type(destinations) is not dict:
        raise JournalCorruption("manifest.json: 'destinations' is not a mapping of options")
    for options in destinations.values():
        if type(options) is not dict:
            raise JournalCorruption("manifest.json: 'destinations' is not a mapping of options")
    return m

