"""The `itwinai.loggers` API of `itwinai_journal.loggers`, checked against the reference
documentation (shared/reference/itwinai-loggers.txt): signatures and defaults, supported kinds,
`should_log`, initialization errors, the logging context, run identity, LoggersCollection,
`serialize`, `get_mlflow_logger`, EmptyLogger, ConsoleLogger and secret redaction. Everything is
read back from real journals in tmp_path."""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from itwinai_journal import Journal
from itwinai_journal.loggers import (
    BASE_EXP_NAME,
    ConsoleLogger,
    EmptyLogger,
    Logger,
    LoggersCollection,
    LogMixin,
    MLFlowLogger,
    Prov4MLLogger,
    TensorBoardLogger,
    WandBLogger,
    get_mlflow_logger,
)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """MLFlowLogger creates `<savedir>/mlflow` when constructed, as itwinai's does, and some
    tests construct loggers with the default, relative savedir: they run in tmp_path."""
    monkeypatch.chdir(tmp_path)


def records(root: Path) -> list[dict]:
    return Journal(root).records().to_pylist()


def meta(record: dict) -> dict | None:
    return None if record["meta"] is None else json.loads(record["meta"])


def single_rank(root: Path):
    (run,) = Journal(root).runs()
    (rank,) = run.ranks
    return run, rank


# --------------------------------------------------------------------------------------------
# should_log: worker filter first, then log_freq against batch_idx
# --------------------------------------------------------------------------------------------

#: Reference semantics for an allowed worker: batch_idx None -> log; 'epoch' -> never with a
#: batch_idx; 'batch' -> always; int n -> batch_idx % n == 0.
FREQ_TABLE = {
    "epoch": {None: True, 0: False, 1: False, 3: False, 6: False},
    "batch": {None: True, 0: True, 1: True, 3: True, 6: True},
    1: {None: True, 0: True, 1: True, 3: True, 6: True},
    3: {None: True, 0: True, 1: False, 3: True, 6: True},
}

#: (log_on_workers, rank given to create_logger_context, whether that rank may log)
WORKERS = [
    (0, 0, True),
    (0, 1, False),
    (-1, 0, True),
    (-1, 3, True),
    ([0, 2], 0, True),
    ([0, 2], 2, True),
    ([0, 2], 1, False),
    (1, 1, True),
    (1, 0, False),
]

SHOULD_LOG_CASES = [
    pytest.param(freq, batch_idx, workers, rank, allowed and expected,
                 id=f"freq={freq}-batch={batch_idx}-workers={workers}-rank={rank}")
    for freq, row in FREQ_TABLE.items()
    for batch_idx, expected in row.items()
    for workers, rank, allowed in WORKERS
]


@pytest.mark.parametrize(("log_freq", "batch_idx", "workers", "rank", "expected"),
                         SHOULD_LOG_CASES)
def test_should_log_table(tmp_path, log_freq, batch_idx, workers, rank, expected):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs", log_freq=log_freq,
                          log_on_workers=workers)
    logger.create_logger_context(rank=rank)
    try:
        assert logger.worker_rank == rank
        assert logger.should_log(batch_idx) is expected
        if batch_idx is None:
            assert logger.should_log() is expected
    finally:
        logger.destroy_logger_context()


@pytest.mark.parametrize(("log_freq", "batch_idx", "workers", "rank", "expected"),
                         SHOULD_LOG_CASES)
def test_log_writes_what_should_log_allows(tmp_path, log_freq, batch_idx, workers, rank,
                                           expected):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs", log_freq=log_freq,
                          log_on_workers=workers)
    logger.create_logger_context(rank=rank)
    logger.log(0.5, "hot", step=1, batch_idx=batch_idx)  # plain scalar metric
    logger.log(0.25, "general", step=np.int64(1), batch_idx=batch_idx, note="x")
    logger.log([1.0, 2.0], ["l1", "l2"], batch_idx=batch_idx)
    logger.log("some text", "txt", kind="text", batch_idx=batch_idx)
    logger.destroy_logger_context()
    got = records(tmp_path)
    if not expected:
        assert got == []
        return
    assert [(r["name"], r["batch_idx"], r["rank"]) for r in got] == [
        (name, batch_idx, rank) for name in ("hot", "general", "l1", "l2", "txt")]


