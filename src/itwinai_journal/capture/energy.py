"""`carbon`: energy and emissions of the node between two `log()` calls.

`carbon`: energy of the node since the session started (or, when the counters could not be
read then, since the first carbon record, the baseline) and since the previous carbon
record, from codecarbon's OfflineEmissionsTracker when codecarbon is importable and a
country is configured (`country_iso_code=` kwarg or ITWINAI_CARBON_COUNTRY), else from the
RAPL and NVML energy counters times a carbon intensity (`carbon_intensity_g_per_kwh=` kwarg,
ITWINAI_CARBON_INTENSITY, or DEFAULT_CARBON_INTENSITY). value: emissions in gCO2eq since the
baseline, None unless measured; text: JSON (see `capture_carbon`); meta: `method`, `energy`
("measured" | "baseline" | "unavailable"), `scope` ("node"), inputs and reasons.

codecarbon's private attributes are read through `itwinai_journal.compat` (version-gated).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from itwinai_journal import compat

from . import libraries
from .context import CaptureContext, Captured, Fields, Meta, Options
from .gpu import nvml_devices, nvml_ready
from .numbers import non_negative
from .session import EnergyCounter, EnergyReading, Session, measurements

#: Documented default carbon intensity: the world-average CO2 intensity of electricity
#: generation, 475 gCO2eq/kWh (IEA, Global Energy & CO2 Status Report 2019, for 2018), the
#: value codecarbon also falls back to. Set the local grid's value for real accounting.
DEFAULT_CARBON_INTENSITY = 475.0
INTENSITY_ENV = "ITWINAI_CARBON_INTENSITY"
COUNTRY_ENV = "ITWINAI_CARBON_COUNTRY"
#: Where Linux exposes RAPL energy counters (a module constant so that tests can point it away).
RAPL_ROOT = Path("/sys/class/powercap")
J_PER_KWH = 3.6e6


def capture_carbon(item: Any, ctx: CaptureContext, name: str, options: Options) -> Captured:
    """`kind='carbon'`: energy and emissions since the previous carbon record of the session.

    text fields: `interval_s` (since the previous carbon record), `energy_j` and
    `emissions_g` (over the interval), `energy_total_j`, `emissions_total_g` and `duration_s`
    (since the baseline: the counters read when the session started, see `begin_session`, or
    else the session's first carbon record), and per source category (`cpu`, `dram`,
    `platform`, `gpu`) `<category>_energy_j` (over the interval; counters only),
    `<category>_energy_total_j` (since the baseline) and `<category>_power_w` (the interval's
    average; codecarbon: its current estimate). These are what yprov4ml's
    `log_carbon_metrics` reports (codecarbon's cumulative energies and current powers since
    its tracker started with the run), in SI units. The energy is the node's (RAPL packages,
    visible GPUs), not this process's: ranks sharing a node each report it, so do not sum
    them. `item` is ignored, as in itwinai."""
    session = measurements(ctx)
    intensity, source = carbon_intensity(options)
    country = options.get("country_iso_code") or os.environ.get(COUNTRY_ENV) or None
    meta: Meta = {"scope": "node"}
    with session.lock:
        codecarbon = libraries.optional("codecarbon") if country else None
        if codecarbon is not None:
            try:
                fields, cc_meta = _codecarbon_reading(session, codecarbon, str(country))
                value = fields.get("emissions_total_g")
                return Captured(value, json.dumps(fields), meta={**meta, **cc_meta})
            except Exception as e:
                meta["codecarbon_error"] = f"{type(e).__name__}: {e}"
        elif country:
            meta["codecarbon"] = "not installed: country_iso_code unused"
        fields, counter_meta = _counter_reading(session, intensity)
    meta.update(counter_meta)
    meta.update({"carbon_intensity_g_per_kwh": intensity, "carbon_intensity_source": source})
    return Captured(fields.get("emissions_total_g"), json.dumps(fields), meta=meta)


def carbon_intensity(options: Mapping[str, Any]) -> tuple[float, str]:
    """gCO2eq per kWh: the kwarg, else ITWINAI_CARBON_INTENSITY, else the documented default.
    A bad kwarg is the caller's error; a bad environment value warns and falls back, so that
    training does not stop over a logging setting."""
    given = options.get("carbon_intensity_g_per_kwh")
    if given is not None:
        return non_negative(float(given), "carbon_intensity_g_per_kwh"), "kwarg"
    env = os.environ.get(INTENSITY_ENV)
    if env:
        try:
            return non_negative(float(env), INTENSITY_ENV), f"env {INTENSITY_ENV}"
        except ValueError:
            warnings.warn(f"{INTENSITY_ENV}={env!r} is not a number >= 0; using the default "
                          f"{DEFAULT_CARBON_INTENSITY} gCO2eq/kWh", RuntimeWarning, stacklevel=2)
    return DEFAULT_CARBON_INTENSITY, ("default: world average (IEA Global Energy & CO2 Status "
                                      "Report 2019; codecarbon's world fallback)")


def _counter_reading(session: Session, intensity: float) -> tuple[Fields, Meta]:
    """Energy from the RAPL and NVML counters since the previous reading of the session."""
    counters, problems = energy_counters()
    now = time.monotonic()
    previous, session.energy_prev = session.energy_prev, EnergyReading(now, counters)
    kinds = sorted({k.split(":", 1)[0] for k in counters}, reverse=True)  # rapl before nvml
    meta: Meta = {"method": "+".join(kinds) or "none", "sources": sorted(counters)}
    if problems:
        meta["unavailable_reason"] = "; ".join(problems)
    if previous is None or (counters and not previous.counters):
        # the first reading of the counters: the baseline the next records count from
        meta["energy"] = "baseline" if counters else "unavailable"
        if counters:
            session.energy_start = now
        return {}, meta
    interval = now - previous.time
    fields: Fields = {"interval_s": interval}
    deltas = energy_deltas(previous.counters, counters)
    if not deltas:
        meta["energy"] = "unavailable"
        return fields, meta
    for category, joules in deltas.items():
        total = session.energy_totals.get(category, 0.0) + joules
        session.energy_totals[category] = total
        fields[f"{category}_energy_j"] = joules
        fields[f"{category}_energy_total_j"] = total
        if interval > 0:
            fields[f"{category}_power_w"] = joules / interval
    energy, total = sum(deltas.values()), sum(session.energy_totals.values())
    fields.update({"energy_j": energy, "energy_total_j": total,
                   "emissions_g": energy / J_PER_KWH * intensity,
                   "emissions_total_g": total / J_PER_KWH * intensity,
                   "duration_s": now - (session.energy_start or previous.time)})
    meta["energy"] = "measured"
    return fields, meta


def energy_deltas(before: Mapping[str, EnergyCounter], after: Mapping[str, EnergyCounter]
                  ) -> dict[str, float]:
    """Joules per category between two readings, over the counters present in both, taking a
    counter's wrap-around into account."""
    deltas: dict[str, float] = {}
    for key, now in after.items():
        then = before.get(key)
        if then is None:
            continue
        delta = now.joules - then.joules
        if delta < 0 and now.wrap:
            delta += now.wrap
        if delta >= 0:
            deltas[now.category] = deltas.get(now.category, 0.0) + delta
    return deltas


