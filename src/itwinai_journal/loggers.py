"""Drop-in replacements for `itwinai.loggers` that write a local journal instead of calling a
tracker. Same classes, constructor parameters, defaults, `supported_kinds` and `should_log`
semantics; the journal is replayed into the trackers later by `itwinai-sync`.

Differences from itwinai, all deliberate and documented in the README:
- nothing is sent anywhere at `log()` time; constructor arguments are recorded as the run's
  declared destinations and used by `itwinai-sync` when no `--to` is given;
- `serialize` returns the path it wrote and refuses identifiers that would leave savedir;
- lists of items with lists of identifiers are logged pairwise (mismatched lengths: ValueError);
- an unknown kind is a ValueError naming the valid kinds; a known kind that the logger does not
  support is skipped (with one warning per kind), as in itwinai.
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
import time
import warnings
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from . import names
from .capture import CAPTURE, check_index, metric_value
from .schema import ALL_KINDS
from .writer import RankWriter, open_writer, release_writer

BASE_EXP_NAME: str = "unnamed-experiment"

LogFreq = int | Literal["epoch", "batch"]
#: Records queued beyond this are flushed by the logging thread itself: a loop that logs faster
#: than the background flusher drains must not grow memory without bound.
BACKLOG = 20_000
_now = time.time


class LogMixin(metaclass=ABCMeta):
    @abstractmethod
    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None, **kwargs: Any) -> None:
        """Log `item` with `identifier` name of `kind` type at `step` time step."""


def check_initialized(method: Callable) -> Callable:
    """Decorator: the logger must have been initialized before `method` is called."""

    @functools.wraps(method)
    def wrapper(self: Logger, *args: Any, **kwargs: Any) -> Any:
        if not self.is_initialized:
            raise RuntimeError(
                f"{type(self).__name__}.{method.__name__}() called before the logger was "
                "initialized: call create_logger_context() first or use "
                "`with logger.start_logging():`"
            )
        return method(self, *args, **kwargs)

    return wrapper


def check_not_initialized(method: Callable) -> Callable:
    """Decorator for create_logger_context: a second initialization warns and does nothing."""

    @functools.wraps(method)
    def wrapper(self: Logger, *args: Any, **kwargs: Any) -> Any:
        if self.is_initialized:
            warnings.warn(
                f"{type(self).__name__} is already initialized; ignoring the second "
                f"{method.__name__}() call",
                stacklevel=2,
            )
            return None
        return method(self, *args, **kwargs)

    return wrapper


def _world_size() -> int:
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


class Logger(LogMixin, metaclass=ABCMeta):
    """Base class for loggers.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'.
        log_freq: 'epoch' (log only calls without batch_idx), 'batch' (log always) or an int n
            (log calls whose batch_idx is a multiple of n, and calls without batch_idx).
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
        experiment_id: experiment the run belongs to (its directory in the journal).
        run_id: journal run id; by default taken from ITWINAI_RUN_ID, the launcher (torchrun,
            SLURM), rank 0 through torch.distributed, or a new time-sortable id.
        flush_interval: seconds after which a logged record is safe against SIGKILL (default 1).
        strict: raise on journal write errors instead of warning and counting dropped records.
    """

    #: Supported logging 'kind's.
    supported_kinds: tuple[str, ...] = ()
    #: Current worker global rank
    worker_rank: int = 0
    #: Flag to check whether the logger was correctly initialized
    is_initialized: bool = False
    #: Location on filesystem where to store data.
    savedir: Path
    #: Name of the tracker this logger declares as a destination (None: no export target).
    target: str = "journal"
    #: Whether save_hyperparameters records anything (ConsoleLogger's does nothing).
    saves_hyperparameters: bool = True
    #: Whether `_echo` does something (then metrics skip the inlined hot path).
    echoes: bool = False
    #: Kinds recorded although they are not in `supported_kinds` (which must match the
    #: reference): the reference documents 'prov_documents' as used by Prov4MLLogger, whose
    #: log() handles it, yet leaves it out of its supported_kinds.
    extra_kinds: tuple[str, ...] = ()

    def __init__(self, savedir: Path | str = "mllogs", log_freq: LogFreq = "epoch",
                 log_on_workers: int | list[int] = 0, experiment_id: str | None = None,
                 run_id: int | str | None = None, *, flush_interval: float | None = None,
                 strict: bool = False) -> None:
        self.savedir = Path(savedir)
        self.log_freq = log_freq
        self.log_on_workers = log_on_workers
        self._experiment_id = experiment_id
        self._run_id = None if run_id is None else str(run_id)
        self.flush_interval = 1.0 if flush_interval is None else float(flush_interval)
        if self.flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval}")
        self.strict = strict
        self._writer: RankWriter | None = None
        self._append: Callable[[tuple], None] | None = None
        self._pending: Any = None
        self._route: str = self.target
        self._journal_experiment: str | None = None
        self._run_info_extra: dict[str, Any] = {}
        self._fast = False
        self._names_ok: set[str] = set()
        self._warned_kinds: set[str] = set()

    # -- properties ---------------------------------------------------------------------------

    @property
    def experiment_id(self) -> str | None:
        """Return the experiment id (the experiment's name in the journal)."""
        return self._experiment_id

    @property
    def run_id(self) -> int | str | None:
        """Return the id of the current run (the journal run id once initialized)."""
        return self._run_id

    @property
    def log_freq(self) -> LogFreq:
        """Get `log_freq`, namely how often should the logger fulfill or ignore calls to the
        `log()` method."""
        return self._log_freq

    @log_freq.setter
    def log_freq(self, val: LogFreq) -> None:
        if val in ("epoch", "batch") or (type(val) is int and val > 0):
            self._log_freq = val
            #: 0: never log calls with a batch_idx; n: log when batch_idx % n == 0.
            self._every = 0 if val == "epoch" else (1 if val == "batch" else val)
        else:
            raise ValueError(
                "Wrong value for 'log_freq'. Supported values are: "
                f"['epoch', 'batch'] or int > 0. Received: {val}"
            )

    # -- should_log ---------------------------------------------------------------------------

    def _worker_allowed(self) -> bool:
        workers = self.log_on_workers
        if isinstance(workers, int):
            return workers == -1 or workers == self.worker_rank
        return -1 in workers or self.worker_rank in workers

    def should_log(self, batch_idx: int | None = None) -> bool:
        """Whether a `log()` call is fulfilled: first the rank must be one of `log_on_workers`,
        then, when `batch_idx` is given, `log_freq` decides ('epoch': no, 'batch': yes, int n:
        when batch_idx is a multiple of n). Calls without `batch_idx` are always logged."""
        if not self._worker_allowed():
            return False
        if batch_idx is not None:
            return bool(self._every) and batch_idx % self._every == 0
        return True

    # -- context ------------------------------------------------------------------------------

    @contextmanager
    def start_logging(self, rank: int = 0) -> Iterator[None]:
        """Start logging context; the session ends 'failed' (or 'interrupted' on Ctrl-C) if the
        block raises.

        >>> with my_logger.start_logging():
        >>>     my_logger.log(123, 'value', kind='metric', step=0)
        """
        self.create_logger_context(rank=rank)
        try:
            yield
        except KeyboardInterrupt:
            self._close("interrupted")
            raise
        except BaseException:
            self._close("failed")
            raise
        self.destroy_logger_context()

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

    def _open(self, rank: int, context: dict[str, Any] | None = None) -> None:
        """Shared body of create_logger_context: resolve the run and open its journal."""
        self.worker_rank = rank
        self._run_id = self._resolve_run_id()
        if self._worker_allowed():
            experiment = self.journal_experiment()
            run_dir = self.savedir / names.experiment_dirname(experiment) / self._run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            info = {"experiment": experiment, "run_id": self._run_id, "run_name": None,
                    "description": None, **self.run_info(), **self._run_info_extra}
            self._writer = open_writer(run_dir, rank, _world_size(), info,
                                       flush_interval=self.flush_interval, strict=self.strict)
            self._append = self._writer.append
            self._pending = self._writer.pending
            dest = {**self.destination(), **(context or {})}
            self._writer.declare(self.target, dest)
        self.is_initialized = True
        self._fast = (self._writer is not None and not self.strict and not self.echoes
                      and "metric" in self.supported_kinds)

    @check_not_initialized
    def create_logger_context(self, rank: int = 0, **kwargs: Any) -> Any:
        """Initializes the logger context: opens this rank's journal of the run.

        Args:
            rank: global rank of current process, used in distributed environments.
        """
        self._open(rank, kwargs or None)

    def _close(self, status: str) -> None:
        if self._writer is not None:
            release_writer(self._writer, status)
            self._writer = None
            self._append = None
        self._fast = False
        self.is_initialized = False

    def destroy_logger_context(self) -> None:
        """Destroy logger: flush and close this rank's journal session."""
        self._close("finished")

    @check_initialized
    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        """Save hyperparameters (as 'param' records).

        Args:
            params: hyperparameters dictionary.
        """
        if not self.saves_hyperparameters or self._writer is None or not self._worker_allowed():
            return
        for name, value in params.items():
            self._emit(value, name, "param", None, None, {}, self._route)

    def serialize(self, obj: Any, identifier: str) -> str:
        """Pickle `obj` to `savedir/identifier` and return that path. Refuses identifiers that
        would write outside savedir (absolute paths, '..')."""
        rel = names.safe_relpath(identifier, "serialize identifier")
        path = self.savedir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        return str(path)

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
        # The hot path: one scalar metric with plain arguments. Everything else, and every
        # error message, is in _log.
        if (self._fast and kind == "metric" and type(identifier) is str and not kwargs
                and (batch_idx is None or type(batch_idx) is int)
                and (step is None or type(step) is int)):
            if batch_idx is not None and (not self._every or batch_idx % self._every):
                return
            if type(item) is not float:
                item = metric_value(item)
            if identifier not in self._names_ok:
                self._names_ok.add(names.check_name(identifier, "metric name"))
            self._append((_now(), identifier, step, batch_idx, item, self._route))
            if len(self._pending) > BACKLOG:
                self._writer.flush()
            return
        self._log(item, identifier, kind, step, batch_idx, kwargs)

    def _check_call(self, kind: str) -> None:
        if not self.is_initialized:
            raise RuntimeError(
                f"{type(self).__name__}.log() called before the logger was initialized: call "
                "create_logger_context() first or use `with logger.start_logging():`"
            )
        if kind not in ALL_KINDS:
            raise ValueError(f"unknown kind {kind!r}; valid kinds are: {', '.join(ALL_KINDS)}")

    def _supports(self, kind: str) -> bool:
        if kind in self.supported_kinds or kind in self.extra_kinds:
            return True
        if kind not in self._warned_kinds:
            self._warned_kinds.add(kind)
            warnings.warn(f"{type(self).__name__} does not support kind={kind!r}; such calls "
                          f"are skipped (supported: {', '.join(self.supported_kinds)})",
                          stacklevel=4)
        return False

    def _log(self, item: Any, identifier: Any, kind: str, step: Any, batch_idx: Any,
             kwargs: dict[str, Any]) -> None:
        self._check_call(kind)
        step = check_index(step, "step")
        batch_idx = check_index(batch_idx, "batch_idx")
        if not self.should_log(batch_idx) or not self._supports(kind):
            return
        if self._writer is not None and self.strict:
            self._writer.check_healthy()
        items = pairs(item, identifier)
        if kind == "metric" and not kwargs:
            self._emit_metrics(items, step, batch_idx, self._route)
        else:
            for one_item, one_name in items:
                self._emit(one_item, one_name, kind, step, batch_idx, kwargs, self._route)
        if self.echoes:
            for one_item, one_name in items:
                self._echo(one_item, one_name, kind, step)

    def _emit_metrics(self, items: list[tuple[Any, str]], step: int | None,
                      batch_idx: int | None, route: str) -> None:
        """Plain metrics from lists and collections: the hot path's compact records, queued
        together (one timestamp for the call). Every item is checked before any is queued, so
        a bad one fails the call without logging half of it."""
        ok = self._names_ok
        for _, name in items:
            if name not in ok:
                ok.add(names.check_name(name, "metric name"))
        t = _now()
        pending = self._writer.pending
        pending.extend([(t, name, step, batch_idx,
                         value if type(value) is float else metric_value(value), route)
                        for value, name in items])
        if len(pending) > BACKLOG:
            self._writer.flush()

    def _emit(self, item: Any, identifier: str, kind: str, step: int | None,
              batch_idx: int | None, kwargs: dict[str, Any], route: str) -> None:
        """Capture one object and queue its record (every kind but plain metrics)."""
        names.check_name(identifier, f"{kind} identifier")
        if kind == "artifact":
            names.safe_relpath(identifier, "artifact identifier")
        writer = self._writer
        assert writer is not None
        cap = CAPTURE[kind](item, writer.blobs, identifier, kwargs)
        meta = cap.meta
        if kwargs:
            meta = {**(meta or {}), **_kwargs_meta(kwargs)}
        writer.append((_now(), kind, identifier, step, batch_idx, cap.value, cap.text, cap.blob,
                       meta, route))

    def _echo(self, item: Any, identifier: str, kind: str, step: int | None) -> None:
        """Side effect a logger has besides the journal (ConsoleLogger prints)."""


def _kwargs_meta(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`context` is a first-class meta field (Prov4ML); other kwargs are kept under 'kwargs'."""
    meta: dict[str, Any] = {}
    rest = dict(kwargs)
    context = rest.pop("context", None)
    if context is not None:
        meta["context"] = getattr(context, "name", None) or str(context)
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


class ConsoleLogger(Logger):
    """Simplified logger: prints metrics to stdout, and records them in the journal.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
    """

    supported_kinds: tuple[str, ...] = ("torch", "artifact", "metric")
    target = "console"
    saves_hyperparameters = False
    echoes = True

    def __init__(self, savedir: Path | str = "mllogs", log_freq: LogFreq = "epoch",
                 log_on_workers: int | list[int] = 0, *, run_id: str | None = None,
                 flush_interval: float | None = None, strict: bool = False) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         run_id=run_id, flush_interval=flush_interval, strict=strict)

    def _echo(self, item: Any, identifier: str, kind: str, step: int | None) -> None:
        if kind == "metric":
            print(f"ConsoleLogger: {identifier} = {item}")
        else:
            print(f"ConsoleLogger: {kind} {identifier!r} saved in the journal")


class MLFlowLogger(Logger):
    """Records a run for MLflow.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'.
        experiment_name: MLflow experiment name. Defaults to BASE_EXP_NAME.
        tracking_uri: MLflow tracking URI the run is exported to by `itwinai-sync` (which also
            honours MLFLOW_TRACKING_URI and --tracking-uri). Defaults to
            `sqlite:///<savedir>/mlflow.db`.
        run_description: run description.
        run_name: run name.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
    """

    supported_kinds: tuple[str, ...] = ("metric", "figure", "image", "artifact", "torch", "dict",
                                        "param", "text", "model", "dataset")
    target = "mlflow"
    #: Offline there is no MLflow run to attach to: always None.
    active_run: Any = None
    tracking_uri: str

    def __init__(self, savedir: Path | str = "mllogs",
                 experiment_name: str = BASE_EXP_NAME, tracking_uri: str | None = None,
                 run_description: str | None = None, run_name: str | None = None,
                 log_freq: LogFreq = "epoch", log_on_workers: int | list[int] = 0, *,
                 run_id: str | None = None, flush_interval: float | None = None,
                 strict: bool = False) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         experiment_id=experiment_name, run_id=run_id,
                         flush_interval=flush_interval, strict=strict)
        self.experiment_name = experiment_name
        self._explicit_tracking_uri = tracking_uri
        self.tracking_uri = tracking_uri or f"sqlite:///{self.savedir.resolve()}/mlflow.db"
        self.run_description = run_description
        self.run_name = run_name

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
        self._open(rank, {"attach": context} if context else None)
        return None

    def resolve_experiment_id(self) -> str:
        """The experiment's id. Offline this is its name; MLflow assigns the numeric id at
        export time."""
        return self.experiment_name

    @property
    def experiment_id(self) -> str:
        return self.experiment_name


class WandBLogger(Logger):
    """Records a run for Weights & Biases.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'.
        project_name: W&B project. Defaults to BASE_EXP_NAME.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.
        offline_mode: recorded; the journal is always offline, `itwinai-sync --to wandb` decides.
    """

    supported_kinds: tuple[str, ...] = ("watch", "metric", "figure", "image", "torch", "dict",
                                        "param", "text")
    target = "wandb"

    def __init__(self, savedir: Path | str = "mllogs", project_name: str = BASE_EXP_NAME,
                 log_freq: LogFreq = "epoch", log_on_workers: int | list[int] = 0,
                 offline_mode: bool = False, *, run_id: str | None = None,
                 flush_interval: float | None = None, strict: bool = False) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         experiment_id=project_name, run_id=run_id,
                         flush_interval=flush_interval, strict=strict)
        self.project_name = project_name
        self.offline_mode = offline_mode

    def destination(self) -> dict[str, Any]:
        return {"project_name": self.project_name, "offline_mode": self.offline_mode}


class TensorBoardLogger(Logger):
    """Records a run for TensorBoard.

    Args:
        savedir: where the journal is written. Defaults to 'mllogs'.
        log_freq: see `Logger.should_log`. Defaults to 'epoch'.
        framework: 'pytorch' or 'tensorflow' (recorded; the export writes standard event files).
        log_on_workers: -1 for all ranks, an int for that rank, a list of ranks. Defaults to 0.

    Raises:
        ValueError: when framework is not recognized.
    """

    supported_kinds: tuple[str, ...] = ("metric", "image", "text", "figure", "torch")
    target = "tensorboard"

    def __init__(self, savedir: Path | str = "mllogs", log_freq: LogFreq = "epoch",
                 framework: Literal["tensorflow", "pytorch"] = "pytorch",
                 log_on_workers: int | list[int] = 0, *, run_id: str | None = None,
                 flush_interval: float | None = None, strict: bool = False) -> None:
        if framework not in ("tensorflow", "pytorch"):
            raise ValueError(f"Framework {framework!r} not recognized: use 'tensorflow' or "
                             "'pytorch'")
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         run_id=run_id, flush_interval=flush_interval, strict=strict)
        self.framework = framework

    def destination(self) -> dict[str, Any]:
        return {"framework": self.framework}


class Prov4MLLogger(Logger):
    """Records a run for Prov4ML provenance documents.

    Args:
        prov_user_namespace: provenance namespace. Defaults to "www.example.org".
        experiment_name: experiment name. Defaults to "experiment_name".
        provenance_save_dir: where the journal is written (and, by default, the documents).
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
                 flush_interval: float | None = None, strict: bool = False) -> None:
        super().__init__(savedir=provenance_save_dir, log_freq=log_freq,
                         log_on_workers=log_on_workers, experiment_id=experiment_name,
                         run_id=run_id, flush_interval=flush_interval, strict=strict)
        self.prov_user_namespace = prov_user_namespace
        self.experiment_name = experiment_name
        self.provenance_save_dir = provenance_save_dir
        self.save_after_n_logs = save_after_n_logs
        self.create_graph = create_graph
        self.create_svg = create_svg

    def destination(self) -> dict[str, Any]:
        return {"prov_user_namespace": self.prov_user_namespace,
                "experiment_name": self.experiment_name,
                "save_after_n_logs": self.save_after_n_logs,
                "create_graph": self.create_graph, "create_svg": self.create_svg}

    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None,
            context: str | None = "training", **kwargs: Any) -> None:
        """Record `item`; `context` (training, validation, ...) is kept with the record."""
        self._log(item, identifier, kind, step, batch_idx, {"context": context, **kwargs})


