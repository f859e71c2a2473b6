"""`python -m itwinai_sync.cli`: the `itwinai-sync` command, as the loggers start the live
sync sidecar (see `itwinai_journal.writer.live`)."""

from itwinai_sync.cli import main

main()
