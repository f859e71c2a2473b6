"""The journal-writing base of every logger of this package: the journal of one rank of one
run, opened by `create_logger_context` when itwinai would initialise its tracker, and the
`log()` path (its metric hot path, and the capture of every other kind)."""

from __future__ import annotations

import enum
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

from itwinai_journal.capture import sampler
from itwinai_journal.capture.context import CaptureContext
from itwinai_journal.capture.kinds import CAPTURE
from itwinai_journal.capture.media import capture_image
from itwinai_journal.capture.numbers import NotAPlainMetric, index_value, metric_value
from itwinai_journal.capture.text import json_text_fields
from itwinai_journal.capture.values import metric_fields
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

from .base import (
    BASE_EXP_NAME,
    FAST_PATH_HOOKS,
    HOOKS,
    STATE,
    JournalWarning,
    LogFreq,
    Logger,
    check_initialized,
    check_not_initialized,
    live_loggers,
    not_initialized_error,
    own_hooks,
    warn_from_caller,
)

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


def _world_size() -> int:
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


class JournalOptions(TypedDict, total=False):
    """The keyword-only options every journal logger takes besides itwinai's arguments (see
    `_JournalLogger`); the backends pass them through as `**options`."""

    run_id: str | None
    flush_interval: float | None
    strict: bool
    system_metrics_interval: float | None
    live_sync: live.LiveSetting


def journal_options(owner: str, options: dict[str, Any]) -> JournalOptions:
    """A backend's `**options`, checked: a keyword that is not one of `JournalOptions` is the
    TypeError Python raises for a keyword a signature does not take, naming the backend
    (`ConsoleLogger.__init__()`), as itwinai's loggers do; so `experiment_id=` or a misspelt
    option never reaches the base, where it would be taken or named wrongly."""
    for key in options:
        if key not in JournalOptions.__annotations__:
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {key!r}")
    return options  # type: ignore[return-value]