class EmptyLogger(Logger):
    """Placeholder logger: every method does nothing and nothing is written."""

    supported_kinds: tuple[str, ...] = ()

    def __init__(self, savedir: Path | str = "mllogs",
                 log_freq: int | Literal["epoch"] | Literal["batch"] = "epoch",
                 log_on_workers: int | list[int] = 0) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers)

    @check_not_initialized
    def create_logger_context(self, rank: int = 0, **kwargs: Any) -> None:
        self.worker_rank = rank
        self.is_initialized = True

    def destroy_logger_context(self) -> None:
        self.is_initialized = False

    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        pass

    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None, **kwargs: Any) -> None:
        pass


class LoggersCollection(Logger):
    """Several loggers used as one. They share one run id, and members writing to the same
    savedir share one journal: a record is written once, marked with the destinations whose
    logger accepted it (kind supported, `should_log` true) when that is not all of them.

    Args:
        loggers: itwinai loggers, at most one of each type.

    Raises:
        ValueError: when multiple loggers of the same type are passed.
    """

    def __init__(self, loggers: list[Logger]) -> None:
        seen: set[type] = set()
        for lg in loggers:
            if type(lg) in seen:
                raise ValueError(f"LoggersCollection got two loggers of type "
                                 f"{type(lg).__name__}; only one of each type is allowed")
            seen.add(type(lg))
        first = loggers[0].savedir if loggers else "mllogs"
        super().__init__(savedir=first, log_freq="batch", log_on_workers=-1)
        self.loggers = loggers
        self._metric_plans: dict[int | None, tuple[list, list]] = {}

    @property
    def supported_kinds(self) -> tuple[str, ...]:  # type: ignore[override]
        """Supported kinds are delegated to the loggers in the collection."""
        return tuple(k for k in ALL_KINDS if any(k in lg.supported_kinds for lg in self.loggers))

    def should_log(self, batch_idx: int | None = None) -> bool:
        """Transparent: each member applies its own `should_log`. Always returns True."""
        return True

    @check_not_initialized
    def create_logger_context(self, rank: int = 0, **kwargs: Any) -> None:
        """Initializes all loggers on one run id and, per savedir, one journal."""
        self.worker_rank = rank
        members = [lg for lg in self.loggers if not isinstance(lg, EmptyLogger)]
        self._run_id = self._run_id or next((lg._run_id for lg in members if lg._run_id), None)
        self._run_id = self._resolve_run_id()
        info: dict[str, Any] = {}
        for lg in members:
            info.update({k: v for k, v in lg.run_info().items() if v})
        experiments = [lg._experiment_id for lg in members if lg._experiment_id]
        experiment = experiments[0] if experiments else BASE_EXP_NAME
        for lg in self.loggers:
            lg._run_id = self._run_id
            lg._journal_experiment = experiment
            lg._run_info_extra = info
            lg.create_logger_context(rank, **kwargs)
        self._declare_collection(members)
        self._metric_plans.clear()
        self.is_initialized = True

    def _declare_collection(self, members: list[Logger]) -> None:
        """Tell each journal of this rank the destinations of the whole collection and which
        journal is the primary one (the first member's): members with their own savedir (a
        Prov4MLLogger's provenance_save_dir) write a second journal of the same run, and the
        sync takes each target's records from the journal of that target's logger only."""
        targets = [lg.target for lg in members]
        for i, group in enumerate(_by_writer([lg for lg in members if lg._writer is not None])):
            group[0]._writer.declare_collection(targets, primary=i == 0)

    def destroy_logger_context(self) -> None:
        """Destroy all loggers."""
        self._close_members("finished")

    def _close(self, status: str) -> None:
        self._close_members(status)

    def _close_members(self, status: str) -> None:
        self._metric_plans.clear()
        for lg in self.loggers:
            if isinstance(lg, EmptyLogger):
                lg.destroy_logger_context()
            else:
                lg._close(status)
        self.is_initialized = False

    @check_initialized
    def save_hyperparameters(self, params: dict[str, Any]) -> None:
        """Save hyperparameters once per journal, for every member that records them."""
        chosen = [lg for lg in self.loggers
                  if lg.saves_hyperparameters and lg._writer is not None and lg._worker_allowed()]
        for writer_members in _by_writer(chosen):
            route = _route(writer_members)
            for name, value in params.items():
                writer_members[0]._emit(value, name, "param", None, None, {}, route)

    def log(self, item: Any | list[Any], identifier: str | list[str], kind: str = "metric",
            step: int | None = None, batch_idx: int | None = None, **kwargs: Any) -> None:
        """Log on all loggers: once per journal, for the members that accept the call."""
        if (kind == "metric" and type(identifier) is str and not kwargs and self.is_initialized
                and (batch_idx is None or type(batch_idx) is int)
                and (step is None or type(step) is int)):
            # The hot path: which journals get the record, with which route, depends only on
            # batch_idx once the members are initialised, so the plan is cached per batch_idx.
            plan = self._metric_plans.get(batch_idx)
            if plan is None:
                plan = self._metric_plan(batch_idx)
            writes, echoes = plan
            if not writes and not echoes:
                return
            if type(item) is not float:
                item = metric_value(item)
            if identifier not in self._names_ok:
                self._names_ok.add(names.check_name(identifier, "metric name"))
            t = _now()
            for writer, route in writes:
                writer.append((t, identifier, step, batch_idx, item, route))
                if len(writer.pending) > BACKLOG:
                    writer.flush()
            for lg in echoes:
                lg._echo(item, identifier, kind, step)
            return
        self._check_call(kind)
        step = check_index(step, "step")
        batch_idx = check_index(batch_idx, "batch_idx")
        accepting = self._accepting(kind, batch_idx)
        if not accepting:
            return
        items = pairs(item, identifier)
        for writer_members in _by_writer(accepting):
            first, route = writer_members[0], _route(writer_members)
            if kind == "metric" and not kwargs:
                first._emit_metrics(items, step, batch_idx, route)
                continue
            for one_item, one_name in items:
                first._emit(one_item, one_name, kind, step, batch_idx, kwargs, route)
        for lg in accepting:
            if lg.echoes:
                for one_item, one_name in items:
                    lg._echo(one_item, one_name, kind, step)

    def _accepting(self, kind: str, batch_idx: int | None) -> list[Logger]:
        return [lg for lg in self.loggers
                if lg._writer is not None
                and (kind in lg.supported_kinds or kind in lg.extra_kinds)
                and lg.should_log(batch_idx)]

    def _metric_plan(self, batch_idx: int | None) -> tuple[list, list]:
        accepting = self._accepting("metric", batch_idx)
        writes = [(group[0]._writer, _route(group)) for group in _by_writer(accepting)]
        plan = (writes, [lg for lg in accepting if lg.echoes])
        if len(self._metric_plans) > 100_000:  # bounded: batch_idx values are few in practice
            self._metric_plans.clear()
        self._metric_plans[batch_idx] = plan
        return plan


def _route(loggers: list[Logger]) -> str:
    return ",".join(sorted({lg.target for lg in loggers}))


def _by_writer(loggers: list[Logger]) -> list[list[Logger]]:
    groups: dict[int, list[Logger]] = {}
    for lg in loggers:
        groups.setdefault(id(lg._writer), []).append(lg)
    return list(groups.values())


def get_mlflow_logger(logger: Logger | None) -> MLFlowLogger | None:
    """Finds and returns the MLFlowLogger if present in the given logger."""
    if isinstance(logger, MLFlowLogger):
        return logger
    if isinstance(logger, LoggersCollection):
        return next((lg for lg in logger.loggers if isinstance(lg, MLFlowLogger)), None)
    return None


__all__ = [
    "BASE_EXP_NAME", "LogMixin", "Logger", "ConsoleLogger", "MLFlowLogger", "WandBLogger",
    "TensorBoardLogger", "Prov4MLLogger", "LoggersCollection", "EmptyLogger",
    "get_mlflow_logger", "check_initialized", "check_not_initialized",
]