@pytest.mark.parametrize("logger_cls", [ConsoleLogger, WandBLogger, TensorBoardLogger])
def test_log_freq_applies_to_every_logger_class(tmp_path, logger_cls):
    logger = logger_cls(savedir=tmp_path / "mllogs", log_freq=3)
    logger.create_logger_context()
    for batch_idx in range(7):
        logger.log(float(batch_idx), "m", batch_idx=batch_idx)
    logger.log(9.0, "m")
    logger.destroy_logger_context()
    assert [(r["batch_idx"], r["value"]) for r in records(tmp_path)] == [
        (0, 0.0), (3, 3.0), (6, 6.0), (None, 9.0)]


def test_log_freq_applies_to_prov4ml(tmp_path):
    logger = Prov4MLLogger(provenance_save_dir=str(tmp_path / "prov"), log_freq=2,
                           log_on_workers=[1])
    logger.create_logger_context(rank=1)
    for batch_idx in range(4):
        logger.log(float(batch_idx), "m", batch_idx=batch_idx)
    logger.destroy_logger_context()
    got = records(tmp_path)
    assert [(r["batch_idx"], r["rank"]) for r in got] == [(0, 1), (2, 1)]


@pytest.mark.parametrize("bad", [0, -1, "foo", 1.5, "Epoch", None])
@pytest.mark.parametrize("logger_cls", [ConsoleLogger, MLFlowLogger, WandBLogger,
                                        TensorBoardLogger, Prov4MLLogger, EmptyLogger])
def test_log_freq_validation(logger_cls, bad):
    with pytest.raises(ValueError, match=re.escape("Wrong value for 'log_freq'")):
        logger_cls(log_freq=bad)


@pytest.mark.parametrize("good", ["epoch", "batch", 1, 7])
def test_log_freq_accepts_and_setter_validates(good):
    logger = MLFlowLogger(log_freq=good)
    assert logger.log_freq == good
    with pytest.raises(ValueError, match=re.escape("Wrong value for 'log_freq'")):
        logger.log_freq = 0
    assert logger.log_freq == good
    logger.log_freq = 5
    assert logger.log_freq == 5


# --------------------------------------------------------------------------------------------
# initialization errors and the logging context
# --------------------------------------------------------------------------------------------


def _loggers(tmp_path: Path) -> list[Logger]:
    savedir = tmp_path / "mllogs"
    return [
        MLFlowLogger(savedir=savedir),
        ConsoleLogger(savedir=savedir),
        WandBLogger(savedir=savedir),
        TensorBoardLogger(savedir=savedir),
        Prov4MLLogger(provenance_save_dir=str(savedir / "prov")),
        LoggersCollection([MLFlowLogger(savedir=savedir), WandBLogger(savedir=savedir)]),
    ]


NOT_INITIALIZED = ("has not been initialized. Use either the ``start_logging`` context or the "
                   "``create_logger_context`` method.")


@pytest.mark.parametrize("index", range(6))
def test_use_before_init_is_a_runtime_error(tmp_path, index):
    """itwinai's check_initialized guards log, save_hyperparameters and destroy."""
    logger = _loggers(tmp_path)[index]
    message = re.escape(f"{type(logger).__name__} {NOT_INITIALIZED}")
    with pytest.raises(RuntimeError, match=message):
        logger.log(0.5, "loss")
    with pytest.raises(RuntimeError, match=message):
        logger.log(0.5, "loss", step=np.int64(1), kind="metric", extra=1)
    with pytest.raises(RuntimeError, match=message):
        logger.save_hyperparameters({"lr": 0.1})
    with pytest.raises(RuntimeError, match=message):
        logger.destroy_logger_context()
    assert list(tmp_path.rglob("run.json")) == [] and list(tmp_path.rglob("rank-*")) == []


def test_log_after_destroy_is_a_runtime_error(tmp_path):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs")
    logger.create_logger_context()
    logger.log(1.0, "x")
    logger.destroy_logger_context()
    for call in (lambda: logger.log(2.0, "x"), lambda: logger.save_hyperparameters({"a": 1}),
                 logger.destroy_logger_context):
        with pytest.raises(RuntimeError, match=re.escape(NOT_INITIALIZED)):
            call()
    assert [r["value"] for r in records(tmp_path)] == [1.0]


def test_double_create_logger_context_warns_and_keeps_one_session(tmp_path, caplog):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs", experiment_name="twice")
    logger.create_logger_context()
    run_id = logger.run_id
    with caplog.at_level(logging.WARNING, logger="itwinai_journal.loggers"):
        logger.create_logger_context()
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("itwinai_journal.loggers", "WARNING",
         "Trying to initialize MLFlowLogger twice.. Skipping initialization.")]
    assert logger.run_id == run_id and logger.is_initialized
    logger.log(1.0, "x")
    logger.destroy_logger_context()
    run, rank = single_rank(tmp_path)
    assert run.run_id == run_id
    assert [s["status"] for s in rank.manifest["sessions"]] == ["finished"]
    assert len(records(tmp_path)) == 1


