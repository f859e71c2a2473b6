"""The per-rank journal writer: an in-memory queue drained in batches by a background flusher.

`log()` only appends a tuple to a deque. The flusher thread is the one thread that writes the
rank's files: every tick it assigns seq numbers, encodes JSONL and appends it to the active
segment (so a record older than `flush_interval` is in the OS page cache and survives SIGKILL),
seals the segment to Parquet once it is large, and writes the manifest. Other threads, exit hooks
and the SIGTERM handler only ask it to and wait for it: code that wrote itself from a signal
handler could wait on a lock, a file object or a half-updated state that the interrupted code
holds. SIGTERM, normal exit and uncaught exceptions flush everything and record how the session
ended. In a forked child the writer sends its records to the parent's writer (relay.py) and
never touches the rank's files.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from contextlib import suppress
from operator import itemgetter
from pathlib import Path
from typing import Any

import filelock
import pyarrow as pa

from itwinai_journal.format import manifest as mf
from itwinai_journal.format import segments
from itwinai_journal.format.blobs import BlobStore
from itwinai_journal.format.fsio import (
    JournalWriteError,
    lock_exclusively,
    write_atomic,
    write_json_atomic,
)
from itwinai_journal.format.schema import FORMAT_VERSION
from itwinai_journal.read.liveness import HEARTBEAT_SECONDS

from .relay import Relay

__all__ = ["JournalWriteError", "RankWriter", "open_writer", "release_writer",
           "close_all"]

DEFAULT_FLUSH_INTERVAL = 1.0
#: A segment is sealed to Parquet after this many records or JSONL bytes. Sealed segments are
#: what readers and `verify` trust, and the writer keeps the active segment's rows in memory
#: until then, so this also bounds the writer's memory.
SEAL_RECORDS = 50_000
SEAL_BYTES = 64 << 20
#: Batches of at least this many plain metrics are encoded column-wise by Arrow (about 0.7 µs a
#: record, plus about 0.4 ms a batch); smaller ones record by record (about 2.5 µs a record).
COLUMNAR_BATCH = 256
#: How long the SIGTERM handler waits for the flushers to write everything. SLURM sends SIGKILL
#: `KillWait` (30 s by default) after SIGTERM.
SIGTERM_WAIT = 20.0
#: How long a failed seal or manifest write waits before it is tried again (disk full).
RETRY_AFTER = 5.0
#: Records queued beyond this are flushed by the logging thread itself: a loop that logs faster
#: than the background flusher drains must not grow memory without bound.
BACKLOG = 20_000


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
        self._thread: threading.Thread | None = None  # the flusher, started once the rank opens
        #: Records waiting for the flusher. Metric records are 6-tuples
        #: (time, name, step, batch_idx, value, route); others are 10-tuples
        #: (time, kind, name, step, batch_idx, value, text, blob, meta, route). `route` is a
        #: comma-joined string of destinations (a string keeps the tuple untracked by the GC).
        self.pending: collections.deque = collections.deque()
        self.append = self.pending.append
        self.destinations: dict[str, dict[str, Any]] = {}
        self._route_meta: dict[str, list[str] | None] = {}
        #: Requests to the flusher: a token put in `_wake` ends its wait at once, and a caller
        #: that waits appends to `_waiters` what tells it the flusher's next round is done (a
        #: new lock's release, or a new Event's set). Nothing here takes a lock a signal
        #: handler could find held by the code it interrupted: deque.append is atomic and
        #: SimpleQueue.put is reentrant.
        self._wake: queue.SimpleQueue = queue.SimpleQueue()
        self._waiters: collections.deque[Callable[[], Any]] = collections.deque()
        self._closed = False  # close() was called, or SIGTERM asked for the session's end
        #: Called when the session ends under the loggers writing here (an exit hook, SIGTERM),
        #: so that they stop taking their fast path into a queue nobody will write.
        self._listeners: list[Callable[[], Any]] = []
        self._stop: str | None = None  # the status the flusher ends the session with
        self._finished = False  # the flusher has stopped (the session has ended)
        #: A status decided before the close (a shared writer's logger that failed, a
        #: start_logging block that raised): the close ends the session with it.
        self._status: str | None = None
        #: When SIGTERM reached this process (time.time()), else None. The session is marked
        #: interrupted at once, in case SIGKILL follows; its final status is the close's.
        self._sigterm_at: float | None = None
        self._manifest_dirty = False
        self._dropped = 0  # counted by the flusher only
        self._drops: collections.deque[int] = collections.deque()  # from logging threads
        self._warned: set[str] = set()
        self._pending_error: Exception | None = None
        self._next_seal_try = 0.0
        self._next_manifest_try = 0.0
        self._next_beat = time.monotonic() + HEARTBEAT_SECONDS
        #: The channel from forked children (made just before the first fork), and whether
        #: this writer is a forked child's copy that sends its records there.
        self._relay: Relay | None = None
        self._forwarding = False
        self._owner_pid = self._pid = os.getpid()  # the writing process; this object's process

        self.seg_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = lock_exclusively(self.rank_dir / ".writer.lock",
                                          self.rank_dir / ".writer.owner")
        except filelock.Timeout as e:
            raise RuntimeError(
                f"{self.rank_dir} is being written by another process: two processes logging "
                f"as rank {rank} of run {run_info['run_id']}? Give each process its own rank. "
                f"({e} On a filesystem without flock, an owner file left by a process that is "
                "gone on another host must be removed by hand.)"
            ) from None
        try:
            self._open_rank(run_info, world_size)
        except BaseException:
            self._lock.release()
            raise
        self._thread = threading.Thread(target=self._run, name="itwinai-journal-flusher",
                                        daemon=True)
        _warm_up_pyarrow()
        self._thread.start()

    def _open_rank(self, run_info: dict[str, Any], world_size: int) -> None:
        self.blobs.remove_temporaries()
        _write_run_json(self.run_dir, run_info)
        self._seq, self._segment = segments.recover(self.rank_dir)
        self._segment += 1
        #: Records of the active segment, kept to seal it without reading it back: tables, then
        #: rows not yet converted (in seq order); `_kept` counts both.
        self._tables: list[pa.Table] = []
        self._rows: list[tuple] = []
        self._kept = 0
        self._bytes = 0
        self._file = self._open_active()

        self.manifest = mf.load_for_session(self.rank_dir, self.rank, world_size, self._seq)
        self.manifest["world_size"] = world_size
        self.manifest["sessions"].append(
            mf.new_session(self._seq + 1, segments.index_head(self.rank_dir)))
        self.manifest["sessions"][-1]["heartbeat"] = HEARTBEAT_SECONDS
        self._dropped_before = self.manifest.get("dropped_records", 0)
        self._dropped_saved = 0
        self.destinations = self.manifest.setdefault("destinations", {})
        self._write_manifest()
        self._names: dict[str, str] = {}

    def _open_active(self):
        """The active segment, unbuffered: no bytes of the journal ever wait in a user-space
        buffer, which a forked child would inherit and could write out again."""
        return open(self.seg_dir / segments.segment_name(self._segment, "jsonl"), "ab",
                    buffering=0)

    # -- destinations and routing -----------------------------------------------------------

    def declare(self, target: str, options: dict[str, Any]) -> None:
        """Record a logger's destination (its constructor arguments and context options, as
        JSON with secrets redacted: see `manifest.declarable`) in the manifest. The manifest and
        the routing cache are replaced, never changed in place: the flusher reads them without
        a lock."""
        if self._forwarding:
            return  # a forked child's logger: the parent's manifest is the parent's
        options = mf.declarable(options)
        if self.destinations.get(target) != options:
            self.destinations = {**self.destinations, target: options}
            self._route_meta = {}
            self.manifest = {**self.manifest, "destinations": self.destinations}
            self._manifest_dirty = True
            self.flush()

    def declare_collection(self, destinations: list[str], primary: bool) -> None:
        """Record that this journal belongs to a LoggersCollection with these destinations
        (all its members', whichever journal they write to), and whether it is the primary
        one: a member with its own savedir (a Prov4MLLogger's provenance_save_dir) makes a
        second journal of the same run, and `itwinai-sync` must take each record for each
        target from one journal only (see the README, "What the loggers do")."""
        if self._forwarding:
            return  # a forked child's logger: the parent's manifest is the parent's
        entry = {"destinations": sorted(set(destinations)), "primary": primary}
        if self.manifest.get("collection") != entry:
            self.manifest = {**self.manifest, "collection": entry}  # replaced: see declare()
            self._manifest_dirty = True
            self.flush()

    def _targets(self, route: str | None) -> list[str] | None:
        """Destinations a record is restricted to, or None when it goes to all of them.
        `route` is a comma-joined set of destination names, or None for all."""
        if route is None:
            return None
        cache = self._route_meta  # before the destinations: see declare()
        try:
            return cache[route]
        except KeyError:
            wanted = set(route.split(","))
            found = None if wanted >= set(self.destinations) else sorted(wanted)
            cache[route] = found
            return found

    # -- what loggers hand over --------------------------------------------------------------

    def enqueue(self, records: list[tuple]) -> bool:
        """Queue `records` (and flush when the backlog is too long). False when the session
        has ended (closed by an exit hook or SIGTERM while a logger still used it): nothing
        would write them, and the caller says so."""
        if self._closed:
            return False
        self.pending.extend(records)
        if len(self.pending) > BACKLOG:
            self.flush()
        return True

    def listen(self, callback: Callable[[], Any]) -> None:
        """Call `callback` when the session ends (see `_listeners`); `unlisten` stops it."""
        self._listeners.append(callback)

    def unlisten(self, callback: Callable[[], Any]) -> None:
        with suppress(ValueError):
            self._listeners.remove(callback)

    def _tell_listeners(self) -> None:
        """Lock-free (a SIGTERM handler calls this): the loggers only recompute a flag."""
        for callback in list(self._listeners):
            callback()

    # -- what other threads ask of the flusher --------------------------------------------------

    def flush(self, wait: bool = True) -> None:
        """Write every record queued so far to the active segment. The flusher does it; this
        waits for it, unless `wait` is false (Lightning's save() after every step: the records
        are written a moment later, well within flush_interval, and the step does not wait for
        a thread switch)."""
        if wait:
            self._await()
        elif os.getpid() == self._pid:
            self._wake.put(None)

    def earlier_records(self, kind: str) -> int:
        """How many records of `kind` earlier sessions of this rank journaled (the system-
        metrics sampler continues its steps from there). Earlier sessions' records are all in
        sealed segments (this writer sealed what the last session left when it opened the
        rank); only their kind and seq columns are read."""
        sessions = self.manifest.get("sessions") or [{}]
        first_seq = sessions[-1].get("first_seq") or 1
        if first_seq <= 1:
            return 0
        import pyarrow.compute as pc

        count = 0
        for files in segments.segment_files(self.seg_dir).values():
            if "parquet" not in files:
                continue
            try:
                t = segments.read_parquet(files["parquet"], columns=["seq", "kind"])
            except Exception:  # noqa: BLE001 - a damaged segment is verify's business, not ours
                continue
            mask = pc.and_(pc.equal(t["kind"], kind), pc.less(t["seq"], first_seq))
            count += pc.sum(mask.cast("int64")).as_py() or 0
        return count

    def close(self, status: str = "finished") -> None:
        """Flush, seal the active segment and record the session's end (the flusher does it;
        this waits for it). Idempotent."""
        with _registry_lock:
            if not self._closed:
                self._stop = status
                self._closed = True
        self._tell_listeners()
        self._await()
        self._join()
        _forget(self)

    def _join(self) -> None:
        """Wait for the flusher thread itself to end once it has ended the session. The waiter
        a close() gets is released inside the thread's last round, which then still runs
        Python code (and the threading module's cleanup); at interpreter exit, the main thread
        would otherwise finalize the interpreter under a daemon thread still running, which
        CPython ends abruptly where it next takes the GIL (an abort when that is inside a C++
        library's frames). Joined, no thread of the journal outlives the exit hooks."""
        thread = self._thread
        if (thread is not None and thread is not threading.current_thread()
                and self._stop is not None and os.getpid() == self._pid):
            thread.join(SIGTERM_WAIT)

    def _await(self, timeout: float | None = None) -> bool:
        """Wake the flusher and wait until it has completed a round that began after this call:
        every record queued before it is written. False when there is no flusher to wait for
        (the session has ended) or the wait timed out."""
        if os.getpid() != self._pid:
            self._forked_without_hooks()
        if self._finished or not self._thread.is_alive():
            return False
        done = threading.Lock()  # cheaper than an Event: this is every wait for a flush
        done.acquire()
        self._request(done.release)
        if self._finished:
            return False
        return done.acquire(timeout=-1 if timeout is None else timeout)

    def _request(self, done: Callable[[], Any]) -> None:
        """Wake the flusher; it calls `done` after its next round (or when it has stopped)."""
        self._waiters.append(done)
        self._wake.put(None)

    def _interrupt(self, final: bool) -> threading.Event | None:
        """For the SIGTERM handler, which must take no lock: record the signal (the session is
        marked interrupted at once, in case SIGKILL follows) and ask the flusher to write
        everything and the manifest (and, when `final`, to end the session interrupted); the
        returned Event is set once it has. It is new, so no one else holds its lock, and
        waiting on it again after an interruption is harmless. None when there is no flusher
        to wait for. Thread.is_alive() is not asked: it may take a lock of the threading
        module."""
        if self._finished or os.getpid() != self._pid:  # no flusher in this process to ask
            return None
        self._sigterm_at = self._sigterm_at or time.time()
        self._manifest_dirty = True
        if final:
            self._stop = self._stop or "interrupted"
            self._closed = True
            self._tell_listeners()
        done = threading.Event()
        self._request(done.set)
        if self._finished:  # it stopped meanwhile: it may have missed the request (see _run)
            return None
        return done

    def drop(self, error: JournalWriteError, count: int = 1) -> None:
        """`count` records lost before they reached the queue (the blob store could not store
        their payload): counted like records the flusher cannot write; a strict writer
        raises."""
        self._drops.append(count)
        if self.strict:
            raise JournalWriteError(f"journal write failed in {self.rank_dir}: {error}") from error
        self._warn_once("write", self._write_failure_message(error), stacklevel=4)

    def check_healthy(self) -> None:
        """For strict writers: raise the write error the flusher met, in the caller's thread."""
        err = self._pending_error
        if err is not None:
            raise JournalWriteError(f"journal write failed in {self.rank_dir}: {err}") from err

    # -- the flusher thread ---------------------------------------------------------------------

    def _run(self) -> None:
        """The flusher's loop. Whatever a round or the session's end raises, the callers
        waiting for it are released: a round's own waiters after it, and, when the thread
        stops, every waiter still queued (after `_finished` is set, so a caller that queues
        itself later sees it and does not wait)."""
        tick = min(self.flush_interval / 2, 0.1)
        wake = self._wake
        try:
            while True:
                with suppress(queue.Empty):
                    wake.get(timeout=tick)
                    while True:
                        wake.get_nowait()
                waiters = [self._waiters.popleft() for _ in range(len(self._waiters))]
                stop = self._stop  # read after the waiters: a close() queued with them is seen
                try:
                    self._flush_round(stop)
                finally:
                    for done in waiters:
                        done()
                if stop is not None:
                    return
        finally:
            self._finished = True
            while self._waiters:
                self._waiters.popleft()()

    def _flush_round(self, stop: str | None) -> None:
        """One round, then the session's end when `stop` is set. An error is counted and
        warned about, never raised: the flusher must not die, nor leave a close waiting."""
        try:
            if self._forwarding:
                self._forward()
            else:
                if stop is not None and self._relay is not None:
                    # Refuse what forked children send from now on (they are told, and count
                    # it), so that this last round receives everything that was sent.
                    self._relay.stop_receiving()
                self._round()
        except Exception as e:  # noqa: BLE001 - the flusher must never die silently
            self._fail(e, 0)
        if stop is not None:
            try:
                self._finish(stop)
            except Exception as e:  # noqa: BLE001
                self._fail(e, 0)

    def _heartbeat(self) -> None:
        """Touch the active segment, so that a sync on another host can tell a writer that
        is alive but quiet from one that was killed (see liveness.py)."""
        if self._file is not None and not self._forwarding:
            os.utime(self._file.fileno())

    def _round(self) -> None:
        """One flush: the queue and what forked children sent, then the manifest if it must
        change (destinations declared, the session interrupted, records dropped)."""
        while self._drops:
            self._dropped += self._drops.popleft()
        relayed, lost = self._relay.receive() if self._relay is not None else ([], 0)
        pending = self.pending
        batch = [pending.popleft() for _ in range(len(pending))]
        if relayed or lost:
            batch.extend(relayed)
            if lost:
                self._dropped += lost
                self._warn_once("relay", f"itwinai-journal: {lost} records logged in forked "
                                "processes could not be sent to this process's journal writer; "
                                "they are counted in the manifest (dropped_records)")
        if batch:
            self._write(batch)
        if time.monotonic() >= self._next_beat:
            self._next_beat = time.monotonic() + HEARTBEAT_SECONDS
            self._heartbeat()
        if self._manifest_dirty or (self._dropped != self._dropped_saved
                                    and time.monotonic() >= self._next_manifest_try):
            self._manifest_dirty = False
            self._write_manifest()

    def _write(self, batch: list[tuple]) -> None:
        """Append `batch` to the active segment with one write, and keep the records for
        sealing: large batches of plain metrics as an Arrow table encoded column-wise,
        everything else as rows encoded one by one (cheaper for a few records). A record the
        schema cannot hold is dropped alone (see `_reject`); its neighbours are written."""
        if self._file is None:  # reopening it failed after an error
            try:
                self._file = self._open_active()
            except OSError as e:
                self._fail(e, len(batch))
                return
        first = self._seq + 1
        table = rows = None
        try:
            if len(batch) >= COLUMNAR_BATCH and self._plain_metrics(batch):
                try:
                    table, data = segments.encode_metrics(first, batch, self._names)
                except segments.ENCODE_ERRORS:
                    table = None  # some record cannot be stored: the row encoder finds which
            if table is None:
                rows, data = self._encode_rows(first, batch)
        except Exception as e:  # noqa: BLE001 - e.g. MemoryError: the batch is lost, and counted
            self._fail(e, len(batch))
            return
        n = len(rows) if rows is not None else table.num_rows
        if not n:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view):]
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

    def _encode_rows(self, first: int, batch: list[tuple]) -> tuple[list[tuple], bytes]:
        rows: list[tuple] = []
        lines: list[str] = []
        for rec in batch:
            try:
                row = self._row(first + len(rows), rec)
                line = segments.encode_row(row)
            except segments.ENCODE_ERRORS as e:
                self._reject(rec, e)
                continue
            rows.append(row)
            lines.append(line)
        return rows, "".join(lines).encode()

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
            if value is not None:
                value = float(value)
        restricted = self._targets(route)
        if restricted is not None:
            meta = {**(meta or {}), "targets": restricted}
        meta_s = None if meta is None else json.dumps(meta, default=repr)
        return (seq, t, kind, name, step, batch_idx, value, text, blob, meta_s)

    def _reject(self, rec: tuple, error: Exception) -> None:
        """A record the journal cannot hold (an int beyond int64, a string that is not valid
        Unicode, a meta that is not JSON): dropped and counted, with one warning per writer,
        so that it never fails its batch nor makes the rank unreadable."""
        self._dropped += 1
        if self.strict:
            self._pending_error = error
        kind, name = ("metric", rec[1]) if len(rec) == 6 else (rec[1], rec[2])
        self._warn_once("encode", f"itwinai-journal: a {kind} record named {name!r} cannot be "
                        f"stored in the journal ({error}); it is dropped and counted in the "
                        "manifest (dropped_records), as is any later record that cannot be stored")

    def _forward(self) -> None:
        """A forked child's round: send the records logged in this process to the parent's
        writer (relay.py), which numbers and writes them."""
        dropped = 0
        while self._drops:
            dropped += self._drops.popleft()
        pending = self.pending
        records = []
        for rec in [pending.popleft() for _ in range(len(pending))]:
            try:
                records.append(_portable(rec))
            except segments.ENCODE_ERRORS as e:
                dropped += 1
                self._warn_once("encode", f"itwinai-journal: a record named {rec[2]!r} cannot "
                                f"be stored in the journal ({e}); it is dropped")
        if not records and not dropped:
            return
        if self._relay is None:
            lost, error = len(records), "no channel to it could be made"
        else:
            try:
                lost, error = self._relay.send(records, dropped)
            except Exception as e:  # noqa: BLE001 - whatever it is, say what it cost
                lost, error = len(records), e
        if lost:
            self._dropped += lost
            self._warn_once("relay", f"itwinai-journal: {lost} records logged in forked process "
                            f"{os.getpid()} did not reach the journal writer of process "
                            f"{self._owner_pid} ({error}); they are dropped")

    def _rows_to_table(self) -> None:
        if self._rows:
            self._tables.append(segments.rows_to_table(self._rows))
            self._rows = []

    def _recover_partial_write(self) -> None:
        """After a failed append, cut the segment back to its last complete record so that the
        next append does not follow a torn line."""
        with suppress(OSError):
            self._file.close()
        self._file = None
        path = self.seg_dir / segments.segment_name(self._segment, "jsonl")
        with suppress(OSError):
            with open(path, "r+b") as f:
                f.truncate(self._bytes)
        with suppress(OSError):  # else the next append tries again
            self._file = self._open_active()

    def _fail(self, error: Exception, lost: int) -> None:
        self._dropped += lost
        if self.strict:
            self._pending_error = error
        self._warn_once("write", self._write_failure_message(error))

    def _write_failure_message(self, error: Exception) -> str:
        return (f"itwinai-journal: cannot write to {self.rank_dir} ({error}); training goes on, "
                "records that cannot be written are dropped and counted in the manifest")

    def _warn_once(self, what: str, message: str, stacklevel: int = 2) -> None:
        if what not in self._warned:
            self._warned.add(what)
            if threading.current_thread() is not self._thread:
                warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
                return
            # In the flusher there is no caller to raise to: a warning filter that turns
            # warnings into errors (-W error) must not end the thread (what failed is
            # counted in the manifest anyway).
            with suppress(Exception):
                warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    def _seal_active(self, reopen: bool, force: bool = False) -> None:
        """Seal the active segment (even empty when `force`). If that fails (disk full), the
        records stay safe in the JSONL segment, which keeps receiving appends; sealing is
        retried later."""
        if self._kept or force:
            if time.monotonic() < self._next_seal_try and reopen:
                return
            self._rows_to_table()
            table = pa.concat_tables(self._tables) if self._tables else segments.rows_to_table([])
            try:
                segments.seal(self.rank_dir, self._segment, table,
                              mf.anchors(self.run_dir, self.destinations))
                pa.default_memory_pool().release_unused()
            except OSError as e:
                self._fail(e, 0)
                self._next_seal_try = time.monotonic() + RETRY_AFTER
                if reopen:
                    return
                raise
        self._file.close()
        self._file = None
        self._tables = []
        self._kept = 0
        self._bytes = 0
        if reopen:
            self._segment += 1
            self._file = self._open_active()

    def _unanchored(self) -> bool:
        """Whether run.json or the destinations changed since the index last recorded them (a
        logger declared after the last seal): the session's end then seals an empty segment,
        so that the index vouches for what the manifest says."""
        entries, _ = segments.read_index(self.rank_dir)
        return segments.last_anchors(entries) != mf.anchors(self.run_dir, self.destinations)

    def _write_manifest(self, ending: str | None = None) -> None:
        """Write the manifest, fsynced before the rename (a crash leaves the old manifest or the
        new one, never a cut one). SIGTERM marks the session interrupted at once, in case
        SIGKILL follows, and records when it came (`sigterm_at`); the session's end, status,
        last seq and the index head it leaves are recorded with `ending`, when it has ended
        (see `manifest.session_ended`): a session that a normal close ends after a SIGTERM
        (the job's own handler let it finish) is `finished`, `sigterm_at` kept."""
        manifest = self.manifest  # declare() may replace it meanwhile: write one of them whole
        session = manifest["sessions"][-1]
        if self._sigterm_at is not None:
            session["sigterm_at"] = self._sigterm_at
        status = ending or self._status or ("interrupted" if self._sigterm_at else None)
        if status is not None:
            session["status"] = status
        if ending is not None:
            session["end"] = time.time()
            session["last_seq"] = self._seq
            with suppress(OSError):  # verify then checks the session against the records only
                session["index_end"] = segments.index_head(self.rank_dir)
        dropped = self._dropped
        manifest["dropped_records"] = self._dropped_before + dropped
        try:
            write_json_atomic(mf.manifest_path(self.rank_dir), manifest)
            self._dropped_saved = dropped
        except (OSError, TypeError, ValueError) as e:
            # TypeError/ValueError: something JSON cannot hold got into the manifest (declared
            # options are made JSON-safe, so it should not): counted as a failed write, and
            # tried again later, rather than raised in the flusher.
            self._fail(e, 0)
            self._next_manifest_try = time.monotonic() + RETRY_AFTER

    def _finish(self, status: str) -> None:
        """The session's end, in the flusher thread: seal the active segment, record how the
        session ended, release the rank (whatever failed before). A forked child's copy only
        stops."""
        if self._forwarding:
            return
        try:
            if self._file is not None:
                try:
                    empty = not self._kept and self._bytes == 0
                    self._seal_active(reopen=False, force=empty and self._seq > 0
                                      and self._unanchored())
                    if empty:
                        _unlink_quiet(self.seg_dir / segments.segment_name(self._segment,
                                                                           "jsonl"))
                except Exception as e:  # noqa: BLE001
                    # The records are in the JSONL segment already; the next session or a
                    # reader picks them up there. Sealing is an optimisation, not a durability
                    # step.
                    with suppress(OSError):
                        self._file.close()
                    self._file = None
                    self._warn_once("seal-at-close", f"itwinai-journal: could not seal "
                                    f"{self.seg_dir} at close ({e}); records stay in the active "
                                    "segment")
            self._write_manifest(self._status or status)
        finally:
            if self._relay is not None:
                self._relay.close()
            with suppress(Exception):
                self._lock.release()

    # -- forks ------------------------------------------------------------------------------------

    def _prepare_fork(self) -> None:
        """In the parent, just before a fork: make the channel children send records through
        (without one, a child's records are dropped with a warning)."""
        if self._relay is None and not self._forwarding and not self._closed:
            with suppress(OSError):
                self._relay = Relay()

    def _become_forwarder(self) -> None:
        """In a forked child: forget the parent's queue (the parent writes it), files and
        thread; from now on records logged here go to the parent's writer."""
        self._pid = os.getpid()
        self.pending.clear()
        self._waiters = collections.deque()
        self._drops = collections.deque()
        self._wake = queue.SimpleQueue()
        self._warned = set()
        self._file = None
        self._tables, self._rows = [], []
        if not self._forwarding:
            self._forwarding = True
            if self._relay is not None:
                self._relay.in_child()
        if self._closed or self._finished:
            self._finished = True
            return
        self._thread = threading.Thread(target=self._run, name="itwinai-journal-relay",
                                        daemon=True)
        self._thread.start()

    def _forked_without_hooks(self) -> None:
        """This process was forked by a fork() called from C, which runs none of Python's
        at-fork hooks (noticed at the first flush or close here). Its queue holds the parent's
        records, which the parent writes, and this process's, which cannot be told apart: say
        so, drop them, and send what is logged from now on to the parent."""
        queued = len(self.pending)
        self._become_forwarder()
        if queued:
            self._warn_once("fork", f"itwinai-journal: process {os.getpid()} was forked without "
                            f"Python's fork hooks; {queued} records queued when this was noticed "
                            "are dropped (the parent writes its own); later records are sent to "
                            f"the journal writer of process {self._owner_pid}")

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def closed(self) -> bool:
        return self._closed


def _portable(rec: tuple) -> tuple:
    """A queued record as plain values a forked child can send: its meta as the JSON the parent
    would have stored (objects by their repr)."""
    if len(rec) == 6 or rec[8] is None:
        return rec
    return (*rec[:8], json.loads(json.dumps(rec[8], default=repr)), rec[9])


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
_sigterm_installed = False
_previous_sigterm: Any = signal.SIG_DFL
_handling_sigterm = False


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


def _snapshot() -> list[RankWriter]:
    """The open writers, without the registry lock (a signal handler or a fork hook may run
    while this thread holds it): copying a dict is atomic under the GIL."""
    return [w for w, _ in list(_writers.values())]


def close_all(status: str) -> None:
    with _registry_lock:
        writers = [w for w, _ in _writers.values()]
    for w in writers:
        w.close(w._status or status)


# Registered when this module is imported, not when the first journal opens: atexit runs hooks
# in reverse order, so the exit hooks a program registers after importing the loggers (one that
# logs a last value, say) run before the sessions are closed. What is logged after this hook has
# closed them is not journaled, and the logger says so (`_JournalLogger._ended_under`).
atexit.register(close_all, "finished")


def _install_exit_hooks() -> None:
    global _hooks_installed
    if not _hooks_installed:
        _hooks_installed = True
        previous_excepthook = sys.excepthook

        def excepthook(exc_type, exc, tb):
            close_all("interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
            previous_excepthook(exc_type, exc, tb)

        sys.excepthook = excepthook
        if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
            os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _install_sigterm_handler()


def _install_sigterm_handler() -> None:
    """Signal handlers can only be set from the main thread: a writer first opened in another
    thread gets the handler when one is opened from the main thread (atexit covers it until
    then). SIGTERM that is ignored, or handled outside Python, is left so."""
    global _sigterm_installed, _previous_sigterm
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_installed = True
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL or callable(previous):
        _previous_sigterm = previous
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM: what SLURM sends at the time limit (slurmstepd, to the whole process group).

    Takes no lock and does no I/O, whatever the interrupted code holds: each writer's flusher
    thread writes every queued record and the manifest (the session marked interrupted, with
    `sigterm_at`, in case SIGKILL follows) and this waits for them, at most SIGTERM_WAIT. Then
    it is as if the journal were not there: the handler that was installed before runs; when
    there was none, the default action ends the process, the sessions having been closed
    `interrupted` first. When another handler has since wrapped this one (as Lightning's does)
    and called it, that handler decides, so the process is not ended here. A session the
    program goes on to close itself (its handler only set a flag) ends as that close says,
    `finished` usually; one ended by a handler that raises (sys.exit) is `interrupted`."""
    global _handling_sigterm
    if _handling_sigterm:
        return  # a second SIGTERM while the first is handled: the first one finishes the work
    _handling_sigterm = True
    raised: BaseException | None = None
    try:
        ending = (_previous_sigterm is signal.SIG_DFL
                  and signal.getsignal(signal.SIGTERM) is _on_sigterm)
        requests = [done for w in _snapshot() if (done := w._interrupt(final=ending))]
        deadline = time.monotonic() + SIGTERM_WAIT
        for done in requests:
            while True:
                try:
                    done.wait(max(0.0, deadline - time.monotonic()))
                    break
                except BaseException as e:  # noqa: BLE001 - re-raised below
                    # Another signal's handler raised while we wait (torch's SIGCHLD handler
                    # when DataLoader workers die of the same SIGTERM). Without the journal the
                    # default action would have ended the process first: finish, then decide.
                    raised = raised or e
    finally:
        _handling_sigterm = False
    if callable(_previous_sigterm):
        try:
            _previous_sigterm(signum, frame)
        except BaseException:
            # That handler ends the program (sys.exit, an exception): SIGTERM ends the
            # sessions, whichever close then runs (exit hooks, a start_logging block).
            for w in _snapshot():
                w._status = w._status or "interrupted"
            raise
    elif ending:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    if raised is not None:
        raise raised


def _before_fork() -> None:
    for writer in _snapshot():
        writer._prepare_fork()


def _after_fork_in_child() -> None:
    """In a forked child (as OpenTelemetry's batch processors do it): fresh locks, the parent's
    writers turned into forwarders with a thread of their own, and their last records sent at
    the child's exit, including a multiprocessing child's, which skips atexit but not
    threading's exit hooks."""
    global _registry_lock, _handling_sigterm
    _registry_lock = threading.RLock()  # another thread of the parent may have held it
    _handling_sigterm = False
    writers = _snapshot()
    for writer in writers:
        writer._become_forwarder()
    register = getattr(threading, "_register_atexit", None)
    if writers and register is not None:
        with suppress(RuntimeError):  # forked while the interpreter was shutting down
            register(close_all, "finished")
