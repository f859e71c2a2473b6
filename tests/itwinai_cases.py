"""The calls of the itwinai conformance check, shared by the recorder that runs them through
itwinai 0.4.2 (`scripts/record_itwinai_reference.py`, in the reference virtualenv) and by
`tests/test_itwinai_conformance.py`, which runs the same calls through `itwinai_journal.loggers`
and compares with the recording (`tests/reference/loggers-itwinai-0.4.2.json`).

Nothing here imports a tracker or itwinai: `mod` is the loggers module under test, and the objects
to log are built by small factories (torch, numpy, PIL and matplotlib are in both environments).
"""

from __future__ import annotations

import decimal
import fractions
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Logger classes of the matrix, built by name for a module and a working directory. Every
#: logger logs every batch (`log_freq='batch'`) so that `batch_idx` cases reach the tracker.
CLASSES = ("ConsoleLogger", "MLFlowLogger", "WandBLogger", "TensorBoardLogger", "Prov4MLLogger",
           "EmptyLogger", "LoggersCollection")


def make_logger(mod: Any, cls: str, workdir: Path, **options: Any) -> Any:
    savedir = str(workdir / "mllogs")
    if cls == "MLFlowLogger":
        return mod.MLFlowLogger(savedir=savedir, experiment_name="conformance",
                                log_freq="batch", **options)
    if cls == "WandBLogger":
        return mod.WandBLogger(savedir=savedir, project_name="conformance", log_freq="batch",
                               offline_mode=True, **options)
    if cls == "Prov4MLLogger":
        return mod.Prov4MLLogger(provenance_save_dir=str(workdir / "mllogs" / "prov_logs"),
                                 experiment_name="conformance", log_freq="batch",
                                 create_graph=False, create_svg=False, **options)
    if cls == "LoggersCollection":
        return mod.LoggersCollection([
            mod.MLFlowLogger(savedir=savedir, experiment_name="conformance", log_freq="batch",
                             **options),
            mod.TensorBoardLogger(savedir=savedir, log_freq="batch", **options),
            mod.WandBLogger(savedir=savedir, project_name="conformance", log_freq="batch",
                            offline_mode=True, **options),
        ])
    return getattr(mod, cls)(savedir=savedir, log_freq="batch", **options)


# -- objects to log ---------------------------------------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def _np() -> Any:
    import numpy as np

    return np


def _model() -> Any:
    torch = _torch()
    torch.manual_seed(0)
    return torch.nn.Linear(2, 2)


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def _pil() -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8), (10, 20, 30))


def _artifact_file(workdir: Path) -> str:
    path = workdir / "artifact.txt"
    path.write_text("artifact body\n")
    return str(path)


def _dataset() -> Any:
    torch = _torch()
    from torch.utils.data import TensorDataset

    return TensorDataset(torch.zeros(4, 2), torch.zeros(4))


def _batch() -> Any:
    torch = _torch()
    return torch.zeros(4, 2), torch.zeros(4)


def _loader() -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(_dataset(), batch_size=2)


Factory = Callable[[Path], Any]


def const(value: Any) -> Factory:
    return lambda workdir: value


@dataclass(frozen=True)
class Call:
    """One `log()` call; `item`, `step` and `batch_idx` are built by factories."""

    case: str
    item: Factory
    identifier: Any
    kind: str = "metric"
    step: Factory = const(None)
    batch_idx: Factory = const(None)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def arguments(self, workdir: Path) -> tuple[tuple, dict[str, Any]]:
        """Positional and keyword arguments of `log()` for this call."""
        return ((self.item(workdir), self.identifier),
                {"kind": self.kind, "step": self.step(workdir),
                 "batch_idx": self.batch_idx(workdir), **self.kwargs})


