"""The local sync ledger under `<savedir>/.sync/`: a mirror of each target's cursors (for speed
and for `itwinai-sync ls`), and, for targets without a directory of their own (an MLflow
server), the per (target key, journal) locks that let several sync processes share one savedir
and one target, each taking the runs nobody else holds.

Entries are per journal identity (`RunInfo.journal_id`), not per run id: two journals of one
run (a Prov4MLLogger's beside the main one) or two journals that share an experiment and run id
each have their own cursors. The target's own committed cursor is the truth; the ledger is only
ever a hint.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itwinai_journal import RunInfo
from itwinai_journal.format.fsio import read_json, write_json_atomic

# filelock and .exporter (importlib.metadata) are imported where they are used: `itwinai-sync
# ls` reads the ledger through ledger_entries and needs neither.
if TYPE_CHECKING:
    import filelock

SYNC_DIR = ".sync"


class Ledger:
    def __init__(self, savedir: Path, target_key: str, target: str):
        from .api import key_digest

        self.root = savedir / SYNC_DIR / key_digest(target_key)
        self.target_key = target_key
        self.target = target
        #: The ranks of a run are exported by several threads, each recording its cursor in the
        #: run's one entry: a read-modify-write, one at a time.
        self._lock = threading.Lock()

    def _path(self, run: RunInfo, suffix: str) -> Path:
        """Named by the journal's identity alone: 32 hex digits fit any file system, whatever
        the run id (up to 200 bytes) and experiment; the entry records the run's key."""
        return self.root / f"{run.journal_id}{suffix}"

    def lock(self, run: RunInfo) -> filelock.FileLock:
        import filelock

        path = self._path(run, ".lock")
        self.root.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(path))

    def cursors(self, run: RunInfo) -> dict[int, int]:
        path = self._path(run, ".json")
        try:
            data = read_json(path)
        except (FileNotFoundError, ValueError):
            return {}
        return {int(k): int(v) for k, v in data.get("cursors", {}).items()}

    def record(self, run: RunInfo, rank: int, cursor: int) -> None:
        with self._lock:
            self._record(run, rank, cursor)

    def _record(self, run: RunInfo, rank: int, cursor: int) -> None:
        target_file = self.root / "target.json"
        if not target_file.exists():
            write_json_atomic(target_file, {"key": self.target_key, "target": self.target},
                              fsync=False)
        cursors = self.cursors(run)
        cursors[rank] = cursor
        write_json_atomic(self._path(run, ".json"), {
            "target": self.target, "target_key": self.target_key, "run": run.key,
            "journal": run.journal_id, "cursors": {str(k): v for k, v in sorted(cursors.items())},
            "updated": time.time(),
        }, fsync=False)


def ledger_entries(savedir: Path) -> list[dict[str, Any]]:
    """Every ledger file below savedir: target, target key, run key and cursors (for `ls`).
    The ledger only mirrors the targets' own cursors: a file that is not a ledger entry (cut,
    edited, left by another tool) is skipped, never an error."""
    out = []
    root = savedir / SYNC_DIR
    if not root.exists():
        return out
    for path in root.glob("*/*.json"):
        try:
            entry = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(entry, dict) and {"run", "target_key", "journal"} <= entry.keys():
            out.append(entry)
    return out
