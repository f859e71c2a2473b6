"""Sampled system metrics (`system_metric` records, see itwinai_journal.capture.sampler) under the
names and units each tracker's own system monitor uses, in one place for every exporter.

- W&B: the keys of W&B's system monitor (wandb-core/wandb-symon, as in the run's
  StatsRecords), each sample one StatsRecord stamped with the sample's time.
- MLflow: `system/<name>` as MLflow's SystemMetricsMonitor logs them (megabytes are 1e6
  bytes), step = the sample's ordinal. Three names MLflow does not have are added under the
  same prefix, so that its "System metrics" tab shows them too: `process_cpu_utilization_
  percentage`, `process_memory_usage_megabytes`, `gpu_<i>_temperature_celsius`.
- TensorBoard: `system/<journal field>`, in the journal's units.
- Prov4ML: handled by its exporter's view of the `system` kind, which shares these fields.

Counters (network, disk I/O) are since the session's sampler started, as both trackers count
them since their monitor started. MLflow counts loopback traffic; the journal does not.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from itwinai_journal.format.schema import SYSTEM_METRIC_KIND

KIND = SYSTEM_METRIC_KIND

MLFLOW_PREFIX = "system/"
TENSORBOARD_PREFIX = "system/"
MIB, GIB, MB = float(1 << 20), float(1 << 30), 1e6
_GPU_FIELD = re.compile(r"^gpu(\d+)_(.+)$")


def sample(text: str | None) -> dict[str, float]:
    """The fields of a sample record: its JSON object's finite numbers with well-formed names
    (a journal is untrusted input; anything else in it is ignored)."""
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items()
            if isinstance(k, str) and re.fullmatch(r"[a-z0-9_]{1,64}", k)
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def gpus(fields: dict[str, float]) -> dict[int, dict[str, float]]:
    """Per-GPU fields, by the journal's GPU index: {i: {'utilization_percent': ..., ...}}."""
    out: dict[int, dict[str, float]] = {}
    for key, value in fields.items():
        m = _GPU_FIELD.match(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = value
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else 100 * a / b


def _put(out: dict[str, float], key: str, value: float | None) -> None:
    if value is not None:
        out[key] = value


def _scaled(fields: dict[str, float], name: str, unit: float) -> float | None:
    value = fields.get(name)
    return None if value is None else value / unit


def wandb_stats(fields: dict[str, float], meta: dict[str, Any]) -> dict[str, float]:
    """W&B system-monitor keys. `cpu` is the process's CPU share of the CPUs it may use
    (W&B divides by the cgroup limit, else the physical cores: meta `cpu_capacity`). Disk I/O
    uses the older SDK's node-wide `disk.in`/`disk.out` (MiB) as the journal sums all devices."""
    out: dict[str, float] = {}
    capacity = meta.get("cpu_capacity")
    if isinstance(capacity, (int, float)) and capacity > 0 and "cpu_percent_process" in fields:
        out["cpu"] = fields["cpu_percent_process"] / capacity
    _put(out, "proc.cpu.threads", fields.get("process_threads"))
    _put(out, "proc.memory.rssMB", _scaled(fields, "process_rss_bytes", MIB))
    _put(out, "proc.memory.percent", _ratio(fields.get("process_rss_bytes"),
                                            fields.get("memory_total_bytes")))
    _put(out, "memory_percent", fields.get("memory_percent"))
    _put(out, "proc.memory.availableMB", _scaled(fields, "memory_available_bytes", MIB))
    _put(out, "disk./.usagePercent", fields.get("disk_percent"))
    _put(out, "disk./.usageGB", _scaled(fields, "disk_used_bytes", GIB))
    _put(out, "disk.in", _scaled(fields, "disk_read_bytes", MIB))
    _put(out, "disk.out", _scaled(fields, "disk_write_bytes", MIB))
    _put(out, "network.sent", fields.get("net_sent_bytes"))
    _put(out, "network.recv", fields.get("net_recv_bytes"))
    for i, g in sorted(gpus(fields).items()):
        p = f"gpu.{i}."
        _put(out, p + "gpu", g.get("utilization_percent"))
        _put(out, p + "memory", g.get("memory_utilization_percent"))
        _put(out, p + "memoryAllocated", _ratio(g.get("memory_used_bytes"),
                                                g.get("memory_total_bytes")))
        _put(out, p + "memoryAllocatedBytes", g.get("memory_used_bytes"))
        _put(out, p + "temp", g.get("temperature_c"))
        _put(out, p + "powerWatts", g.get("power_w"))
        _put(out, p + "enforcedPowerLimitWatts", g.get("power_limit_w"))
        _put(out, p + "powerPercent", _ratio(g.get("power_w"), g.get("power_limit_w")))
    return out


def mlflow_metrics(fields: dict[str, float]) -> dict[str, float]:
    """MLflow system-metric keys (with the `system/` prefix)."""
    out: dict[str, float] = {}
    _put(out, "cpu_utilization_percentage", fields.get("cpu_percent_system"))
    _put(out, "system_memory_usage_megabytes", _scaled(fields, "memory_used_bytes", MB))
    _put(out, "system_memory_usage_percentage", fields.get("memory_percent"))
    _put(out, "disk_usage_percentage", fields.get("disk_percent"))
    _put(out, "disk_usage_megabytes", _scaled(fields, "disk_used_bytes", MB))
    _put(out, "disk_available_megabytes", _scaled(fields, "disk_free_bytes", MB))
    _put(out, "network_receive_megabytes", _scaled(fields, "net_recv_bytes", MB))
    _put(out, "network_transmit_megabytes", _scaled(fields, "net_sent_bytes", MB))
    _put(out, "process_cpu_utilization_percentage", fields.get("cpu_percent_process"))
    _put(out, "process_memory_usage_megabytes", _scaled(fields, "process_rss_bytes", MB))
    for i, g in sorted(gpus(fields).items()):
        p = f"gpu_{i}_"
        _put(out, p + "memory_usage_percentage", _ratio(g.get("memory_used_bytes"),
                                                        g.get("memory_total_bytes")))
        _put(out, p + "memory_usage_megabytes", _scaled(g, "memory_used_bytes", MB))
        _put(out, p + "utilization_percentage", g.get("utilization_percent"))
        _put(out, p + "power_usage_watts", g.get("power_w"))
        _put(out, p + "power_usage_percentage", _ratio(g.get("power_w"), g.get("power_limit_w")))
        _put(out, p + "temperature_celsius", g.get("temperature_c"))
    return {MLFLOW_PREFIX + k: v for k, v in out.items()}


def tensorboard_scalars(fields: dict[str, float]) -> dict[str, float]:
    """TensorBoard tags: every journal field under `system/`."""
    return {TENSORBOARD_PREFIX + k: v for k, v in sorted(fields.items())}
