"""itwinai 0.4.2 conformance: every call of `tests/itwinai_cases.py`, for every logger class
and every kind, does with `itwinai_journal.loggers` what it did with itwinai's own loggers, as
recorded in `tests/reference/loggers-itwinai-0.4.2.json` by
`scripts/record_itwinai_reference.py` (which runs them in a virtualenv with itwinai 0.4.2 and its
trackers; this test needs neither).

The rule checked for each call:
- itwinai's tracker received it -> the journal keeps it (and, where the recording says what
  the tracker stored, the same name, value and step);
- itwinai ignored it -> nothing is journaled and nothing is raised;
- itwinai raised -> ours raises too, or journals it and says so in a warning.
The few calls where the journal departs from that are listed in DEVIATIONS with the reason.
User subclasses overriding should_log, log, create_logger_context or destroy_logger_context
are checked at the end, alone and inside a LoggersCollection.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import itwinai_cases as cases
import numpy as np
import pytest
import recordings

from itwinai_journal import Journal
from itwinai_journal import loggers as mod
from itwinai_journal.format.schema import ALL_KINDS
from itwinai_journal.loggers import (
    EmptyLogger,
    Logger,
    LoggersCollection,
    MLFlowLogger,
    TensorBoardLogger,
    WandBLogger,
)
from itwinai_journal.loggers.journal import _JournalLogger

REFERENCE = recordings.load("loggers")
RECORDED = REFERENCE["classes"]

#: (class or "*", case) -> (what the journal does, why). "journals": kept without a warning
#: although itwinai raised; "refuses": raises although itwinai accepted.
DEVIATIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("*", "name-pairwise"): (
        "journals", "lists of items with lists of identifiers are logged pairwise (itwinai "
        "hands the lists to the tracker, which fails)"),
    ("*", "name-surrogate"): (
        "refuses", "a name is an identifier and a lone surrogate has no UTF-8 form: it cannot "
        "be stored (MLflow, TensorBoard and W&B refuse it too)"),
    ("MLFlowLogger", "kind-model"): (
        "journals", "the recording's MLflow 3 refuses to save a module without an input "
        "example (its 'pt2' default); that is the tracker version, not itwinai's semantics"),
    ("LoggersCollection", "kind-model"): ("journals", "as for MLFlowLogger"),
    ("WandBLogger", "kind-figure"): (
        "journals", "wandb.log converts a matplotlib figure through plotly, not installed "
        "where the recording ran"),
    ("LoggersCollection", "kind-figure"): ("journals", "as for WandBLogger"),
    ("Prov4MLLogger", "none-prov_documents"): (
        "journals", "yprov4ml fails on a second log_provenance_documents in one run"),
    ("MLFlowLogger", "step-torch-int"): (
        "journals", "an integer tensor is a whole number: the journal stores the int MLflow "
        "could not serialise"),
    ("LoggersCollection", "step-torch-int"): ("journals", "as for MLFlowLogger"),
    ("*", "value-py-complex-real"): (
        "journals", "a complex number with a zero imaginary part is its real part (numpy's "
        "complex is taken so by MLflow)"),
    ("*", "value-np-complex-real"): ("journals", "as value-py-complex-real"),
    ("WandBLogger", "value-decimal"): (
        "journals", "a Decimal is a number (MLflow and TensorBoard take it); W&B's JSON "
        "encoder does not"),
    ("WandBLogger", "value-fraction"): ("journals", "as value-decimal"),
    ("LoggersCollection", "value-decimal"): ("journals", "as for WandBLogger"),
    ("LoggersCollection", "value-fraction"): ("journals", "as for WandBLogger"),
    ("WandBLogger", "kind-torch-dataloader"): (
        "journals", "kind='torch' keeps a torch.save of any object"),
    ("LoggersCollection", "kind-torch-dataloader"): ("journals", "as for WandBLogger"),
    **{(cls, case): ("journals", "a name MLflow's rules refuse is journaled as given; "
                     "itwinai-sync maps it deterministically at export and reports the mapping")
       for cls in ("MLFlowLogger", "LoggersCollection")
       for case in ("name-empty", "name-long", "name-newline")},
}


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """MLFlowLogger creates `<savedir>/mlflow` when constructed, as itwinai's does, and some
    tests construct loggers with the default, relative savedir: they run in tmp_path."""
    monkeypatch.chdir(tmp_path)


def deviation(cls: str, case: str) -> tuple[str, str] | None:
    """The listed deviation of a call; "*" stands for every class but EmptyLogger, which
    does nothing with any call, as itwinai's."""
    found = DEVIATIONS.get((cls, case))
    if found is None and cls != "EmptyLogger":
        found = DEVIATIONS.get(("*", case))
    return found