def test_start_logging_opens_and_closes(tmp_path):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs", experiment_name="ctx")
    assert not logger.is_initialized
    with logger.start_logging():
        assert logger.is_initialized
        _, rank = single_rank(tmp_path)
        assert rank.manifest["sessions"][-1]["status"] == "running"
        logger.log(123, "value", kind="metric", step=0)
    assert not logger.is_initialized
    run, rank = single_rank(tmp_path)
    assert run.status == "finished"
    assert [s["status"] for s in rank.manifest["sessions"]] == ["finished"]
    assert [(r["name"], r["value"], r["step"]) for r in records(tmp_path)] == [
        ("value", 123.0, 0)]


class _Boom(Exception):
    pass


def test_start_logging_marks_failed_and_reraises(tmp_path):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs")
    with pytest.raises(_Boom, match="boom"):
        with logger.start_logging():
            logger.log(1.0, "x")
            raise _Boom("boom")
    assert not logger.is_initialized
    run, rank = single_rank(tmp_path)
    assert run.status == "failed"
    assert [s["status"] for s in rank.manifest["sessions"]] == ["failed"]
    assert [r["name"] for r in records(tmp_path)] == ["x"]


def test_start_logging_rank(tmp_path):
    logger = WandBLogger(savedir=tmp_path / "mllogs", log_on_workers=-1)
    with logger.start_logging(rank=2):
        assert logger.worker_rank == 2
        logger.log(1.0, "x")
    run, rank = single_rank(tmp_path)
    assert rank.rank == 2 and rank.path.name == "rank-00002"
    assert [r["rank"] for r in records(tmp_path)] == [2]


def test_resuming_a_run_appends_a_session_and_continues_seq(tmp_path):
    for value in (1.0, 2.0):
        logger = MLFlowLogger(savedir=tmp_path / "mllogs", run_id="resumed")
        with logger.start_logging():
            logger.log(value, "x")
    _, rank = single_rank(tmp_path)
    assert [s["status"] for s in rank.manifest["sessions"]] == ["finished", "finished"]
    assert [(r["seq"], r["value"]) for r in records(tmp_path)] == [(1, 1.0), (2, 2.0)]


# --------------------------------------------------------------------------------------------
# signatures, defaults and supported kinds (as in the reference)
# --------------------------------------------------------------------------------------------

_REQUIRED = inspect.Parameter.empty

REFERENCE_CONSTRUCTORS = {
    Logger: [("savedir", "mllogs"), ("log_freq", "epoch"), ("log_on_workers", 0),
             ("experiment_id", None), ("run_id", None)],
    ConsoleLogger: [("savedir", "mllogs"), ("log_freq", "epoch"), ("log_on_workers", 0)],
    MLFlowLogger: [("savedir", "mllogs"), ("experiment_name", "unnamed-experiment"),
                   ("tracking_uri", None), ("run_description", None), ("run_name", None),
                   ("log_freq", "epoch"), ("log_on_workers", 0)],
    WandBLogger: [("savedir", "mllogs"), ("project_name", "unnamed-experiment"),
                  ("log_freq", "epoch"), ("log_on_workers", 0), ("offline_mode", False)],
    TensorBoardLogger: [("savedir", "mllogs"), ("log_freq", "epoch"),
                        ("framework", "pytorch"), ("log_on_workers", 0)],
    Prov4MLLogger: [("prov_user_namespace", "www.example.org"),
                    ("experiment_name", "experiment_name"),
                    ("provenance_save_dir", "mllogs/prov_logs"), ("save_after_n_logs", 100),
                    ("create_graph", True), ("create_svg", True), ("log_freq", "epoch"),
                    ("log_on_workers", 0)],
    EmptyLogger: [("savedir", "mllogs"), ("log_freq", "epoch"), ("log_on_workers", 0)],
    LoggersCollection: [("loggers", _REQUIRED)],
}


def _same_default(got, want) -> bool:
    return type(got) is type(want) and got == want or got is want


def _check_params(params: list[inspect.Parameter], reference: list[tuple]) -> None:
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == [name for name, _ in reference]
    for p, (name, default) in zip(positional, reference):
        assert _same_default(p.default, default), (name, p.default, default)
    assert all(p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)
               for p in rest), [p.name for p in rest]


