"""What a Prov4ML journal session measures when it starts, as yprov4ml's `start_run` starts its
trackers with the run."""

from __future__ import annotations

import time

from . import libraries
from .context import CaptureContext
from .energy import energy_counters
from .session import EnergyReading, measurements
from .system import cpu_sample


def begin_session(ctx: CaptureContext) -> None:
    """What yprov4ml's `start_run` starts with the run, done when a Prov4MLLogger opens its
    journal session: the CPU and energy readings the first `system` and `carbon` records count
    from (so that they cover the time since the session started, as yprov4ml's do), instead
    of the first record being only a baseline. Cheap (a few /proc and sysfs reads); never
    raises: a reading that fails leaves the first record as the baseline."""
    session = measurements(ctx)
    try:
        sample = cpu_sample(libraries.optional("psutil"))
        counters, _ = energy_counters()
    except Exception:  # noqa: BLE001 - measuring must never stop the training
        return
    now = time.monotonic()
    with session.lock:
        if session.cpu_prev is None:
            session.cpu_prev, session.cpu_window = sample, "session_start"
        if session.energy_prev is None and counters:
            session.energy_prev = EnergyReading(now, counters)
            session.energy_start = now