class _JournalLogger(Logger):
    """What every logger of this package shares: the journal of one rank of one run, opened by
    `create_logger_context` when itwinai would initialise its tracker, and the `log()` path.

    The journal is `<journal_savedir>/<experiment>/<run_id>/rank-<r>/`; `journal_savedir` is
    the `savedir` given to the constructor, while the `savedir` attribute is itwinai's (for
    example `<savedir>/mlflow`), so code that reads it finds what it found with itwinai.
    Extra keyword-only options: `run_id` (else ITWINAI_RUN_ID, the launcher, rank 0 through
    torch.distributed, or a new time-sortable id), `flush_interval` (seconds after which a
    record survives SIGKILL, default 1), `strict` (raise on journal write errors),
    `system_metrics_interval` (seconds between background system-metrics samples, 0 for none;
    default ITWINAI_SYSTEM_METRICS_INTERVAL, else 10: see capture/sampler.py).
    `live_sync` (sync to the trackers while the job runs, from a sidecar process: see
    itwinai_journal.writer.live; default: the ITWINAI_SYNC_LIVE variable, else off). The
    backends take them as `**options` (see `JournalOptions`).

    Protected interface, for `LoggersCollection` (which writes the records of the members that
    replace no hook itself, once per journal) and nothing else: `_journal` (the open writer,
    opened lazily), `_record` and `_hand_over` (build and queue a call's records),
    `_ended_under`, `_ignores`, `_echo`, `_close` and `_mark` (end the session, or set the
    status it ends with), `_observe`, `_join` (take the collection's run), `_named_experiment`
    and `_open_writers`. Code outside the package uses `end_session` and `flush`.
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
        # A MLFlowLogger has 30 instance attributes, the most whose keys CPython 3.11 shares
        # between instances (SHARED_KEYS_MAX_SIZE): one more makes every attribute read of the
        # hot path slower (measured: 1-2% on `log()` of a metric). Derive anything else.
        self._writer: RankWriter | None = None
        self._append: Callable[[tuple], None] | None = None
        self._pending: Any = None
        #: "metric" when the hot path is open to this logger, else None (see _state_changed)
        self._fast: str | None = None
        self._every = 0
        #: collections holding this logger, told when its fast path changes (see _observe)
        self._observers: list[_JournalLogger] = []
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
        #: Seconds between system-metrics samples, None when off (see capture/sampler.py).
        self.system_metrics_interval = sampler.configured_interval(system_metrics_interval)
        self.live_sync = live_sync
        self.journal_savedir = Path(savedir)
        sub = self.journal_savedir / self.savedir_name if self.savedir_name else savedir
        super().__init__(savedir=sub, log_freq=log_freq, log_on_workers=log_on_workers,
                         experiment_id=experiment_id,
                         run_id=None if run_id is None else str(run_id))
        live_loggers.add(self)

    # -- state read by should_log: the fast path is recomputed when it changes ----------------

    def __setattr__(self, name: str, value: Any) -> None:
        """Plain attributes, read at plain-attribute speed by should_log; setting one that
        should_log or the fast path depends on (a hook replaced on the instance, too)
        recomputes the fast path (log() itself never sets attributes)."""
        object.__setattr__(self, name, value)
        if name in STATE or name in HOOKS or name == "__class__":
            if name == "log_on_workers":
                self._check_workers(value)
            self._state_changed()

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        if name in HOOKS:  # an instance's own hook removed (a patch undone)
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
                and own_hooks(self, FAST_PATH_HOOKS)
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
        sampler.attach(self._writer, self.system_metrics_interval)
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
            sampler.wake()
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

    def _capture_context(self) -> CaptureContext:
        """What the capture of a record gets: this logger's journal session (opened now if
        needed). Made per record, not kept: see the note on attributes in __init__."""
        return CaptureContext.of_writer(self._journal())

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
            warn_from_caller(message, category)

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
            raise not_initialized_error(self)
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
            ctx = self._capture_context()
            try:
                if kind == "image":
                    cap = capture_image(item, ctx, identifier, options or {},
                                        numpy_layout=self.numpy_image_layout)
                else:
                    cap = CAPTURE[kind](item, ctx, identifier, options or {})
            except TypeError as e:
                if not any_object or kind == "watch":  # wandb.watch takes modules only
                    raise
                self._warn_once(f"any:{kind}", f"{type(self).__name__}: {e}; W&B takes any "
                                "object, so the journal keeps it as a text record of its JSON "
                                f"(meta['logged_as'] = {kind!r})")
                record_kind, cap = "text", json_text_fields(item, ctx.blobs, kind)
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

    # -- the member interface: what a LoggersCollection does with its members -------------------

    def _observe(self, collection: _JournalLogger, on: bool = True) -> None:
        """Tell (or stop telling) `collection` when this logger's fast path changes."""
        if on and collection not in self._observers:
            self._observers.append(collection)
        elif not on and collection in self._observers:
            self._observers.remove(collection)

    def _named_experiment(self) -> str | None:
        """The experiment named to the constructor, if any."""
        return self._experiment_id

    def _join(self, run_id: str, experiment: str, run_info: dict[str, Any],
              collection: tuple[list[str], bool]) -> None:
        """Journal as a member of a collection: its run id and experiment, the run facts of
        all its members, and (destinations of the whole collection, whether this journal is
        its primary one; see RankWriter.declare_collection)."""
        self._run_id = run_id
        self._journal_experiment = experiment
        self._run_info_extra = run_info
        self._collection = collection

    def _open_writers(self) -> list[RankWriter]:
        """The journal writers this logger has open (none before its journal is opened)."""
        return [] if self._writer is None else [self._writer]

    # -- public: what the Lightning adapter (and any code driving a logger) may use ------------

    def end_session(self, status: str = "finished") -> None:
        """End the journal session with `status` ('finished', 'failed', 'interrupted'); the
        logger is then uninitialized. Unlike `destroy_logger_context`, whatever `should_log`
        says."""
        self._close(status)

    def flush(self, wait: bool = True) -> None:
        """Have the records logged so far written to the active segment. Without `wait`, the
        journal's flusher thread is woken and this returns at once (Lightning's save() after
        every step must not wait for a thread switch)."""
        for writer in self._open_writers():
            writer.flush(wait=wait)


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