def _kinds() -> list[Call]:
    """Every kind of the reference's Table 1, an unknown one, and a typical object for each."""
    np, torch = _np, _torch
    return [
        Call("kind-metric", const(0.5), "k_metric", step=const(1)),
        Call("kind-torch", lambda w: torch().tensor([1.0, 2.0]), "k_torch", kind="torch"),
        Call("kind-artifact", _artifact_file, "k_artifact", kind="artifact"),
        Call("kind-figure", lambda w: _figure(), "k_figure", kind="figure", step=const(1)),
        Call("kind-image-pil", lambda w: _pil(), "k_image_pil.png", kind="image", step=const(1)),
        Call("kind-image-hwc", lambda w: np().zeros((8, 8, 3), dtype=np().uint8),
             "k_image_hwc.png", kind="image", step=const(1)),
        Call("kind-image-chw", lambda w: torch().zeros(3, 8, 8), "k_image_chw.png",
             kind="image", step=const(1)),
        Call("kind-param", const(0.1), "k_param", kind="param"),
        Call("kind-text", const("hello"), "k_text.txt", kind="text", step=const(1)),
        Call("kind-dict", const({"a": 1, "b": [1, 2]}), "k_dict.json", kind="dict"),
        Call("kind-model", lambda w: _model(), "k_model", kind="model"),
        Call("kind-best_model", lambda w: _model(), "k_best_model", kind="best_model"),
        Call("kind-dataset-numpy", lambda w: np().zeros((4, 2)), "k_dataset", kind="dataset"),
        Call("kind-watch", lambda w: _model(), "k_watch", kind="watch"),
        Call("kind-flops_pb", lambda w: (_model(), _batch()), "k_flops_pb",
             kind="flops_pb", step=const(1)),
        Call("kind-flops_pe", lambda w: (_model(), _dataset()), "k_flops_pe", kind="flops_pe",
             step=const(1)),
        Call("kind-system", const(None), "k_system", kind="system", step=const(1)),
        Call("kind-carbon", const(None), "k_carbon", kind="carbon", step=const(1)),
        Call("kind-execution_time", const(None), "k_execution_time", kind="execution_time",
             step=const(1)),
        Call("kind-prov_documents", const(None), "k_prov_documents", kind="prov_documents"),
        Call("kind-torch-dataloader", lambda w: _loader(), "k_loader", kind="torch"),
        Call("kind-unknown", lambda w: _model(), "k_unknown", kind="model_version"),
    ]


def _identifier_none() -> list[Call]:
    """`identifier=None`: the kinds itwinai's trackers log without a label."""
    torch = _torch
    return [
        Call("none-metric", const(0.5), None),
        Call("none-system", const(None), None, kind="system", step=const(2)),
        Call("none-carbon", const(None), None, kind="carbon", step=const(2)),
        Call("none-prov_documents", const(None), None, kind="prov_documents"),
        Call("none-execution_time", const(None), None, kind="execution_time", step=const(2)),
        Call("none-watch", lambda w: _model(), None, kind="watch"),
        Call("none-torch", lambda w: torch().tensor([1.0]), None, kind="torch"),
        Call("none-model", lambda w: _model(), None, kind="model"),
        Call("none-best_model", lambda w: _model(), None, kind="best_model"),
        Call("none-flops_pb", lambda w: (_model(), _batch()), None, kind="flops_pb"),
        Call("none-param", const(1), None, kind="param"),
        Call("none-text", const("x"), None, kind="text"),
    ]


