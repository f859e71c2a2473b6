"""Following journals that are still being written: the records each rank wrote since the last
look, each (run, rank, seq) once, and how far a live rank has written.

A live rank's records are in sealed Parquet segments (which never change) and in one active
JSONL segment that grows line by line and is, at some moment, replaced by its sealed copy. A
follower reads each sealed segment once and the active one from the byte offset it reached
last time, complete lines only, with the decoder of `format.segments` (the one the reader and
the verifier use). When the segment it follows is sealed in between (the JSONL gone, the
Parquet there), the Parquet file is read and the records already returned are skipped by seq:
nothing is returned twice or missed, whatever moment a read lands on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from itwinai_journal.format import segments
from itwinai_journal.read.journal import RankInfo, RunInfo, find_run_dirs, load_run, runs_named

#: Bytes read from the end of an active segment to find its last record (more when one record
#: is longer).
TAIL_BYTES = 8192


@dataclass
class NewRecords:
    """Records of one rank not returned by an earlier poll, in seq order."""

    run: RunInfo
    rank: int
    table: pa.Table


@dataclass
class _RankCursor:
    seq: int = 0  # highest seq read (any kind): every record at or below it was handled
    sealed: set[int] = field(default_factory=set)  # sealed segments read to the end
    jsonl: tuple[int, int] | None = None  # (segment, byte offset of the next unread line)


class Follower:
    """New records of the runs under a savedir (or of one run), each (run, rank, seq) once.

    `select` keeps the records a caller wants from each table read (all by default); the
    cursor moves past the others all the same. Runs that appear later, and ranks that appear
    in a run later, are picked up by the next poll."""

    def __init__(self, savedir: str | os.PathLike, run_id: str | None = None,
                 select: Callable[[pa.Table], pa.Table] | None = None):
        self.savedir = Path(savedir)
        self.run_id = run_id
        self.select = select or (lambda t: t)
        self._cursors: dict[tuple[str, str, int], _RankCursor] = {}

    def runs(self) -> list[RunInfo]:
        """The runs followed now. A damaged run, or one half-written while we looked, is left
        out (the next poll sees it once it can be read). A KeyError when the run id names runs
        of several experiments."""
        runs = []
        for d in find_run_dirs(self.savedir):
            run = load_run(d)
            if not run.error:
                runs.append(run)
        return runs_named(runs, None if self.run_id is None else [self.run_id], unique=True)

    def poll(self, last: int | None = None) -> list[NewRecords]:
        """The selected records written since the last poll, per rank. `last`: per rank, only
        the newest segments needed to hold `last` selected records are read (the older ones
        are then known to hold nothing newer and are never read)."""
        out = []
        for run in self.runs():
            for r in run.ranks:
                cur = self._cursors.setdefault((run.experiment, run.run_id, r.rank),
                                               _RankCursor())
                tables = self._poll_rank(r, cur, last)
                if tables:
                    out.append(NewRecords(run, r.rank, pa.concat_tables(tables)))
        return out

    def _poll_rank(self, rank: RankInfo, cur: _RankCursor, last: int | None) -> list[pa.Table]:
        seg_dir = rank.path / "segments"
        files = segments.segment_files(seg_dir)
        numbers = [n for n in files if n not in cur.sealed]
        if last is None:
            tables = []
            for number in numbers:
                table, top = self._read_segment(seg_dir, number, files[number], cur)
                cur.seq = max(cur.seq, top)
                tables.append(table)
            return [t for t in tables if t.num_rows]
        # Newest segments first until `last` selected records are found.
        chunks: list[pa.Table] = []
        found = 0
        newest = cur.seq
        for i, number in enumerate(reversed(numbers)):
            table, top = self._read_segment(seg_dir, number, files[number], cur)
            newest = max(newest, top)
            chunks.append(table)
            found += table.num_rows
            if found >= last:
                for older in numbers[:len(numbers) - i - 1]:
                    if "parquet" in files[older]:
                        cur.sealed.add(older)
                break
        cur.seq = newest
        return [t for t in reversed(chunks) if t.num_rows]

    def _read_segment(self, seg_dir: Path, number: int, present: dict[str, Path],
                      cur: _RankCursor) -> tuple[pa.Table, int]:
        """The selected new records of one segment (seq above the cursor) and the highest seq
        it holds (0: none new)."""
        table = None
        if "parquet" not in present:
            table = self._read_active(seg_dir / segments.segment_name(number, "jsonl"), number,
                                      cur)
        if table is None:  # sealed, maybe just now
            try:
                table = segments.read_parquet(seg_dir / segments.segment_name(number, "parquet"))
            except FileNotFoundError:
                return segments.ARROW_SCHEMA.empty_table(), 0  # replaced: seen next poll
            cur.sealed.add(number)
            if cur.jsonl and cur.jsonl[0] == number:
                cur.jsonl = None
        if table.num_rows:
            import pyarrow.compute as pc

            table = table.filter(pc.greater(table["seq"], cur.seq))
        top = table["seq"][table.num_rows - 1].as_py() if table.num_rows else 0
        return self.select(table), top

    @staticmethod
    def _read_active(path: Path, number: int, cur: _RankCursor) -> pa.Table | None:
        """Records of the complete lines appended since the last read; None when the file is
        gone (sealed). A damaged line is skipped (`verify` reports it)."""
        offset = cur.jsonl[1] if cur.jsonl and cur.jsonl[0] == number else 0
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:  # cut back after a failed append
                    offset = 0
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return None
        got = segments.decode_jsonl(data, str(path), strict=False)
        cur.jsonl = (number, offset + got.end)
        return segments.rows_to_table(got.rows)


def written_seq(rank: RankInfo) -> int:
    """The highest seq a rank has written: its manifest and index know the sealed segments, the
    last complete record line of its active segment (read from the file's end) the rest. A live
    rank's manifest lags by up to a segment, which would make a run look up to date while a
    whole outage's records wait."""
    last = rank.last_seq
    active = [f["jsonl"] for f in segments.segment_files(rank.path / "segments").values()
              if "jsonl" in f]
    if not active:
        return last
    try:
        return max(last, _last_line_seq(active[-1]))
    except OSError:
        return last


def _last_line_seq(path: Path) -> int:
    """The seq of the last complete record line of a JSONL segment (0: none), read from the
    end of the file: TAIL_BYTES at first, more while no complete line is in them."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        want = TAIL_BYTES
        while True:
            start = max(0, size - want)
            f.seek(start)
            data = f.read(size - start)
            if start:  # the first line may be cut: begin after its end
                data = data[data.find(b"\n") + 1:] if b"\n" in data else b""
            rows = segments.decode_jsonl(data, str(path), strict=False).rows
            if rows or start == 0:
                return max((row[0] for row in rows), default=0)
            want *= 4
