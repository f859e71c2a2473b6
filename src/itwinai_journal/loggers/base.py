"""itwinai's abstract logger API (`LogMixin`, `Logger`, the initialisation decorators), as in
itwinai 0.4.2, and what the loggers of this package share about it: which methods a user may
replace (the hooks), how a replaced hook is noticed, and how they warn."""

from __future__ import annotations

import functools
import logging
import pickle
import sys
import warnings
import weakref
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from itwinai_journal.format import names

BASE_EXP_NAME: str = "unnamed-experiment"

#: The package's logger, as itwinai's `itwinai.loggers` one: the double-initialisation notice
#: and ConsoleLogger's output go through it, so log levels and handlers control them.
py_logger = logging.getLogger("itwinai_journal.loggers")

LogFreq = int | Literal["epoch", "batch"]

#: Methods a user may override (in a subclass, or by replacing them on a class or an instance,
#: as `mock.patch.object` does). The metric fast path inlines the first four, so a logger
#: whose class or instance replaces any of them always goes through them; a LoggersCollection
#: writes a record once for the members that replace none of the five, and calls the others'
#: own methods. See `own_hooks`.
FAST_PATH_HOOKS = ("should_log", "log", "create_logger_context", "destroy_logger_context")
HOOKS = FAST_PATH_HOOKS + ("save_hyperparameters",)
#: Attributes should_log reads besides log_freq (whose setter says so itself).
STATE = frozenset({"is_initialized", "worker_rank", "log_on_workers"})
#: Every journal logger alive, told when a hook is replaced on a class (see `_HookWatch`).
live_loggers: weakref.WeakSet[Logger] = weakref.WeakSet()
#: This package's own function for each hook, in every class of it (see `own_hooks`): filled
#: as the package's classes are defined (`LogMixin.__init_subclass__`).
_OWN_HOOKS: dict[str, set[Any]] = {name: set() for name in HOOKS}