@pytest.mark.parametrize("cls", list(REFERENCE_CONSTRUCTORS), ids=lambda c: c.__name__)
def test_constructor_signature_matches_reference(cls):
    params = list(inspect.signature(cls).parameters.values())
    _check_params(params, REFERENCE_CONSTRUCTORS[cls])


def test_base_experiment_name():
    assert BASE_EXP_NAME == "unnamed-experiment"


def _method_params(cls, name: str) -> list[inspect.Parameter]:
    params = list(inspect.signature(getattr(cls, name)).parameters.values())
    assert params[0].name == "self"
    return params[1:]


ALL_CLASSES = [ConsoleLogger, MLFlowLogger, WandBLogger, TensorBoardLogger, Prov4MLLogger,
               EmptyLogger, LoggersCollection]


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_method_signatures_match_reference(cls):
    log_ref = [("item", _REQUIRED), ("identifier", _REQUIRED), ("kind", "metric"),
               ("step", None), ("batch_idx", None)]
    if cls is Prov4MLLogger:
        log_ref.append(("context", "training"))
    log_params = _method_params(cls, "log")
    _check_params(log_params, log_ref)
    assert log_params[-1].kind is inspect.Parameter.VAR_KEYWORD
    create = _method_params(cls, "create_logger_context")
    _check_params(create, [("rank", 0)])
    assert create[-1].kind is inspect.Parameter.VAR_KEYWORD
    _check_params(_method_params(cls, "destroy_logger_context"), [])
    _check_params(_method_params(cls, "save_hyperparameters"), [("params", _REQUIRED)])
    _check_params(_method_params(cls, "should_log"), [("batch_idx", None)])
    _check_params(_method_params(cls, "serialize"), [("obj", _REQUIRED),
                                                     ("identifier", _REQUIRED)])
    _check_params(_method_params(cls, "start_logging"), [("rank", 0)])


REFERENCE_KINDS = {
    ConsoleLogger: ("torch", "artifact", "metric"),
    MLFlowLogger: ("metric", "figure", "image", "artifact", "torch", "dict", "param", "text",
                   "model", "dataset"),
    WandBLogger: ("watch", "metric", "figure", "image", "torch", "dict", "param", "text"),
    TensorBoardLogger: ("metric", "image", "text", "figure", "torch"),
    Prov4MLLogger: ("metric", "flops_pb", "flops_pe", "system", "carbon", "execution_time",
                    "model", "best_model", "torch"),
}


@pytest.mark.parametrize("cls", list(REFERENCE_KINDS), ids=lambda c: c.__name__)
def test_supported_kinds_match_reference(cls):
    assert cls.supported_kinds == REFERENCE_KINDS[cls]
    assert cls().supported_kinds == REFERENCE_KINDS[cls]


def test_mlflow_attributes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = MLFlowLogger(savedir="somewhere")
    assert logger.active_run is None
    # as in itwinai: savedir/mlflow, created at construction, is the default tracking URI
    assert logger.savedir == Path("somewhere/mlflow") and logger.savedir.is_dir()
    assert logger.journal_savedir == Path("somewhere")
    assert logger.tracking_uri == (tmp_path / "somewhere" / "mlflow").as_uri()
    assert logger.is_initialized is False and logger.worker_rank == 0


@pytest.mark.parametrize(("given", "env", "expected"), [
    ("http://host:5000", None, "http://host:5000"),
    ("mlruns", None, "file://{cwd}/mlruns"),
    ("file:./mlruns", None, "file://{cwd}/mlruns"),
    ("sqlite:///rel.db", None, "sqlite:///rel.db"),
    (None, "sqlite:///env.db", "sqlite:///env.db"),
    (None, "envruns", "file://{cwd}/envruns"),
    (None, "", "file://{cwd}/mllogs/mlflow"),
    ("http://given:5000", "sqlite:///env.db", "http://given:5000"),
])
def test_mlflow_tracking_uri_as_itwinai_resolves_it(tmp_path, monkeypatch, given, env, expected):
    """The argument, else MLFLOW_TRACKING_URI, else savedir/mlflow; paths made absolute
    `file:` URIs (itwinai.utils.normalize_tracking_uri). Only the argument is declared."""
    monkeypatch.chdir(tmp_path)
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    logger = MLFlowLogger(tracking_uri=given)
    assert logger.tracking_uri == expected.format(cwd=tmp_path)
    with logger.start_logging():
        logger.log(1.0, "x")
    _, rank = single_rank(tmp_path)
    assert rank.manifest["destinations"]["mlflow"]["tracking_uri"] == given