#: Tracker calls that each receive one metric value.
METRIC_CALLS = {"mlflow.log_metric", "wandb.log", "tb.add_scalar", "yprov4ml.log_metric"}


def reference_outcome(result: dict[str, Any]) -> str:
    if "raise" in result:
        return "raises"
    return "tracker" if result["calls"] else "ignored"


# --------------------------------------------------------------------------------------------
# running the cases through ours
# --------------------------------------------------------------------------------------------


def writers_of(logger: Logger) -> list[Any]:
    members = logger.loggers if isinstance(logger, LoggersCollection) else [logger]
    found = {id(lg._writer): lg._writer for lg in members
             if getattr(lg, "_writer", None) is not None}
    return list(found.values())


def journaled(logger: Logger) -> dict[int, int]:
    """Last seq of each open writer of `logger` (flushed first)."""
    found = {}
    for writer in writers_of(logger):
        writer.flush()
        found[id(writer)] = writer
    return {key: w.last_seq for key, w in found.items()}


def added(logger: Logger, before: dict[int, int]) -> int:
    """Records journaled since `before`; a writer opened since counts from its session's
    first seq."""
    total = 0
    for writer in writers_of(logger):
        writer.flush()
        start = before.get(id(writer), writer.manifest["sessions"][-1]["first_seq"] - 1)
        total += writer.last_seq - start
    return total


def forget_warnings(logger: Logger) -> None:
    """Each case must show its own warning: the once-per-kind memory is cleared between
    cases (a training run warns once; here every case is a first time)."""
    for lg in [logger, *getattr(logger, "loggers", [])]:
        if hasattr(lg, "_warned"):
            lg._warned.clear()


class ConsoleLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run(logger: Logger, fn) -> dict[str, Any]:
    before = journaled(logger)
    handler = ConsoleLines()
    mod.py_logger.addHandler(handler)
    mod.py_logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fn()
                error = None
            except Exception as e:  # noqa: BLE001 - the outcome under test
                error = e
    finally:
        mod.py_logger.removeHandler(handler)
    kept = added(logger, before)
    after = journaled(logger)
    ours = [str(w.message) for w in caught if w.category is mod.JournalWarning]
    return {"raise": None if error is None else type(error).__name__,
            "error": None if error is None else str(error), "kept": kept,
            "seqs": (max(before.values(), default=0), max(after.values(), default=0)),
            "warnings": ours, "lines": handler.lines}


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Every log() case through each of our classes, in the recording's order, on one logger
    per class; then the records each case journaled."""
    results: dict[str, dict[str, Any]] = {}
    for cls in cases.CLASSES:
        workdir = tmp_path_factory.mktemp(cls)
        logger = cases.make_logger(mod, cls, workdir)
        logger.create_logger_context(rank=0)
        found: dict[str, Any] = {}
        for call in cases.log_calls() + [CONTEXT_ENUM]:
            if call.case not in RECORDED[cls]["log"]:
                continue
            forget_warnings(logger)
            args, kwargs = call.arguments(workdir)
            found[call.case] = run(logger, functools.partial(logger.log, *args, **kwargs))
        logger.destroy_logger_context()
        by_seq = {(r["seq"]): r for r in _records(workdir)}
        for result in found.values():
            first, last = result["seqs"]  # one journal per class here
            result["journal"] = [by_seq[s] for s in range(first + 1, last + 1) if s in by_seq]
        results[cls] = found
    return results


def _records(workdir: Path) -> list[dict[str, Any]]:
    if not list(workdir.rglob("run.json")):
        return []
    return Journal(workdir).records().to_pylist()


class Context(enum.Enum):
    """yprov4ml's Context as itwinai code passes it: an Enum member."""

    TRAINING = "TRAINING"
    VALIDATION = "VALIDATION"


CONTEXT_ENUM = cases.Call("context-enum", cases.const(0.5), "c_enum",
                          kwargs={"context": Context.VALIDATION})

