"""Sampled system metrics: the background sampler on this CPU-only machine (rate, plausible
values that follow what the test does, on/off, fork, SIGTERM), the GPU path through a fake
`pynvml` module (the only proof of it here: there is no GPU), and each exporter's output read
back with the tracker's own reader (TensorBoard's EventAccumulator, the `.wandb` file parsed
with W&B's protobufs, a real MLflow sqlite store, the PROV-JSON documents real yprov4ml wrote).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import spawn

from itwinai_journal import Journal
from itwinai_journal.capture import libraries, sampler
from itwinai_journal.loggers import MLFlowLogger, TensorBoardLogger, WandBLogger
from itwinai_sync.cli import main
from itwinai_sync.targets import system_metrics

RUN = "sysrun"
EXP = "sysexp"
INTERVAL = 0.2


def samples(savedir: Path, rank: int = 0) -> list[dict]:
    """The rank's system_metric records, with `fields` and `meta` decoded."""
    out = []
    for rec in Journal(savedir).records(kinds=[sampler.KIND], rank=rank).to_pylist():
        rec["fields"] = json.loads(rec["text"])
        rec["meta"] = json.loads(rec["meta"])
        out.append(rec)
    return out


def wait_stopped(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sampler.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sampler.running()


def spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        sum(range(1000))


# -- a fake NVML: the narrow set of calls NvmlReader makes ---------------------------------


class NVMLError(Exception):
    pass


def fake_nvml(devices: list[dict], broken: str | None = None) -> types.ModuleType:
    """A `pynvml` module with `devices` (dicts of the values NVML would return, None for a
    query the device does not support); `broken`: nvmlInit raises that."""
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.NVML_TEMPERATURE_GPU = 0

    def init():
        if broken:
            raise NVMLError(broken)

    def get(handle, key):
        value = devices[handle][key]
        if value is None:
            raise NVMLError("Not Supported")
        return value

    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetHandleByUUID = lambda u: [d["uuid"] for d in devices].index(u)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(
        gpu=get(h, "util"), memory=get(h, "mem_util"))
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        used=get(h, "used"), total=get(h, "total"), free=get(h, "total") - get(h, "used"))
    m.nvmlDeviceGetPowerUsage = lambda h: get(h, "power_mw")
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: get(h, "limit_mw")
    m.nvmlDeviceGetTemperature = lambda h, sensor: get(h, "temp")
    return m


GPUS = [
    {"uuid": "GPU-aaaa", "util": 87, "mem_util": 41, "used": 30 << 30, "total": 40 << 30,
     "power_mw": 250_500, "limit_mw": 400_000, "temp": 66},
    {"uuid": "GPU-bbbb", "util": 3, "mem_util": 0, "used": 1 << 30, "total": 80 << 30,
     "power_mw": 61_000, "limit_mw": None, "temp": 35},
]


@pytest.fixture
def nvml(monkeypatch):
    """Install a fake pynvml (with GPUS) for the sampler; NVML's per-process init state is
    per module object, so every fake starts uninitialised."""
    def install(devices=GPUS, broken=None):
        module = fake_nvml(devices, broken)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        monkeypatch.setattr(sampler, "_sampler", sampler._Sampler())
        return module
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return install


# -- the sampler -----------------------------------------------------------------------------