def test_tensorboard_framework():
    with pytest.raises(ValueError, match="Accepted values for TensorBoardLogger framework"):
        TensorBoardLogger(framework="jax")
    assert TensorBoardLogger(framework="tensorflow").framework == "tensorflow"
    assert TensorBoardLogger(framework="PyTorch").framework == "pytorch"


def test_logger_and_logmixin_are_abstract():
    for cls in (Logger, LogMixin):
        with pytest.raises(TypeError, match="abstract"):
            cls()


@pytest.mark.parametrize(("cls", "sub"), [(MLFlowLogger, "mlflow"), (WandBLogger, "wandb"),
                                          (TensorBoardLogger, "tensorboard"),
                                          (ConsoleLogger, "simple-logger")])
def test_savedir_attribute_is_itwinais(tmp_path, cls, sub):
    """`savedir` is where itwinai's logger keeps its files; the journal stays at
    `<journal_savedir>/<experiment>/<run_id>/`."""
    logger = cls(savedir=tmp_path / "mllogs")
    assert logger.savedir == tmp_path / "mllogs" / sub
    assert logger.journal_savedir == tmp_path / "mllogs"
    with logger.start_logging():
        logger.log(1.0, "x")
    (run,) = Journal(tmp_path / "mllogs").runs()
    assert run.path.parent.parent == tmp_path / "mllogs"


# --------------------------------------------------------------------------------------------
# experiment_id and run_id
# --------------------------------------------------------------------------------------------


def test_experiment_id():
    assert MLFlowLogger(experiment_name="exp-a").experiment_id == "exp-a"
    assert MLFlowLogger(experiment_name="exp-a").resolve_experiment_id() == "exp-a"
    assert MLFlowLogger().experiment_id == "unnamed-experiment"
    assert EmptyLogger().experiment_id is None


def test_run_id_is_the_journal_run_directory(tmp_path):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs", experiment_name="exp-b")
    assert logger.run_id is None
    logger.create_logger_context()
    run_id = logger.run_id
    logger.destroy_logger_context()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", run_id)
    run, _ = single_rank(tmp_path)
    assert run.run_id == run_id == run.path.name
    assert run.experiment == "exp-b"
    assert run.path == tmp_path / "mllogs" / "exp-b" / run_id
    other = MLFlowLogger(savedir=tmp_path / "other")
    other.create_logger_context()
    other.destroy_logger_context()
    assert other.run_id != run_id


def test_explicit_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("ITWINAI_RUN_ID", "from-env")
    logger = MLFlowLogger(savedir=tmp_path / "mllogs", run_id="explicit-1")
    assert logger.run_id == "explicit-1"
    with logger.start_logging():
        logger.log(1.0, "x")
    run, _ = single_rank(tmp_path)
    assert run.run_id == run.path.name == "explicit-1"
    assert {r["run_id"] for r in records(tmp_path)} == {"explicit-1"}


def test_run_id_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ITWINAI_RUN_ID", "from-env")
    logger = WandBLogger(savedir=tmp_path / "mllogs", project_name="p")
    logger.create_logger_context()
    assert logger.run_id == "from-env"
    logger.destroy_logger_context()
    run, _ = single_rank(tmp_path)
    assert run.run_id == run.path.name == "from-env"
    assert run.path.parent.name == "p"


@pytest.mark.parametrize("bad", ["../up", "a/b", ".hidden"])
def test_unsafe_run_id_is_refused(tmp_path, bad):
    logger = TensorBoardLogger(savedir=tmp_path / "mllogs", run_id=bad)
    with pytest.raises(ValueError):
        logger.create_logger_context()
    assert not logger.is_initialized
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# LoggersCollection
# --------------------------------------------------------------------------------------------


def test_collection_rejects_two_loggers_of_one_type():
    with pytest.raises(ValueError):
        LoggersCollection([MLFlowLogger(), WandBLogger(), MLFlowLogger(experiment_name="b")])


def _collection(tmp_path: Path) -> LoggersCollection:
    savedir = tmp_path / "mllogs"
    return LoggersCollection([
        MLFlowLogger(savedir=savedir, experiment_name="coll", log_freq="batch"),
        TensorBoardLogger(savedir=savedir, log_freq="epoch"),
        WandBLogger(savedir=savedir, project_name="coll-wandb", log_freq=2),
    ])


