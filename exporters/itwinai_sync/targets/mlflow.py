"""MLflow target: a journal run with one rank becomes one MLflow run, as MLFlowLogger makes it
online; a run with several ranks becomes a parent run with one nested child run per rank.

Exactly once: metrics and params go through `log_batch` with the rank's cursor as a tag of the
same request (in a SQL store, which keeps a repeated metric point once, only the last request of
each batch of metrics carries it: see `MlflowRankSink._commit`; into sqlite a request of
metrics is written as the rows log_batch writes, its cursor in the same transaction: see
sqlite_rows). Artifacts (text, dicts, figures, images, files, torch objects) are written to
deterministic artifact paths, so repeating one after a crash overwrites it with the same bytes;
the cursor tag is committed right after each. Models are looked up by name in the run before
being logged again.

Which MLflow runs a journal has: every run carries the journal's identity (`itwinai.journal`),
its role (`parent` or `rank`) and rank, and is found by them, never by name. Find-or-create is a
claim: a sync that finds no run creates one (tagged with its creation time), searches again, and
keeps the earliest created of all it finds, deleting the others. Every sync does the same with
what it finds, so two syncs of two copies of one journal that created runs at the same time
converge on one run; one whose run was deleted under it continues in the kept one
(TargetChanged), where writing the same points again stores nothing twice (MLflow's SQL store
keys a metric point by name, timestamp, step and value; params and artifacts are idempotent).
A different journal with the same experiment and run id gets runs of its own, named with
`[journal <id>]`.

Where the run goes: `--tracking-uri`, else the MLFlowLogger's `tracking_uri`, else
`MLFLOW_TRACKING_URI`, else `sqlite:///<savedir>/mlflow.db` (artifacts in `<savedir>/mlartifacts`).
The experiment is `--experiment`, else the logger's `experiment_name`, else the journal's.

Sampled system metrics (`system_metric` records) are metrics `system/<name>` under the names
and units of MLflow's own system-metrics monitor (see system_metrics.py), at step = the sample's
ordinal in the rank and timestamp = when it was read, so MLflow's "System metrics" tab shows
them. They go in the same `log_batch` requests as the other metrics, covered by the cursor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, nullcontext
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_journal.format.fsio import fsync_dir
from itwinai_journal.read.liveness import pid_alive
from itwinai_sync import compat
from itwinai_sync.api import (
    LOCK_DIR,
    Exporter,
    ExportError,
    Notes,
    RankSink,
    TargetChanged,
    TargetOption,
    int64_step,
    meta_of,
    param_str,
    scoped_env,
)

from . import quickack, system_metrics
from .sqlite_rows import SqliteRows

TAG_RUN = "itwinai.run"
TAG_DIGEST = "itwinai.run_digest"
TAG_JOURNAL = "itwinai.journal"
TAG_RANK = "itwinai.rank"
TAG_CURSOR = "itwinai.cursor"
TAG_ROLE = "itwinai.role"
TAG_CLAIMED = "itwinai.claimed"

#: MLflow's per-request limits. The client splits a larger log_batch into several requests,
#: which would separate the cursor tag from some of the records it covers, so each of our
#: requests stays within all of them, the cursor tag included.
MAX_ENTITIES, MAX_PARAMS = 1000, 100
MAX_REQUEST_BYTES = 1_000_000
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 5000
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")
#: Characters MLflow refuses in a logged model's name.
_BAD_MODEL_CHARS = re.compile(r"[/:.%\"']")
#: Seconds to wait for a tracking server to resolve and answer before reporting it unreachable
#: (MLflow's own retries would take minutes).
REACH_TIMEOUT = 5.0
#: What a SQL store answers when two syncs insert the same row at once (sqlite, PostgreSQL,
#: MySQL): MLflow checks for an existing param, tag or latest value, then inserts, and the
#: slower of two concurrent requests fails on the unique key.
_CONFLICT = re.compile(r"IntegrityError|UNIQUE constraint|duplicate key|Duplicate entry")
CONFLICT_RETRIES = 5

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
        key = key[:240].rstrip("/") + "-" + _digest(name, 9)
    return key


def model_name(name: str) -> str:
    """A logged-model name MLflow accepts: '/', ':', '.', '%' and quotes become '_' (MLflow 3
    refuses them: `model.pt`, `checkpoints/best`, `model:v1`)."""
    return mlflow_key(_BAD_MODEL_CHARS.sub("_", name))


def _digest(name: str, n: int) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:n]


def artifact_relpath(name: str, suffix: str = "") -> PurePosixPath:
    """The artifact path for a record name, as itwinai uses the identifier as the file name;
    `suffix` is added when the name has no extension."""
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", "..", ".")]
    path = PurePosixPath(*parts) if parts else PurePosixPath("artifact")
    if suffix and not path.suffix:
        path = path.with_name(path.name + suffix)
    return path


def canonical_uri(uri: str) -> str:
    """One spelling per tracking store, without credentials: local paths resolved
    (`sqlite:///a//b/../mlflow.db`), scheme and host in lower case, default ports, trailing
    slashes and the user/password part of the URI dropped (`http://u:p@Host:80/` ->
    `http://host`). Used for the target key, the ledger and messages; the client is given the
    URI as written, credentials included."""
    local = _local_store(uri)
    if local is not None:
        scheme, path = local
        return f"{scheme}:///{path}" if scheme == "sqlite" else path.as_uri()
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and (parts.scheme.lower(), port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    path = re.sub("/+", "/", parts.path).rstrip("/")
    return urlunsplit((parts.scheme.lower(), host, path, parts.query, ""))


def _local_store(uri: str) -> tuple[str, Path] | None:
    """('sqlite', database file) or ('file', store directory) for a store on this machine."""
    if uri.startswith("sqlite:///"):
        raw = uri[len("sqlite:///"):].split("?", 1)[0]
        return ("sqlite", Path(raw).resolve()) if raw and raw != ":memory:" else None
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        return ("file", Path(parts.path).resolve()) if parts.path else None
    if "://" not in uri and not re.match(r"^[A-Za-z][\w+.-]*:", uri):
        return ("file", Path(uri).resolve())  # MLflow takes a plain path as a file store
    return None


def create_sqlite_store(db: Path) -> None:
    """Create an empty MLflow database at `db` atomically: MLflow creates its tables through
    a chain of migrations, and a sync killed in the middle used to leave a database that fails
    for ever ("table _alembic_tmp_... already exists"). It is built under a temporary name
    beside `db` and linked into place complete; a concurrent sync that was first wins."""
    db.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in db.parent.glob(f".{db.name}.{host}.*.tmp"):  # left by a killed sync here
        pid = stale.name.rsplit(".", 3)[1]
        if pid.isdigit() and not pid_alive(int(pid), None):
            stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        compat.mlflow_create_sqlite_schema(f"sqlite:///{tmp}",
                                           (db.parent / "mlartifacts").as_uri())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, db)
        except FileExistsError:
            pass
        fsync_dir(db.parent)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass


def unreachable(uri: str) -> str | None:
    """Why an HTTP(S) tracking server cannot be reached (its host does not resolve, nothing
    listens, no answer within REACH_TIMEOUT), or None. MLflow's client would retry a refused
    connection for minutes before failing."""
    import requests

    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    if not requests.utils.get_environ_proxies(uri):  # through a proxy the proxy resolves it
        with ThreadPoolExecutor(1) as pool:
            lookup = pool.submit(socket.getaddrinfo, parts.hostname, parts.port or 80)
            try:
                lookup.result(timeout=REACH_TIMEOUT)
            except socket.gaierror:
                return f"host {parts.hostname!r} not found"
            except FutureTimeout:
                return f"host {parts.hostname!r} not resolved within {REACH_TIMEOUT:.0f} s"
    try:
        requests.head(uri, timeout=(REACH_TIMEOUT, 3 * REACH_TIMEOUT),
                      allow_redirects=False).close()
    except requests.exceptions.ConnectTimeout:
        return f"no connection within {REACH_TIMEOUT:.0f} s"
    except requests.exceptions.ConnectionError as e:
        return "connection refused" if "refused" in str(e).lower() else _first_line(e)
    except requests.exceptions.RequestException as e:
        return _first_line(e)
    return None


#: Where an MLflow 3 tracking server tells what it stores runs in.
SERVER_INFO = "/api/3.0/mlflow/server-info"
_SQL_SCHEMES = re.compile(r"^(sqlite|postgresql|mysql|mssql)(\+[\w-]+)?://", re.IGNORECASE)


def _sql_store(uri: str) -> bool:
    """Whether `uri` is an MLflow SQL store, directly or behind a tracking server (see
    MlflowExporter.dedupes)."""
    if _SQL_SCHEMES.match(uri):
        return True
    if urlsplit(uri).scheme.lower() not in ("http", "https"):
        return False
    import requests

    try:
        with requests.get(uri.rstrip("/") + SERVER_INFO, timeout=REACH_TIMEOUT) as answer:
            info = answer.json() if answer.status_code == 200 else {}
    except (requests.exceptions.RequestException, ValueError):
        return False
    return isinstance(info, dict) and info.get("store_type") == "SqlStore"


def idempotent(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Call an MLflow write whose repetition stores nothing twice (a log_batch of points and
    params already sent, a tag, a dataset input), again when it failed only because a
    concurrent sync of the same journal inserted the same row first."""
    from mlflow.exceptions import MlflowException

    for attempt in range(CONFLICT_RETRIES + 1):
        try:
            return call(*args, **kwargs)
        except MlflowException as e:
            if attempt == CONFLICT_RETRIES or not _CONFLICT.search(str(e)):
                raise
            time.sleep(0.05 * 2 ** attempt * (1 + secrets.randbelow(100) / 100))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class MlflowExporter(Exporter):
    name = "mlflow"
    kinds = frozenset({"metric", "param", "text", "dict", "figure", "image", "artifact", "torch",
                       "model", "best_model", "dataset", system_metrics.KIND})
    batch_records = 20_000
    parallel_ranks = True

    def __init__(self, savedir: Path, options: dict[str, Any], notes: Notes):
        super().__init__(savedir, options, notes)
        if why := compat.untested("mlflow"):
            notes.add(f"mlflow: {why}")
        self._clients: dict[str, Any] = {}
        self._sqlite_locks: dict[str, threading.Lock] = {}
        #: Where each journal run goes in each store, shared by the threads exporting its
        #: ranks, renewed by `connect` at the start of each sync of the run.
        self._places: dict[tuple[str, str], Place] = {}
        self._unreachable: dict[str, str] = {}
        self._dedupes: dict[str, bool] = {}
        #: Name -> key maps of each (store, journal, rank), kept across `--watch` passes.
        self._keymaps: dict[tuple[str, str, int], KeyMaps] = {}
        #: The servers whose responses are acknowledged at once during this sync (quickack).
        self._quickacked: list[str] = []
        self._guard = threading.Lock()

    cli_options = (
        TargetOption("--tracking-uri", metavar="URI",
                     help="MLflow tracking URI (default: the logger's, MLFLOW_TRACKING_URI, or "
                          "sqlite:///SAVEDIR/mlflow.db)."),
        TargetOption("--experiment", metavar="NAME",
                     help="MLflow experiment (default: the logger's experiment_name)."),
    )

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
        return f"mlflow:{canonical_uri(self.tracking_uri(run))}"

    def describe(self, run: RunInfo) -> str:
        return f"{canonical_uri(self.tracking_uri(run))}, experiment {self.experiment_name(run)!r}"

    def connect(self, run: RunInfo) -> None:
        uri = self.tracking_uri(run)
        place = Place(self, self.client(uri), uri, run)
        with self._guard:
            self._places[(canonical_uri(uri), run.journal_id)] = place

    def place(self, run: RunInfo) -> Place:
        """The Place of `run` in its store, the one `connect` made for this sync of the run."""
        uri = self.tracking_uri(run)
        client = self.client(uri)
        with self._guard:
            return self._places.setdefault((canonical_uri(uri), run.journal_id),
                                           Place(self, client, uri, run))

    def forget_unreachable(self) -> None:
        with self._guard:
            self._unreachable.clear()

    def lock_dir(self, run: RunInfo) -> Path | None:
        """Beside a store on this machine (sqlite file, file store); none for a server."""
        local = _local_store(self.tracking_uri(run))
        if local is None:
            return None
        _, path = local
        return path.parent / LOCK_DIR / f"mlflow-{path.name}"

    def client(self, uri: str) -> Any:
        with self._guard:
            if uri in self._unreachable:
                raise ExportError(self._unreachable[uri])
            if uri not in self._clients:
                os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
                from mlflow import MlflowClient

                # MLflow's INFO lines (database migrations) and its pickle-format warning are
                # noise in a sync summary; errors still surface as exceptions.
                logging.getLogger("mlflow").setLevel(logging.WARNING)
                logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
                if quickack.acknowledge_at_once(uri):
                    self._quickacked.append(uri)
                why = unreachable(uri)
                if why is not None:
                    self._unreachable[uri] = (f"cannot reach the MLflow tracking server at "
                                              f"{canonical_uri(uri)}: {why}")
                    raise ExportError(self._unreachable[uri])
                local = _local_store(uri)
                if local is not None and local[0] == "sqlite" and not local[1].exists():
                    create_sqlite_store(local[1])
                self._clients[uri] = MlflowClient(tracking_uri=uri)
                self._sqlite_locks[uri] = threading.Lock()
            return self._clients[uri]

    def close(self) -> None:
        """The servers of this sync are read as any other again (see quickack)."""
        with self._guard:
            for uri in self._quickacked:
                quickack.release(uri)
            self._quickacked.clear()

    def dedupes(self, uri: str) -> bool:
        """Whether the store behind `uri` keeps a metric point once however often it is sent:
        MLflow's SQL store (sqlite, PostgreSQL, MySQL, ...) keys a point by run, name,
        timestamp, step and value, and stores a repeated one once; its file store appends it
        again. A tracking server says which store it has (`store_type` of its server-info,
        MLflow 3); one that does not say is taken not to."""
        with self._guard:
            if uri not in self._dedupes:
                self._dedupes[uri] = _sql_store(uri)
            return self._dedupes[uri]

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
        local = _local_store(uri)
        if local is not None and local[0] == "sqlite":
            # MLflow's default for a sqlite store is ./mlruns of the current directory; keep
            # artifacts beside the database instead.
            location = (local[1].parent / "mlartifacts").as_uri()
        from mlflow.exceptions import MlflowException

        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another sync process
            return client.get_experiment_by_name(name).experiment_id

    def keymaps(self, uri: str, run: RunInfo, rank: RankInfo) -> KeyMaps:
        with self._guard:
            key = (canonical_uri(uri), run.journal_id, rank.rank)
            if key not in self._keymaps:
                self._keymaps[key] = KeyMaps(self, rank)
            return self._keymaps[key]

    # -- runs -----------------------------------------------------------------------------------

    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        """The rank's sink. Nothing is created here: the sink creates the MLflow run(s) when
        it first has a record to write, so that a journal with nothing for MLflow leaves no
        empty run."""
        place = self.place(run)
        with place.write_lock, place.claim_lock:
            target = place.find_rank(rank, create)
        if target is None and not create:
            return None
        return MlflowRankSink(run, rank, self.notes, place, target)


