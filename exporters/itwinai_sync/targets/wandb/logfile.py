"""What a W&B run holds, read back from its `.wandb` transaction logs below the offline root
(the cursor, the last step, the system-metrics samples), and waiting for wandb-core to have
written them (see the package docstring). The log format itself is read by
`itwinai_sync.compat.iter_wandb_records`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from itwinai_sync.compat import WANDB_LOG_BLOCK, WANDB_LOG_MAGIC, iter_wandb_records

from .rows import CURSOR_KEY, TAIL_KEY


def has_exit_record(path: Path) -> bool:
    """Whether the run's exit record (written by `finish`, among the last records) is in the
    file; only the last two blocks are read."""
    from wandb.proto.wandb_internal_pb2 import Record

    try:
        with open(path, "rb") as f:
            if f.read(4) != WANDB_LOG_MAGIC:
                return False
            size = f.seek(0, os.SEEK_END)
            base = max(0, size - 2 * WANDB_LOG_BLOCK)
            base -= base % WANDB_LOG_BLOCK
            f.seek(base)
            data = f.read()
    except OSError:
        return False
    for payload in iter_wandb_records(data, base):
        if len(payload) < 4096:
            rec = Record()
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "exit":
                return True
    return False


def wait_for_exit_record(path: Path, timeout: float = 60.0) -> bool:
    """Whether wandb-core wrote the run's exit record to `path` within `timeout` seconds.

    `Run.finish()` returns before wandb-core has flushed the transaction log (measured with
    wandb 0.31: the file can still be at its 7-byte header right after finish). A sync that
    read its cursor from a half-written file would export the tail twice, so close() waits."""
    deadline = time.monotonic() + timeout
    while not has_exit_record(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


#: How long the transaction log of a killed export must have been left unchanged before its
#: cursor is trusted. wandb-core runs in its own session and outlives a SIGKILLed export by
#: about 2 s (it watches the parent pid), flushing what it buffered as it exits: reading the
#: cursor before that would export those rows a second time. Longer than the default flush
#: interval (15 s), so even a wandb-core that kept running has flushed within it.
QUIET_SECONDS = 20.0


def settle_unfinished(root: Path, wb_id: str, timeout: float = 120.0) -> float:
    """Wait until no earlier export may still be writing this run's newest transaction log:
    nothing to wait for when it has its exit record (a finished export), else until it has
    been unchanged for QUIET_SECONDS. Returns the seconds waited."""
    files = list(root.glob(f"*-{wb_id}*/run-{wb_id}.wandb"))
    if not files:
        return 0.0
    newest = max(files, key=lambda p: p.stat().st_mtime)
    if has_exit_record(newest):
        return 0.0
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        quiet = time.time() - newest.stat().st_mtime
        if quiet >= QUIET_SECONDS:
            break
        time.sleep(min(QUIET_SECONDS - quiet, 1.0))
    return time.monotonic() - started


def _item_key(item: Any) -> str:
    if item.key:
        return item.key
    return item.nested_key[0] if len(item.nested_key) == 1 else ""


def _history_value(item: Any) -> Any:
    """A history item's value in either encoding wandb-core uses (typed oneof or JSON)."""
    which = item.WhichOneof("value")
    if which in ("integer", "number"):
        return getattr(item, which)
    if which == "json":
        return json.loads(item.json)
    return json.loads(item.value_json) if item.value_json else None


def committed_state(root: Path, wb_id: str, project: str) -> tuple[int, int]:
    """(cursor, last step) of W&B run `wb_id` of `project` from its transaction logs below
    `root`: the highest `_itwinai_seq` and `_step` of history records and `_itwinai_seq_tail`
    of summary records complete on disk, over every offline (and online) run directory of
    that id. (0, -1) when there is none.

    Only records that carry the cursor key are decoded (plus each file's run record, for the
    project), which keeps re-reading a long run's logs cheap."""
    from wandb.proto.wandb_internal_pb2 import Record

    cursor, last_step = 0, -1
    key = CURSOR_KEY.encode()
    for path in sorted(root.glob(f"*-{wb_id}*/run-{wb_id}.wandb")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        project_seen = False
        for payload in iter_wandb_records(data):
            if project_seen and key not in payload:
                continue
            rec = Record()
            rec.ParseFromString(payload)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                if rec.run.project != project:
                    break  # the same id in another project: another W&B run
                project_seen = True
            elif not project_seen:
                continue
            elif kind == "history":
                for item in rec.history.item:
                    if _item_key(item) == CURSOR_KEY:
                        cursor = max(cursor, int(_history_value(item)))
                        last_step = max(last_step, rec.history.step.num)
            elif kind == "summary":
                for item in rec.summary.update:
                    if _item_key(item) == TAIL_KEY:
                        cursor = max(cursor, int(json.loads(item.value_json)))
    return cursor, last_step


def stats_timestamps(root: Path, wb_id: str, project: str) -> set[int]:
    """Timestamps (ns) of the StatsRecords in W&B run `wb_id` of `project`'s transaction logs
    below `root`: the system-metrics samples the run holds (one per sample time)."""
    from wandb.proto.wandb_internal_pb2 import Record

    found: set[int] = set()
    for path in sorted(root.glob(f"*-{wb_id}*/run-{wb_id}.wandb")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for payload in iter_wandb_records(data):
            rec = Record()
            rec.ParseFromString(payload)
            kind = rec.WhichOneof("record_type")
            if kind == "run" and rec.run.project != project:
                break  # the same id in another project: another W&B run
            if kind == "stats":
                found.add(rec.stats.timestamp.ToNanoseconds())
    return found
