"""Prov4ML's measured kinds (flops_pb, flops_pe, system, carbon, execution_time,
prov_documents) are measured at `log()` time on the compute node and read back from the journal
with `Journal(savedir).records(kinds=[...])` after `destroy_logger_context()`.

Real parts, CPU only: a real torch model, real FlopCounterMode, the real /proc and psutil of this
machine, real clocks. Where this machine has no hardware to read (GPUs, RAPL counters,
codecarbon), the test says so and checks the honest outcome; the code paths for that hardware
are exercised with small stand-ins (a fake sysfs tree, a fake pynvml/codecarbon module), marked
as such."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from itwinai_journal import Journal
from itwinai_journal.capture import energy, libraries, system, watch
from itwinai_journal.capture.flops import DEFAULT_DATASET_BATCH_SIZE, FlopCounter
from itwinai_journal.loggers import LoggersCollection, MLFlowLogger, Prov4MLLogger

IN, OUT = 7, 5
MEASURED = ("flops_pb", "flops_pe", "system", "carbon", "execution_time", "prov_documents")
_ENV = ("ITWINAI_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "WORLD_SIZE",
        "ITWINAI_CARBON_COUNTRY", "ITWINAI_CARBON_INTENSITY", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def prov(tmp_path):
    logger = Prov4MLLogger(provenance_save_dir=str(tmp_path / "mllogs" / "prov_logs"),
                           experiment_name="measured", log_freq="batch", run_id="run-1")
    logger.create_logger_context()
    yield logger
    if logger.is_initialized:
        logger.destroy_logger_context()


def read_back(logger, kinds=MEASURED) -> list[dict]:
    logger.destroy_logger_context()
    records = Journal(logger.journal_savedir).records(kinds=list(kinds)).to_pylist()
    for r in records:
        r["meta"] = json.loads(r["meta"]) if r["meta"] else {}
        r["fields"] = json.loads(r["text"]) if r["text"] else None
    return records


def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(IN, OUT)


def flops(samples: int) -> int:
    """A Linear(in, out) forward on `samples` rows: one (samples x in) @ (in x out) matmul, in
    fvcore's convention (one FLOP per multiply-add), as yprov4ml counts."""
    return IN * OUT * samples


def fvcore_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """fvcore's own count of `model(x)`, on a copy (tracing runs the model)."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(copy.deepcopy(model), (x,))
    return int(analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).total())


@pytest.fixture
def no_fvcore(monkeypatch):
    """The compute node without fvcore: FlopCounterMode, halved."""
    optional = libraries.optional
    monkeypatch.setattr(libraries, "optional",
                        lambda name: None if name == "fvcore.nn" else optional(name))


def loader(n: int, batch_size: int, **kwargs) -> DataLoader:
    data = TensorDataset(torch.randn(n, IN), torch.randint(0, 2, (n,)))
    return DataLoader(data, batch_size=batch_size, **kwargs)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def test_flops_per_batch_is_counted_by_fvcore_per_call(prov):
    model = linear()
    prov.log((model, torch.randn(3, IN)), "fwd", kind="flops_pb", step=0)
    prov.log((model, (torch.randn(8, IN), torch.zeros(8))), "fwd", kind="flops_pb", step=1)
    prov.log((model, torch.randn(4, IN)), "other", kind="flops_pb", step=2)
    first, second, other = read_back(prov)
    assert (first["value"], second["value"], other["value"]) == (flops(3), flops(8), flops(4))
    assert first["meta"] == {"method": "fvcore.nn.FlopCountAnalysis", "batches": 1,
                             "samples": 3}  # the default context is not stored
    assert [r["step"] for r in (first, second, other)] == [0, 1, 2]


def test_flops_count_what_fvcore_counts(prov):
    """Norms count too (fvcore's batch_norm handle), as with yprov4ml: not only matmuls."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT), torch.nn.BatchNorm1d(OUT),
                                torch.nn.ReLU(), torch.nn.Linear(OUT, 2))
    x = torch.randn(4, IN)
    expected = fvcore_flops(model, x)
    prov.log((model, x), "fwd", kind="flops_pb")
    (record,) = read_back(prov)
    assert record["value"] == expected > 4 * (IN * OUT + OUT * 2)


