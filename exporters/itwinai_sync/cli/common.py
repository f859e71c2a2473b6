"""What the commands share, among it the one place where the project's errors become the
command line's messages and exit codes: library code raises its own errors (all derived from
`itwinai_journal.errors.ItwinaiSyncError`), never click's."""

from __future__ import annotations

import sys
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click

from itwinai_journal.errors import ItwinaiSyncError, UsageError

#: The SAVEDIR argument of every command: an existing directory.
SAVEDIR = click.Path(exists=True, file_okay=False, path_type=Path)


def fail(message: str, verbose: bool = False, code: int = 1) -> NoReturn:
    """End the command with one red line `error: <message>` (and, with -v, the traceback of
    the exception being handled)."""
    click.secho(f"error: {message}", fg="red", err=True)
    if verbose:
        traceback.print_exc()
    sys.exit(code)


@contextmanager
def reported_errors(verbose: bool = False, also: tuple[type[BaseException], ...] = (),
                    unexpected: bool = False) -> Iterator[None]:
    """Report the project's errors raised in the block as the command line does: a request
    that does not fit (UsageError: an unknown target, an option no chosen target takes) as
    click's usage error (exit code 2); any other, and the exceptions in `also`, as one line
    (exit code 1). With `unexpected`, any other exception too, as one line with its type."""
    try:
        yield
    except UsageError as e:
        raise click.UsageError(str(e)) from e
    except (ItwinaiSyncError, *also) as e:
        fail(str(e), verbose)
    except click.ClickException:
        raise
    except Exception as e:
        if not unexpected:
            raise
        fail(f"{type(e).__name__}: {e}", verbose)


def counts(counter: Counter) -> str:
    """`3 metric, 1 param`: how many records of each kind."""
    return ", ".join(f"{n} {k}" for k, n in sorted(counter.items())) or "nothing"
