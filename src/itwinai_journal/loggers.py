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
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import pickle
import sys
import time
import warnings
import weakref
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from itwinai_journal.format import names
from itwinai_journal.format.schema import ALL_KINDS, INT64_MAX, INT64_MIN
from itwinai_journal.writer import live
from itwinai_journal.writer.rank import (
    BACKLOG,
    JournalWriteError,
    RankWriter,
    open_writer,
    release_writer,
)

from . import measure, sysmetrics
from .capture import (
    NotAPlainMetric,
    capture_image,
    index_value,
    json_text_fields,
    metric_fields,
    metric_value,
    module_of,
    numpy_image_layout,
)
from .kinds import CAPTURE

BASE_EXP_NAME: str = "unnamed-experiment"

#: The module's logger, as itwinai's: the double-initialisation notice and ConsoleLogger's
#: output go through it, so log levels and handlers control them.
py_logger = logging.getLogger(__name__)

LogFreq = int | Literal["epoch", "batch"]
_now = time.time
#: The metric fast paths take a step or batch_idx within COMPACT_MIN..COMPACT_MAX: CPython
#: compares ints of one 30-bit digit fastest (its specialised int comparison); larger ones take
#: `_log`, which checks the int64 range. Both bounds are names: `-COMPACT_MAX` would make a new
#: int at every call.
COMPACT_MAX = (1 << 30) - 1
COMPACT_MIN = -COMPACT_MAX

#: Kinds whose tracker call takes no label in itwinai (Prov4ML measures the system and the
#: carbon footprint and writes its documents; W&B's watch and MLflow's log_input name nothing):
#: with `identifier=None` they are journaled under the kind's name, silently.
LABEL_FREE_KINDS = ("system", "carbon", "prov_documents", "watch", "dataset")

#: The contexts of yProv4ML (`yprov4ml.Context`), by the lower-case name the journal stores.
PROV4ML_CONTEXTS = ("training", "validation", "testing", "datasets", "models")
#: Prov4MLLogger.log's default context, as in itwinai. A record in it carries no context in its
#: meta: the Prov4ML export puts a record without one in this context.
DEFAULT_CONTEXT = "training"

#: Methods a user may override (in a subclass, or by replacing them on a class or an instance,
#: as `mock.patch.object` does). The metric fast path inlines the first four, so a logger
#: whose class or instance replaces any of them always goes through them; a LoggersCollection
#: writes a record once for the members that replace none of the five, and calls the others'
#: own methods. See `_own_hooks`.
_FAST_PATH_HOOKS = ("should_log", "log", "create_logger_context", "destroy_logger_context")
_HOOKS = _FAST_PATH_HOOKS + ("save_hyperparameters",)
#: Attributes should_log reads besides log_freq (whose setter says so itself).
_STATE = frozenset({"is_initialized", "worker_rank", "log_on_workers"})
#: Every journal logger alive, told when a hook is replaced on a class (see `_HookWatch`).
_live: weakref.WeakSet[_JournalLogger] = weakref.WeakSet()


class _HookWatch(ABCMeta):
    """The loggers' metaclass (an ABCMeta, as itwinai's loggers are ABCs). Replacing a hook on
    a class after loggers computed their fast path (`MLFlowLogger.should_log = ...`,
    `mock.patch.object(MLFlowLogger, "should_log", ...)` and its undoing) makes every live
    logger compute it again, so that nothing is checked per call."""

    def __setattr__(cls, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _HOOKS:
            _hooks_replaced()

    def __delattr__(cls, name: str) -> None:
        super().__delattr__(name)
        if name in _HOOKS:
            _hooks_replaced()


def _hooks_replaced() -> None:
    for logger in list(_live):
        logger._state_changed()


class LogMixin(ABC, metaclass=_HookWatch):
    @abstractmethod
    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None, **kwargs: Any) -> None:
        """Log `item` with `identifier` name of `kind` type at `step` time step."""


def _not_initialized(logger: Logger) -> RuntimeError:
    """itwinai's error for a logger used before its initialization (or after its destroy)."""
    return RuntimeError(f"{logger.__class__.__name__} has not been initialized. Use either the"
                        " ``start_logging`` context or the ``create_logger_context`` method.")


