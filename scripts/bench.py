"""Speed of itwinai-sync next to what users would use instead, measured in the same run.

    .venv/bin/python scripts/bench.py [--quick] [--json bench-results.json] [--only SECTION,...]

Per-call costs are timed in blocks of 1000 calls (a timer call per `log()` would cost more than
the call itself); median and p99 are over blocks, divided by 1000. "wall" is the whole loop
including the journal's background flushing, which shares the GIL with the training loop.
The two slow comparators (wandb offline, mlflow.log_metric) are timed in blocks of 10: their calls
cost hundreds of µs to ms, so the timer is still negligible and p99 still means something.
Nothing here asserts: this script is where speed is reported; the goals table at the end says
which of the project's targets this run met.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

BLOCK = 1000
SLOW_BLOCK = 10
#: What `--only` can choose; all by default.
SECTIONS = ("hot", "sampler", "live", "mlflow", "postgres", "tensorboard", "memory", "ls")

OURS = "MLFlowLogger.log(x, 'loss', step=i)"
TENSORBOARD = "SummaryWriter.add_scalar"
JSONL = "json.dumps + write (JSONL baseline)"
WANDB = "wandb offline run.log({'loss': x}, step=i)"
MLFLOW = "mlflow.log_metric('loss', x, step=i), sqlite"
ALTERNATIVES = (TENSORBOARD, WANDB, MLFLOW, JSONL)


def per_call(fn: Callable[[int], None], calls: int, block: int = BLOCK) -> dict[str, float]:
    """fn(i) called `calls` times; per-call median/p99 over blocks and wall time per call."""
    blocks = []
    start = time.perf_counter()
    for b in range(calls // block):
        base = b * block
        t0 = time.perf_counter_ns()
        for i in range(base, base + block):
            fn(i)
        blocks.append((time.perf_counter_ns() - t0) / block / 1000)
    wall = (time.perf_counter() - start) / calls * 1e6
    blocks.sort()
    return {"median_us": statistics.median(blocks),
            "p99_us": blocks[min(len(blocks) - 1, int(len(blocks) * 0.99))],
            "wall_us": wall, "calls": calls, "block": block}


def bench_hot_path(calls: int, tmp: Path) -> dict[str, dict[str, float]]:
    from itwinai_journal.loggers import (
        LoggersCollection,
        MLFlowLogger,
        TensorBoardLogger,
        WandBLogger,
    )

    out = {}
    lg = MLFlowLogger(savedir=tmp / "hot", experiment_name="bench", log_freq="batch")
    lg.create_logger_context()
    out[OURS] = per_call(lambda i: lg.log(0.5, "loss", step=i), calls)
    lg10 = MLFlowLogger(savedir=tmp / "hot10", log_freq=10)
    lg10.create_logger_context()
    out["MLFlowLogger.log(..., batch_idx=i), log_freq=10"] = per_call(
        lambda i: lg10.log(0.5, "loss", step=i, batch_idx=i), calls)
    lg10.destroy_logger_context()
    metrics = {f"m{k}": 0.1 * k for k in range(20)}
    names, values = list(metrics), list(metrics.values())
    out["MLFlowLogger.log(20 metrics as lists)/metric"] = _scale(per_call(
        lambda i: lg.log(values, names, step=i), max(BLOCK, calls // 20)), 20)
    lg.destroy_logger_context()
    coll = LoggersCollection([
        MLFlowLogger(savedir=tmp / "coll", log_freq="batch"),
        TensorBoardLogger(savedir=tmp / "coll", log_freq="batch"),
        WandBLogger(savedir=tmp / "coll", log_freq="batch"),
    ])
    coll.create_logger_context()
    out["LoggersCollection(3).log(x, 'loss', step=i)"] = per_call(
        lambda i: coll.log(0.5, "loss", step=i), max(BLOCK, calls // 4))
    coll.destroy_logger_context()

    from torch.utils.tensorboard import SummaryWriter

    sw = SummaryWriter(str(tmp / "tb"))
    out[TENSORBOARD] = per_call(
        lambda i: sw.add_scalar("loss", 0.5, i), max(BLOCK, calls // 10))
    sw.close()
    with open(tmp / "baseline.jsonl", "w") as f:
        out[JSONL] = per_call(
            lambda i: f.write(json.dumps({"name": "loss", "value": 0.5, "step": i,
                                          "time": time.time()}) + "\n"), calls)
    # wandb and mlflow cost 0.5 to 10 ms a call: fewer calls keep the full run to ~40 s for both
    out[WANDB] = bench_wandb_offline(max(BLOCK, calls // 40), tmp)
    out[MLFLOW] = bench_mlflow_log_metric(max(BLOCK, calls // 500), tmp)
    return out


#: Sampler settings compared on the hot path: (label, system_metrics_interval).
SAMPLER_SETTINGS = (("system metrics sampler off", 0), ("sampler on, every 10 s (default)", 10.0),
                    ("sampler on, every 0.1 s", 0.1))


def bench_sampler(calls: int, tmp: Path, rounds: int = 3) -> dict[str, Any]:
    """The hot path (MLFlowLogger.log of one metric) with the background system-metrics sampler
    off and on, in the same process: `rounds` rounds, each timing every setting once in a
    rotated order (the order of runs matters as much as small differences on a shared
    machine); median over the rounds of each setting's median and wall. Also what one sample
    costs the sampler thread (reading the host, no GPU here), and how many samples the 0.1 s
    setting wrote while the loop ran (a busy loop delays the thread; it never blocks it)."""
    from itwinai_journal import Journal
    from itwinai_journal.capture import libraries, sampler
    from itwinai_journal.loggers import MLFlowLogger

    runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in SAMPLER_SETTINGS}
    written = 0
    for k in range(rounds):
        order = SAMPLER_SETTINGS[k % 3:] + SAMPLER_SETTINGS[:k % 3]
        for label, interval in order:
            savedir = tmp / f"sampler-{k}-{interval}"
            lg = MLFlowLogger(savedir=savedir, log_freq="batch", system_metrics_interval=interval)
            lg.create_logger_context()
            runs[label].append(per_call(lambda i, lg=lg: lg.log(0.5, "loss", step=i), calls))
            lg.destroy_logger_context()
            if interval == 0.1:
                written += Journal(savedir).records(kinds=[sampler.KIND]).num_rows
    out: dict[str, Any] = {
        label: {"median_us": statistics.median(r["median_us"] for r in rs),
                "wall_us": statistics.median(r["wall_us"] for r in rs),
                "p99_us": statistics.median(r["p99_us"] for r in rs), "rounds": rounds,
                "calls": calls}
        for label, rs in runs.items()}
    psutil = libraries.optional("psutil")
    reader = sampler.NvmlReader()
    costs = []
    for _ in range(50):
        t0 = time.perf_counter()
        sampler.read_host(psutil, reader)
        costs.append((time.perf_counter() - t0) * 1e3)
    out["one_sample_ms"] = {"min": min(costs), "median": statistics.median(costs)}
    out["samples_written_at_0.1s"] = written
    return out


def bench_wandb_offline(calls: int, tmp: Path) -> dict[str, float]:
    """`wandb` in offline mode, what WandBLogger users get on a node without network.

    What run.log's time covers: the record is serialised and sent over a unix socket to
    wandb-core, a separate Go process, and run.log returns as soon as the socket has taken it.
    Decoding it and appending it to the run's .wandb file happen later, in wandb-core, through a
    buffer (written when full, every x_transaction_log_flush_interval = 15 s, and at finish), on
    the other core here. So median and wall are what the training loop pays, not all the work
    wandb does: part of it runs in parallel, and what is left at the end of the loop is in
    `drain_seconds`, the time of run.finish() + wandb.teardown() (teardown is what makes
    wandb-core exit; after run.finish() alone it keeps running).
    """
    root = tmp / "wandb"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
           # wandb-core gets --no-observability: no Sentry error reports
           "WANDB_ERROR_REPORTING": "false",
           "WANDB_DIR": str(root), "WANDB_CACHE_DIR": str(root / "cache"),
           "WANDB_CONFIG_DIR": str(root / "config"), "WANDB_DATA_DIR": str(root / "data"),
           "WANDB_ARTIFACT_DIR": str(root / "artifacts")}
    for d in ("cache", "config", "data", "artifacts"):
        (root / d).mkdir(parents=True)
    from itwinai_sync.api import scoped_env

    with scoped_env(env):
        import wandb

        # console="off": no stdout/stderr capture; x_disable_stats: no system-metrics sampler
        # (its x_stats_* settings include a cloud metadata URL); no metadata/git collection, so
        # wandb runs no git commands in this checkout. None of these is on run.log's path.
        settings = wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True,
                                  disable_git=True, disable_code=True, silent=True)
        run = wandb.init(mode="offline", dir=str(root), project="bench", settings=settings)
        try:
            result = per_call(lambda i: run.log({"loss": 0.5}, step=i), calls, SLOW_BLOCK)
        finally:
            t0 = time.perf_counter()
            run.finish()
            wandb.teardown()
        result["drain_seconds"] = time.perf_counter() - t0
    return result


def bench_mlflow_log_metric(calls: int, tmp: Path) -> dict[str, float]:
    """mlflow.log_metric, the call itwinai's MLFlowLogger makes for every metric, into an
    embedded sqlite store: synchronous (MLflow's default), one sqlite transaction per call.

    set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ, which the later export benchmarks
    (and the `itwinai-sync` exporter) would pick up: both are put back afterwards."""
    import mlflow
    from mlflow.tracking import _tracking_service

    from itwinai_sync.api import scoped_env

    saved_uri = _tracking_service.utils._tracking_uri
    with scoped_env({}, restore=("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")):
        mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow-hot.db'}")
        try:
            experiment_id = mlflow.create_experiment("bench-hot")
            with mlflow.start_run(experiment_id=experiment_id):
                return per_call(lambda i: mlflow.log_metric("loss", 0.5, step=i), calls,
                                SLOW_BLOCK)
        finally:
            mlflow.set_tracking_uri(saved_uri)


def _scale(r: dict[str, float], n: int) -> dict[str, float]:
    return {k: (v / n if k.endswith("_us") else v) for k, v in r.items()}


def _journal(savedir: Path, points: int, run_id: str = "bench") -> None:
    from itwinai_journal.loggers import MLFlowLogger

    lg = MLFlowLogger(savedir=savedir, experiment_name="bench", run_id=run_id,
                      log_freq="batch")
    lg.create_logger_context()
    for i in range(points // 2):
        lg.log(1.0 / (i + 1), "loss", step=i)
        lg.log(i * 0.001, "acc", step=i)
    lg.destroy_logger_context()


def _raw_log_batch(tracking_uri: str, savedir: Path, cursor_tag: bool = False) -> float:
    """Points/s of MlflowClient.log_batch (original timestamps and steps) of a journal's metrics
    into a new run: 1000 points a request, or with `cursor_tag` 999 points and a tag, the shape
    of itwinai-sync's requests. The run and one point are created before timing, as `_sync` has
    its run created before timing."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from itwinai_journal import Journal

    rows = Journal(savedir).metrics().to_pylist()
    metrics = [Metric(r["name"], r["value"], int(r["time"] * 1000), r["step"]) for r in rows]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("raw")
    run = client.create_run(experiment.experiment_id if experiment
                            else client.create_experiment("raw"))
    client.log_batch(run.info.run_id, metrics=metrics[:1])
    per_request = 999 if cursor_tag else 1000
    t0 = time.perf_counter()
    for k in range(1, len(metrics), per_request):
        tags = [RunTag("cursor", str(k))] if cursor_tag else []
        client.log_batch(run.info.run_id, metrics=metrics[k:k + per_request], tags=tags)
    return (len(metrics) - 1) / (time.perf_counter() - t0)


def _sync(savedir: Path, options: dict[str, str]) -> float:
    """Points/s of the whole `itwinai-sync --to mlflow` command over a journal; its target
    run (database, experiment, run) is created before timing."""
    from click.testing import CliRunner

    from itwinai_sync.cli import main
    from itwinai_sync.engine import SyncEngine, SyncRequest
    from itwinai_sync.targets.mlflow import Place

    engine = SyncEngine(SyncRequest(savedir=savedir, targets=["mlflow"],
                                    options={"mlflow": options}))
    run, _ = engine.plan()[0]
    exporter = engine.exporter("mlflow")
    uri = exporter.tracking_uri(run)
    Place(exporter, exporter.client(uri), uri, run).claim_rank(run.ranks[0])
    engine.close()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow", *args])
    seconds = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    return run.ranks[0].last_seq / seconds


def _export_rounds(points: int, rounds: int, tmp: Path, name: str,
                   raw_uri: Callable[[int], str], options: dict[str, str],
                   store_path: bool = False) -> dict[str, Any]:
    """Raw log_batch, raw log_batch with a cursor tag, and itwinai-sync, alternated `rounds`
    times over fresh journals of the same points: rates swing by ±20% from run to run on a
    shared 2-core machine, so the ratios reported are medians of the rounds' ratios. With
    `store_path`, each round also syncs a copy of the journal with ITWINAI_SYNC_SQLITE_ROWS=0:
    every request through MLflow's own SqlAlchemyStore.log_batch (see targets/sqlite_rows.py).

    The tagged raw row is there because MLflow's SQL store commits a request's metrics and its
    tags in separate transactions: the cursor tag that makes a sync exactly-once costs one more
    database commit per request, whoever sends it."""
    import shutil

    from itwinai_sync.api import scoped_env
    from itwinai_sync.targets import sqlite_rows

    rates: dict[str, list[float]] = {"raw": [], "raw_tagged": [], "ours": [], "ours_store": []}
    for k in range(rounds):
        savedir = tmp / f"{name}-{k}"
        _journal(savedir, points, run_id=f"bench-{k}")
        if store_path:
            shutil.copytree(savedir, tmp / f"{name}-store-{k}")
        rates["raw"].append(_raw_log_batch(raw_uri(2 * k), savedir))
        rates["raw_tagged"].append(_raw_log_batch(raw_uri(2 * k + 1), savedir, cursor_tag=True))
        rates["ours"].append(_sync(savedir, options))
        if store_path:
            with scoped_env({sqlite_rows.ENV: "0"}):
                rates["ours_store"].append(_sync(tmp / f"{name}-store-{k}", options))

    def ratio(ours: str, base: str) -> float:
        return statistics.median(o / b for o, b in zip(rates[ours], rates[base]))

    out = {"points": points, "rounds": rounds,
           "raw_log_batch_points_per_s": rates["raw"],
           "raw_log_batch_with_tag_points_per_s": rates["raw_tagged"],
           "itwinai_sync_points_per_s": rates["ours"],
           "ratio": ratio("ours", "raw"), "ratio_to_tagged": ratio("ours", "raw_tagged")}
    if store_path:
        out.update({"store_path_points_per_s": rates["ours_store"],
                    "store_path_ratio": ratio("ours_store", "raw")})
    return out


def bench_mlflow_export(points: int, tmp: Path, rounds: int = 3) -> dict[str, Any]:
    """itwinai-sync into its embedded sqlite store vs raw log_batch into a fresh sqlite store of
    its own, then a re-sync that has nothing to do."""
    from itwinai_sync.engine import SyncEngine, SyncRequest

    def raw_uri(k: int) -> str:
        (tmp / f"raw-{k}").mkdir()
        return f"sqlite:///{tmp / f'raw-{k}' / 'mlflow.db'}"

    out = _export_rounds(points, rounds, tmp, "export", raw_uri, {}, store_path=True)
    t0 = time.perf_counter()
    engine = SyncEngine(SyncRequest(savedir=tmp / "export-0", targets=["mlflow"], options={}))
    engine.run()
    engine.close()
    out["resync_seconds"] = time.perf_counter() - t0
    return out


def _print_export_rounds(title: str, r: dict[str, Any]) -> None:
    def rates(key: str) -> str:
        return " ".join(f"{v:8,.0f}" for v in r[key])

    print(f"\n{title}, points/s in {r['rounds']} alternated rounds")
    print(f"  raw MlflowClient.log_batch:          {rates('raw_log_batch_points_per_s')}")
    print(f"  raw log_batch, 999 points + a tag:   {rates('raw_log_batch_with_tag_points_per_s')}")
    print(f"  itwinai-sync --to mlflow:            {rates('itwinai_sync_points_per_s')}")
    if "store_path_points_per_s" in r:
        print(f"    every request via log_batch:       {rates('store_path_points_per_s')}  "
              f"({r['store_path_ratio']:.2f}x of raw; ITWINAI_SYNC_SQLITE_ROWS=0)")
    print(f"  median ratio {r['ratio']:.2f}x of raw, {r['ratio_to_tagged']:.2f}x of raw with a "
          "tag (the whole CLI run, reading the journal included)")


def bench_tensorboard_export(points: int, tmp: Path) -> dict[str, float]:
    from click.testing import CliRunner
    from torch.utils.tensorboard import SummaryWriter

    from itwinai_journal import Journal
    from itwinai_sync.cli import main

    savedir = tmp / "tbexport"
    _journal(savedir, points)
    rows = Journal(savedir).metrics().to_pylist()
    t0 = time.perf_counter()
    sw = SummaryWriter(str(tmp / "tb-replay"))
    for r in rows:
        sw.add_scalar(r["name"], r["value"], r["step"], walltime=r["time"])
    sw.close()
    replay = len(rows) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, [str(savedir), "--to", "tensorboard"])
    ours = len(rows) / (time.perf_counter() - t0)
    assert result.exit_code == 0, result.output
    return {"points": len(rows), "add_scalar_replay_points_per_s": replay,
            "itwinai_sync_points_per_s": ours, "ratio": ours / replay}


