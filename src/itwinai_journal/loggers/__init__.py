"""Drop-in replacements for `itwinai.loggers` that write a local journal instead of calling a
tracker. Same classes, constructor parameters, defaults, attributes, `supported_kinds`,
`should_log`, errors and warnings as itwinai 0.4.2; the journal is replayed into the trackers
later by `itwinai-sync`.

The rule: whatever a call does with itwinai's loggers, it does here at `log()` time, except
contact a tracker. A call itwinai accepts is journaled as what the tracker would have received;
a call itwinai ignores is ignored (with one warning per kind or name where itwinai is silent);
where itwinai raises, the journal may be more forgiving, says so in one warning, and journals
something faithful. Only what would corrupt the journal or leave savedir raises. The remaining
differences are listed in the README ("Migrating from itwinai.loggers").

Modules: `base` (itwinai's abstract API), `journal` (the journal-writing base every logger
shares), one module per backend (`mlflow`, `wandb`, `tensorboard`, `prov4ml`, `console` with
`EmptyLogger`), `collection` (`LoggersCollection`), and `lightning` (the PyTorch Lightning
adapter, imported only by the code that uses it).
"""

from __future__ import annotations

from .base import (
    BASE_EXP_NAME,
    JournalWarning,
    Logger,
    LogMixin,
    check_initialized,
    check_not_initialized,
    py_logger,
)
from .collection import LoggersCollection, get_mlflow_logger
from .console import ConsoleLogger, EmptyLogger
from .mlflow import MLFlowLogger
from .prov4ml import Prov4MLLogger
from .tensorboard import TensorBoardLogger
from .wandb import WandBLogger

__all__ = [
    "BASE_EXP_NAME", "LogMixin", "Logger", "ConsoleLogger", "MLFlowLogger", "WandBLogger",
    "TensorBoardLogger", "Prov4MLLogger", "LoggersCollection", "EmptyLogger",
    "get_mlflow_logger", "check_initialized", "check_not_initialized", "py_logger",
    "JournalWarning",
]