def test_flops_without_fvcore_are_flopcountermode_halved(prov, no_fvcore):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT), torch.nn.BatchNorm1d(OUT),
                                torch.nn.Linear(OUT, 2))
    prov.log((model, torch.randn(4, IN)), "fwd", kind="flops_pb")
    prov.log((linear(), torch.randn(3, IN)), "lin", kind="flops_pb")
    with_norm, plain = read_back(prov)
    # matmuls only: the norm is not counted (fvcore would count it)
    assert with_norm["value"] == 4 * (IN * OUT + OUT * 2)
    assert plain["value"] == flops(3)
    assert with_norm["meta"]["method"] == "FlopCounterMode/2"
    assert with_norm["meta"]["fvcore_unused"] == "fvcore not importable"


def test_flops_of_keyword_inputs_fall_back_and_say_so(prov):
    class Keyed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = linear()

        def forward(self, features):
            return self.lin(features)

    prov.log((Keyed(), {"features": torch.randn(2, IN)}), "kw", kind="flops_pb")
    (record,) = read_back(prov)
    assert record["value"] == flops(2)
    assert record["meta"]["method"] == "FlopCounterMode/2"
    assert "keyword inputs" in record["meta"]["fvcore_unused"]


def test_flops_are_counted_once_per_input_shape(prov, monkeypatch):
    calls = []
    counter_count = FlopCounter.count

    def spy(self, args, kwargs):
        calls.append(tuple(args[0].shape))
        return counter_count(self, args, kwargs)

    real_fvcore = FlopCounter._fvcore
    traced = []
    monkeypatch.setattr(FlopCounter, "count", spy)
    monkeypatch.setattr(FlopCounter, "_fvcore",
                        lambda self, args: traced.append(1) or real_fvcore(self, args))
    prov.log((linear(), loader(10, batch_size=4)), "epoch", kind="flops_pe")
    (record,) = read_back(prov)
    assert calls == [(4, IN), (4, IN), (2, IN)]
    assert len(traced) == 2  # shapes (4, IN) and (2, IN)
    assert record["value"] == flops(10)


def test_flops_per_epoch_over_a_dataloader_with_and_without_cap(prov):
    model = linear()
    n = 10
    prov.log((model, loader(n, batch_size=4)), "epoch", kind="flops_pe", step=0)
    prov.log((model, loader(n, batch_size=4)), "epoch", kind="flops_pe", step=1, max_batches=2)
    prov.log((model, loader(n, batch_size=4)), "epoch", kind="flops_pe", step=2, max_batches=99)
    full, capped, loose_cap = read_back(prov)
    assert full["value"] == flops(n)
    assert (full["meta"]["batches"], full["meta"]["batches_in_epoch"]) == (3, 3)
    assert full["meta"]["samples"] == n
    assert capped["value"] == flops(8)  # the first two batches of 4, not an extrapolation
    assert (capped["meta"]["batches"], capped["meta"]["samples"]) == (2, 8)
    assert capped["meta"]["kwargs"] == {"max_batches": 2}
    assert loose_cap["value"] == flops(n)


def test_flops_per_epoch_wraps_a_dataset_or_tensor_and_takes_iterables(prov):
    model = linear()
    x = torch.randn(9, IN)
    prov.log((model, TensorDataset(x, torch.zeros(9))), "ds", kind="flops_pe")
    prov.log((model, TensorDataset(x, torch.zeros(9))), "ds2", kind="flops_pe", batch_size=2)
    prov.log((model, x), "tensor", kind="flops_pe")
    prov.log((model, [x[:5], x[5:]]), "list", kind="flops_pe")
    prov.log((model, (b for b in [x[:2]])), "gen", kind="flops_pe")
    ds, ds2, tensor, batches, gen = read_back(prov)
    assert [r["value"] for r in (ds, ds2, tensor, batches)] == [flops(9)] * 4
    assert ds["meta"]["dataloader_batch_size"] == DEFAULT_DATASET_BATCH_SIZE
    assert (ds2["meta"]["dataloader_batch_size"], ds2["meta"]["batches"]) == (2, 5)
    assert batches["meta"]["batches"] == 2 and "dataloader_batch_size" not in batches["meta"]
    assert gen["value"] == flops(2) and "batches_in_epoch" not in gen["meta"]