def energy_counters() -> tuple[dict[str, EnergyCounter], list[str]]:
    """Every readable energy counter (RAPL zones, NVML GPUs) and why the others are not."""
    counters, problem = rapl_counters(RAPL_ROOT)
    problems = [f"RAPL: {problem}"] if problem else []
    pynvml = libraries.optional("pynvml")
    reason = "pynvml not importable" if pynvml is None else nvml_ready(pynvml)
    if not reason:
        gpus, reason = _nvml_energy(pynvml)
        counters.update(gpus)
    if reason:
        problems.append(f"NVML: {reason}")
    return counters, problems


def rapl_counters(root: Path) -> tuple[dict[str, EnergyCounter], str | None]:
    """RAPL package zones (`intel-rapl:N`, also used for AMD) and their `dram` subzones. The
    `psys` zone covers the packages: it is used only when no package zone is readable."""
    if not root.is_dir():
        return {}, f"{root} not present"
    found: dict[str, EnergyCounter] = {}
    denied = []
    for zone in sorted(root.glob("intel-rapl:*")):
        category = _rapl_category(zone)
        if category is None:
            continue
        try:
            joules = int((zone / "energy_uj").read_text()) / 1e6
        except PermissionError:
            denied.append(zone.name)
            continue
        except (OSError, ValueError):
            continue
        try:
            wrap: float | None = int((zone / "max_energy_range_uj").read_text()) / 1e6
        except (OSError, ValueError):
            wrap = None
        found[f"rapl:{zone.name}"] = EnergyCounter(category, joules, wrap)
    if any(c.category == "cpu" for c in found.values()):
        found = {k: c for k, c in found.items() if c.category != "platform"}
    if found:
        return found, None
    if denied:
        return {}, (f"energy_uj not readable ({', '.join(denied)}: permission denied; it is "
                    "root-only since Linux 5.10)")
    return {}, f"no readable RAPL zone under {root}"


