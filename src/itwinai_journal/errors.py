"""The one root of the errors both packages raise (the compute-node `itwinai_journal` and the
login-node `itwinai_sync`), so that a caller can tell the project's own errors from anything
else with one `except ItwinaiSyncError`. Each error lives beside the code that raises it and
derives from this root, keeping the built-in base its callers already catch
(`JournalWriteError` is an OSError, `NotAPlainMetric` a TypeError).

This module imports nothing, so every module of both packages, the format package included,
may import it without creating an import cycle.
"""

from __future__ import annotations


class ItwinaiSyncError(Exception):
    """An error of itwinai-sync: its message is one line that names the problem."""


class UsageError(ItwinaiSyncError):
    """A request that names something that does not exist or does not fit together (an
    unknown target, an option no chosen target takes): the command line reports it as a
    usage error (exit code 2), as it does for its own options."""
