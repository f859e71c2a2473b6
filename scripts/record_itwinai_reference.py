"""Record what itwinai 0.4.2's loggers do with the calls of `tests/itwinai_cases.py`.

Run with the interpreter of a virtualenv that has itwinai 0.4.2 and its trackers (not this
project's .venv, whose torch is pinned to another version):

    /path/to/itwinai-venv/bin/python scripts/record_itwinai_reference.py [-o OUT.json]

Everything happens under a temporary directory: MLflow writes to a sqlite file there, W&B runs
offline there, yprov4ml and TensorBoard write there; nothing reaches the network. Each logger
class runs in its own process (W&B, MLflow and yprov4ml keep global state). For every call the
recording keeps whether itwinai raised (exception type and message), else which tracker
functions it called (with the arguments that matter: names, steps, values as the tracker
stores them), and the warnings it logged. `tests/test_itwinai_conformance.py` replays the same
calls through `itwinai_journal.loggers` and compares with `tests/itwinai_reference.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import itwinai_cases as cases  # noqa: E402

DEFAULT_OUT = ROOT / "tests" / "itwinai_reference.json"


def short(value: Any) -> Any:
    """A JSON-able, deterministic description of an argument a tracker received."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()[:120]
    if isinstance(value, (list, tuple)):
        return [short(v) for v in value[:8]]
    if isinstance(value, dict):
        return {short(k): short(v) for k, v in list(value.items())[:8]}
    if hasattr(value, "name") and type(value).__module__.startswith("yprov4ml"):
        return f"Context.{value.name}"
    return f"<{type(value).__module__.split('.')[0]}.{type(value).__name__}>"