def test_flops_given_as_numbers(prov):
    model = linear()
    prov.log(1000, "fwd", kind="flops_pb")
    prov.log((model, torch.randn(2, IN)), "fwd", kind="flops_pb")
    prov.log(np.int64(5), "epoch", kind="flops_pe")
    given, counted, epoch = read_back(prov)
    assert given["meta"] == {"method": "given"}
    assert counted["value"] == flops(2)
    assert (epoch["value"], epoch["meta"]["method"]) == (5.0, "given")


def test_flops_counting_leaves_training_untouched(prov):
    """Train mode, BatchNorm and Dropout, a shuffling loader: after counting, buffers, RNG
    streams and the mode are as they were, so training is bit-identical with the measurement."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT), torch.nn.BatchNorm1d(OUT),
                                torch.nn.Dropout(0.5), torch.nn.Linear(OUT, 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch, epoch_loader = torch.randn(4, IN), loader(6, batch_size=3, shuffle=True)
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(7)
    prov.log((model, batch), "fwd", kind="flops_pb")
    prov.log((model, epoch_loader), "epoch", kind="flops_pe")
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    fwd, epoch = read_back(prov)
    model.load_state_dict(before)
    assert fwd["value"] == fvcore_flops(model, batch)
    assert epoch["value"] == 2 * fvcore_flops(model, torch.randn(3, IN))


def test_flops_counting_is_not_seen_by_watch_hooks(prov):
    model = linear()
    emitted: list[tuple] = []
    handle = watch.attach(model, emitted.append, log="all", log_freq=1)
    prov.log((model, torch.randn(2, IN)), "fwd", kind="flops_pb")
    prov.log((model, loader(4, batch_size=2)), "epoch", kind="flops_pe")
    assert (handle.calls, emitted) == (0, [])
    model(torch.randn(2, IN))  # a real forward call is still watched
    assert handle.calls == 1 and any(rec[2].startswith("parameters/") for rec in emitted)
    handle.remove()
    assert [r["value"] for r in read_back(prov)] == [flops(2), flops(4)]


@pytest.mark.parametrize(("item", "kwargs", "error"), [
    ("model.pt", {}, TypeError),
    ((torch.nn.Linear(2, 2),), {}, TypeError),
    ((object(), torch.zeros(1, 2)), {}, TypeError),
    (-5, {}, ValueError),
    (float("nan"), {}, ValueError),
    ((torch.nn.Linear(IN, 2), torch.zeros(4, IN)), {"max_batches": 0}, ValueError),
    ((torch.nn.Linear(IN, 2), "not data"), {}, TypeError),
])
def test_flops_per_epoch_rejects_bad_items(prov, item, kwargs, error):
    with pytest.raises(error):
        prov.log(item, "bad", kind="flops_pe", **kwargs)
    assert read_back(prov) == []


# --------------------------------------------------------------------------------------------
# system
# --------------------------------------------------------------------------------------------


def _burn_cpu(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(1000))


def _check_system_bounds(fields: dict, meta: dict) -> None:
    cpus = os.cpu_count()
    assert meta["cpu_count"] == cpus
    assert 0 <= fields["cpu_percent_process"] <= 100 * cpus
    assert 0 <= fields["cpu_percent_system"] <= 100
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert fields["memory_total_bytes"] == pytest.approx(total, rel=0.01)
    assert 0 < fields["process_rss_bytes"] <= fields["memory_total_bytes"]
    assert fields["process_rss_bytes"] <= fields["process_peak_rss_bytes"] * 1.01
    assert 0 < fields["memory_used_bytes"] <= fields["memory_total_bytes"]
    assert fields["memory_used_bytes"] + fields["memory_available_bytes"] == \
        fields["memory_total_bytes"]
    assert 0 < fields["memory_percent"] <= 100
    assert 0 < fields["disk_percent"] <= 100  # of '/', as yprov4ml's disk_usage
    for key in ("process_read_bytes", "process_write_bytes", "disk_read_bytes",
                "disk_write_bytes"):
        assert fields[key] >= 0 and float(fields[key]).is_integer(), key
    assert not any(k.startswith("gpu") for k in fields)  # no GPU here: absent, not zero
    assert "gpu" in meta["unavailable"]


@pytest.mark.parametrize("method", ["psutil", "procfs"])
def test_system_metrics_are_within_physical_bounds(prov, monkeypatch, method):
    if method == "psutil":
        pytest.importorskip("psutil")
    else:  # the compute node without psutil: /proc only
        optional = libraries.optional
        monkeypatch.setattr(libraries, "optional",
                            lambda name: None if name == "psutil" else optional(name))
    time.sleep(0.05)  # a window the system's CPU clock ticks in (10 ms resolution)
    prov.log(None, "system", kind="system", step=0)
    cpu_before = time.process_time()
    _burn_cpu(0.3)
    burnt = time.process_time() - cpu_before
    prov.log(None, "system", kind="system", step=1, context="validation")
    first, second = read_back(prov)
    for record in (first, second):
        assert record["value"] is None and record["meta"]["method"] == method
        _check_system_bounds(record["fields"], record["meta"])
    # the first record counts from the session's start (read when the logger opened it)
    assert first["meta"]["cpu_window"] == "session_start" and first["meta"]["cpu_interval_s"] > 0
    assert second["meta"]["cpu_window"] == "previous_system_record"
    assert second["meta"]["cpu_interval_s"] >= 0.3
    # the window contains the busy loop: at least its CPU time over the window's length
    interval = second["meta"]["cpu_interval_s"]
    assert second["fields"]["cpu_percent_process"] >= 100 * burnt / interval * 0.99
    assert second["fields"]["cpu_percent_system"] > 0
    assert second["meta"]["context"] == "validation"


def test_system_procfs_agrees_with_psutil():
    psutil = pytest.importorskip("psutil")
    fields = system.system_memory(None)
    assert fields["memory_total_bytes"] == psutil.virtual_memory().total
    assert system.disk_space(None)["disk_percent"] == pytest.approx(
        psutil.disk_usage("/").percent, abs=0.2)
    rss = system.process_memory(None)["process_rss_bytes"]
    assert rss == pytest.approx(psutil.Process().memory_info().rss, rel=0.05)
    disk = system.disk_io(None)
    io = psutil.disk_io_counters()
    assert disk["disk_read_bytes"] == pytest.approx(io.read_bytes, rel=0.01)
    proc_io = system.process_io(None)
    assert proc_io["process_read_bytes"] == psutil.Process().io_counters().read_bytes


class FakeNvml(types.ModuleType):
    """Stand-in for pynvml on this GPU-less machine: two GPUs, the second without power
    readings (as older boards answer NVMLError_NotSupported)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.energy_mj = [1_000_000, 5_000_000]

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        return int(uuid.rsplit("-", 1)[1])

    def nvmlDeviceGetUtilizationRates(self, h: int):
        return types.SimpleNamespace(gpu=40 + h, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: int):
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=16 * 2**30, free=0)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise RuntimeError("NVMLError_NotSupported")
        return 250_500  # mW

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 60 + h

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        return self.energy_mj[h]


