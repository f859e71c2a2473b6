"""Reading journals without any tracker: runs from manifests, records as pyarrow Tables.

A journal is untrusted input: `load_run` checks run.json, rank directory names and manifests
(`validate`) and never raises for damaged content. A run it cannot trust carries the reason in
`RunInfo.error`; `Journal.runs()` leaves such runs out with a warning, `Journal.scan()` returns
them too, for the commands that report them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from itwinai_journal.format import segments
from itwinai_journal.format.blobs import BlobStore
from itwinai_journal.format.fsio import open_regular, read_bytes, read_json
from itwinai_journal.format.manifest import session_ended
from itwinai_journal.format.validate import (
    DAMAGED,
    RANK_DIR,
    JournalCorruption,
    check_manifest,
    check_run_info,
)

METRIC_COLUMNS = ["seq", "time", "name", "step", "batch_idx", "value"]
_JOURNAL_ID = re.compile(r"^[0-9a-f]{32}$")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, (str, int, float)) and value != "" else None


@dataclass(frozen=True)
class Session:
    """One session of a rank's writer (one process that opened the rank), as its manifest
    records it, typed once here so that the exporters never read manifest fields by hand. A
    field the manifest lacks or holds with the wrong type (an old or damaged journal) is None
    (argv: empty)."""

    status: str
    #: Unix times the session started and ended (end: None while it runs, or when unknown).
    start: float | None
    end: float | None
    first_seq: int | None
    last_seq: int | None
    host: str | None
    pid: int | None
    argv: tuple[str, ...]
    cwd: str | None
    #: Whether it has ended and says where its records end (see `session_ended`).
    closed: bool

    @classmethod
    def of(cls, session: Any) -> Session:
        s = session if isinstance(session, dict) else {}
        argv = s.get("argv")
        return cls(status=str(s.get("status") or "unknown"), start=_number(s.get("start")),
                   end=_number(s.get("end")), first_seq=_int_or_none(s.get("first_seq")),
                   last_seq=_int_or_none(s.get("last_seq")), host=_text(s.get("host")),
                   pid=_int_or_none(s.get("pid")),
                   argv=tuple(str(a) for a in argv) if isinstance(argv, list) else (),
                   cwd=_text(s.get("cwd")), closed=bool(s) and session_ended(s))


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int else None


@dataclass
class RankInfo:
    rank: int
    path: Path
    manifest: dict[str, Any]
    #: Why the manifest (or the index) cannot be trusted (then `manifest` may be empty), else
    #: None.
    error: str | None = None
    #: The index's last seq as `load_run` read it (None: read when `last_seq` is asked).
    index_last_seq: int | None = None

    @functools.cached_property
    def sessions(self) -> tuple[Session, ...]:
        """The rank's writer sessions, oldest first."""
        return tuple(Session.of(s) for s in self.manifest.get("sessions") or [])

    @property
    def started(self) -> float | None:
        """When the rank's first session started (None when the manifest does not say)."""
        return self.sessions[0].start if self.sessions else None

    @property
    def ended(self) -> float | None:
        """When the rank's last session ended, once the rank has ended (else None)."""
        last = self.sessions[-1] if self.sessions else None
        return last.end if last is not None and self.status != "running" else None

    @property
    def host(self) -> str | None:
        """The compute node the rank ran on: its first session's, else the manifest's."""
        first = self.sessions[0].host if self.sessions else None
        return first or _text(self.manifest.get("host"))

    @functools.cached_property
    def blobs(self) -> BlobStore:
        """The rank's content-addressed payloads (artifacts, models, images, long texts)."""
        return BlobStore(self.path / "blobs")

    @property
    def status(self) -> str:
        # Imported here: manifest.py pulls in importlib.metadata, subprocess and socket, which
        # listing runs does not need.
        from itwinai_journal.format.manifest import session_status

        return session_status(self.manifest)

    @property
    def last_seq(self) -> int:
        """Highest seq known without opening segments: the last closed session or the index.
        When the last session has ended its last_seq is the rank's last (the index never goes
        beyond it), and the index is not opened: `ls` of a thousand ranks reads manifests
        only. An index that cannot be read counts as empty (`load_run` reports it)."""
        sessions = self.manifest.get("sessions") or []
        closed = max((s.get("last_seq") or 0 for s in sessions), default=0)
        last = sessions[-1] if sessions else None
        if (isinstance(last, dict) and session_ended(last)
                and type(last.get("last_seq")) is int):
            return closed
        indexed = self.index_last_seq
        if indexed is None:
            try:
                indexed = _index_last_seq(self.path)
            except OSError:
                indexed = 0
        return max(closed, indexed)


