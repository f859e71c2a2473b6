"""Prov4ML target: each rank of a journal run becomes one yProv4ML provenance run (PROV-JSON
document, metric files, artifacts, optionally the graph as DOT and SVG), made by yprov4ml itself.

Layout (`DIR` is `--dir` or `<savedir>/prov`):

    DIR/<experiment-dir>/<run_id>/rank-<rank:05d>/      yprov4ml's provenance_save_dir
        <experiment>_0/                                  yprov4ml's run folder (index pinned to 0)
            prov_<experiment>_GR<rank>_0.json            the PROV-JSON document
            prov_<experiment>_GR<rank>_0.dot / .svg      the graph (create_graph / create_svg)
            metrics_GR<rank>/<name>_<context>_<source>_GR<rank>.csv    epoch,value,timestep
            artifacts_GR<rank>/<name>/...                models, best models, artifacts
            .itwinai-sync-cursor                         the journal seq the documents cover

`<experiment>` is the Prov4MLLogger's `experiment_name` (else the journal's experiment); the
other declared options (`prov_user_namespace`, `save_after_n_logs`, `create_graph`,
`create_svg`) are honoured too. The rank is given to yprov4ml as its global rank together with
`collect_all_processes=True`, as yprov4ml's own itwinai logger does: with a rank other than 0
and without that flag, `start_run` replaces the logging methods by no-ops. So the files carry
yprov4ml's own `GR<rank>` names, and each rank has its own folder, which is what makes the
atomic replacement below possible per rank.

Exactly once, for a document generator: a provenance document is not appended to, it is
regenerated from the rank's whole journal up to the cursor. `export` only notes the cursor it is
handed; the documents are built when the batch reaches the end of a rank that has ended (so
that the cursor is committed inside `export`, as the protocol wants), else in `close` (a rank
still running, or a sync stopped early). A build writes everything into a temporary sibling
directory `.tmp-rank-<r>-<token>`, writes the cursor marker inside it, fsyncs, then swaps it
with the previous `rank-<r>` directory (rename the old one aside, rename the new one in, delete
the old one). The cursor is therefore committed in the same rename as the documents it
describes: a crash leaves the old documents with the old cursor, or the new ones with the new
one; leftovers are cleaned (and a documents folder renamed aside but not replaced is put back)
when the rank is next opened. Running the sync again with nothing new does not touch the
documents; with new records, the rank is rebuilt: no second run folder, no duplicated points.

The documents are deterministic: built twice from the same journal they are byte-identical.
yprov4ml stamps the current time, a random PID and the exporting machine into a document; here
the times are the journal's (the run activity starts when the rank's first session started and
ends when its last one ended, each metric, artifact and context is stamped with the time of the
record that created it, in UTC), the PID is a UUID derived from the run and rank, the agent is
the user who trained, and the compute node's host, Python version, world size and journal run
id replace the exporting machine's platform fields. Paths inside the document are the final
ones, not the temporary directory's.

Kinds (context: the record's `context`, default "training", as itwinai's Prov4MLLogger;
timestamps: the record's time in milliseconds; a record without a step is written at step 0,
yprov4ml's default):
- `metric`: `log_metric` (source None, as itwinai's Prov4MLLogger logs them); a metric that
  is not a number (a `text` record with meta['logged_as'] = 'metric') with its JSON value,
  which yprov4ml writes as str() (see `_Replay._logged_metric`); other texts are not for this
  target; a step the journal kept in meta['step'] (1.5, 2**70) as it was logged;
- `flops_pb`, `flops_pe`, `execution_time`, `system`, `carbon`: `log_metric` of what itwinai's
  Prov4MLLogger would have logged with the yprov4ml it pins (2.0.9), computed from the
  journal's measurements by `MeasuredView` (names, units, running FLOP totals), with the
  source yprov4ml gives the kind (`fvcore.nn.FlopCountAnalysis`, `codecarbon`, `std.time`;
  system metrics the method that read them, `psutil` or `procfs`, as yprov4ml 3's carry their
  hardware access mode); the method that actually measured a metric (fvcore, FlopCounterMode
  halved, rapl, ...) is added to its metric entity as `yprov:measurement_method`. Sampled
  system metrics (`system_metric`, the background sampler's) are shown as `system` records,
  at step = the sample's ordinal in the rank, in the default context, with the source
  `<method>.sampled` (their own series beside those of logged `system` records). Nothing is
  measured at export time: yprov4ml's own FLOPs/system/carbon helpers would measure the
  exporting machine;
- `param`: `log_param` of the JSON value as an input (`provml:HyperParameter`);
- `model` (each call a new version `<name>_<k>`, like `save_model_version`), `best_model` (one
  `<name>`, like `log_model`), `torch`, `artifact`: files under `artifacts_GR<r>/<name>/`
  logged with `log_artifact` (models as `provml:Model`, with `log_model`'s parameter-count
  attributes); for `best_model`, `torch` and `artifact` only the last record of a name is
  kept, as the file it would have overwritten. A model file is the module's `state_dict`, as
  yprov4ml saves it, read from the journal's `torch.save` of the whole module by torch's
  weights-only unpickler without importing or running any of its code
  (`state_dict_from_module`). A `torch` object is the
  journal's `torch.save` file and, when it loads with `weights_only` (tensors and containers),
  also a param, as itwinai's Prov4MLLogger logs it with `log_param`;
- `prov_documents`: the documents are produced on every export, whether a run logged the marker
  or not.
Names yprov4ml cannot take (':' makes a PROV qualified name, '/' a path, very long names a too
long file name) are mapped deterministically and the mapping is reported.

yprov4ml keeps one global run (`yprov4ml.constants.PROV4ML_DATA`), so ranks are built one at a
time in this process under a lock, with that state reset before and after each rank, and
`parallel_runs` is False. This is faster than a subprocess per rank, which pays yprov4ml's
import (about 3 s: torch, pandas, xarray, ...) for every rank. While a rank is built, three
module globals of yprov4ml are replaced (and put back): its clock (journal times), the 1 s sleep
in `start_run` (it keeps concurrently started processes from taking the same run index; the
index is pinned here), and the `requirements.txt` lookup of `end_run`, which walks the current
directory of the exporting process. The graph is drawn with yprov4ml's `custom_prov_to_dot` from
the final document; the SVG needs Graphviz's `dot` and is skipped with a note without it.
yprov4ml is imported only when a rank is built.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_journal.errors import ItwinaiSyncError
from itwinai_journal.format.fsio import fsync_dir, write_atomic
from itwinai_journal.format.names import experiment_dirname
from itwinai_journal.format.segments import JournalCorruption, iter_tables, read_index
from itwinai_sync.api import (
    LOCK_DIR,
    Exporter,
    ExportError,
    Notes,
    RankSink,
    TargetOption,
    TargetUnavailable,
    claim_journal_dir,
    find_journal_dir,
    logged_value,
    param_str,
)

from . import system_metrics

MARKER = ".itwinai-sync-cursor"
#: The yprov4ml releases whose API and documents this exporter drives: 3.2.4 (Python < 3.12)
#: is tested; 3.2.5 and later need Python 3.12 (see requirements-prov4ml-nodeps.txt).
SUPPORTED_YPROV4ML = "3.2."
#: yprov4ml's run index (the `_<n>` of the run folder), pinned so that rebuilding a rank never
#: makes a second run folder.
RUN_INDEX = 0
TMP_PREFIX = ".tmp-rank-"
OLD_PREFIX = ".old-rank-"
DEFAULT_CONTEXT = "training"
#: Defaults of Prov4MLLogger, used for runs that did not declare a prov4ml destination.
DEFAULTS = {"prov_user_namespace": "www.example.org", "save_after_n_logs": 100,
            "create_graph": True, "create_svg": True}
#: Platform fields yprov4ml takes from the machine running it: the exporting machine here.
EXPORT_MACHINE_FIELDS = ("yprov:operating_system", "yprov:release", "yprov:processor",
                         "yprov:machine")
_COLUMNS = ("seq", "time", "kind", "name", "step", "value", "text", "blob", "meta")
_UNSAFE = re.compile(r"[:/\\\x00-\x1f]")
_CSV_SPECIAL = re.compile(r'[,"\r\n]')
#: Kinds whose last record of a name is kept (each would overwrite the previous file).
_LAST_WINS = ("best_model", "torch", "artifact")

#: yprov4ml keeps one global run per process: one rank is built at a time.
_LIBRARY_LOCK = threading.Lock()


def prov_name(name: str, limit: int) -> str:
    """`name` as yprov4ml can take it, in an identifier and in a file name: ':' would make a
    PROV qualified name with an unknown prefix, '/' and '\\' a path; names longer than `limit`
    bytes are cut and given a digest of the full name."""
    safe = _UNSAFE.sub("_", name)
    if not safe.strip("."):
        safe = safe.replace(".", "_") or "_"
    if len(safe.encode()) > limit:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        safe = safe.encode()[:limit - 11].decode(errors="ignore") + "~" + digest
    return safe


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()


@dataclass
class Settings:
    experiment_name: str
    prov_user_namespace: str
    save_after_n_logs: int
    create_graph: bool
    create_svg: bool


@dataclass
class Built:
    """What one build produced, for the swap and the report."""

    folder: Path  # the yprov4ml run folder inside the temporary directory
    document: Path  # its PROV-JSON
    records: int = 0
    methods: dict[str, set[str]] = field(default_factory=dict)  # metric entity -> methods


class Prov4mlExporter(Exporter):
    name = "prov4ml"
    kinds = frozenset({"metric", "param", "flops_pb", "flops_pe", "system", "carbon",
                       "execution_time", "model", "best_model", "torch", "artifact",
                       "prov_documents", "text", system_metrics.KIND})
    #: Metrics that are not numbers, which yprov4ml takes as they are (other texts are not
    #: for this target: itwinai's Prov4MLLogger has no text kind).
    texts_logged_as = frozenset({"metric"})
    #: The batches only move the cursor (documents are rebuilt from the journal): few, large.
    batch_records = 1_000_000
    #: yprov4ml's global state allows one provenance run at a time per process.
    parallel_runs = False

    def __init__(self, savedir: Path, options: dict[str, Any], notes: Notes):
        super().__init__(savedir, options, notes)
        root = options.get("prov_dir") or savedir / "prov"
        self.root = Path(root).expanduser().resolve()
        if importlib.util.find_spec("yprov4ml") is None:
            raise TargetUnavailable(
                "the prov4ml exporter needs yprov4ml: pip install 'itwinai-sync[prov4ml]' and "
                "pip install --no-deps -r requirements-prov4ml-nodeps.txt (see the README)")
        version = _library_version()
        if not version.startswith(SUPPORTED_YPROV4ML) and version != "unknown":
            raise TargetUnavailable(
                f"the prov4ml exporter drives yprov4ml {SUPPORTED_YPROV4ML}x; {version} is "
                "installed, whose API and documents differ (2.x takes contexts as its Context "
                "enum, has no run index or timestamp arguments, writes another document "
                "layout): pip install --no-deps -r requirements-prov4ml-nodeps.txt")

    cli_options = (
        TargetOption("--dir", key="prov_dir", type="dir", metavar="DIR",
                     help="Prov4ML provenance directory (default: SAVEDIR/prov)."),
    )

    def target_key(self, run: RunInfo) -> str:
        return f"prov4ml:{self.root}"

    def lock_dir(self, run: RunInfo) -> Path:
        return self.root / LOCK_DIR

    def run_dir(self, run: RunInfo) -> Path:
        """The journal's directory (claimed for it as TensorBoard's run directories are), or
        where it will be when it has none yet."""
        parent = self.root / experiment_dirname(run.experiment)
        return find_journal_dir(parent, run.run_id, run) or parent / run.run_id

    def describe(self, run: RunInfo) -> str:
        return str(self.run_dir(run))

    def settings(self, run: RunInfo, rank: RankInfo) -> Settings:
        declared = ((rank.manifest.get("destinations") or {}).get(self.name)
                    or run.destinations().get(self.name) or {})

        def option(key: str) -> Any:
            value = declared.get(key)
            return DEFAULTS[key] if value is None else value

        experiment = str(declared.get("experiment_name") or run.experiment)
        name = prov_name(experiment, 100)
        if name != experiment:
            self.notes.add(f"prov4ml: experiment {experiment!r} is written as {name!r}")
        save_after = option("save_after_n_logs")
        if not isinstance(save_after, int) or isinstance(save_after, bool) or save_after < 1:
            save_after = DEFAULTS["save_after_n_logs"]
        return Settings(experiment_name=name,
                        prov_user_namespace=str(option("prov_user_namespace")),
                        save_after_n_logs=save_after, create_graph=bool(option("create_graph")),
                        create_svg=bool(option("create_svg")))

    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        found = find_journal_dir(self.root / experiment_dirname(run.experiment), run.run_id,
                                 run)
        path = found / f"rank-{rank.rank:05d}" if found is not None else None
        if not create and (path is None or committed_documents(path) is None):
            return None
        return Prov4mlSink(self, run, rank, path, create)


def committed_documents(path: Path) -> Path | None:
    """Where the rank's committed documents are: `path`, or, after an export killed between
    its two renames (see `_swap`), the copy it renamed aside, which the next export puts back.
    Read from there, the cursor never goes back while the documents are aside."""
    if path.is_dir():
        return path
    tag = path.name.removeprefix("rank-") + "-"
    try:
        aside = sorted(p for p in path.parent.iterdir()
                       if p.name.startswith(OLD_PREFIX + tag) and p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return aside[0] if aside else None


class Prov4mlSink(RankSink):
    def __init__(self, exporter: Prov4mlExporter, run: RunInfo, rank: RankInfo,
                 path: Path | None, create: bool):
        super().__init__(run, rank, exporter.notes)
        self.exporter = exporter
        #: The rank's directory; None until the run's directory is claimed for this journal
        #: by the first build.
        self.path = path
        if create and path is not None:  # the engine holds the journal's lock: leftovers
            self._recover()              # are no one's any more
        self._committed = self.cursor()
        self._pending = self._committed
        self._failed = False

    # -- the cursor -----------------------------------------------------------------------------

    def _marker(self) -> Path | None:
        documents = committed_documents(self.path) if self.path is not None else None
        if documents is None:
            return None
        try:
            folders = sorted(p for p in documents.iterdir() if p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return None
        for folder in folders:
            if (folder / MARKER).is_file():
                return folder / MARKER
        return None

    def cursor(self) -> int:
        marker = self._marker()
        if marker is None:
            return 0
        try:
            return int(json.loads(marker.read_text())["cursor"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _recover(self) -> None:
        """After a crash: drop half-built directories; put back documents that were renamed
        aside but not replaced."""
        parent = self.path.parent
        if not parent.is_dir():
            return
        tag = self.path.name.removeprefix("rank-") + "-"
        for entry in sorted(parent.iterdir()):
            if entry.name.startswith(TMP_PREFIX + tag):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(OLD_PREFIX + tag):
                if self.path.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    os.rename(entry, self.path)
        fsync_dir(parent)

    # -- the protocol ---------------------------------------------------------------------------

    def export(self, batch: pa.Table, cursor: int) -> None:
        if cursor < self._pending:
            raise ExportError(f"{self.rank.path}: cursor {cursor} goes back from "
                              f"{self._pending}")
        self._pending = cursor
        if self.rank.status != "running" and cursor >= self.rank.last_seq:
            self._commit()  # the rank's last batch: commit with it

    def close(self) -> None:
        if self._pending > self._committed and not self._failed:
            self._commit()

    def _commit(self) -> None:
        cursor = self._pending
        try:
            if self.path is None:
                parent = self.exporter.root / experiment_dirname(self.run.experiment)
                run_dir = claim_journal_dir(parent, self.run.run_id, self.run, self.notes,
                                            "prov4ml")
                self.path = run_dir / f"rank-{self.rank.rank:05d}"
            build_rank(self, cursor)
        except BaseException:
            self._failed = True
            raise
        self._committed = cursor

    # -- reading the journal --------------------------------------------------------------------

    def records(self, cursor: int) -> Iterator[tuple[Any, ...]]:
        """The rank's records up to `cursor` that go to this target, in seq order, as
        (seq, time, kind, name, step, value, text, blob, meta-dict) tuples."""
        from itwinai_sync.engine import select

        index, problems = read_index(self.rank.path)
        if problems:
            raise JournalCorruption(f"{self.rank.path}: {problems[0]}")
        for table in iter_tables(self.rank.path / "segments", 0, index):
            if table["seq"][0].as_py() > cursor:
                break
            if table["seq"][table.num_rows - 1].as_py() > cursor:
                import pyarrow.compute as pc

                table = table.filter(pc.less_equal(table["seq"], cursor))
            keep, _ = select(table, self.exporter)
            columns = [keep[c].to_pylist() for c in _COLUMNS]
            for row in zip(*columns):
                meta = row[8]
                yield (*row[:8], json.loads(meta) if meta else {})

    def times(self, first: float | None, last: float | None, cursor: int) -> tuple[float, float]:
        """When the provenance run started and ended: the rank's first session start, and its
        last session end when the documents cover the whole of a rank that has ended, else the
        last record's time."""
        sessions = self.rank.manifest.get("sessions") or []
        start = sessions[0].get("start") if sessions else None
        if not isinstance(start, (int, float)):
            start = self.run.info.get("created") or first or 0.0
        end = sessions[-1].get("end") if sessions else None
        if not (isinstance(end, (int, float)) and self.rank.status != "running"
                and cursor >= self.rank.last_seq):
            end = last if last is not None else start
        return float(start), float(end)