def test_collection_should_log_and_supported_kinds(tmp_path):
    coll = _collection(tmp_path)
    for batch_idx in (None, 0, 1, 3, 7):
        assert coll.should_log(batch_idx) is True
    union = set().union(*(lg.supported_kinds for lg in coll.loggers))
    assert set(coll.supported_kinds) == union
    assert len(coll.supported_kinds) == len(union)
    only_tb = LoggersCollection([TensorBoardLogger(savedir=tmp_path)])
    assert set(only_tb.supported_kinds) == set(REFERENCE_KINDS[TensorBoardLogger])
    coll.create_logger_context()
    try:
        assert coll.should_log(1) is True
    finally:
        coll.destroy_logger_context()


def test_collection_writes_one_record_per_call_with_targets(tmp_path):
    coll = _collection(tmp_path)
    coll.create_logger_context()
    expected = []
    for batch_idx, targets in [(None, None), (0, ["mlflow", "wandb"]), (1, ["mlflow"]),
                               (2, ["mlflow", "wandb"]), (3, ["mlflow"])]:
        coll.log(0.5, "loss", step=batch_idx, batch_idx=batch_idx)
        expected.append(("metric", "loss", batch_idx, targets))
    # kinds some members do not support
    coll.log(0.1, "lr", kind="param")
    expected.append(("param", "lr", None, ["mlflow", "wandb"]))
    coll.log("hello", "note", kind="text", batch_idx=1)
    expected.append(("text", "note", 1, ["mlflow"]))
    coll.log(np.zeros((2, 2), dtype=np.uint8), "img", kind="image")
    expected.append(("image", "img", None, None))
    coll.log(3, "obj", kind="artifact")
    expected.append(("artifact", "obj", None, ["mlflow"]))
    coll.log(1.0, "nobody", kind="best_model")  # supported by no member: nothing written
    coll.log(0.7, "skipped", batch_idx=5, kind="param")  # mlflow accepts
    expected.append(("param", "skipped", 5, ["mlflow"]))
    coll.destroy_logger_context()

    got = records(tmp_path)
    assert [(r["kind"], r["name"], r["batch_idx"], (meta(r) or {}).get("targets"))
            for r in got] == expected
    assert meta(got[0]) is None
    assert meta(got[2]) == {"targets": ["mlflow"]}
    assert [r["seq"] for r in got] == list(range(1, len(expected) + 1))


def test_collection_shares_one_run(tmp_path):
    coll = _collection(tmp_path)
    coll.create_logger_context()
    ids = {lg.run_id for lg in coll.loggers}
    assert ids == {coll.run_id} and coll.run_id is not None
    coll.log(1.0, "x")
    coll.destroy_logger_context()
    run, rank = single_rank(tmp_path)
    assert run.run_id == coll.run_id and run.experiment == "coll"
    assert run.path == tmp_path / "mllogs" / "coll" / coll.run_id
    assert set(rank.manifest["destinations"]) == {"mlflow", "tensorboard", "wandb"}
    assert [s["status"] for s in rank.manifest["sessions"]] == ["finished"]
    assert all(not lg.is_initialized for lg in coll.loggers) and not coll.is_initialized


def test_collection_uses_explicit_member_run_id(tmp_path):
    savedir = tmp_path / "mllogs"
    coll = LoggersCollection([TensorBoardLogger(savedir=savedir),
                              MLFlowLogger(savedir=savedir, run_id="member-run")])
    with coll.start_logging():
        coll.log(1.0, "x")
    assert {lg.run_id for lg in coll.loggers} == {"member-run"}
    run, _ = single_rank(tmp_path)
    assert run.run_id == "member-run"


def test_collection_save_hyperparameters_once(tmp_path):
    coll = _collection(tmp_path)
    with pytest.raises(RuntimeError):
        coll.save_hyperparameters({"lr": 0.1})
    coll.create_logger_context()
    coll.save_hyperparameters({"lr": 0.1, "batch_size": 32, "optim": "adam"})
    coll.destroy_logger_context()
    got = records(tmp_path)
    assert [(r["kind"], r["name"], json.loads(r["text"]), r["meta"]) for r in got] == [
        ("param", "lr", 0.1, None), ("param", "batch_size", 32, None),
        ("param", "optim", "adam", None)]


def console_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "itwinai_journal.loggers" and r.levelno == logging.INFO]


