"""Sampled system metrics: what W&B's system monitor and MLflow's `log_system_metrics` record
online, read in the background on the compute node and journaled as records of their own kind.

One daemon thread per process ("itwinai-journal-sampler") reads the host when a writer is
attached (the baseline of its counters and CPU window: like W&B's and MLflow's monitors, it
records nothing at start) and then every `interval` seconds, and appends one `system_metric`
record per sample to every journal writer attached to it (one writer per journaled rank and
savedir), the way `watch` hooks append their histograms: through the writer's queue
(`deque.append`, atomic; no lock the SIGTERM handler needs). `log()` is untouched. Two
journals of one rank in one process (an MLflow journal in `mllogs/` and a Prov4ML one in
`mllogs/prov_logs`) share each reading.

Record format (see the README, "The journal format"): `time` = when the reading was taken (a
busy training loop can delay the thread, so this is not the scheduled time), kind
`system_metric`, name `system`, `step` = the sample's ordinal in the rank (0, 1, 2, ...,
continued across sessions, as MLflow's monitor continues a resumed run), value None, `text` =
JSON object of the fields read (absent means not read, never zero), `meta` = how they were
read (`interval_s`, `method`, `cpu_count`, `cpu_capacity`, `gpu_method`, `unavailable`).
One record per sample, not one per field, so a sample is written, exported and deduplicated
whole, and fields derived from several readings (W&B's `proc.memory.percent`) are exact.

Fields (SI units, journal names shared with the `system` kind where they mean the same):
`cpu_percent_process` (this process, all threads, % of one core, over the interval since the
previous reading), `cpu_percent_system` (all CPUs busy, 0..100, same window),
`process_threads`, `process_rss_bytes`, `process_peak_rss_bytes`,
`memory_{total,available,used}_bytes`, `memory_percent`, `disk_percent`, `disk_used_bytes`,
`disk_free_bytes` (filesystem at `/`), and counters since the session's sampler started:
`process_{read,write}_bytes` (this process's storage I/O), `disk_{read,write}_bytes` (all block
devices), `net_{sent,recv}_bytes` (interfaces other than loopback and bond/bridge members).
Per GPU, keyed by CUDA ordinal (CUDA_VISIBLE_DEVICES order): `gpu{i}_utilization_percent`,
`gpu{i}_memory_utilization_percent` (memory controller busy), `gpu{i}_memory_used_bytes`,
`gpu{i}_memory_total_bytes`, `gpu{i}_power_w`, `gpu{i}_power_limit_w`, `gpu{i}_temperature_c`,
through NVML (nvidia-ml-py) when it is importable and works. Several ranks on one node each
report the node's numbers.

Configuration: the loggers' `system_metrics_interval` argument, else the environment variable
ITWINAI_SYSTEM_METRICS_INTERVAL (seconds; `0` or `off` disables), else DEFAULT_INTERVAL.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itwinai_journal.format.schema import SYSTEM_METRIC_KIND as KIND

from . import libraries
from .gpu import nvml_devices, nvml_ready
from .session import CpuSample
from .system import (
    PROC,
    cpu_percentages,
    cpu_sample,
    disk_io,
    process_io,
    process_memory,
    read_groups,
    system_memory,
)

NAME = "system"
#: Seconds between samples: MLflow's default (W&B samples every 15 s), so that one sample is
#: one MLflow step. A sample costs about 0.6 ms of the sampler thread.
DEFAULT_INTERVAL = 10.0
#: The shortest interval accepted (W&B's minimum).
MIN_INTERVAL = 0.1
INTERVAL_ENV = "ITWINAI_SYSTEM_METRICS_INTERVAL"
THREAD_NAME = "itwinai-journal-sampler"
NET_DEV = Path("/proc/net/dev")
SYS_NET = Path("/sys/class/net")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
#: Counters reported as the difference from the session's first reading.
COUNTERS = ("process_read_bytes", "process_write_bytes", "disk_read_bytes", "disk_write_bytes",
            "net_sent_bytes", "net_recv_bytes")


def configured_interval(given: float | str | None) -> float | None:
    """Seconds between samples, or None when sampling is off: `given` (a logger argument), else
    the environment variable, else the default. 0 (or "off") means off. A bad environment value
    warns and falls back to the default: a logging setting must not stop the training."""
    source = "system_metrics_interval"
    if given is None:
        given, source = os.environ.get(INTERVAL_ENV) or None, INTERVAL_ENV
        if given is None:
            return DEFAULT_INTERVAL
    if isinstance(given, str) and given.strip().lower() in ("off", "false", "no", "none"):
        return None
    try:
        interval = float(given)
        if isinstance(given, bool) or not math.isfinite(interval) or interval < 0:
            raise ValueError
    except (TypeError, ValueError):
        if source != INTERVAL_ENV:
            raise ValueError(f"system_metrics_interval must be a number of seconds >= 0 "
                             f"(0: off), got {given!r}") from None
        warnings.warn(f"{INTERVAL_ENV}={given!r} is not a number of seconds >= 0; sampling "
                      f"system metrics every {DEFAULT_INTERVAL} s", RuntimeWarning, stacklevel=3)
        return DEFAULT_INTERVAL
    if interval == 0:
        return None
    return max(interval, MIN_INTERVAL)


# -- reading the host ----------------------------------------------------------------------------


@dataclass
class Reading:
    """One reading of the host: instantaneous fields, cumulative counters, the CPU sample."""

    time: float
    monotonic: float  # the same moment, for scheduling the next sample
    fields: dict[str, float]
    cpu: CpuSample
    unavailable: dict[str, str]
    gpu_method: str | None


def read_host(psutil: Any, nvml: NvmlReader) -> Reading:
    """Everything the sampler records, now. Each group that cannot be read is left out and
    explained; nothing here raises for a missing file or library."""
    fields: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    cpu = cpu_sample(psutil)
    read_groups(psutil, (
        ("process_memory", process_memory), ("memory", system_memory),
        ("process_io", process_io), ("disk_io", disk_io),
        ("threads", _threads), ("disk_space", _disk_space), ("network", _network)),
        fields, unavailable)
    gpu, reason = nvml.read()
    fields.update(gpu)
    if reason:
        unavailable["gpu"] = reason
    return Reading(time.time(), time.monotonic(), fields, cpu, unavailable,
                   "pynvml" if gpu else None)


def _threads(psutil: Any) -> dict[str, float]:
    if psutil is not None:
        return {"process_threads": psutil.Process().num_threads()}
    stat = (PROC / "self" / "stat").read_text()
    return {"process_threads": int(stat.rsplit(")", 1)[1].split()[17])}


def _disk_space(psutil: Any) -> dict[str, float]:
    """The filesystem at `/`, as psutil's disk_usage computes it (space reserved for root is
    neither used nor free), in bytes and percent."""
    st = os.statvfs("/")
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    free = st.f_bavail * st.f_frsize
    if not used + free:
        return {}
    return {"disk_used_bytes": used, "disk_free_bytes": free,
            "disk_percent": 100 * used / (used + free)}


def _network(psutil: Any) -> dict[str, float]:
    """Bytes sent and received since boot over the interfaces W&B counts: neither loopback nor
    enslaved to a master (a bond's or bridge's members would count its traffic twice)."""
    sent = recv = 0
    with open(NET_DEV) as f:
        for line in f.readlines()[2:]:
            name, _, data = line.partition(":")
            name = name.strip()
            if name == "lo" or _enslaved_or_loopback(name):
                continue
            values = data.split()
            recv += int(values[0])
            sent += int(values[8])
    return {"net_sent_bytes": sent, "net_recv_bytes": recv}


def _enslaved_or_loopback(name: str) -> bool:
    path = SYS_NET / name
    if (path / "master").exists():
        return True
    try:
        return bool(int((path / "flags").read_text(), 16) & 0x8)  # IFF_LOOPBACK
    except (OSError, ValueError):
        return False


def cpu_capacity(psutil: Any) -> float:
    """What W&B divides the process CPU percentage by: the cgroup's CPU limit (its quota, or
    fewer allowed CPUs than the host has), else the number of physical cores."""
    limits = []
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            limits.append(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    logical = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    if allowed < logical:
        limits.append(allowed)
    if limits:
        return float(min(limits))
    physical = psutil.cpu_count(logical=False) if psutil is not None else _physical_cores()
    return float(physical or logical)


def _physical_cores() -> int | None:
    cores = set()
    try:
        with open(PROC / "cpuinfo") as f:
            block: dict[str, str] = {}
            for line in [*f, "\n"]:
                if not line.strip():
                    if "core id" in block:
                        cores.add((block.get("physical id"), block["core id"]))
                    block = {}
                    continue
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
    except OSError:
        return None
    return len(cores) or None


class NvmlReader:
    """Per-GPU readings through NVML: every NVML call of the sampler is here, so that a fake
    `pynvml` module in tests needs exactly these functions (nvmlInit, nvmlDeviceGetCount,
    nvmlDeviceGetHandleByIndex/ByUUID, nvmlDeviceGetUtilizationRates, nvmlDeviceGetMemoryInfo,
    nvmlDeviceGetPowerUsage, nvmlDeviceGetEnforcedPowerLimit, nvmlDeviceGetTemperature).
    A missing or broken NVML gives one warning (when the library is installed but unusable)
    and no GPU fields; a query a device does not support leaves its field absent."""

    def __init__(self) -> None:
        self.warned = False

    def read(self) -> tuple[dict[str, float], str | None]:
        with warnings.catch_warnings():  # the deprecated `pynvml` wrapper warns on import
            warnings.simplefilter("ignore", FutureWarning)
            pynvml = libraries.optional("pynvml")
        if pynvml is None:
            return {}, "pynvml not importable"
        try:
            reason = nvml_ready(pynvml)
            if reason is None:
                fields: dict[str, float] = {}
                for ordinal, handle in nvml_devices(pynvml):
                    fields.update(_gpu_fields(pynvml, ordinal, handle))
                return fields, None if fields else "NVML sees no GPU"
        except Exception as e:  # noqa: BLE001 - NVMLError and whatever a broken binding raises
            reason = f"NVML query failed: {type(e).__name__}: {e}"
        if not self.warned:
            self.warned = True
            warnings.warn(f"itwinai-journal: system metrics without GPU fields ({reason})",
                          RuntimeWarning, stacklevel=2)
        return {}, reason


def _gpu_fields(pynvml: Any, ordinal: int, handle: Any) -> dict[str, float]:
    p = f"gpu{ordinal}_"
    fields: dict[str, float] = {}

    def query(call: Any, *keys_and_values: tuple[str, Any]) -> None:
        try:
            result = call()
        except Exception:  # NVMLError_NotSupported and kin: the fields stay absent
            return
        for key, value in keys_and_values:
            fields[p + key] = value(result)

    query(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle),
          ("utilization_percent", lambda u: u.gpu),
          ("memory_utilization_percent", lambda u: u.memory))
    query(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle),
          ("memory_used_bytes", lambda m: m.used), ("memory_total_bytes", lambda m: m.total))
    query(lambda: pynvml.nvmlDeviceGetPowerUsage(handle), ("power_w", lambda mw: mw / 1000))
    query(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle),
          ("power_limit_w", lambda mw: mw / 1000))
    query(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
          ("temperature_c", lambda c: c))
    return fields


# -- the sampler thread --------------------------------------------------------------------------


@dataclass
class _Target:
    """One attached writer: its next step, when its next sample is due (monotonic), and the
    reading its counters and CPU window start from (taken when it was attached)."""

    writer: Any
    interval: float
    step: int | None = None
    due: float = 0.0
    baseline: dict[str, float] = field(default_factory=dict)
    previous_cpu: CpuSample | None = None


class _Sampler:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.targets: dict[int, _Target] = {}
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self.nvml = NvmlReader()

    def attach(self, writer: Any, interval: float) -> None:
        with self.lock:
            if id(writer) in self.targets:
                current = self.targets[id(writer)]
                current.interval = min(current.interval, interval)
            else:
                self.targets[id(writer)] = _Target(writer, interval)
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name=THREAD_NAME, daemon=True)
                self.thread.start()
            else:
                self.wake.set()  # the new writer's baseline is read now

    def live(self) -> list[_Target]:
        """The targets whose writer is still open in this process; the thread ends (and a
        later attach starts another) when there is none."""
        with self.lock:
            for key, target in list(self.targets.items()):
                w = target.writer
                if w.closed or w._finished or w._forwarding:
                    del self.targets[key]
            if not self.targets:
                self.thread = None
            return list(self.targets.values())

    def run(self) -> None:
        psutil = libraries.optional("psutil")
        static = {"method": "psutil" if psutil is not None else "procfs",
                  "cpu_count": os.cpu_count(), "cpu_capacity": cpu_capacity(psutil)}
        while True:
            targets = self.live()
            if not targets:
                return
            self.wake.clear()
            now = time.monotonic()
            if any(t.step is None or t.due <= now for t in targets):
                # writers attached at different times fall into step: one reading serves every
                # writer due within a quarter interval
                due = [t for t in targets if t.step is None or t.due <= now + t.interval / 4]
                try:
                    reading = read_host(psutil, self.nvml)
                    fresh = [t for t in due if t.step is None]
                    for target in due:
                        self.emit(target, reading, static)
                    self.align(fresh, targets)
                except Exception as e:  # noqa: BLE001 - never an exception into the job
                    with self.lock:
                        self.targets.clear()
                        self.thread = None
                    warnings.warn(f"itwinai-journal: system metrics sampling stopped "
                                  f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=1)
                    return
            self.wake.wait(max(0.0, min(t.due for t in targets) - time.monotonic()))

    @staticmethod
    def align(new: list[_Target], targets: list[_Target]) -> None:
        """Put writers just attached on the schedule of those sampled already, so that one
        reading keeps serving all of them: a new writer's first sample comes with the others'
        next one, unless that is less than half its interval away (then with the one after)."""
        fresh = {id(t) for t in new}
        others = [t.due for t in targets if id(t) not in fresh]
        for target in new:
            if others:
                read_at, due = target.due - target.interval, min(others)
                while due - read_at < target.interval / 2:
                    due += target.interval
                target.due = due

    def emit(self, target: _Target, reading: Reading, static: dict[str, Any]) -> None:
        """Append the target's sample of `reading`; a target's first reading (when it was
        attached) is only its baseline, as W&B's and MLflow's monitors record their first
        sample one interval after they start. The next is due one interval after this reading
        (a thread delayed by a busy loop never samples faster than asked)."""
        target.due = reading.monotonic + target.interval
        if target.step is None:
            target.step = target.writer.earlier_records(KIND)
            target.baseline = {k: reading.fields[k] for k in COUNTERS if k in reading.fields}
            target.previous_cpu = reading.cpu
            return
        fields = dict(reading.fields)
        for key, start in target.baseline.items():
            if key in fields:
                fields[key] -= start
        cpu, _ = cpu_percentages(reading.cpu, target.previous_cpu, os.cpu_count() or 1)
        fields.update(cpu)
        target.previous_cpu = reading.cpu
        fields = {k: v for k, v in sorted(fields.items())
                  if isinstance(v, (int, float)) and math.isfinite(v)}
        meta: dict[str, Any] = {"interval_s": target.interval, **static}
        if reading.gpu_method:
            meta["gpu_method"] = reading.gpu_method
        if reading.unavailable:
            meta["unavailable"] = reading.unavailable
        target.writer.append((reading.time, KIND, NAME, target.step, None, None,
                              json.dumps(fields), None, meta, None))
        target.step += 1


_sampler = _Sampler()


def attach(writer: Any, interval: float | None) -> None:
    """Sample the system into `writer`'s journal every `interval` seconds (None: do not),
    until it is closed. Called when a logger opens its journal; idempotent per writer."""
    if interval is None or writer._forwarding:
        return
    _sampler.attach(writer, interval)


def wake() -> None:
    """Let the sampler notice closed writers now (it stops when none is left)."""
    _sampler.wake.set()


def running() -> bool:
    thread = _sampler.thread
    return thread is not None and thread.is_alive()


def _after_fork_in_child() -> None:
    """A forked child has no sampler thread and its copies of the parent's writers forward to
    the parent, which samples: start from nothing (a journal the child opens itself gets a
    sampler of its own)."""
    global _sampler
    _sampler = _Sampler()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