LOG_CASES = [(cls, case) for cls in cases.CLASSES for case in RECORDED[cls]["log"]]


@pytest.mark.parametrize(("cls", "case"), LOG_CASES, ids=[f"{c}-{k}" for c, k in LOG_CASES])
def test_log_call_does_what_itwinai_does(ours, cls, case):
    ref = RECORDED[cls]["log"][case]
    got = ours[cls][case]
    kept = got["kept"]
    expected = reference_outcome(ref)
    dev = deviation(cls, case)
    if dev is not None and dev[0] == "refuses":
        assert got["raise"] is not None and kept == 0, dev[1]
        return
    if dev is not None and dev[0] == "journals":
        assert got["raise"] is None and kept >= 1, (dev[1], got)
        return
    if expected == "tracker":
        assert got["raise"] is None, f"itwinai's tracker took it; ours raised {got['error']}"
        assert kept >= 1, "itwinai's tracker took it; nothing was journaled"
        if cls != "LoggersCollection" and {c["fn"] for c in ref["calls"]} <= METRIC_CALLS:
            assert kept == len(ref["calls"]), "one record per value the tracker received"
        check_fidelity(cls, ref, got)
    elif expected == "ignored":
        assert got["raise"] is None and kept == 0, got
    else:  # itwinai raised: ours raises too, or journals and says so
        if got["raise"] is None:
            assert kept >= 1 and got["warnings"], (
                f"itwinai raised {ref['raise']}; ours neither raised nor warned: {got}")
        else:
            assert kept == 0, "a call that raises journals nothing"


def as_recorded(name: str) -> str:
    """A name as the recording keeps the names trackers received (its `short()`)."""
    return name.encode("utf-8", "backslashreplace").decode()[:120]


def check_fidelity(cls: str, ref: dict[str, Any], got: dict[str, Any]) -> None:
    """What the tracker stored is what the journal holds: names, values (as MLflow's float()
    and TensorBoard's float32 make them), steps; and ConsoleLogger's lines."""
    records = got["journal"]
    for call in ref["calls"]:
        fn = call["fn"]
        if fn not in ("mlflow.log_metric", "tb.add_scalar"):
            continue
        name = call.get("key", call.get("tag"))
        if name is None:  # the documented mapping of identifier=None: the kind's name
            name = "metric"
        matching = [r for r in records if as_recorded(r["name"]) == name]
        assert matching, (fn, name, [r["name"] for r in records])
        record = matching[0]
        stored = call.get("stored")
        if isinstance(stored, float):
            assert record["kind"] == "metric", (fn, name, record["kind"])
            value = record["value"]
            if fn == "tb.add_scalar":
                value = float(np.float32(value))
            assert value == stored or (math.isnan(value) and math.isnan(stored)), (
                fn, value, stored)
            step = call.get("step", call.get("global_step"))
            if isinstance(step, (int, float)) and not isinstance(step, bool):
                meta = json.loads(record["meta"]) if record["meta"] else {}
                assert (record["step"] if record["step"] is not None
                        else meta.get("step")) == step
    if cls == "ConsoleLogger":
        lines = [c["line"] for c in ref["calls"]
                 if c["fn"] == "console.info" and c["line"].startswith("ConsoleLogger: ")]
        assert [line[:120] for line in got["lines"]  # the recording keeps 120 characters
                if line.startswith("ConsoleLogger: ")] == lines


def test_every_deviation_is_needed():
    """Each listed deviation applies to a recorded case where the rule alone would expect
    something else: 'journals' where itwinai raised, 'refuses' where it did not."""
    needed = {"journals": ("raises",), "refuses": ("tracker", "ignored")}
    stale = []
    for (cls, case), (what, _) in DEVIATIONS.items():
        classes = [c for c in cases.CLASSES if c != "EmptyLogger"] if cls == "*" else (cls,)
        outcomes = {reference_outcome(RECORDED[c]["log"][case]) for c in classes
                    if case in RECORDED[c]["log"]}
        if not outcomes & set(needed[what]):
            stale.append((cls, case))
    assert stale == []


