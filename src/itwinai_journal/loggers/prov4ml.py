"""`Prov4MLLogger`: records a run for Prov4ML provenance documents (its measured kinds are
measured at `log()` time: see itwinai_journal.capture)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from itwinai_journal.capture import start

from .base import LogFreq
from .journal import (
    DEFAULT_CONTEXT,
    PROV4ML_CONTEXTS,
    JournalOptions,
    _JournalLogger,
    context_name,
    journal_options,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack


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
                 log_on_workers: int | list[int] = 0,
                 **options: Unpack[JournalOptions]) -> None:
        super().__init__(savedir=provenance_save_dir, log_freq=log_freq,
                         log_on_workers=log_on_workers, experiment_id=experiment_name,
                         **journal_options("Prov4MLLogger", options))
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
        start.begin_session(self._capture_context())

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


