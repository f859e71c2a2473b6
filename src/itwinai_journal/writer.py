"""The per-rank journal writer: an in-memory queue drained in batches by a background flusher.

`log()` only appends a tuple to a deque. The flusher thread assigns seq numbers, encodes JSONL and
appends it to the active segment every tick (so a record older than `flush_interval` is in the OS
page cache and survives SIGKILL), and seals the segment to Parquet once it is large. SIGTERM,
normal exit and uncaught exceptions flush everything and record how the session ended.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from operator import itemgetter
from pathlib import Path
from typing import Any

import filelock
import pyarrow as pa

from . import manifest as mf
from . import segments
from .blobs import BlobStore
from .fsutil import read_json, write_atomic, write_json_atomic
from .liveness import HEARTBEAT_SECONDS
from .schema import FORMAT_VERSION

DEFAULT_FLUSH_INTERVAL = 1.0
#: A segment is sealed to Parquet after this many records or JSONL bytes. Sealed segments are
#: what readers and `verify` trust, and the writer keeps the active segment's rows in memory
#: until then, so this also bounds the writer's memory.
SEAL_RECORDS = 50_000
SEAL_BYTES = 64 << 20
#: Batches of at least this many plain metrics are encoded column-wise by Arrow (about 0.7 µs a
#: record, plus about 0.4 ms a batch); smaller ones record by record (about 2.5 µs a record).
COLUMNAR_BATCH = 256


class JournalWriteError(OSError):
    """Raised by a strict writer when records cannot be written."""


class RankWriter:
    """Appends records of one rank of one run. One instance per rank directory per process,
    shared by every logger of that run (see `open_writer`)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, run_info: dict[str, Any],
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL, strict: bool = False,
                 seal_records: int = SEAL_RECORDS, seal_bytes: int = SEAL_BYTES):
        self.run_dir = run_dir
        self.rank = rank
        self.rank_dir = run_dir / f"rank-{rank:05d}"
        self.seg_dir = self.rank_dir / "segments"
        self.flush_interval = flush_interval
        self.strict = strict
        self.seal_records = seal_records
        self.seal_bytes = seal_bytes
        self.blobs = BlobStore(self.rank_dir / "blobs")
        #: Records waiting for the flusher. Metric records are 6-tuples
        #: (time, name, step, batch_idx, value, route); others are 10-tuples
        #: (time, kind, name, step, batch_idx, value, text, blob, meta, route). `route` is a
        #: comma-joined string of destinations (a string keeps the tuple untracked by the GC).
        self.pending: collections.deque = collections.deque()
        self.append = self.pending.append
        self.destinations: dict[str, dict[str, Any]] = {}
        self._route_meta: dict[str, list[str] | None] = {}
        self._flush_lock = threading.Lock()
        self._closed = False
        self._dropped = 0
        self._warned = False
        self._status: str | None = None
        self._pending_error: Exception | None = None
        self._next_seal_try = 0.0

        self.seg_dir.mkdir(parents=True, exist_ok=True)
        self._lock = filelock.FileLock(str(self.rank_dir / ".writer.lock"))
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise RuntimeError(
                f"{self.rank_dir} is being written by another process: two processes logging as "
                f"rank {rank} of run {run_info['run_id']}? Give each process its own rank."
            ) from None
        _write_run_json(run_dir, run_info)
        self._seq, self._segment = segments.recover(self.rank_dir)
        self._segment += 1
        #: Records of the active segment, kept to seal it without reading it back: tables, then
        #: rows not yet converted (in seq order); `_kept` counts both.
        self._tables: list[pa.Table] = []
        self._rows: list[tuple] = []
        self._kept = 0
        self._bytes = 0
        self._file = open(self.seg_dir / segments.segment_name(self._segment, "jsonl"), "ab")

        mpath = mf.manifest_path(self.rank_dir)
        self.manifest = read_json(mpath) if mpath.exists() else mf.new_manifest(rank, world_size)
        self.manifest["world_size"] = world_size
        self.manifest["sessions"].append(mf.new_session())
        self.manifest["sessions"][-1]["first_seq"] = self._seq + 1
        self.manifest["sessions"][-1]["heartbeat"] = HEARTBEAT_SECONDS
        self._dropped_before = self.manifest.get("dropped_records", 0)
        self.destinations = self.manifest.setdefault("destinations", {})
        self._write_manifest()

        self._names: dict[str, str] = {}
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="itwinai-journal-flusher",
                                        daemon=True)
        _warm_up_pyarrow()
        self._thread.start()

    # -- destinations and routing -----------------------------------------------------------

    def declare(self, target: str, options: dict[str, Any]) -> None:
        """Record a logger's destination (its constructor arguments, secrets redacted) in the
        manifest."""
        options = mf.redact(options)
        if self.destinations.get(target) != options:
            self.destinations[target] = options
            self._route_meta.clear()
            self._write_manifest()

    def declare_collection(self, destinations: list[str], primary: bool) -> None:
        """Record that this journal belongs to a LoggersCollection with these destinations
        (all its members', whichever journal they write to), and whether it is the primary
        one: a member with its own savedir (a Prov4MLLogger's provenance_save_dir) makes a
        second journal of the same run, and `itwinai-sync` must take each record for each
        target from one journal only (see the README, "What the loggers do")."""
        entry = {"destinations": sorted(set(destinations)), "primary": primary}
        if self.manifest.get("collection") != entry:
            self.manifest["collection"] = entry
            self._write_manifest()

    def _targets(self, route: str | None) -> list[str] | None:
        """Destinations a record is restricted to, or None when it goes to all of them.
        `route` is a comma-joined set of destination names, or None for all."""
        if route is None:
            return None
        try:
            return self._route_meta[route]
        except KeyError:
            wanted = set(route.split(","))
            found = None if wanted >= set(self.destinations) else sorted(wanted)
            self._route_meta[route] = found
            return found

    # -- flushing -----------------------------------------------------------------------------

    def _run(self) -> None:
        tick = min(self.flush_interval / 2, 0.1)
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        while not self._closed:
            self._wake.wait(tick)
            self._wake.clear()
            try:
                self.flush()
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_SECONDS
                    self._heartbeat()
            except Exception as e:  # noqa: BLE001 - the flusher must never die silently
                self._fail(e, 0)

    def _heartbeat(self) -> None:
        """Touch the active segment, so that a sync on another host can tell a writer that
        is alive but quiet from one that was killed (see liveness.py)."""
        with self._flush_lock:
            if self._file is not None:
                os.utime(self._file.fileno())

    def flush(self) -> None:
        """Write every pending record to the active segment with one append, and keep the
        records for sealing: large batches of plain metrics as an Arrow table encoded
        column-wise, everything else as rows encoded one by one (cheaper for a few records)."""
        with self._flush_lock:
            pending = self.pending
            n = len(pending)
            if not n or self._file is None:
                return
            popleft = pending.popleft
            batch = [popleft() for _ in range(n)]
            first = self._seq + 1
            if n >= COLUMNAR_BATCH and self._plain_metrics(batch):
                table, data = segments.encode_metrics(first, batch, self._names)
                rows = None
            else:
                rows = [self._row(seq, rec) for seq, rec in enumerate(batch, first)]
                data = "".join(map(segments.encode_row, rows)).encode()
            try:
                self._file.write(data)
                self._file.flush()
            except OSError as e:
                self._recover_partial_write()
                self._fail(e, n)
                return
            self._seq += n
            self._kept += n
            if rows is None:
                self._rows_to_table()
                self._tables.append(table)
            else:
                self._rows.extend(rows)
            self._bytes += len(data)
            if self._kept >= self.seal_records or self._bytes >= self.seal_bytes:
                self._seal_active(reopen=True)

    def _plain_metrics(self, batch: list[tuple]) -> bool:
        """Whether every record is a metric 6-tuple going to every destination."""
        return (set(map(len, batch)) == {6}
                and all(self._targets(r) is None for r in set(map(itemgetter(5), batch))))

    def _row(self, seq: int, rec: tuple) -> tuple:
        """A queued record as a full row in `COLUMNS` order, its meta as JSON."""
        if len(rec) == 6:
            t, name, step, batch_idx, value, route = rec
            kind, text, blob, meta = "metric", None, None, None
        else:
            t, kind, name, step, batch_idx, value, text, blob, meta, route = rec
        restricted = self._targets(route)
        if restricted is not None:
            meta = {**(meta or {}), "targets": restricted}
        meta_s = None if meta is None else json.dumps(meta, default=repr)
        return (seq, t, kind, name, step, batch_idx, value, text, blob, meta_s)

    def _rows_to_table(self) -> None:
        if self._rows:
            self._tables.append(segments.rows_to_table(self._rows))
            self._rows = []

    def _recover_partial_write(self) -> None:
        """After a failed append, cut the segment back to its last complete record so that the
        next append does not follow a torn line."""
        try:
            self._file.close()
        except OSError:
            pass
        path = self.seg_dir / segments.segment_name(self._segment, "jsonl")
        try:
            with open(path, "r+b") as f:
                f.truncate(self._bytes)
        except OSError:
            pass
        self._file = open(path, "ab")

    def _fail(self, error: Exception, lost: int) -> None:
        self._dropped += lost
        if self.strict:
            self._pending_error = error
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"itwinai-journal: cannot write to {self.rank_dir} ({error}); training goes on, "
                f"records that cannot be written are dropped and counted in the manifest",
                RuntimeWarning, stacklevel=2,
            )

    def check_healthy(self) -> None:
        """For strict writers: raise the write error the flusher met, in the caller's thread."""
        err = self._pending_error
        if err is not None:
            raise JournalWriteError(f"journal write failed in {self.rank_dir}: {err}") from err

    def _seal_active(self, reopen: bool) -> None:
        """Seal the active segment. If that fails (disk full), the records stay safe in the
        JSONL segment, which keeps receiving appends; sealing is retried later."""
        if self._kept:
            if time.monotonic() < self._next_seal_try and reopen:
                return
            self._rows_to_table()
            try:
                segments.seal(self.rank_dir, self._segment, pa.concat_tables(self._tables))
                pa.default_memory_pool().release_unused()
            except OSError as e:
                self._fail(e, 0)
                self._next_seal_try = time.monotonic() + 5.0
                if reopen:
                    return
                raise
        self._file.close()
        self._tables = []
        self._kept = 0
        self._bytes = 0
        if reopen:
            self._segment += 1
            self._file = open(self.seg_dir / segments.segment_name(self._segment, "jsonl"), "ab")
        else:
            self._file = None

    # -- lifecycle ---------------------------------------------------------------------------

    def _write_manifest(self) -> None:
        self.manifest["dropped_records"] = self._dropped_before + self._dropped
        try:
            write_json_atomic(mf.manifest_path(self.rank_dir), self.manifest, fsync=False)
        except OSError as e:
            self._fail(e, 0)

    def close(self, status: str = "finished") -> None:
        """Flush, seal the active segment and record the session's end. Idempotent."""
        with _registry_lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            self.flush()
        except OSError as e:
            self._fail(e, len(self.pending))
        try:
            with self._flush_lock:
                if self._file is not None:
                    empty = not self._kept and self._bytes == 0
                    self._seal_active(reopen=False)
                    if empty:
                        _unlink_quiet(self.seg_dir / segments.segment_name(self._segment, "jsonl"))
        except Exception as e:  # noqa: BLE001
            # The records are in the JSONL segment already; the next session or a reader
            # picks them up there. Sealing is an optimisation, not a durability step.
            warnings.warn(f"itwinai-journal: could not seal {self.seg_dir} at close ({e}); "
                          "records stay in the active segment", RuntimeWarning, stacklevel=2)
        session = self.manifest["sessions"][-1]
        session["end"] = time.time()
        session["status"] = status
        session["last_seq"] = self._seq
        self._write_manifest()
        self._lock.release()
        _forget(self)

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def closed(self) -> bool:
        return self._closed


