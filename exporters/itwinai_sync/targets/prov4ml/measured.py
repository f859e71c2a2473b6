"""A rank's measured records (FLOPs, execution time, system, carbon) as itwinai's
Prov4MLLogger records them with the yprov4ml it pins: names, units and accumulation."""

from __future__ import annotations

import bisect
import json
from typing import Any

from itwinai_journal import RankInfo


def _fields(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def numeric_fields(text: str | None) -> dict[str, float]:
    return {k: float(v) for k, v in _fields(text).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def non_numeric_fields(text: str | None) -> set[str]:
    return {k for k, v in _fields(text).items()
            if not isinstance(v, (int, float)) or isinstance(v, bool)}


# -- measured kinds as yprov4ml shows them -------------------------------------------------------

MEASURED_KINDS = ("flops_pb", "flops_pe", "system", "carbon", "execution_time")
#: Appended to the source of sampled system metrics (`psutil.sampled`), which have their own
#: metric entities: yprov4ml keys a metric by source, name and context.
SAMPLED_SOURCE = ".sampled"
J_PER_KWH = 3.6e6
#: System fields shown under the names of yprov4ml 2.0.9's log_system_metrics.
SYSTEM_NAMES = {"cpu_percent_system": "cpu_usage", "memory_percent": "memory_usage",
                "disk_percent": "disk_usage"}
#: Energy categories of the journal's carbon records -> yprov4ml's (codecarbon's) names.
CARBON_PARTS = (("cpu", "cpu"), ("gpu", "gpu"), ("dram", "ram"), ("platform", "platform"))
Shown = list[tuple[str, float, "str | None"]]


class MeasuredView:
    """A rank's measured records as itwinai's Prov4MLLogger records them with the yprov4ml it
    pins (2.0.9): its metric names, units and accumulation. The journal keeps what was
    measured per call; this turns it into what yprov4ml would have logged:

    - `flops_pb`, `flops_pe`: the running total of the kind's FLOPs in the session (yprov4ml
      adds every call to one counter per kind, whatever its label, reset by `start_run`);
      journals written before FLOPs were counted in fvcore's convention (method
      "FlopCounterMode", two per multiply-add) are halved.
    - `execution_time`: Unix seconds (journals that stored seconds since the session started,
      method "session_clock", get the session's start added).
    - `system`: `cpu_usage`, `memory_usage`, `disk_usage` (percent), and for the current GPU
      `gpu_usage` and `gpu_memory_usage` (fractions, as GPUtil and torch give them),
      `gpu_temperature` (degrees C), `gpu_power_usage` (W); the journal's other fields (per
      GPU, process memory, I/O) under their own names. GPU metrics a machine without GPU
      cannot measure are left out, where yprov4ml writes 0.0.
    - `carbon`: `emissions` (kgCO2eq; yprov4ml 2.0.9 logs the energy in kWh under that name),
      `emissions_rate` (kg/s), `cpu_power`, `gpu_power`, `ram_power` (W), `cpu_energy`,
      `gpu_energy`, `ram_energy`, `energy_consumed` (kWh), all since the baseline, as
      codecarbon's cumulative figures (plus `platform_*` when RAPL's psys zone measured it).

    Each entry: (metric name, value, how it was measured when that differs from the record's
    method)."""

    def __init__(self, rank: RankInfo):
        self.starts = sorted(s.start for s in rank.sessions if s.start is not None)
        self.totals: dict[tuple[str, int], float] = {}

    def metrics(self, kind: str, name: str, value: float | None, text: str | None,
                meta: dict[str, Any], t: float) -> Shown:
        fields = numeric_fields(text)
        if kind in ("system", "carbon") and not fields and value is not None:
            fields = {name: value}  # a record with a single number of its own
        if kind in ("flops_pb", "flops_pe"):
            return self._flops(kind, name, value, meta, t)
        if kind == "execution_time":
            return self._execution_time(name, value, meta)
        return self._system(fields, meta) if kind == "system" else self._carbon(fields)

    def _flops(self, kind: str, name: str, value: float | None, meta: dict[str, Any],
               t: float) -> Shown:
        if value is None:
            return []
        how = None
        if meta.get("method") == "FlopCounterMode":
            value, how = value / 2, "FlopCounterMode/2"
        session = max(0, bisect.bisect_right(self.starts, t) - 1)
        total = self.totals[(kind, session)] = self.totals.get((kind, session), 0.0) + value
        return [(name, total, how)]

    @staticmethod
    def _execution_time(name: str, value: float | None, meta: dict[str, Any]) -> Shown:
        if value is None:
            return []
        start = meta.get("session_start")
        if meta.get("method") == "session_clock" and isinstance(start, (int, float)):
            return [(name, start + value, "session_clock + session_start")]
        return [(name, value, None)]

    @staticmethod
    def _system(fields: dict[str, float], meta: dict[str, Any]) -> Shown:
        shown: Shown = [(SYSTEM_NAMES[k], fields[k], None) for k in SYSTEM_NAMES if k in fields]
        current = meta.get("gpu_current")
        gpu = f"gpu{current if isinstance(current, int) else 0}_"
        utilization = fields.get(gpu + "utilization_percent")
        used, total = fields.get(gpu + "memory_used_bytes"), fields.get(gpu + "memory_total_bytes")
        for label, number in (
                ("gpu_memory_usage", used / total if used is not None and total else None),
                ("gpu_usage", None if utilization is None else utilization / 100),
                ("gpu_temperature", fields.get(gpu + "temperature_c")),
                ("gpu_power_usage", fields.get(gpu + "power_w"))):
            if number is not None:
                shown.append((label, number, None))
        shown.extend((k, v, None) for k, v in fields.items() if k not in SYSTEM_NAMES)
        return shown

    @staticmethod
    def _carbon(fields: dict[str, float]) -> Shown:
        shown: Shown = []
        emissions = fields.get("emissions_total_g")
        if emissions is not None:
            shown.append(("emissions", emissions / 1000, None))
            if fields.get("duration_s"):
                shown.append(("emissions_rate", emissions / 1000 / fields["duration_s"], None))
        for unit, suffix, scale in (("power", "_power_w", 1.0),
                                    ("energy", "_energy_total_j", 1 / J_PER_KWH)):
            for ours, theirs in CARBON_PARTS:
                if ours + suffix in fields:
                    shown.append((f"{theirs}_{unit}", fields[ours + suffix] * scale, None))
        if "energy_total_j" in fields:
            shown.append(("energy_consumed", fields["energy_total_j"] / J_PER_KWH, None))
        return shown


# -- models as state_dicts, without running the journal's code ------------------------------------
