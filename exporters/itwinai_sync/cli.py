"""`itwinai-sync`: replay journals into trackers, and look at them without one.

    itwinai-sync SAVEDIR --to mlflow        (same as `itwinai-sync sync SAVEDIR --to mlflow`)
    itwinai-sync ls SAVEDIR [--json]
    itwinai-sync show SAVEDIR RUN
    itwinai-sync verify SAVEDIR
    itwinai-sync plot SAVEDIR [RUN ...] [-o out.png|out.html]
    itwinai-sync tail SAVEDIR [RUN] [-f]
    itwinai-sync export SAVEDIR --format parquet|csv -o DIR
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from itwinai_journal import Journal, RunInfo, __version__, digest, verify
from itwinai_journal.format.segments import JournalCorruption

from .ledger import ledger_entries

# The sync engine, the views, pyarrow.compute and the exporter plugins are imported by the
# commands that use them, so that `ls`, `show` and `verify` start quickly.
if TYPE_CHECKING:
    from .engine import RunResult, SyncEngine


class DefaultToSync(click.Group):
    """`itwinai-sync SAVEDIR ...` means `itwinai-sync sync SAVEDIR ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h",
                                                                     "--version"):
            args = ["sync", *args]
        return super().parse_args(ctx, args)


def _fail(message: str, verbose: bool, code: int = 1) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    if verbose:
        import traceback

        traceback.print_exc()
    sys.exit(code)


@click.group(cls=DefaultToSync, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="itwinai-sync")
def main() -> None:
    """Replay itwinai-journal runs into MLflow, Weights & Biases, TensorBoard or Prov4ML, and
    inspect journals without any tracker.

    Journals are written by the itwinai_journal loggers on compute nodes without network.
    Run `itwinai-sync SAVEDIR --to TARGET` wherever the tracker is reachable; running it again,
    or after killing it, never duplicates a data point.
    """


class SyncCommand(click.Command):
    """The sync command, which also takes every installed exporter's options (--tracking-uri,
    --logdir, ...). Finding and loading the exporter plugins (without their trackers) takes a
    tenth of a second, so it is done when this command is parsed or its help is shown, not when
    the module is imported for `ls`."""

    _plugins_loaded = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            self._add_exporter_options()
        return super().get_params(ctx)

    def _add_exporter_options(self) -> None:
        from .api import exporter_names, load_exporter

        names = exporter_names()
        for param in self.params:
            if param.name == "targets" and isinstance(param, click.Option) and param.help:
                param.help = param.help.format(targets=", ".join(names))
        seen: set[str | None] = set()
        for name in names:
            try:
                options = load_exporter(name).cli_options()
            except click.ClickException:
                continue
            for opt in options:
                if opt.name not in seen:
                    seen.add(opt.name)
                    self.params.append(opt)


@main.command(cls=SyncCommand)
@click.argument("savedir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--to", "targets", multiple=True, metavar="TARGET",
              help="Target to sync to, repeatable ({targets}). Default: the destinations each "
                   "run's loggers declared.")
@click.option("--run", "run_ids", multiple=True, metavar="ID",
              help="Only this run (id or experiment/id), repeatable.")
@click.option("--ranks", type=click.Choice(["all", "0"]), default="all", show_default=True,
              help="Sync every rank, or only rank 0.")
@click.option("--dry-run", is_flag=True, help="Print what would be exported, per run and kind.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Runs synced in parallel.")
@click.option("--watch", is_flag=True,
              help="Follow runs while they are written: sync again every --interval seconds "
                   "until every run has finished. Ctrl-C stops after the batch in progress.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              metavar="S", help="Seconds between passes with --watch.")
@click.option("--verbose", "-v", is_flag=True, help="Tracebacks for errors.")
def sync(savedir: Path, targets: tuple[str, ...], run_ids: tuple[str, ...], ranks: str,
         dry_run: bool, workers: int, watch: bool, interval: float, verbose: bool,
         **options: Any) -> None:
    """Export runs under SAVEDIR to trackers, exactly once."""
    from .api import ExportError
    from .engine import SyncEngine, SyncRequest

    options["ranks"] = ranks
    request = SyncRequest(savedir=savedir, targets=list(targets) or None, options=options,
                          run_ids=list(run_ids) or None, ranks=ranks, dry_run=dry_run,
                          workers=workers)
    started = time.monotonic()
    engine = SyncEngine(request)
    try:
        if watch:
            results = _follow(engine, interval)
        else:
            plan = engine.plan()
            if not plan and not engine.damaged:
                click.echo(f"nothing to sync in {savedir}: no runs"
                           + ("" if targets else " with declared destinations (use --to)"))
                return
            results = _one_pass(engine, plan, show_bar=sys.stderr.isatty() and not dry_run)
    except (ExportError, JournalCorruption, FileNotFoundError) as e:
        _fail(str(e), verbose)
    except click.ClickException:
        raise
    except Exception as e:  # noqa: BLE001
        _fail(f"{type(e).__name__}: {e}", verbose)
    finally:
        engine.close()
    _print_results(results, engine.notes.lines, time.monotonic() - started, verbose, dry_run)
    if any(r.status == "failed" for r in results):
        sys.exit(1)
    if engine.stop.is_set():
        sys.exit(130)


@main.command("live")
@click.argument("savedir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", "run_key", required=True, metavar="EXPERIMENT/RUN_ID",
              help="The run to follow.")
@click.option("--to", "targets", multiple=True, metavar="TARGET",
              help="Target, repeatable. Default: the destinations the run's loggers declared.")
@click.option("--parent", type=click.IntRange(min=1), required=True, metavar="PID",
              help="The training process: followed while it runs, drained after it ends.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              metavar="S", envvar="ITWINAI_SYNC_LIVE_INTERVAL",
              help="Seconds between passes; also the first retry delay after a failure "
                   "(doubled per failure up to 60 s). Env: ITWINAI_SYNC_LIVE_INTERVAL.")
@click.option("--drain", type=click.FloatRange(min=0), default=120.0, show_default=True,
              metavar="S", envvar="ITWINAI_SYNC_LIVE_DRAIN",
              help="After the training process ends, how long to keep trying to export "
                   "what is left. Env: ITWINAI_SYNC_LIVE_DRAIN.")
def live_cmd(savedir: Path, run_key: str, targets: tuple[str, ...], parent: int,
             interval: float, drain: float) -> None:
    """The live sync sidecar of one run, which the loggers start themselves with
    `live_sync=True` or ITWINAI_SYNC_LIVE (see the README): follows the run to its trackers
    while the training process runs, rides out outages, exits after the training does."""
    from .live import LiveSync

    sys.exit(LiveSync(savedir, run_key, list(targets), parent, interval, drain).run())


def _one_pass(engine: SyncEngine, plan: list, show_bar: bool) -> list[RunResult]:
    from .engine import total_pending

    for _, target in plan:
        engine.exporter(target)  # a missing tracker library is one error, before any work
    if not show_bar:
        return engine.run(plan)
    with click.progressbar(length=max(1, total_pending(engine, plan)), label="syncing",
                           file=sys.stderr, show_pos=True) as bar:
        engine.progress = bar.update
        return engine.run(plan)


def _follow(engine: SyncEngine, interval: float) -> list[RunResult]:
    """Sync passes until every run found had finished before a pass began (so that pass
    exported its last records), or until Ctrl-C/SIGTERM, which stop after the batch in progress
    with everything exported so far committed."""
    merged: dict[tuple[str, str], RunResult] = {}

    def on_signal(signum: int, frame: Any) -> None:
        if engine.stop.is_set():
            raise KeyboardInterrupt
        click.echo("stopping after the batch in progress (Ctrl-C again to abort)...", err=True)
        engine.stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        passes = 0
        while not engine.stop.is_set():
            plan = engine.plan()
            # A rank whose writer is gone (killed: its session never ends) counts as ended.
            all_finished = bool(plan) and not any(engine.still_running(run) for run, _ in plan)
            passes += 1
            for r in engine.run(plan):
                _merge(merged, r)
                if r.exported:
                    click.echo(f"[pass {passes}] {r.run} -> {r.target}: exported "
                               f"{_counts(r.exported)}")
            if all_finished:
                break
            engine.stop.wait(interval)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return list(merged.values())


def _merge(merged: dict[tuple[str, str], RunResult], r: RunResult) -> None:
    key = (r.run, r.target)
    if key not in merged:
        merged[key] = r
        return
    m = merged[key]
    m.exported.update(r.exported)
    m.skipped.update(r.skipped)
    m.cursors.update(r.cursors)
    m.where = r.where or m.where
    if r.status in ("failed", "busy"):
        m.status, m.error, m.trace = r.status, r.error, r.trace
    else:
        m.status, m.error, m.trace = ("synced" if m.exported else r.status), None, None


def _counts(counter: Counter) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counter.items())) or "nothing"


def _print_results(results: list[RunResult], notes: list[str], seconds: float, verbose: bool,
                   dry_run: bool) -> None:
    exported: Counter = Counter()
    skipped: Counter = Counter()
    for r in results:
        label = f"{r.run} -> {r.target}"
        if r.status == "failed":
            click.secho(f"FAILED  {label}: {r.error}", fg="red")
            if verbose and r.trace:
                click.echo(r.trace)
            continue
        if r.status == "busy":
            click.secho(f"busy    {label}: {r.error}", fg="yellow")
            continue
        verb = "would export" if dry_run else "exported"
        line = f"{r.status:<11}{label} ({r.where}): {verb} {_counts(r.exported)}"
        if r.skipped:
            line += f"; not for this target: {_counts(r.skipped)}"
        click.echo(line)
        exported.update(r.exported)
        skipped.update(r.skipped)
    for note in notes:
        click.secho(f"note: {note}", fg="cyan")
    failed = sum(r.status == "failed" for r in results)
    total = sum(exported.values())
    rate = f", {total / seconds:,.0f} records/s" if seconds > 0 and total else ""
    click.echo(
        f"{len(results)} run/target pairs, {failed} failed; "
        f"{'would export' if dry_run else 'exported'} {total} records ({_counts(exported)}); "
        f"skipped {sum(skipped.values())}; {seconds:.1f} s{rate}"
    )


# -- inspection ---------------------------------------------------------------------------


_STATUS_ORDER = ("running", "failed", "interrupted", "finished", "empty")


def _ls_rows(savedir: Path) -> list[dict[str, Any]]:
    """One row per run (experiment, run id), with every journal of it: a Prov4MLLogger's own
    journal beside the main one, or journals that merely share an experiment and run id."""
    from itwinai_journal.read.liveness import writer_gone

    from .live import read_status

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


@main.command("ls")
@click.argument("savedir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ls_cmd(savedir: Path, as_json: bool) -> None:
    """List experiments, runs, ranks, status, records and how far each target is synced.

    Record counts come from manifests and indexes (no segment is read), so a run still being
    written may show fewer records than it holds. A damaged run (run.json or a manifest that
    cannot be read) is listed as DAMAGED with the reason; sync skips it."""
    from .live import status_lines

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


@main.command("verify")
@click.argument("savedir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", "run_ids", multiple=True, metavar="ID",
              help="Only this run (id or experiment/id), repeatable.")
@click.option("--expect", metavar="DIGEST",
              help="The digest an earlier verify printed: an error if the journal changed.")
def verify_cmd(savedir: Path, run_ids: tuple[str, ...], expect: str | None) -> None:
    """Check a journal against its own record of itself: segments against the index, the index
    chain and the sessions' records of it, seq continuity, sessions against the records,
    run.json and destinations against the index, blobs against their names. Exit 0 when no
    error is found (warnings such as a torn tail left by a crash are printed), 1 otherwise.

    The digest printed last condenses the journal's state: anyone who can write the journal
    can also rewrite it consistently, so keep the digest where they cannot (the job's output,
    a notebook) and check it later with --expect."""
    runs = [r for r in Journal(savedir).scan()
            if not run_ids or r.run_id in run_ids or r.key in run_ids]
    if run_ids and not runs:
        _fail(f"no run {', '.join(run_ids)} in {savedir}", False)
    problems = verify(savedir, run_ids)
    for p in problems:
        click.secho(str(p), fg="red" if p.severity == "error" else "yellow")
    errors = sum(p.severity == "error" for p in problems)
    warned = len(problems) - errors
    state = digest(savedir, run_ids)
    if expect is not None and expect.strip().lower() != state:
        click.secho(f"error: the digest is {state}, not the expected {expect}: the journal "
                    "changed since that digest was taken", fg="red")
        errors += 1
    click.echo(f"{len(runs)} run(s), {sum(len(r.ranks) for r in runs)} rank(s) checked: "
               f"{errors} error(s), {warned} warning(s)")
    click.echo(f"digest: {state}")
    sys.exit(1 if errors else 0)


@main.command("show")
@click.argument("savedir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("run_id")
def show_cmd(savedir: Path, run_id: str) -> None:
    """Manifest, kinds and counts, and per metric its last value, min, max, point count and a
    sparkline of the whole series, for each rank of one run."""
    import pyarrow.compute as pc

    from .inspect.selection import system_points
    from .inspect.summaries import metric_summary_lines

    journal = Journal(savedir)
    try:
        run = journal.run(run_id)
    except KeyError as e:
        _fail(str(e.args[0]), False)
    except JournalCorruption as e:
        _fail(str(e), False)
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
        click.echo(f"    records: {_counts(kinds)}")
        metrics = mine.filter(pc.equal(mine["kind"], "metric"))
        for line in metric_summary_lines(metrics):
            click.echo(line)
        system = system_points(mine)
        if system.num_rows:
            click.echo("    system metrics (sampled; plot them with --metric 'system/*'):")
            for line in metric_summary_lines(system, indent="      "):
                click.echo(line)


# -- plot, tail, export (logic in inspect/) ---------------------------------------------------


@main.command("plot")
@click.argument("savedir", type=click.Path(exists=True, file_okay=False, path_type=Path))
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
    from .inspect import ViewError
    from .inspect.plot import PlotOptions, plot

    opts = PlotOptions(smooth=smooth, x=x_mode, width=width, height=height, columns=columns)
    try:
        done = plot(Journal(savedir), output, list(run_ids), list(metrics), opts)
    except (ViewError, JournalCorruption) as e:
        _fail(str(e), False)
    click.echo(f"wrote {done['path']}: {done['charts']} metric(s), {done['series']} series, "
               f"{done['points']} points")


@main.command("tail")
@click.argument("savedir", type=click.Path(exists=True, file_okay=False, path_type=Path))
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
    from .inspect import ViewError
    from .inspect.tail import Tail

    tail = Tail(savedir, run_id, metrics)

    def emit(points: list) -> None:
        for p in points:
            click.echo(p.json() if as_json else p.line())

    try:
        if run_id is not None and not tail.runs() and not follow:
            _fail(f"no run {run_id!r} in {savedir}", False)
        emit(tail.poll(last=last))
        while follow:
            time.sleep(interval)
            emit(tail.poll())
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        sys.stderr.close()  # `itwinai-sync tail ... | head`: stop quietly
    except (ViewError, JournalCorruption) as e:
        _fail(str(e), False)


@main.command("export")
@click.argument("savedir", type=click.Path(exists=True, file_okay=False, path_type=Path))
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
    from .inspect import ViewError
    from .inspect.export import export_metrics

    try:
        written = export_metrics(Journal(savedir), out_dir, fmt, list(run_ids))
    except (ViewError, JournalCorruption) as e:
        _fail(str(e), False)
    for run, path, rows in written:
        click.echo(f"{run.key}: {rows} metric points -> {path}")
    if not written:
        click.echo(f"no runs in {savedir}")


if __name__ == "__main__":  # pragma: no cover
    main()