MEMORY_CHILD = """
import sys
from itwinai_journal.loggers import MLFlowLogger

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0

lg = MLFlowLogger(savedir=sys.argv[1], experiment_name="bench", run_id="mem", log_freq="batch")
lg.create_logger_context()
for i in range(1000):
    lg.log(0.5, "warmup", step=i)
lg._writer.flush()
base = rss()
peak = base
for i in range({points}):
    lg.log(i * 1e-6, "loss", step=i)
    if i % 100_000 == 0:
        peak = max(peak, rss())
peak = max(peak, rss())
lg.destroy_logger_context()
print(base, peak)
"""


def bench_memory_and_read(points: int, tmp: Path) -> dict[str, float]:
    """RSS growth of a process logging `points` metrics, then Journal.metrics() read rate."""
    import subprocess

    from itwinai_journal import Journal

    savedir = tmp / "memory"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD.format(points=points),
                          str(savedir)], capture_output=True, text=True, check=True)
    log_seconds = time.perf_counter() - t0
    base, peak = map(int, out.stdout.split())
    t0 = time.perf_counter()
    table = Journal(savedir).metrics()
    read_seconds = time.perf_counter() - t0
    return {"points": points, "rss_growth_mb": (peak - base) / 2**20,
            "log_process_seconds": log_seconds, "read_points": table.num_rows,
            "read_points_per_s": table.num_rows / read_seconds, "savedir": str(savedir)}


