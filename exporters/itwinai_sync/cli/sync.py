"""`itwinai-sync sync SAVEDIR --to TARGET`: export runs to trackers, exactly once, in one pass
or following them with --watch. Each target's options come from its declaration (see
`options`)."""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..api import exporter_names
from .common import SAVEDIR, counts, reported_errors
from .options import click_options, declared_options, options_by_target

# The sync engine, pyarrow.compute and the exporter plugins are imported when this command
# runs (or its options are listed), so that `ls`, `show` and `verify` start quickly.
if TYPE_CHECKING:
    from ..engine import RunResult, SyncEngine


class SyncCommand(click.Command):
    """The sync command, which also takes every installed target's options (--tracking-uri,
    --logdir, ...). Finding and loading the exporter plugins (without their trackers) takes
    tens of milliseconds the first time, so it is done when this command is parsed or its help
    is shown, not when the module is imported for `ls`."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        if "target_params" not in ctx.meta:
            reserved = {flag for p in params for flag in (*p.opts, *p.secondary_opts)}
            ctx.meta["target_options"] = declared_options()
            ctx.meta["target_params"] = click_options(ctx.meta["target_options"], reserved)
        # The targets' options after the command's own, before --help.
        return [*self.params, *ctx.meta["target_params"], *params[len(self.params):]]


class TargetsOption(click.Option):
    """`--to`, whose help lists the installed targets (found when the help is shown)."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        return record[0], record[1].replace("{targets}", ", ".join(exporter_names()))


@click.command(cls=SyncCommand)
@click.argument("savedir", type=SAVEDIR)
@click.option("--to", "targets", multiple=True, metavar="TARGET", cls=TargetsOption,
              help="Target to sync to, repeatable ({targets}). Default: the destinations each "
                   "run's loggers declared.")
@click.option("--run", "run_ids", multiple=True, metavar="ID",
              help="Only this run (id or experiment/id), repeatable.")
@click.option("--ranks", type=click.Choice(["all", "0"]), default="all", show_default=True,
              help="Sync every rank, or only rank 0.")
@click.option("--dry-run", is_flag=True, help="Print what would be exported, per run and kind.")
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Runs, and ranks of one run, synced in parallel (MLflow: also the "
                   "number of request streams).")
@click.option("--watch", is_flag=True,
              help="Follow runs while they are written: sync again every --interval seconds "
                   "until every run has finished. Ctrl-C stops after the batch in progress.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              metavar="S", help="Seconds between passes with --watch.")
@click.option("--verbose", "-v", is_flag=True, help="Tracebacks for errors.")
def sync(savedir: Path, targets: tuple[str, ...], run_ids: tuple[str, ...], ranks: str,
         dry_run: bool, workers: int, watch: bool, interval: float, verbose: bool) -> None:
    """Export runs under SAVEDIR to trackers, exactly once."""
    from ..engine import SyncEngine, SyncRequest

    meta = click.get_current_context().meta
    with reported_errors(verbose):
        options = options_by_target(meta["target_options"], meta.get("given_flags", {}),
                                    list(targets) if targets else None)
    request = SyncRequest(savedir=savedir, targets=list(targets) or None, options=options,
                          run_ids=list(run_ids) or None, ranks=ranks, dry_run=dry_run,
                          workers=workers)
    started = time.monotonic()
    engine = SyncEngine(request)
    try:
        with reported_errors(verbose, also=(FileNotFoundError,), unexpected=True):
            if watch:
                results = _follow(engine, interval)
            else:
                plan = engine.plan()
                if not plan and not engine.damaged:
                    click.echo(f"nothing to sync in {savedir}: no runs"
                               + ("" if targets else " with declared destinations (use --to)"))
                    return
                results = _one_pass(engine, plan, show_bar=sys.stderr.isatty() and not dry_run)
    finally:
        engine.close()
    _print_results(results, engine.notes.lines, time.monotonic() - started, verbose, dry_run)
    if any(r.status == "failed" for r in results):
        sys.exit(1)
    if engine.stop.is_set():
        sys.exit(130)


def _one_pass(engine: SyncEngine, plan: list, show_bar: bool) -> list[RunResult]:
    from ..engine import total_pending

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
                               f"{counts(r.exported)}")
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
        line = f"{r.status:<11}{label} ({r.where}): {verb} {counts(r.exported)}"
        if r.skipped:
            line += f"; not for this target: {counts(r.skipped)}"
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
        f"{'would export' if dry_run else 'exported'} {total} records ({counts(exported)}); "
        f"skipped {sum(skipped.values())}; {seconds:.1f} s{rate}"
    )
