"""Exercise the real NVML path of the system-metrics sampler on a machine with NVIDIA GPUs.

    pip install -e '.[gpu]'          # nvidia-ml-py (torch optional: it loads the GPU)
    python scripts/check_gpu_metrics.py [--seconds 8] [--interval 0.5]

The project's own machines have no GPU, so its tests prove the GPU path with a fake `pynvml`
module only (tests/test_system_metrics.py). This script runs the sampler for real: it journals
a few seconds of samples into a temporary directory while (when torch sees CUDA) a matrix
multiplication loop keeps GPU 0 busy, then checks every visible GPU's fields against NVML's
own answers and plausible ranges, prints the names W&B and MLflow would get, and exits 1 on
any failure. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

#: What every NVIDIA GPU reports; the others may be "not supported" on some boards.
REQUIRED = ("utilization_percent", "memory_utilization_percent", "memory_used_bytes",
            "memory_total_bytes")
FIELDS = ("utilization_percent", "memory_utilization_percent", "memory_used_bytes",
          "memory_total_bytes", "power_w", "power_limit_w", "temperature_c")


def load_gpu(seconds: float, stop: threading.Event) -> str:
    """Keep GPU 0 busy with matmuls for `seconds`, when torch sees CUDA."""
    try:
        import torch
    except ImportError:
        return "torch not installed: GPU 0 is not loaded (utilisation may stay near 0)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device: GPU 0 is not loaded"
    a = torch.randn(4096, 4096, device="cuda")
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    return "GPU 0 loaded with 4096x4096 matmuls"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()

    try:
        import pynvml
    except ImportError:
        print("FAIL: pynvml is not importable: pip install nvidia-ml-py")
        return 1
    from itwinai_journal import Journal
    from itwinai_journal.capture import gpu, sampler
    from itwinai_journal.loggers import MLFlowLogger
    from itwinai_sync.targets import system_metrics

    pynvml.nvmlInit()
    devices = gpu.nvml_devices(pynvml)
    print(f"NVML {pynvml.nvmlSystemGetDriverVersion()}: {len(devices)} visible GPU(s)")
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="itwinai-gpu-check-") as tmp:
        lg = MLFlowLogger(savedir=Path(tmp), run_id="gpu-check",
                          system_metrics_interval=args.interval)
        lg.create_logger_context()
        stop = threading.Event()
        note: list[str] = []
        worker = threading.Thread(target=lambda: note.append(load_gpu(args.seconds, stop)))
        worker.start()
        worker.join(args.seconds + 60)
        stop.set()
        lg.destroy_logger_context()
        print(note[0] if note else "GPU load did not finish")
        records = Journal(tmp).records(kinds=[sampler.KIND]).to_pylist()
    samples = [(json.loads(r["text"]), json.loads(r["meta"])) for r in records]
    if not samples:
        print("FAIL: no system_metric sample was journaled")
        return 1
    print(f"{len(samples)} samples; gpu_method: {samples[-1][1].get('gpu_method')}, "
          f"unavailable: {samples[-1][1].get('unavailable', {})}")
    for ordinal, handle in devices:
        p = f"gpu{ordinal}_"
        name = pynvml.nvmlDeviceGetName(handle)
        got = {f: [s[p + f] for s, _ in samples if p + f in s] for f in FIELDS}
        missing = [f for f, v in got.items() if not v]
        if set(missing) & set(REQUIRED):
            failures.append(f"{p}: no {', '.join(missing)} in any sample")
        elif missing:  # power and temperature queries are optional in NVML
            print(f"  {p}: not reported by this device: {', '.join(missing)}")
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        if got["memory_total_bytes"] and got["memory_total_bytes"][-1] != total:
            failures.append(f"{p}memory_total_bytes {got['memory_total_bytes'][-1]} != NVML's "
                            f"{total}")
        checks = (("temperature_c", 0, 120), ("power_w", 0, 2000), ("power_limit_w", 1, 2000),
                  ("utilization_percent", 0, 100), ("memory_utilization_percent", 0, 100))
        for field, low, high in checks:
            if any(not low <= v <= high for v in got[field]):
                failures.append(f"{p}{field} outside [{low}, {high}]: {got[field]}")
        util = got["utilization_percent"]
        print(f"  {p} ({name}): utilisation max {max(util, default=None)}%, "
              f"memory {max(got['memory_used_bytes'], default=0) / 2**30:.2f} GiB used, "
              f"power max {max(got['power_w'], default=0):.1f} W of "
              f"{max(got['power_limit_w'], default=0):.0f} W, "
              f"temperature max {max(got['temperature_c'], default=None)} °C")
        if ordinal == 0 and note and note[0].startswith("GPU 0 loaded") and max(util) < 10:
            failures.append(f"{p}utilization_percent stayed below 10% while GPU 0 was loaded")
    fields, meta = samples[-1]
    print("W&B keys:   ", ", ".join(k for k in system_metrics.wandb_stats(fields, meta)
                                    if k.startswith("gpu.")))
    print("MLflow keys:", ", ".join(k for k in system_metrics.mlflow_metrics(fields)
                                    if k.startswith("system/gpu")))
    for failure in failures:
        print("FAIL:", failure)
    print("OK: the NVML path works on this machine" if not failures else
          f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
