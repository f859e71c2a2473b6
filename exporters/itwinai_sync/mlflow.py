"""MLflow target: a journal run becomes a parent run with one nested child run per rank.

Exactly once: metrics and params go through `log_batch` with the rank's cursor as a tag of the
same request, so MLflow stores both or neither. Artifacts (text, dicts, figures, images, files,
torch objects) are written to deterministic artifact paths, so repeating one after a crash
overwrites it with the same bytes; the cursor tag is committed right after each. Models are
looked up by name in the run before being logged again.

Where the run goes: `--tracking-uri`, else the MLFlowLogger's `tracking_uri`, else
`MLFLOW_TRACKING_URI`, else `sqlite:///<savedir>/mlflow.db` (artifacts in `<savedir>/mlartifacts`).
The experiment is `--experiment`, else the logger's `experiment_name`, else the journal's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo

from .exporter import Exporter, ExportError, Notes, RankSink, scoped_env

TAG_RUN = "itwinai.run"
TAG_DIGEST = "itwinai.run_digest"
TAG_RANK = "itwinai.rank"
TAG_CURSOR = "itwinai.cursor"
TAG_ROLE = "itwinai.role"

#: MLflow's per-request limits. The client splits a larger log_batch into several requests,
#: which would separate the cursor tag from some of the records it covers, so each of our
#: requests stays within all of them, the cursor tag included.
MAX_ENTITIES, MAX_PARAMS = 1000, 100
MAX_REQUEST_BYTES = 1_000_000
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")

_FLUENT_LOCK = threading.Lock()


def mlflow_key(name: str) -> str:
    """A name MLflow accepts, deterministically: characters outside [A-Za-z0-9_-. :/] become
    '_'; empty, '.' and '..' path segments (MLflow refuses names that are not normalised
    paths) are dropped or become '_'; names over 250 characters keep 240 and a digest of the
    full name so that distinct names stay distinct."""
    key = _BAD_KEY_CHARS.sub("_", name)
    parts = ["_" if p in (".", "..") else p for p in key.split("/") if p]
    key = "/".join(parts) or "_"
    if len(key) > MAX_KEY:
        key = key[:240].rstrip("/") + "-" + hashlib.sha1(name.encode()).hexdigest()[:9]
    return key


def artifact_relpath(name: str, suffix: str = "") -> PurePosixPath:
    """The artifact path for a record name, as itwinai uses the identifier as the file name;
    `suffix` is added when the name has no extension."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", "..", ".")]
    path = PurePosixPath(*parts) if parts else PurePosixPath("artifact")
    if suffix and not path.suffix:
        path = path.with_name(path.name + suffix)
    return path


