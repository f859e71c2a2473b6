"""`TensorBoardLogger`: records a run for TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from itwinai_journal.capture.media import numpy_image_layout
from itwinai_journal.capture.origin import is_torch_module, module_of

from .base import LogFreq
from .journal import JournalOptions, _JournalLogger, journal_options

if TYPE_CHECKING:
    from typing_extensions import Unpack


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
                 log_on_workers: int | list[int] = 0,
                 **options: Unpack[JournalOptions]) -> None:
        super().__init__(savedir=savedir, log_freq=log_freq, log_on_workers=log_on_workers,
                         **journal_options("TensorBoardLogger", options))
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
        if kind == "torch" and not is_torch_module(item):
            return "add_graph takes a torch.nn.Module"
        return None


