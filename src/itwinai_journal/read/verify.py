"""`verify`: check a journal against its own record of itself.

Every fact that matters for what a sync exports is recorded in two places that are written at
different times, so that changing one copy shows:

- a sealed segment's bytes: the file, and its sha256 in its index entry;
- the index: each line carries the hash of the line before (a chain), and each session records
  in the manifest the number of index lines and the hash of the last one at its start and end;
- which records a rank holds: the segments, and each session's first and last seq in the
  manifest (seq is contiguous per rank);
- run.json and the declared destinations: the files, and their digests in the index entry of
  the last seal (a session that declared something after its last seal seals an empty segment
  at its end, so a closed rank's last entry always matches);
- a blob: its bytes, and its name (their sha256).

What this cannot prove without a key: anyone who can write the journal can rewrite every copy
of a fact consistently (recompute the hashes, the chain, the manifest). `digest` condenses the
whole state into one value that can be recorded somewhere the journal's writers cannot reach
(the job's output, a lab notebook) and compared later (`itwinai-sync verify --expect`).
Also outside the cross-checks until the session ends: the tail of a session that is still
running or was killed (its active JSONL segment, segments sealed since it started, destinations
declared since its last seal), and the fields kept in one copy only (a session's host, argv,
times and status; versions, job variables).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itwinai_journal.format import segments
from itwinai_journal.format.blobs import BlobStore, file_sha256
from itwinai_journal.format.validate import BLOB_REF, RANK_DIR, JournalCorruption, check_records

from .journal import RankInfo, RunInfo, find_run_dirs, load_run, runs_named


@dataclass(frozen=True)
class Problem:
    severity: str  # 'error': data is damaged or missing; 'warning': harmless (e.g. torn tail)
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.message}"


def verify(savedir: str | os.PathLike, run_ids: Sequence[str] | None = None) -> list[Problem]:
    """Every problem found below `savedir` (in the runs named by id or experiment/id, when
    given); an empty list means the journal is intact."""
    problems: list[Problem] = []
    for run in _runs(savedir, run_ids):
        problems.extend(verify_run(run))
    return problems


def _runs(savedir: str | os.PathLike, run_ids: Sequence[str] | None) -> list[RunInfo]:
    return runs_named([load_run(d) for d in find_run_dirs(Path(savedir))], run_ids)


def verify_run(run: RunInfo) -> list[Problem]:
    out: list[Problem] = []
    if run.error and run.error not in {r.error for r in run.ranks}:
        out.append(Problem("error", *_split(run.error)))
    try:
        names = os.listdir(run.path)
    except OSError:
        names = []
    for name in sorted(names):
        if name.startswith("rank-") and not RANK_DIR.fullmatch(name):
            out.append(Problem("warning", str(run.path / name), "not a rank directory (rank-"
                               "NNNNN): ignored by every reader"))
    try:
        run_sha: str | None = file_sha256(run.path / "run.json")
    except OSError:
        run_sha = None
    for rank in run.ranks:
        out.extend(verify_rank(rank, run_sha))
    return out


def _split(error: str) -> tuple[str, str]:
    """'PATH: message' (as `load_run` words its errors) -> (path, message)."""
    path, _, message = error.partition(": ")
    return (path, message) if message else ("", error)


def verify_rank(rank: RankInfo, run_sha: str | None = None) -> list[Problem]:
    """Problems of one rank; `run_sha` is the sha256 of its run's run.json (None: unreadable)."""
    out: list[Problem] = []
    rank_dir = rank.path

    def err(path: Path | str, msg: str, severity: str = "error") -> None:
        out.append(Problem(severity, str(path), msg))

    from itwinai_journal.format.manifest import (
        session_ended,  # not at import: `import itwinai_journal` stays light
    )

    m = rank.manifest
    sessions: list[dict[str, Any]] = m.get("sessions") or []
    # A rank whose last session has not ended (or never started) may be cut anywhere by a kill.
    closed = bool(sessions) and session_ended(sessions[-1])
    entries, hashes, index_problems = segments.read_index_lines(rank_dir)
    for p in index_problems:
        err(rank_dir / segments.INDEX_NAME, p.split(": ", 1)[1])
    seg_dir = rank_dir / "segments"
    files = segments.segment_files(seg_dir)

    if rank.error:
        err(*_split(rank.error))
    elif not m:
        aside = list(rank_dir.glob("manifest.json.damaged-*"))
        holds_records = bool(entries) or any(
            "parquet" in f or os.path.getsize(f["jsonl"]) for f in files.values())
        if holds_records and not aside:
            err(rank_dir / "manifest.json", "missing, but the rank holds records: deleted?")
        else:
            err(rank_dir / "manifest.json", "no manifest yet: the process was stopped while "
                "opening the rank (the next session of this rank writes it)", "warning")
    if isinstance(m.get("rebuilt"), dict):
        rebuilt = m["rebuilt"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rebuilt.get("time") or 0))
        err(rank_dir / "manifest.json", f"rebuilt on {when} from a damaged manifest, kept as "
            f"{rebuilt.get('damaged_copy')}: sessions before then are summarised as one",
            "warning")

    known = {e["segment"] for e in entries}
    if any("parquet" in f and n not in known for n, f in files.items()):
        # A live rank: a segment sealed after the index was read is indexed by now (its
        # Parquet file is renamed into place before its index line is written). Segments
        # sealed after the listing are for the next verify.
        entries, hashes, _ = segments.read_index_lines(rank_dir)
        entries = [e for e in entries if e["segment"] in known or e["segment"] in files]
    indexed = {e["segment"]: e for e in entries}
    last_number = max(files, default=0)
    newest_indexed = max(indexed, default=0)
    blobs_used: set[str] = set()
    trees: set[str] = set()
    last = 0
    for number, found in files.items():
        entry = indexed.pop(number, None)
        table = None
        if "jsonl" in found and "parquet" not in found:
            path = found["jsonl"]
            try:
                got = segments.read_jsonl(path)
            except FileNotFoundError:
                # Sealed since the listing (a verify of a live rank): read its sealed copy.
                found = segments.segment_files(seg_dir).get(number, {})
                if "parquet" not in found:
                    err(path, "active segment vanished while it was read, and no sealed copy "
                        "of it came: removed?")
                    continue
                err(found["parquet"], "sealed while verify read it: checked as sealed",
                    "warning")
                entry = entry or _index_entry(rank_dir, number)
            except (OSError, JournalCorruption) as e:
                err(path, str(e))
                continue
            else:
                if number != last_number:
                    err(path, "active segment before a later segment: only a rank's last "
                        "segment is ever active")
                if got.torn_tail:
                    err(path, "torn last line (a write cut short by a crash); readers ignore "
                        "it", "warning")
                table = segments.rows_to_table(got.rows)
                if entry is not None:
                    _mid_seal_copy(path, entry, table, closed, err)
        if table is None:
            path = found["parquet"]
            if entry is None:
                if number == last_number and not closed:
                    err(path, "sealed segment not yet in the index (the process was stopped "
                        "while sealing; the next session of this rank indexes it)", "warning")
                elif (not closed and number == last_number - 1 > newest_indexed
                      and "parquet" not in files[last_number]):
                    err(path, "sealed segment not in the index as read, followed by the active "
                        "segment only: the rank was copied (or read) during this segment's "
                        "seal (copy it again once the seal is over)", "warning")
                else:
                    err(path, "sealed segment missing from the index: the index was cut or "
                        "edited")
            try:
                sha = file_sha256(path)
                table = segments.read_parquet(path)
            except (OSError, JournalCorruption) as e:
                err(path, f"unreadable ({e})")
                continue
            if entry is not None and sha != entry["sha256"]:
                err(path, "sha256 differs from the index: the sealed segment was modified")
            if entry is not None:
                out.extend(_entry_problems(path, entry, table))
            if "jsonl" in found:
                err(found["jsonl"], "leftover active segment beside its sealed copy "
                    "(removed on the next session)", "warning")
        problems, last = segments.seq_problems(table["seq"], last, str(path))
        for p in problems:
            err(path, p.split(": ", 1)[1])
        try:
            check_records(table, str(path))
        except JournalCorruption as e:
            err(path, str(e).split(": ", 1)[1])
        blobs_used.update(b for b in table["blob"].to_pylist() if b and BLOB_REF.fullmatch(b))
        trees.update(_tree_refs(table))
    for number, entry in indexed.items():
        err(seg_dir / entry.get("file", str(number)), "indexed segment file is missing")
    if m:
        where = rank_dir / "manifest.json"
        out.extend(Problem("error", str(where), p) for p in _session_problems(sessions, last))
        out.extend(Problem("error", str(where), p) for p in _anchor_problems(sessions, hashes))
        out.extend(_digest_problems(where, m, entries, run_sha, closed))
    out.extend(_verify_blobs(BlobStore(rank_dir / "blobs"), blobs_used, trees))
    return out


