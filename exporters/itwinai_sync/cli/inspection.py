"""Looking at journals without a tracker: `ls`, `show`, `plot`, `tail`, `export` (the
views themselves are in `itwinai_sync.inspect`)."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from itwinai_journal import Journal, RunInfo

from ..ledger import ledger_entries
from .common import SAVEDIR, counts, fail, reported_errors
from .live import read_status, status_lines

_STATUS_ORDER = ("running", "failed", "interrupted", "finished", "empty")


def _ls_rows(savedir: Path) -> list[dict[str, Any]]:
    """One row per run (experiment, run id), with every journal of it: a Prov4MLLogger's own
    journal beside the main one, or journals that merely share an experiment and run id."""
    from itwinai_journal.read.liveness import writer_gone

    synced: dict[str, dict[str, dict[int, int]]] = {}
    for entry in ledger_entries(savedir):
        cursors = {int(k): v for k, v in entry.get("cursors", {}).items()}
        synced.setdefault(entry["journal"], {})[entry["target_key"]] = cursors
    by_key: dict[str, list[RunInfo]] = {}
    rows = []
    for run in Journal(savedir).scan():
        if run.error:
            rows.append({"experiment": run.experiment, "run_id": run.run_id, "run_name": None,
                         "status": "damaged", "ranks": len(run.ranks), "records": 0,
                         "destinations": [], "synced": {}, "path": str(run.path),
                         "journals": [], "live": None, "error": run.error})
        else:
            by_key.setdefault(run.key, []).append(run)
    for journals in by_key.values():
        first = journals[0]
        parts, progress = [], {}
        for run in journals:
            records = {r.rank: r.last_seq for r in run.ranks}
            gone = [r.rank for r in run.ranks if r.status == "running"
                    and writer_gone(r.path, r.manifest) is not None]
            parts.append({"path": str(run.path), "journal_id": run.journal_id,
                          "status": run.status, "ranks": len(run.ranks),
                          "records": sum(records.values()),
                          "destinations": sorted(run.destinations()),
                          "writer_gone": gone})
            for key, cursors in synced.get(run.journal_id, {}).items():
                done = progress.setdefault(key, {"records": 0, "of": 0, "ranks": 0})
                done["records"] += sum(min(c, records.get(rank, 0))
                                       for rank, c in cursors.items())
                done["of"] += sum(records.values())
                done["ranks"] += len(cursors)
        rows.append({
            "experiment": first.experiment,
            "run_id": first.run_id,
            "run_name": next((r.info.get("run_name") for r in journals
                              if r.info.get("run_name")), None),
            "status": min((p["status"] for p in parts), key=_STATUS_ORDER.index),
            "ranks": max(p["ranks"] for p in parts),
            "records": sum(p["records"] for p in parts),
            "destinations": sorted({d for p in parts for d in p["destinations"]}),
            "synced": progress,
            "live": read_status(savedir, first.experiment, first.run_id),
            "path": str(first.path),
            "journals": parts,
            "error": None,
        })
    rows.sort(key=lambda row: (row["experiment"], row["run_id"]))
    return rows


@click.command("ls")
@click.argument("savedir", type=SAVEDIR)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(savedir: Path, as_json: bool) -> None:
    """List experiments, runs, ranks, status, records and how far each target is synced.

    Record counts come from manifests and indexes (no segment is read), so a run still being
    written may show fewer records than it holds. A damaged run (run.json or a manifest that
    cannot be read) is listed as DAMAGED with the reason; sync skips it."""
    rows = _ls_rows(savedir)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo(f"no runs in {savedir}")
        return
    experiment = None
    for row in rows:
        if row["experiment"] != experiment:
            experiment = row["experiment"]
            click.secho(experiment, bold=True)
        if row["error"]:
            click.secho(f"  {row['run_id']}  DAMAGED: {row['error']}", fg="red")
            continue
        name = f" ({row['run_name']})" if row["run_name"] else ""
        gone = sum(len(j["writer_gone"]) for j in row["journals"])
        status = f"{row['status']} (writer gone: {gone} rank(s))" if gone else row["status"]
        click.echo(f"  {row['run_id']}{name}  {status}  {row['ranks']} rank(s)  "
                   f"{row['records']} records  -> {', '.join(row['destinations']) or '-'}")
        if len(row["journals"]) > 1:
            for j in row["journals"]:
                click.echo(f"      journal {j['path']} ({j['journal_id'][:8]}): {j['status']}, "
                           f"{j['ranks']} rank(s), {j['records']} records -> "
                           f"{', '.join(j['destinations']) or '-'}")
        for key, s in row["synced"].items():
            click.echo(f"      synced to {key}: {s['records']}/{s['of']} records")
        if row["live"]:
            for line in status_lines(row["live"]):
                click.echo(f"      {line}")


@click.command("show")
@click.argument("savedir", type=SAVEDIR)
@click.argument("run_id")
def show_cmd(savedir: Path, run_id: str) -> None:
    """Manifest, kinds and counts, and per metric its last value, min, max, point count and a
    sparkline of the whole series, for each rank of one run."""
    import pyarrow.compute as pc

    from ..inspect.selection import system_points
    from ..inspect.summaries import metric_summary_lines

    journal = Journal(savedir)
    try:
        with reported_errors():
            run = journal.run(run_id)
    except KeyError as e:
        fail(str(e.args[0]))
    click.secho(f"{run.experiment} / {run.run_id}", bold=True)
    for key in ("run_name", "description", "created"):
        if run.info.get(key) is not None:
            value = run.info[key]
            if key == "created":
                value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
            click.echo(f"  {key}: {value}")
    click.echo(f"  status: {run.status}   path: {run.path}")
    click.echo(f"  destinations: {json.dumps(run.destinations())}")
    for rank in run.ranks:
        m = rank.manifest
        sessions = m.get("sessions", [])
        click.secho(f"  rank {rank.rank} (world size {m.get('world_size')}, host "
                    f"{m.get('host')}): {len(sessions)} session(s), last {rank.status}, "
                    f"{m.get('dropped_records', 0)} dropped", bold=True)
        if sessions:
            click.echo(f"    argv: {' '.join(sessions[-1].get('argv', []))}")
        mine = journal.rank_records(run, rank)
        kinds = Counter(mine["kind"].to_pylist())
        click.echo(f"    records: {counts(kinds)}")
        metrics = mine.filter(pc.equal(mine["kind"], "metric"))
        for line in metric_summary_lines(metrics):
            click.echo(line)
        system = system_points(mine)
        if system.num_rows:
            click.echo("    system metrics (sampled; plot them with --metric 'system/*'):")
            for line in metric_summary_lines(system, indent="      "):
                click.echo(line)


@click.command("plot")
@click.argument("savedir", type=SAVEDIR)
@click.argument("run_ids", nargs=-1, metavar="[RUN ...]")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Only this metric, repeatable; shell-style patterns work ('train/*'). "
                   "Sampled system metrics are selected by 'system/...' ('system/*').")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("metrics.png"), show_default=True,
              help="Image (.png, .svg, .pdf) or self-contained page (.html), drawn "
                   "by matplotlib.")
@click.option("--smooth", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              show_default=True, metavar="ALPHA",
              help="EMA smoothing weight as TensorBoard's slider (0: raw, 0.9: smooth); the "
                   "raw curve stays visible, faint.")
@click.option("--x", "x_mode", type=click.Choice(["step", "time", "relative"]), default="step",
              show_default=True, help="x axis: step, wall-clock time, or seconds since the "
                                      "run's first record.")
@click.option("--width", type=click.IntRange(200, 10000), default=1200, show_default=True,
              help="Image width in pixels.")
@click.option("--height", type=click.IntRange(100, 10000), default=None,
              help="Image height in pixels [default: 360 per row of charts].")
@click.option("--columns", type=click.IntRange(1, 8), default=None,
              help="Charts per row [default: 1 for one metric, else 2].")
def plot_cmd(savedir: Path, run_ids: tuple[str, ...], metrics: tuple[str, ...], output: Path,
             smooth: float, x_mode: str, width: int, height: int | None,
             columns: int | None) -> None:
    """Metric curves of RUNs (default: every run under SAVEDIR), one chart per metric, one
    line per run and rank. No tracker and no network needed."""
    from ..inspect.plot import PlotOptions, plot

    opts = PlotOptions(smooth=smooth, x=x_mode, width=width, height=height, columns=columns)
    with reported_errors():
        done = plot(Journal(savedir), output, list(run_ids), list(metrics), opts)
    click.echo(f"wrote {done['path']}: {done['charts']} metric(s), {done['series']} series, "
               f"{done['points']} points")


@click.command("tail")
@click.argument("savedir", type=SAVEDIR)
@click.argument("run_id", required=False, metavar="[RUN]")
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing metric records as they are written, until Ctrl-C.")
@click.option("-n", "--lines", "last", type=click.IntRange(min=0), default=10,
              show_default=True, help="Print the last N records first.")
@click.option("--interval", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              metavar="S", help="Seconds between reads of the journal with -f.")
@click.option("--metric", "metrics", multiple=True, metavar="NAME",
              help="Only this metric, repeatable; shell-style patterns work.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
def tail_cmd(savedir: Path, run_id: str | None, follow: bool, last: int, interval: float,
             metrics: tuple[str, ...], as_json: bool) -> None:
    """Print the last metric records of RUN (default: every run under SAVEDIR); with -f keep
    printing new ones as the journal grows, each (run, rank, seq) exactly once, also while
    segments are sealed."""
    from ..inspect.tail import Tail

    tail = Tail(savedir, run_id, metrics)

    def emit(points: list) -> None:
        for p in points:
            click.echo(p.json() if as_json else p.line())

    try:
        with reported_errors():
            if run_id is not None and not tail.runs() and not follow:
                fail(f"no run {run_id!r} in {savedir}")
            emit(tail.poll(last=last))
            while follow:
                time.sleep(interval)
                emit(tail.poll())
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        sys.stderr.close()  # `itwinai-sync tail ... | head`: stop quietly


@click.command("export")
@click.argument("savedir", type=SAVEDIR)
@click.option("--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet",
              show_default=True)
@click.option("-o", "--output", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory; each run goes to DIR/<experiment>/<run_id>.<format>.")
@click.option("--run", "run_ids", multiple=True, metavar="ID",
              help="Only this run (id or experiment/id), repeatable.")
def export_cmd(savedir: Path, fmt: str, out_dir: Path, run_ids: tuple[str, ...]) -> None:
    """Write a tidy metrics table per run: experiment, run_id, rank, seq, time, name, step,
    batch_idx, value (as Journal(SAVEDIR).metrics())."""
    from ..inspect.export import export_metrics

    with reported_errors():
        written = export_metrics(Journal(savedir), out_dir, fmt, list(run_ids))
    for run, path, rows in written:
        click.echo(f"{run.key}: {rows} metric points -> {path}")
    if not written:
        click.echo(f"no runs in {savedir}")