class MlflowExporter(Exporter):
    name = "mlflow"
    kinds = frozenset({"metric", "param", "text", "dict", "figure", "image", "artifact", "torch",
                       "model", "best_model", "dataset"})
    batch_records = 20_000

    def __init__(self, savedir: Path, options: dict[str, Any], notes: Notes):
        super().__init__(savedir, options, notes)
        self._clients: dict[str, Any] = {}
        self._sqlite_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @classmethod
    def cli_options(cls) -> list[click.Option]:
        return [
            click.Option(["--tracking-uri"], metavar="URI",
                         help="MLflow tracking URI (default: the logger's, MLFLOW_TRACKING_URI, "
                              "or sqlite:///SAVEDIR/mlflow.db)."),
            click.Option(["--experiment"], metavar="NAME",
                         help="MLflow experiment (default: the logger's experiment_name)."),
        ]

    # -- where a run goes -----------------------------------------------------------------------

    def _declared(self, run: RunInfo) -> dict[str, Any]:
        return run.destinations().get("mlflow") or {}

    def tracking_uri(self, run: RunInfo) -> str:
        return (self.options.get("tracking_uri") or self._declared(run).get("tracking_uri")
                or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.savedir.resolve()}/mlflow.db")

    def experiment_name(self, run: RunInfo) -> str:
        return (self.options.get("experiment") or self._declared(run).get("experiment_name")
                or run.experiment)

    def target_key(self, run: RunInfo) -> str:
        return f"mlflow:{self.tracking_uri(run)}"

    def describe(self, run: RunInfo) -> str:
        return f"{self.tracking_uri(run)}, experiment {self.experiment_name(run)!r}"

    def client(self, uri: str) -> Any:
        with self._guard:
            if uri not in self._clients:
                os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
                from mlflow import MlflowClient

                # MLflow's INFO lines (database migrations) and its pickle-format warning are
                # noise in a sync summary; errors still surface as exceptions.
                logging.getLogger("mlflow").setLevel(logging.WARNING)
                logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)

                self._clients[uri] = MlflowClient(tracking_uri=uri)
                self._sqlite_locks[uri] = threading.Lock()
            return self._clients[uri]

    def write_lock(self, uri: str) -> Any:
        """sqlite allows one writer: serialise this process's writes to one database file
        rather than failing with 'database is locked'."""
        return self._sqlite_locks[uri] if uri.startswith("sqlite:") else nullcontext()

    def _experiment_id(self, client: Any, run: RunInfo, uri: str, create: bool) -> str | None:
        name = self.experiment_name(run)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        if not create:
            return None
        location = None
        if uri.startswith("sqlite:///"):
            # MLflow's default for a sqlite store is ./mlruns of the current directory; keep
            # artifacts beside the database instead.
            db = Path(uri[len("sqlite:///"):])
            location = (db.parent / "mlartifacts").resolve().as_uri()
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another sync process
            return client.get_experiment_by_name(name).experiment_id

    # -- runs -----------------------------------------------------------------------------------

    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        uri = self.tracking_uri(run)
        client = self.client(uri)
        flat = self.options.get("ranks") == "0"
        with self.write_lock(uri):
            exp_id = self._experiment_id(client, run, uri, create)
            if exp_id is None:
                return None
            found = _find_runs(client, exp_id, run)
            if flat:
                child = found.get(("flat", rank.rank))
                if child is None and not create:
                    return None
                if child is None:
                    child = self._create(client, exp_id, run, rank, parent=None)
            else:
                parent = found.get(("parent", None))
                child = found.get(("child", rank.rank))
                if child is None and not create:
                    return None
                if parent is None:
                    parent = self._create(client, exp_id, run, None, parent=None)
                if child is None:
                    child = self._create(client, exp_id, run, rank, parent=parent)
        parent = None if flat else parent
        return MlflowRankSink(run, rank, self.notes, client, child, parent, self.write_lock(uri))

    def _create(self, client: Any, exp_id: str, run: RunInfo, rank: RankInfo | None,
                parent: Any) -> Any:
        info = run.info
        tags = {TAG_RUN: run.key, TAG_DIGEST: run_digest(run)}
        if rank is None:
            tags[TAG_ROLE] = "parent"
            name = info.get("run_name") or run.run_id
            if info.get("description"):
                tags["mlflow.note.content"] = str(info["description"])
            first = run.ranks[0].manifest if run.ranks else {}
            tags.update(_manifest_tags(first))
            tags["itwinai.world_size"] = str(first.get("world_size", len(run.ranks)))
        else:
            tags[TAG_RANK] = str(rank.rank)
            tags[TAG_ROLE] = "child" if parent is not None else "flat"
            name = f"worker_{rank.rank}" if parent is not None else (
                info.get("run_name") or run.run_id)
            if parent is not None:
                tags["mlflow.parentRunId"] = parent.info.run_id
            if rank.rank == 0:
                tags["itwinai.main"] = "true"
            tags.update(_manifest_tags(rank.manifest))
        start = int(float(info.get("created") or 0) * 1000) or None
        return client.create_run(exp_id, start_time=start, tags=tags, run_name=name)


def run_digest(run: RunInfo) -> str:
    return hashlib.sha256(run.key.encode()).hexdigest()[:24]