class Recorder:
    """Spies on the tracker functions itwinai calls; collects what one call did."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.calls: list[dict[str, Any]] = []
        self.logged: list[str] = []

    def clean(self, text: str) -> str:
        return text.replace(str(self.workdir.resolve()), "<WORKDIR>").replace(
            str(self.workdir), "<WORKDIR>")

    def spy(self, owner: Any, name: str, label: str, keep: tuple[str, ...] = (),
            derive: Any = None) -> None:
        original = getattr(owner, name)
        recorder = self

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            entry: dict[str, Any] = {"fn": label}
            for key in keep:
                if key in kwargs:
                    entry[key] = short(kwargs[key])
            if derive is not None:
                with contextlib.suppress(Exception):
                    entry.update(derive(*args, **kwargs))
            recorder.calls.append(entry)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def take(self) -> tuple[list[dict[str, Any]], list[str]]:
        calls, logged = self.calls, self.logged
        self.calls, self.logged = [], []
        return calls, logged


class _Capture(logging.Handler):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.DEBUG)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.INFO and record.name.startswith("itwinai"):
            self.recorder.logged.append(
                f"{record.levelname}: {self.recorder.clean(record.getMessage())[:200]}")


def install_spies(rec: Recorder) -> None:
    import shutil

    import mlflow
    import mlflow.pytorch
    import torch
    import yprov4ml
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard import summary as tb_summary

    def mlflow_metric(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"stored": short(float(kwargs["value"]))}

    for name in ("log_param", "log_artifact", "log_dict", "log_figure", "log_image",
                 "log_text", "log_input"):
        rec.spy(mlflow, name, f"mlflow.{name}", ("key", "artifact_file", "artifact_path"))
    rec.spy(mlflow, "log_metric", "mlflow.log_metric", ("key", "step"), mlflow_metric)
    rec.spy(mlflow.pytorch, "log_model", "mlflow.pytorch.log_model")

    def wandb_values(data: dict, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"keys": [short(k) for k in data]}

    # wandb.init rebinds wandb.log and wandb.watch to the run's methods: spy on those.
    from wandb.sdk.wandb_run import Run

    rec.spy(Run, "log", "wandb.log", (), lambda run, data, *a, **k: wandb_values(data))
    rec.spy(Run, "watch", "wandb.watch")
    from wandb.sdk.wandb_config import Config

    rec.spy(Config, "update", "wandb.config.update")

    def tb_scalar(self: Any, tag: Any, value: Any, global_step: Any = None, **kw: Any) -> dict:
        return {"tag": short(tag), "global_step": short(global_step),
                "stored": short(tb_summary.scalar("x", value).value[0].simple_value)}

    rec.spy(SummaryWriter, "add_scalar", "tb.add_scalar", (), tb_scalar)
    for name in ("add_image", "add_text", "add_figure", "add_graph", "add_hparams"):
        rec.spy(SummaryWriter, name, f"tb.{name}")

    def prov_args(*args: Any, **kwargs: Any) -> dict[str, Any]:
        keep = ("key", "label", "model_name", "dataset_label", "context", "step")
        return {k: short(kwargs[k]) for k in keep if k in kwargs}

    for name in ("log_metric", "log_flops_per_batch", "log_flops_per_epoch",
                 "log_system_metrics", "log_carbon_metrics", "log_current_execution_time",
                 "save_model_version", "log_model", "log_dataset", "log_param",
                 "log_provenance_documents"):
        rec.spy(yprov4ml, name, f"yprov4ml.{name}", (), prov_args)

    import itwinai.loggers

    def console_line(msg: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"line": rec.clean(str(msg))[:120]}

    rec.spy(itwinai.loggers.py_logger, "info", "console.info", (), console_line)
    rec.spy(shutil, "copyfile", "console.copyfile")
    rec.spy(shutil, "copytree", "console.copytree")
    rec.spy(torch, "save", "torch.save")


def outcome(rec: Recorder, fn: Any) -> dict[str, Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            error = None
        except Exception as e:  # noqa: BLE001 - recording what the reference raises
            error = e
    calls, logged = rec.take()
    result: dict[str, Any] = {}
    if error is not None:
        result["raise"] = type(error).__name__
        result["message"] = rec.clean(str(error))[:300]
    # Tracker calls made by itwinai itself; torch.save is only a call of ConsoleLogger's.
    result["calls"] = calls
    if logged:
        result["logged"] = logged
    relevant = [str(w.message)[:200] for w in caught
                if "itwinai" in str(w.filename) or "loggers" in str(w.filename)]
    if relevant:
        result["warnings"] = relevant
    return result


def run_class(cls: str, workdir: Path) -> dict[str, Any]:
    import itwinai.loggers as mod

    rec = Recorder(workdir)
    install_spies(rec)
    logging.getLogger("itwinai").addHandler(_Capture(rec))
    logging.getLogger("itwinai").setLevel(logging.INFO)
    out: dict[str, Any] = {"log": {}, "sequences": {}, "attributes": {}}

    # The sequences first: yprov4ml keeps one global run per process, and a name some log()
    # case gives it (a lone surrogate) would make every later end_run fail.
    for name, (options, ops) in cases.SEQUENCES.items():
        logger = make(mod, cls, workdir / name, **options)
        out["sequences"][name] = run_ops(rec, logger, ops)
    out["sequences"]["should-log-override"] = should_log_override(rec, mod, cls, workdir)

    logger = make(mod, cls, workdir)
    out["create"] = outcome(rec, lambda: logger.create_logger_context(rank=0))
    for call in cases.log_calls():
        if call.kwargs.get("context") is not None and cls != "Prov4MLLogger":
            continue
        args, kwargs = call.arguments(workdir)
        out["log"][call.case] = outcome(rec, functools.partial(logger.log, *args, **kwargs))
    if cls == "Prov4MLLogger":
        import yprov4ml

        for name in ("VALIDATION",):
            member = yprov4ml.Context[name]
            out["log"]["context-enum"] = outcome(rec, functools.partial(
                logger.log, 0.5, "c_enum", context=member))
    out["hp"] = outcome(rec, lambda: logger.save_hyperparameters({"lr": 0.1, "opt": "adam"}))
    out["destroy"] = outcome(rec, logger.destroy_logger_context)
    out["attributes"]["savedir"] = rec.clean(str(logger.savedir))
    extra = ATTRIBUTE_PROBES.get(cls)
    if extra is not None:
        out["attributes"].update(extra(mod, workdir, rec))
    return out


def make(mod: Any, cls: str, workdir: Path, **options: Any) -> Any:
    workdir.mkdir(parents=True, exist_ok=True)
    return cases.make_logger(mod, cls, workdir, **options)


def run_ops(rec: Recorder, logger: Any, ops: list[tuple]) -> list[dict[str, Any]]:
    results = []
    for op in ops:
        if op[0] == "start_logging":
            def body(op: tuple = op) -> None:
                with logger.start_logging(rank=op[1]):
                    for inner in op[2]:
                        apply(logger, inner)
            result = outcome(rec, body)
        else:
            result = outcome(rec, functools.partial(apply, logger, op))
        result["op"] = op[0]
        result["is_initialized"] = bool(logger.is_initialized)
        results.append(result)
    return results


def apply(logger: Any, op: tuple) -> None:
    if op[0] == "create":
        logger.create_logger_context(rank=op[1])
    elif op[0] == "destroy":
        logger.destroy_logger_context()
    elif op[0] == "log":
        logger.log(op[1], op[2], batch_idx=op[3])
    elif op[0] == "hp":
        logger.save_hyperparameters(op[1])
    else:
        raise ValueError(op)


def should_log_override(rec: Recorder, mod: Any, cls: str, workdir: Path) -> list[dict]:
    """`cases.even_batches` of the class through `cases.OVERRIDE_OPS`."""
    if cls == "LoggersCollection":
        return []
    subclass = cases.even_batches(getattr(mod, cls))
    logger = make(SimpleNamespace(**{cls: subclass}), cls, workdir / "override")
    return run_ops(rec, logger, cases.OVERRIDE_OPS)


def mlflow_attributes(mod: Any, workdir: Path, rec: Recorder) -> dict[str, Any]:
    """tracking_uri as itwinai resolves it: argument, else MLFLOW_TRACKING_URI, else
    savedir/mlflow; normalised to an absolute URI."""
    found: dict[str, Any] = {}
    saved = os.environ.pop("MLFLOW_TRACKING_URI")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        probes = {"default": None, "relative-path": "mlruns", "file-relative": "file:./mlruns",
                  "absolute-path": "/abs/mlruns", "http": "http://127.0.0.1:5000",
                  "sqlite": "sqlite:///rel.db", "empty": ""}
        for name, uri in probes.items():
            logger = mod.MLFlowLogger(savedir="mllogs", tracking_uri=uri)
            found[f"tracking_uri:{name}"] = rec.clean(logger.tracking_uri)
        for name, env in {"env-sqlite": "sqlite:///env.db", "env-relative": "envruns",
                          "env-empty": ""}.items():
            os.environ["MLFLOW_TRACKING_URI"] = env
            logger = mod.MLFlowLogger(savedir="mllogs")
            found[f"tracking_uri:{name}"] = rec.clean(logger.tracking_uri)
            logger = mod.MLFlowLogger(savedir="mllogs", tracking_uri="http://given:5000")
            found[f"tracking_uri:{name}+given"] = rec.clean(logger.tracking_uri)
            del os.environ["MLFLOW_TRACKING_URI"]
        found["savedir-exists-after-init"] = (workdir / "mllogs" / "mlflow").is_dir()
    finally:
        os.chdir(cwd)
        os.environ["MLFLOW_TRACKING_URI"] = saved
    return found


def tensorboard_attributes(mod: Any, workdir: Path, rec: Recorder) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for framework in ("PyTorch", "TENSORFLOW", "jax"):
        try:
            found[f"framework:{framework}"] = mod.TensorBoardLogger(
                savedir=str(workdir / "tb"), framework=framework).framework
        except ValueError as e:
            found[f"framework:{framework}"] = f"ValueError: {e}"
    return found


def empty_attributes(mod: Any, workdir: Path, rec: Recorder) -> dict[str, Any]:
    """should_log over a grid, log_freq validation, abstract classes, serialize's return."""
    found: dict[str, Any] = {}
    grid = []
    for log_freq, workers, rank, batch_idx in cases.should_log_grid():
        logger = mod.EmptyLogger(log_freq=log_freq, log_on_workers=workers)
        logger.worker_rank = rank
        try:
            grid.append(logger.should_log(batch_idx))
        except Exception as e:  # noqa: BLE001
            grid.append(type(e).__name__)
    found["should_log_grid"] = grid
    accepted = []
    for value in cases.LOG_FREQ_VALUES:
        try:
            mod.EmptyLogger(log_freq=value)
            accepted.append(True)
        except ValueError:
            accepted.append(False)
    found["log_freq_accepted"] = accepted
    for cls in ("Logger", "LogMixin"):
        try:
            getattr(mod, cls)()
            found[f"instantiate:{cls}"] = "ok"
        except TypeError:
            found[f"instantiate:{cls}"] = "TypeError"
    logger = mod.EmptyLogger(savedir=str(workdir))
    found["serialize_returns"] = short(logger.serialize({"a": 1}, "obj.pkl"))
    return found


ATTRIBUTE_PROBES = {"MLFlowLogger": mlflow_attributes, "TensorBoardLogger": tensorboard_attributes,
                    "EmptyLogger": empty_attributes}


def child(cls: str, out: Path) -> None:
    workdir = Path(tempfile.mkdtemp(prefix=f"itwinai-ref-{cls}-"))
    os.chdir(workdir)
    os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db",
                       "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       "WANDB_DIR": str(workdir), "WANDB_CONSOLE": "off"})
    result = run_class(cls, workdir)
    out.write_text(json.dumps(result, indent=1, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--class", dest="cls", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cls:
        child(args.cls, args.part)
        return
    import importlib.metadata as md

    recording: dict[str, Any] = {
        "versions": {p: md.version(p) for p in ("itwinai", "mlflow", "wandb", "tensorboard",
                                                  "yprov4ml", "torch", "numpy")},
        "classes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for cls in cases.CLASSES:
            part = Path(tmp) / f"{cls}.json"
            print(f"recording {cls} ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--class", cls, "--part", str(part)],
                           check=True, stdin=subprocess.DEVNULL)
            recording["classes"][cls] = json.loads(part.read_text())
    args.out.write_text(json.dumps(recording, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