class Place:
    """Where one journal run goes in one MLflow store: finding and claiming its runs.

    One Place serves all ranks of the run during one sync of it, in as many threads: what they
    share is looked up once (the experiment, the parent run, whether other journals have the
    same run key, and the runs the ranks already have, found by one search) rather than
    searched again per rank, which on a server with a thousand ranks was most of the requests
    that were not log_batch. A rank's new run is still claimed on its own (created, then
    searched for), under `claim_lock`, so that threads never create a parent each."""

    def __init__(self, exporter: MlflowExporter, client: Any, uri: str, run: RunInfo):
        self.exporter = exporter
        self.client = client
        self.uri = uri
        self.run = run
        self.notes = exporter.notes
        self.write_lock = exporter.write_lock(uri)
        self.claim_lock = threading.Lock()
        self.nested = len(run.ranks) > 1
        self._exp_id: str | None = None
        self._parent: Any = None
        self._parent_terminated = False
        self._others: bool | None = None
        #: The rank runs of this journal by rank, from one search when the first sink opens
        #: (one request per run rather than per rank), and the ranks that took theirs out of
        #: it: a rank opened again (a Place kept for reading cursors) searches again.
        self._rank_runs: dict[str, list[Any]] | None = None
        self._taken: set[int] = set()

    def experiment_id(self, create: bool) -> str | None:
        if self._exp_id is None:
            self._exp_id = self.exporter._experiment_id(self.client, self.run, self.uri, create)
        return self._exp_id

    # -- searching and claiming -------------------------------------------------------------

    def _search(self, tags: dict[str, str]) -> list[Any]:
        exp_id = self.experiment_id(create=False)
        if exp_id is None:
            return []
        found, token = [], None
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        while True:
            page = self.client.search_runs([exp_id], filter_string=query, max_results=1000,
                                           page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return found

    def _claim(self, tags: dict[str, str], create: Any, searched: bool = False,
               found: list[Any] | None = None) -> Any:
        """The run with `tags`, created by `create()` when there is none (`searched`: a search
        just found none, it is not repeated; `found`: what a search just found). Concurrent
        syncs converge on the earliest created run; the others are deleted (see the module
        docstring)."""
        runs = found if found is not None else [] if searched else self._search(tags)
        if not runs and create is not None:
            create()
            runs = self._search(tags)
        if not runs:
            return None
        runs.sort(key=_claim_order)
        for loser in runs[1:]:
            self._retire(loser, runs[0])
        return runs[0]

    def _retire(self, loser: Any, winner: Any) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_run(loser.info.run_id)
        except MlflowException:
            pass  # deleted meanwhile by another sync
        self.notes.add(f"mlflow: {self.run.key}: two syncs created the same run at once; kept "
                       f"{winner.info.run_id}, deleted {loser.info.run_id}")

    def _ids(self, role: str, rank: int | None) -> dict[str, str]:
        tags = {TAG_JOURNAL: self.run.journal_id, TAG_ROLE: role}
        if rank is not None:
            tags[TAG_RANK] = str(rank)
        return tags

    def find_rank(self, rank: RankInfo, link: bool) -> Any:
        """The rank's MLflow run if it exists; with `link`, attached to the parent when the
        run has several ranks (it may have been synced alone before, with `--ranks 0`)."""
        if self._rank_runs is None or rank.rank in self._taken:
            self._rank_runs, self._taken = {}, set()
            for r in self._search(self._ids("rank", None)):
                self._rank_runs.setdefault(r.data.tags.get(TAG_RANK, ""), []).append(r)
        self._taken.add(rank.rank)
        found = self._rank_runs.pop(str(rank.rank), [])
        target = self._claim(self._ids("rank", rank.rank), None, found=found)
        if target is not None and link and self.nested:
            self._link(target, rank)
        return target

    def claim_rank(self, rank: RankInfo, searched: bool = False) -> Any:
        """Create (claim) the rank's run, and the parent when there is none. `searched`: the
        rank's run was searched for when its sink was opened, and none was found (a run
        another sync creates meanwhile is found by the search after the creation)."""
        from mlflow.exceptions import MlflowException

        with self.write_lock, self.claim_lock:
            exp_id = self.experiment_id(create=True)
            parent = self._parent_run(create=True)
            target = self._claim(self._ids("rank", rank.rank),
                                 lambda: self._create(exp_id, rank, parent), searched)
            if parent is not None:
                try:
                    self._link(target, rank, parent)
                except MlflowException as e:
                    # A concurrent sync of a copy of this journal deleted the rank's run or the
                    # parent, keeping others: continue in those.
                    if all(self.client.get_run(r.info.run_id).info.lifecycle_stage != "deleted"
                           for r in (target, parent)):
                        raise
                    self._parent, self._parent_terminated = None, False  # as forget() does
                    raise TargetChanged(f"MLflow run {target.info.run_id} or its parent was "
                                        "deleted by a concurrent sync of this journal, which "
                                        "keeps others") from e
            return target

    def terminate_parent(self) -> None:
        """Mirror the run's status on the parent (once all ranks ended, with the last end
        time), once per sync of the run: every rank asks as it closes, and the answer depends
        on the manifests alone."""
        from mlflow.exceptions import MlflowException

        with self.claim_lock:
            parent = None if self._parent_terminated else self._parent_run(create=False)
            if parent is not None:
                ends = [_end_ms(r) for r in self.run.ranks]
                try:
                    _terminate(self.client, parent, self.run.status,
                               None if None in ends else max(ends))
                except MlflowException:
                    # A concurrent sync of a copy of this journal kept another parent and
                    # deleted this one: the parent it kept is its to end.
                    if self.client.get_run(parent.info.run_id).info.lifecycle_stage != "deleted":
                        raise
                    self._parent = None
                self._parent_terminated = True

    def _parent_run(self, create: bool) -> Any:
        """The parent run (None for a run of one rank), claimed once per sync of the run;
        the caller holds `claim_lock`."""
        if self.nested and self._parent is None:
            exp_id = self.experiment_id(create=True) if create else None
            self._parent = self._claim(self._ids("parent", None),
                                       (lambda: self._create(exp_id, None)) if create else None)
        return self._parent

    def forget(self) -> None:
        """Drop what was looked up once: a concurrent sync replaced a run of this journal."""
        with self.claim_lock:
            self._parent = None
            self._parent_terminated = False
            self._rank_runs = None

    def _link(self, target: Any, rank: RankInfo, parent: Any = None) -> None:
        """Nest the rank's run under the parent, named worker_<rank>."""
        if parent is None:
            parent = self._parent_run(create=True)
        rid = target.info.run_id
        if target.data.tags.get("mlflow.parentRunId") != parent.info.run_id:
            idempotent(self.client.set_tag, rid, "mlflow.parentRunId", parent.info.run_id)
        if target.info.run_name != f"worker_{rank.rank}":
            self.client.update_run(rid, name=f"worker_{rank.rank}")

    def _create(self, exp_id: str, rank: RankInfo | None, parent: Any = None) -> Any:
        run, info = self.run, self.run.info
        name = str(info.get("run_name") or run.run_id)
        if self._other_journals():
            name = f"{name} [journal {run.journal_id[:8]}]"
            self.notes.add(f"mlflow: another journal with experiment and run id {run.key} is "
                           f"in MLflow already; this one ({run.path}) has runs of its own, named "
                           f"{name!r}")
        tags = {TAG_RUN: run.key, TAG_DIGEST: run_digest(run), TAG_JOURNAL: run.journal_id,
                TAG_CLAIMED: f"{time.time_ns() // 1_000_000:015d} {secrets.token_hex(4)}"}
        first = run.ranks[0].manifest if run.ranks else {}
        if rank is None:
            tags[TAG_ROLE] = "parent"
            source = run.ranks[0] if run.ranks else None
        else:
            tags[TAG_ROLE] = "rank"
            tags[TAG_RANK] = str(rank.rank)
            source = rank
            if rank.rank == 0:
                tags["itwinai.main"] = "true"
            if parent is not None:
                tags["mlflow.parentRunId"] = parent.info.run_id
                name = f"worker_{rank.rank}"
        if (rank is None or parent is None) and info.get("description"):
            tags["mlflow.note.content"] = str(info["description"])[:MAX_TAG_VALUE]
        tags["itwinai.world_size"] = str(first.get("world_size", len(run.ranks)))
        tags.update(_manifest_tags(source))
        start = int(float(info.get("created") or 0) * 1000) or None
        return self.client.create_run(exp_id, start_time=start, tags=tags, run_name=name)

    def _other_journals(self) -> bool:
        if self._others is None:
            self._others = any(r.data.tags.get(TAG_JOURNAL) != self.run.journal_id
                               for r in self._search({TAG_DIGEST: run_digest(self.run)}))
        return self._others


def _claim_order(run: Any) -> tuple[str, str]:
    """Creation time (ms, zero-padded) then run id: earliest first, the same for every sync."""
    return (run.data.tags.get(TAG_CLAIMED) or "~", run.info.run_id)


def run_digest(run: RunInfo) -> str:
    """Digest of the run key (experiment/run id), to find other journals of the same key."""
    return hashlib.sha256(run.key.encode()).hexdigest()[:24]


def _manifest_tags(rank: RankInfo | None) -> dict[str, str]:
    """MLflow's system tags as the online logger's fluent run sets them (the UI's User and
    Source columns), from what the rank recorded about itself, and itwinai's own."""
    tags = {"mlflow.source.type": "LOCAL"}
    manifest = rank.manifest if rank is not None else {}
    argv = rank.sessions[0].argv if rank is not None and rank.sessions else ()
    if argv:
        tags["mlflow.source.name"] = argv[0][:MAX_TAG_VALUE]
        tags["itwinai.argv"] = " ".join(argv)[:MAX_TAG_VALUE]
    if manifest.get("user"):
        tags["mlflow.user"] = str(manifest["user"])[:MAX_TAG_VALUE]
    if manifest.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(manifest["git_commit"])[:MAX_TAG_VALUE]
    if manifest.get("host"):
        tags["itwinai.host"] = str(manifest["host"])[:MAX_TAG_VALUE]
    versions = manifest.get("versions")
    for dist, version in (versions.items() if isinstance(versions, dict) else ()):
        tags[f"itwinai.version.{mlflow_key(str(dist))}"[:MAX_KEY]] = str(version)[:MAX_TAG_VALUE]
    return tags


class KeyMaps:
    """Record names -> MLflow keys for one rank, per namespace (metric and param keys, model
    names), so that two names that map to one key (`loss@val`, `loss#val` -> `loss_val`) never
    merge: a key belongs to the first name (in seq order) that maps to it, and a later name
    mapping to it gets the key plus a digest of its own name. The first names are found by
    reading the journal's names up to the cursor once (`prime`), so the mapping is the same
    in every sync whatever it exported before."""

    NAMESPACE = {"metric": "metric", "param": "param", "model": "model",
                 "best_model": "model"}

    def __init__(self, exporter: MlflowExporter, rank: RankInfo):
        self.exporter = exporter
        self.rank = rank
        self.notes = exporter.notes
        self.keys: dict[tuple[str, str], str] = {}
        self.owners: dict[tuple[str, str], str] = {}
        self.primed = 0
        self.lock = threading.Lock()

    def key(self, kind: str, name: str, quiet: bool = False) -> str:
        ns = self.NAMESPACE[kind]
        key = self.keys.get((ns, name))
        if key is not None:
            return key
        key = model_name(name) if ns == "model" else mlflow_key(name)
        owner = self.owners.get((ns, key), name)
        what = "model name" if ns == "model" else f"{ns} name"
        if owner != name:
            plain = key
            while self.owners.get((ns, key), name) != name:
                key = f"{plain[:MAX_KEY - 10]}-{_digest(name + key, 9)}"
            if not quiet:
                self.notes.add(f"mlflow: {what} {name[:60]!r} is stored as {key[:70]!r}: "
                               f"{owner[:60]!r} is stored as {plain[:60]!r} already")
        elif key != name and not quiet:
            self.notes.add(f"mlflow: {what} {name[:60]!r} is stored as {key[:60]!r}")
        self.owners[(ns, key)] = name
        self.keys[(ns, name)] = key
        return key

    def prime(self, upto: int, taken: Callable[[int, int], Iterator[pa.Table]]) -> None:
        """Take in the names of the rank's records with seq in (primed, upto] that went to
        MLflow (`RankSink.taken`: as the engine selected them), in seq order."""
        if upto <= self.primed:
            return
        import pyarrow.compute as pc

        kinds = pa.array(sorted(self.NAMESPACE), pa.string())
        for table in taken(self.primed, upto):
            table = table.filter(pc.is_in(table["kind"], kinds))
            for kind, name in zip(table["kind"].to_pylist(), table["name"].to_pylist()):
                self.key(kind, name, quiet=True)
        self.primed = upto


class BatchWriter:
    """One log_batch request, of metric points given as (key, value, timestamp in ms, step).

    `MlflowClient.log_batch` takes a Metric entity per point and copies each one (asking the
    fluent API for the active model of each), and for a tracking server turns them into
    protobuf messages and then indented JSON: 12-15 ms of this process's CPU per 1000 points,
    a tenth of a loopback request to a PostgreSQL-backed server, on the cores the server and
    its database need as well. For a server the body MLflow sends (the LogBatch message as
    JSON, int64 fields as numbers, non-finite doubles as "NaN"/"Infinity") is built here
    straight from the tuples, with a fifth to a third of that CPU, and sent through the REST
    store of the client (its endpoint, credentials, retries and error mapping). MLflow's sqlite
    store gets a request of metrics as the rows its log_batch would write (see sqlite_rows);
    another store (PostgreSQL directly), or a request sqlite_rows leaves to log_batch, gets the
    Metric entities log_batch needs, without the copy. Requests stay within MLflow's limits
    (the caller sees to it), so nothing is split.
    Unlike MlflowClient.log_batch it links no point to a model the fluent API has active in
    this process: the points are the journal's, not this process's."""

    def __init__(self, client: Any):
        self.store, self.rest = compat.mlflow_store(client)
        self.rows = None if self.rest else SqliteRows.of(self.store)

    def __call__(self, run_id: str, metrics: list[tuple[str, float, int, int]],
                 params: list[Any], tags: list[Any]) -> None:
        if self.rows is not None and not params and self.rows(run_id, metrics, tags):
            return
        if not self.rest:
            from mlflow.entities import Metric

            self.store.log_batch(run_id, metrics=[Metric(*m) for m in metrics], params=params,
                                 tags=tags)
            return
        from mlflow.protos.service_pb2 import LogBatch

        body: dict[str, Any] = {"run_id": run_id, "metrics": [
            {"key": k, "value": v if -_MAX_DOUBLE <= v <= _MAX_DOUBLE else _json_double(v),
             "timestamp": t, "step": s} for k, v, t, s in metrics]}
        if params:
            body["params"] = [{"key": p.key, "value": p.value} for p in params]
        if tags:
            body["tags"] = [{"key": t.key, "value": t.value} for t in tags]
        compat.mlflow_rest_call(self.store, LogBatch, json.dumps(body, allow_nan=False))


_MAX_DOUBLE = sys.float_info.max


def _json_double(value: float) -> str:
    """A double JSON cannot hold as protobuf's JSON mapping spells it."""
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


class MlflowRankSink(RankSink):
    def __init__(self, run: RunInfo, rank: RankInfo, notes: Notes, place: Place, target: Any):
        super().__init__(run, rank, notes)
        self.place = place
        self.client = place.client
        self.write_lock = place.write_lock
        self.target = target
        self.run_id = target.info.run_id if target is not None else None
        self._cursor = int(target.data.tags.get(TAG_CURSOR, 0)) if target is not None else 0
        #: The seq up to which records are written: the cursor, or beyond it by the requests
        #: sent without it (see `_commit`).
        self._written = self._cursor
        self._tag_next = False
        self.dedupes = place.exporter.dedupes(place.uri)
        self._params = dict(target.data.params) if target is not None else {}
        self.names = place.exporter.keymaps(place.uri, run, rank)
        self._log_batch = BatchWriter(self.client)
        #: The request sent while the next one is built (see `_commit`), with what to note
        #: once it succeeded; and the thread that sends it.
        self._inflight: tuple[Future[None], tuple[dict[str, Any], int, bool]] | None = None
        self._sender: ThreadPoolExecutor | None = None
        from mlflow.entities import Param, RunTag

        self._Param, self._RunTag = Param, RunTag

    def cursor(self) -> int:
        return self._cursor

    def _ensure_target(self) -> None:
        """Create (claim) the rank's MLflow run, and the parent's, on the first write."""
        if self.target is None:
            self.target = self.place.claim_rank(self.rank, searched=True)
            self.run_id = self.target.info.run_id
            self._params = dict(self.target.data.params)
            claimed = int(self.target.data.tags.get(TAG_CURSOR, 0))
            if claimed != self._cursor:
                self.place.forget()
                raise TargetChanged(f"MLflow run {self.run_id} of this rank was created by "
                                    f"another sync meanwhile (cursor {claimed})")

    def _key(self, kind: str, name: str) -> str:
        key = self.names.keys.get((KeyMaps.NAMESPACE[kind], name))
        if key is not None:  # seen before, in journal order
            return key
        with self.names.lock:
            self.names.prime(self._written, self.taken)
            return self.names.key(kind, name)

    def close(self) -> None:
        """Mirror the journal's session status: a rank that ended is a terminated MLflow run
        (finished, failed, or killed for an interrupted session), with its real end time."""
        if self._sender is not None:
            self._sender.shutdown()
        if self.target is None:
            return
        from mlflow.exceptions import MlflowException

        try:
            # The rank's run as found or created by this sync: one request fewer per rank.
            _terminate(self.client, self.target, self.rank.status, _end_ms(self.rank),
                       self.target.info)
            self.place.terminate_parent()
        except MlflowException:
            if not self._retired():
                raise

    def _retired(self) -> bool:
        return self.client.get_run(self.run_id).info.lifecycle_stage == "deleted"

    # -- the batch ----------------------------------------------------------------------------

    def export(self, batch: pa.Table, cursor: int) -> None:
        self._ensure_target()
        try:
            self._export(batch, cursor)
        except BaseException:
            self._abandon()
            raise
        self._drain()

    def _export(self, batch: pa.Table, cursor: int) -> None:
        metrics: list[Any] = []
        params: dict[str, Any] = {}
        size = 0
        last_seq = self._cursor
        cols = batch.select(["seq", "time", "kind", "name", "step", "value", "text", "blob",
                             "meta"]).to_pydict()
        for i, kind in enumerate(cols["kind"]):
            seq = cols["seq"][i]
            if kind == "metric":
                key = self._key(kind, cols["name"][i])
                step = cols["step"][i]
                if cols["meta"][i] is not None:
                    step = self._metric_form(step, cols["meta"][i])
                metrics.append((key, _finite(cols["value"][i]),
                                int(round(cols["time"][i] * 1000)), step or 0))
                size += 64 + len(key)
            elif kind == system_metrics.KIND:
                points = system_metrics.mlflow_metrics(system_metrics.sample(cols["text"][i]))
                if len(metrics) + len(params) + len(points) >= self._room(params):
                    self._commit(metrics, params, last_seq)
                    metrics, params, size = [], {}, 0
                ms, step = int(round(cols["time"][i] * 1000)), cols["step"][i] or 0
                metrics.extend((k, v, ms, step) for k, v in points.items())
                size += 96 * len(points)
            elif kind == "param":
                param = self._param(cols["name"][i], cols["text"][i], cols["blob"][i],
                                    cols["meta"][i])
                if param is not None:
                    if len(metrics) + len(params) + 1 > self._room({param.key: param}):
                        # no place for the param beside the cursor its request takes
                        self._commit(metrics, params, last_seq)
                        metrics, params, size = [], {}, 0
                    params[param.key] = param
                    size += len(param.key) + len(param.value)
            else:
                self._commit(metrics, params, last_seq, final=True)
                metrics, params, size = [], {}, 0
                self._side_effect(kind, {k: v[i] for k, v in cols.items()})
                self._tag_next = True
            last_seq = seq
            if (len(metrics) + len(params) >= self._room(params) or len(params) + 1 >= MAX_PARAMS
                    or size > MAX_REQUEST_BYTES * 0.8):
                self._commit(metrics, params, last_seq)
                metrics, params, size = [], {}, 0
        self._commit(metrics, params, cursor, final=True)

    def _tagged(self, params: dict[str, Any], final: bool) -> bool:
        """Whether a request carries the cursor (see `_commit`)."""
        return final or bool(params) or self._tag_next or not self.dedupes

    def _room(self, params: dict[str, Any]) -> int:
        """The records a request that is not the batch's last may hold: MLflow's limit, less
        the cursor tag when it carries one. A request is sent once it holds `_room` records,
        so the batch's last one holds fewer and has a place for the tag: 20 000 points go in
        20 full requests and one of the cursor alone, a commit fewer than 999 points a
        request and the rest with the cursor would take."""
        return MAX_ENTITIES - self._tagged(params, final=False)

    def _commit(self, metrics: list[Any], params: dict[str, Any], cursor: int,
                final: bool = False) -> None:
        """One log_batch: the records and, in the same request, the cursor that covers them.

        In a store that keeps a metric point once however often it is sent (`dedupes`), a
        request of metrics alone leaves the cursor out, unless it is the last of the batch
        (`final`, also the one before an artifact or model) or follows an artifact or model:
        a sync killed in between sends those points again and the store keeps them once. The
        cursor tag costs the store a commit of its own per request (a sixth to a fifth of the
        time of a 1000-point request on PostgreSQL), so it is written about once per batch of
        `batch_records` rather than per 1000 points.

        A request without the cursor is sent by the sink's thread while this one reads and
        builds the next (one request at a time, in order): with one request stream, the
        sync's own work then overlaps the server's instead of adding to it. A request with
        the cursor is waited for, so the cursor this sink reports is one the store holds; a
        sync killed with a request in flight has sent points past the cursor, as above."""
        tagged = self._tagged(params, final)
        if not metrics and not params and (cursor == self._cursor or not tagged):
            return
        tags = [self._RunTag(TAG_CURSOR, str(cursor))] if tagged else []
        request, done = (metrics, list(params.values()), tags), (params, cursor, tagged)
        self._drain()
        if tagged:
            self._send(*request)
            self._sent(*done)
        else:
            if self._sender is None:
                self._sender = ThreadPoolExecutor(1, thread_name_prefix="itwinai-sync-mlflow")
            self._inflight = (self._sender.submit(self._send, *request), done)

    def _send(self, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
        from mlflow.exceptions import MlflowException

        try:
            with self.write_lock:
                idempotent(self._log_batch, self.run_id, metrics, params, tags)
        except MlflowException as e:
            if self._retired():
                self.place.forget()
                raise TargetChanged(f"MLflow run {self.run_id} was deleted by a concurrent sync "
                                    "of this journal, which keeps another run") from e
            raise

    def _sent(self, params: dict[str, Any], cursor: int, tagged: bool) -> None:
        """Note a request the store took."""
        self._params.update({p.key: p.value for p in params.values()})
        if self.names.primed >= self._written:
            self.names.primed = cursor  # the names of this commit went through _key
        self._written = cursor
        if tagged:
            self._cursor = cursor
            self._tag_next = False

    def _drain(self) -> None:
        """Wait for the request in flight; raise what it raised."""
        if self._inflight is not None:
            (future, done), self._inflight = self._inflight, None
            future.result()
            self._sent(*done)

    def _abandon(self) -> None:
        """Wait for the request in flight when the batch failed: its outcome is not noted (what
        it stored is past the cursor, and sent again by the next sync)."""
        if self._inflight is not None:
            (future, _), self._inflight = self._inflight, None
            wait([future])

    def _metric_form(self, step: int | None, meta: str) -> int | None:
        """The step of a metric the journal keeps in one of its storable forms (a step the
        int64 column could not hold, as `int64_step` maps it), and a note for each form."""
        d = meta_of(meta)
        if step is None and "step" in d:
            step = int64_step(d["step"])
            self.notes.add("mlflow: metrics whose step is not a whole number within int64 are "
                           "logged at int() of it (1.5 -> 1), clamped to int64 (2**70 -> "
                           "2**63-1), or at step 0 when int() refuses it (MLflow steps are "
                           "int64); the journal keeps the exact step in meta['step']")
        if "imag" in d:
            self.notes.add("mlflow: complex metrics are logged by their real part (MLflow's "
                           "log_metric refuses complex numbers); the journal keeps the "
                           "imaginary part in meta['imag']")
        return step

    def _note_surrogates(self) -> None:
        self.notes.add("mlflow: lone surrogates in texts and params (which MLflow cannot "
                       "store) are logged as U+FFFD; the journal keeps the code points in "
                       "meta['surrogates']")

    def _param(self, name: str, text: str | None, blob: str | None, meta: str | None) -> Any:
        """A param as `mlflow.log_param` stores it: `str(value)` (`True`, `None`, `[8, 4]`,
        `{'a': 1}`, `(0.9, 0.999)`; see `param_str`)."""
        raw = text if text is not None else self.blobs.read(blob or "").decode()
        if meta is not None and meta_of(meta).get("surrogates"):
            self._note_surrogates()
        value_s = param_str(json.loads(raw), meta)
        if len(value_s) > MAX_PARAM_VALUE:
            self.notes.add(f"mlflow: param {name!r} is longer than {MAX_PARAM_VALUE} characters"
                           " and was cut")
            value_s = value_s[:MAX_PARAM_VALUE]
        key = self._key("param", name)
        old = self._params.get(key)
        if old is not None and old != value_s:
            self.notes.add(f"mlflow: param {key!r} was logged again with a different value "
                           f"({old!r} -> {value_s!r}); MLflow params cannot change, the first "
                           "value is kept")
            return None
        return self._Param(key, value_s)

    # -- everything that is not log_batch ------------------------------------------------------

    def _side_effect(self, kind: str, rec: dict[str, Any]) -> None:
        meta = meta_of(rec["meta"])
        name = rec["name"]
        if kind == "text" and meta.get("logged_as"):
            self.notes.add("mlflow: objects logged as a kind that cannot hold them (a metric "
                           "that is not a number, ...), which MLflow refuses, are logged as "
                           "text artifacts of their JSON at their name")
        if meta.get("surrogates"):
            self._note_surrogates()
        if kind in ("model", "best_model"):
            self._log_model(kind, name, rec["blob"], meta)
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
        """At the artifact paths MLFlowLogger gives each kind: text and dicts at the identifier
        (`log_text`, `log_dict`: JSON, or YAML for .yaml/.yml), figures at the identifier plus
        `.png` unless it has it, images at the identifier, torch objects at
        `<identifier>/<last part of the identifier>`, files at `<identifier>/<file name>`."""
        rel = artifact_relpath(name)
        if kind == "text":
            self.client.log_text(self.run_id, self._payload(rec).decode(), str(rel))
        elif kind == "dict":
            self.client.log_dict(self.run_id, json.loads(self._payload(rec)), str(rel))
        elif kind == "figure" and meta.get("media_type") == "application/vnd.plotly.v1+json":
            self._upload(artifact_relpath(name, ".json"), self._payload(rec))
        elif kind == "figure":
            self._upload(rel if rel.suffix == ".png" else rel.with_name(rel.name + ".png"),
                         self._payload(rec))
        elif kind == "image":
            self._log_image(name, rel, self._payload(rec))
        elif kind == "torch":
            self._upload(rel / rel.name, self._payload(rec))
        elif kind == "artifact":
            self._log_files(rel, rec["blob"], meta)
        else:  # pragma: no cover - kinds are filtered by the engine
            raise ExportError(f"mlflow exporter got an unexpected kind {kind!r}")

    def _log_image(self, name: str, rel: PurePosixPath, png: bytes) -> None:
        """The journal holds a lossless PNG. At a `.png` name it is uploaded as is; at another
        image extension (`.jpg`) it is saved in that format as `mlflow.log_image` would; a name
        without an image extension (which `mlflow.log_image` refuses) gets `.png` added."""
        from PIL import Image

        suffix = rel.suffix.lower()
        if suffix == ".png":
            return self._upload(rel, png)
        if suffix and suffix in Image.registered_extensions():
            import io

            with Image.open(io.BytesIO(png)) as im:
                im.load()
                try:
                    return self.client.log_image(self.run_id, im, artifact_file=str(rel))
                except (OSError, ValueError, KeyError) as e:
                    self.notes.add(f"mlflow: image {name!r} cannot be saved as {suffix} ({e}); "
                                   "stored as PNG")
        else:
            self.notes.add(f"mlflow: image {name!r} has no image extension (mlflow.log_image "
                           "refuses it); stored as PNG")
        self._upload(rel.with_name(rel.name + ".png"), png)

    def _log_files(self, base: PurePosixPath, sha: str, meta: dict[str, Any]) -> None:
        """A file goes to `<identifier>/<file name>` (as mlflow.log_artifact with
        artifact_path=identifier does); a directory keeps its structure below it."""
        with tempfile.TemporaryDirectory(prefix="itwinai-mlflow-") as tmp:
            root = Path(tmp)
            if meta.get("type") == "directory":
                for f in self.blobs.tree(sha):
                    dest = root / artifact_relpath(f["path"])
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(self.blobs.read(f["sha256"]))
                if meta.get("dir_name"):
                    base = base / artifact_relpath(str(meta["dir_name"]))
                self.client.log_artifacts(self.run_id, str(root), artifact_path=str(base))
            else:
                local = root / artifact_relpath(str(meta.get("file_name") or "artifact")).name
                local.write_bytes(self.blobs.read(sha))
                self.client.log_artifact(self.run_id, str(local), artifact_path=str(base))

    def _log_model(self, kind: str, name: str, sha: str, meta: dict[str, Any]) -> None:
        import mlflow

        key = self._key(kind, name)
        if _models_logged(self.client, self.run_id, key):
            return
        try:
            import torch

            with self.blobs.open(sha) as f:
                module = torch.load(f, weights_only=False, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - the class may not be importable here
            self.notes.add(f"mlflow: model {name!r} of class {meta.get('class')} cannot be "
                           f"loaded on this machine ({type(e).__name__}: {e}); its torch.save "
                           "file is logged as an artifact instead")
            rel = artifact_relpath(name)
            self._upload(rel / str(meta.get("file_name") or "model.pt"), self.blobs.read(sha))
            return
        # log_model reads the global tracking URI and experiment: hold them for this call only,
        # one thread at a time. (A fluent start_run would also change the run's status.)
        with _FLUENT_LOCK, _fluent_target(self.client.tracking_uri,
                                          self.target.info.experiment_id):
            mlflow.pytorch.log_model(module, name=key, run_id=self.run_id, pip_requirements=[],
                                     serialization_format="pickle",
                                     tags={"itwinai.class": str(meta.get("class"))})
        _keep_one_model(self.client, self.run_id, key)

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
        idempotent(self.client.log_inputs, self.run_id,
                   [DatasetInput(dataset, [InputTag("mlflow.data.context", str(context))])])


@contextmanager
def _fluent_target(uri: str, experiment_id: str) -> Iterator[None]:
    """Point MLflow's fluent API at (uri, experiment) and put everything back afterwards,
    including the environment variables MLflow sets as a side effect, so later exports in this
    process resolve their destination as before."""
    import mlflow

    saved_uri = compat.mlflow_tracking_uri_setting()
    with scoped_env({}, restore=("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")):
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_id=experiment_id)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_uri)


_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def _end_ms(rank: RankInfo) -> int | None:
    end = rank.ended
    return int(end * 1000) if end else None


def _terminate(client: Any, target: Any, status: str, end_ms: int | None,
               current: Any = None) -> None:
    """Set the run's status and end time unless it has them. `current`: the run's info as
    this sync last knew it (it created or found the run, and only syncs of this journal,
    which never set a run back to RUNNING, change it), else read from the store."""
    wanted = _MLFLOW_STATUS.get(status)
    if wanted is None or end_ms is None:
        return  # still running: leave the MLflow run RUNNING
    if current is None:
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


def _ready_models(client: Any, run_id: str, name: str) -> list[Any]:
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
    )
    return [m for m in models if str(m.status) == "READY"]


def _models_logged(client: Any, run_id: str, name: str) -> bool:
    """Whether this run already has a complete logged model of that name (a re-run after a
    crash). A model whose logging failed half-way is not complete and is logged again."""
    return bool(_ready_models(client, run_id, name))


def _keep_one_model(client: Any, run_id: str, name: str) -> None:
    """Two syncs of one journal at once may both log a model: each then keeps the earliest
    and deletes the others, so they converge on one."""
    models = sorted(_ready_models(client, run_id, name),
                    key=lambda m: (m.creation_timestamp or 0, m.model_id))
    for extra in models[1:]:
        client.delete_logged_model(extra.model_id)