def test_system_gpu_fields_through_nvml(prov, monkeypatch):
    """Code path check with a fake pynvml (no GPU on this machine)."""
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    prov.log(None, "system", kind="system")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-fake-1")
    prov.log(None, "system", kind="system")
    all_gpus, visible = read_back(prov)
    fields = all_gpus["fields"]
    assert all_gpus["meta"]["gpu_method"] == "pynvml" and "gpu" not in all_gpus["meta"].get(
        "unavailable", {})
    assert all_gpus["meta"]["gpu_current"] == 0  # torch has not initialised CUDA here
    assert (fields["gpu0_utilization_percent"], fields["gpu1_utilization_percent"]) == (40, 41)
    assert fields["gpu0_memory_used_bytes"] == 2**30
    assert fields["gpu1_memory_total_bytes"] == 16 * 2**30
    assert fields["gpu0_power_w"] == 250.5 and "gpu1_power_w" not in fields
    assert fields["gpu1_temperature_c"] == 61
    # CUDA_VISIBLE_DEVICES names the GPUs of this process, keyed by their CUDA ordinal
    assert visible["fields"]["gpu0_utilization_percent"] == 41
    assert not any(k.startswith("gpu1_") for k in visible["fields"])


# --------------------------------------------------------------------------------------------
# execution time
# --------------------------------------------------------------------------------------------


