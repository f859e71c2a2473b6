"""`itwinai-sync verify`: check journals against their own record of themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from itwinai_journal import Journal, digest, verify
from itwinai_journal.read.journal import runs_named

from .common import SAVEDIR, fail


@click.command("verify")
@click.argument("savedir", type=SAVEDIR)
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
    runs = runs_named(Journal(savedir).scan(), run_ids)
    if run_ids and not runs:
        fail(f"no run {', '.join(run_ids)} in {savedir}")
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