def _find_runs(client: Any, exp_id: str, run: RunInfo) -> dict[tuple[str, int | None], Any]:
    """The target runs of a journal run, found by tags (never re-created on re-sync)."""
    found: dict[tuple[str, int | None], Any] = {}
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=f"tags.`{TAG_DIGEST}` = "
                                  f"'{run_digest(run)}'", max_results=1000, page_token=token)
        for r in page:
            role = r.data.tags.get(TAG_ROLE)
            rank = r.data.tags.get(TAG_RANK)
            found[(role, int(rank) if rank is not None else None)] = r
        token = page.token
        if not token:
            return found


def _manifest_tags(manifest: dict[str, Any]) -> dict[str, str]:
    tags = {}
    if manifest.get("host"):
        tags["itwinai.host"] = str(manifest["host"])
    sessions = manifest.get("sessions") or []
    if sessions:
        tags["itwinai.argv"] = " ".join(sessions[0].get("argv", []))[:5000]
    for dist, version in (manifest.get("versions") or {}).items():
        tags[f"itwinai.version.{dist}"] = str(version)
    if manifest.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(manifest["git_commit"])
    return tags


class MlflowRankSink(RankSink):
    def __init__(self, run: RunInfo, rank: RankInfo, notes: Notes, client: Any, target: Any,
                 parent: Any, write_lock: Any):
        super().__init__(run, rank, notes)
        self.client = client
        self.target = target
        self.parent = parent
        self.run_id = target.info.run_id
        self.write_lock = write_lock
        self._cursor = int(target.data.tags.get(TAG_CURSOR, 0))
        self._params = dict(target.data.params)
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self._keys: dict[str, str] = {}

    def cursor(self) -> int:
        return self._cursor

    def close(self) -> None:
        """Mirror the journal's session status: a rank that ended is a terminated MLflow run
        (finished, failed, or killed for an interrupted session), with its real end time."""
        _terminate(self.client, self.target, self.rank.status, _end_ms(self.rank.manifest))
        if self.parent is not None:
            ends = [_end_ms(r.manifest) for r in self.run.ranks]
            _terminate(self.client, self.parent, self.run.status,
                       None if None in ends else max(ends))

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = mlflow_key(name)
            if key != name:
                self.notes.add(f"mlflow: name {name[:60]!r} is stored as {key[:60]!r}")
        return key

    # -- the batch ----------------------------------------------------------------------------

    def export(self, batch: pa.Table, cursor: int) -> None:
        metrics: list[Any] = []
        params: dict[str, Any] = {}
        size = 0
        last_seq = self._cursor
        cols = batch.select(["seq", "time", "kind", "name", "step", "value", "text", "blob",
                             "meta"]).to_pydict()
        for i, kind in enumerate(cols["kind"]):
            seq = cols["seq"][i]
            if kind == "metric":
                value = cols["value"][i]
                metrics.append(self._Metric(self._key(cols["name"][i]), _finite(value),
                                            int(round(cols["time"][i] * 1000)),
                                            cols["step"][i] or 0))
                size += 64 + len(cols["name"][i])
            elif kind == "param":
                param = self._param(cols["name"][i], cols["text"][i], cols["blob"][i])
                if param is not None:
                    params[param.key] = param
                    size += len(param.key) + len(param.value)
            else:
                self._commit(metrics, params, last_seq)
                metrics, params, size = [], {}, 0
                self._side_effect(kind, {k: v[i] for k, v in cols.items()})
            last_seq = seq
            if (len(metrics) + len(params) + 1 >= MAX_ENTITIES or len(params) + 1 >= MAX_PARAMS
                    or size > MAX_REQUEST_BYTES * 0.8):
                self._commit(metrics, params, last_seq)
                metrics, params, size = [], {}, 0
        self._commit(metrics, params, cursor)

    def _commit(self, metrics: list[Any], params: dict[str, Any], cursor: int) -> None:
        """One log_batch: the records and the cursor that covers them, atomically."""
        if not metrics and not params and cursor == self._cursor:
            return
        tag = self._RunTag(TAG_CURSOR, str(cursor))
        with self.write_lock:
            self.client.log_batch(self.run_id, metrics=metrics, params=list(params.values()),
                                  tags=[tag])
        self._params.update({p.key: p.value for p in params.values()})
        self._cursor = cursor

    def _param(self, name: str, text: str | None, blob: str | None) -> Any:
        value = json.loads(text) if text is not None else self.blobs.read(blob or "").decode()
        value_s = value if isinstance(value, str) else json.dumps(value)
        if len(value_s) > MAX_PARAM_VALUE:
            self.notes.add(f"mlflow: param {name!r} is longer than {MAX_PARAM_VALUE} characters"
                           " and was cut")
            value_s = value_s[:MAX_PARAM_VALUE]
        key = self._key(name)
        old = self._params.get(key)
        if old is not None and old != value_s:
            self.notes.add(f"mlflow: param {key!r} was logged again with a different value "
                           f"({old!r} -> {value_s!r}); MLflow params cannot change, the first "
                           "value is kept")
            return None
        return self._Param(key, value_s)

    # -- everything that is not log_batch ------------------------------------------------------

    def _side_effect(self, kind: str, rec: dict[str, Any]) -> None:
        meta = json.loads(rec["meta"]) if rec["meta"] else {}
        name = rec["name"]
        if kind in ("model", "best_model"):
            self._log_model(name, rec["blob"], meta)
        elif kind == "dataset":
            self._log_dataset(name, rec["text"], meta)
        else:
            self._log_artifact_record(kind, name, rec, meta)

    def _payload(self, rec: dict[str, Any]) -> bytes:
        if rec["blob"]:
            return self.blobs.read(rec["blob"])
        return (rec["text"] or "").encode()

    def _upload(self, relpath: PurePosixPath, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="itwinai-mlflow-") as tmp:
            local = Path(tmp) / relpath.name
            local.write_bytes(data)
            parent = str(relpath.parent) if str(relpath.parent) != "." else None
            self.client.log_artifact(self.run_id, str(local), artifact_path=parent)

    def _log_artifact_record(self, kind: str, name: str, rec: dict[str, Any],
                             meta: dict[str, Any]) -> None:
        if kind == "text":
            self._upload(artifact_relpath(name, ".txt"), self._payload(rec))
        elif kind == "dict":
            self._upload(artifact_relpath(name, ".json"), self._payload(rec))
        elif kind in ("figure", "image"):
            if meta.get("media_type") == "application/vnd.plotly.v1+json":
                self._upload(artifact_relpath(name, ".json"), self._payload(rec))
            else:
                self._upload(artifact_relpath(name, ".png"), self._payload(rec))
        elif kind == "torch":
            base = artifact_relpath(name)
            self._upload(base / meta.get("file_name", "object.pt"), self._payload(rec))
        elif kind == "artifact":
            self._log_files(artifact_relpath(name), rec["blob"], meta)
        else:  # pragma: no cover - kinds are filtered by the engine
            raise ExportError(f"mlflow exporter got an unexpected kind {kind!r}")

    def _log_files(self, base: PurePosixPath, sha: str, meta: dict[str, Any]) -> None:
        """A file goes to `<identifier>/<file name>` (as mlflow.log_artifact with
        artifact_path=identifier does); a directory keeps its structure below it."""
        with tempfile.TemporaryDirectory(prefix="itwinai-mlflow-") as tmp:
            root = Path(tmp)
            if meta.get("type") == "directory":
                for f in self.blobs.tree(sha):
                    dest = root / f["path"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(self.blobs.read(f["sha256"]))
                self.client.log_artifacts(self.run_id, str(root),
                                          artifact_path=f"{base}/{meta.get('dir_name', '')}"
                                          .rstrip("/"))
            else:
                local = root / meta.get("file_name", "artifact")
                local.write_bytes(self.blobs.read(sha))
                self.client.log_artifact(self.run_id, str(local), artifact_path=str(base))

    def _log_model(self, name: str, sha: str, meta: dict[str, Any]) -> None:
        import mlflow

        key = mlflow_key(name)
        if _model_logged(self.client, self.run_id, key):
            return
        try:
            import torch

            with self.blobs.open(sha) as f:
                module = torch.load(f, weights_only=False, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - the class may not be importable here
            self.notes.add(f"mlflow: model {name!r} of class {meta.get('class')} cannot be "
                           f"loaded on this machine ({type(e).__name__}: {e}); its torch.save "
                           "file is logged as an artifact instead")
            self._upload(artifact_relpath(name) / meta.get("file_name", "model.pt"),
                         self.blobs.read(sha))
            return
        # log_model reads the global tracking URI and experiment: hold them for this call only,
        # one thread at a time. (A fluent start_run would also change the run's status.)
        with _FLUENT_LOCK, _fluent_target(self.client.tracking_uri,
                                          self.target.info.experiment_id):
            mlflow.pytorch.log_model(module, name=key, run_id=self.run_id, pip_requirements=[],
                                     serialization_format="pickle",
                                     tags={"itwinai.class": str(meta.get("class"))})

    def _log_dataset(self, name: str, text: str | None, meta: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        desc = json.loads(text or "{}")
        dataset = Dataset(
            name=str(desc.get("name") or name),
            digest=str(desc.get("digest") or ""),
            source_type=str(desc.get("source_type") or "itwinai-journal"),
            source=str(desc.get("source") or json.dumps({"journal_name": name})),
            schema=_as_json(desc.get("schema")),
            profile=_as_json(desc.get("profile") or {"shape": desc.get("shape")}),
        )
        context = meta.get("context") or "training"
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context",
                                                                            str(context))])])