def _index_entry(rank_dir: Path, number: int) -> dict[str, Any] | None:
    """Segment `number`'s index entry as the index is now."""
    entries, _, _ = segments.read_index_lines(rank_dir)
    return next((e for e in entries if e["segment"] == number), None)


def _mid_seal_copy(path: Path, entry: dict[str, Any], table: Any, closed: bool,
                   err: Callable[..., None]) -> None:
    """An indexed segment of which only the active JSONL is here: what a copy of a rank still
    being written holds when it was taken during that segment's seal (the JSONL copied before
    the Parquet file was renamed into place, the index after its line was written). A warning
    when the JSONL holds exactly the records the index entry describes; else an error."""
    if _entry_problems(path, entry, table) or closed:
        err(path, f"the index lists segment {entry['segment']} as sealed, but only its active "
            "segment is here, and it does not hold what the index says (or the session ended)")
    else:
        err(path, f"the index lists segment {entry['segment']} as sealed, but only its active "
            "segment is here, holding the records the index lists: the rank was copied (or "
            "read) during this segment's seal (copy it again once the seal is over)", "warning")


def _entry_problems(path: Path, entry: dict[str, Any], table: Any) -> list[Problem]:
    n = table.num_rows
    first = table["seq"][0].as_py() if n else None
    last = table["seq"][n - 1].as_py() if n else None
    if entry["count"] != n:
        return [Problem("error", str(path), f"index says {entry['count']} records, file has {n}")]
    if (entry.get("first_seq"), entry.get("last_seq")) != (first, last):
        return [Problem("error", str(path), f"index says seq {entry.get('first_seq')}.."
                        f"{entry.get('last_seq')}, file has {first}..{last}")]
    return []


