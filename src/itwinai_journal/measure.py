"""Measured kinds: what itwinai's `Prov4MLLogger` measures when `log()` is called, measured here
at that moment on the compute node and stored as numbers in the journal. No yprov4ml import, no
tracker, no network: the exporter later only turns the numbers into provenance.

Each kind has the meaning, units and names of what itwinai's `Prov4MLLogger` records with the
yprov4ml it pins (2.0.9): the journal keeps the measurement (per call, SI units, explicit
names), the Prov4ML exporter shows it as yprov4ml does (running totals, kWh, its metric names).

Record formats (`context` and any other `log()` kwargs are added to meta by the logger):

- `flops_pb`, item `(model, batch)`: FLOPs of one forward pass of `model` on `batch`.
  `flops_pe`, item `(model, data)`: FLOPs of forward passes over every batch of `data`, a
  DataLoader (iterated as is), a torch Dataset or Tensor (wrapped in
  `DataLoader(data, batch_size=batch_size, shuffle=False)`, `batch_size=` kwarg, default 64:
  FLOPs are per-sample additive for nearly every layer, and a bigger batch is faster to count)
  or any other iterable of batches; `max_batches=` kwarg counts the first n batches only (the
  value is then the sum over those, not an extrapolation). yprov4ml counts one sample of a
  Dataset and multiplies by its length (and cannot take a DataLoader): the same number for a
  model whose FLOPs are per-sample additive. A plain number item is stored as given.
  value: FLOPs of this call, in fvcore's convention (one FLOP per multiply-add), as yprov4ml
  counts them; meta: `method` ("fvcore.nn.FlopCountAnalysis" | "FlopCounterMode/2" | both
  joined by "+" | "given", see `FlopCounter`), `fvcore_unused` (why fvcore did not count,
  when it did not), `batches`, `samples` (when every batch has a leading dimension),
  `batches_in_epoch` (when the loader has a length), `dataloader_batch_size` (when a Dataset
  was wrapped). yprov4ml logs the running sum of a kind's counts over the run; the exporter
  makes it from the journal's per-call values.
  Counting runs under `torch.no_grad()` with the model in its current mode (train-only
  branches such as auxiliary heads are what training executes), forward only (a training step
  is roughly 3x). It leaves no trace: buffers (BatchNorm statistics) are restored, the
  torch/random/numpy RNGs are forked, `watch` hooks neither count the call nor record
  histograms. A batch is fed as `model(batch)` for a tensor, `model(batch[0])` for a
  tuple/list (`(inputs, targets)`, as Prov4ML reads it) and `model(**batch)` for a mapping,
  moved to the model's device.
- `system`: value None; text: JSON object of the numbers measured now (see `measure_system`);
  meta: `method` ("psutil" | "procfs"), `cpu_count`, `cpu_window`, `cpu_interval_s`,
  `gpu_method` and `gpu_current` (when a GPU was read), `unavailable` ({group: reason}).
  Absent means not measured, never zero.
- `carbon`: energy of the node since the session started (or, when the counters could not be
  read then, since the first carbon record, the baseline) and since the previous carbon
  record, from codecarbon's OfflineEmissionsTracker when codecarbon is importable and a
  country is configured (`country_iso_code=` kwarg or ITWINAI_CARBON_COUNTRY), else from the
  RAPL and NVML energy counters times a carbon intensity (`carbon_intensity_g_per_kwh=` kwarg,
  ITWINAI_CARBON_INTENSITY, or DEFAULT_CARBON_INTENSITY). value: emissions in gCO2eq since the
  baseline, None unless measured; text: JSON (see `capture_carbon`); meta: `method`, `energy`
  ("measured" | "baseline" | "unavailable"), `scope` ("node"), inputs and reasons.
- `execution_time`: value: the time of the call in Unix seconds (`time.time()`, as
  yprov4ml's `log_current_execution_time`), or the number given; meta `method` ("time.time" |
  "given"), `session_start` (when the journal session started).
- `prov_documents`: a marker asking the exporter to produce the documents at this point: value
  None, meta `{"marker": true}`.

Per-session state (the previous CPU and energy readings, the codecarbon tracker) lives in a
`Session` keyed weakly by the writer's `BlobStore`: the capture signature hands us that store,
the writer creates exactly one per journal session of a rank, and it dies with the writer, so
the state is shared by every logger of that journal, starts fresh when a run is resumed, and
never outlives its session. `begin_session` takes its first readings when a Prov4MLLogger
opens the session, as yprov4ml's `start_run` starts its trackers.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import random
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from itwinai_journal.format.schema import INT64_MAX, INT64_MIN

from .capture import Captured, metric_value

Fields = dict[str, float]
Meta = dict[str, Any]

#: Documented default carbon intensity: the world-average CO2 intensity of electricity
#: generation, 475 gCO2eq/kWh (IEA, Global Energy & CO2 Status Report 2019, for 2018), the
#: value codecarbon also falls back to. Set the local grid's value for real accounting.
DEFAULT_CARBON_INTENSITY = 475.0
INTENSITY_ENV = "ITWINAI_CARBON_INTENSITY"
COUNTRY_ENV = "ITWINAI_CARBON_COUNTRY"
#: Batch size used when `flops_pe` is given a Dataset rather than its DataLoader.
DEFAULT_DATASET_BATCH_SIZE = 64
#: Where Linux exposes RAPL energy counters (a module constant so that tests can point it away).
RAPL_ROOT = Path("/sys/class/powercap")
PROC = Path("/proc")
J_PER_KWH = 3.6e6


def _optional(name: str) -> Any:
    """An optional library if importable (psutil, pynvml, codecarbon), else None. A failed
    import is remembered so that `log()` does not search the path at every call."""
    module = sys.modules.get(name)
    if module is not None or name in _missing:
        return module
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing.add(name)
        return None


_missing: set[str] = set()


# -- per-session state ------------------------------------------------------------------------


@dataclass
class CpuSample:
    wall: float
    process_cpu_s: float
    process_start: float | None
    system_busy: float | None
    system_total: float | None


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


def session_of(blobs: Any) -> Session:
    """The measurement state of the journal session whose blob store is `blobs`."""
    with _sessions_lock:
        session = _sessions.get(blobs)
        if session is None:
            start, clock = _journal_session_start(blobs)
            session = Session(start, clock)
            _sessions[blobs] = session
            weakref.finalize(blobs, session.close)
        return session


def _journal_session_start(blobs: Any) -> tuple[float, str]:
    """When this rank's journal session started: the start the writer recorded in the
    manifest. Without an open writer (a capture called directly), the first measurement."""
    from itwinai_journal.writer.rank import open_writer_at

    writer = open_writer_at(Path(blobs.root).parent)
    if writer is not None and writer.blobs is blobs:
        sessions = writer.manifest.get("sessions") or []
        start = sessions[-1].get("start") if sessions else None
        if isinstance(start, (int, float)):
            return float(start), "journal_session"
    return time.time(), "first_measurement"


# -- numbers given by the user ---------------------------------------------------------------


def _given_number(item: Any) -> float | None:
    """`item` as a float when it is a number (Python, numpy, 0-d tensor), else None."""
    if item is None or isinstance(item, (tuple, list, str, bytes)):
        return None
    try:
        return metric_value(item)
    except TypeError:
        return None


def _non_negative(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return value


def _positive_int(options: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    return value


def _exact(number: float) -> float | int:
    """Integral FLOP counts stay ints in meta (JSON keeps them exact beyond 2**53)."""
    if isinstance(number, int):
        return number
    return int(number) if number.is_integer() and INT64_MIN < number <= INT64_MAX else number


# -- FLOPs ------------------------------------------------------------------------------------


#: How FLOPs are counted: fvcore's convention, one FLOP per multiply-add (what yprov4ml, and
#: so itwinai's Prov4MLLogger, records), by fvcore itself when it is importable, else by
#: torch's FlopCounterMode (two per multiply-add) halved.
FVCORE = "fvcore.nn.FlopCountAnalysis"
HALVED = "FlopCounterMode/2"


class FlopCount(NamedTuple):
    flops: int
    batches: int
    samples: int | None
    method: str
    fallback: str | None = None  # why fvcore was not used, when it was not


def capture_flops_pb(item: Any, blobs: Any, name: str, options: dict[str, Any]) -> Any:
    """`kind='flops_pb'`: FLOPs of one forward pass on one batch (see the module docstring)."""
    return _capture_flops("flops_pb", item, blobs, name, options)


def capture_flops_pe(item: Any, blobs: Any, name: str, options: dict[str, Any]) -> Any:
    """`kind='flops_pe'`: FLOPs of forward passes over a whole dataset (module docstring)."""
    return _capture_flops("flops_pe", item, blobs, name, options)


def _capture_flops(kind: str, item: Any, blobs: Any, name: str, options: dict[str, Any]
                   ) -> Any:
    given = _given_number(item)
    if given is not None:
        return Captured(_non_negative(given, f"kind={kind!r} item"), meta={"method": "given"})
    model, data = _model_and_data(item, kind)
    if kind == "flops_pb":
        count, meta = count_flops(model, [data]), {}
    else:
        count, meta = _epoch_flops(model, data, options)
    meta = {"method": count.method, "batches": count.batches, **meta}
    if count.samples is not None:
        meta["samples"] = count.samples
    if count.fallback:
        meta["fvcore_unused"] = count.fallback
    return Captured(float(count.flops), meta=meta)


def _model_and_data(item: Any, kind: str) -> tuple[Any, Any]:
    torch = sys.modules.get("torch")
    what = "batch" if kind == "flops_pb" else "dataset or DataLoader"
    if (torch is None or not isinstance(item, (tuple, list)) or len(item) != 2
            or not isinstance(item[0], torch.nn.Module)):
        raise TypeError(f"kind={kind!r} needs (model, {what}) with a torch.nn.Module, or a "
                        f"number of FLOPs, got {type(item).__name__}")
    return item[0], item[1]


def _epoch_flops(model: Any, data: Any, options: Mapping[str, Any]) -> tuple[FlopCount, Meta]:
    max_batches = _positive_int(options, "max_batches", None)
    batches, meta = epoch_batches(data, options)
    count = count_flops(model, batches, max_batches)
    return count, meta


def epoch_batches(data: Any, options: Mapping[str, Any]) -> tuple[Iterable[Any], Meta]:
    """The batches of one epoch over `data` and what is known about them. A Dataset or a
    Tensor of samples has no batches of its own: it is wrapped in a DataLoader."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    meta: Meta = {}
    if isinstance(data, DataLoader):
        loader: Iterable[Any] = data
    elif isinstance(data, (Dataset, torch.Tensor)):
        batch_size = _positive_int(options, "batch_size", DEFAULT_DATASET_BATCH_SIZE)
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        meta["dataloader_batch_size"] = batch_size
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        loader = data
    else:
        raise TypeError(f"kind='flops_pe' needs a DataLoader, a Dataset, a Tensor or an "
                        f"iterable of batches, got {type(data).__name__}")
    try:
        meta["batches_in_epoch"] = len(loader)  # type: ignore[arg-type]
    except TypeError:
        pass  # an IterableDataset or a generator: length unknown
    return loader, meta


