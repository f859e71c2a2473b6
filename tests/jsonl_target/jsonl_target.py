"""A JSON-lines target: the worked example of adding a target (README, "Adding a target").

`itwinai-sync SAVEDIR --to jsonl [--dir DIR]` writes one file per journal rank,
`DIR/<experiment>/<run_id>/rank-<rank:05d>.jsonl` (DIR: SAVEDIR/jsonl by default), one line per
record (the record's journal columns as a JSON object), exactly once. Its one option, `--dir`,
is declared as data; Prov4ML has a `--dir` of its own, so which target it is for is said with
`--to`. It is registered by the entry point `jsonl`
of the group `itwinai_sync.exporters` (`jsonl_target-0.1.dist-info/entry_points.txt` beside
this module), so putting this directory on PYTHONPATH is all it takes to use it.

Exactly once, at the target: the cursor lives beside the file, in `rank-<rank:05d>.cursor`,
with the length of the file it covers. A batch appends its lines and fsyncs them, then replaces
the cursor file atomically: that rename is the commit. A sync killed in between leaves lines
past the committed length; the next export cuts them off before it appends, so they are written
once. A reader that must not see such lines reads the file up to the committed length.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_journal.format.fsio import read_json, write_atomic
from itwinai_journal.format.names import experiment_dirname
from itwinai_sync.api import (
    LOCK_DIR,
    Exporter,
    RankSink,
    TargetOption,
    claim_journal_dir,
    find_journal_dir,
)


class JsonlExporter(Exporter):
    name = "jsonl"
    #: The kinds whose value a JSON line holds in full (no blob).
    kinds = frozenset({"metric", "param", "text", "dict"})
    cli_options = (
        TargetOption("--dir", key="root", type="dir", metavar="DIR",
                     help="JSON-lines directory (default: SAVEDIR/jsonl)."),
    )

    @property
    def root(self) -> Path:
        return Path(self.options.get("root") or self.savedir / "jsonl")

    def target_key(self, run: RunInfo) -> str:
        return f"jsonl:{self.root.resolve()}"

    def lock_dir(self, run: RunInfo) -> Path:
        return self.root / LOCK_DIR

    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        run_dir = find_journal_dir(self.root / experiment_dirname(run.experiment), run.run_id,
                                   run)
        if not create and (run_dir is None or not cursor_path(run_dir, rank.rank).exists()):
            return None
        return JsonlSink(self, run, rank, run_dir)


def lines_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank-{rank:05d}.jsonl"


def cursor_path(run_dir: Path, rank: int) -> Path:
    return run_dir / f"rank-{rank:05d}.cursor"


class JsonlSink(RankSink):
    def __init__(self, exporter: JsonlExporter, run: RunInfo, rank: RankInfo,
                 run_dir: Path | None):
        super().__init__(run, rank, exporter.notes)
        self.exporter = exporter
        #: The journal's directory at the target; None until the first export claims it.
        self.run_dir = run_dir

    def committed(self) -> tuple[int, int]:
        """(cursor, length of the file it covers) as the target holds them."""
        if self.run_dir is None:
            return 0, 0
        try:
            state = read_json(cursor_path(self.run_dir, self.rank.rank))
        except FileNotFoundError:
            return 0, 0
        return int(state["cursor"]), int(state["bytes"])

    def cursor(self) -> int:
        return self.committed()[0]

    def export(self, batch: pa.Table, cursor: int) -> None:
        if self.run_dir is None:
            parent = self.exporter.root / experiment_dirname(self.run.experiment)
            self.run_dir = claim_journal_dir(parent, self.run.run_id, self.run, self.notes,
                                             "jsonl")
        _, length = self.committed()
        body = "".join(json.dumps(row) + "\n" for row in batch.to_pylist()).encode()
        fd = os.open(lines_path(self.run_dir, self.rank.rank), os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            os.ftruncate(fd, length)  # what a killed export appended past the commit
            os.lseek(fd, length, os.SEEK_SET)
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        state = {"cursor": cursor, "bytes": length + len(body)}
        write_atomic(cursor_path(self.run_dir, self.rank.rank), json.dumps(state).encode())