def _rapl_category(zone: Path) -> str | None:
    try:
        label = (zone / "name").read_text().strip()
    except OSError:
        return None
    depth = zone.name.count(":")
    if depth == 1:
        return "platform" if label == "psys" else "cpu"
    return "dram" if depth == 2 and label == "dram" else None


def _nvml_energy(pynvml: Any) -> tuple[dict[str, EnergyCounter], str | None]:
    """Total energy per GPU since the driver loaded (Volta and later)."""
    found: dict[str, EnergyCounter] = {}
    try:
        devices = nvml_devices(pynvml)
    except Exception as e:
        return {}, f"device query failed: {e}"
    for index, handle in devices:
        try:
            millijoules = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception:  # not supported before Volta
            continue
        found[f"nvml:gpu{index}"] = EnergyCounter("gpu", millijoules / 1000, None)
    return found, None if found else "no GPU with an energy counter"


def _codecarbon_reading(session: Session, codecarbon: Any, country: str
                        ) -> tuple[Fields, Meta]:
    meta: Meta = {"method": "codecarbon", "country_iso_code": country,
                  "codecarbon_version": getattr(codecarbon, "__version__", None)}
    fields: Fields = {}
    tracker = session.tracker
    if tracker is None:
        tracker = session.tracker = compat.start_codecarbon_tracker(codecarbon, country)
        session.tracker_prev = (time.monotonic(), 0.0, 0.0)
        session.energy_start = session.tracker_prev[0]
        meta["energy"] = "baseline"
    else:
        emissions_kg = tracker.flush()
        now, energy_kwh = time.monotonic(), compat.codecarbon_energy_kwh(tracker)
        if emissions_kg is None:
            raise RuntimeError("OfflineEmissionsTracker.flush() returned no emissions")
        then, energy_before, emissions_before = session.tracker_prev  # type: ignore[misc]
        energy, emissions = energy_kwh * J_PER_KWH, emissions_kg * 1000
        session.tracker_prev = (now, energy, emissions)
        fields = {"interval_s": now - then, "energy_j": energy - energy_before,
                  "energy_total_j": energy, "emissions_g": emissions - emissions_before,
                  "emissions_total_g": emissions,
                  "duration_s": now - (session.energy_start or then)}
        fields.update(_codecarbon_components(tracker))
        meta["energy"] = "measured"
    # How codecarbon got its numbers, e.g. "CPU(Cpu Load)": estimated from load and TDP,
    # not read from a counter.
    meta["codecarbon_hardware"] = compat.codecarbon_hardware(tracker)
    return fields, meta


def _codecarbon_components(tracker: Any) -> Fields:
    """codecarbon's per-component totals and current power, in the journal's units, for the
    components it reports (its RAM is the counters' `dram`)."""
    fields: Fields = {}
    for ours, (energy_kwh, power_w) in compat.codecarbon_components(tracker).items():
        if energy_kwh is not None:
            fields[f"{ours}_energy_total_j"] = energy_kwh * J_PER_KWH
        if power_w is not None:
            fields[f"{ours}_power_w"] = power_w
    return fields