def test_no_deviation_for_calls_itwinai_accepts_except_listed(ours):
    """Ours never raises on a call itwinai's tracker took, except the listed refusals."""
    refused = [(cls, case) for cls, case in LOG_CASES
               if reference_outcome(RECORDED[cls]["log"][case]) == "tracker"
               and ours[cls][case]["raise"] is not None]
    assert refused == [(cls, case) for cls, case in refused
                       if (deviation(cls, case) or ("",))[0] == "refuses"]
    assert {case for _, case in refused} <= {"name-surrogate"}


def test_recording_covers_every_kind_and_class():
    assert set(RECORDED) == set(cases.CLASSES)
    kinds = {c.kind for c in cases.log_calls()}
    assert set(ALL_KINDS) <= kinds and "model_version" in kinds
    assert REFERENCE["versions"]["itwinai"] == "0.4.2"


# --------------------------------------------------------------------------------------------
# lifecycles
# --------------------------------------------------------------------------------------------

SEQUENCE_CASES = [(cls, name) for cls in cases.CLASSES for name in RECORDED[cls]["sequences"]
                  if RECORDED[cls]["sequences"][name]]


def _sequence_logger(cls: str, name: str, workdir: Path) -> tuple[Logger, list[tuple]]:
    if name == "should-log-override":
        subclass = cases.even_batches(getattr(mod, cls))
        return (cases.make_logger(SimpleNamespace(**{cls: subclass}), cls, workdir),
                cases.OVERRIDE_OPS)
    options, ops = cases.SEQUENCES[name]
    return cases.make_logger(mod, cls, workdir, **options), ops


@pytest.mark.parametrize(("cls", "name"), SEQUENCE_CASES,
                         ids=[f"{c}-{n}" for c, n in SEQUENCE_CASES])
def test_lifecycle_does_what_itwinai_does(tmp_path, caplog, cls, name):
    """Each operation raises where itwinai's raised (RuntimeError before initialization and
    after destroy), leaves `is_initialized` as itwinai's did, journals a log() call when
    itwinai's tracker received it (or, where itwinai raised, journals it with a warning), and
    notices a second initialization through py_logger with itwinai's wording."""
    logger, ops = _sequence_logger(cls, name, tmp_path)
    for op, ref in zip(ops, RECORDED[cls]["sequences"][name], strict=True):
        assert ref["op"] == op[0]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="itwinai_journal.loggers"):
            got = run(logger, lambda op=op: cases.apply_op(logger, op))
        kept = got["kept"]
        if ref.get("raise") == "RuntimeError":
            assert got["raise"] == "RuntimeError" and "has not been initialized" in got["error"]
        elif "raise" in ref:  # the tracker failed (no run started): ours keeps it and says so
            assert got["raise"] is None and kept == 1 and got["warnings"], got
        else:
            assert got["raise"] is None, got["error"]
        assert logger.is_initialized == ref["is_initialized"], (op, ref)
        if op[0] == "log" and "raise" not in ref:
            assert kept == (1 if ref["calls"] else 0), (op, ref["calls"])
        twice = [line for line in ref.get("logged", []) if "twice" in line]
        assert [f"WARNING: {r.getMessage()}" for r in caplog.records
                if r.levelno == logging.WARNING] == twice
    for lg in [logger, *getattr(logger, "loggers", [])]:
        if isinstance(lg, _JournalLogger):
            lg._close("finished")


# --------------------------------------------------------------------------------------------
# attributes
# --------------------------------------------------------------------------------------------


def _here(value: str, workdir: Path) -> str:
    return value.replace("<WORKDIR>", str(workdir.resolve()))


@pytest.mark.parametrize("cls", [c for c in cases.CLASSES if c != "LoggersCollection"])
def test_savedir_attribute_is_itwinais(tmp_path, cls):
    logger = cases.make_logger(mod, cls, tmp_path)
    assert str(logger.savedir) == _here(RECORDED[cls]["attributes"]["savedir"], tmp_path)