def _metric_values() -> list[Call]:
    """Metric values of every numeric type a tracker might take (name `v_<case>`)."""
    np, torch = _np, _torch
    values: list[tuple[str, Factory]] = [
        ("float", const(0.5)),
        ("int", const(3)),
        ("big-int", const(2**70)),
        ("bool", const(True)),
        ("np-float16", lambda w: np().float16(0.5)),
        ("np-float32", lambda w: np().float32(0.1)),
        ("np-longdouble", lambda w: np().longdouble(0.5)),
        ("np-int8", lambda w: np().int8(-3)),
        ("np-uint64", lambda w: np().uint64(2**63)),
        ("np-bool", lambda w: np().bool_(True)),
        ("np-complex-real", lambda w: np().complex128(1.5 + 0j)),
        ("np-complex", lambda w: np().complex128(1.5 + 2j)),
        ("py-complex-real", const(1.5 + 0j)),
        ("py-complex", const(1.5 + 2j)),
        ("decimal", const(decimal.Decimal("0.25"))),
        ("fraction", const(fractions.Fraction(1, 4))),
        ("str-number", const("0.5")),
        ("str-word", const("abc")),
        ("none", const(None)),
        ("list", const([0.5])),
        ("torch-0d", lambda w: torch().tensor(0.5)),
        ("torch-1el", lambda w: torch().tensor([0.5])),
        ("torch-1x1", lambda w: torch().tensor([[0.5]])),
        ("torch-int", lambda w: torch().tensor(3)),
        ("torch-bool", lambda w: torch().tensor(True)),
        ("torch-grad", lambda w: torch().tensor([1.5], requires_grad=True) * 2),
        ("torch-2el", lambda w: torch().tensor([0.5, 1.0])),
        ("torch-complex", lambda w: torch().tensor(1.5 + 2j)),
        ("np-0d", lambda w: np().array(0.5)),
        ("np-1el", lambda w: np().array([0.5])),
        ("np-1x1", lambda w: np().array([[0.5]])),
        ("np-2el", lambda w: np().array([0.5, 1.0])),
        ("nan", const(float("nan"))),
    ]
    return [Call(f"value-{name}", item, f"v_{name}", step=const(1)) for name, item in values]


def _steps() -> list[Call]:
    """`step` and `batch_idx` of every type a training loop might pass."""
    np, torch = _np, _torch
    indices: list[tuple[str, Factory]] = [
        ("int", const(3)),
        ("float-integral", const(3.0)),
        ("float-fraction", const(1.5)),
        ("negative", const(-1)),
        ("int64-max", const(2**63 - 1)),
        ("beyond-int64", const(2**63)),
        ("below-int64", const(-(2**63) - 1)),
        ("np-int64", lambda w: np().int64(5)),
        ("np-uint8", lambda w: np().uint8(5)),
        ("np-float64", lambda w: np().float64(2.0)),
        ("torch-int", lambda w: torch().tensor(5)),
        ("bool", const(True)),
        ("str", const("3")),
    ]
    calls = [Call(f"step-{name}", const(0.5), f"s_{name}", step=idx) for name, idx in indices]
    calls += [Call(f"batch-{name}", const(0.5), f"b_{name}", batch_idx=idx)
              for name, idx in indices]
    return calls


def _names_and_text() -> list[Call]:
    """Identifiers and texts a journal must store or refuse (lone surrogates, as
    os.fsdecode produces, control characters, lengths, non-strings)."""
    return [
        Call("name-pairwise", const([1.0, 2.0]), ["p_a", "p_b"]),
        Call("name-surrogate", const(0.5), "bad\udcff"),
        Call("name-empty", const(0.5), ""),
        Call("name-slash", const(0.5), "a/b"),
        Call("name-newline", const(0.5), "a\nb"),
        Call("name-long", const(0.5), "n" * 5000),
        Call("name-int", const(0.5), 5),
        Call("text-surrogate", const("t\udcff"), "t_surrogate.txt", kind="text"),
        Call("param-surrogate", const("v\udcff"), "p_surrogate", kind="param"),
        Call("dict-surrogate-key", const({"k\udcff": 1}), "d_surrogate_key.json", kind="dict"),
        Call("dict-surrogate-value", const({"k": "v\udcff"}), "d_surrogate_value.json",
             kind="dict"),
        Call("kwarg-targets", const(0.5), "kw_targets", kwargs={"targets": ["mlflow"]}),
        Call("kwarg-other", const(0.5), "kw_other", kwargs={"anything": 1}),
    ]


def _contexts() -> list[Call]:
    """Prov4ML's `context` as an enum member's name in any case, or None."""
    return [
        Call("context-lower", const(0.5), "c_lower", kwargs={"context": "validation"}),
        Call("context-upper", const(0.5), "c_upper", kwargs={"context": "VALIDATION"}),
        Call("context-unknown", const(0.5), "c_unknown", kwargs={"context": "finetune"}),
        Call("context-none", const(0.5), "c_none", kwargs={"context": None}),
    ]


def log_calls() -> list[Call]:
    return _kinds() + _identifier_none() + _metric_values() + _steps() + _names_and_text() + \
        _contexts()