def count_flops(model: Any, batches: Iterable[Any], max_batches: int | None = None
                ) -> FlopCount:
    """Forward FLOPs of `model` over `batches` (the first `max_batches`), in fvcore's
    convention (one per multiply-add; see FlopCounter), around the model call only, so data
    loading and transforms are not counted."""
    import torch

    device = _model_device(model)
    counter = FlopCounter(model)
    flops = n = 0
    samples: int | None = 0
    with _side_effects_undone(model), torch.no_grad():
        for batch in itertools.islice(batches, max_batches):
            args, kwargs = model_inputs(batch, device)
            flops += counter.count(args, kwargs)
            n += 1
            size = _leading_dim((args, kwargs))
            samples = None if samples is None or size is None else samples + size
    return FlopCount(flops, n, samples, counter.method(), counter.fallback)


class FlopCounter:
    """FLOPs of one forward call of a model, counted once per distinct input signature
    (shapes, dtypes, other arguments): the operators counted (matmul, convolution, norms, ...)
    cost what their shapes say, so the batches of an epoch that look alike are not run again.

    With fvcore importable (the `[prov4ml]` extra; imported here, at the first count, never
    at import time) the count is fvcore's `FlopCountAnalysis`, which is what yprov4ml uses: it
    traces the call and also counts norms and pooling. Otherwise, and for a call fvcore cannot
    trace (keyword inputs, tracing errors), it is torch's FlopCounterMode halved, which counts
    matmuls and convolutions only: the same number for models made of those, less for others.
    `method()` says which counted; both when some batches needed the fallback."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.fvcore = _fvcore_analysis()
        self.fallback: str | None = None if self.fvcore else "fvcore not importable"
        self.used: set[str] = set()
        self.cache: dict[Any, int] = {}

    def method(self) -> str:
        return "+".join(sorted(self.used, key=(FVCORE, HALVED).index)) or HALVED

    def count(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        key = _signature((args, kwargs))
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        flops = None
        if self.fvcore is not None:
            if kwargs:
                self.fallback = "keyword inputs cannot be traced by fvcore"
            else:
                flops = self._fvcore(args)
        if flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                self.model(*args, **kwargs)
            flops = counter.get_total_flops() // 2
            self.used.add(HALVED)
        self.cache[key] = flops
        return flops

    def _fvcore(self, args: tuple[Any, ...]) -> int | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about the model's code
                analysis = self.fvcore(self.model, args)
                analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
                analysis.tracer_warnings("none")
                flops = int(analysis.total())
        except Exception as e:  # noqa: BLE001 - tracing fails in many ways; counted otherwise
            self.fallback = f"fvcore could not trace the model: {type(e).__name__}: {e}"[:300]
            return None
        self.used.add(FVCORE)
        return flops


def _fvcore_analysis() -> Any:
    """fvcore's FlopCountAnalysis when fvcore is importable, else None (imported quietly: it
    uses torch.jit.script at import, which torch deprecates with a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = _optional("fvcore.nn")
    return getattr(module, "FlopCountAnalysis", None)