def check_initialized(method: Callable) -> Callable:
    """Decorator for logger methods to check whether the logger was correctly initialized
    before calling the method (itwinai's wording)."""

    @functools.wraps(method)
    def wrapper(self: Logger, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            raise _not_initialized(self)
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


def _own_hooks(logger: Logger, hooks: tuple[str, ...] = _HOOKS) -> bool:
    """Whether `logger` runs this module's own function for each of `hooks`: by identity, so
    that a user subclass overriding one, a function put on a class or on the instance (a
    patch, a mock) all count as replaced. `_OWN_HOOKS` is filled at the end of the module."""
    own = vars(logger)
    cls = type(logger)
    return all(name not in own and getattr(cls, name, None) in _OWN_HOOKS[name]
               for name in hooks)


def _world_size() -> int:
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


class JournalWarning(UserWarning):
    """A call handled differently from itwinai 0.4.2's loggers, said once per logger and kind
    or name (filter with `warnings.filterwarnings("ignore", category=JournalWarning)`)."""


def _warn(message: str, category: type[Warning] = JournalWarning) -> None:
    """Warn, pointing at the first caller outside this package (the training code)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(__package__):
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


class _JournalLogger(Logger):
    """What every logger of this module shares: the journal of one rank of one run, opened by
    `create_logger_context` when itwinai would initialise its tracker, and the `log()` path.

    The journal is `<journal_savedir>/<experiment>/<run_id>/rank-<r>/`; `journal_savedir` is
    the `savedir` given to the constructor, while the `savedir` attribute is itwinai's (for
    example `<savedir>/mlflow`), so code that reads it finds what it found with itwinai.
    Extra keyword-only options: `run_id` (else ITWINAI_RUN_ID, the launcher, rank 0 through
    torch.distributed, or a new time-sortable id), `flush_interval` (seconds after which a
    record survives SIGKILL, default 1), `strict` (raise on journal write errors),
    `system_metrics_interval` (seconds between background system-metrics samples, 0 for none;
    default ITWINAI_SYSTEM_METRICS_INTERVAL, else 10: see sysmetrics.py).
    `live_sync` (sync to the trackers while the job runs, from a sidecar process: see
    itwinai_journal.writer.live; default: the ITWINAI_SYNC_LIVE variable, else off).
    """

    supported_kinds: tuple[str, ...] = ()
    #: Name of the tracker this logger declares as a destination.
    target: str = "journal"
    #: Whether save_hyperparameters records anything (ConsoleLogger's does nothing).
    saves_hyperparameters: bool = True
    #: Whether `_echo` does something (then metrics skip the inlined hot path).
    echoes: bool = False
    #: Kinds recorded although they are not in `supported_kinds` (which must match the
    #: reference): itwinai's Prov4MLLogger.log handles 'prov_documents' without listing it.
    extra_kinds: tuple[str, ...] = ()
    #: Subdirectory of savedir that itwinai's logger uses as its `savedir`.
    savedir_name: str | None = None
    #: How a 3-D numpy image is read (the tracker's convention; see numpy_image_layout).
    numpy_image_layout = "HWC"
    #: Whether itwinai's tracker takes any object for every supported kind (W&B logs whatever
    #: it is given): then an object a kind's capture cannot take is journaled as its JSON.
    takes_any_object = False

    def __init__(self, savedir: Path | str = "mllogs", log_freq: LogFreq = "epoch",
                 log_on_workers: int | list[int] = 0, experiment_id: str | None = None,
                 run_id: int | str | None = None, *, flush_interval: float | None = None,
                 strict: bool = False, system_metrics_interval: float | None = None,
                 live_sync: live.LiveSetting = None) -> None:
        self._writer: RankWriter | None = None
        self._append: Callable[[tuple], None] | None = None
        self._pending: Any = None
        #: "metric" when the hot path is open to this logger, else None (see _state_changed)
        self._fast: str | None = None
        self._every = 0
        self._observers: list[LoggersCollection] = []
        self._warned: set[str] = set()
        self._names_ok: set[str] = set()
        self._context: dict[str, Any] | None = None
        self._route: str = self.target
        self._journal_experiment: str | None = None
        self._run_info_extra: dict[str, Any] = {}
        #: (destinations of the whole collection, whether this journal is its primary one)
        #: when a LoggersCollection holds this logger (see RankWriter.declare_collection)
        self._collection: tuple[list[str], bool] | None = None
        self.flush_interval = 1.0 if flush_interval is None else float(flush_interval)
        if self.flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval}")
        self.strict = strict
        #: Seconds between system-metrics samples, None when off (see sysmetrics.py).
        self.system_metrics_interval = sysmetrics.configured_interval(system_metrics_interval)
        self.live_sync = live_sync
        self.journal_savedir = Path(savedir)
        sub = self.journal_savedir / self.savedir_name if self.savedir_name else savedir
        super().__init__(savedir=sub, log_freq=log_freq, log_on_workers=log_on_workers,
                         experiment_id=experiment_id,
                         run_id=None if run_id is None else str(run_id))
        _live.add(self)

    # -- state read by should_log: the fast path is recomputed when it changes ----------------

    def __setattr__(self, name: str, value: Any) -> None:
        """Plain attributes, read at plain-attribute speed by should_log; setting one that
        should_log or the fast path depends on (a hook replaced on the instance, too)
        recomputes the fast path (log() itself never sets attributes)."""
        object.__setattr__(self, name, value)
        if name in _STATE or name in _HOOKS or name == "__class__":
            if name == "log_on_workers":
                self._check_workers(value)
            self._state_changed()

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        if name in _HOOKS:  # an instance's own hook removed (a patch undone)
            self._state_changed()

    def _check_workers(self, value: Any) -> None:
        if isinstance(value, (list, tuple)) and -1 in value:
            self._warn_once("workers-1", f"{type(self).__name__}: log_on_workers={value!r} "
                            "does not mean 'all ranks' (as in itwinai, only -1 given alone "
                            "does): only ranks listed log")
        if isinstance(value, tuple):
            self._warn_once("workers-tuple", f"{type(self).__name__}: log_on_workers is a "
                            f"tuple ({value!r}); as in itwinai, only an int or a list selects "
                            "ranks, so no rank logs: give a list")

    def _state_changed(self) -> None:
        """Recompute the fast path: called when should_log's state, a hook, or the journal
        (opened, closed under this logger by an exit hook or SIGTERM) changes."""
        freq = getattr(self, "_log_freq", "epoch")
        self._every = freq if isinstance(freq, int) else (1 if freq == "batch" else 0)
        writer = self._writer
        fast = (writer is not None and not writer.closed and self.is_initialized
                and not self.strict and not self.echoes
                and "metric" in self.supported_kinds
                and _own_hooks(self, _FAST_PATH_HOOKS)
                and Logger.should_log(self))
        # The kind string itself: `kind is self._fast` tests both at once in log(). The
        # default kind and literals are this very (interned) object; an equal string built at
        # run time takes _log, which gives the same result.
        self._fast = "metric" if fast else None
        for collection in list(self._observers):  # it may stop observing: see _split_members
            collection._state_changed()

    # -- identity -----------------------------------------------------------------------------

    def journal_experiment(self) -> str:
        """The experiment directory this logger's records go to."""
        return self._journal_experiment or self._experiment_id or BASE_EXP_NAME

    def destination(self) -> dict[str, Any]:
        """This logger's constructor arguments that tell an exporter where the run should go."""
        return {}

    def run_info(self) -> dict[str, Any]:
        return {}

    def _resolve_run_id(self) -> str:
        run_id = self._run_id
        if run_id is None:
            run_id = names.run_id_from_environment()
        if run_id is None:
            run_id = names.broadcast_run_id(names.new_run_id())
        return names.check_path_component(str(run_id), "run id")

    # -- context ------------------------------------------------------------------------------

    def _begin(self, rank: int, context: dict[str, Any] | None = None) -> None:
        """Shared body of create_logger_context. Every rank resolves the run id (on rank 0 it
        may be broadcast through torch.distributed, which every rank must join); the journal
        is opened exactly when itwinai would start its tracker run: when `should_log()`
        (honouring a subclass's override) allows this rank."""
        self.worker_rank = rank
        self._run_id = self._resolve_run_id()
        self._context = context
        if self.should_log():
            self._open_journal()
        self.is_initialized = True

    def _open_journal(self) -> None:
        if self._writer is not None:
            return
        experiment = self.journal_experiment()
        run_dir = self.journal_savedir / names.experiment_dirname(experiment) / str(self._run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {"experiment": experiment, "run_id": self._run_id, "run_name": None,
                "description": None, **self.run_info(), **self._run_info_extra}
        self._writer = open_writer(run_dir, self.worker_rank, _world_size(), info,
                                   flush_interval=self.flush_interval, strict=self.strict)
        self._append = self._writer.append
        self._pending = self._writer.pending
        self._writer.listen(self._state_changed)
        self._writer.declare(self.target, {**self.destination(), **(self._context or {})})
        sysmetrics.attach(self._writer, self.system_metrics_interval)
        if self._collection is not None:
            self._writer.declare_collection(*self._collection)
        self._journal_opened()
        self._state_changed()
        self._start_live_sync(experiment)

    def _start_live_sync(self, experiment: str) -> None:
        """Start the run's live sync sidecar when asked to (see itwinai_journal.writer.live)."""
        targets = live.targets_of(self.live_sync)
        if targets is not None and live.starts_here(self.worker_rank, self.log_on_workers):
            problem = live.start(self.journal_savedir, experiment, str(self._run_id), targets)
            if problem:
                self._warn_once("live-sync", problem)

    def _journal_opened(self) -> None:
        """Called once this logger's journal is open (Prov4ML takes its first readings)."""

    def _journal(self) -> RankWriter:
        """The open journal, opened now if create_logger_context opened none: a call that
        `should_log` accepts on such a rank (a should_log override that says no without a
        batch_idx, log_on_workers changed later, use after ConsoleLogger's destroy) is
        journaled, never dropped. itwinai's MLflow starts a run of its own then; its other
        trackers fail. Warned once."""
        if self._writer is None:
            self._warn_once("lazy-open", f"{type(self).__name__}: a call accepted by "
                            "should_log() on a rank where create_logger_context() opened no "
                            "journal (should_log() said no then, or the journal was closed); "
                            "the journal is opened now")
            self._open_journal()
        assert self._writer is not None
        return self._writer

    @check_not_initialized
    def create_logger_context(self, rank: int = 0, **kwargs: Any) -> Any:
        """Initializes the logger context: opens this rank's journal of the run.

        Args:
            rank: global rank of current process, used in distributed environments.
        """
        self._begin(rank, kwargs or None)

    def _close(self, status: str) -> None:
        """End this logger's journal session with `status` (the last logger of a shared
        journal closes it)."""
        if self._writer is not None:
            self._writer.unlisten(self._state_changed)
            release_writer(self._writer, status)
            sysmetrics.wake()
            self._writer = None
            self._append = None
        self.is_initialized = False

    def _mark(self, status: str) -> None:
        """The status the journal session ends with when it is next closed (for start_logging:
        a user's own destroy_logger_context still runs)."""
        writer = self._writer
        if writer is not None and writer._status is None:
            writer._status = status

    @check_initialized
    def destroy_logger_context(self) -> None:
        """Destroy logger: flush and close this rank's journal session. As in itwinai, does
        nothing on a rank that `should_log()` refuses (the logger stays initialized)."""
        if not self.should_log():
            return
        self._close("finished")

    @contextmanager
    def start_logging(self, rank: int = 0) -> Iterator[None]:
        """Start logging context; the journal session ends 'failed' (or 'interrupted' on
        Ctrl-C) if the block raises. `destroy_logger_context` is called either way.

        >>> with my_logger.start_logging():
        >>>     my_logger.log(123, 'value', kind='metric', step=0)
        """
        self.create_logger_context(rank=rank)
        try:
            yield
        except KeyboardInterrupt:
            self._mark("interrupted")
            raise
        except BaseException:
            self._mark("failed")
            raise
        finally:
            self.destroy_logger_context()

    @check_initialized
    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        """Save hyperparameters (as 'param' records).

        Args:
            params: hyperparameters dictionary.
        """
        if not self.should_log() or not self.saves_hyperparameters:
            return
        writer = self._journal()
        if writer.closed:
            return self._ended_under(writer)
        records = [self._record(value, name, "param", None, None, None, self._route)
                   for name, value in params.items()]
        self._hand_over(writer, records)

    # -- logging ------------------------------------------------------------------------------

    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None, **kwargs: Any) -> None:
        """Record `item` under `identifier` in the journal.

        Args:
            item: element to be logged (e.g., metric), or a list of them.
            identifier: name of the element, or a list of names (pairwise with `item`).
            kind: one of `supported_kinds`. Defaults to 'metric'.
            step: logging step.
            batch_idx: DataLoader batch counter, used with `log_freq`.
            kwargs: kept with the record (e.g. `context`) for the exporters.
        """
        # The hot path: one real number, plain arguments (step and batch_idx within
        # COMPACT_MIN..COMPACT_MAX), a logger that replaces none of the hooks should_log depends
        # on, with its journal open (decided when any of that changes, see _state_changed).
        # Everything else, and every message, is in _log.
        if (kind is self._fast and type(identifier) is str and not kwargs
                and (batch_idx is None or type(batch_idx) is int)
                and (step is None or type(step) is int)):
            if batch_idx is not None:
                if not self._every or batch_idx % self._every:
                    return
                if not COMPACT_MIN <= batch_idx <= COMPACT_MAX:
                    return self._log(item, identifier, kind, step, batch_idx, kwargs)
            if step is not None and not COMPACT_MIN <= step <= COMPACT_MAX:
                return self._log(item, identifier, kind, step, batch_idx, kwargs)
            if type(item) is not float:
                try:
                    item = metric_value(item)
                except NotAPlainMetric:
                    return self._log(item, identifier, kind, step, batch_idx, kwargs)
            if identifier not in self._names_ok:
                self._names_ok.add(self._new_name(identifier, "metric"))
            self._append((_now(), identifier, step, batch_idx, item, self._route))
            if len(self._pending) > BACKLOG:
                self._writer.flush()
            return
        self._log(item, identifier, kind, step, batch_idx, kwargs)

    def _say_if_reference_fails(self, logger: _JournalLogger, item: Any, kind: str) -> None:
        why = logger._reference_fails(item, kind)
        if why is not None:
            self._warn_once(f"fails:{type(logger).__name__}:{kind}",
                            f"{type(logger).__name__}: {why}, so itwinai's "
                            f"{type(logger).__name__} fails on this kind={kind!r} call; the "
                            "journal keeps it")

    def _warn_once(self, key: str, message: str, category: type[Warning] = JournalWarning
                   ) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _warn(message, category)

    def _new_name(self, name: str, kind: str) -> str:
        """A record name not seen before (metric names are remembered, so this runs once per
        name): `name` if it can be stored (see `names.check_name`). An empty name is journaled
        as given ('': TensorBoard and W&B take it; MLflow refuses it, and itwinai's
        MLFlowLogger raises): said once, as its export maps it (README, "When things go
        wrong")."""
        names.check_name(name, f"{kind} name")
        if not name:
            self._warn_once("empty-name", f"{type(self).__name__}: an empty {kind} name ('') is "
                            "journaled as given; a tracker that refuses empty names (MLflow) "
                            "gets the export's deterministic name for it")
        return name

    def _hand_over(self, writer: RankWriter, records: list[tuple]) -> None:
        """Queue a call's records in `writer` (see `RankWriter.enqueue`)."""
        if not writer.enqueue(records):
            self._ended_under(writer)

    def _ended_under(self, writer: RankWriter) -> None:
        """A call after this logger's journal session was ended by the exit hooks (or SIGTERM)
        while the logger was still in use, e.g. from an atexit hook registered before the
        loggers were imported: reopening a session at interpreter exit could not be closed
        again, so the call is not journaled, and the first one says so."""
        self._warn_once("ended", f"{type(self).__name__}: the journal session of rank "
                        f"{self.worker_rank} in {writer.rank_dir} was ended by the interpreter's "
                        "exit (or SIGTERM) before this call: this record and any logged later "
                        "are not journaled", RuntimeWarning)

    def _accepts(self, kind: str) -> bool:
        """Whether itwinai's logger of this class does something with `kind`; other kinds are
        ignored, as itwinai ignores them (one warning per kind)."""
        if kind in self.supported_kinds or kind in self.extra_kinds:
            return True
        known = "an unknown kind" if kind not in ALL_KINDS else "a kind it does not support"
        self._warn_once(f"kind:{kind}", f"{type(self).__name__}: kind={kind!r} is {known}; "
                        "such calls are ignored, as in itwinai (supported: "
                        f"{', '.join(self.supported_kinds)})")
        return False

    def _log(self, item: Any, identifier: Any, kind: str, step: Any, batch_idx: Any,
             kwargs: dict[str, Any]) -> None:
        if not self.is_initialized:
            raise _not_initialized(self)
        if not self.should_log(batch_idx) or (kind not in self.supported_kinds
                                              and not self._accepts(kind)):
            return
        if kind != "metric":
            if self._ignores(item, kind):
                return
            self._say_if_reference_fails(self, item, kind)
        writer = self._writer or self._journal()
        if writer.closed:
            return self._ended_under(writer)
        if self.strict:
            writer.check_healthy()
        call = _Call(self, item, identifier, kind, step, batch_idx, kwargs)
        self._hand_over(writer, call.records(self, self._route, self.takes_any_object))
        if self.echoes:
            call.echo(self)

    def _ignores(self, item: Any, kind: str) -> bool:
        """Whether itwinai's logger of this class would ignore this object of an accepted
        kind."""
        return False

    def _reference_fails(self, item: Any, kind: str) -> str | None:
        """Why itwinai's logger of this class fails on an object the journal keeps, if it
        does (said once per kind)."""
        return None

    def _record(self, item: Any, identifier: str, kind: str, step: int | None,
                batch_idx: int | None, meta: dict[str, Any] | None, route: str,
                options: dict[str, Any] | None = None, any_object: bool = False) -> tuple:
        """Capture one object; return its queued record (nothing is queued here, so that a
        call of several items queues all of them or none). With `any_object` (a W&B
        destination), an object the kind's capture refuses is journaled as its JSON."""
        if kind == "metric":
            if type(item) is float and not meta:
                return (_now(), identifier, step, batch_idx, item, route)
            record_kind, cap, why = metric_fields(item, self._journal().blobs)
            if why is not None:
                self._warn_once(f"metric:{identifier}", f"{type(self).__name__}: metric "
                                f"{identifier!r} {why}")
            if record_kind == "metric" and not cap.meta and not meta:
                return (_now(), identifier, step, batch_idx, cap.value, route)
        else:
            if kind == "artifact" and identifier:  # '': the run's artifact root, as in MLflow
                names.safe_relpath(identifier, "artifact identifier")
            record_kind = kind
            blobs = self._journal().blobs
            try:
                if kind == "image":
                    cap = capture_image(item, blobs, identifier, options or {},
                                        numpy_layout=self.numpy_image_layout)
                else:
                    cap = CAPTURE[kind](item, blobs, identifier, options or {})
            except TypeError as e:
                if not any_object or kind == "watch":  # wandb.watch takes modules only
                    raise
                self._warn_once(f"any:{kind}", f"{type(self).__name__}: {e}; W&B takes any "
                                "object, so the journal keeps it as a text record of its JSON "
                                f"(meta['logged_as'] = {kind!r})")
                record_kind, cap = "text", json_text_fields(item, blobs, kind)
        fields = {**(cap.meta or {}), **(meta or {})}
        if record_kind == "dict" and "stringified" in fields:
            self._warn_once("dict-stringified", f"{type(self).__name__}: JSON cannot hold the "
                            f"dict {identifier!r} (a {type(item).__name__} with an object, a "
                            "non-str key or a self-reference): journaled as the JSON of its "
                            "str(), meta['stringified'] (MLflow's log_dict fails on it)")
        if "surrogates" in fields:
            self._warn_once("surrogates", f"{type(self).__name__}: {kind} {identifier!r} "
                            "holds lone surrogates (os.fsdecode's escapes for bytes that are "
                            "not UTF-8), which have no UTF-8 form: stored as U+FFFD, the exact "
                            "code points in meta['surrogates']")
        return (_now(), record_kind, identifier, step, batch_idx, cap.value, cap.text, cap.blob,
                fields or None, route)

    def _echo(self, item: Any, identifier: str, kind: str, step: int | None) -> None:
        """Side effect a logger has besides the journal (ConsoleLogger's log lines)."""