def _session_start(logger) -> float:
    (run,) = Journal(logger.journal_savedir).runs()
    manifest = json.loads((run.rank(0).path / "manifest.json").read_text())
    return manifest["sessions"][-1]["start"]


def test_execution_time_is_the_time_of_the_call(prov):
    """As yprov4ml's log_current_execution_time: time.time() at the call, in Unix seconds;
    the session's start is kept beside it."""
    before = time.time()
    prov.log(None, "now", kind="execution_time", step=0)
    time.sleep(0.05)
    prov.log(None, "now", kind="execution_time", step=1)
    after = time.time()
    prov.log(12.5, "epoch_time", kind="execution_time")
    first, second, given = read_back(prov)
    assert before <= first["value"] <= second["value"] - 0.05 < after
    assert first["value"] == pytest.approx(first["time"], abs=0.01)
    start = _session_start(prov)
    assert second["meta"] == {"method": "time.time", "session_start": start,
                              "clock": "journal_session"}
    assert (given["value"], given["meta"]) == (12.5, {"method": "given"})


def test_a_resumed_session_starts_its_own_measurements(tmp_path):
    savedir = str(tmp_path / "prov")
    for _ in range(2):
        logger = Prov4MLLogger(provenance_save_dir=savedir, run_id="resumed", log_freq="batch")
        logger.create_logger_context()
        logger.log(None, "now", kind="execution_time")
        time.sleep(0.05)
        logger.log(None, "system", kind="system")
        logger.destroy_logger_context()
        time.sleep(0.2)
    records = Journal(savedir).records(kinds=["execution_time", "system"]).to_pylist()
    (run,) = Journal(savedir).runs()
    manifest = json.loads((run.rank(0).path / "manifest.json").read_text())
    starts = [session["start"] for session in manifest["sessions"]]
    assert len(starts) == 2 and starts[1] - starts[0] >= 0.2
    timed = [json.loads(r["meta"]) for r in records if r["kind"] == "execution_time"]
    assert [m["session_start"] for m in timed] == starts
    systems = [json.loads(r["meta"]) for r in records if r["kind"] == "system"]
    assert [m["cpu_window"] for m in systems] == ["session_start", "session_start"]
    assert all(m["cpu_interval_s"] < 0.2 for m in systems)  # not since the first session


# --------------------------------------------------------------------------------------------
# carbon
# --------------------------------------------------------------------------------------------