@dataclass
class RunInfo:
    experiment: str
    run_id: str
    path: Path
    info: dict[str, Any]
    ranks: list[RankInfo] = field(default_factory=list)
    #: Why this run cannot be listed or synced (a damaged run.json or manifest), else None.
    #: A damaged run's experiment and run_id are its directory names, for messages only.
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.experiment}/{self.run_id}"

    @functools.cached_property
    def journal_id(self) -> str:
        """This journal's identity (32 hex digits): run.json's `journal_id`, or, for journals
        written before it existed, the sha256 of run.json's bytes (cut to 32 digits). run.json
        is written once and never changed, so both stay the same for a resumed job and for a
        copy of the journal, and differ between two journals that share an experiment and a
        run id (run.json holds its creation time to the microsecond)."""
        given = self.info.get("journal_id")
        if isinstance(given, str) and _JOURNAL_ID.match(given):
            return given
        try:
            data = read_bytes(self.path / "run.json")
        except OSError:
            data = json.dumps(self.info, sort_keys=True).encode()
        return hashlib.sha256(data).hexdigest()[:32]

    @property
    def status(self) -> str:
        """'running' while any rank runs; else the worst final status of the ranks."""
        statuses = {r.status for r in self.ranks}
        for s in ("running", "failed", "interrupted"):
            if s in statuses:
                return s
        return "finished" if statuses else "empty"

    @property
    def records(self) -> int:
        return sum(r.last_seq for r in self.ranks)

    def destinations(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for r in self.ranks:
            for target, opts in (r.manifest.get("destinations") or {}).items():
                merged.setdefault(target, opts)
        return merged

    def rank(self, rank: int) -> RankInfo:
        for r in self.ranks:
            if r.rank == rank:
                return r
        raise KeyError(f"run {self.key} has no rank {rank}")


def _index_last_seq(rank_dir: Path) -> int:
    """last_seq of the index's final line, read from the end of the file (cheap for `ls`).
    0 without an index; OSError when it cannot be read or is not a regular file (a FIFO would
    make the read wait for ever)."""
    try:
        fd = open_regular(os.path.join(rank_dir, segments.INDEX_NAME))
    except FileNotFoundError:
        return 0
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        tail = os.pread(fd, 4096, max(0, size - 4096)).split(b"\n")
    finally:
        os.close(fd)
    for line in reversed(tail):
        if line.strip():
            try:
                last = json.loads(line).get("last_seq")
            except (ValueError, AttributeError):
                continue
            return last if type(last) is int else 0
    return 0


def load_run(run_dir: Path) -> RunInfo:
    """The run in `run_dir`, checked: never raises for damaged content (see `RunInfo.error`)."""
    error = None
    try:
        info = read_json(run_dir / "run.json")
        experiment, run_id = check_run_info(info, run_dir)
    except FileNotFoundError:
        error = f"{run_dir}: run.json is missing (the next session of this run writes it)"
    except DAMAGED as e:
        error = f"{run_dir / 'run.json'}: damaged ({_reason(e)})"
    if error is not None:
        info, experiment, run_id = {}, run_dir.parent.name, run_dir.name
    run = RunInfo(experiment, run_id, run_dir, info, error=error)
    try:
        with os.scandir(run_dir) as entries:
            rank_entries = sorted((e for e in entries if RANK_DIR.fullmatch(e.name) and e.is_dir()),
                                  key=lambda e: e.name)
    except OSError as e:
        run.error = run.error or f"{run_dir}: unreadable ({_reason(e)})"
        return run
    for entry in rank_entries:
        rank = RankInfo(int(entry.name[5:]), Path(entry.path), {})
        path = os.path.join(entry.path, "manifest.json")
        try:
            rank.manifest = check_manifest(read_json(path))
        except FileNotFoundError:
            pass  # the process was stopped while opening the rank: no session yet
        except DAMAGED as e:
            rank.error = f"{path}: damaged ({_reason(e)}); the next session of this rank " \
                         "rebuilds it"
        try:
            rank.index_last_seq = _index_last_seq(rank.path)
        except OSError as e:
            rank.error = rank.error or (f"{rank.path / segments.INDEX_NAME}: unreadable "
                                        f"({_reason(e)})")
        run.error = run.error or rank.error
        run.ranks.append(rank)
    return run


def _may_be(run_dir: Path, run_id: str) -> bool:
    """Whether the run in `run_dir` may be `run_id` (an id or experiment/id), from its run.json
    alone; a run.json that cannot be read leaves it to `load_run`, which names the run after
    its directories."""
    try:
        experiment, rid = check_run_info(read_json(run_dir / "run.json"), run_dir)
    except DAMAGED:
        return True
    return run_id in (rid, f"{experiment}/{rid}")


def names_run(name: str, run: RunInfo) -> bool:
    """Whether `name` names `run`: its run id, or 'experiment/run_id'."""
    return name in (run.run_id, run.key)


def runs_named(runs: Iterable[RunInfo], names: Iterable[str] | None,
                unique: bool = False) -> list[RunInfo]:
    """The runs of `runs` that `names` name (all of them when `names` is None or empty), in
    their order: the one lookup by id of every command. Copies of one run (the same key in
    two places) all match. With `unique`, a bare run id that names runs of several
    experiments is ambiguous: a KeyError lists the keys to use instead."""
    names = set(names or ())
    if not names:
        return list(runs)
    found = [r for r in runs if any(names_run(name, r) for name in names)]
    if unique:
        for name in names:
            keys = sorted({r.key for r in found if names_run(name, r)})
            if len(keys) > 1:
                raise KeyError(f"run id {name!r} exists in several experiments; use "
                               f"experiment/run_id: {', '.join(keys)}")
    return found


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    return str(e).split("\n")[0][:200] or type(e).__name__


#: How deep below the directory given a run directory is looked for: `<experiment>/<run>` of
#: that savedir, and of journal savedirs up to two levels below it (a Prov4MLLogger's
#: `prov_logs/<experiment>/<run>`, or the savedir's parent given instead of it).
MAX_RUN_DEPTH = 4


def find_run_dirs(savedir: Path) -> Iterator[Path]:
    """Every run directory below `savedir`, in sorted order: a directory holding a run.json,
    or rank directories with segments but no run.json (listed so that the missing run.json is
    reported, not the run hidden), at most MAX_RUN_DEPTH levels down. A run directory is not
    listed here (it may hold thousands of ranks), nor searched further; hidden and unreadable
    directories are skipped, and each directory is visited once.

    A symbolic link is followed only as the layout allows one: as an experiment directory (the
    logger writes through a linked `<savedir>/<experiment>/`, e.g. to another file system),
    whose entries are runs; nothing deeper below it is searched and no link inside it is
    followed, and a link to the savedir or one of its ancestors (`/`) is not followed at all.
    So a journal holding `evil -> /` costs a look at one directory, not a walk of the file
    system."""
    root = Path(savedir)
    try:
        real = Path(os.path.realpath(root))
    except OSError:
        return
    ancestors = {str(real), *map(str, real.parents)}
    yield from _find_run_dirs(root, MAX_RUN_DEPTH, False, {}, ancestors)


def _find_run_dirs(d: Path, depth: int, linked: bool, seen: dict[tuple[int, int], int],
                   ancestors: set[str]) -> Iterator[Path]:
    """`d` if it is a run directory, else the run directories below it, `depth` levels down
    at most; `linked`: `d` is a followed link, whose entries are runs only. `seen`: the
    directories visited, with the depth they were searched to (one reached again with more
    depth left is searched again: only its runs not listed yet are listed; -1 marks a run)."""
    try:
        st = os.stat(d)
    except OSError:
        return
    key = (st.st_dev, st.st_ino)
    if seen.get(key, -2) >= depth or seen.get(key) == -1:
        return
    seen[key] = depth
    if os.path.isfile(d / "run.json"):
        seen[key] = -1
        yield d
        return
    subdirs = []
    try:
        with os.scandir(d) as entries:
            for e in entries:
                try:
                    if not e.name.startswith(".") and e.is_dir():
                        subdirs.append((e.name, e.is_symlink()))
                except OSError:
                    continue
    except OSError:
        return
    rank = next((n for n, _ in subdirs if RANK_DIR.fullmatch(n)), None)
    if rank is not None and os.path.isdir(d / rank / "segments"):
        seen[key] = -1
        yield d  # a run whose run.json is missing
        return
    if depth <= 0:
        return
    for name, is_link in sorted(subdirs):
        if is_link and (linked or _links_to_ancestor(d / name, ancestors)):
            continue
        below = min(1, depth - 1) if is_link else depth - 1
        yield from _find_run_dirs(d / name, below, is_link or linked, seen, ancestors)


def _links_to_ancestor(link: Path, ancestors: set[str]) -> bool:
    try:
        return os.path.realpath(link) in ancestors
    except OSError:
        return True


class Journal:
    """All runs below a savedir. Listing uses manifests only; records come from the segments."""

    def __init__(self, savedir: str | os.PathLike):
        self.savedir = Path(savedir)
        if not self.savedir.is_dir():
            raise FileNotFoundError(f"no journal directory at {self.savedir}")

    def scan(self) -> list[RunInfo]:
        """Every run found, damaged ones included with their `error` set (never synced or read
        from: their names come from directory names and may not be the run's)."""
        return [load_run(d) for d in find_run_dirs(self.savedir)]

    def runs(self) -> list[RunInfo]:
        """The runs that can be read. A damaged run is left out with a RuntimeWarning naming it
        and saying why; `scan()` returns it too."""
        runs = []
        for run in self.scan():
            if run.error:
                warnings.warn(f"itwinai-journal: skipping a damaged run: {run.error}",
                              RuntimeWarning, stacklevel=2)
            else:
                runs.append(run)
        return runs

    def run(self, run_id: str) -> RunInfo:
        """A run by id, or by 'experiment/run_id' when ids repeat across experiments (see
        `runs_named`); of copies of one run (an rsync copy beside the original), the one
        holding the most records, as the sync takes it. A KeyError when there is no such run,
        JournalCorruption when it is damaged."""
        # Only the runs that may be the one are loaded (their ranks' manifests read): a savedir
        # of runs with a thousand ranks each is not loaded whole to show one.
        found = runs_named(map(load_run, (d for d in find_run_dirs(self.savedir)
                                           if _may_be(d, run_id))), [run_id], unique=True)
        if not found:
            raise KeyError(f"no run {run_id!r} in {self.savedir}")
        run = max(found, key=lambda r: (not r.error, r.records))
        if run.error:
            raise JournalCorruption(f"run {run.key} is damaged: {run.error}")
        return run

    def _select(self, experiment: str | None, run_id: str | None, rank: int | None
                ) -> Iterator[tuple[RunInfo, RankInfo]]:
        for run in self.runs():
            if experiment is not None and run.experiment != experiment:
                continue
            if run_id is not None and not names_run(run_id, run):
                continue
            for r in run.ranks:
                if rank is None or r.rank == rank:
                    yield run, r

    def records(self, experiment: str | None = None, run_id: str | None = None,
                rank: int | None = None, kinds: Iterable[str] | None = None) -> pa.Table:
        """Every record (sealed and active segments) with experiment, run_id and rank columns."""
        kinds = list(kinds) if kinds is not None else None
        tables = [t for run, r in self._select(experiment, run_id, rank)
                  for t in _rank_tables(run, r, kinds)]
        return pa.concat_tables(tables) if tables else _no_records()

    @staticmethod
    def rank_records(run: RunInfo, rank: RankInfo) -> pa.Table:
        """The records of one rank of a run already found (as `records` labels them), without
        scanning the savedir again: `show` of a run with a thousand ranks reads each once."""
        tables = list(_rank_tables(run, rank, None))
        return pa.concat_tables(tables) if tables else _no_records()

    def metrics(self, experiment: str | None = None, run_id: str | None = None,
                rank: int | None = None, name: str | None = None) -> pa.Table:
        """Metric points: experiment, run_id, rank, seq, time, name, step, batch_idx, value."""
        import pyarrow.compute as pc

        t = self.records(experiment, run_id, rank, kinds=["metric"])
        if name is not None:
            t = t.filter(pc.equal(t["name"], name))
        return t.select(["experiment", "run_id", "rank", *METRIC_COLUMNS])


class RecordsMissing(JournalCorruption):
    """Records of a rank are missing from the journal (a segment deleted or not copied):
    `records_after` stops before them. `last_ok` is the last seq read before the gap,
    `missing_to` the last seq missing."""

    def __init__(self, message: str, last_ok: int, missing_to: int):
        super().__init__(message)
        self.last_ok = last_ok
        self.missing_to = missing_to


def records_after(rank: RankInfo, after: int = 0) -> Iterator[pa.Table]:
    """The rank's records with seq above `after`, in seq order, one table per segment (memory
    stays bounded by a segment), sealed segments checked against the sha256 their index entry
    recorded. The seqs are contiguous: at the first gap the records before it are yielded and
    RecordsMissing is raised, naming the indexed segments that held the missing ones; a seq
    going back is JournalCorruption. This is how a sync reads a rank: it must never move its
    cursor past a record it has not seen.

    A rank still being written is read as far as its index and manifest knew when the first
    table was asked for: a segment sealed while it is read is for the next call, not a gap."""
    index, problems = segments.read_index(rank.path)
    if problems:
        raise JournalCorruption(f"{rank.path}: {problems[0]}")
    # What must exist, known before the segments are listed (a writer renames a sealed
    # segment into place before it indexes it), so that segments sealed while we read
    # are not mistaken for missing ones.
    known = max([_int(e.get("last_seq")) for e in index]
                + [s.last_seq or 0 for s in rank.sessions], default=0)
    expected = after + 1
    for table in segments.iter_tables(rank.path / "segments", after, index):
        n = table.num_rows
        cut = _continuing(table["seq"], expected)
        if cut < n:
            if cut:
                yield table.slice(0, cut)
            seq = table["seq"][cut].as_py()
            if seq < expected + cut:
                raise JournalCorruption(f"{rank.path}: seq goes back from "
                                        f"{expected + cut - 1} to {seq}")
            raise _missing(rank, index, expected + cut - 1, seq - 1)
        yield table
        expected += n
    if expected <= known:
        raise _missing(rank, index, expected - 1, known)


def _missing(rank: RankInfo, index: list[dict[str, Any]], last_ok: int, missing_to: int
             ) -> RecordsMissing:
    """The error for records last_ok+1..missing_to missing, naming the indexed segments that
    held them when the index knows them."""
    first = last_ok + 1
    held = [str(e.get("file") or e.get("segment")) for e in index
            if isinstance(e.get("first_seq"), int) and isinstance(e.get("last_seq"), int)
            and e["first_seq"] <= missing_to and e["last_seq"] >= first]
    where = (f"segment {', '.join(held)} listed in the index is missing" if held
             else "no segment holds them")
    span = f"{first}" if first == missing_to else f"{first}..{missing_to}"
    return RecordsMissing(f"records {span} are missing from {rank.path / 'segments'} ({where})",
                          last_ok, missing_to)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _continuing(seqs: pa.ChunkedArray, expected: int) -> int:
    """How many of `seqs` go on `expected`, `expected + 1`, ... without a break: all of them
    in the common, clean case, checked in one vectorised pass."""
    import pyarrow.compute as pc

    n = len(seqs)
    if n and seqs[0].as_py() == expected and (
            n == 1 or pc.all(pc.equal(pc.pairwise_diff(seqs.combine_chunks()), 1)).as_py()):
        return n
    return next((i for i, s in enumerate(seqs.to_pylist()) if s != expected + i), n)


def _rank_tables(run: RunInfo, r: RankInfo, kinds: list[str] | None) -> Iterator[pa.Table]:
    """The rank's segments as labelled tables, only records of `kinds` when given."""
    import pyarrow.compute as pc  # not at module level: listing runs does not need it

    for t in segments.iter_tables(r.path / "segments"):
        if kinds is not None:
            wanted = (pc.equal(t["kind"], kinds[0]) if len(kinds) == 1
                      else pc.is_in(t["kind"], pa.array(kinds, pa.string())))
            if not pc.all(wanted).as_py():  # a segment of wanted kinds only is kept whole
                t = t.filter(wanted)
        if t.num_rows:
            yield _label(t, run, r)


@functools.lru_cache(maxsize=1)
def _no_records() -> pa.Table:
    """An empty table of labelled records (made once: building it costs a millisecond)."""
    return _label(segments.ARROW_SCHEMA.empty_table(), None, None)


def _label(t: pa.Table, run: RunInfo | None, r: RankInfo | None) -> pa.Table:
    n = t.num_rows
    t = t.add_column(0, "rank", pa.repeat(pa.scalar(r.rank if r else 0, pa.int32()), n))
    t = t.add_column(0, "run_id", pa.repeat(pa.scalar(run.run_id if run else ""), n))
    return t.add_column(0, "experiment", pa.repeat(pa.scalar(run.experiment if run else ""), n))
