"""Building one rank's provenance documents with yprov4ml: the records the documents cover
replayed as yprov4ml calls (at the journal's times), the document made to describe the
training rather than the export, the graph, and the swap into place with the cursor."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_sync import compat
from itwinai_sync.api import ExportError, Notes, logged_value, param_str

from .. import system_metrics
from . import layout
from .measured import MEASURED_KINDS, SAMPLED_SOURCE, MeasuredView, non_numeric_fields
from .models import NotAModule, state_dict_from_module
from .naming import _CSV_SPECIAL, csv_field, prov_name

#: yprov4ml's run index (the `_<n>` of the run folder), pinned so that rebuilding a rank never
#: makes a second run folder.
RUN_INDEX = 0
DEFAULT_CONTEXT = "training"
#: Platform fields yprov4ml takes from the machine running it: the exporting machine here.
EXPORT_MACHINE_FIELDS = ("yprov:operating_system", "yprov:release", "yprov:processor",
                         "yprov:machine")
_COLUMNS = ("seq", "time", "kind", "name", "step", "value", "text", "blob", "meta")
#: Kinds whose last record of a name is kept (each would overwrite the previous file).
_LAST_WINS = ("best_model", "torch", "artifact")


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
class Job:
    """One rank's documents to build: every record they cover (in seq order, only those for
    this target) up to `cursor`, and where they go."""

    run: RunInfo
    rank: RankInfo
    path: Path  # the rank's directory
    settings: Settings
    notes: Notes
    records: pa.Table
    cursor: int


@dataclass
class Built:
    """What one build produced, for the swap and the report."""

    folder: Path  # the yprov4ml run folder inside the temporary directory
    document: Path  # its PROV-JSON
    records: int = 0
    methods: dict[str, set[str]] = field(default_factory=dict)  # metric entity -> methods


class _Clock:
    """yprov4ml's clock while a rank is built: the time of the record being replayed."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> str:
        return _iso(self.t)


def build_rank(job: Job) -> None:
    """Build the rank's provenance documents for `job.records` and swap them into place with
    the cursor marker and those records (see `layout`)."""
    parent = job.path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tag = f"{job.rank.rank:05d}-{secrets.token_hex(4)}"
    tmp = parent / f"{layout.TMP_PREFIX}{tag}"
    tmp.mkdir()
    try:
        built = _replay(job, tmp)
        _finish_document(job, built, tmp)
        _graph(job, built)
        marker = {"cursor": job.cursor, "records": built.records, "run": job.run.key,
                  "rank": job.rank.rank, "yprov4ml": compat.yprov4ml_version()}
        layout.write_commit(built.folder, marker, job.records)
        layout.fsync_tree(tmp)
        layout.swap(tmp, job.path, parent / f"{layout.OLD_PREFIX}{tag}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rows(records: pa.Table) -> Iterator[tuple[Any, ...]]:
    """The records as (seq, time, kind, name, step, value, text, blob, meta-dict) tuples."""
    for batch in records.to_batches(max_chunksize=10_000):
        columns = [batch.column(c).to_pylist() for c in _COLUMNS]
        for row in zip(*columns):
            meta = row[8]
            yield (*row[:8], json.loads(meta) if meta else {})


def times(job: Job, first: float | None, last: float | None) -> tuple[float, float]:
    """When the provenance run started and ended: the rank's first session start, and its
    last session end when the documents cover the whole of a rank that has ended, else the
    last record's time."""
    start = job.rank.started
    if start is None:
        start = job.run.info.get("created") or first or 0.0
    end = job.rank.ended
    if end is None or job.cursor < job.rank.last_seq:
        end = last if last is not None else start
    return float(start), float(end)


def _replay(job: Job, tmp: Path) -> Built:
    """Run yprov4ml over the rank's records, writing under `tmp`."""
    clock = _Clock()
    settings = job.settings
    first = job.records["time"][0].as_py() if job.records.num_rows else None
    with compat.yprov4ml_session(clock.now) as y:
        clock.t, _ = times(job, first, None)
        y.lib.start_run(
            experiment_name=settings.experiment_name,
            prov_user_namespace=settings.prov_user_namespace,
            provenance_save_dir=str(tmp), collect_all_processes=True,
            save_after_n_logs=settings.save_after_n_logs, rank=job.rank.rank,
            metrics_file_type="csv", use_run_id=RUN_INDEX)
        replay = _Replay(job, y, clock)
        last_time = None
        for record in _rows(job.records):
            clock.t = last_time = record[1]
            replay.record(record)
        replay.finish()
        _, end = times(job, first, last_time)
        clock.t = max(end, last_time or end)
        y.lib.end_run(create_graph=False, create_svg=False)
        folder = Path(y.data.EXPERIMENT_DIR)
        document = folder / f"prov_{y.data.PROV_JSON_NAME}.json"
        return Built(folder=folder, document=document, records=replay.count,
                     methods=replay.methods)


class _Replay:
    """One rank's records turned into yprov4ml calls."""

    def __init__(self, job: Job, y: SimpleNamespace, clock: _Clock):
        self.blobs = job.rank.blobs
        self.notes = job.notes
        self.y = y
        self.clock = clock
        self.count = 0
        self.methods: dict[str, set[str]] = {}
        self.versions: dict[str, int] = {}
        self.last: dict[tuple[str, str], tuple[Any, ...]] = {}
        self.measured = MeasuredView(job.rank)
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
        raw = text if text is not None else self.blobs.read(blob or "").decode()
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
        skipped = non_numeric_fields(text) if kind in ("system", "carbon") else set()
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
        value = logged_value(text, blob, self.blobs)
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
            for f in self.blobs.tree(blob):
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
            with self.blobs.open(sha) as f:
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
            with self.blobs.open(sha or "") as f:
                value = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any object weights_only loading refuses
            self.notes.add("prov4ml: torch objects that are not tensors are kept as artifacts "
                           "only, not also as params")
            return
        self.log_param(name, value, meta)

    def _write_blob(self, sha: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.blobs.open(sha) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)




def _finish_document(job: Job, built: Built, tmp: Path) -> None:
    """Make the PROV-JSON describe the training run rather than the export: final paths, the
    compute node, the user who trained, a stable PID, and the measurement methods."""
    text = built.document.read_text(encoding="utf-8")
    for old, new in ((str(tmp), str(job.path)),
                     (json.dumps(str(tmp))[1:-1], json.dumps(str(job.path))[1:-1])):
        text = text.replace(old, new)
    doc = json.loads(text)
    manifest, rank = job.rank.manifest, job.rank.rank
    root_id = built.document.stem.removeprefix("prov_")
    root = doc.get("activity", {}).get(root_id)
    if root is not None:
        for key in EXPORT_MACHINE_FIELDS:
            root.pop(key, None)
        root["yprov:PID"] = str(uuid.uuid5(uuid.NAMESPACE_URL,
                                           f"itwinai-sync:{job.run.key}:{rank}"))
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
        root["yprov:itwinai_experiment"] = job.run.experiment
        root["yprov:itwinai_run_id"] = job.run.run_id
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


def _graph(job: Job, built: Built) -> None:
    """The graph of the final document as DOT (yprov4ml's converter), and as SVG when Graphviz
    is installed."""
    notes, settings = job.notes, job.settings
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