def test_carbon_is_recorded_honestly_on_this_machine(prov):
    """Whatever this machine can read: real numbers >= 0, or an explicit 'unavailable'
    (this VM has no RAPL and no GPU) with absent energy fields, never invented zeros."""
    prov.log(None, "co2", kind="carbon", step=0)
    _burn_cpu(0.1)
    prov.log(None, "co2", kind="carbon", step=1, carbon_intensity_g_per_kwh=300)
    first, second = read_back(prov)
    for record in (first, second):
        meta = record["meta"]
        assert meta["scope"] == "node" and meta["method"]
        assert meta["energy"] in ("measured", "baseline", "unavailable")
    assert first["meta"]["energy"] in ("baseline", "unavailable") and first["value"] is None
    assert first["meta"]["carbon_intensity_g_per_kwh"] == energy.DEFAULT_CARBON_INTENSITY
    assert first["meta"]["carbon_intensity_source"].startswith("default")
    assert second["meta"]["carbon_intensity_g_per_kwh"] == 300
    assert second["meta"]["carbon_intensity_source"] == "kwarg"
    fields = second["fields"]
    assert fields["interval_s"] > 0.1
    if second["meta"]["energy"] == "measured":
        assert fields["energy_j"] >= 0 and second["value"] >= 0
        assert fields["emissions_g"] == pytest.approx(fields["energy_j"] / 3.6e6 * 300)
    else:
        assert second["meta"]["energy"] == "unavailable" and second["value"] is None
        assert second["meta"]["unavailable_reason"]
        assert not any("energy" in k or "emissions" in k for k in fields)


def _fake_rapl(root: Path, zones: dict[str, tuple[str, int]]) -> None:
    for zone, (label, microjoules) in zones.items():
        (root / zone).mkdir(parents=True, exist_ok=True)
        (root / zone / "name").write_text(label + "\n")
        (root / zone / "energy_uj").write_text(f"{microjoules}\n")
        (root / zone / "max_energy_range_uj").write_text("262143328850\n")


def test_carbon_from_rapl_and_nvml_counters(prov, monkeypatch, tmp_path):
    """Code path check with a fake sysfs tree and a fake pynvml: deltas, wrap-around, psys not
    double counted, emissions = energy x intensity (from ITWINAI_CARBON_INTENSITY)."""
    root = tmp_path / "powercap"
    monkeypatch.setattr(energy, "RAPL_ROOT", root)
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("ITWINAI_CARBON_INTENSITY", "100")
    wrap = 262143328850
    _fake_rapl(root, {"intel-rapl:0": ("package-0", 10_000_000),
                      "intel-rapl:0:0": ("core", 1), "intel-rapl:0:1": ("dram", 2_000_000),
                      "intel-rapl:1": ("psys", 99_000_000)})
    prov.log(None, "co2", kind="carbon")
    _fake_rapl(root, {"intel-rapl:0": ("package-0", 40_000_000),  # +30 J
                      "intel-rapl:0:1": ("dram", 3_000_000)})  # +1 J
    nvml.energy_mj = [1_500_000, 5_100_000]  # +500 J, +100 J
    prov.log(None, "co2", kind="carbon")
    _fake_rapl(root, {"intel-rapl:0": ("package-0", 1_000_000)})  # wrapped: +(wrap-39e6+1e6)
    prov.log(None, "co2", kind="carbon")
    baseline, measured, wrapped = read_back(prov)
    assert baseline["meta"]["energy"] == "baseline" and baseline["value"] is None
    assert baseline["meta"]["sources"] == ["nvml:gpu0", "nvml:gpu1", "rapl:intel-rapl:0",
                                           "rapl:intel-rapl:0:1"]
    assert baseline["meta"]["method"] == "rapl+nvml"
    fields = measured["fields"]
    assert measured["meta"]["energy"] == "measured"
    assert fields["cpu_energy_j"] == pytest.approx(30)
    assert fields["dram_energy_j"] == pytest.approx(1)
    assert fields["gpu_energy_j"] == pytest.approx(600)
    assert fields["energy_j"] == pytest.approx(631) == fields["energy_total_j"]
    assert fields["cpu_energy_total_j"] == pytest.approx(30)
    assert fields["gpu_power_w"] == pytest.approx(600 / fields["interval_s"])
    assert fields["duration_s"] == pytest.approx(fields["interval_s"])
    assert fields["emissions_g"] == pytest.approx(631 / 3.6e6 * 100)
    assert measured["value"] == pytest.approx(fields["emissions_total_g"])
    assert measured["meta"]["carbon_intensity_source"] == "env ITWINAI_CARBON_INTENSITY"
    jump = (wrap - 40_000_000 + 1_000_000) / 1e6
    assert wrapped["fields"]["cpu_energy_j"] == pytest.approx(jump)
    assert wrapped["fields"]["energy_total_j"] == pytest.approx(631 + jump)
    assert wrapped["fields"]["cpu_energy_total_j"] == pytest.approx(30 + jump)
    assert wrapped["fields"]["duration_s"] == pytest.approx(
        fields["interval_s"] + wrapped["fields"]["interval_s"])