def test_mlflow_tracking_uri_is_itwinais(tmp_path, monkeypatch):
    recorded = RECORDED["MLFlowLogger"]["attributes"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    given = {"default": None, "relative-path": "mlruns", "file-relative": "file:./mlruns",
             "absolute-path": "/abs/mlruns", "http": "http://127.0.0.1:5000",
             "sqlite": "sqlite:///rel.db", "empty": ""}
    for name, uri in given.items():
        # itwinai's "empty" probe ran after "sqlite" had set MLflow's global URI: the same
        # expression (`"" or env or savedir`) gives savedir/mlflow here
        expected = recorded[f"tracking_uri:{name}"] if name != "empty" else \
            recorded["tracking_uri:default"]
        assert MLFlowLogger(savedir="mllogs", tracking_uri=uri).tracking_uri == \
            _here(expected, tmp_path), name
    for name, env in {"env-sqlite": "sqlite:///env.db", "env-relative": "envruns",
                      "env-empty": ""}.items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
        assert MLFlowLogger(savedir="mllogs").tracking_uri == _here(
            recorded[f"tracking_uri:{name}"], tmp_path)
        assert MLFlowLogger(savedir="mllogs", tracking_uri="http://given:5000").tracking_uri \
            == recorded[f"tracking_uri:{name}+given"]
    assert (tmp_path / "mllogs" / "mlflow").is_dir() == recorded["savedir-exists-after-init"]


def test_tensorboard_framework_is_itwinais(tmp_path):
    for framework, expected in RECORDED["TensorBoardLogger"]["attributes"].items():
        if not framework.startswith("framework:"):
            continue
        name = framework.split(":", 1)[1]
        if expected.startswith("ValueError"):
            with pytest.raises(ValueError) as info:
                TensorBoardLogger(savedir=tmp_path, framework=name)
            assert f"ValueError: {info.value}" == expected
        else:
            assert TensorBoardLogger(savedir=tmp_path, framework=name).framework == expected


def test_should_log_and_log_freq_are_itwinais():
    recorded = RECORDED["EmptyLogger"]["attributes"]
    for cls in (EmptyLogger, MLFlowLogger, WandBLogger):
        got = []
        for log_freq, workers, rank, batch_idx in cases.should_log_grid():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # [-1] and tuples warn
                logger = cls(log_freq=log_freq, log_on_workers=workers)
            logger.worker_rank = rank
            got.append(logger.should_log(batch_idx))
        assert got == recorded["should_log_grid"], cls
    accepted = []
    for value in cases.LOG_FREQ_VALUES:
        try:
            EmptyLogger(log_freq=value)
            accepted.append(True)
        except ValueError:
            accepted.append(False)
    assert accepted == recorded["log_freq_accepted"]
    for cls in ("Logger", "LogMixin"):
        assert recorded[f"instantiate:{cls}"] == "TypeError"
        with pytest.raises(TypeError):
            getattr(mod, cls)()


# --------------------------------------------------------------------------------------------
# user subclasses: overrides are honoured, alone and in a collection; the fast path only
# when nothing is overridden
# --------------------------------------------------------------------------------------------


class EvenOnly(TensorBoardLogger):
    """Logs only even batch indices (and nothing without one)."""

    def should_log(self, batch_idx: int | None = None) -> bool:
        return batch_idx is not None and batch_idx % 2 == 0


class Doubling(WandBLogger):
    """Doubles every metric before logging it."""

    calls = 0

    def log(self, item, identifier, kind="metric", step=None, batch_idx=None, **kwargs):
        type(self).calls += 1
        if kind == "metric":
            item = item * 2
        super().log(item, identifier, kind=kind, step=step, batch_idx=batch_idx, **kwargs)


class Counting(MLFlowLogger):
    """Counts its own create/destroy calls."""

    created = destroyed = 0

    def create_logger_context(self, rank: int = 0, **kwargs):
        type(self).created += 1
        return super().create_logger_context(rank=rank, **kwargs)

    def destroy_logger_context(self):
        type(self).destroyed += 1
        super().destroy_logger_context()


class Foreign(Logger):
    """A Logger that is not one of ours: implements the abstract API itself."""

    supported_kinds = ("metric",)

    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple] = []
        self.events: list[str] = []

    def create_logger_context(self, rank: int = 0, **kwargs):
        self.is_initialized = True
        self.events.append("create")

    def destroy_logger_context(self):
        self.events.append("destroy")

    def save_hyperparameters(self, params):
        self.events.append(f"hp:{sorted(params)}")

    def log(self, item, identifier, kind="metric", step=None, batch_idx=None, **kwargs):
        self.got.append((item, identifier, kind, step, batch_idx))


