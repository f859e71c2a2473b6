"""`itwinai-sync`: replay journals into trackers, and look at them without one.

    itwinai-sync SAVEDIR --to mlflow        (same as `itwinai-sync sync SAVEDIR --to mlflow`)
    itwinai-sync live SAVEDIR --run EXP/RUN --parent PID     (started by the loggers)
    itwinai-sync ls SAVEDIR [--json]
    itwinai-sync show SAVEDIR RUN
    itwinai-sync verify SAVEDIR
    itwinai-sync plot SAVEDIR [RUN ...] [-o out.png|out.html]
    itwinai-sync tail SAVEDIR [RUN] [-f]
    itwinai-sync export SAVEDIR --format parquet|csv -o DIR

One module per family of commands: `sync` (and the target options it takes, `options`), `live`
(the live sync sidecar), `inspection` (ls, show, plot, tail, export), `verify`; `common` holds
what they share, among it the one place where the project's errors become messages and exit
codes. `python -m itwinai_sync.cli` is the same command (the loggers start the sidecar so).
"""

from __future__ import annotations

import click

from itwinai_journal import __version__

from .inspection import export_cmd, ls_cmd, plot_cmd, show_cmd, tail_cmd
from .live import live_cmd
from .sync import sync
from .verify import verify_cmd

__all__ = ["main"]


class DefaultToSync(click.Group):
    """`itwinai-sync SAVEDIR ...` means `itwinai-sync sync SAVEDIR ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h",
                                                                     "--version"):
            args = ["sync", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToSync, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="itwinai-sync")
def main() -> None:
    """Replay itwinai-journal runs into MLflow, Weights & Biases, TensorBoard or Prov4ML, and
    inspect journals without any tracker.

    Journals are written by the itwinai_journal loggers on compute nodes without network.
    Run `itwinai-sync SAVEDIR --to TARGET` wherever the tracker is reachable; running it again,
    or after killing it, never duplicates a data point.
    """


for _command in (sync, live_cmd, ls_cmd, show_cmd, verify_cmd, plot_cmd, tail_cmd, export_cmd):
    main.add_command(_command)