class _HookWatch(ABCMeta):
    """The loggers' metaclass (an ABCMeta, as itwinai's loggers are ABCs). Replacing a hook on
    a class after loggers computed their fast path (`MLFlowLogger.should_log = ...`,
    `mock.patch.object(MLFlowLogger, "should_log", ...)` and its undoing) makes every live
    logger compute it again, so that nothing is checked per call."""

    def __setattr__(cls, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in HOOKS:
            _hooks_replaced()

    def __delattr__(cls, name: str) -> None:
        super().__delattr__(name)
        if name in HOOKS:
            _hooks_replaced()


def _hooks_replaced() -> None:
    for logger in list(live_loggers):
        logger._state_changed()


class LogMixin(ABC, metaclass=_HookWatch):
    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Record the hooks a class of this package defines as its own (a user's subclass,
        defined elsewhere, replaces them)."""
        super().__init_subclass__(**kwargs)
        if cls.__module__.startswith(__package__ + "."):
            for name in HOOKS:
                if name in vars(cls):
                    _OWN_HOOKS[name].add(vars(cls)[name])

    @abstractmethod
    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None, **kwargs: Any) -> None:
        """Log `item` with `identifier` name of `kind` type at `step` time step."""


def not_initialized_error(logger: Logger) -> RuntimeError:
    """itwinai's error for a logger used before its initialization (or after its destroy)."""
    return RuntimeError(f"{logger.__class__.__name__} has not been initialized. Use either the"
                        " ``start_logging`` context or the ``create_logger_context`` method.")


def check_initialized(method: Callable) -> Callable:
    """Decorator for logger methods to check whether the logger was correctly initialized
    before calling the method (itwinai's wording)."""

    @functools.wraps(method)
    def wrapper(self: Logger, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            raise not_initialized_error(self)
        return method(self, *args, **kwargs)

    return wrapper


def check_not_initialized(method: Callable) -> Callable:
    """Decorator for `create_logger_context`: a second initialization logs a warning through
    `py_logger` and does nothing, as in itwinai."""

    @functools.wraps(method)
    def wrapper(self: Logger, *args: Any, **kwargs: Any) -> Any:
        if self.is_initialized:
            py_logger.warning(f"Trying to initialize {self.__class__.__name__} twice.. "
                              "Skipping initialization.")
            return None
        return method(self, *args, **kwargs)

    return wrapper


def own_hooks(logger: Logger, hooks: tuple[str, ...] = HOOKS) -> bool:
    """Whether `logger` runs this package's own function for each of `hooks`: by identity, so
    that a user subclass overriding one, a function put on a class or on the instance (a
    patch, a mock) all count as replaced."""
    own = vars(logger)
    cls = type(logger)
    return all(name not in own and getattr(cls, name, None) in _OWN_HOOKS[name]
               for name in hooks)


class JournalWarning(UserWarning):
    """A call handled differently from itwinai 0.4.2's loggers, said once per logger and kind
    or name (filter with `warnings.filterwarnings("ignore", category=JournalWarning)`)."""


def warn_from_caller(message: str, category: type[Warning] = JournalWarning) -> None:
    """Warn, pointing at the first caller outside this package (the training code)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("itwinai_journal"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class Logger(LogMixin):
    """Base class for loggers (abstract, as in itwinai).

    Args:
        savedir: filesystem location where logs are stored. Defaults to 'mllogs'.
        log_freq: 'epoch' (log only calls without batch_idx), 'batch' (log always) or an int n
            (log calls whose batch_idx is a multiple of n, and calls without batch_idx).
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
        experiment_id: experiment the run belongs to.
        run_id: id of the run.
    """

    #: Location on filesystem where to store data.
    savedir: Path
    #: Supported logging 'kind's.
    supported_kinds: tuple[str, ...]
    #: Current worker global rank
    worker_rank: int = 0
    #: Flag to check whether the logger was correctly initialized
    is_initialized: bool = False

    def __init__(self, savedir: Path | str = "mllogs", log_freq: LogFreq = "epoch",
                 log_on_workers: int | list[int] = 0, experiment_id: str | None = None,
                 run_id: int | str | None = None) -> None:
        self.savedir = Path(savedir)
        self.log_freq = log_freq
        self.log_on_workers = log_on_workers
        self._experiment_id = experiment_id
        self._run_id = run_id

    @property
    def experiment_id(self) -> str | None:
        """Return the experiment id."""
        return self._experiment_id

    @property
    def run_id(self) -> int | str | None:
        """Return the id of the current run."""
        return self._run_id

    @property
    def log_freq(self) -> LogFreq:
        """Get `log_freq`, namely how often should the logger fulfill or ignore calls to the
        `log()` method."""
        return self._log_freq

    @log_freq.setter
    def log_freq(self, val: LogFreq) -> None:
        if val in ("epoch", "batch") or (isinstance(val, int) and val > 0):
            self._log_freq = val
            self._state_changed()
        else:
            raise ValueError(
                "Wrong value for 'log_freq'. Supported values are: "
                f"['epoch', 'batch'] or int > 0. Received: {val}"
            )

    def _state_changed(self) -> None:
        """Something `should_log` reads changed (journal loggers recompute their fast path)."""

    @contextmanager
    def start_logging(self, rank: int = 0) -> Iterator[None]:
        """Start logging context.

        >>> with my_logger.start_logging():
        >>>     my_logger.log(123, 'value', kind='metric', step=0)
        """
        try:
            self.create_logger_context(rank=rank)
            yield
        finally:
            self.destroy_logger_context()

    @abstractmethod
    def create_logger_context(self, rank: int = 0, **kwargs: Any) -> Any:
        """Initializes the logger context."""

    @abstractmethod
    def destroy_logger_context(self) -> None:
        """Destroy logger."""

    @abstractmethod
    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        """Save hyperparameters."""

    def serialize(self, obj: Any, identifier: str) -> str:
        """Pickle `obj` to `savedir/identifier` and return that path (itwinai returns None).
        Refuses identifiers that would write outside savedir (absolute paths, '..')."""
        rel = names.safe_relpath(identifier, "serialize identifier")
        path = self.savedir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        return str(path)

    def should_log(self, batch_idx: int | None = None) -> bool:
        """Whether a `log()` call is fulfilled, exactly as in itwinai: the rank must be allowed
        by `log_on_workers` (-1 or the rank itself given as an int, or a list holding the
        rank: a list does not read -1 as 'all', and a tuple allows no rank); then a call
        without `batch_idx` is logged, and one with it when `log_freq` is 'batch' or an int
        dividing it ('epoch': never)."""
        workers = self.log_on_workers
        worker_ok = (
            isinstance(workers, int) and (workers == -1 or workers == self.worker_rank)
        ) or (isinstance(workers, list) and self.worker_rank in workers)
        if not worker_ok:
            return False
        if batch_idx is None:
            return True
        if isinstance(self.log_freq, int):
            return batch_idx % self.log_freq == 0
        return self.log_freq == "batch"

