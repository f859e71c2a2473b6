"""GPU readings for the `system` kind and the energy counters: through NVML (pynvml) when it
is importable and works, else, for the current device only, through torch when the program
has already initialised CUDA (measuring must not create a GPU context)."""

from __future__ import annotations

import os
import sys
import weakref
from typing import Any

from . import libraries
from .context import Fields

_nvml_status: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


def nvml_ready(pynvml: Any) -> str | None:
    """Initialise NVML once per process (per pynvml module); None when usable, else why not."""
    if pynvml not in _nvml_status:
        try:
            pynvml.nvmlInit()
            _nvml_status[pynvml] = None
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            _nvml_status[pynvml] = f"NVML unusable: {e}"
    return _nvml_status[pynvml]


def nvml_devices(pynvml: Any) -> list[tuple[int, Any]]:
    """(index, handle) of the GPUs this process may use: those named by CUDA_VISIBLE_DEVICES
    (by UUID, or by index, NVML order) keyed by their CUDA ordinal, else every NVML device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [(i, pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())]
    devices = []
    for ordinal, entry in enumerate(e.strip() for e in visible.split(",") if e.strip()):
        if entry.isdigit():
            devices.append((ordinal, pynvml.nvmlDeviceGetHandleByIndex(int(entry))))
        elif entry.startswith("GPU-"):
            devices.append((ordinal, pynvml.nvmlDeviceGetHandleByUUID(entry)))
    return devices


def _nvml_fields(pynvml: Any, index: int, handle: Any) -> Fields:
    """One GPU's metrics; a query the device does not support leaves its field absent."""
    p = f"gpu{index}_"
    queries = {
        "utilization_percent": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "memory_used_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used,
        "memory_total_bytes": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total,
        "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
        "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(
            handle, pynvml.NVML_TEMPERATURE_GPU),
    }
    fields: Fields = {}
    for key, query in queries.items():
        try:
            fields[p + key] = query()
        except Exception:  # NVMLError_NotSupported and kin: the field stays absent
            continue
    return fields


def _torch_gpu_fields(torch: Any) -> Fields:
    """The current CUDA device through torch, when pynvml is missing. Only the current device:
    querying another would create a CUDA context on a GPU that another rank uses."""
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    p = f"gpu{index}_"
    fields: Fields = {p + "memory_used_bytes": total - free, p + "memory_total_bytes": total}
    extra = {"utilization_percent": lambda: torch.cuda.utilization(index),
             "power_w": lambda: torch.cuda.power_draw(index) / 1000,
             "temperature_c": lambda: torch.cuda.temperature(index)}
    for key, query in extra.items():
        try:  # these need pynvml (NVIDIA) or amdsmi (ROCm) underneath
            fields[p + key] = query()
        except Exception:  # not available on this device or platform
            continue
    return fields


def gpu_metrics() -> tuple[Fields, str | None, str | None]:
    """(fields, method, reason unavailable). torch is only used when the program already
    imported it and initialised CUDA: measuring must not create a GPU context."""
    reason = "pynvml not importable"
    pynvml = libraries.optional("pynvml")
    if pynvml is not None:
        reason = nvml_ready(pynvml) or ""
        if not reason:
            try:
                fields: Fields = {}
                for index, handle in nvml_devices(pynvml):
                    fields.update(_nvml_fields(pynvml, index, handle))
                return fields, "pynvml", None if fields else "NVML sees no GPU"
            except Exception as e:
                reason = f"NVML query failed: {e}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return _torch_gpu_fields(torch), "torch.cuda", None
    return {}, None, f"{reason}; CUDA not initialised by torch"


def current_gpu() -> int:
    """The CUDA device this process computes on, when torch has initialised CUDA; else 0."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_device())
    return 0