def _signature(obj: Any) -> Any:
    """What a model call's FLOPs depend on: tensors by shape and dtype, other values by
    themselves (their repr when unhashable)."""
    torch = sys.modules["torch"]
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, *(_signature(o) for o in obj))
    if isinstance(obj, Mapping):
        return ("map", *((str(k), _signature(v)) for k, v in obj.items()))
    try:
        hash(obj)
    except TypeError:
        return ("repr", repr(obj))
    return ("value", obj)


def model_inputs(batch: Any, device: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How a batch is fed to the model: a mapping as keyword arguments (Hugging Face style), a
    tuple or list as `(inputs, targets, ...)` (what DataLoaders yield and Prov4ML reads as
    `x, _ = batch`), anything else as the single input."""
    if isinstance(batch, Mapping):
        return (), {str(k): _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("an empty batch has no model input")
        batch = batch[0]
    return (_to_device(batch, device),), {}


def _to_device(obj: Any, device: Any) -> Any:
    torch = sys.modules["torch"]
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _model_device(model: Any) -> Any:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return None


def _leading_dim(obj: Any) -> int | None:
    """Batch size of a model input: the leading dimension of its first tensor."""
    torch = sys.modules["torch"]
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.ndim else None
    values = obj.values() if isinstance(obj, Mapping) else obj
    if isinstance(values, (tuple, list)) or isinstance(obj, Mapping):
        for value in values:
            size = _leading_dim(value)
            if size is not None:
                return size
    return None


@contextmanager
def _side_effects_undone(model: Any) -> Iterator[None]:
    """The counting pass is a real forward call, but training must go on as if it had not
    happened: buffers changed in place (BatchNorm running statistics, counters) get their
    values back, RNG streams are forked (dropout, shuffling and augmentation draw the same
    numbers as without the measurement), and `watch` hooks are paused."""
    import torch

    saved = [(b, b.detach().clone()) for b in model.buffers()]
    py_state = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), _watch_paused(model):
            yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:  # all of them: BatchNorm's kernel does not bump _version
                buf.copy_(copy)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)


@contextmanager
def _watch_paused(model: Any) -> Iterator[None]:
    """`kind='watch'` hooks (watch.py) count forward calls and record parameter histograms
    every `log_freq` calls: a FLOP-counting pass must neither count nor record."""
    handles = {id(h): h for m in model.modules()
               if (h := getattr(m, "_itwinai_watch", None)) is not None}.values()
    saved = [(h, h.calls, h.armed, h.log_params) for h in handles]
    for handle in handles:
        handle.log_params = False
    try:
        yield
    finally:
        for handle, calls, armed, log_params in saved:
            handle.calls, handle.armed, handle.log_params = calls, armed, log_params


# -- system metrics ---------------------------------------------------------------------------


def capture_system(item: Any, blobs: Any, name: str, options: dict[str, Any]) -> Any:
    """`kind='system'`: one record of the system metrics measured now. `item` is ignored, as
    in itwinai (which asks Prov4ML to read the system)."""
    fields, meta = measure_system(session_of(blobs))
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
    psutil = _optional("psutil")
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
    read_groups(psutil, (("process_memory", _process_memory), ("memory", _system_memory),
                         ("disk_space", _disk_space), ("process_io", _process_io),
                         ("disk_io", _disk_io)), fields, unavailable)
    gpu, gpu_method, reason = gpu_metrics()
    fields.update(gpu)
    if gpu_method:
        meta["gpu_method"] = gpu_method
        meta["gpu_current"] = _current_gpu()
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


def _process_memory(psutil: Any) -> Fields:
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


def _system_memory(psutil: Any) -> Fields:
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


def _disk_space(psutil: Any) -> Fields:
    """Used space of the filesystem at `/`, in percent, as psutil computes it (space reserved
    for root counts neither as used nor as available)."""
    if psutil is not None:
        return {"disk_percent": float(psutil.disk_usage("/").percent)}
    st = os.statvfs("/")
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    total = used + st.f_bavail * st.f_frsize
    return {"disk_percent": round(100 * used / total, 1)} if total else {}


def _current_gpu() -> int:
    """The CUDA device this process computes on, when torch has initialised CUDA; else 0."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_device())
    return 0


def _process_io(psutil: Any) -> Fields:
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


def _disk_io(psutil: Any) -> Fields:
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


# -- GPUs --------------------------------------------------------------------------------------


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
    pynvml = _optional("pynvml")
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


# -- carbon -----------------------------------------------------------------------------------


class EnergyCounter(NamedTuple):
    category: str  # cpu, dram, platform, gpu
    joules: float  # cumulative, since boot or driver load
    wrap: float | None  # the counter's range in joules, when it wraps around


def capture_carbon(item: Any, blobs: Any, name: str, options: dict[str, Any]) -> Any:
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
    session = session_of(blobs)
    intensity, source = carbon_intensity(options)
    country = options.get("country_iso_code") or os.environ.get(COUNTRY_ENV) or None
    meta: Meta = {"scope": "node"}
    with session.lock:
        codecarbon = _optional("codecarbon") if country else None
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
        return _non_negative(float(given), "carbon_intensity_g_per_kwh"), "kwarg"
    env = os.environ.get(INTENSITY_ENV)
    if env:
        try:
            return _non_negative(float(env), INTENSITY_ENV), f"env {INTENSITY_ENV}"
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
    pynvml = _optional("pynvml")
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


#: Options passed to codecarbon that keep it off the network and off the disk, whatever a
#: ~/.codecarbon.config or CODECARBON_* variable says; filtered by what the installed version
#: accepts (names changed across versions).
_CODECARBON_OPTIONS: dict[str, Any] = {
    "save_to_file": False, "save_to_api": False, "save_to_logger": False,
    "save_to_prometheus": False, "save_to_logfire": False, "emissions_endpoint": None,
    "co2_signal_api_token": None, "electricitymaps_api_token": None, "log_level": "error",
    "tracking_mode": "machine", "allow_multiple_runs": True,
}


def _codecarbon_reading(session: Session, codecarbon: Any, country: str
                        ) -> tuple[Fields, Meta]:
    meta: Meta = {"method": "codecarbon", "country_iso_code": country,
                  "codecarbon_version": getattr(codecarbon, "__version__", None)}
    fields: Fields = {}
    tracker = session.tracker
    if tracker is None:
        tracker = session.tracker = _start_tracker(codecarbon, country)
        session.tracker_prev = (time.monotonic(), 0.0, 0.0)
        session.energy_start = session.tracker_prev[0]
        meta["energy"] = "baseline"
    else:
        emissions_kg = tracker.flush()
        now, energy_kwh = time.monotonic(), tracker._total_energy.kWh
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
    meta["codecarbon_hardware"] = getattr(tracker, "_conf", {}).get("hardware")
    return fields, meta


def _codecarbon_components(tracker: Any) -> Fields:
    """codecarbon's per-component totals (kWh) and current power (W), in the journal's units,
    for the components it reports (RAM is the counters' `dram`)."""
    fields: Fields = {}
    for ours, theirs in (("cpu", "cpu"), ("gpu", "gpu"), ("dram", "ram")):
        energy = getattr(getattr(tracker, f"_total_{theirs}_energy", None), "kWh", None)
        if isinstance(energy, (int, float)):
            fields[f"{ours}_energy_total_j"] = float(energy) * J_PER_KWH
        power = getattr(getattr(tracker, f"_{theirs}_power", None), "W", None)
        if isinstance(power, (int, float)):
            fields[f"{ours}_power_w"] = float(power)
    return fields


def _start_tracker(codecarbon: Any, country: str) -> Any:
    """An OfflineEmissionsTracker, started, with its periodic measure-and-output scheduler
    stopped: like every other kind, carbon is measured at `log()` time (`flush()` measures), and
    energy counters integrate exactly between two calls. codecarbon 3's power-monitor sampler
    keeps running (a daemon thread): its load-based estimates need it."""
    import inspect
    import logging

    cls = codecarbon.OfflineEmissionsTracker
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            accepted |= set(inspect.signature(klass.__init__).parameters)
    options = {k: v for k, v in _CODECARBON_OPTIONS.items() if k in accepted}
    if "electricitymaps_api_token" in options:  # the old name is deprecated, and warns
        options.pop("co2_signal_api_token", None)
    # What log_level="error" does, but before the constructor's own INFO/WARNING lines.
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    tracker = cls(country_iso_code=country, **options)
    if not hasattr(tracker, "_total_energy"):
        raise RuntimeError("OfflineEmissionsTracker could not be set up")
    tracker.start()
    scheduler = getattr(tracker, "_scheduler", None)
    if scheduler is not None:
        scheduler.stop()
    return tracker


# -- execution time and the documents marker ---------------------------------------------------


def capture_execution_time(item: Any, blobs: Any, name: str, options: dict[str, Any]) -> Any:
    """`kind='execution_time'`: the current time in Unix seconds, as yprov4ml's
    `log_current_execution_time` records it (`time.time()`), with the session's start in meta
    so that the time elapsed can be read too; or the number given (seconds)."""
    given = _given_number(item)
    if given is not None:
        return Captured(_non_negative(given, "kind='execution_time' item"),
                        meta={"method": "given"})
    session = session_of(blobs)
    return Captured(time.time(), meta={"method": "time.time",
                                       "session_start": session.start_wall,
                                       "clock": session.clock})


def begin_session(blobs: Any) -> None:
    """What yprov4ml's `start_run` starts with the run, done when a Prov4MLLogger opens its
    journal session: the CPU and energy readings the first `system` and `carbon` records count
    from (so that they cover the time since the session started, as yprov4ml's do), instead
    of the first record being only a baseline. Cheap (a few /proc and sysfs reads); never
    raises: a reading that fails leaves the first record as the baseline."""
    session = session_of(blobs)
    try:
        sample = cpu_sample(_optional("psutil"))
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


def capture_prov_documents(item: Any, blobs: Any, name: str, options: dict[str, Any]) -> Any:
    """`kind='prov_documents'`: where the exporter produces the provenance documents."""
    return Captured(meta={"marker": True})