def test_collection_hyperparameters_skip_console(tmp_path, caplog):
    savedir = tmp_path / "mllogs"
    coll = LoggersCollection([ConsoleLogger(savedir=savedir), MLFlowLogger(savedir=savedir)])
    with caplog.at_level(logging.INFO, logger="itwinai_journal.loggers"):
        with coll.start_logging():
            coll.save_hyperparameters({"lr": 0.1})
            coll.log(0.5, "loss")
    got = records(tmp_path)
    assert [(r["kind"], r["name"], meta(r)) for r in got] == [
        ("param", "lr", {"targets": ["mlflow"]}), ("metric", "loss", None)]
    assert console_lines(caplog) == ["ConsoleLogger: loss = 0.5"]


def test_collection_double_init_warns(tmp_path, caplog):
    coll = _collection(tmp_path)
    coll.create_logger_context()
    with caplog.at_level(logging.WARNING, logger="itwinai_journal.loggers"):
        coll.create_logger_context()
    assert [r.getMessage() for r in caplog.records] == [
        "Trying to initialize LoggersCollection twice.. Skipping initialization."]
    coll.destroy_logger_context()
    _, rank = single_rank(tmp_path)
    assert len(rank.manifest["sessions"]) == 1


def test_collection_failure_marks_session_failed(tmp_path):
    coll = _collection(tmp_path)
    with pytest.raises(_Boom):
        with coll.start_logging():
            coll.log(1.0, "x")
            raise _Boom("inside collection")
    run, rank = single_rank(tmp_path)
    assert run.status == "failed"
    assert [s["status"] for s in rank.manifest["sessions"]] == ["failed"]
    assert len(records(tmp_path)) == 1


# --------------------------------------------------------------------------------------------
# lists of items and identifiers
# --------------------------------------------------------------------------------------------


def test_lists_are_logged_pairwise(tmp_path):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs")
    with logger.start_logging():
        logger.log([1.0, 2.0], ["a", "b"], step=4)
        logger.log(("x", "y"), ("t1", "t2"), kind="text")
    got = records(tmp_path)
    assert [(r["kind"], r["name"], r["step"], r["value"], r["text"]) for r in got] == [
        ("metric", "a", 4, 1.0, None), ("metric", "b", 4, 2.0, None),
        ("text", "t1", None, None, "x"), ("text", "t2", None, None, "y")]


@pytest.mark.parametrize(("item", "identifier"), [
    ([1.0], ["a", "b"]),
    ([1.0, 2.0, 3.0], ["a", "b"]),
    (1.0, ["a", "b"]),
    ([], ["a"]),
])
def test_mismatched_lists_are_a_value_error(tmp_path, item, identifier):
    logger = MLFlowLogger(savedir=tmp_path / "mllogs")
    coll = LoggersCollection([WandBLogger(savedir=tmp_path / "mllogs")])
    with logger.start_logging():
        with pytest.raises(ValueError):
            logger.log(item, identifier)
    with coll.start_logging():
        with pytest.raises(ValueError):
            coll.log(item, identifier)
    assert records(tmp_path) == []


# --------------------------------------------------------------------------------------------
# serialize, get_mlflow_logger, EmptyLogger, ConsoleLogger
# --------------------------------------------------------------------------------------------


def test_serialize_returns_a_path_under_savedir(tmp_path):
    savedir = tmp_path / "mllogs"
    logger = MLFlowLogger(savedir=savedir)
    obj = {"a": [1, 2, 3], "b": ("x", None)}
    path = logger.serialize(obj, "sub/x.pkl")
    assert isinstance(path, str)
    assert Path(path).resolve() == (savedir / "mlflow" / "sub" / "x.pkl").resolve()
    with open(path, "rb") as f:
        assert pickle.load(f) == obj


@pytest.mark.parametrize("identifier", ["../x", "/tmp/x", "sub/../../x", "ABSOLUTE"])
def test_serialize_refuses_to_leave_savedir(tmp_path, identifier):
    savedir = tmp_path / "root" / "mllogs"
    if identifier == "ABSOLUTE":
        identifier = str(tmp_path / "abs.pkl")
    logger = MLFlowLogger(savedir=savedir)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError):
        logger.serialize({"secret": 1}, identifier)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "root" / "x").exists() and not (tmp_path / "x").exists()


def test_get_mlflow_logger(tmp_path):
    mlf = MLFlowLogger(savedir=tmp_path)
    assert get_mlflow_logger(mlf) is mlf
    coll = LoggersCollection([TensorBoardLogger(savedir=tmp_path), mlf])
    assert get_mlflow_logger(coll) is mlf
    assert get_mlflow_logger(TensorBoardLogger(savedir=tmp_path)) is None
    assert get_mlflow_logger(LoggersCollection([WandBLogger(savedir=tmp_path)])) is None
    assert get_mlflow_logger(None) is None


