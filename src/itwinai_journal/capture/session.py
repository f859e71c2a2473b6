"""Measurement state of one journal session: the readings the next `system` and `carbon`
records count from, and the codecarbon tracker.

The state is kept per session, keyed weakly by the session's blob store (the writer creates
exactly one per journal session of a rank, and it dies with the writer), so it is shared by
every logger of that journal, starts fresh when a run is resumed, and never outlives its
session.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .context import CaptureContext


@dataclass
class CpuSample:
    wall: float
    process_cpu_s: float
    process_start: float | None
    system_busy: float | None
    system_total: float | None


class EnergyCounter(NamedTuple):
    category: str  # cpu, dram, platform, gpu
    joules: float  # cumulative, since boot or driver load
    wrap: float | None  # the counter's range in joules, when it wraps around


@dataclass
class EnergyReading:
    time: float
    counters: dict[str, EnergyCounter]


@dataclass
class Session:
    """Measurement state of one journal session (one writer: a rank of a run, from
    `create_logger_context` to `destroy_logger_context`)."""

    start_wall: float
    clock: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    cpu_prev: CpuSample | None = None
    #: What `cpu_prev` is: the previous system record's sample, or the session's start's.
    cpu_window: str = "previous_system_record"
    energy_prev: EnergyReading | None = None
    energy_start: float | None = None  # monotonic time of the energy baseline
    energy_totals: dict[str, float] = field(default_factory=dict)
    tracker: Any = None
    tracker_prev: tuple[float, float, float] | None = None

    def close(self) -> None:
        """Stop the codecarbon tracker, if one was started, with its sampler thread. Called
        when the session's blob store is released (its writer closed and dropped)."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            try:
                tracker.stop()
            except Exception:  # a tracker failing at teardown must not raise
                pass


_sessions: weakref.WeakKeyDictionary[Any, Session] = weakref.WeakKeyDictionary()
_sessions_lock = threading.Lock()


def measurements(ctx: CaptureContext) -> Session:
    """The measurement state of `ctx`'s journal session. It starts at the session's start
    recorded in the manifest; without one (a capture called outside a logger), at the first
    measurement."""
    with _sessions_lock:
        session = _sessions.get(ctx.blobs)
        if session is None:
            if ctx.session_start is not None:
                session = Session(ctx.session_start, "journal_session")
            else:
                session = Session(time.time(), "first_measurement")
            _sessions[ctx.blobs] = session
            weakref.finalize(ctx.blobs, session.close)
        return session