def _tree_refs(table: Any) -> set[str]:
    """Blobs that are directory listings: those of records whose meta says type 'directory'."""
    meta = table["meta"]
    if meta.null_count == table.num_rows:
        return set()
    import pyarrow.compute as pc

    dirs = table.filter(pc.fill_null(pc.match_substring(meta, '"directory"'), False))
    refs = set()
    for blob, text in zip(dirs["blob"].to_pylist(), dirs["meta"].to_pylist()):
        try:
            if blob and BLOB_REF.fullmatch(blob) and json.loads(text).get("type") == "directory":
                refs.add(blob)
        except (ValueError, AttributeError):
            continue
    return refs


def _session_problems(sessions: list[dict[str, Any]], top: int) -> list[str]:
    """The manifest's sessions against the records, whose seqs run 1..`top` without gaps (gaps
    are reported on their own). A closed session says where its records ended; a session that
    was killed (still 'running', or marked 'interrupted' by SIGTERM without an end) says only
    where it started."""
    from itwinai_journal.format.manifest import session_ended

    out = []
    prev_end: int | None = 0
    for i, s in enumerate(sessions, 1):
        first, last = s.get("first_seq"), s.get("last_seq")
        closed = session_ended(s)
        if first is not None:
            if prev_end is not None and first != prev_end + 1:
                out.append(f"session {i} starts at seq {first}, but the session before ended at "
                           f"seq {prev_end}")
            if first - 1 > top:
                out.append(f"session {i} started after seq {first - 1}, but the records end at "
                           f"seq {top}: records {top + 1}..{first - 1} are missing")
        if closed and last is not None:
            if last > top:
                out.append(f"session {i} ended at seq {last}, but the records end at seq {top}:"
                           f" records {top + 1}..{last} are missing")
            prev_end = last
        else:
            prev_end = None
    if sessions and session_ended(sessions[-1]):
        last = sessions[-1].get("last_seq")
        if last is not None and top > last:
            out.append(f"records {last + 1}..{top} follow the end of the last session (seq "
                       f"{last}): no session of this rank wrote them")
    return out