def bench_export_peak_rss(savedir: str, points: int) -> dict[str, float]:
    """Peak RSS of `itwinai-sync --to tensorboard` over the big journal (TensorBoard: MLflow's
    own ingest rate would make 10 M points take most of an hour)."""
    import subprocess

    # The child reports its own peak as VmHWM: ru_maxrss would include earlier children, and on
    # Linux it even survives fork+exec, carrying over this (large) process's high-water mark.
    code = ("import sys\nfrom itwinai_sync.cli import main\n"
            "try:\n    main([sys.argv[1], '--to', 'tensorboard'])\nexcept SystemExit:\n    pass\n"
            "print([int(x.split()[1]) for x in open('/proc/self/status') "
            "if x.startswith('VmHWM:')][0], file=sys.stderr)")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, savedir], capture_output=True, text=True,
                          check=True)
    seconds = time.perf_counter() - t0
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    return {"points": points, "peak_rss_mb": peak_kb / 1024, "seconds": seconds,
            "points_per_s": points / seconds}


def bench_mlflow_server_export(points: int, tmp: Path, rounds: int = 3) -> dict[str, Any]:
    """itwinai-sync into a loopback `mlflow server` vs raw log_batch over HTTP, same server."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mlflow_server import MlflowServer

    with MlflowServer(tmp / "server") as server:
        return _export_rounds(points, rounds, tmp, "server-export", lambda k: server.uri,
                              {"tracking_uri": server.uri})


def bench_live_sync(calls: int, tmp: Path) -> dict[str, Any]:
    """The hot path with live sync off, on, and off again (same logger, same sizes, one run):
    on, a sidecar process follows the journal into a loopback `mlflow server` every 0.5 s.
    Each loop is preceded by a backlog of records and a pause, so that the sidecar is busy
    exporting while the loop is timed: on two cores its CPU (and the server's) shows here if
    anywhere. The sidecar is then stopped (SIGTERM: after the batch in progress) rather than
    left to export the whole loop's records."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mlflow_server import MlflowServer

    from itwinai_journal.format.fsio import read_json
    from itwinai_journal.loggers import MLFlowLogger
    from itwinai_journal.writer.live import live_paths

    os.environ["ITWINAI_SYNC_LIVE_INTERVAL"] = "0.5"
    out: dict[str, Any] = {}
    with MlflowServer(tmp / "live-server") as server:
        for label, on in (("off", False), ("on", True), ("off again", False)):
            savedir = tmp / f"live-{label.replace(' ', '-')}"
            lg = MLFlowLogger(savedir=savedir, experiment_name="bench", log_freq="batch",
                              tracking_uri=server.uri, run_id="hot", live_sync=on)
            lg.create_logger_context()
            for i in range(max(BLOCK, calls // 10)):
                lg.log(0.5, "backlog", step=i)
            time.sleep(3.0)  # the backlog is flushed; the sidecar has started exporting it
            row = per_call(lambda i, log=lg.log: log(0.5, "loss", step=i), calls)
            if on:
                status_file = live_paths(savedir, "bench", "hot")[1]
                os.kill(read_json(status_file)["pid"], signal.SIGTERM)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and read_json(status_file).get(
                        "state") not in ("done", "left", "failed", "stopped"):
                    time.sleep(0.2)
                status = read_json(status_file)
                row["sidecar_state"] = status.get("state")
                row["exported_live"] = sum(
                    t.get("exported", 0) for t in status.get("targets", {}).values())
            lg.destroy_logger_context()
            out[label] = row
    os.environ.pop("ITWINAI_SYNC_LIVE_INTERVAL")


def _ranks_journal(savedir: Path, ranks: int, points: int) -> None:
    """One run of `ranks` ranks, each `points` metric points (loss and acc, alternated)."""
    from itwinai_journal.loggers import MLFlowLogger

    for rank in range(ranks):
        lg = MLFlowLogger(savedir=savedir, experiment_name="bench", run_id="ranks",
                          log_freq="batch", log_on_workers=-1)
        lg.create_logger_context(rank=rank)
        for i in range(points // 2):
            lg.log(1.0 / (i + 1) + rank, "loss", step=i)
            lg.log(i * 0.001, "acc", step=i)
        lg.destroy_logger_context()


def _raw_streams(uri: str, experiment: str, per_rank: list[list[Any]], streams: int,
                 cursor_tag: bool = False) -> float:
    """Points/s of `streams` threads pushing every rank's points with MlflowClient.log_batch,
    1000 a request (with `cursor_tag`, 999 and a tag: the shape of the sync's requests), each
    rank into an MLflow run of its own that the stream creates (as the sync creates each rank's
    run): the ranks are dealt out to the streams, round robin."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client = MlflowClient(uri)
    experiment_id = client.create_experiment(experiment)

    def push(rank_ids: list[int]) -> None:
        for rank in rank_ids:
            run_id = client.create_run(experiment_id, run_name=f"rank {rank}").info.run_id
            points = per_rank[rank]
            step = 999 if cursor_tag else 1000
            for k in range(0, len(points), step):
                tags = [RunTag("cursor", str(k + step))] if cursor_tag else []
                client.log_batch(run_id, metrics=points[k:k + step], tags=tags)

    share = [list(range(s, len(per_rank), streams)) for s in range(streams)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(push, share))
    return sum(map(len, per_rank)) / (time.perf_counter() - t0)


def _sync_workers(savedir: Path, uri: str, experiment: str, workers: int) -> float:
    """Points/s of the whole `itwinai-sync --to mlflow --workers N` command (parent and child
    runs created inside the timing, as the raw streams create theirs)."""
    from click.testing import CliRunner

    from itwinai_journal import Journal
    from itwinai_sync.cli import main

    total = sum(r.last_seq for r in Journal(savedir).run("ranks").ranks)
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow", "--tracking-uri", uri,
                                       "--experiment", experiment, "--workers", str(workers)])
    seconds = time.perf_counter() - t0
    assert result.exit_code == 0 and "FAILED" not in result.output, result.output
    return total / seconds


@contextmanager
def _client_cost(out: dict[str, Any], label: str, points: int) -> Iterator[None]:
    """Into `out`: this process's CPU time per point during the block (the client's: the
    server and PostgreSQL are other processes) and the HTTP requests it sent, per MLflow
    endpoint. Unlike rates, neither swings with what else loads the machine. Counting adds a
    function call to each request (a microsecond, against 100 ms and more per request)."""
    import mlflow.utils.rest_utils as rest

    sent: Counter = Counter()
    real = rest.http_request

    def counted(host_creds: Any, endpoint: str, method: str, *args: Any, **kwargs: Any) -> Any:
        sent[endpoint.rsplit("/mlflow/", 1)[-1]] += 1
        return real(host_creds, endpoint, method, *args, **kwargs)

    rest.http_request = counted
    cpu = time.process_time()
    try:
        yield
    finally:
        rest.http_request = real
    out[f"{label}_client_cpu_us_per_point"] = (time.process_time() - cpu) / points * 1e6
    out[f"{label}_requests"] = dict(sent)


def bench_postgres_ranks(ranks: int, points: int, tmp: Path) -> dict[str, Any]:
    """A run of `ranks` ranks x `points` points exported to an `mlflow server` backed by
    PostgreSQL (both on loopback, started here), with --workers 1 and --workers 4, each right
    after the raw MlflowClient.log_batch streams it is compared with: one stream, and four
    in parallel (what this machine and server allow at most). A raw stream with a cursor tag
    in each request (999 points and the tag) measures what the cursor itself costs here, and
    --workers 1 once more with ITWINAI_SYNC_QUICKACK=0 what acknowledging the server's
    responses at once gains (targets/quickack.py: with several workers, as here and by
    MLflow's default, uvicorn's responses otherwise wait ~40 ms for the client's ACK).

    Each of them starts from the same state: a new, empty database and an mlflow server of its
    own, the previous database dropped and PostgreSQL checkpointed. In one database, each pass
    would insert into the tables and indexes of all passes before it (a second raw stream
    measured 5-12% below the first), which would favour whatever runs first."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from mlflow.entities import Metric
    from postgres_server import PostgresMlflowServer, PostgresServer

    from itwinai_journal import Journal
    from itwinai_sync.api import scoped_env
    from itwinai_sync.targets import quickack

    savedir = tmp / "pg-ranks"
    _ranks_journal(savedir, ranks, points)
    table = Journal(savedir).metrics(run_id="ranks")
    per_rank: list[list[Any]] = [[] for _ in range(ranks)]
    for r in table.to_pylist():
        per_rank[r["rank"]].append(Metric(r["name"], r["value"], int(r["time"] * 1000),
                                          r["step"]))
    del table
    out: dict[str, Any] = {"ranks": ranks, "points_per_rank": points, "server_workers": 4}

    @contextmanager
    def fresh_server(pg: PostgresServer, name: str) -> Iterator[PostgresMlflowServer]:
        pg.psql(f"create database {name}")
        try:
            with PostgresMlflowServer(f"{pg.uri.rsplit('/', 1)[0]}/{name}",
                                      tmp / f"pg-mlflow-{name}", workers=4) as server:
                # A server worker's first request connects to the database and sets up
                # SQLAlchemy (0.2 s): a request on each of a few new connections, untimed.
                for _ in range(4 * 4):
                    urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search"
                                           "?max_results=1").read()
                yield server
        finally:
            pg.psql(f"drop database {name}")
            pg.psql("checkpoint")

    # The cluster in a directory of its own (PostgreSQL runs as another user when we are
    # root, and cannot enter `tmp`, which is private).
    with PostgresServer() as pg:
        with fresh_server(pg, "raw1") as server, _client_cost(out, "raw_1", ranks * points):
            out["raw_1_stream_points_per_s"] = _raw_streams(server.uri, "raw-1", per_rank, 1)
        with fresh_server(pg, "raw1tag") as server:
            out["raw_1_tagged_points_per_s"] = _raw_streams(server.uri, "raw-1-tag", per_rank,
                                                            1, cursor_tag=True)
        with fresh_server(pg, "sync1") as server, _client_cost(out, "workers_1",
                                                               ranks * points):
            out["workers_1_points_per_s"] = _sync_workers(savedir, server.uri, "sync-1", 1)
        with fresh_server(pg, "sync1late") as server, scoped_env({quickack.ENV: "0"}):
            out["workers_1_late_acks_points_per_s"] = _sync_workers(savedir, server.uri,
                                                                    "sync-1-late-acks", 1)
        with fresh_server(pg, "raw4") as server:
            out["raw_4_streams_points_per_s"] = _raw_streams(server.uri, "raw-4", per_rank, 4)
        with fresh_server(pg, "sync4") as server:
            out["workers_4_points_per_s"] = _sync_workers(savedir, server.uri, "sync-4", 4)
    out["ratio_workers_1"] = out["workers_1_points_per_s"] / out["raw_1_stream_points_per_s"]
    out["ratio_workers_4"] = out["workers_4_points_per_s"] / out["raw_4_streams_points_per_s"]
    out["ratio_workers_1_late_acks"] = (out["workers_1_late_acks_points_per_s"]
                                        / out["raw_1_stream_points_per_s"])
    out["raw_4_over_1"] = out["raw_4_streams_points_per_s"] / out["raw_1_stream_points_per_s"]
    out["tagged_over_raw"] = (out["raw_1_tagged_points_per_s"]
                              / out["raw_1_stream_points_per_s"])
    return out


def bench_ls_scale(runs: int, ranks: int, tmp: Path) -> dict[str, float]:
    """`itwinai-sync ls` (a fresh process) over a synthetic savedir of runs x ranks."""
    import subprocess

    savedir = tmp / "scale"
    for r in range(runs):
        run_dir = savedir / "exp" / f"run{r:03d}"
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps({"format_version": 1, "experiment": "exp",
                                                       "run_id": f"run{r:03d}"}))
        for k in range(ranks):
            rank_dir = run_dir / f"rank-{k:05d}"
            rank_dir.mkdir()
            (rank_dir / "manifest.json").write_text(json.dumps({
                "rank": k, "world_size": ranks, "destinations": {"mlflow": {}},
                "sessions": [{"status": "finished", "last_seq": 1000, "start": 0, "end": 1}]}))
            (rank_dir / "index.jsonl").write_text(json.dumps({"segment": 1, "first_seq": 1,
                                                              "last_seq": 1000}) + "\n")
    out: dict[str, float] = {"runs": runs, "ranks": ranks}
    for command in (["ls"], ["show", f"run{runs // 2:03d}"]):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "itwinai_sync.cli", command[0], str(savedir),
                        *command[1:]], capture_output=True, text=True, check=True)
        out[f"{command[0]}_seconds"] = time.perf_counter() - t0
    return out


