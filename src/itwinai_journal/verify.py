"""`verify`: check a journal against its own record of itself (hash chain, checksums, seq)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import segments
from .blobs import file_sha256
from .reader import RankInfo, find_run_dirs, load_run


@dataclass(frozen=True)
class Problem:
    severity: str  # 'error': data is damaged or missing; 'warning': harmless (e.g. torn tail)
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


def verify(savedir: str | os.PathLike) -> list[Problem]:
    """Every problem found below `savedir`; an empty list means the journal is intact."""
    problems: list[Problem] = []
    for run_dir in find_run_dirs(Path(savedir)):
        try:
            run = load_run(run_dir)
        except (OSError, ValueError) as e:
            problems.append(Problem("error", str(run_dir), f"unreadable run: {e}"))
            continue
        for rank in run.ranks:
            problems.extend(verify_rank(rank))
    return problems


def verify_rank(rank: RankInfo) -> list[Problem]:
    out: list[Problem] = []
    rank_dir = rank.path

    def err(path: Path | str, msg: str, severity: str = "error") -> None:
        out.append(Problem(severity, str(path), msg))

    if not rank.manifest:
        err(rank_dir / "manifest.json", "no manifest yet: the process was stopped while opening "
            "the rank (the next session of this rank writes it)", "warning")
    entries, index_problems = segments.read_index(rank_dir)
    for p in index_problems:
        err(rank_dir / segments.INDEX_NAME, p)
    indexed = {e["segment"]: e for e in entries}
    seg_dir = rank_dir / "segments"
    blobs_used: set[str] = set()
    last = 0
    for number, files in segments.segment_files(seg_dir).items():
        entry = indexed.pop(number, None)
        if "parquet" in files:
            path = files["parquet"]
            if entry is None:
                err(path, "sealed segment not yet in the index (the process was stopped while "
                    "sealing; the next session of this rank indexes it)", "warning")
            elif file_sha256(path) != entry["sha256"]:
                err(path, "sha256 differs from the index: the sealed segment was modified")
            try:
                table = segments.read_parquet(path)
            except segments.JournalCorruption as e:
                err(path, str(e))
                continue
            if entry is not None and (entry["count"] != table.num_rows):
                err(path, f"index says {entry['count']} records, file has {table.num_rows}")
            if "jsonl" in files:
                err(files["jsonl"], "leftover active segment beside its sealed copy "
                    "(removed on the next session)", "warning")
        else:
            path = files["jsonl"]
            try:
                got = segments.read_jsonl(path)
            except segments.JournalCorruption as e:
                err(path, str(e))
                continue
            if got.torn_tail:
                err(path, "torn last line (a write cut short by a crash); readers ignore it",
                    "warning")
            table = segments.rows_to_table(got.rows)
        problems, last = segments.seq_problems(table["seq"], last, str(path))
        for p in problems:
            err(path, p.split(": ", 1)[1])
        blobs_used.update(b for b in table["blob"].to_pylist() if b)
    for number, entry in indexed.items():
        err(seg_dir / entry.get("file", str(number)), "indexed segment file is missing")
    out.extend(_verify_blobs(rank_dir / "blobs", blobs_used))
    return out


def _verify_blobs(blob_dir: Path, used: set[str]) -> list[Problem]:
    out: list[Problem] = []
    present: set[str] = set()
    if blob_dir.exists():
        for path in blob_dir.glob("*/*"):
            present.add(path.name)
            if file_sha256(path) != path.name:
                out.append(Problem("error", str(path), "blob content does not match its sha256"))
    trees = []
    for sha in used & present:
        try:
            with open(blob_dir / sha[:2] / sha, "rb") as f:
                head = f.read(12)
            if head.startswith(b'{"files":'):
                trees.append(json.loads((blob_dir / sha[:2] / sha).read_bytes()))
        except (OSError, ValueError):
            continue
    for tree in trees:
        used |= {f["sha256"] for f in tree.get("files", [])}
    for sha in sorted(used - present):
        out.append(Problem("error", str(blob_dir / sha[:2] / sha), "referenced blob is missing"))
    return out
