"""`LoggersCollection`: several loggers used as one, writing each record once per journal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from itwinai_journal.capture.numbers import NotAPlainMetric, metric_value
from itwinai_journal.format.schema import ALL_KINDS
from itwinai_journal.writer.rank import BACKLOG, RankWriter

from .base import (
    BASE_EXP_NAME,
    Logger,
    check_initialized,
    check_not_initialized,
    not_initialized_error,
    own_hooks,
)
from .journal import COMPACT_MAX, COMPACT_MIN, _Call, _JournalLogger, _now
from .mlflow import MLFlowLogger


class LoggersCollection(_JournalLogger):
    """Several loggers used as one, sharing one run id. Members that are loggers of this package
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

    def journal_experiment(self) -> str:
        """The experiment every member journals to: the first member's that names one."""
        if self._journal_experiment:
            return self._journal_experiment
        named = (lg._named_experiment() for lg in self.loggers if isinstance(lg, _JournalLogger))
        return next((name for name in named if name), BASE_EXP_NAME)

    def _open_writers(self) -> list[RankWriter]:
        """The members' open journal writers, each once (members may share one)."""
        found: dict[int, RankWriter] = {}
        for lg in self.loggers:
            if isinstance(lg, _JournalLogger):
                for writer in lg._open_writers():
                    found.setdefault(id(writer), writer)
        return list(found.values())

    def should_log(self, batch_idx: int | None = None) -> bool:
        """Transparent: each member applies its own `should_log`. Always returns True."""
        return True

    def _split_members(self) -> None:
        """Which members share journals and get their records written by the collection
        (`_plain`: loggers of this package replacing no hook) and which get their own methods
        called (`_custom`). Done at create_logger_context, and again when a hook is replaced
        on a member's class or instance (see `_state_changed`), so a patch made mid-run is
        honoured from the next call on."""
        plain = [lg for lg in self.loggers if isinstance(lg, _JournalLogger)
                 and not isinstance(lg, LoggersCollection) and own_hooks(lg)]
        for lg in self._plain:
            if lg not in plain:
                lg._observe(self, False)
        for lg in plain:
            lg._observe(self)
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
        self._run_id = self._run_id or next((lg.run_id for lg in journals if lg.run_id), None)
        self._run_id = self._resolve_run_id()
        info: dict[str, Any] = {}
        for lg in journals:
            info.update({k: v for k, v in lg.run_info().items() if v})
        experiment = self._journal_experiment = self.journal_experiment()
        # Members with their own savedir (a Prov4MLLogger's provenance_save_dir) write a
        # second journal of the same run: each journal records the destinations of the whole
        # collection and whether it is the primary one (the first member's), so that the sync
        # takes each target's records from the journal of that target's logger only.
        targets = [lg.target for lg in journals]
        primary = journals[0].journal_savedir.resolve() if journals else None
        for lg in journals:
            lg._join(self._run_id, experiment, info,
                     (targets, lg.journal_savedir.resolve() == primary))
        self._split_members()
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
            lg._observe(self, False)
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
            raise not_initialized_error(self)
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
        writes = [(group[0]._journal(), _route(group)) for group in _by_writer(accepting)]
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