def hot_path_ratios(hot: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each alternative's per-call cost over ours (the MLFlowLogger row), at the median and in
    wall time: the median is the call itself, wall includes the journal's background work."""
    ours = hot[OURS]
    return {name: {"median": hot[name]["median_us"] / ours["median_us"],
                   "wall": hot[name]["wall_us"] / ours["wall_us"]} for name in ALTERNATIVES}


_OPS: dict[str, Callable[[float, float], bool]] = {"≤": operator.le, "<": operator.lt,
                                                    "≥": operator.ge}


def _goal(what: str, value: float, measured: str, op: str, target: float,
          unit: str) -> dict[str, Any]:
    """One row of the goals table; `value op target` decides whether it is met."""
    return {"what": what, "value": value, "measured": measured,
            "goal": f"{op} {target:g}{unit}", "met": _OPS[op](value, target)}


def goals(results: dict) -> list[dict[str, Any]]:
    """The project's targets checked against this run's measurements (of the sections run). In
    --quick some sizes are smaller than the ones a target is stated for: the size measured is
    part of the row."""
    rows = []
    if "hot_path" in results:
        ours = results["hot_path"][OURS]
        rows.append(_goal("hot path MLFlowLogger.log, median", ours["median_us"],
                          f"{ours['median_us']:.3f} µs", "≤", 1, " µs"))
        for name, label, target in ((TENSORBOARD, "TensorBoard add_scalar", 50),
                                    (WANDB, "W&B offline run.log", 100)):
            r = results["hot_path_ratios"][name]
            rows.append(_goal(f"faster than {label} (median; wall)", r["median"],
                              f"{r['median']:.0f}x (wall {r['wall']:.1f}x)", "≥", target, "x"))
    if "memory_and_read" in results:
        mem = results["memory_and_read"]
        read_mps = mem["read_points_per_s"] / 1e6
        rows += [
            _goal(f"RSS growth logging {mem['points']:,} points"
                  f"{_stated(mem['points'], 10**7, '10 M')}",
                  mem["rss_growth_mb"], f"{mem['rss_growth_mb']:.1f} MB", "<", 64, " MB"),
            _goal(f"Journal.metrics() read, {mem['read_points']:,} points", read_mps,
                  f"{read_mps:.2f} M points/s", "≥", 1, " M points/s"),
        ]
    for key, label, target in (("mlflow_export", "sqlite", 1.0),
                               ("mlflow_server_export", "server", 0.9)):
        if key in results:
            r = results[key]
            rows.append(_goal(f"MLflow export vs raw log_batch, {label}", r["ratio"],
                              f"{r['ratio']:.2f}x ({r['ratio_to_tagged']:.2f}x of tagged)", "≥",
                              target, "x"))
    if "postgres_ranks" in results:
        pg = results["postgres_ranks"]
        size = f"{pg['ranks']} x {pg['points_per_rank']:,}"
        stated = _stated(pg["ranks"] * pg["points_per_rank"], 64 * 20_000, "64 x 20,000")
        rows += [
            _goal(f"PostgreSQL {size}, --workers 1 / 1 raw stream{stated}",
                  pg["ratio_workers_1"], f"{pg['ratio_workers_1']:.2f}x", "≥", 1.0, "x"),
            _goal(f"PostgreSQL {size}, --workers 4 / 4 raw streams{stated}",
                  pg["ratio_workers_4"], f"{pg['ratio_workers_4']:.2f}x", "≥", 0.9, "x"),
        ]
    if "tensorboard_export" in results:
        tbx = results["tensorboard_export"]
        rows.append(_goal("TensorBoard export vs add_scalar replay", tbx["ratio"],
                          f"{tbx['ratio']:.1f}x", "≥", 5, "x"))
    if "export_peak_rss" in results:
        peak = results["export_peak_rss"]
        rows.append(_goal(f"export peak RSS ({peak['points']:,} points)", peak["peak_rss_mb"],
                          f"{peak['peak_rss_mb']:.0f} MB", "<", 512, " MB"))
    if "ls_scale" in results:
        scale = results["ls_scale"]
        for command in ("ls", "show"):
            rows.append(_goal(f"{command} {scale['runs']} runs x {scale['ranks']} ranks"
                              f"{_stated(scale['runs'] * scale['ranks'], 10 * 1024, '10 x 1024')}",
                              scale[f"{command}_seconds"],
                              f"{scale[f'{command}_seconds']:.2f} s", "<", 2, " s"))
    return rows


def _stated(size: int, full: int, label: str) -> str:
    """A note when this run measured a smaller size than the one the goal is stated for."""
    return "" if size >= full else f" (goal for {label})"


def print_goals(rows: list[dict[str, Any]]) -> None:
    print(f"\nGoals ({sum(r['met'] for r in rows)} of {len(rows)} met in this run)")
    print(f"{'what':52} {'measured':24} {'goal':16}")
    for r in rows:
        print(f"{r['what']:52} {r['measured']:24} {r['goal']:16} {'✓' if r['met'] else '✗'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes)")
    parser.add_argument("--json", default="bench-results.json", help="where to write results")
    parser.add_argument("--only", default=",".join(SECTIONS), metavar="SECTION,...",
                        help=f"sections to run (default all: {','.join(SECTIONS)})")
    args = parser.parse_args()
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"unknown section(s): {', '.join(sorted(sections - set(SECTIONS)))}")
    calls = 200_000 if args.quick else 1_000_000
    points = 20_000 if args.quick else 100_000
    big = 1_000_000 if args.quick else 10_000_000
    results: dict = {"machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                                 "platform": platform.platform(),
                                 "processor": platform.machine()},
                     "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="itwinai-bench-") as tmp:
        tmp_path = Path(tmp)
        if "hot" in sections:
            hot = bench_hot_path(calls, tmp_path)
            results["hot_path"] = hot
            print(f"\nHot path ({calls:,} calls; per call, blocks of {BLOCK})")
            print(f"{'':50} {'median µs':>10} {'p99 µs':>8} {'wall µs':>8}")
            for name, r in hot.items():
                print(f"{name:50} {r['median_us']:10.3f} {r['p99_us']:8.3f} {r['wall_us']:8.3f}")
            print(f"(the wandb and mlflow rows: {hot[WANDB]['calls']:,} and "
                  f"{hot[MLFLOW]['calls']:,} calls, blocks of {SLOW_BLOCK})")
            results["hot_path_ratios"] = ratios = hot_path_ratios(hot)
            print("\nalternative / MLFlowLogger.log, per call")
            print(f"{'':50} {'median':>10} {'wall':>8}")
            for name, r in ratios.items():
                print(f"{name:50} {r['median']:9.1f}x {r['wall']:7.1f}x")
            print("wandb, after its loop: run.finish() + teardown "
                  f"{hot[WANDB]['drain_seconds']:.2f} s (what wandb-core still had to write)")

        if "sampler" in sections:
            sampler = bench_sampler(calls // 2, tmp_path)
            results["system_metrics_sampler"] = sampler
            print(f"\nHot path with the system-metrics sampler ({calls // 2:,} calls x 3 "
                  "alternated rounds per setting; medians)")
            print(f"{'':50} {'median µs':>10} {'p99 µs':>8} {'wall µs':>8}")
            for label, _ in SAMPLER_SETTINGS:
                r = sampler[label]
                print(f"{label:50} {r['median_us']:10.3f} {r['p99_us']:8.3f} {r['wall_us']:8.3f}")
            cost = sampler["one_sample_ms"]
            print(f"one sample (sampler thread, no GPU): {cost['min']:.2f} ms min, "
                  f"{cost['median']:.2f} ms median; {sampler['samples_written_at_0.1s']} samples "
                  "written at 0.1 s during the loops")

        if "live" in sections:
            live = bench_live_sync(calls, tmp_path)
            results["live_sync"] = live
            print(f"\nHot path with live sync ({OURS}, {calls:,} calls; sidecar -> loopback "
                  "mlflow server every 0.5 s)")
            print(f"{'':50} {'median µs':>10} {'p99 µs':>8} {'wall µs':>8}")
            for label, r in live.items():
                print(f"{'live sync ' + label:50} {r['median_us']:10.3f} {r['p99_us']:8.3f} "
                      f"{r['wall_us']:8.3f}")
            print(f"(each loop after a backlog of {max(BLOCK, calls // 10):,} records; the sidecar "
                  f"had exported {live['on']['exported_live']:,} records live when stopped)")

        if "mlflow" in sections:
            rounds = 2 if args.quick else 3
            ml = bench_mlflow_export(points, tmp_path, rounds)
            results["mlflow_export"] = ml
            _print_export_rounds(f"MLflow export of {ml['points']:,} points into embedded "
                                 "sqlite", ml)
            print(f"  re-sync (nothing to do):    {ml['resync_seconds']:.2f} s")

            # at least 10 000: below that the run setup (experiment, parent and child runs)
            # dominates
            srv = bench_mlflow_server_export(max(points // 4, 10_000), tmp_path, rounds)
            results["mlflow_server_export"] = srv
            _print_export_rounds(f"MLflow export of {srv['points']:,} points into a loopback "
                                 "mlflow server", srv)

        if "postgres" in sections:
            ranks, per_rank = (16, 5_000) if args.quick else (64, 20_000)
            pg = bench_postgres_ranks(ranks, per_rank, tmp_path)
            results["postgres_ranks"] = pg
            print(f"\nMLflow export of a run of {ranks} ranks x {per_rank:,} points into an mlflow "
                  f"server on PostgreSQL ({pg['server_workers']} server workers), points/s")
            print(f"  raw log_batch, 1 stream:       {pg['raw_1_stream_points_per_s']:8,.0f}")
            print(f"  raw, 999 points + a tag:       {pg['raw_1_tagged_points_per_s']:8,.0f}"
                  f"  ({pg['tagged_over_raw']:.2f}x of 1 stream: the cursor's own cost)")
            print(f"  itwinai-sync --workers 1:      {pg['workers_1_points_per_s']:8,.0f}"
                  f"  ({pg['ratio_workers_1']:.2f}x of 1 stream)")
            print(f"    without quick acks:          {pg['workers_1_late_acks_points_per_s']:8,.0f}"
                  f"  ({pg['ratio_workers_1_late_acks']:.2f}x of 1 stream; "
                  "ITWINAI_SYNC_QUICKACK=0, responses read as MLflow's client reads them)")
            print(f"  raw log_batch, 4 streams:      {pg['raw_4_streams_points_per_s']:8,.0f}"
                  f"  ({pg['raw_4_over_1']:.2f}x of 1 stream: this machine's ceiling)")
            print(f"  itwinai-sync --workers 4:      {pg['workers_4_points_per_s']:8,.0f}"
                  f"  ({pg['ratio_workers_4']:.2f}x of 4 streams)")
            for label, what in (("raw_1", "raw, 1 stream"), ("workers_1", "--workers 1")):
                sent = pg[f"{label}_requests"]
                kinds = ", ".join(f"{k} {v / ranks:.2f}" for k, v in sorted(sent.items()))
                print(f"  {what + ':':30} client CPU {pg[f'{label}_client_cpu_us_per_point']:.0f}"
                      f" µs/point; requests per rank {sum(sent.values()) / ranks:.2f} ({kinds})")

        if "tensorboard" in sections:
            tbx = bench_tensorboard_export(points, tmp_path)
            results["tensorboard_export"] = tbx
            print(f"\nTensorBoard export of {tbx['points']:,} points")
            print("  SummaryWriter.add_scalar replay: "
                  f"{tbx['add_scalar_replay_points_per_s']:10,.0f} points/s")
            print(f"  itwinai-sync --to tensorboard:   {tbx['itwinai_sync_points_per_s']:10,.0f}"
                  f" points/s ({tbx['ratio']:.1f}x)")

        if "memory" in sections:
            mem = bench_memory_and_read(big, tmp_path)
            results["memory_and_read"] = mem
            print(f"\nLogging {mem['points']:,} metric points in one process: RSS growth "
                  f"{mem['rss_growth_mb']:.1f} MB ({mem['log_process_seconds']:.1f} s)")
            print(f"Journal.metrics() read: {mem['read_points']:,} points, "
                  f"{mem['read_points_per_s']:,.0f} points/s")
            peak = bench_export_peak_rss(mem["savedir"], big)
            results["export_peak_rss"] = peak
            print(f"itwinai-sync --to tensorboard of those {big:,} points: peak RSS "
                  f"{peak['peak_rss_mb']:.0f} MB, {peak['points_per_s']:,.0f} points/s")

        if "ls" in sections:
            scale = bench_ls_scale(10, 1024 if not args.quick else 256, tmp_path)
            results["ls_scale"] = scale
            print(f"\nitwinai-sync over {scale['runs']} runs x {scale['ranks']} ranks (a fresh "
                  f"process each): ls {scale['ls_seconds']:.2f} s, show of one run "
                  f"{scale['show_seconds']:.2f} s")
    results["goals"] = goal_rows = goals(results)
    print_goals(goal_rows)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
