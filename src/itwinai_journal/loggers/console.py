"""`ConsoleLogger` (metrics to the Python log, and to the journal) and `EmptyLogger` (the
placeholder that does nothing), as in itwinai."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .base import LogFreq, Logger, check_initialized, py_logger
from .journal import JournalOptions, _JournalLogger, journal_options

if TYPE_CHECKING:
    from typing_extensions import Unpack


class ConsoleLogger(_JournalLogger):
    """Simplified logger: logs metrics through `py_logger` (as itwinai), and records them and
    the artifacts and torch objects in the journal.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'; the `savedir` attribute
            is `savedir/simple-logger`, as in itwinai.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
    """

    supported_kinds: tuple[str, ...] = ("torch", "artifact", "metric")
    target = "console"
    saves_hyperparameters = False
    echoes = True
    savedir_name = "simple-logger"

    def __init__(self, savedir: Path | str = "mllogs", log_freq: LogFreq = "epoch",
                 log_on_workers: int | list[int] = 0,
                 **options: Unpack[JournalOptions]) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         **journal_options("ConsoleLogger", options))

    @check_initialized
    def destroy_logger_context(self) -> None:
        """Flush and close the journal session. itwinai's ConsoleLogger does nothing here and
        stays initialized, so it can still log: a later call opens the journal again."""
        self._close("finished")
        self.is_initialized = True

    def _ignores(self, item: Any, kind: str) -> bool:
        """itwinai's ConsoleLogger copies artifacts that are files or directories; it logs a
        notice for anything else and ignores it."""
        if kind != "artifact" or _is_existing_path(item):
            return False
        py_logger.info(
            "The ConsoleLogger expects an artifact to be either a path or a directory "
            f"Received instead an item of type {type(item)}. The item will be ignored "
            "and not logged.")
        return True

    def _echo(self, item: Any, identifier: str, kind: str, step: int | None) -> None:
        if kind == "metric":
            py_logger.info(f"ConsoleLogger: {identifier} = {item}")
        elif kind == "torch":
            py_logger.info(f"ConsoleLogger saved {identifier} to the journal...")


def _is_existing_path(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike)) and (Path(item).is_file()
                                                      or Path(item).is_dir())


class EmptyLogger(Logger):
    """Dummy logger which can be used as a placeholder when a real logger is not available.
    All methods do nothing (as in itwinai, it is never marked initialized)."""

    supported_kinds: tuple[str, ...] = ()

    def __init__(self, savedir: Path | str = "mllogs",
                 log_freq: int | Literal["epoch"] | Literal["batch"] = "epoch",
                 log_on_workers: int | list[int] = 0) -> None:
        super().__init__(savedir, log_freq, log_on_workers)

    def create_logger_context(self, rank: int = 0, **kwargs: Any) -> None:
        pass

    def destroy_logger_context(self) -> None:
        pass

    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        pass

    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None, **kwargs: Any) -> None:
        pass