def test_carbon_counts_from_the_session_start_when_counters_are_readable(tmp_path, monkeypatch):
    """With counters readable when the logger opens the session, the first carbon record
    already covers the time since then (as yprov4ml's codecarbon tracker, started with the
    run): no baseline-only record."""
    root = tmp_path / "powercap"
    monkeypatch.setattr(energy, "RAPL_ROOT", root)
    _fake_rapl(root, {"intel-rapl:0": ("package-0", 5_000_000)})
    logger = Prov4MLLogger(provenance_save_dir=str(tmp_path / "prov"), run_id="c",
                           log_freq="batch")
    logger.create_logger_context()
    _fake_rapl(root, {"intel-rapl:0": ("package-0", 7_500_000)})  # +2.5 J
    logger.log(None, "co2", kind="carbon")
    (record,) = read_back(logger)
    assert record["meta"]["energy"] == "measured"
    assert record["fields"]["cpu_energy_total_j"] == pytest.approx(2.5)
    assert record["fields"]["duration_s"] == pytest.approx(record["fields"]["interval_s"])


def test_carbon_intensity_settings(monkeypatch):
    assert energy.carbon_intensity({})[0] == 475.0
    assert energy.carbon_intensity({"carbon_intensity_g_per_kwh": 56}) == (56.0, "kwarg")
    monkeypatch.setenv("ITWINAI_CARBON_INTENSITY", "not-a-number")
    with pytest.warns(RuntimeWarning, match="ITWINAI_CARBON_INTENSITY"):
        assert energy.carbon_intensity({})[0] == 475.0
    with pytest.raises(ValueError):
        energy.carbon_intensity({"carbon_intensity_g_per_kwh": -1})


def _fake_codecarbon(calls: dict) -> types.ModuleType:
    """Stand-in for codecarbon (not installed here): records how the tracker is built."""

    class Base:
        def __init__(self, project_name=None, save_to_file=True, save_to_api=False,
                     emissions_endpoint="http://example.invalid", log_level="info",
                     tracking_mode="process", co2_signal_api_token="token"):
            calls["options"] = {"save_to_file": save_to_file, "save_to_api": save_to_api,
                                "emissions_endpoint": emissions_endpoint,
                                "log_level": log_level, "tracking_mode": tracking_mode,
                                "co2_signal_api_token": co2_signal_api_token}
            self._total_energy = types.SimpleNamespace(kWh=0.0)
            self._scheduler = types.SimpleNamespace(
                stop=lambda: calls.__setitem__("scheduler_stopped", True))
            self._conf = {"hardware": ["RAM", "CPU"]}

        def start(self):
            calls["started"] = True

        def flush(self):
            self._total_energy.kWh += 0.002
            return self._total_energy.kWh * 0.4  # kg

    class OfflineEmissionsTracker(Base):
        def __init__(self, *args, country_iso_code=None, **kwargs):
            calls["country"] = country_iso_code
            super().__init__(*args, **kwargs)

    module = types.ModuleType("codecarbon")
    module.OfflineEmissionsTracker = OfflineEmissionsTracker
    module.__version__ = "fake"
    return module