# -- building one rank -------------------------------------------------------------------------


class _Clock:
    """yprov4ml's clock while a rank is built: the time of the record being replayed."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> str:
        return _iso(self.t)


@contextmanager
def _library(clock: _Clock) -> Iterator[SimpleNamespace]:
    """yprov4ml, its global state fresh, with the clock, sleep and cwd lookup replaced (see the
    module docstring), for one rank at a time."""
    with _LIBRARY_LOCK:
        import yprov4ml
        import yprov4ml.datamodel.metric_data as metric_data
        import yprov4ml.datamodel.prov4ml_data as prov4ml_data
        import yprov4ml.functs as functs
        import yprov4ml.provenance.provenance_graph as provenance_graph
        from yprov4ml.constants import PROV4ML_DATA
        from yprov4ml.datamodel.attribute_type import LoggingItemKind, get_source_from_kind

        patches = [(m, "get_time", clock.now)
                   for m in (prov4ml_data, metric_data, provenance_graph)]
        patches.append((prov4ml_data, "time", SimpleNamespace(sleep=lambda seconds: None)))
        patches.append((functs, "_requirements_lookup", lambda path: None))
        saved = [(m, attr, m.__dict__[attr]) for m, attr, _ in patches if attr in m.__dict__]
        _reset(PROV4ML_DATA)
        try:
            for module, attr, value in patches:
                if attr in module.__dict__:
                    setattr(module, attr, value)
            yield SimpleNamespace(lib=yprov4ml, data=PROV4ML_DATA, kind=LoggingItemKind,
                                  source_of=get_source_from_kind)
        finally:
            for module, attr, value in saved:
                setattr(module, attr, value)
            _reset(PROV4ML_DATA)


def _reset(data: Any) -> None:
    """A fresh yprov4ml run state, also undoing the no-op methods that `start_run` installs on
    the global object for a non-collecting rank."""
    for name in ("add_metric", "add_artifact", "save_metric_to_file", "save_all_metrics",
                 "add_parameter"):
        data.__dict__.pop(name, None)
    data.__init__()


def build_rank(sink: Prov4mlSink, cursor: int) -> None:
    """Regenerate the rank's provenance documents for its records up to `cursor` and swap them
    into place with the cursor marker."""
    exporter, rank = sink.exporter, sink.rank
    settings = exporter.settings(sink.run, rank)
    parent = sink.path.parent
    parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tag = f"{rank.rank:05d}-{token}"
    tmp = parent / f"{TMP_PREFIX}{tag}"
    tmp.mkdir()
    try:
        built = _replay(sink, settings, tmp, cursor)
        _finish_document(sink, built, tmp)
        _graph(sink, settings, built)
        marker = {"cursor": cursor, "records": built.records, "run": sink.run.key,
                  "rank": rank.rank, "yprov4ml": _library_version()}
        write_atomic(built.folder / MARKER, (json.dumps(marker, sort_keys=True) + "\n").encode())
        _fsync_tree(tmp)
        _swap(tmp, sink.path, parent / f"{OLD_PREFIX}{tag}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _library_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("yprov4ml")
    except metadata.PackageNotFoundError:  # pragma: no cover - imported from a source tree
        return "unknown"


def _replay(sink: Prov4mlSink, settings: Settings, tmp: Path, cursor: int) -> Built:
    """Run yprov4ml over the rank's records, writing under `tmp`."""
    clock = _Clock()
    records = sink.records(cursor)
    first = next(records, None)
    with _library(clock) as y:
        start, _ = sink.times(first[1] if first else None, None, cursor)
        clock.t = start
        y.lib.start_run(
            experiment_name=settings.experiment_name,
            prov_user_namespace=settings.prov_user_namespace,
            provenance_save_dir=str(tmp), collect_all_processes=True,
            save_after_n_logs=settings.save_after_n_logs, rank=sink.rank.rank,
            metrics_file_type="csv", use_run_id=RUN_INDEX)
        replay = _Replay(sink, y, clock)
        last_time = None
        if first is not None:
            for record in _chain(first, records):
                clock.t = last_time = record[1]
                replay.record(record)
        replay.finish()
        _, end = sink.times(first[1] if first else None, last_time, cursor)
        clock.t = max(end, last_time or end)
        y.lib.end_run(create_graph=False, create_svg=False)
        folder = Path(y.data.EXPERIMENT_DIR)
        document = folder / f"prov_{y.data.PROV_JSON_NAME}.json"
        return Built(folder=folder, document=document, records=replay.count,
                     methods=replay.methods)


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


