"""Every use of a tracker library's private API, in one place, with the version ranges it was
tested against.

The exporters drive MLflow, W&B, TensorBoard and yprov4ml through their public API wherever
one exists. Where none does (W&B's transaction-log format, which wandb-core ships no Python
reader for; the clock W&B stamps a run's start with; yprov4ml's module globals; MLflow's saved
tracking URI, its schema creation, the REST store a log_batch body is sent through, the tables
and sessions of its sqlite store, its validation of names and tags), the code
is here, so that an upgrade of a tracker is checked in one module. The tested ranges are the
requirements of the extras in `pyproject.toml` (yprov4ml's, installed without its dependencies,
in `requirements-prov4ml-nodeps.txt`); `untested()` tells an exporter when the installed
version is outside them, and tests/test_tracker_compat.py checks that the installed versions
are inside.
"""

from __future__ import annotations

import inspect
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from types import SimpleNamespace
from typing import Any

from itwinai_journal.compat import Gate, in_range

#: The ranges of the trackers' versions the private API below was tested with: the requirements
#: of their extras in pyproject.toml (tests/test_tracker_compat.py checks that they agree).
#: Constants, as on the journal side (itwinai_journal.compat): reading this package's metadata
#: and importing `packaging` to parse it cost 60-75 ms at the start of every sync, more than
#: exporting 10,000 points to TensorBoard.
TESTED: dict[str, Gate] = {
    "mlflow": ("mlflow", (2, 12), (4,)),
    "wandb": ("wandb", (0, 17), (0, 32)),
    "tensorboard": ("tensorboard", (2, 14), (3,)),
}


def tested_range(dist: str) -> str | None:
    """The tested version range of `dist` as its extra writes it (`>=2.12,<4`), None for a
    library whose private API is not used."""
    gate = TESTED.get(dist)
    if gate is None:
        return None
    _, low, high = gate
    return f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"


def untested(dist: str) -> str | None:
    """A one-line note when the installed `dist` is outside its tested range (the private API
    used below may have changed), else None."""
    gate = TESTED.get(dist)
    try:
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    if gate is None or in_range(installed, gate):
        return None
    return (f"{dist} {installed} is outside the tested range {tested_range(dist)}: if the "
            "export fails or looks wrong, install a version inside it")


# -- W&B ---------------------------------------------------------------------------------------
# wandb-core writes a LevelDB-style log: a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB
# blocks of chunks `crc32 | length | type | data` (IEEE CRC over type+data; FULL, FIRST, MIDDLE,
# LAST). wandb (up to 0.31 at least) ships no Python reader, hence this one; it stops at the
# first torn or corrupt chunk, as wandb-core's own reader does.

WANDB_LOG_MAGIC = b":W&B"
WANDB_LOG_BLOCK = 32 * 1024
_WANDB_CHUNK = struct.Struct("<IHB")


def iter_wandb_records(data: bytes, base: int = 0) -> Iterator[bytes]:
    """Payloads of the complete records of a `.wandb` file (nothing if it is not a W&B log).
    `data` holds the file from offset `base` on: 0, or a block boundary (then a record
    continued from an earlier block is skipped)."""
    if base == 0 and (len(data) < 7 or data[:4] != WANDB_LOG_MAGIC):
        return
    pos, size, parts = (7 if base == 0 else 0), len(data), None
    skipping = base > 0
    while True:
        left = WANDB_LOG_BLOCK - (base + pos) % WANDB_LOG_BLOCK
        if left < 7:
            pos += left
            continue
        if pos + 7 > size:
            return
        crc, length, kind = _WANDB_CHUNK.unpack_from(data, pos)
        end = pos + 7 + length
        if (not crc and not length and not kind) or length > left - 7 or end > size:
            return
        if zlib.crc32(data[pos + 6:end]) != crc:
            return
        chunk, pos = data[pos + 7:end], end
        if skipping and kind in (3, 4):
            continue
        skipping = False
        if kind == 1:
            yield chunk
        elif kind == 2:
            parts = [chunk]
        elif kind in (3, 4) and parts is not None:
            parts.append(chunk)
            if kind == 4:
                yield b"".join(parts)
                parts = None
        else:
            return