def _anchor_problems(sessions: list[dict[str, Any]], hashes: list[str]) -> list[str]:
    """Each session's record of the index (line count, hash of the last line) at its start and
    end, against the index as it is."""
    out = []
    for i, s in enumerate(sessions, 1):
        for key, when in (("index_start", "start"), ("index_end", "end")):
            anchor = s.get(key)
            if anchor is None:
                continue
            n = anchor.get("lines") if isinstance(anchor, dict) else None
            head = anchor.get("head") if isinstance(anchor, dict) else None
            if type(n) is not int or n < 0 or not isinstance(head, str):
                out.append(f"session {i}: '{key}' is not a record of the index")
                continue
            if n > len(hashes):
                out.append(f"session {i} saw {n} index lines at its {when}, the index has "
                           f"{len(hashes)}: index lines were removed")
            elif (hashes[n - 1] if n else "") != head:
                out.append(f"index line {n} is not the one session {i} saw at its {when}: the "
                           "index was rewritten")
    return out


def _digest_problems(where: Path, m: dict[str, Any], entries: list[dict[str, Any]],
                     run_sha: str | None, closed: bool) -> list[Problem]:
    """run.json and the declared destinations against their digests in the last index entry
    that has them. A rank still running may have declared since: a warning only."""
    from itwinai_journal.format.manifest import destinations_digest

    anchored = segments.last_anchors(entries)
    if anchored is None:
        return []
    changed = []
    if anchored["destinations_sha256"] != destinations_digest(m.get("destinations") or {}):
        changed.append("the declared destinations")
    if run_sha is not None and anchored["run_sha256"] != run_sha:
        changed.append("run.json")
    if not changed:
        return []
    what = " and ".join(changed)
    if closed:
        return [Problem("error", str(where), f"{what} differ from what the index recorded at "
                        "the last seal: edited after the session ended")]
    return [Problem("warning", str(where), f"{what} differ from what the index recorded at the "
                    "last seal: changed by the session still running (or edited); checked "
                    "when it ends")]


def _verify_blobs(store: BlobStore, used: set[str], trees: set[str]) -> list[Problem]:
    out: list[Problem] = []
    present: set[str] = set()
    root = store.root
    for path in sorted(root.glob("*/*")) if root.exists() else ():
        if path.is_symlink():
            out.append(Problem("error", str(path), "a blob is a symbolic link; readers refuse "
                               "it"))
        elif not BLOB_REF.fullmatch(path.name) or path.parent.name != path.name[:2]:
            out.append(Problem("warning", str(path), "not a blob (misnamed or misplaced): "
                               "ignored by every reader"))
        elif _sha_or_missing(path) != path.name:
            out.append(Problem("error", str(path), "blob content does not match its sha256 "
                               "(or is unreadable)"))
        else:
            present.add(path.name)
    for sha in sorted(trees & present):
        try:
            used |= {f["sha256"] for f in store.tree(sha)}
        except JournalCorruption as e:
            out.append(Problem("error", str(store.path(sha)), str(e).split(": ", 1)[1]))
    for sha in sorted(used - present):
        out.append(Problem("error", str(root / sha[:2] / sha), "referenced blob is missing"))
    return out


def digest(savedir: str | os.PathLike, run_ids: Sequence[str] | None = None) -> str:
    """One sha256 over the state of every run below `savedir` (or those named): each run's
    run.json, and per rank its manifest, its index head and any active segment. With `verify`
    clean, the index head stands for every sealed segment and every blob they refer to.
    Record it out of band; the same value later means nothing changed (paths do not count:
    a copy of the savedir elsewhere has the same digest)."""
    h = hashlib.sha256()
    for line in sorted(_run_state(run) for run in _runs(savedir, run_ids)):
        h.update(line.encode() + b"\n")
    return h.hexdigest()


def _run_state(run: RunInfo) -> str:
    parts = [run.key, _sha_or_missing(run.path / "run.json")]
    for rank in run.ranks:
        head = segments.index_head(rank.path)
        active = [f"{n}:{_sha_or_missing(f['jsonl'])}"
                  for n, f in segments.segment_files(rank.path / "segments").items()
                  if "jsonl" in f]
        parts.append(f"rank {rank.rank} manifest {_sha_or_missing(rank.path / 'manifest.json')}"
                     f" index {head['lines']} {head['head']} active {','.join(active)}")
    return " | ".join(parts)


def _sha_or_missing(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError:
        return "unreadable"