def test_carbon_through_codecarbon_when_a_country_is_set(prov, monkeypatch):
    """Code path check with a fake codecarbon: offline, no file, no API, no thread."""
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "codecarbon", _fake_codecarbon(calls))
    monkeypatch.setenv("ITWINAI_CARBON_COUNTRY", "DEU")
    prov.log(None, "co2", kind="carbon")
    prov.log(None, "co2", kind="carbon")
    baseline, measured = read_back(prov)
    assert calls["country"] == "DEU" and calls["started"] and calls["scheduler_stopped"]
    assert calls["options"] == {"save_to_file": False, "save_to_api": False,
                                "emissions_endpoint": None, "log_level": "error",
                                "tracking_mode": "machine", "co2_signal_api_token": None}
    assert baseline["meta"]["energy"] == "baseline" and baseline["meta"]["method"] == "codecarbon"
    assert measured["meta"]["country_iso_code"] == "DEU"
    assert measured["fields"]["energy_j"] == pytest.approx(0.002 * 3.6e6)
    assert measured["value"] == pytest.approx(0.002 * 0.4 * 1000)


def test_carbon_falls_back_to_counters_when_codecarbon_fails(prov, monkeypatch):
    broken = types.ModuleType("codecarbon")
    broken.OfflineEmissionsTracker = None  # not callable: setting up the tracker fails
    monkeypatch.setitem(sys.modules, "codecarbon", broken)
    prov.log(None, "co2", kind="carbon", country_iso_code="FRA")
    (record,) = read_back(prov)
    assert record["meta"]["codecarbon_error"]
    assert record["meta"]["method"] != "codecarbon"
    assert record["meta"]["kwargs"] == {"country_iso_code": "FRA"}


# --------------------------------------------------------------------------------------------
# prov_documents, context, and what importing the loggers costs
# --------------------------------------------------------------------------------------------


def test_prov_documents_marker(prov):
    prov.log(None, "provenance", kind="prov_documents", step=9, create_graph=False)
    (record,) = read_back(prov)
    assert (record["kind"], record["name"], record["step"]) == ("prov_documents", "provenance", 9)
    assert (record["value"], record["text"], record["blob"]) == (None, None, None)
    assert record["meta"] == {"marker": True, "kwargs": {"create_graph": False}}


def test_prov_documents_in_a_collection_goes_to_prov4ml_only(tmp_path):
    savedir = tmp_path / "mllogs"
    coll = LoggersCollection([MLFlowLogger(savedir=savedir, log_freq="batch"),
                              Prov4MLLogger(provenance_save_dir=str(savedir), log_freq="batch")])
    coll.create_logger_context()
    coll.log(None, "provenance", kind="prov_documents")
    coll.destroy_logger_context()
    (record,) = Journal(savedir).records(kinds=["prov_documents"]).to_pylist()
    assert json.loads(record["meta"]) == {"marker": True, "targets": ["prov4ml"]}


def test_context_is_kept_for_every_measured_kind(prov):
    model = linear()
    items = {"flops_pb": (model, torch.randn(1, IN)),
             "flops_pe": (model, loader(2, batch_size=1)),
             "system": None, "carbon": None, "execution_time": None, "prov_documents": None}
    for kind, item in items.items():
        prov.log(item, kind, kind=kind, context="validation")
        prov.log(item, kind + "_default", kind=kind)
    records = {r["name"]: r for r in read_back(prov)}
    assert len(records) == 2 * len(MEASURED)
    for kind in MEASURED:
        assert records[kind]["kind"] == kind
        assert records[kind]["meta"]["context"] == "validation"
        # the default context is not stored: the Prov4ML export puts such a record in it
        assert "context" not in records[kind + "_default"]["meta"]
    assert all(math.isfinite(records[k]["value"]) for k in ("flops_pb", "flops_pe",
                                                            "execution_time"))


def test_importing_the_loggers_stays_light():
    code = ("import sys, itwinai_journal.loggers, itwinai_journal.capture.kinds\n"
            "heavy = ('torch', 'yprov4ml', 'prov4ml', 'psutil', 'pynvml', 'codecarbon')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
