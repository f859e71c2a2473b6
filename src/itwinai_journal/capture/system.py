"""`system`: the system metrics measured now, at `log()` time (what yprov4ml reads).

`system`: value None; text: JSON object of the numbers measured now (see `measure_system`);
meta: `method` ("psutil" | "procfs"), `cpu_count`, `cpu_window`, `cpu_interval_s`,
`gpu_method` and `gpu_current` (when a GPU was read), `unavailable` ({group: reason}).
Absent means not measured, never zero.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import libraries
from .context import CaptureContext, Captured, Fields, Meta, Options
from .gpu import current_gpu, gpu_metrics
from .session import CpuSample, Session, measurements

PROC = Path("/proc")


def capture_system(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    """`kind='system'`: one record of the system metrics measured now. `item` is ignored, as
    in itwinai (which asks Prov4ML to read the system)."""
    fields, meta = measure_system(measurements(ctx))
    return Captured(text=json.dumps(fields), meta=meta)


def measure_system(session: Session) -> tuple[Fields, Meta]:
    """System metrics now, as flat JSON numbers:

    - `cpu_percent_process` (this process, all threads; 0..100*cpu_count) and
      `cpu_percent_system` (all CPUs busy, 0..100, what yprov4ml's `cpu_usage` reads with
      `psutil.cpu_percent()`), over `cpu_window`: since the previous system record of the
      session, else since the session started (`begin_session`), else since process start and
      since boot;
    - `process_rss_bytes`, `process_peak_rss_bytes`;
    - `memory_total_bytes`, `memory_available_bytes`, `memory_used_bytes` (total - available,
      with both methods), `memory_percent` (yprov4ml's `memory_usage`);
    - `disk_percent`: used space of the filesystem at `/` (yprov4ml's `disk_usage`, psutil's
      `disk_usage('/').percent`: used / (used + available to users));
    - `process_read_bytes`, `process_write_bytes` (storage I/O of this process since it
      started), `disk_read_bytes`, `disk_write_bytes` (all block devices since boot);
    - per GPU i: `gpu{i}_utilization_percent`, `gpu{i}_memory_used_bytes`,
      `gpu{i}_memory_total_bytes`, `gpu{i}_power_w`, `gpu{i}_temperature_c`; meta
      `gpu_current`: the process's current CUDA device (0 unless torch has initialised CUDA),
      the one yprov4ml reports.
    psutil is used when importable, else /proc (Linux). What cannot be read is absent from the
    fields and explained in meta["unavailable"]."""
    psutil = libraries.optional("psutil")
    fields: Fields = {}
    unavailable: dict[str, str] = {}
    meta: Meta = {"method": "psutil" if psutil is not None else "procfs",
                  "cpu_count": os.cpu_count()}
    sample = cpu_sample(psutil)
    with session.lock:
        previous, session.cpu_prev = session.cpu_prev, sample
        window, session.cpu_window = session.cpu_window, "previous_system_record"
    cpu_fields, cpu_meta = cpu_percentages(sample, previous, os.cpu_count() or 1, window)
    fields.update(cpu_fields)
    meta.update(cpu_meta)
    read_groups(psutil, (("process_memory", process_memory), ("memory", system_memory),
                         ("disk_space", disk_space), ("process_io", process_io),
                         ("disk_io", disk_io)), fields, unavailable)
    gpu, gpu_method, reason = gpu_metrics()
    fields.update(gpu)
    if gpu_method:
        meta["gpu_method"] = gpu_method
        meta["gpu_current"] = current_gpu()
    if reason:
        unavailable["gpu"] = reason
    if "cpu_percent_system" not in fields:
        unavailable["cpu_system"] = "system CPU times not readable"
    if unavailable:
        meta["unavailable"] = unavailable
    return fields, meta


def read_groups(psutil: Any, readers: Iterable[tuple[str, Callable[[Any], Fields]]],
                fields: Fields, unavailable: dict[str, str]) -> None:
    """Run each (group, reader): what it reads goes into `fields`; a group that cannot be read
    (a missing file or counter, a platform without it) is left out and explained in
    `unavailable`, so one missing source never costs the others."""
    for group, reader in readers:
        try:
            found = reader(psutil)
        except (OSError, ValueError, AttributeError, KeyError, IndexError) as e:
            unavailable[group] = f"{type(e).__name__}: {e}"
            continue
        if found:
            fields.update(found)
        else:
            unavailable[group] = "not readable on this platform"


def cpu_sample(psutil: Any) -> CpuSample:
    """Cumulative CPU counters now. Process CPU time is `time.process_time()` (nanosecond
    resolution, all threads) so that short windows give sane percentages."""
    busy = total = start = None
    if psutil is not None:
        times = psutil.cpu_times()
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        busy = total - times.idle - getattr(times, "iowait", 0.0)
        start = psutil.Process().create_time()
    else:
        try:
            busy, total = _procfs_cpu_times()
            start = _procfs_process_start()
        except (OSError, ValueError, IndexError):
            pass
    return CpuSample(time.time(), time.process_time(), start, busy, total)


def _procfs_cpu_times() -> tuple[float, float]:
    """(busy, total) clock ticks of all CPUs since boot, as psutil counts them (guest time is
    already in user time; idle and iowait are not busy)."""
    with open(PROC / "stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    total = sum(values[:8])
    return total - values[3] - values[4], total


def _procfs_process_start() -> float:
    """Wall-clock start of this process: boot time + starttime (field 22 of /proc/self/stat)."""
    stat = (PROC / "self" / "stat").read_text()
    start_ticks = float(stat.rsplit(")", 1)[1].split()[19])
    with open(PROC / "stat") as f:
        btime = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    return btime + start_ticks / os.sysconf("SC_CLK_TCK")


def cpu_percentages(now: CpuSample, previous: CpuSample | None, cpu_count: int,
                    window: str = "previous_system_record") -> tuple[Fields, Meta]:
    """CPU percentages over the window since `previous` (which `window` names), or since
    start when there is no usable previous sample. The process value is clamped to its
    physical bound (sampling the two clocks is not atomic, which matters only for windows of
    microseconds)."""
    fields: Fields = {}
    limit = 100.0 * cpu_count
    if (previous is not None and now.wall > previous.wall and now.system_total is not None
            and previous.system_total is not None and now.system_total > previous.system_total):
        interval = now.wall - previous.wall
        proc = (now.process_cpu_s - previous.process_cpu_s) / interval * 100
        fields["cpu_percent_process"] = min(max(proc, 0.0), limit)
        busy = now.system_busy - previous.system_busy  # type: ignore[operator]
        system = 100 * busy / (now.system_total - previous.system_total)
        fields["cpu_percent_system"] = min(max(system, 0.0), 100.0)  # float sums of tick counts
        return fields, {"cpu_window": window, "cpu_interval_s": interval}
    if now.process_start is not None and now.wall > now.process_start:
        proc = now.process_cpu_s / (now.wall - now.process_start) * 100
        fields["cpu_percent_process"] = min(max(proc, 0.0), limit)
    if now.system_total:
        fields["cpu_percent_system"] = 100 * now.system_busy / now.system_total  # type: ignore
    return fields, {"cpu_window": "since_start"}


def process_memory(psutil: Any) -> Fields:
    """RSS now and its peak so far, never below that RSS: Linux updates its high-water mark
    lazily, and memory may grow between the two reads."""
    fields: Fields = {}
    if psutil is not None:
        rss = psutil.Process().memory_info().rss
    else:
        resident = int((PROC / "self" / "statm").read_text().split()[1])
        rss = resident * os.sysconf("SC_PAGE_SIZE")
    fields["process_rss_bytes"] = rss
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak if sys.platform == "darwin" else peak * 1024
        fields["process_peak_rss_bytes"] = max(peak, rss)
    except ImportError:
        pass
    return fields


def system_memory(psutil: Any) -> Fields:
    if psutil is not None:
        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    else:
        info = {}
        with open(PROC / "meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        total, available = info["MemTotal"], info["MemAvailable"]
    return {"memory_total_bytes": total, "memory_available_bytes": available,
            "memory_used_bytes": total - available,
            "memory_percent": 100 * (total - available) / total}


def disk_space(psutil: Any) -> Fields:
    """Used space of the filesystem at `/`, in percent, as psutil computes it (space reserved
    for root counts neither as used nor as available)."""
    if psutil is not None:
        return {"disk_percent": float(psutil.disk_usage("/").percent)}
    st = os.statvfs("/")
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    total = used + st.f_bavail * st.f_frsize
    return {"disk_percent": round(100 * used / total, 1)} if total else {}


def process_io(psutil: Any) -> Fields:
    if psutil is not None:
        io = psutil.Process().io_counters()
        return {"process_read_bytes": io.read_bytes, "process_write_bytes": io.write_bytes}
    values = {}
    with open(PROC / "self" / "io") as f:
        for line in f:
            key, _, rest = line.partition(":")
            values[key] = int(rest)
    return {"process_read_bytes": values["read_bytes"],
            "process_write_bytes": values["write_bytes"]}


def disk_io(psutil: Any) -> Fields:
    """System-wide block I/O since boot, over whole devices (those in /sys/block), as psutil
    sums them; partitions would count twice."""
    if psutil is not None:
        io = psutil.disk_io_counters()
        if io is None:
            return {}
        return {"disk_read_bytes": io.read_bytes, "disk_write_bytes": io.write_bytes}
    devices = set(os.listdir("/sys/block"))
    read = written = 0
    with open(PROC / "diskstats") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 10 and parts[2].replace("/", "!") in devices:
                read += int(parts[5]) * 512  # sectors are 512 bytes in diskstats
                written += int(parts[9]) * 512
    return {"disk_read_bytes": read, "disk_write_bytes": written}