@contextmanager
def wandb_run_clock(start: float | None) -> Iterator[None]:
    """While `wandb.init` runs, the clock W&B stamps the run's start with reads `start`.
    wandb offers no setting for it (`x_start_time` is overwritten by `init`); the run takes
    `time.time()` of its module (`wandb.sdk.wandb_run`) when it is created. Only that module's
    view is changed, and only for the call (W&B runs are started one at a time here)."""
    if start is None:
        yield
        return
    import types

    import wandb.sdk.wandb_run as run_module

    real = run_module.time

    class Clock(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    clock = Clock("time")
    clock.time = lambda: start  # type: ignore[attr-defined]
    run_module.time = clock  # type: ignore[assignment]
    try:
        yield
    finally:
        run_module.time = real


def wandb_publish_environment(run: Any, record: Any) -> bool:
    """Send W&B's environment record (its `wandb-metadata.json`) of `run` through the run's
    private interface (the SDK fills it from the machine it runs on, with no public way to
    give another). False when this wandb version has no such interface."""
    interface = getattr(run, "_interface", None)
    if interface is None or not hasattr(interface, "publish_environment"):
        return False
    interface.publish_environment(record)
    return True


def wandb_publish_record(run: Any, record: Any) -> bool:
    """Send a raw W&B record (a StatsRecord stamped with the sample's time: `publish_stats`
    stamps the export's) through the run's private interface. False when this wandb version
    has no such interface."""
    interface = getattr(run, "_interface", None)
    if interface is None or not hasattr(interface, "_publish"):
        return False
    interface._publish(record)
    return True


# -- yprov4ml ------------------------------------------------------------------------------------

#: The yprov4ml releases whose API, globals and documents the Prov4ML exporter drives: 3.2.4
#: (Python < 3.12) is tested; 3.2.5 and later need Python 3.12 (requirements-prov4ml-nodeps.txt).
SUPPORTED_YPROV4ML = "3.2."
#: yprov4ml keeps one global run per process: one provenance run is made at a time.
_YPROV4ML_LOCK = threading.Lock()


def yprov4ml_version() -> str:
    try:
        return metadata.version("yprov4ml")
    except metadata.PackageNotFoundError:  # pragma: no cover - imported from a source tree
        return "unknown"


@contextmanager
def yprov4ml_session(now: Any) -> Iterator[SimpleNamespace]:
    """yprov4ml with its global run state (`yprov4ml.constants.PROV4ML_DATA`) fresh, for one
    provenance run at a time in this process, and three of its module globals replaced (and
    put back): its clock (`get_time`, replaced by `now`: the journal's times), the 1 s sleep
    in `start_run` (it keeps concurrently started processes from taking the same run index;
    the caller pins the index), and the `requirements.txt` lookup of `end_run`, which walks
    the current directory of the exporting process."""
    with _YPROV4ML_LOCK:
        import yprov4ml
        import yprov4ml.datamodel.metric_data as metric_data
        import yprov4ml.datamodel.prov4ml_data as prov4ml_data
        import yprov4ml.functs as functs
        import yprov4ml.provenance.provenance_graph as provenance_graph
        from yprov4ml.constants import PROV4ML_DATA
        from yprov4ml.datamodel.attribute_type import LoggingItemKind, get_source_from_kind

        patches = [(m, "get_time", now) for m in (prov4ml_data, metric_data, provenance_graph)]
        patches.append((prov4ml_data, "time", SimpleNamespace(sleep=lambda seconds: None)))
        patches.append((functs, "_requirements_lookup", lambda path: None))
        saved = [(m, attr, m.__dict__[attr]) for m, attr, _ in patches if attr in m.__dict__]
        _reset_yprov4ml(PROV4ML_DATA)
        try:
            for module, attr, value in patches:
                if attr in module.__dict__:
                    setattr(module, attr, value)
            yield SimpleNamespace(lib=yprov4ml, data=PROV4ML_DATA, kind=LoggingItemKind,
                                  source_of=get_source_from_kind)
        finally:
            for module, attr, value in saved:
                setattr(module, attr, value)
            _reset_yprov4ml(PROV4ML_DATA)


def _reset_yprov4ml(data: Any) -> None:
    """A fresh yprov4ml run state, also undoing the no-op methods that `start_run` installs on
    the global object for a non-collecting rank."""
    for name in ("add_metric", "add_artifact", "save_metric_to_file", "save_all_metrics",
                 "add_parameter"):
        data.__dict__.pop(name, None)
    data.__init__()


# -- MLflow --------------------------------------------------------------------------------------


def mlflow_tracking_uri_setting() -> Any:
    """The tracking URI MLflow's fluent API was explicitly set to in this process (None when
    never set), to be put back after the export moved it: `mlflow.get_tracking_uri()` would
    return the default it resolves instead, and setting that would pin it."""
    from mlflow.tracking import _tracking_service

    return _tracking_service.utils._tracking_uri


def mlflow_create_sqlite_schema(db_uri: str, artifact_uri: str) -> None:
    """Create MLflow's tables (its chain of schema migrations) in the sqlite database at
    `db_uri`, through the SQL store class MLflow's server uses, and close its connections."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(db_uri, artifact_uri)
    store.engine.dispose()


def mlflow_store(client: Any) -> tuple[Any, bool]:
    """The tracking store behind an `MlflowClient` (REST, SQL or file), and whether it is the
    REST store of a tracking server: log_batch bodies for a server are built by the exporter
    (see targets/mlflow.py, BatchWriter) and sent with `mlflow_rest_call`."""
    from mlflow.store.tracking.rest_store import RestStore

    store = client._tracking_client.store
    return store, isinstance(store, RestStore)


#: The columns of the tables targets/sqlite_rows.py writes, as every tested MLflow defines them.
_MLFLOW_COLUMNS = {
    "metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "latest_metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "tags": {"key", "value", "run_uuid"},
}


def mlflow_sqlite_tables(store: Any) -> SimpleNamespace | None:
    """MLflow's own definitions of the tables a log_batch of metrics writes (`metrics`,
    `latest_metrics`, `tags`; `runs`, and its `active` stage, to check the run), and a factory
    of the store's write sessions, for MLflow's SqlAlchemyStore on sqlite
    (targets/sqlite_rows.py); None for any other store, or when a table's columns are not the
    ones that module writes."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if type(store) is not SqlAlchemyStore or store.db_type != "sqlite":
        return None
    from mlflow.entities import LifecycleStage
    from mlflow.store.tracking.dbmodels import models

    tables = {m.__tablename__: m.__table__ for m in (models.SqlMetric, models.SqlLatestMetric,
                                                      models.SqlTag, models.SqlRun)}
    if any(set(tables[name].c.keys()) != columns for name, columns in _MLFLOW_COLUMNS.items()):
        return None
    maker = store.ManagedSessionMaker
    # MLflow 3 marks a write session as one (read_only=False); MLflow 2 has no such argument.
    writes = "read_only" in inspect.signature(maker).parameters
    return SimpleNamespace(session=(lambda: maker(read_only=False)) if writes else maker,
                           active=LifecycleStage.ACTIVE, **tables)


def _mlflow_accepts(validate: Any, *args: Any) -> bool:
    """Whether one of MLflow's validation functions passes `args`."""
    from mlflow.exceptions import MlflowException

    try:
        validate(*args)
    except MlflowException:
        return False
    return True


def mlflow_accepts_metric_name(name: str) -> bool:
    """Whether MLflow's validation of a metric takes `name` (its characters, its length)."""
    from mlflow.utils.validation import _validate_metric

    return _mlflow_accepts(_validate_metric, name, 0.0, 0, 0)


def mlflow_keeps_tag(key: str, value: str) -> bool:
    """Whether MLflow's store sets a run tag as given: one its validation takes, with a value
    it does not truncate, and not `mlflow.runName` (which renames the run instead)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH, _validate_tag

    return (key != MLFLOW_RUN_NAME and len(value) <= MAX_TAG_VAL_LENGTH
            and _mlflow_accepts(_validate_tag, key, value))


def mlflow_rest_call(store: Any, message: Any, body: str) -> None:
    """One request of the MLflow service method `message` (a protobuf class, e.g. LogBatch)
    with a JSON `body`, through a REST store: MLflow's own endpoint, credentials, retries and
    error mapping."""
    store._call_endpoint(message, body)