@contextmanager
def _fluent_target(uri: str, experiment_id: str) -> Iterator[None]:
    """Point MLflow's fluent API at (uri, experiment) and put everything back afterwards,
    including the environment variables MLflow sets as a side effect, so later exports in this
    process resolve their destination as before."""
    import mlflow
    from mlflow.tracking import _tracking_service

    saved_uri = _tracking_service.utils._tracking_uri
    with scoped_env({}, restore=("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")):
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=experiment_id)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_uri)


_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def _end_ms(manifest: dict[str, Any]) -> int | None:
    sessions = manifest.get("sessions") or []
    end = sessions[-1].get("end") if sessions else None
    return int(end * 1000) if end else None


def _terminate(client: Any, target: Any, status: str, end_ms: int | None) -> None:
    wanted = _MLFLOW_STATUS.get(status)
    if wanted is None or end_ms is None:
        return  # still running: leave the MLflow run RUNNING
    current = client.get_run(target.info.run_id).info
    if current.status != wanted or current.end_time != end_ms:
        # set_terminated prints "View run ... at" for a server URI: two lines per rank through
        # the progress bar; the summary says where the runs are.
        with scoped_env({"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):
            client.set_terminated(target.info.run_id, status=wanted, end_time=end_ms)


def _as_json(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _finite(value: float | None) -> float:
    """MLflow stores NaN as NaN; infinities are stored by MLflow as +-1.7976931348623157e308
    (its own mapping), which we pass through unchanged."""
    if value is None:
        return math.nan
    return value


def _model_logged(client: Any, run_id: str, name: str) -> bool:
    """Whether this run already has a complete logged model of that name (a re-run after a
    crash). A model whose logging failed half-way is not complete and is logged again."""
    try:
        run = client.get_run(run_id)
        models = client.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
        )
        return any(str(m.status) == "READY" for m in models)
    except Exception:  # noqa: BLE001 - older MLflow without logged models: check artifacts
        return any(f.path == name for f in client.list_artifacts(run_id))