def _by_name(root: Path) -> list[tuple]:
    out = []
    for r in Journal(root).records().to_pylist():
        meta = json.loads(r["meta"]) if r["meta"] else {}
        out.append((r["name"], r["batch_idx"], r["value"], meta.get("targets")))
    return out


def test_fast_path_only_without_overrides(tmp_path):
    plain = TensorBoardLogger(savedir=tmp_path / "a", log_freq="batch")
    subclassed = type("Plain", (TensorBoardLogger,), {})(savedir=tmp_path / "b",
                                                          log_freq="batch")
    even = EvenOnly(savedir=tmp_path / "c", log_freq="batch")
    doubling = Doubling(savedir=tmp_path / "d", log_freq="batch")
    counting = Counting(savedir=tmp_path / "e", log_freq="batch")
    for lg in (plain, subclassed, even, doubling, counting):
        lg.create_logger_context()
    assert plain._fast and subclassed._fast  # a subclass that overrides nothing keeps it
    assert not (even._fast or doubling._fast or counting._fast)
    plain.log_on_workers = 3  # state should_log reads: the fast path is recomputed
    assert not plain._fast
    plain.log(1.0, "filtered")
    plain.log_on_workers = 0
    assert plain._fast
    for lg in (plain, subclassed, even, doubling, counting):
        lg.destroy_logger_context()
    assert _by_name(tmp_path / "a") == []


def test_overridden_should_log_alone_and_in_a_collection(tmp_path):
    alone = EvenOnly(savedir=tmp_path / "alone", log_freq="batch")
    alone.create_logger_context()  # should_log() is False: no journal yet, as no TB writer
    assert alone._writer is None and alone.is_initialized
    with pytest.warns(UserWarning, match="the journal is opened now"):
        for batch_idx in range(4):
            alone.log(float(batch_idx), "loss", batch_idx=batch_idx)
    alone.log(9.0, "loss")  # no batch_idx: refused by the override
    alone.destroy_logger_context()  # should_log() is False: itwinai does nothing here
    assert alone.is_initialized
    alone._close("finished")
    assert _by_name(tmp_path / "alone") == [("loss", 0, 0.0, None), ("loss", 2, 2.0, None)]

    savedir = tmp_path / "coll"
    coll = LoggersCollection([MLFlowLogger(savedir=savedir, log_freq="batch"),
                              EvenOnly(savedir=savedir, log_freq="batch")])
    coll.create_logger_context()
    with pytest.warns(UserWarning, match="the journal is opened now"):
        for batch_idx in range(3):
            coll.log(float(batch_idx), "loss", batch_idx=batch_idx)
    coll.destroy_logger_context()
    coll.loggers[1]._close("finished")
    # MLflow's records (plain member) and TensorBoard's (through EvenOnly's own log)
    assert sorted(_by_name(savedir), key=lambda r: (r[1], r[3] or [])) == [
        ("loss", 0, 0.0, ["mlflow"]), ("loss", 0, 0.0, ["tensorboard"]),
        ("loss", 1, 1.0, ["mlflow"]), ("loss", 2, 2.0, ["mlflow"]),
        ("loss", 2, 2.0, ["tensorboard"])]


def _even_batches(self, batch_idx: int | None = None) -> bool:
    return batch_idx is not None and batch_idx % 2 == 0