class _Call:
    """One `log()` call made storable: step and batch_idx as the int64 columns take them (the
    exact value in meta when they cannot), the identifier as a record name, the keyword
    arguments as meta, and the (item, name) pairs to record."""

    __slots__ = ("kind", "options", "meta", "step", "batch_idx", "given", "pairs")

    def __init__(self, logger: _JournalLogger, item: Any, identifier: Any, kind: str,
                 step: Any, batch_idx: Any, kwargs: dict[str, Any]) -> None:
        self.kind = kind
        self.options = kwargs
        meta = _kwargs_meta(kwargs) if kwargs else {}
        self.step, self.batch_idx = step, batch_idx
        if not (step is None or type(step) is int and INT64_MIN <= step <= INT64_MAX):
            self.step = self._index(logger, "step", step, meta)
        if not (batch_idx is None
                or type(batch_idx) is int and INT64_MIN <= batch_idx <= INT64_MAX):
            self.batch_idx = self._index(logger, "batch_idx", batch_idx, meta)
        self.meta = meta or None
        #: (item, identifier as given): ConsoleLogger's lines show what itwinai's would
        self.given = self.pairs = pairs(item, identifier)
        ok = logger._names_ok  # str names only: None, ints, ... are never in it
        try:
            for _, name in self.given:
                if name not in ok:
                    break
            else:
                return  # every name is a metric name seen before: the lists' hot path
        except TypeError:  # an unhashable identifier: _name makes it a str
            pass
        self.pairs = [(one, _name(logger, name, kind)) for one, name in self.given]
        for _, name in self.pairs:
            if name not in ok:
                logger._new_name(name, kind)
                if kind == "metric":
                    ok.add(name)

    @staticmethod
    def _index(logger: _JournalLogger, field: str, given: Any, meta: dict[str, Any]
               ) -> int | None:
        """A step or batch_idx for its int64 column; its exact value in meta (said once)
        when the column cannot hold it."""
        number, exact = index_value(given)
        if exact is not None:
            meta[field] = exact
            logger._warn_once(f"index:{field}", f"{type(logger).__name__}: {field}={given!r} "
                              f"is not a whole number within int64; the record has no {field} "
                              f"and keeps the value in meta[{field!r}]")
        return number

    def records(self, logger: _JournalLogger, route: str, any_object: bool = False
                ) -> list[tuple]:
        """The call's records, built before any is queued (a bad item fails the call without
        logging half of it). Real-number metrics without meta get the hot path's compact
        records, with one timestamp for the call."""
        if self.kind == "metric" and self.meta is None:
            step, batch_idx, t = self.step, self.batch_idx, _now()
            try:
                return [(t, name, step, batch_idx,
                         value if type(value) is float else metric_value(value), route)
                        for value, name in self.pairs]
            except NotAPlainMetric:
                pass
        records = []
        for item, name in self.pairs:
            try:
                records.append(logger._record(item, name, self.kind, self.step, self.batch_idx,
                                              self.meta, route, self.options, any_object))
            except JournalWriteError as e:  # the blob store could not keep the payload
                logger._journal().drop(e)  # counted and warned once, as metrics; strict raises
        return records

    def echo(self, logger: _JournalLogger) -> None:
        for item, name in self.given:
            logger._echo(item, name, self.kind, self.step)