# -- lifecycle sequences ----------------------------------------------------------------------

#: A sequence is a list of operations on a fresh logger; each op is (method, args...):
#: ("create", rank), ("destroy",), ("log", value, name, batch_idx), ("hp", params),
#: ("start_logging", rank, [inner ops]). Constructor options go with the sequence.
SEQUENCES: dict[str, tuple[dict[str, Any], list[tuple]]] = {
    "log-before-init": ({}, [("log", 0.5, "m", None)]),
    "hp-before-init": ({}, [("hp", {"a": 1})]),
    "destroy-before-init": ({}, [("destroy",)]),
    "double-init": ({}, [("create", 0), ("create", 0), ("log", 0.5, "m", None), ("destroy",)]),
    "use-after-destroy": ({}, [("create", 0), ("destroy",), ("log", 0.5, "m", None),
                               ("hp", {"a": 1}), ("destroy",), ("create", 0),
                               ("log", 0.5, "m2", None), ("destroy",)]),
    "other-rank": ({"log_on_workers": 1}, [("create", 0), ("log", 0.5, "m", None),
                                           ("hp", {"a": 1}), ("destroy",),
                                           ("log", 0.5, "m", None), ("create", 0)]),
    "workers-list-minus-one": ({"log_on_workers": [-1]},
                               [("create", 0), ("log", 0.5, "m", None), ("destroy",)]),
    "workers-tuple": ({"log_on_workers": (0, 1)},
                      [("create", 0), ("log", 0.5, "m", None), ("destroy",)]),
    "workers-list": ({"log_on_workers": [0, 1]},
                     [("create", 1), ("log", 0.5, "m", None), ("destroy",)]),
    "start-logging": ({}, [("start_logging", 0, [("log", 0.5, "m", None)]),
                           ("log", 0.5, "after", None)]),
}


def even_batches(base: type) -> type:
    """A user subclass of `base` whose should_log accepts only even batch indices: itwinai
    asks it at create_logger_context (without batch_idx: no, so no tracker run is started)
    and at every log()."""

    class EvenBatches(base):  # type: ignore[misc, valid-type]
        def should_log(self, batch_idx: int | None = None) -> bool:
            return batch_idx is not None and batch_idx % 2 == 0

    return EvenBatches


#: What is done with an `even_batches` logger.
OVERRIDE_OPS = [("create", 0), ("log", 0.5, "odd", 1), ("log", 0.5, "even", 2),
                ("log", 0.5, "none", None), ("destroy",)]


#: (log_freq, log_on_workers, rank, batch_idx) combinations for should_log, on a plain logger.
def should_log_grid() -> list[tuple[Any, Any, int, Any]]:
    grid = []
    for log_freq in ("epoch", "batch", 1, 3, True):
        for workers, rank in ((0, 0), (0, 1), (-1, 5), ([0, 2], 2), ([-1], 0), ((0,), 0),
                              (True, 1), ([], 0)):
            for batch_idx in (None, 0, 1, 3, 3.0, 4.5, -3):
                grid.append((log_freq, workers, rank, batch_idx))
    return grid


#: Values given to `log_freq` at construction: accepted (True) or a ValueError (False).
LOG_FREQ_VALUES: list[Any] = ["epoch", "batch", 1, 5, True, 0, -1, 1.0, 2.5, "Epoch", None]


def apply_op(logger: Any, op: tuple) -> None:
    """One step of a lifecycle sequence (SEQUENCES, OVERRIDE_OPS) on `logger`: the same for
    itwinai's loggers when recording and for ours when testing."""
    if op[0] == "create":
        logger.create_logger_context(rank=op[1])
    elif op[0] == "destroy":
        logger.destroy_logger_context()
    elif op[0] == "log":
        logger.log(op[1], op[2], batch_idx=op[3])
    elif op[0] == "hp":
        logger.save_hyperparameters(op[1])
    elif op[0] == "start_logging":
        with logger.start_logging(rank=op[1]):
            for inner in op[2]:
                apply_op(logger, inner)
    else:
        raise ValueError(op)