def test_should_log_replaced_after_construction_is_honoured(tmp_path):
    """should_log replaced on an instance (plain assignment, mock.patch.object) or on a class
    (of the logger, or of one of its bases) after the loggers exist and log: the metric fast
    path (alone and in a collection) honours it from the next call on, and what it filters
    out is not written; undoing the patch restores the logger's own should_log."""
    from unittest import mock

    alone = TensorBoardLogger(savedir=tmp_path / "alone", log_freq="batch")
    other = TensorBoardLogger(savedir=tmp_path / "other", log_freq="batch")
    coll = LoggersCollection([MLFlowLogger(savedir=tmp_path / "coll", log_freq="batch"),
                              TensorBoardLogger(savedir=tmp_path / "coll", log_freq="batch")])
    for lg in (alone, other, coll):
        lg.create_logger_context()

    def log_batches(start: int) -> None:
        for batch_idx in range(start, start + 4):
            for lg in (alone, other, coll):
                lg.log(float(batch_idx), "loss", batch_idx=batch_idx)

    log_batches(0)  # the fast paths are taken
    alone.should_log = functools.partial(_even_batches, alone)
    log_batches(4)
    with mock.patch.object(coll.loggers[1], "should_log", return_value=False):
        log_batches(8)
    del alone.should_log
    with mock.patch.object(TensorBoardLogger, "should_log", _even_batches):
        log_batches(12)
    with mock.patch.object(mod.Logger, "should_log", _even_batches):
        log_batches(16)
    log_batches(20)
    for lg in (alone, other, coll):
        lg.destroy_logger_context()

    def batches(root: Path, target: str | None = None) -> list[int]:
        return [b for _, b, _, targets in _by_name(root) if target in (targets or [target])]

    every, even = list(range(24)), [b for b in range(24) if b % 2 == 0]
    assert batches(tmp_path / "alone") == [b for b in every if not 4 <= b < 20 or b % 2 == 0]
    assert batches(tmp_path / "other") == [b for b in every if not 12 <= b < 20 or b in even]
    assert batches(tmp_path / "coll", "mlflow") == [b for b in every
                                                    if not 16 <= b < 20 or b in even]
    assert batches(tmp_path / "coll", "tensorboard") == [
        b for b in every if not 8 <= b < 20 or (b >= 12 and b in even)]


def test_overridden_log_alone_and_in_a_collection(tmp_path):
    Doubling.calls = 0
    alone = Doubling(savedir=tmp_path / "alone", log_freq="batch")
    with alone.start_logging():
        alone.log(1.5, "loss", step=1)
        alone.log(2.5, "loss", step=2, batch_idx=7)
    assert Doubling.calls == 2
    assert _by_name(tmp_path / "alone") == [("loss", None, 3.0, None), ("loss", 7, 5.0, None)]

    savedir = tmp_path / "coll"
    coll = LoggersCollection([TensorBoardLogger(savedir=savedir, log_freq="batch"),
                              Doubling(savedir=savedir, log_freq="batch")])
    with coll.start_logging():
        coll.log(1.5, "loss", step=2)
        coll.log("hello", "note", kind="text")
    assert Doubling.calls == 4
    got = sorted(_by_name(savedir), key=lambda r: (r[0], r[3] or []))
    assert got == [("loss", None, 1.5, ["tensorboard"]), ("loss", None, 3.0, ["wandb"]),
                   ("note", None, None, ["tensorboard"]), ("note", None, None, ["wandb"])]


def test_overridden_create_and_destroy_in_a_collection(tmp_path):
    Counting.created = Counting.destroyed = 0
    foreign = Foreign()
    coll = LoggersCollection([Counting(savedir=tmp_path, log_freq="batch"),
                              TensorBoardLogger(savedir=tmp_path), foreign])
    with coll.start_logging():
        coll.log(0.5, "loss", step=1)
        coll.log(0.25, "acc", step=1, batch_idx=3)
        coll.save_hyperparameters({"lr": 0.1})
    assert (Counting.created, Counting.destroyed) == (1, 1)
    assert foreign.events == ["create", "hp:['lr']", "destroy"]
    assert foreign.got == [(0.5, "loss", "metric", 1, None), (0.25, "acc", "metric", 1, 3)]
    with pytest.raises(RuntimeError, match="boom"):
        with coll.start_logging():
            raise RuntimeError("boom")
    assert (Counting.created, Counting.destroyed) == (2, 2)  # the user's destroy ran
    (run,) = Journal(tmp_path).runs()
    statuses = [s["status"] for s in run.rank(0).manifest["sessions"]]
    assert statuses == ["finished", "failed"]


def test_kwarg_named_targets_stays_under_kwargs(tmp_path):
    """A user keyword never becomes a top-level meta field the sync side reads."""
    coll = LoggersCollection([MLFlowLogger(savedir=tmp_path, log_freq="batch"),
                              TensorBoardLogger(savedir=tmp_path)])
    with coll.start_logging():
        coll.log(0.5, "loss", step=1, targets=["wandb"], context="x")
        coll.log(0.5, "loss", step=2, batch_idx=1, targets="wandb")
    metas = [json.loads(r["meta"]) for r in Journal(tmp_path).records().to_pylist()]
    assert metas == [{"context": "x", "kwargs": {"targets": ["wandb"]}},
                     {"kwargs": {"targets": "wandb"}, "targets": ["mlflow"]}]
