"""PyTorch Lightning adapter: a Lightning `Logger` that writes through an itwinai_journal logger.

    from itwinai_journal.loggers import MLFlowLogger
    from itwinai_journal.loggers.lightning import JournalLogger

    logger = JournalLogger(MLFlowLogger(savedir="mllogs", experiment_name="mnist"))
    trainer = lightning.Trainer(logger=logger, ...)

Everything Lightning logs (`self.log(...)` metrics with the trainer's step, the module's
`save_hyperparameters()`, every checkpoint `ModelCheckpoint` saves) goes into the journal, which
`itwinai-sync` replays into the trackers the wrapped logger declares. `logger.experiment` is the
wrapped itwinai logger, for the kinds Lightning has no method for
(`trainer.logger.experiment.log(fig, "confusion", kind="figure")`).

Works with `lightning` (`lightning.pytorch`) or, when that is not installed, the older
`pytorch_lightning` package; what it uses of Lightning's private API is in
`itwinai_journal.compat`, with the versions it was tested with. This module is imported only by
the code that uses it: `import itwinai_journal.loggers` never imports Lightning.
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path
from typing import Any

from itwinai_journal import compat

from .base import BASE_EXP_NAME, Logger
from .journal import _JournalLogger

_lightning = compat.lightning()

#: Lightning's finalize statuses -> journal session statuses.
_STATUS = {"success": "finished", "finished": "finished", "failed": "failed",
           "interrupted": "interrupted"}


class JournalLogger(_lightning.Logger):  # type: ignore[misc,name-defined]
    """A Lightning logger writing into an itwinai_journal journal through `logger`.

    Args:
        logger: any itwinai_journal logger (`MLFlowLogger`, `WandBLogger`, `TensorBoardLogger`,
            `LoggersCollection`, ...). If it is not initialized yet, the adapter opens it for
            the process's global rank when Lightning first needs it and closes it in
            `finalize`; if it is already open (`with logger.start_logging(rank):` around
            `trainer.fit`), the adapter only writes through it and leaves closing to you.
        log_checkpoints: log every checkpoint file `ModelCheckpoint` saves (the last, the best
            and the top-k, each new version once) as an `artifact` named
            `checkpoints/<file name>`, with its monitor score, tag, epoch and step in the
            record. The wrapped logger must support the `artifact` kind (MLFlowLogger,
            ConsoleLogger, a LoggersCollection holding one); others skip it with a warning.
        prefix: put in front of every metric name, joined with `group_separator` ('/').

    `name` is the journal experiment, `version` the journal run id, so with no explicit
    `dirpath` `ModelCheckpoint` saves to `<default_root_dir>/<experiment>/<run id>/checkpoints`.
    Metrics are logged with the trainer's step on every rank the wrapped logger's
    `log_on_workers` allows (one journal per rank; Lightning's own loggers write on rank 0
    only). Hyperparameters are flattened (`{"opt": {"lr": 1}}` -> `opt/lr`), callables become
    their names, and each is a `param` record.
    """

    def __init__(self, logger: Logger, log_checkpoints: bool = True, prefix: str = "") -> None:
        super().__init__()
        if not isinstance(logger, Logger):
            raise TypeError(f"JournalLogger wraps an itwinai_journal logger, got "
                            f"{type(logger).__name__}")
        self._logger = logger
        self._log_checkpoints = log_checkpoints
        self._prefix = prefix
        self._owns = False  # whether this adapter opened the logger (and so closes it)
        self._logged_checkpoints: dict[str, float] = {}

    # -- identity ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The journal experiment."""
        return self._logger.journal_experiment() if isinstance(self._logger, _JournalLogger) \
            else BASE_EXP_NAME

    @property
    def version(self) -> str:
        """The journal run id (resolved, and the journal opened, on first use)."""
        if self._logger.run_id is None:
            self._ensure_open()
        return str(self._logger.run_id)

    @property
    def experiment(self) -> Logger:
        """The wrapped itwinai_journal logger, opened: log any kind through it."""
        self._ensure_open()
        return self._logger

    @property
    def save_dir(self) -> str | None:
        """None: the journal is not a place for checkpoints, so Lightning puts them under
        the trainer's `default_root_dir` (and the adapter copies them into the journal)."""
        return None

    @property
    def root_dir(self) -> str:
        """The directory the journal is written under (the wrapped logger's `savedir`
        argument; its `savedir` attribute is itwinai's, e.g. `<savedir>/mlflow`)."""
        return str(getattr(self._logger, "journal_savedir", self._logger.savedir))

    @property
    def log_dir(self) -> str:
        """This run's directory in the journal."""
        from itwinai_journal.format.names import experiment_dirname

        return os.path.join(self.root_dir, experiment_dirname(self.name), self.version)

    # -- opening and closing -------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._logger.is_initialized:
            return
        rank = int(getattr(_lightning.rank_zero_only, "rank", 0) or 0)
        self._logger.create_logger_context(rank=rank)
        self._owns = True

    def save(self) -> None:
        """Have the records logged so far written to the active segment (Lightning calls this
        after each `log_metrics`): the journal's flusher thread is woken, the step does not wait
        for it."""
        if isinstance(self._logger, _JournalLogger):
            self._logger.flush(wait=False)

    def finalize(self, status: str) -> None:
        """End of fit/validate/test: flush, and close the session if this adapter opened it
        ('success' -> finished, 'failed' -> failed). A later `trainer.test()` with the same
        adapter opens a new session of the same run."""
        if not self._logger.is_initialized:
            return
        if self._owns:
            if isinstance(self._logger, _JournalLogger):
                self._logger.end_session(_STATUS.get(status, "finished"))
            else:
                self._logger.destroy_logger_context()
            self._owns = False
        else:
            self.save()

    # -- logging -------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._ensure_open()
        sep = self.group_separator
        for name, value in metrics.items():
            key = f"{self._prefix}{sep}{name}" if self._prefix else name
            self._logger.log(value, key, kind="metric", step=None if step is None
                             else int(step))

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any,
                        **kwargs: Any) -> None:
        self._ensure_open()
        flat = _lightning.flat_params(params)
        if flat:
            self._logger.save_hyperparameters(flat)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Log each checkpoint file that is new or was rewritten since the last call."""
        if not self._log_checkpoints:
            return
        self._ensure_open()
        for mtime, path, score, tag in _lightning.scan_checkpoints(checkpoint_callback,
                                                                   self._logged_checkpoints):
            extra: dict[str, Any] = {"tag": tag}
            if score is not None:
                extra["score"] = float(score)
                extra["monitor"] = getattr(checkpoint_callback, "monitor", None)
            step = compat.last_global_step_saved(checkpoint_callback)
            self._logger.log(str(path), f"checkpoints/{Path(path).name}", kind="artifact",
                             step=step, checkpoint=extra)
            self._logged_checkpoints[path] = mtime


__all__ = ["JournalLogger"]
