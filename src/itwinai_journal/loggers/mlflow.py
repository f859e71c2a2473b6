"""`MLFlowLogger`: records a run for MLflow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from itwinai_journal.capture.origin import is_torch_module, module_of

from .base import (
    BASE_EXP_NAME,
    LogFreq,
    check_initialized,
    check_not_initialized,
    own_hooks,
    py_logger,
)
from .journal import JournalOptions, _JournalLogger, journal_options

if TYPE_CHECKING:
    from typing_extensions import Unpack


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
                 log_freq: LogFreq = "epoch", log_on_workers: int | list[int] = 0,
                 **options: Unpack[JournalOptions]) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         experiment_id=experiment_name, **journal_options("MLFlowLogger", options))
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
        if not own_hooks(self, ("log",)):
            if self.should_log():
                for name, value in params.items():
                    self.log(item=value, identifier=name, step=0, kind="param")
            return
        super().save_hyperparameters(params)

    def _ignores(self, item: Any, kind: str) -> bool:
        """itwinai's MLFlowLogger logs torch modules as models and MLflow datasets as inputs;
        it warns about anything else and ignores it."""
        if kind == "model" and not is_torch_module(item):
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


