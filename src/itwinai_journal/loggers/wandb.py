"""`WandBLogger`: records a run for Weights & Biases."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from itwinai_journal.capture.origin import module_of

from .base import BASE_EXP_NAME, LogFreq
from .journal import JournalOptions, _JournalLogger, journal_options

if TYPE_CHECKING:
    from typing_extensions import Unpack


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
                 offline_mode: bool = False,
                 **options: Unpack[JournalOptions]) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         experiment_id=project_name, **journal_options("WandBLogger", options))
        self.project_name = project_name
        self.offline_mode = offline_mode

    def destination(self) -> dict[str, Any]:
        return {"project_name": self.project_name, "offline_mode": self.offline_mode}

    def _reference_fails(self, item: Any, kind: str) -> str | None:
        if kind == "image" and module_of(item) == "PIL":
            return "wandb.log takes a PIL image only wrapped in wandb.Image"
        return None