def _name(logger: _JournalLogger, name: Any, kind: str) -> str:
    """The record name of an identifier. None is the kind's name (said once, unless the
    kind's tracker call takes no label); anything else that is not a str is its str(), said
    once (itwinai's Prov4ML and console loggers take such identifiers; its others refuse
    them)."""
    if isinstance(name, str):
        return name
    if name is None:
        if kind not in LABEL_FREE_KINDS:
            logger._warn_once(f"none:{kind}", f"{type(logger).__name__}: identifier=None "
                              f"for kind={kind!r}; journaled under the name {kind!r}")
        return kind
    logger._warn_once(f"name-type:{type(name).__name__}", f"{type(logger).__name__}: "
                      f"identifier {name!r} is a {type(name).__name__}, not a str; journaled "
                      f"as {str(name)!r}")
    return str(name)


def context_name(context: Any) -> str | None:
    """A Prov4ML context as the journal stores it: the lower-case name of the yProv4ML context
    it names, whether given as `Context.VALIDATION`, 'validation' or 'VALIDATION' (the enum's
    value); any other value as its str()."""
    if context is None:
        return None
    name = context.name if isinstance(context, enum.Enum) else context
    if isinstance(name, str) and name.lower() in PROV4ML_CONTEXTS:
        return name.lower()
    return str(context)