def test_samples_at_the_configured_rate_follow_cpu_and_memory(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name=EXP, run_id=RUN,
                      system_metrics_interval=INTERVAL)
    started = time.time()
    lg.create_logger_context()
    assert sampler.running()
    time.sleep(1.2)  # idle
    idle_end = time.time()
    spin(1.5)  # busy: this process's CPU rises
    spin_end = time.time()
    block = bytearray(400 << 20)
    block[::4096] = b"\1" * (len(block) // 4096)  # touch every page: RSS grows by 400 MiB
    time.sleep(1.0)
    lg.log(1.0, "loss", step=0)
    lg.destroy_logger_context()
    ended = time.time()
    wait_stopped()  # stops with the session
    del block

    got = samples(savedir)
    assert [s["step"] for s in got] == list(range(len(got)))
    # the rate: one sample per interval at most (the first one interval after the start), and
    # they keep coming (a busy loop delays the thread, so only a lower bound on the count)
    times = [s["time"] for s in got]
    assert started + INTERVAL * 0.9 <= times[0] and times[-1] <= ended
    assert all(b - a >= INTERVAL * 0.9 for a, b in zip(times, times[1:]))
    assert 6 <= len(got) <= (ended - started) / INTERVAL + 1
    assert all(s["meta"]["interval_s"] == INTERVAL for s in got)
    assert {s["meta"]["method"] for s in got} == {"psutil"}
    assert got[0]["meta"]["unavailable"]["gpu"] == "pynvml not importable"

    idle = [s["fields"] for s in got if s["time"] <= idle_end and s["time"] > started + 0.5]
    busy = [s["fields"] for s in got if idle_end + 0.3 < s["time"] <= spin_end]
    held = [s["fields"] for s in got if s["time"] > spin_end + 0.3]
    assert idle and busy and held
    assert max(f["cpu_percent_process"] for f in busy) > 40
    assert max(f["cpu_percent_process"] for f in idle) < 20
    rss_before = max(f["process_rss_bytes"] for f in idle + busy)
    assert min(f["process_rss_bytes"] for f in held) > rss_before + (350 << 20)
    for f in (s["fields"] for s in got):
        assert f["memory_used_bytes"] + f["memory_available_bytes"] == f["memory_total_bytes"]
        assert 0 < f["memory_percent"] < 100 and 0 < f["disk_percent"] < 100
        assert 0 <= f["cpu_percent_system"] <= 100
        assert f["process_threads"] >= 3  # main, journal flusher, sampler
        assert f["disk_used_bytes"] > 0 and f["disk_free_bytes"] >= 0
        assert f["process_peak_rss_bytes"] >= f["process_rss_bytes"] * 0.99
        for counter in sampler.COUNTERS:  # since the sampler started: from 0, growing
            assert f[counter] >= 0
    for counter in sampler.COUNTERS:
        values = [s["fields"][counter] for s in got]
        assert values == sorted(values)


def test_procfs_path_reads_the_same_fields(tmp_path, monkeypatch):
    """Without psutil (not a dependency of the compute-node package) /proc gives every
    field."""
    monkeypatch.setattr(libraries, "optional", lambda name: None)
    reading = sampler.read_host(None, sampler.NvmlReader())
    with_psutil = sampler.read_host(pytest.importorskip("psutil"), sampler.NvmlReader())
    assert set(reading.fields) == set(with_psutil.fields)
    assert reading.unavailable == {"gpu": "pynvml not importable"}
    assert reading.fields["process_threads"] == with_psutil.fields["process_threads"]
    assert abs(reading.fields["process_rss_bytes"]
               - with_psutil.fields["process_rss_bytes"]) < 64 << 20


def test_off_by_argument_or_environment(tmp_path, monkeypatch):
    assert sampler.configured_interval(0) is None
    assert sampler.configured_interval(2) == 2.0
    assert sampler.configured_interval(0.001) == sampler.MIN_INTERVAL
    with pytest.raises(ValueError, match="system_metrics_interval"):
        sampler.configured_interval(-1)
    monkeypatch.delenv(sampler.INTERVAL_ENV)
    assert sampler.configured_interval(None) == sampler.DEFAULT_INTERVAL == 10.0
    monkeypatch.setenv(sampler.INTERVAL_ENV, "off")
    assert sampler.configured_interval(None) is None
    assert sampler.configured_interval(5) == 5.0  # the argument wins
    monkeypatch.setenv(sampler.INTERVAL_ENV, "0.5")
    assert sampler.configured_interval(None) == 0.5
    monkeypatch.setenv(sampler.INTERVAL_ENV, "often")
    with pytest.warns(RuntimeWarning, match="often"):
        assert sampler.configured_interval(None) == sampler.DEFAULT_INTERVAL

    monkeypatch.setenv(sampler.INTERVAL_ENV, "0")
    lg = TensorBoardLogger(savedir=tmp_path / "off", run_id=RUN)
    lg.create_logger_context()
    time.sleep(0.3)
    assert not sampler.running()
    lg.destroy_logger_context()
    monkeypatch.setenv(sampler.INTERVAL_ENV, "0.1")
    lg = TensorBoardLogger(savedir=tmp_path / "arg", run_id=RUN, system_metrics_interval=0)
    lg.create_logger_context()
    time.sleep(0.3)
    assert not sampler.running()
    lg.destroy_logger_context()
    assert samples(tmp_path / "off") == samples(tmp_path / "arg") == []


def test_steps_continue_across_sessions_and_journals_share_readings(tmp_path):
    """A resumed rank continues the sample ordinal (MLflow's rule for a resumed run); two
    journals open in one process get the same readings from one thread."""
    savedir = tmp_path / "mllogs"
    for session in range(2):
        a = MLFlowLogger(savedir=savedir, run_id=RUN, system_metrics_interval=INTERVAL)
        b = WandBLogger(savedir=tmp_path / "other", run_id=RUN,
                        system_metrics_interval=INTERVAL)
        a.create_logger_context()
        b.create_logger_context()
        threads = [t for t in threading.enumerate() if t.name == sampler.THREAD_NAME]
        assert len(threads) == 1
        time.sleep(1.0)
        a.destroy_logger_context()
        b.destroy_logger_context()
        wait_stopped()
        if session == 0:
            first = len(samples(savedir))
            assert first >= 2
    got = samples(savedir)
    assert [s["step"] for s in got] == list(range(len(got))) and len(got) > first
    other = {s["time"]: s["fields"] for s in samples(tmp_path / "other")}
    shared = [s for s in got if s["time"] in other]
    assert len(shared) >= len(got) - 2  # attached a moment apart: the same readings after
    # one reading: the same instantaneous values (counters and CPU windows start when each
    # journal was attached)
    own = set(sampler.COUNTERS) | {"cpu_percent_process", "cpu_percent_system"}
    for s in shared:
        assert {k: v for k, v in other[s["time"]].items() if k not in own} == \
            {k: v for k, v in s["fields"].items() if k not in own}


def test_fork_child_does_not_sample_and_its_records_reach_the_parent(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, run_id=RUN, system_metrics_interval=0.1)
    lg.create_logger_context()
    time.sleep(0.3)
    pid = os.fork()
    if pid == 0:  # the child: no sampler thread, and its writer forwards to the parent's
        code = 0
        try:
            time.sleep(0.5)
            if sampler.running() or any(t.name == sampler.THREAD_NAME
                                           for t in threading.enumerate()):
                code = 3
            lg.log(7.0, "child_metric", step=1)
            lg._writer.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    time.sleep(0.3)
    lg.destroy_logger_context()
    wait_stopped()
    got = samples(savedir)
    assert [s["step"] for s in got] == list(range(len(got))) and len(got) >= 5
    assert len({s["time"] for s in got}) == len(got)  # no sample written twice
    metrics = Journal(savedir).metrics().to_pylist()
    assert [(m["name"], m["value"]) for m in metrics] == [("child_metric", 7.0)]


def test_sigterm_ends_the_session_with_its_samples(tmp_path):
    savedir = tmp_path / "mllogs"
    proc = spawn(f"""
        import os, signal, time
        from itwinai_journal.loggers import MLFlowLogger
        lg = MLFlowLogger(savedir={str(savedir)!r}, run_id="r")
        lg.create_logger_context()
        for i in range(40):
            lg.log(float(i), "loss", step=i)
            time.sleep(0.02)
        print("logged", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    """, ITWINAI_SYSTEM_METRICS_INTERVAL="0.1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err
    assert out.strip() == "logged"
    rank = Journal(savedir).run("r").rank(0)
    assert rank.status == "interrupted"
    got = samples(savedir)
    assert len(got) >= 3 and [s["step"] for s in got] == list(range(len(got)))
    result = CliRunner().invoke(main, ["verify", str(savedir)])
    assert result.exit_code == 0, result.output


# -- GPUs through a fake NVML ----------------------------------------------------------------


def test_fake_nvml_fields_and_tracker_names(nvml, monkeypatch):
    nvml()
    fields, reason = sampler.NvmlReader().read()
    assert reason is None
    assert fields == {
        "gpu0_utilization_percent": 87, "gpu0_memory_utilization_percent": 41,
        "gpu0_memory_used_bytes": 30 << 30, "gpu0_memory_total_bytes": 40 << 30,
        "gpu0_power_w": 250.5, "gpu0_power_limit_w": 400.0, "gpu0_temperature_c": 66,
        "gpu1_utilization_percent": 3, "gpu1_memory_utilization_percent": 0,
        "gpu1_memory_used_bytes": 1 << 30, "gpu1_memory_total_bytes": 80 << 30,
        "gpu1_power_w": 61.0, "gpu1_temperature_c": 35,  # no power limit: not supported
    }
    # CUDA_VISIBLE_DEVICES selects and renumbers: ordinal 0 is NVML device 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")
    fields, _ = sampler.NvmlReader().read()
    assert fields["gpu0_memory_total_bytes"] == 80 << 30 and "gpu1_power_w" not in fields

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fields, _ = sampler.NvmlReader().read()
    assert system_metrics.wandb_stats(fields, {}) == {
        "gpu.0.gpu": 87, "gpu.0.memory": 41, "gpu.0.memoryAllocated": 75.0,
        "gpu.0.memoryAllocatedBytes": 30 << 30, "gpu.0.temp": 66, "gpu.0.powerWatts": 250.5,
        "gpu.0.enforcedPowerLimitWatts": 400.0, "gpu.0.powerPercent": 62.625,
        "gpu.1.gpu": 3, "gpu.1.memory": 0, "gpu.1.memoryAllocated": 1.25,
        "gpu.1.memoryAllocatedBytes": 1 << 30, "gpu.1.temp": 35, "gpu.1.powerWatts": 61.0,
    }
    assert system_metrics.mlflow_metrics(fields) == {
        "system/gpu_0_memory_usage_percentage": 75.0,
        "system/gpu_0_memory_usage_megabytes": (30 << 30) / 1e6,
        "system/gpu_0_utilization_percentage": 87, "system/gpu_0_power_usage_watts": 250.5,
        "system/gpu_0_power_usage_percentage": 62.625, "system/gpu_0_temperature_celsius": 66,
        "system/gpu_1_memory_usage_percentage": 1.25,
        "system/gpu_1_memory_usage_megabytes": (1 << 30) / 1e6,
        "system/gpu_1_utilization_percentage": 3, "system/gpu_1_power_usage_watts": 61.0,
        "system/gpu_1_temperature_celsius": 35,
    }


def test_broken_nvml_warns_once_and_sampling_goes_on(tmp_path, nvml):
    nvml(broken="Driver Not Loaded")
    savedir = tmp_path / "mllogs"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lg = MLFlowLogger(savedir=savedir, run_id=RUN, system_metrics_interval=0.1)
        lg.create_logger_context()
        time.sleep(0.8)
        lg.destroy_logger_context()
        wait_stopped()
    nvml_warnings = [w for w in caught if "GPU fields" in str(w.message)]
    assert len(nvml_warnings) == 1
    assert "Driver Not Loaded" in str(nvml_warnings[0].message)
    got = samples(savedir)
    assert len(got) >= 3
    assert all(not any(k.startswith("gpu") for k in s["fields"]) for s in got)
    assert all("Driver Not Loaded" in s["meta"]["unavailable"]["gpu"] for s in got)
    assert all("process_rss_bytes" in s["fields"] for s in got)


# -- exporters, read back with each tracker's own reader -------------------------------------


@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    """One rank sampled for a moment with two fake GPUs, plus a few metrics."""
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "pynvml", fake_nvml(GPUS))
    mp.setattr(sampler, "_sampler", sampler._Sampler())
    mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    savedir = tmp_path_factory.mktemp("sys") / "mllogs"
    try:
        lg = WandBLogger(savedir=savedir, project_name=EXP, run_id=RUN,
                         system_metrics_interval=0.1)
        lg.create_logger_context()
        for step in range(5):
            lg.log(float(step), "loss", step=step)
            time.sleep(0.2)
        lg.destroy_logger_context()
        wait_stopped()
    finally:
        mp.undo()
    got = samples(savedir)
    assert len(got) >= 4 and all("gpu1_temperature_c" in s["fields"] for s in got)
    return savedir, got


def sync(savedir: Path, target: str, *args: str) -> str:
    result = CliRunner().invoke(main, [str(savedir), "--to", target, *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_tensorboard_system_scalars(journal, tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    savedir, got = journal
    logdir = tmp_path / "tb"
    sync(savedir, "tensorboard", "--logdir", str(logdir))
    (run_dir,) = (logdir / EXP).iterdir()
    acc = event_accumulator.EventAccumulator(str(run_dir / "rank-00000"),
                                             size_guidance={"scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"loss"} | {f"system/{k}" for s in got for k in s["fields"]}
    for key in ("process_rss_bytes", "gpu0_utilization_percent", "gpu1_power_w",
                "cpu_percent_process"):
        points = acc.Scalars(f"system/{key}")
        expected = [(s["time"], s["step"], s["fields"][key]) for s in got if key in s["fields"]]
        assert [(p.wall_time, p.step) for p in points] == [(t, st) for t, st, _ in expected]
        assert [p.value for p in points] == pytest.approx([v for _, _, v in expected], rel=1e-6)


def test_mlflow_system_metrics_in_a_real_store(journal, tmp_path):
    import mlflow

    savedir, got = journal
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):  # a second sync changes nothing
        sync(savedir, "mlflow", "--tracking-uri", uri)
    client = mlflow.MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == EXP]
    (run,) = client.search_runs([exp.experiment_id])
    names = {k for k in run.data.metrics if k.startswith("system/")}
    assert names == {
        "system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
        "system/system_memory_usage_percentage", "system/disk_usage_percentage",
        "system/disk_usage_megabytes", "system/disk_available_megabytes",
        "system/network_receive_megabytes", "system/network_transmit_megabytes",
        "system/process_cpu_utilization_percentage", "system/process_memory_usage_megabytes",
        *(f"system/gpu_{i}_{n}" for i in (0, 1) for n in (
            "memory_usage_percentage", "memory_usage_megabytes", "utilization_percentage",
            "power_usage_watts", "temperature_celsius")),
        "system/gpu_0_power_usage_percentage"}  # GPU 1 has no power limit
    history = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    assert sorted((m.step, m.timestamp, m.value) for m in history) == [
        (s["step"], int(round(s["time"] * 1000)), s["fields"]["memory_used_bytes"] / 1e6)
        for s in got]
    history = client.get_metric_history(run.info.run_id, "system/gpu_0_power_usage_percentage")
    assert [m.value for m in history] == [62.625] * len(got)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 5


def test_wandb_stats_records(journal, tmp_path, monkeypatch):
    from wandb_records import find_run_files, history_rows, read_records

    from itwinai_sync.targets.wandb import exporter as wandb_exporter

    savedir, got = journal
    work = tmp_path / "copy"
    shutil.copytree(savedir, work)
    sync(work, "wandb")
    # An export killed after writing the samples but before its cursor: the next one sends
    # every record again (here: the cursor read back as 0), and the samples the run's log
    # already holds are not written twice.
    real = wandb_exporter.committed_state
    monkeypatch.setattr(wandb_exporter, "committed_state",
                        lambda root, wb_id, project: (0, real(root, wb_id, project)[1]))
    sync(work, "wandb")
    records = [r for f in find_run_files(work / "wandb") for r in read_records(f)]
    stats = [r.stats for r in records if r.WhichOneof("record_type") == "stats"]
    assert [s.timestamp.ToNanoseconds() for s in stats] == [round(s["time"] * 1e9) for s in got]
    for record, sample in zip(stats, got):
        items = {i.key: json.loads(i.value_json) for i in record.item}
        assert items == pytest.approx(system_metrics.wandb_stats(sample["fields"],
                                                                 sample["meta"]))
        fields = sample["fields"]
        assert items["proc.memory.rssMB"] == pytest.approx(fields["process_rss_bytes"] / 2**20)
        assert items["cpu"] == pytest.approx(fields["cpu_percent_process"]
                                             / sample["meta"]["cpu_capacity"])
        assert items["gpu.0.powerPercent"] == 62.625 and items["gpu.1.temp"] == 35
        assert "gpu.1.powerPercent" not in items
    rows = history_rows(records)
    assert [r["loss"] for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0] * 2  # (the forced resend)
    assert not any(k.startswith(("system", "gpu", "cpu")) for r in rows for k in r)


def test_prov4ml_system_metrics(journal, tmp_path):
    pytest.importorskip("yprov4ml")
    savedir, got = journal
    out = tmp_path / "prov"
    sync(savedir, "prov4ml", "--dir", str(out))
    (doc_path,) = out.rglob("prov_*_GR0_0.json")
    entities = json.loads(doc_path.read_text())["entity"]
    expected = {  # yprov4ml 2.0.9's names for what it reads; the rest under the journal's
        "cpu_usage": [s["fields"]["cpu_percent_system"] for s in got],
        "memory_usage": [s["fields"]["memory_percent"] for s in got],
        "gpu_usage": [0.87] * len(got), "gpu_memory_usage": [0.75] * len(got),
        "gpu_temperature": [66] * len(got), "gpu_power_usage": [250.5] * len(got),
        "gpu1_power_w": [61.0] * len(got),
        "process_rss_bytes": [s["fields"]["process_rss_bytes"] for s in got],
    }
    for name, values in expected.items():
        entity = entities[f"psutil.sampled//{name}//training"]
        assert entity["yprov:source"] == "psutil.sampled"
        with open(entity["dcterms:identifier"], newline="") as f:
            rows = [(int(r["epoch"]), float(r["value"]), int(r["timestep"]))
                    for r in csv.DictReader(f)]
        assert sorted(rows) == [(s["step"], pytest.approx(v), int(round(s["time"] * 1000)))
                                for s, v in zip(got, values)], name


def test_show_and_plot_select_system_metrics(journal, tmp_path):
    savedir, got = journal
    out = CliRunner().invoke(main, ["show", str(savedir), RUN]).output
    assert f"{len(got)} system_metric" in out
    assert "system/gpu0_utilization_percent = 87" in out
    png = tmp_path / "sys.png"
    result = CliRunner().invoke(main, ["plot", str(savedir), "--metric", "system/gpu*_power_w",
                                       "--metric", "loss", "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert f"3 metric(s), 3 series, {2 * len(got) + 5} points" in result.output
    result = CliRunner().invoke(main, ["plot", str(savedir), "-o", str(png)])
    assert "1 metric(s), 1 series, 5 points" in result.output  # not without asking
