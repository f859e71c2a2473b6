"""Speed of itwinai-sync next to what users would use instead, measured in the same run.

    .venv/bin/python scripts/bench.py [--quick] [--json bench-results.json]

Per-call costs are timed in blocks of 1000 calls (a timer call per `log()` would cost more than
the call itself); median and p99 are over blocks, divided by 1000. "wall" is the whole loop
including the journal's background flushing, which shares the GIL with the training loop.
Nothing here asserts: this script is where speed is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

BLOCK = 1000


def per_call(fn: Callable[[int], None], calls: int) -> dict[str, float]:
    """fn(i) called `calls` times; per-call median/p99 over blocks and wall time per call."""
    blocks = []
    start = time.perf_counter()
    for b in range(calls // BLOCK):
        base = b * BLOCK
        t0 = time.perf_counter_ns()
        for i in range(base, base + BLOCK):
            fn(i)
        blocks.append((time.perf_counter_ns() - t0) / BLOCK / 1000)
    wall = (time.perf_counter() - start) / calls * 1e6
    blocks.sort()
    return {"median_us": statistics.median(blocks),
            "p99_us": blocks[min(len(blocks) - 1, int(len(blocks) * 0.99))],
            "wall_us": wall, "calls": calls}


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
    out["MLFlowLogger.log(x, 'loss', step=i)"] = per_call(
        lambda i: lg.log(0.5, "loss", step=i), calls)
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
    out["SummaryWriter.add_scalar"] = per_call(
        lambda i: sw.add_scalar("loss", 0.5, i), max(BLOCK, calls // 10))
    sw.close()
    with open(tmp / "baseline.jsonl", "w") as f:
        out["json.dumps + write (JSONL baseline)"] = per_call(
            lambda i: f.write(json.dumps({"name": "loss", "value": 0.5, "step": i,
                                          "time": time.time()}) + "\n"), calls)
    return out


def _scale(r: dict[str, float], n: int) -> dict[str, float]:
    return {k: (v / n if k.endswith("_us") else v) for k, v in r.items()}


def _journal(savedir: Path, points: int) -> None:
    from itwinai_journal.loggers import MLFlowLogger

    lg = MLFlowLogger(savedir=savedir, experiment_name="bench", run_id="bench",
                      log_freq="batch")
    lg.create_logger_context()
    for i in range(points // 2):
        lg.log(1.0 / (i + 1), "loss", step=i)
        lg.log(i * 0.001, "acc", step=i)
    lg.destroy_logger_context()


def bench_mlflow_export(points: int, tmp: Path) -> dict[str, float]:
    """itwinai-sync into an embedded sqlite store vs raw MlflowClient.log_batch of the same
    points (1000 per call, original timestamps and steps) into an identical fresh store."""
    from click.testing import CliRunner
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from itwinai_journal import Journal
    from itwinai_sync.cli import main

    savedir = tmp / "export"
    _journal(savedir, points)
    rows = Journal(savedir).metrics().to_pylist()

    raw_db = tmp / "raw" / "mlflow.db"
    raw_db.parent.mkdir()
    client = MlflowClient(f"sqlite:///{raw_db}")
    run = client.create_run(client.create_experiment("bench"))
    metrics = [Metric(r["name"], r["value"], int(r["time"] * 1000), r["step"]) for r in rows]
    client.log_batch(run.info.run_id, metrics=metrics[:1])  # schema and connection warm-up
    t0 = time.perf_counter()
    for k in range(1, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[k:k + 1000])
    raw = (len(metrics) - 1) / (time.perf_counter() - t0)

    # warm the target the same way (database created, run created) before timing
    from itwinai_sync.engine import SyncEngine, SyncRequest

    engine = SyncEngine(SyncRequest(savedir=savedir, targets=["mlflow"], options={}))
    plan = engine.plan()
    exporter = engine.exporter("mlflow")
    run_info = plan[0][0]
    exporter.open(run_info, run_info.ranks[0], create=True).close()
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow"])
    ours_total = time.perf_counter() - t0
    assert result.exit_code == 0, result.output
    t0 = time.perf_counter()
    engine2 = SyncEngine(SyncRequest(savedir=savedir, targets=["mlflow"], options={}))
    engine2.run()
    resync = time.perf_counter() - t0
    return {"points": len(rows), "raw_log_batch_points_per_s": raw,
            "itwinai_sync_points_per_s": len(rows) / ours_total,
            "ratio": len(rows) / ours_total / raw, "resync_seconds": resync}


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


def bench_mlflow_server_export(points: int, tmp: Path) -> dict[str, float]:
    """itwinai-sync into a loopback `mlflow server` vs raw log_batch over HTTP, same server."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from click.testing import CliRunner
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow_server import MlflowServer

    from itwinai_journal import Journal
    from itwinai_sync.cli import main

    savedir = tmp / "server-export"
    _journal(savedir, points)
    rows = Journal(savedir).metrics().to_pylist()
    with MlflowServer(tmp / "server") as server:
        client = MlflowClient(server.uri)
        run = client.create_run(client.create_experiment("raw"))
        metrics = [Metric(r["name"], r["value"], int(r["time"] * 1000), r["step"]) for r in rows]
        t0 = time.perf_counter()
        for k in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[k:k + 1000])
        raw = len(metrics) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow",
                                           "--tracking-uri", server.uri])
        ours = len(rows) / (time.perf_counter() - t0)
        assert result.exit_code == 0, result.output
    return {"points": len(rows), "raw_log_batch_points_per_s": raw,
            "itwinai_sync_points_per_s": ours, "ratio": ours / raw}


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
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "itwinai_sync.cli", "ls", str(savedir)],
                   capture_output=True, text=True, check=True)
    return {"runs": runs, "ranks": ranks, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes)")
    parser.add_argument("--json", default="bench-results.json", help="where to write results")
    args = parser.parse_args()
    calls = 200_000 if args.quick else 1_000_000
    points = 20_000 if args.quick else 100_000
    big = 1_000_000 if args.quick else 10_000_000
    results: dict = {"machine": {"python": sys.version.split()[0], "cpus": os.cpu_count(),
                                 "platform": platform.platform(),
                                 "processor": platform.machine()},
                     "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="itwinai-bench-") as tmp:
        tmp_path = Path(tmp)
        hot = bench_hot_path(calls, tmp_path)
        results["hot_path"] = hot
        print(f"\nHot path ({calls:,} calls; per call, blocks of {BLOCK})")
        print(f"{'':50} {'median µs':>10} {'p99 µs':>8} {'wall µs':>8}")
        for name, r in hot.items():
            print(f"{name:50} {r['median_us']:10.3f} {r['p99_us']:8.3f} {r['wall_us']:8.3f}")
        ours = hot["MLFlowLogger.log(x, 'loss', step=i)"]
        tb = hot["SummaryWriter.add_scalar"]
        print(f"SummaryWriter.add_scalar / MLFlowLogger.log: median "
              f"{tb['median_us'] / ours['median_us']:.1f}x, wall "
              f"{tb['wall_us'] / ours['wall_us']:.1f}x")

        ml = bench_mlflow_export(points, tmp_path)
        results["mlflow_export"] = ml
        print(f"\nMLflow export of {ml['points']:,} points into embedded sqlite")
        print(f"  raw MlflowClient.log_batch: {ml['raw_log_batch_points_per_s']:10,.0f} points/s")
        print(f"  itwinai-sync --to mlflow:   {ml['itwinai_sync_points_per_s']:10,.0f} points/s "
              f"({ml['ratio']:.2f}x of raw; whole CLI run incl. reading the journal)")
        print(f"  re-sync (nothing to do):    {ml['resync_seconds']:.2f} s")

        srv = bench_mlflow_server_export(points // 4, tmp_path)
        results["mlflow_server_export"] = srv
        print(f"\nMLflow export of {srv['points']:,} points into a loopback mlflow server")
        print(f"  raw MlflowClient.log_batch: {srv['raw_log_batch_points_per_s']:10,.0f} points/s")
        print(f"  itwinai-sync --to mlflow:   {srv['itwinai_sync_points_per_s']:10,.0f} points/s "
              f"({srv['ratio']:.2f}x of raw)")

        tbx = bench_tensorboard_export(points, tmp_path)
        results["tensorboard_export"] = tbx
        print(f"\nTensorBoard export of {tbx['points']:,} points")
        print(f"  SummaryWriter.add_scalar replay: {tbx['add_scalar_replay_points_per_s']:10,.0f}"
              " points/s")
        print(f"  itwinai-sync --to tensorboard:   {tbx['itwinai_sync_points_per_s']:10,.0f}"
              f" points/s ({tbx['ratio']:.1f}x)")

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

        scale = bench_ls_scale(10, 1024 if not args.quick else 256, tmp_path)
        results["ls_scale"] = scale
        print(f"\nitwinai-sync ls over {scale['runs']} runs x {scale['ranks']} ranks: "
              f"{scale['seconds']:.2f} s (a fresh process)")
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nwritten {args.json}")


if __name__ == "__main__":
    main()