def _kwargs_meta(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The record's meta from `log()`'s keyword arguments: `context` (Prov4ML's) is a
    first-class field; every other keyword, whatever its name (`targets` too), is kept under
    meta['kwargs'], so user data never looks like a field the sync side reads."""
    meta: dict[str, Any] = {}
    rest = dict(kwargs)
    context = context_name(rest.pop("context", None))
    if context is not None:
        meta["context"] = context
    if rest:
        meta["kwargs"] = rest
    return meta


def pairs(item: Any, identifier: Any) -> list[tuple[Any, str]]:
    """Pairs to log: a list of identifiers goes with a list of items, one to one."""
    if isinstance(identifier, (list, tuple)):
        if not isinstance(item, (list, tuple)):
            raise ValueError("a list of identifiers needs a list of items of the same length, "
                             f"got {type(item).__name__}")
        if len(item) != len(identifier):
            raise ValueError(f"{len(item)} items for {len(identifier)} identifiers: lists of "
                             "items and identifiers must have the same length")
        return list(zip(item, identifier))
    return [(item, identifier)]


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
                 log_on_workers: int | list[int] = 0, *, run_id: str | None = None,
                 flush_interval: float | None = None, strict: bool = False,
                 system_metrics_interval: float | None = None,
                 live_sync: live.LiveSetting = None) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         run_id=run_id, flush_interval=flush_interval, strict=strict,
                         system_metrics_interval=system_metrics_interval, live_sync=live_sync)

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


def _is_module(item: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(item, torch.nn.Module)


def _is_existing_path(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike)) and (Path(item).is_file()
                                                      or Path(item).is_dir())


def normalize_tracking_uri(uri: str) -> str:
    """A tracking URI as itwinai's `normalize_tracking_uri` makes it: a path (or a `file:`
    URI) becomes an absolute `file:` URI; other URIs are left as they are."""
    if not uri:
        py_logger.warning("Empty tracking URI provided, using current directory.")
        uri = "."
    parsed = urlparse(uri)
    if parsed.scheme == "":
        return Path(uri).resolve().as_uri()
    if parsed.scheme == "file":
        return Path(parsed.path).resolve().as_uri()
    return uri


class MLFlowLogger(_JournalLogger):
    """Records a run for MLflow.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'; the `savedir` attribute
            is `savedir/mlflow` (created now, as itwinai does).
        experiment_name: MLflow experiment name. Defaults to BASE_EXP_NAME.
        tracking_uri: MLflow tracking URI. The `tracking_uri` attribute is itwinai's: this
            argument, else MLFLOW_TRACKING_URI, else `savedir/mlflow`, as an absolute URI.
            Only a URI given here is declared for the export (secrets redacted); without one,
            `itwinai-sync` uses its --tracking-uri, MLFLOW_TRACKING_URI where it runs, or
            `sqlite:///<SAVEDIR>/mlflow.db`.
        run_description: run description.
        run_name: run name.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
    """

    supported_kinds: tuple[str, ...] = ("metric", "figure", "image", "artifact", "torch", "dict",
                                        "param", "text", "model", "dataset")
    target = "mlflow"
    savedir_name = "mlflow"
    #: Offline there is no MLflow run to attach to: always None.
    active_run: Any = None
    tracking_uri: str

    def __init__(self, savedir: Path | str = "mllogs",
                 experiment_name: str = BASE_EXP_NAME, tracking_uri: str | None = None,
                 run_description: str | None = None, run_name: str | None = None,
                 log_freq: LogFreq = "epoch", log_on_workers: int | list[int] = 0, *,
                 run_id: str | None = None, flush_interval: float | None = None,
                 strict: bool = False, system_metrics_interval: float | None = None,
                 live_sync: live.LiveSetting = None) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         experiment_id=experiment_name, run_id=run_id,
                         flush_interval=flush_interval, strict=strict,
                         system_metrics_interval=system_metrics_interval, live_sync=live_sync)
        self.run_description = run_description
        self.run_name = run_name
        self.experiment_name = experiment_name
        self.savedir.mkdir(parents=True, exist_ok=True)
        self._explicit_tracking_uri = tracking_uri
        self.tracking_uri = normalize_tracking_uri(
            tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or self.savedir.resolve().as_uri())

    def destination(self) -> dict[str, Any]:
        return {"experiment_name": self.experiment_name,
                "tracking_uri": self._explicit_tracking_uri}

    def run_info(self) -> dict[str, Any]:
        return {"run_name": self.run_name, "description": self.run_description}

    @check_not_initialized
    def create_logger_context(self, rank: int = 0, **kwargs: Any) -> Any:
        """Initializes the logger context. `run_id`, `run_name` and `parent_run_id` (MLflow's
        ids to attach to) are recorded for the export. Returns None: offline there is no
        active MLflow run."""
        if kwargs.get("run_name"):
            self.run_name = kwargs["run_name"]
        context = {k: kwargs[k] for k in ("run_id", "run_name", "parent_run_id") if kwargs.get(k)}
        self._begin(rank, {"attach": context} if context else None)
        return None

    @check_initialized
    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        """Save hyperparameters as 'param' records. Through `self.log(kind='param', step=0)`
        for each, as itwinai does, when `log` is replaced (a subclass, a patch)."""
        if not _own_hooks(self, ("log",)):
            if self.should_log():
                for name, value in params.items():
                    self.log(item=value, identifier=name, step=0, kind="param")
            return
        super().save_hyperparameters(params)

    def _ignores(self, item: Any, kind: str) -> bool:
        """itwinai's MLFlowLogger logs torch modules as models and MLflow datasets as inputs;
        it warns about anything else and ignores it."""
        if kind == "model" and not _is_module(item):
            py_logger.warning("Unrecognized model type.")
            return True
        if kind == "dataset" and not (module_of(item) == "mlflow" and hasattr(item, "to_dict")):
            py_logger.warning("Unrecognized dataset type. Must be an MLFlow dataset")
            return True
        return False

    def _reference_fails(self, item: Any, kind: str) -> str | None:
        if kind == "image" and module_of(item) == "torch":
            return "MLflow's log_image takes numpy arrays and PIL images, not tensors"
        if kind == "artifact" and not isinstance(item, str):
            return "itwinai's MLFlowLogger logs artifacts given as a str path only"
        return None

    def resolve_experiment_id(self) -> str:
        """The experiment's id. Offline this is its name; MLflow assigns the numeric id at
        export time."""
        return self.experiment_name

    @property
    def experiment_id(self) -> str:
        return self.experiment_name


class WandBLogger(_JournalLogger):
    """Records a run for Weights & Biases.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'; the `savedir` attribute
            is `savedir/wandb`, as in itwinai.
        project_name: W&B project. Defaults to BASE_EXP_NAME.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
        offline_mode: recorded; the journal is always offline, `itwinai-sync --to wandb` decides.
    """

    supported_kinds: tuple[str, ...] = ("watch", "metric", "figure", "image", "torch", "dict",
                                        "param", "text")
    target = "wandb"
    savedir_name = "wandb"
    takes_any_object = True

    def __init__(self, savedir: Path | str = "mllogs", project_name: str = BASE_EXP_NAME,
                 log_freq: LogFreq = "epoch", log_on_workers: int | list[int] = 0,
                 offline_mode: bool = False, *, run_id: str | None = None,
                 flush_interval: float | None = None, strict: bool = False,
                 system_metrics_interval: float | None = None,
                 live_sync: live.LiveSetting = None) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         experiment_id=project_name, run_id=run_id,
                         flush_interval=flush_interval, strict=strict,
                         system_metrics_interval=system_metrics_interval, live_sync=live_sync)
        self.project_name = project_name
        self.offline_mode = offline_mode

    def destination(self) -> dict[str, Any]:
        return {"project_name": self.project_name, "offline_mode": self.offline_mode}

    def _reference_fails(self, item: Any, kind: str) -> str | None:
        if kind == "image" and module_of(item) == "PIL":
            return "wandb.log takes a PIL image only wrapped in wandb.Image"
        return None


class TensorBoardLogger(_JournalLogger):
    """Records a run for TensorBoard.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'; the `savedir` attribute
            is `savedir/tensorboard`, as in itwinai.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        framework: 'pytorch' or 'tensorflow', in any case (recorded; the export writes
            standard event files).
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.

    Raises:
        ValueError: when framework is not recognized.
    """

    supported_kinds: tuple[str, ...] = ("metric", "image", "text", "figure", "torch")
    target = "tensorboard"
    savedir_name = "tensorboard"
    numpy_image_layout = "CHW"

    def __init__(self, savedir: Path | str = "mllogs", log_freq: LogFreq = "epoch",
                 framework: Literal["tensorflow", "pytorch"] = "pytorch",
                 log_on_workers: int | list[int] = 0, *, run_id: str | None = None,
                 flush_interval: float | None = None, strict: bool = False,
                 system_metrics_interval: float | None = None,
                 live_sync: live.LiveSetting = None) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         run_id=run_id, flush_interval=flush_interval, strict=strict,
                         system_metrics_interval=system_metrics_interval, live_sync=live_sync)
        if framework.lower() not in ("tensorflow", "pytorch"):
            raise ValueError(
                "Accepted values for TensorBoardLogger framework are 'tensorflow' and "
                f"'pytorch'. Received {framework}"
            )
        self.framework = framework.lower()

    def destination(self) -> dict[str, Any]:
        return {"framework": self.framework}

    def _reference_fails(self, item: Any, kind: str) -> str | None:
        if kind == "image" and module_of(item) == "PIL":
            return "add_image takes tensors and numpy arrays, not PIL images"
        if (kind == "image" and module_of(item) in ("numpy", "torch")
                and numpy_image_layout(item, "CHW") == "HWC"):
            return "add_image reads images as CHW (the journal reads this one as HW or HWC)"
        if kind == "torch" and not _is_module(item):
            return "add_graph takes a torch.nn.Module"
        return None


class Prov4MLLogger(_JournalLogger):
    """Records a run for Prov4ML provenance documents.

    Args:
        prov_user_namespace: provenance namespace. Defaults to "www.example.org".
        experiment_name: experiment name. Defaults to "experiment_name".
        provenance_save_dir: where the journal is written (and, by default, the documents);
            also the `savedir` attribute.
        save_after_n_logs: recorded for the export.
        create_graph: whether the export creates the provenance graph.
        create_svg: whether the export renders it as SVG.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
    """

    supported_kinds: tuple[str, ...] = ("metric", "flops_pb", "flops_pe", "system", "carbon",
                                        "execution_time", "model", "best_model", "torch")
    extra_kinds: tuple[str, ...] = ("prov_documents",)
    target = "prov4ml"

    def __init__(self, prov_user_namespace: str = "www.example.org",
                 experiment_name: str = "experiment_name",
                 provenance_save_dir: str = "mllogs/prov_logs",
                 save_after_n_logs: int | None = 100, create_graph: bool | None = True,
                 create_svg: bool | None = True, log_freq: LogFreq = "epoch",
                 log_on_workers: int | list[int] = 0, *, run_id: str | None = None,
                 flush_interval: float | None = None, strict: bool = False,
                 system_metrics_interval: float | None = None,
                 live_sync: live.LiveSetting = None) -> None:
        super().__init__(savedir=provenance_save_dir, log_freq=log_freq,
                         log_on_workers=log_on_workers, experiment_id=experiment_name,
                         run_id=run_id, flush_interval=flush_interval, strict=strict,
                         system_metrics_interval=system_metrics_interval, live_sync=live_sync)
        self.prov_user_namespace = prov_user_namespace
        self.experiment_name = experiment_name
        self.provenance_save_dir = str(provenance_save_dir)
        self.save_after_n_logs = save_after_n_logs
        self.create_graph = create_graph
        self.create_svg = create_svg
        #: The context of hyperparameters, as in itwinai.
        self.param_context = "training"

    def _journal_opened(self) -> None:
        """As yprov4ml's `start_run` starts its trackers, take the first CPU and energy
        readings that the `system` and `carbon` records count from."""
        measure.begin_session(self._writer.blobs)

    def destination(self) -> dict[str, Any]:
        return {"prov_user_namespace": self.prov_user_namespace,
                "experiment_name": self.experiment_name,
                "save_after_n_logs": self.save_after_n_logs,
                "create_graph": self.create_graph, "create_svg": self.create_svg}

    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None,
            context: str | None = DEFAULT_CONTEXT, **kwargs: Any) -> None:
        """Record `item`; `context` (a yProv4ML context: `Context.VALIDATION`, 'validation'
        or 'VALIDATION' all name the same one) is kept with the record, unless it is the
        default one (see DEFAULT_CONTEXT): then a metric takes the hot path."""
        if context is DEFAULT_CONTEXT and not kwargs:  # the default: nothing to keep
            return _JournalLogger.log(self, item, identifier, kind, step, batch_idx)
        name = context_name(context)
        if name not in PROV4ML_CONTEXTS:
            self._warn_once(f"context:{name}", f"Prov4MLLogger: context={context!r} is not a "
                            f"yProv4ML context ({', '.join(PROV4ML_CONTEXTS)}); itwinai's "
                            "Prov4MLLogger fails on it. Journaled as given")
        if name != DEFAULT_CONTEXT:
            kwargs = {"context": context, **kwargs}
        self._log(item, identifier, kind, step, batch_idx, kwargs)


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


class LoggersCollection(_JournalLogger):
    """Several loggers used as one, sharing one run id. Members that are loggers of this module
    overriding none of `should_log`, `log`, `create_logger_context`,
    `destroy_logger_context`, `save_hyperparameters` share one journal per savedir: a record is
    written once, marked with the destinations whose logger accepted it (kind supported,
    `should_log` true) when that is not all of them. Every other member (a user subclass
    overriding one of them, a Logger that is not one of ours, EmptyLogger) gets its own
    methods called, as itwinai calls every member's.

    Args:
        loggers: itwinai loggers, at most one of each type.

    Raises:
        ValueError: when multiple loggers of the same type are passed.
    """

    def __init__(self, loggers: list[Logger]) -> None:
        logger_types = [type(lg) for lg in loggers]
        if len(set(logger_types)) != len(logger_types):
            raise ValueError(
                f"{self.__class__.__name__} does not allow for multiple loggers of the same"
                f" type. Received: {logger_types}"
            )
        journals = [lg for lg in loggers if isinstance(lg, _JournalLogger)]
        first = journals[0].journal_savedir if journals else "mllogs"
        self._metric_plans: dict[Any, tuple[list, list]] = {}
        super().__init__(savedir=first, log_freq=1, log_on_workers=-1)
        if journals:  # the members' own choice: the shortest interval of those that sample
            self.system_metrics_interval = min(
                (lg.system_metrics_interval for lg in journals if lg.system_metrics_interval),
                default=None)
        self.loggers = loggers
        self._plain: list[_JournalLogger] = []
        self._custom: list[Logger] = []

    @property
    def supported_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        """Supported kinds are delegated to the loggers in the collection."""
        return tuple(k for k in ALL_KINDS
                     if any(k in getattr(lg, "supported_kinds", ()) for lg in self.loggers))

    @property
    def extra_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(k for k in ALL_KINDS
                     if any(k in getattr(lg, "extra_kinds", ()) for lg in self.loggers))

    def should_log(self, batch_idx: int | None = None) -> bool:
        """Transparent: each member applies its own `should_log`. Always returns True."""
        return True

    def _split_members(self) -> None:
        """Which members share journals and get their records written by the collection
        (`_plain`: loggers of this module replacing no hook) and which get their own methods
        called (`_custom`). Done at create_logger_context, and again when a hook is replaced
        on a member's class or instance (see `_state_changed`), so a patch made mid-run is
        honoured from the next call on."""
        plain = [lg for lg in self.loggers if isinstance(lg, _JournalLogger)
                 and not isinstance(lg, LoggersCollection) and _own_hooks(lg)]
        for lg in self._plain:
            if lg not in plain and self in lg._observers:
                lg._observers.remove(self)
        for lg in plain:
            if self not in lg._observers:
                lg._observers.append(self)
        self._plain = plain
        self._custom = [lg for lg in self.loggers if lg not in plain]
        self._metric_plans.clear()

    def _state_changed(self) -> None:
        super()._state_changed()
        if self.is_initialized:  # else the members are split by create_logger_context
            self._split_members()

    @check_not_initialized
    def create_logger_context(self, rank: int = 0, **kwargs: Any) -> None:
        """Initializes all loggers, on one run id."""
        self.worker_rank = rank
        journals = [lg for lg in self.loggers if isinstance(lg, _JournalLogger)]
        self._run_id = self._run_id or next((lg._run_id for lg in journals if lg._run_id), None)
        self._run_id = self._resolve_run_id()
        info: dict[str, Any] = {}
        for lg in journals:
            info.update({k: v for k, v in lg.run_info().items() if v})
        experiments = [lg._experiment_id for lg in journals if lg._experiment_id]
        experiment = experiments[0] if experiments else BASE_EXP_NAME
        for lg in journals:
            lg._run_id = self._run_id
            lg._journal_experiment = experiment
            lg._run_info_extra = info
        self._split_members()
        # Members with their own savedir (a Prov4MLLogger's provenance_save_dir) write a
        # second journal of the same run: each journal records the destinations of the whole
        # collection and whether it is the primary one (the first member's), so that the sync
        # takes each target's records from the journal of that target's logger only.
        targets = [lg.target for lg in journals]
        primary = journals[0].journal_savedir.resolve() if journals else None
        for lg in journals:
            lg._collection = (targets, lg.journal_savedir.resolve() == primary)
        for lg in self.loggers:
            lg.create_logger_context(rank=rank, **kwargs)
        self._metric_plans.clear()
        self.is_initialized = True

    @check_initialized
    def destroy_logger_context(self) -> None:
        """Destroy all loggers."""
        for lg in self.loggers:
            lg.destroy_logger_context()
        self._release()

    def _release(self) -> None:
        for lg in self._plain:
            if self in lg._observers:
                lg._observers.remove(self)
        self._metric_plans.clear()
        self.is_initialized = False

    def _close(self, status: str) -> None:
        for lg in self.loggers:
            if isinstance(lg, _JournalLogger):
                lg._close(status)
        self._release()

    def _mark(self, status: str) -> None:
        for lg in self.loggers:
            if isinstance(lg, _JournalLogger):
                lg._mark(status)

    @check_initialized
    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        """Save hyperparameters once per journal for the plain members that record them; the
        other members save them themselves."""
        chosen = [lg for lg in self._plain if lg.saves_hyperparameters and lg.should_log()]
        for group in _by_writer(chosen):
            first, route = group[0], _route(group)
            writer = first._journal()
            if writer.closed:
                first._ended_under(writer)
                continue
            records = [first._record(value, name, "param", None, None, None, route)
                       for name, value in params.items()]
            first._hand_over(writer, records)
        for lg in self._custom:
            lg.save_hyperparameters(params=params)

    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None, **kwargs: Any) -> None:
        """Log on all loggers: once per journal for the plain members that accept the call,
        then through each other member's own `log`."""
        if (kind == "metric" and type(identifier) is str and not kwargs and self.is_initialized
                and (batch_idx is None
                     or type(batch_idx) is int and COMPACT_MIN <= batch_idx <= COMPACT_MAX)
                and (step is None or type(step) is int and COMPACT_MIN <= step <= COMPACT_MAX)):
            # The hot path (see _JournalLogger.log): which journals get the record, with which
            # route, depends only on batch_idx while the members' state, hooks and journals
            # stay (a change clears the plans).
            plan = self._metric_plans.get(batch_idx)
            if plan is None:
                plan = self._metric_plan(batch_idx)
                if plan is None:
                    return self._log(item, identifier, kind, step, batch_idx, kwargs)
            writes, then = plan
            if writes:
                value = item
                if type(value) is not float:
                    try:
                        value = metric_value(value)
                    except NotAPlainMetric:
                        return self._log(item, identifier, kind, step, batch_idx, kwargs)
                if identifier not in self._names_ok:
                    self._names_ok.add(self._new_name(identifier, "metric"))
                t = _now()
                for writer, route in writes:
                    writer.append((t, identifier, step, batch_idx, value, route))
                    if len(writer.pending) > BACKLOG:
                        writer.flush()
            for follow in then:
                follow(item, identifier, kind, step, batch_idx)
            return
        self._log(item, identifier, kind, step, batch_idx, kwargs)

    def _log(self, item: Any, identifier: Any, kind: str, step: Any, batch_idx: Any,
             kwargs: dict[str, Any]) -> None:
        if not self.is_initialized:
            raise _not_initialized(self)
        accepting = [lg for lg in self._accepting(kind, batch_idx)
                     if not lg._ignores(item, kind)]
        if accepting:
            call = _Call(accepting[0], item, identifier, kind, step, batch_idx, kwargs)
            for lg in accepting:
                self._say_if_reference_fails(lg, item, kind)
            for group in _by_writer(accepting):
                first = group[0]
                writer = first._journal()
                if writer.closed:
                    first._ended_under(writer)
                    continue
                any_object = any(lg.takes_any_object for lg in group)
                first._hand_over(writer, call.records(first, _route(group), any_object))
            for lg in accepting:
                if lg.echoes:
                    call.echo(lg)
        elif not any(kind in lg.supported_kinds or kind in lg.extra_kinds for lg in self._plain):
            self._accepts(kind)
        for lg in self._custom:
            lg.log(item=item, identifier=identifier, kind=kind, step=step, batch_idx=batch_idx,
                   **kwargs)

    def _accepting(self, kind: str, batch_idx: Any) -> list[_JournalLogger]:
        found = [lg for lg in self._plain
                 if (kind in lg.supported_kinds or kind in lg.extra_kinds)
                 and lg.should_log(batch_idx)]
        for lg in found:
            lg._journal()
        return found

    def _metric_plan(self, batch_idx: int | None) -> tuple[list, list] | None:
        """(writer, route) of each journal the metric goes to, and what follows the writes:
        the console lines of accepting members that echo, then the other members' own
        log(). None when a journal was ended under the collection (by the exit hooks): the
        slow path says so."""
        accepting = self._accepting("metric", batch_idx)
        writes = [(group[0]._writer, _route(group)) for group in _by_writer(accepting)]
        if any(writer.closed for writer, _ in writes):
            return None
        then = [_echo_of(lg) for lg in accepting if lg.echoes]
        then += [_log_of(lg) for lg in self._custom]
        plan = (writes, then)
        if len(self._metric_plans) > 100_000:  # bounded: batch_idx values are few in practice
            self._metric_plans.clear()
        self._metric_plans[batch_idx] = plan
        return plan


def _echo_of(logger: _JournalLogger) -> Callable[..., None]:
    def echo(item: Any, identifier: str, kind: str, step: Any, batch_idx: Any) -> None:
        logger._echo(item, identifier, kind, step)

    return echo


def _log_of(logger: Logger) -> Callable[..., None]:
    def log(item: Any, identifier: str, kind: str, step: Any, batch_idx: Any) -> None:
        logger.log(item=item, identifier=identifier, kind=kind, step=step,
                   batch_idx=batch_idx)

    return log


def _route(loggers: list[_JournalLogger]) -> str:
    return ",".join(sorted({lg.target for lg in loggers}))


def _by_writer(loggers: list[_JournalLogger]) -> list[list[_JournalLogger]]:
    groups: dict[int, list[_JournalLogger]] = {}
    for lg in loggers:
        groups.setdefault(id(lg._journal()), []).append(lg)
    return list(groups.values())


def get_mlflow_logger(logger: Logger | None) -> MLFlowLogger | None:
    """Finds and returns the MLFlowLogger if present in the given logger."""
    if logger is None:
        return None
    if isinstance(logger, LoggersCollection):
        return next((lg for lg in logger.loggers if isinstance(lg, MLFlowLogger)), None)
    if isinstance(logger, MLFlowLogger):
        return logger
    return None


#: This module's own function for each hook, in every class of it (see `_own_hooks`).
_OWN_HOOKS: dict[str, frozenset[Any]] = {
    name: frozenset(vars(cls)[name] for cls in (
        Logger, _JournalLogger, ConsoleLogger, MLFlowLogger, WandBLogger, TensorBoardLogger,
        Prov4MLLogger, EmptyLogger, LoggersCollection) if name in vars(cls))
    for name in _HOOKS}


__all__ = [
    "BASE_EXP_NAME", "LogMixin", "Logger", "ConsoleLogger", "MLFlowLogger", "WandBLogger",
    "TensorBoardLogger", "Prov4MLLogger", "LoggersCollection", "EmptyLogger",
    "get_mlflow_logger", "check_initialized", "check_not_initialized", "py_logger",
    "JournalWarning",
]