class _Replay:
    """One rank's records turned into yprov4ml calls."""

    def __init__(self, sink: Prov4mlSink, y: SimpleNamespace, clock: _Clock):
        self.sink = sink
        self.notes = sink.notes
        self.y = y
        self.clock = clock
        self.count = 0
        self.methods: dict[str, set[str]] = {}
        self.versions: dict[str, int] = {}
        self.last: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.measured = MeasuredView(sink.rank.manifest)
        self._names: dict[tuple[str, int], str] = {}
        kind = y.kind
        self.source = {
            "flops_pb": y.source_of(kind.FLOPS_PER_BATCH),
            "flops_pe": y.source_of(kind.FLOPS_PER_EPOCH),
            "carbon": y.source_of(kind.CARBON_METRIC),
            "execution_time": y.source_of(kind.EXECUTION_TIME),
            "model": y.source_of(kind.MODEL_VERSION),
            "best_model": y.source_of(kind.FINAL_MODEL_VERSION),
            "torch": y.source_of(kind.MODEL_VERSION),
        }

    def name(self, name: str, limit: int = 100) -> str:
        key = (name, limit)
        mapped = self._names.get(key)
        if mapped is None:
            mapped = self._names[key] = prov_name(name, limit)
            if mapped != name:
                self.notes.add(f"prov4ml: name {name[:60]!r} is written as {mapped[:60]!r}")
        return mapped

    def record(self, rec: tuple[Any, ...]) -> None:
        seq, t, kind, name, step, value, text, blob, meta = rec
        self.count += 1
        if kind in _LAST_WINS:
            self.last[(kind, name)] = rec
        elif kind == "param":
            self.param(name, text, blob, meta)
        elif kind == "model":
            version = self.versions.get(name, 0)
            self.versions[name] = version + 1
            self.artifact(rec, f"{name}_{version}")
        elif kind == "prov_documents":
            pass  # the documents are made on every export
        elif kind == "text":  # logged as a metric (see Prov4mlExporter.texts_logged_as)
            self.metric(name, self._logged_metric(text, blob, meta), step, meta, None)
        else:
            self.measurement(kind, name, step, value, text, meta, rec[1])

    def finish(self) -> None:
        for rec in self.last.values():
            self.clock.t = rec[1]
            self.artifact(rec, rec[3])

    # -- kinds ------------------------------------------------------------------------------

    def param(self, name: str, text: str | None, blob: str | None, meta: dict) -> None:
        """A hyperparameter, in the context itwinai's Prov4MLLogger gives them ("training"),
        as the str() of the logged value that yprov4ml stores (`param_str`)."""
        raw = text if text is not None else self.sink.blobs.read(blob or "").decode()
        if meta.get("surrogates"):
            self.notes.add("prov4ml: lone surrogates in params are written as U+FFFD; the "
                           "journal keeps the code points in meta['surrogates']")
        self.log_param(name, param_str(json.loads(raw), meta), meta)

    def log_param(self, name: str, value: Any, meta: dict[str, Any]) -> None:
        self.y.lib.log_param(self.name(name), value, context=self._context(meta),
                             is_input=True)

    @staticmethod
    def _context(meta: dict[str, Any], default: str | None = DEFAULT_CONTEXT) -> str | None:
        context = meta.get("context")
        return default if context is None else str(context)

    def metric(self, name: str, value: Any, step: int | None, meta: dict[str, Any],
               source: str | None, method: str | None = None) -> None:
        context = self.name(self._context(meta), 60)
        name = self.name(name)
        source = None if source is None else self.name(source, 60)
        self.y.lib.log_metric(name, value, context=context, step=self._step(step, meta),
                              source=source, timestamp=int(round(self.clock.t * 1000)))
        if method:
            entity = f"{source}//{name}//{context}" if source else f"{name}//{context}"
            self.methods.setdefault(entity, set()).add(method)

    def _step(self, step: int | None, meta: dict[str, Any]) -> Any:
        """The step yprov4ml is given: the record's; for a step the journal's int64 column
        could not hold, the exact one from meta['step'], which yprov4ml 2.0.9 writes as it is
        given (1.5, 1180591620717411303424); 0, yprov4ml's default, for none."""
        if step is not None:
            return step
        if "step" not in meta:
            return 0
        self.notes.add("prov4ml: steps that are not whole numbers within int64 are written as "
                       "logged (1.5, 2**70), as yprov4ml takes them")
        exact = meta["step"]
        return exact if isinstance(exact, (int, float, str)) else csv_field(str(exact))

    def measurement(self, kind: str, name: str, step: int | None, value: float | None,
                    text: str | None, meta: dict[str, Any], t: float) -> None:
        if kind == "metric":
            if "imag" in meta:  # yprov4ml writes a complex value as str() gives it: (1+2j)
                value = complex(value, meta["imag"])
                self.notes.add("prov4ml: complex metrics are written as yprov4ml writes them, "
                               "(1+2j)")
            self.metric(name, value, step, meta, None)
            return
        sampled = kind == system_metrics.KIND
        if sampled:  # a background sample: shown as yprov4ml's system metrics
            kind = "system"
        if kind not in MEASURED_KINDS:  # pragma: no cover - kinds are filtered by the engine
            raise ExportError(f"prov4ml exporter got an unexpected kind {kind!r}")
        shown = self.measured.metrics(kind, name, value, text, meta, t)
        if not shown and kind != "carbon":  # a carbon baseline has nothing to show yet
            self.notes.add(f"prov4ml: {kind} records without a value are skipped")
        skipped = _non_numeric_fields(text) if kind in ("system", "carbon") else set()
        if skipped:
            self.notes.add(f"prov4ml: non-numeric {kind} fields are skipped: "
                           f"{', '.join(sorted(skipped))}")
        method = str(meta["method"]) if meta.get("method") else None
        source = (method or "psutil") if kind == "system" else self.source[kind]
        if sampled:  # its own series, not interleaved with the `system` records logged
            source += SAMPLED_SOURCE
        for metric_name, number, how in shown:
            self.metric(metric_name, number, step, meta, source, how or method)

    def _logged_metric(self, text: str | None, blob: str | None, meta: dict[str, Any]) -> Any:
        """A metric that is not a number (kept as the JSON of the value), as yprov4ml takes it:
        its metric file holds str() of the value (`abc`, `[1, 2, 3]`, `None`), which the
        JSON value gives back; a value with a comma, quote or line break is quoted as CSV
        (yprov4ml writes it bare, which breaks its own reader, `get_metric`)."""
        value = logged_value(text, blob, self.sink.blobs)
        self.notes.add("prov4ml: metrics that are not numbers are written as yprov4ml writes "
                       "them, the value's str() (abc, [1, 2, 3], None), quoted as CSV when it "
                       "holds a comma, quote or line break")
        if meta.get("surrogates"):
            self.notes.add("prov4ml: lone surrogates in metrics are written as U+FFFD; the "
                           "journal keeps the code points in meta['surrogates']")
        shown = str(value)
        return csv_field(shown) if _CSV_SPECIAL.search(shown) else value

    def artifact(self, rec: tuple[Any, ...], label: str) -> None:
        """The journal's bytes under artifacts_GR<r>/<name>/, logged with log_artifact."""
        seq, t, kind, name, step, value, text, blob, meta = rec
        label = self.name(label)
        base = Path(self.y.data.ARTIFACTS_DIR) / self.name(name)
        if kind in ("model", "best_model"):
            path = base / f"{label}.pt"
            self._write_state_dict(blob, path, name)
        elif kind == "torch":
            path = base / prov_name(str(meta.get("file_name") or "object.pt"), 100)
            self._write_blob(blob, path)
            self._torch_param(name, blob, meta)
        elif meta.get("type") == "directory":
            path = base / prov_name(str(meta.get("dir_name") or name), 100)
            for f in self.sink.blobs.tree(blob):
                self._write_blob(f["sha256"], path / f["path"])
            path.mkdir(parents=True, exist_ok=True)
        else:
            path = base / prov_name(str(meta.get("file_name") or "artifact"), 100)
            if blob:
                self._write_blob(blob, path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text or "")
        is_model = kind in ("model", "best_model")
        entity = self.y.lib.log_artifact(
            label, str(path), context=self._context(meta), source=self.source.get(kind),
            step=self._step(step, meta), log_copy_in_prov_directory=False,
            is_model=is_model)
        parameters = meta.get("parameters")
        if is_model and isinstance(parameters, int) and entity is not None:
            # log_model's model-info attributes (its precision default: 32 bits)
            prefix = self.y.data.yProv_PREFIX
            memory = parameters * 32 / 8 / 1e6
            entity.add_attributes({
                f"{prefix}:{label}_total_params": parameters,
                f"{prefix}:{label}_memory_of_model": memory,
                f"{prefix}:{label}_total_memory_load_of_model": memory + parameters * 8e-6,
            })

    def _write_state_dict(self, sha: str, dest: Path, name: str) -> None:
        """The model's `state_dict`, saved as yprov4ml's save_model_version saves it, read
        from the journal's `torch.save` of the module without running its code (see
        `state_dict_from_module`); the journal's file itself when that is not a module."""
        try:
            with self.sink.blobs.open(sha) as f:
                state = state_dict_from_module(f)
        except NotAModule as e:
            self.notes.add(f"prov4ml: model {name!r} is written as the journal's torch.save "
                           f"file, not as a state_dict: {e}")
            self._write_blob(sha, dest)
            return
        import torch

        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, dest)

    def _torch_param(self, name: str, sha: str | None, meta: dict[str, Any]) -> None:
        """itwinai's Prov4MLLogger logs a `torch` item with `log_param(identifier, item)`:
        the value goes into the document too, when it loads safely (`weights_only`)."""
        import torch

        try:
            with self.sink.blobs.open(sha or "") as f:
                value = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any object weights_only loading refuses
            self.notes.add("prov4ml: torch objects that are not tensors are kept as artifacts "
                           "only, not also as params")
            return
        self.log_param(name, value, meta)

    def _write_blob(self, sha: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.sink.blobs.open(sha) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def csv_field(text: str) -> str:
    """`text` as one field of a CSV line: quoted when it holds the separator, a quote or a
    line break (yprov4ml writes its metric files with f-strings, unquoted)."""
    if not _CSV_SPECIAL.search(text):
        return text
    return '"' + text.replace('"', '""') + '"'


def _fields(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        return {}
    return obj if isinstance(obj, dict) else {}


def _numeric_fields(text: str | None) -> dict[str, float]:
    return {k: float(v) for k, v in _fields(text).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _non_numeric_fields(text: str | None) -> set[str]:
    return {k for k, v in _fields(text).items()
            if not isinstance(v, (int, float)) or isinstance(v, bool)}


# -- measured kinds as yprov4ml shows them -------------------------------------------------------

MEASURED_KINDS = ("flops_pb", "flops_pe", "system", "carbon", "execution_time")
#: Appended to the source of sampled system metrics (`psutil.sampled`), which have their own
#: metric entities: yprov4ml keys a metric by source, name and context.
SAMPLED_SOURCE = ".sampled"
J_PER_KWH = 3.6e6
#: System fields shown under the names of yprov4ml 2.0.9's log_system_metrics.
SYSTEM_NAMES = {"cpu_percent_system": "cpu_usage", "memory_percent": "memory_usage",
                "disk_percent": "disk_usage"}
#: Energy categories of the journal's carbon records -> yprov4ml's (codecarbon's) names.
CARBON_PARTS = (("cpu", "cpu"), ("gpu", "gpu"), ("dram", "ram"), ("platform", "platform"))
Shown = list[tuple[str, float, "str | None"]]


class MeasuredView:
    """A rank's measured records as itwinai's Prov4MLLogger records them with the yprov4ml it
    pins (2.0.9): its metric names, units and accumulation. The journal keeps what was
    measured per call; this turns it into what yprov4ml would have logged:

    - `flops_pb`, `flops_pe`: the running total of the kind's FLOPs in the session (yprov4ml
      adds every call to one counter per kind, whatever its label, reset by `start_run`);
      journals written before FLOPs were counted in fvcore's convention (method
      "FlopCounterMode", two per multiply-add) are halved.
    - `execution_time`: Unix seconds (journals that stored seconds since the session started,
      method "session_clock", get the session's start added).
    - `system`: `cpu_usage`, `memory_usage`, `disk_usage` (percent), and for the current GPU
      `gpu_usage` and `gpu_memory_usage` (fractions, as GPUtil and torch give them),
      `gpu_temperature` (degrees C), `gpu_power_usage` (W); the journal's other fields (per
      GPU, process memory, I/O) under their own names. GPU metrics a machine without GPU
      cannot measure are left out, where yprov4ml writes 0.0.
    - `carbon`: `emissions` (kgCO2eq; yprov4ml 2.0.9 logs the energy in kWh under that name),
      `emissions_rate` (kg/s), `cpu_power`, `gpu_power`, `ram_power` (W), `cpu_energy`,
      `gpu_energy`, `ram_energy`, `energy_consumed` (kWh), all since the baseline, as
      codecarbon's cumulative figures (plus `platform_*` when RAPL's psys zone measured it).

    Each entry: (metric name, value, how it was measured when that differs from the record's
    method)."""

    def __init__(self, manifest: dict[str, Any]):
        starts = [s.get("start") for s in manifest.get("sessions") or []]
        self.starts = sorted(float(x) for x in starts if isinstance(x, (int, float)))
        self.totals: dict[tuple[str, int], float] = {}

    def metrics(self, kind: str, name: str, value: float | None, text: str | None,
                meta: dict[str, Any], t: float) -> Shown:
        fields = _numeric_fields(text)
        if kind in ("system", "carbon") and not fields and value is not None:
            fields = {name: value}  # a record with a single number of its own
        if kind in ("flops_pb", "flops_pe"):
            return self._flops(kind, name, value, meta, t)
        if kind == "execution_time":
            return self._execution_time(name, value, meta)
        return self._system(fields, meta) if kind == "system" else self._carbon(fields)

    def _flops(self, kind: str, name: str, value: float | None, meta: dict[str, Any],
               t: float) -> Shown:
        if value is None:
            return []
        how = None
        if meta.get("method") == "FlopCounterMode":
            value, how = value / 2, "FlopCounterMode/2"
        session = max(0, bisect.bisect_right(self.starts, t) - 1)
        total = self.totals[(kind, session)] = self.totals.get((kind, session), 0.0) + value
        return [(name, total, how)]

    @staticmethod
    def _execution_time(name: str, value: float | None, meta: dict[str, Any]) -> Shown:
        if value is None:
            return []
        start = meta.get("session_start")
        if meta.get("method") == "session_clock" and isinstance(start, (int, float)):
            return [(name, start + value, "session_clock + session_start")]
        return [(name, value, None)]

    @staticmethod
    def _system(fields: dict[str, float], meta: dict[str, Any]) -> Shown:
        shown: Shown = [(SYSTEM_NAMES[k], fields[k], None) for k in SYSTEM_NAMES if k in fields]
        current = meta.get("gpu_current")
        gpu = f"gpu{current if isinstance(current, int) else 0}_"
        utilization = fields.get(gpu + "utilization_percent")
        used, total = fields.get(gpu + "memory_used_bytes"), fields.get(gpu + "memory_total_bytes")
        for label, number in (
                ("gpu_memory_usage", used / total if used is not None and total else None),
                ("gpu_usage", None if utilization is None else utilization / 100),
                ("gpu_temperature", fields.get(gpu + "temperature_c")),
                ("gpu_power_usage", fields.get(gpu + "power_w"))):
            if number is not None:
                shown.append((label, number, None))
        shown.extend((k, v, None) for k, v in fields.items() if k not in SYSTEM_NAMES)
        return shown

    @staticmethod
    def _carbon(fields: dict[str, float]) -> Shown:
        shown: Shown = []
        emissions = fields.get("emissions_total_g")
        if emissions is not None:
            shown.append(("emissions", emissions / 1000, None))
            if fields.get("duration_s"):
                shown.append(("emissions_rate", emissions / 1000 / fields["duration_s"], None))
        for unit, suffix, scale in (("power", "_power_w", 1.0),
                                    ("energy", "_energy_total_j", 1 / J_PER_KWH)):
            for ours, theirs in CARBON_PARTS:
                if ours + suffix in fields:
                    shown.append((f"{theirs}_{unit}", fields[ours + suffix] * scale, None))
        if "energy_total_j" in fields:
            shown.append(("energy_consumed", fields["energy_total_j"] / J_PER_KWH, None))
        return shown


# -- models as state_dicts, without running the journal's code ------------------------------------


class _Stub:
    """Stands in for a class of a pickled module, which is never imported: keeps its state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class NotAModule(ItwinaiSyncError):
    """A model's torch.save file could not be read as a module's state_dict; the message says
    why, for the note."""


def state_dict_from_module(file: Any) -> dict[str, Any]:
    """The `state_dict()` of a `torch.save`d `nn.Module` (keys and tensors, in the order
    `Module.state_dict` gives: parameters, persistent buffers, then submodules), rebuilt
    without importing the module's classes or running any code of the journal's: the journal
    is untrusted input, and the training code need not be importable where the sync runs.

    The pickle is read by torch's own weights-only unpickler, which vets every opcode and
    argument; the globals it does not allow (the module classes, a function held as an
    attribute) are listed first without unpickling (`get_unsafe_globals_in_checkpoint`) and
    allowed as inert `_Stub` classes under their names, which only take the state they are
    given. Raises NotAModule saying why when that cannot be done: a torch without those
    functions (before 2.5), a pickle the weights-only unpickler refuses, an object that is not
    a module. Modules that override `state_dict` (extra state, custom keys) are read as plain
    modules."""
    import torch

    serialization = torch.serialization
    if not (hasattr(serialization, "get_unsafe_globals_in_checkpoint")
            and hasattr(serialization, "safe_globals")):
        raise NotAModule(f"torch {torch.__version__} cannot read a module's pickle without "
                         "running it (torch 2.5 or later can)")
    try:
        names = serialization.get_unsafe_globals_in_checkpoint(file)
        file.seek(0)
        stubs = []
        for qualified in names:
            module, _, name = qualified.rpartition(".")
            stubs.append((type(name, (_Stub,), {"__module__": module}), qualified))
        with serialization.safe_globals(stubs):
            root = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - not a torch.save file, or one the unpickler refuses
        raise NotAModule(f"torch's weights-only unpickler cannot read it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(root, _Stub) or not isinstance(vars(root).get("_modules"), dict):
        raise NotAModule(f"it holds a {type(root).__name__}, not a torch.nn.Module")
    state: dict[str, Any] = {}

    def walk(module: Any, prefix: str) -> None:
        attrs = vars(module)
        transient = attrs.get("_non_persistent_buffers_set") or set()
        for key, tensor in (attrs.get("_parameters") or {}).items():
            if isinstance(tensor, torch.Tensor):
                state[prefix + key] = tensor.detach()
        for key, tensor in (attrs.get("_buffers") or {}).items():
            if isinstance(tensor, torch.Tensor) and key not in transient:
                state[prefix + key] = tensor.detach()
        for key, child in (attrs.get("_modules") or {}).items():
            if isinstance(child, _Stub):
                walk(child, f"{prefix}{key}.")

    walk(root, "")
    return state


# -- after yprov4ml: the final document, the graph, the swap -----------------------------------


def _finish_document(sink: Prov4mlSink, built: Built, tmp: Path) -> None:
    """Make the PROV-JSON describe the training run rather than the export: final paths, the
    compute node, the user who trained, a stable PID, and the measurement methods."""
    text = built.document.read_text(encoding="utf-8")
    for old, new in ((str(tmp), str(sink.path)),
                     (json.dumps(str(tmp))[1:-1], json.dumps(str(sink.path))[1:-1])):
        text = text.replace(old, new)
    doc = json.loads(text)
    manifest, rank = sink.rank.manifest, sink.rank.rank
    root_id = built.document.stem.removeprefix("prov_")
    root = doc.get("activity", {}).get(root_id)
    if root is not None:
        for key in EXPORT_MACHINE_FIELDS:
            root.pop(key, None)
        root["yprov:PID"] = str(uuid.uuid5(uuid.NAMESPACE_URL,
                                           f"itwinai-sync:{sink.run.key}:{rank}"))
        root["yprov:global_rank"] = str(rank)
        world = manifest.get("world_size")
        if isinstance(world, int):
            root["yprov:world_size"] = str(world)
            root["yprov:runtime_type"] = "distributed" if world > 1 else "single_core"
        python = (manifest.get("versions") or {}).get("python")
        if python:
            root["yprov:python_version"] = str(python)
        if manifest.get("host"):
            root["yprov:host"] = str(manifest["host"])
        root["yprov:itwinai_experiment"] = sink.run.experiment
        root["yprov:itwinai_run_id"] = sink.run.run_id
    user = manifest.get("user")
    agents = doc.get("agent") or {}
    if user and len(agents) == 1:
        (old_agent,) = agents
        new_agent = prov_name(str(user), 100)
        doc["agent"] = {new_agent: agents[old_agent]}
        for relation in (doc.get("wasAssociatedWith") or {}).values():
            if relation.get("prov:agent") == old_agent:
                relation["prov:agent"] = new_agent
    entities = doc.get("entity") or {}
    for entity_id, methods in built.methods.items():
        if entity_id in entities:
            entities[entity_id]["yprov:measurement_method"] = ", ".join(sorted(methods))
    built.document.write_text(json.dumps(doc), encoding="utf-8")


def _graph(sink: Prov4mlSink, settings: Settings, built: Built) -> None:
    """The graph of the final document as DOT (yprov4ml's converter), and as SVG when Graphviz
    is installed."""
    notes = sink.notes
    if settings.create_svg and not settings.create_graph:
        notes.add("prov4ml: create_svg without create_graph: the graph is made for the SVG")
    if not (settings.create_graph or settings.create_svg):
        return
    from prov.model import ProvDocument
    from yprov4ml.utils.prov_utils import custom_prov_to_dot

    document = ProvDocument.deserialize(content=built.document.read_text(encoding="utf-8"),
                                        format="json")
    dot_path = built.document.with_suffix(".dot")
    dot_path.write_text(custom_prov_to_dot(document).to_string(), encoding="utf-8")
    if not settings.create_svg:
        return
    dot = shutil.which("dot")
    if dot is None:
        notes.add("prov4ml: Graphviz 'dot' is not installed: the graphs are written as .dot "
                  "only, without SVG (install Graphviz for the next documents, or render one "
                  "with 'dot -Tsvg FILE.dot -o FILE.svg')")
        return
    svg_path = built.document.with_suffix(".svg")
    try:
        done = subprocess.run([dot, "-Tsvg", str(dot_path), "-o", str(svg_path)],
                              capture_output=True, text=True, timeout=600, check=False)
        problem = done.stderr.strip() if done.returncode else None
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = str(e)
    if problem is not None:
        svg_path.unlink(missing_ok=True)
        notes.add(f"prov4ml: dot could not render {dot_path.name} as SVG: {problem[:200]}")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _swap(new: Path, final: Path, aside: Path) -> None:
    """Replace `final` by `new`: the old documents are renamed aside, the new ones in, and the
    old ones deleted. A crash in between leaves the aside copy, which the next open puts
    back."""
    if final.exists():
        os.rename(final, aside)
    os.rename(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)