def test_empty_logger_writes_nothing(tmp_path):
    logger = EmptyLogger(savedir=tmp_path / "mllogs", log_freq="batch")
    assert logger.supported_kinds == ()
    logger.log(1.0, "before-init")
    logger.destroy_logger_context()
    with logger.start_logging():
        assert not logger.is_initialized  # as in itwinai: its methods do nothing at all
        logger.log(1.0, "loss", step=1, batch_idx=0)
        logger.log({"a": 1}, "d", kind="dict")
        logger.save_hyperparameters({"lr": 0.1})
    logger.create_logger_context()
    logger.log(2.0, "loss")
    logger.destroy_logger_context()
    assert list(tmp_path.iterdir()) == []


def test_console_logger_logs_lines_and_journals(tmp_path, caplog):
    import torch

    logger = ConsoleLogger(savedir=tmp_path / "mllogs", log_freq=2)
    with caplog.at_level(logging.INFO, logger="itwinai_journal.loggers"):
        with logger.start_logging():
            logger.log(0.5, "loss", step=3)
            logger.log(torch.tensor([0.25]), "t_loss", step=3)  # the line shows the item given
            logger.log(0.75, "acc", batch_idx=1)  # filtered by log_freq: no line, not kept
            logger.save_hyperparameters({"lr": 0.1})  # a no-op for ConsoleLogger
            logger.log({"not": "a path"}, "obj", kind="artifact")  # ignored, as in itwinai
    assert console_lines(caplog) == [
        "ConsoleLogger: loss = 0.5", "ConsoleLogger: t_loss = tensor([0.2500])",
        "The ConsoleLogger expects an artifact to be either a path or a directory Received "
        "instead an item of type <class 'dict'>. The item will be ignored and not logged."]
    got = records(tmp_path)
    assert [(r["kind"], r["name"], r["step"], r["value"]) for r in got] == [
        ("metric", "loss", 3, 0.5), ("metric", "t_loss", 3, 0.25)]
    # itwinai's ConsoleLogger stays initialized after destroy and can still log
    assert logger.is_initialized
    with pytest.warns(UserWarning, match="the journal is opened now"):
        logger.log(1.0, "later")
    logger.destroy_logger_context()
    _, rank = single_rank(tmp_path)
    assert [s["status"] for s in rank.manifest["sessions"]] == ["finished", "finished"]
    assert [r["name"] for r in records(tmp_path)][-1] == "later"


# --------------------------------------------------------------------------------------------
# secrets never reach the manifest
# --------------------------------------------------------------------------------------------


def _journal_text(root: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(root.rglob("*.json")))


def test_secrets_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "supersecret123")
    monkeypatch.setattr(sys, "argv", ["train.py", "--token=abc12345", "--lr", "0.1",
                                      "--password", "hunter2hunter", "supersecret123"])
    logger = MLFlowLogger(savedir=tmp_path / "mllogs")
    with logger.start_logging():
        logger.log(1.0, "x")
    _, rank = single_rank(tmp_path)
    manifest_text = (rank.path / "manifest.json").read_text()
    for secret in ("supersecret123", "abc12345", "hunter2hunter"):
        assert secret not in manifest_text
        assert secret not in _journal_text(tmp_path)
    argv = rank.manifest["sessions"][-1]["argv"]
    assert len(argv) == 7
    assert argv[0] == "train.py" and argv[2:4] == ["--lr", "0.1"] and argv[4] == "--password"


def test_secret_env_value_in_tracking_uri_is_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_KEY", "supersecret123")
    logger = MLFlowLogger(savedir=tmp_path / "mllogs",
                          tracking_uri="https://user:supersecret123@mlflow.example.org")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with logger.start_logging():
            logger.log(1.0, "x")
    assert "supersecret123" not in _journal_text(tmp_path)


@pytest.mark.parametrize("cls", [ConsoleLogger, MLFlowLogger, WandBLogger, TensorBoardLogger,
                                 Prov4MLLogger])
@pytest.mark.parametrize("keyword", ["experiment_id", "strcit"])
def test_a_keyword_the_signature_does_not_take_is_refused_naming_the_class(tmp_path, cls, keyword):
    """As itwinai 0.4.2 (checked side by side): `experiment_id=` (which only the journal base
    takes) and a misspelt option are a TypeError naming the logger's own __init__."""
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.__init__\(\) got an unexpected "
                                        rf"keyword argument '{keyword}'$"):
        cls(str(tmp_path), **{keyword: "x"})