def _warm_up_pyarrow() -> None:
    """pyarrow imports pandas (when installed) on its first array conversion. Do it now, in the
    caller's thread: later it would happen in the flusher thread, racing the user's own
    imports of pandas, or in a seal at interpreter exit, when imports are refused."""
    import pyarrow as pa

    pa.array([0.0])


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_run_json(run_dir: Path, run_info: dict[str, Any]) -> None:
    """run.json is written once, by whichever rank comes first: link(2) refuses to overwrite.
    `journal_id` is this journal's identity: a resumed job (same run directory) keeps it, a
    copy of the directory carries it, and another journal that happens to have the same
    experiment and run id (another cluster, another savedir) has its own, so the sync never
    continues one journal's target runs with another's records."""
    path = run_dir / "run.json"
    if path.exists():
        return
    info = {"format_version": FORMAT_VERSION, "created": time.time(),
            "journal_id": uuid.uuid4().hex, **run_info}
    tmp = run_dir / f".run.json.{os.getpid()}.tmp"
    write_atomic(tmp, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


# -- the process-wide registry and exit handling -------------------------------------------

_registry_lock = threading.RLock()
_writers: dict[Path, tuple[RankWriter, int]] = {}
_hooks_installed = False


def open_writer(run_dir: Path, rank: int, world_size: int, run_info: dict[str, Any],
                **options: Any) -> RankWriter:
    """The writer of (run_dir, rank) for this process, created on first use and shared by every
    logger of that run, so a record logged through several loggers is written once."""
    key = (run_dir / f"rank-{rank:05d}").resolve()
    with _registry_lock:
        _install_exit_hooks()
        if key in _writers:
            writer, refs = _writers[key]
            _writers[key] = (writer, refs + 1)
            return writer
        writer = RankWriter(run_dir, rank, world_size, run_info, **options)
        _writers[key] = (writer, 1)
        return writer


def open_writer_at(rank_dir: Path) -> RankWriter | None:
    """This process's open writer of `rank_dir`, if any (for hooks that log on their own)."""
    with _registry_lock:
        entry = _writers.get(rank_dir.resolve())
    return entry[0] if entry else None


def release_writer(writer: RankWriter, status: str = "finished") -> None:
    """Drop one logger's hold on `writer`; the last one closes it with `status`."""
    with _registry_lock:
        key = writer.rank_dir.resolve()
        entry = _writers.get(key)
        if entry is None:
            return
        if entry[1] > 1:
            _writers[key] = (writer, entry[1] - 1)
            if status != "finished":
                writer._status = status
            return
    writer.close(writer._status or status)


def _forget(writer: RankWriter) -> None:
    with _registry_lock:
        key = writer.rank_dir.resolve()
        if key in _writers and _writers[key][0] is writer:
            del _writers[key]


def close_all(status: str) -> None:
    with _registry_lock:
        writers = [w for w, _ in _writers.values()]
    for w in writers:
        w.close(w._status or status)


def _install_exit_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(close_all, "finished")

    previous_excepthook = sys.excepthook

    def excepthook(exc_type, exc, tb):
        close_all("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
        previous_excepthook(exc_type, exc, tb)

    sys.excepthook = excepthook

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still covers us
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        close_all("interrupted")
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
