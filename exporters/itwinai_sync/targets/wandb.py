"""Weights & Biases target: one W&B run per journal rank, grouped by the journal run.

Where runs go: by default (and with `--mode offline`) ordinary W&B offline run directories
under `<savedir>/wandb/` (upload them later with `wandb sync <savedir>/wandb/offline-run-*`),
whatever API key or WANDB_MODE the environment holds: a sync never goes online unless asked.
`--mode online` sends them to the server. Project: `--project`, else the WandBLogger's
`project_name`, else the experiment.

Identity: W&B run id = sha1(journal identity, rank)[:16], name `<run name or run id>-rank<r>`,
group = journal run id, so every sync of a rank continues the same W&B run (`resume="allow"`),
and another journal with the same experiment and run id never does. Syncs writing offline runs
exclude each other per journal with a lock in `<savedir>/wandb/.itwinai-sync-locks/`.

Exactly once: every history row carries `_itwinai_seq`, the highest journal seq it covers, in
the same record as its data; config, summary and artifact writes (idempotent: same keys, same
content digests) come before the row that covers them, and trailing ones are covered by the
summary key `_itwinai_seq_tail` written after them. The cursor is read back from the run's
`.wandb` transaction logs under `<savedir>/wandb` (every file of that run id and project; only
records complete on disk count, so the unflushed tail a killed export loses is exported again),
and in online mode also from the resumed run's summary. Two wandb-core behaviours matter
(measured with wandb 0.31): `finish()` returns before the log is flushed, so close() waits for
the exit record; and the wandb-core of a killed export outlives it by ~2 s and flushes then, so
a log without exit record is trusted only once unchanged for QUIET_SECONDS.

W&B keeps one run at a time per process here (`parallel_runs = False`), and artifact staging
goes to `<savedir>/wandb/.data` unless WANDB_DATA_DIR is set. System metrics, console capture,
git and requirements of the sync machine are not recorded: they would be mistaken for the
training job's. The training job's own system metrics, sampled into the journal
(`system_metric` records), become the StatsRecords W&B's monitor writes, with its keys (see
system_metrics.py) and the sample's time, so they appear in the run's System panel. What W&B
shows about the machine instead comes from the rank's manifest: the run
starts when the rank's first journal session started, on the compute node's host, and the
run's environment record (W&B's `wandb-metadata.json`: OS, Python, program, arguments, host,
user, executable, git commit, SLURM variables) is the training process's. wandb-core computes
`_runtime` and the run's runtime from its own clock; the SDK offers no way to set them.

Rows and steps, as itwinai's WandBLogger makes them: it ignores `step` and calls
`wandb.log({identifier: item}, commit=True)`, one history row per call, so nothing is ever
refused. Here too W&B's own `_step` counts rows in journal order (continuing from what the run
holds), so every record is kept whatever steps the training used (batch metrics at the global
step and epoch metrics at `step=epoch` included). The journal's step travels with each row as
the metric `itwinai/step`, declared with `define_metric(key, step_metric="itwinai/step")` for
every metric logged with a step (the convention of the Lightning and Hugging Face W&B
loggers), so W&B charts use the training step as x axis. Consecutive records join one row
while they add new keys at the same journal step (a record without step joins any row), which
keeps the rows of a training loop as few as its steps; a row is written at the end of every
exported batch.

Kinds, as `wandb.log({identifier: item})` shows them: metric -> history value (a complex one
by its real part); text -> the string, or, for an object the journal keeps as its JSON
(meta['logged_as']: a metric that is not a number...), the JSON value; dict -> nested keys
(`identifier.key`); torch -> the object as wandb converts it (a
tensor becomes a list, or a histogram above 32 values; a state_dict nested keys), when it loads
with `torch.load(weights_only=True)`, and in any case a W&B artifact of the `torch.save` file.
Where itwinai's calls fail or lose the picture, the export shows it: image (PIL, numpy, torch)
-> wandb.Image (wandb.log makes a numpy array a histogram of its pixels and refuses PIL
images); matplotlib figure -> wandb.Image of its PNG (wandb.log needs plotly to convert it, and
fails without); plotly figure -> wandb.Plotly; histogram (from `watch`) -> wandb.Histogram; param
(`save_hyperparameters` and `kind="param"`) -> config; watch -> a wandb.Graph in the summary
(`graph_<name>`, when `log_graph`); dataset -> summary `datasets/<name>`; artifact, model,
best_model -> W&B artifacts referring to the journal's blob files in place (policy "immutable":
blobs are content-addressed and never change, so nothing is copied).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_sync.api import (
    LOCK_DIR,
    Exporter,
    ExportError,
    Notes,
    RankSink,
    TargetOption,
    logged_value,
    meta_of,
)

from . import system_metrics

#: History key holding the highest journal seq a row covers (a leading '_' keeps it out of the
#: W&B charts, like _step and _timestamp; wandb 0.31 accepts and stores it).
CURSOR_KEY = "_itwinai_seq"
#: Summary key for the cursor over trailing records that are not history rows, written after
#: them. Not CURSOR_KEY itself: wandb-core writes the summary it derives from a history row
#: *before* that row in the transaction log, so a summary `_itwinai_seq` can be on disk while
#: its row is not (a kill in between); explicit summary writes are in order.
TAIL_KEY = "_itwinai_seq_tail"
#: History key carrying the journal's step, the x axis of the charts of metrics logged with one.
STEP_KEY = "itwinai/step"
#: Kinds that become values of a history row (torch as well, when its object loads safely).
ROW_KINDS = frozenset({"metric", "histogram", "image", "figure", "text", "dict"})
#: Kinds whose values are charted against the journal step.
STEPPED_KINDS = frozenset({"metric", "dict"})
#: What an empty journal name is stored as.
EMPTY_KEY = "itwinai_empty_name"
#: Types whose JSON list `wandb.log` would have taken as an array (a list, or a histogram above
#: 32 values): the list is handed to it as a numpy array.
ARRAY_TYPES = frozenset({"numpy.ndarray", "torch.Tensor", "torch.nn.parameter.Parameter"})
#: Returned by `_history_item` when a record shows nothing in the history (None is a value).
NOTHING = object()
ARTIFACT_KINDS = frozenset({"torch", "artifact", "model", "best_model"})
PLOTLY = "application/vnd.plotly.v1+json"
_BAD_PROJECT = re.compile(r"[/\\#?%:\s]")
_BAD_ARTIFACT = re.compile(r"[^A-Za-z0-9_.\-]")
DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_run_id(journal_id: str, rank: int) -> str:
    """Deterministic W&B run id of a journal rank (W&B ids allow [a-z0-9])."""
    return hashlib.sha1(f"{journal_id}\0{rank}".encode()).hexdigest()[:16]


def history_key(name: str) -> str:
    """The W&B history key of a journal name, deterministically. W&B hides keys starting with
    '_' and owns _step, _timestamp, _runtime: such names get an 'itwinai' prefix (`_loss` ->
    `itwinai_loss`); a name equal to the step key gets a trailing '_'; the empty name, whose
    value `wandb.log` drops without a word (and `define_metric` refuses), is EMPTY_KEY."""
    if name == STEP_KEY:
        return name + "_"
    if not name:
        return EMPTY_KEY
    return "itwinai" + name if name.startswith("_") else name


def chartable(key: str) -> bool:
    """Whether `define_metric` can give `key` the journal step as x axis: it refuses a '*'
    but as the last character, where it makes a glob over other keys."""
    return "*" not in key


def row_step(step: int | None, meta: dict[str, Any]) -> int | float | None:
    """The journal step a record is charted at (the row's STEP_KEY): its step, or, for a step
    the journal's int64 column could not hold, the exact one from meta['step'] when it is a
    number (1.5, 2**70: W&B's numbers are float64), or the number a string step spells ('12'
    -> 12.0, as float() reads it); NaN for one that is neither (a list, 'abc', inf), so that
    it is charted at no step rather than at a neighbour's."""
    if step is not None or "step" not in meta:
        return step
    exact = meta["step"]
    if isinstance(exact, str):
        try:
            exact = float(exact)
        except ValueError:
            return math.nan
    if isinstance(exact, (int, float)) and not isinstance(exact, bool) and math.isfinite(exact):
        return exact
    return math.nan


def artifact_name(name: str) -> str:
    """W&B artifact names allow [A-Za-z0-9_.-], up to 128 characters."""
    mapped = _BAD_ARTIFACT.sub("-", name).strip(".") or "artifact"
    if len(mapped) > 128:
        mapped = mapped[:119] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return mapped


# -- reading the committed cursor back from .wandb transaction logs -------------------------
# wandb-core writes a LevelDB-style log: a 7-byte header (":W&B", 0xBEE1, version), then 32 KiB
# blocks of chunks `crc32 | length | type | data` (IEEE CRC over type+data; FULL, FIRST, MIDDLE,
# LAST). wandb 0.31 ships no Python reader, hence this one; it stops at the first torn or
# corrupt chunk, as wandb-core's own reader does.

_BLOCK = 32 * 1024
_HEADER = struct.Struct("<IHB")


def iter_wandb_records(data: bytes, base: int = 0) -> Iterator[bytes]:
    """Payloads of the complete records of a `.wandb` file (nothing if it is not a W&B log).
    `data` holds the file from offset `base` on: 0, or a block boundary (then a record
    continued from an earlier block is skipped)."""
    if base == 0 and (len(data) < 7 or data[:4] != b":W&B"):
        return
    pos, size, parts = (7 if base == 0 else 0), len(data), None
    skipping = base > 0
    while True:
        left = _BLOCK - (base + pos) % _BLOCK
        if left < 7:
            pos += left
            continue
        if pos + 7 > size:
            return
        crc, length, kind = _HEADER.unpack_from(data, pos)
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


def has_exit_record(path: Path) -> bool:
    """Whether the run's exit record (written by `finish`, among the last records) is in the
    file; only the last two blocks are read."""
    from wandb.proto.wandb_internal_pb2 import Record

    try:
        with open(path, "rb") as f:
            if f.read(4) != b":W&B":
                return False
            size = f.seek(0, os.SEEK_END)
            base = max(0, size - 2 * _BLOCK)
            base -= base % _BLOCK
            f.seek(base)
            data = f.read()
    except OSError:
        return False
    for payload in iter_wandb_records(data, base):
        if len(payload) < 4096:
            rec = Record()
            rec.ParseFromString(payload)
            if rec.WhichOneof("record_type") == "exit":
                return True
    return False


def wait_for_exit_record(path: Path, timeout: float = 60.0) -> bool:
    """Whether wandb-core wrote the run's exit record to `path` within `timeout` seconds.

    `Run.finish()` returns before wandb-core has flushed the transaction log (measured with
    wandb 0.31: the file can still be at its 7-byte header right after finish). A sync that
    read its cursor from a half-written file would export the tail twice, so close() waits."""
    deadline = time.monotonic() + timeout
    while not has_exit_record(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


#: How long the transaction log of a killed export must have been left unchanged before its
#: cursor is trusted. wandb-core runs in its own session and outlives a SIGKILLed export by
#: about 2 s (it watches the parent pid), flushing what it buffered as it exits: reading the
#: cursor before that would export those rows a second time. Longer than the default flush
#: interval (15 s), so even a wandb-core that kept running has flushed within it.
QUIET_SECONDS = 20.0


def settle_unfinished(root: Path, wb_id: str, timeout: float = 120.0) -> float:
    """Wait until no earlier export may still be writing this run's newest transaction log:
    nothing to wait for when it has its exit record (a finished export), else until it has
    been unchanged for QUIET_SECONDS. Returns the seconds waited."""
    files = list(root.glob(f"*-{wb_id}*/run-{wb_id}.wandb"))
    if not files:
        return 0.0
    newest = max(files, key=lambda p: p.stat().st_mtime)
    if has_exit_record(newest):
        return 0.0
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        quiet = time.time() - newest.stat().st_mtime
        if quiet >= QUIET_SECONDS:
            break
        time.sleep(min(QUIET_SECONDS - quiet, 1.0))
    return time.monotonic() - started


def _item_key(item: Any) -> str:
    if item.key:
        return item.key
    return item.nested_key[0] if len(item.nested_key) == 1 else ""


def _history_value(item: Any) -> Any:
    """A history item's value in either encoding wandb-core uses (typed oneof or JSON)."""
    which = item.WhichOneof("value")
    if which in ("integer", "number"):
        return getattr(item, which)
    if which == "json":
        return json.loads(item.json)
    return json.loads(item.value_json) if item.value_json else None


def committed_state(root: Path, wb_id: str, project: str) -> tuple[int, int]:
    """(cursor, last step) of W&B run `wb_id` of `project` from its transaction logs below
    `root`: the highest `_itwinai_seq` and `_step` of history records and `_itwinai_seq_tail`
    of summary records complete on disk, over every offline (and online) run directory of
    that id. (0, -1) when there is none.

    Only records that carry the cursor key are decoded (plus each file's run record, for the
    project), which keeps re-reading a long run's logs cheap."""
    from wandb.proto.wandb_internal_pb2 import Record

    cursor, last_step = 0, -1
    key = CURSOR_KEY.encode()
    for path in sorted(root.glob(f"*-{wb_id}*/run-{wb_id}.wandb")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        project_seen = False
        for payload in iter_wandb_records(data):
            if project_seen and key not in payload:
                continue
            rec = Record()
            rec.ParseFromString(payload)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                if rec.run.project != project:
                    break  # the same id in another project: another W&B run
                project_seen = True
            elif not project_seen:
                continue
            elif kind == "history":
                for item in rec.history.item:
                    if _item_key(item) == CURSOR_KEY:
                        cursor = max(cursor, int(_history_value(item)))
                        last_step = max(last_step, rec.history.step.num)
            elif kind == "summary":
                for item in rec.summary.update:
                    if _item_key(item) == TAIL_KEY:
                        cursor = max(cursor, int(json.loads(item.value_json)))
    return cursor, last_step


def stats_timestamps(root: Path, wb_id: str, project: str) -> set[int]:
    """Timestamps (ns) of the StatsRecords in W&B run `wb_id` of `project`'s transaction logs
    below `root`: the system-metrics samples the run holds (one per sample time)."""
    from wandb.proto.wandb_internal_pb2 import Record

    found: set[int] = set()
    for path in sorted(root.glob(f"*-{wb_id}*/run-{wb_id}.wandb")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for payload in iter_wandb_records(data):
            rec = Record()
            rec.ParseFromString(payload)
            kind = rec.WhichOneof("record_type")
            if kind == "run" and rec.run.project != project:
                break  # the same id in another project: another W&B run
            if kind == "stats":
                found.add(rec.stats.timestamp.ToNanoseconds())
    return found


# -- the exporter ----------------------------------------------------------------------------


class WandbExporter(Exporter):
    name = "wandb"
    kinds = frozenset(ROW_KINDS | ARTIFACT_KINDS | {"param", "watch", "dataset",
                                                    system_metrics.KIND})
    #: wandb keeps process-wide state (the service, staging, settings): one run at a time.
    parallel_runs = False

    def __init__(self, savedir: Path, options: dict[str, Any], notes: Notes):
        super().__init__(savedir, options, notes)
        #: Offline unless `--mode online`: an API key in the environment is no reason to go
        #: online (and to hang on an unreachable server) when the user did not ask for it.
        self.mode = options.get("mode") or "offline"
        self.mode_chosen = bool(options.get("mode"))
        self.entity = options.get("entity") or os.environ.get("WANDB_ENTITY") or None
        if options.get("on_step_regression"):
            notes.add("wandb: --on-step-regression no longer has an effect: every record is "
                      "kept (W&B's _step counts rows, the journal's step is the 'itwinai/step' "
                      "metric)")
        self.root = savedir / "wandb"
        self._saved_env: dict[str, str | None] = {}
        #: Sinks of ranks still being written, kept open between passes of `--watch` (one W&B
        #: run directory per rank and sync process, not one per pass); ended in close().
        self._live: dict[str, WandbSink] = {}

    cli_options = (
        TargetOption("--project", metavar="NAME",
                     help="W&B project (default: the WandBLogger's project_name, else the "
                          "experiment)."),
        TargetOption("--entity", metavar="NAME", help="W&B entity (team or user)."),
        TargetOption("--mode", choices=("offline", "online"),
                     help="W&B: offline run directories under SAVEDIR/wandb (the default, "
                          "whatever the environment says; upload with `wandb sync`), or "
                          "online."),
        # Accepted for command lines written for earlier versions; nothing is dropped now.
        TargetOption("--on-step-regression", choices=("drop", "fail"), hidden=True, help=""),
    )

    def project(self, run: RunInfo) -> str:
        declared = (run.destinations().get("wandb") or {}).get("project_name")
        wanted = self.options.get("project") or declared or run.experiment
        project = _BAD_PROJECT.sub("-", wanted)[:128]
        if project != wanted:
            self.notes.add(f"wandb: project {wanted!r} is stored as {project!r} (W&B refuses "
                           "'/\\#?%:' and whitespace, and names over 128 characters)")
        return project

    def target_key(self, run: RunInfo) -> str:
        if self.mode == "offline":
            return f"wandb+offline:{self.root.resolve()}/{self.project(run)}"
        base = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")
        return f"wandb:{base}/{self.entity or '-'}/{self.project(run)}"

    def lock_dir(self, run: RunInfo) -> Path | None:
        return self.root / LOCK_DIR if self.mode == "offline" else None

    def describe(self, run: RunInfo) -> str:
        if self.mode == "offline":
            return f"W&B offline, project {self.project(run)}, in {self.root}"
        return f"W&B project {(self.entity + '/') if self.entity else ''}{self.project(run)}"

    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        live = self._live.get(wandb_run_id(run.journal_id, rank.rank))
        if live is not None and create:
            live.run, live.rank = run, rank  # fresh status for this pass
            return live
        sink = WandbSink(self, run, rank, self.notes)
        if not create and sink.committed == 0:
            return None
        sink.read_only = not create
        return sink

    def stage_env(self) -> None:
        """Keep W&B's artifact staging (tables) next to the runs, not in ~/.local/share, unless
        the user chose a place: the export must not fill a home quota on an HPC login node."""
        if "WANDB_DATA_DIR" not in os.environ and "WANDB_DATA_DIR" not in self._saved_env:
            self._saved_env["WANDB_DATA_DIR"] = None
            os.environ["WANDB_DATA_DIR"] = str((self.root / ".data").resolve())

    def close(self) -> None:
        try:
            for sink in list(self._live.values()):
                sink.end()
        finally:
            self._restore_env()

    def _restore_env(self) -> None:
        for var, value in self._saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        self._saved_env.clear()


class WandbSink(RankSink):
    """One journal rank as one W&B run. The run is started on the first write (a sync with
    nothing new creates no run directory) and finished in close()."""

    def __init__(self, exporter: WandbExporter, run: RunInfo, rank: RankInfo, notes: Notes):
        super().__init__(run, rank, notes)
        self.exp = exporter
        self.read_only = False
        self.project = exporter.project(run)
        self.wb_id = wandb_run_id(run.journal_id, rank.rank)
        waited = settle_unfinished(exporter.root, self.wb_id)
        if waited >= 1:
            notes.add(f"wandb: waited {waited:.0f} s for the W&B writer of an interrupted export "
                      f"of {run.key} rank {rank.rank} to finish before reading its cursor")
        self.committed, self.last_step = committed_state(exporter.root, self.wb_id, self.project)
        self.wb: Any = None
        self.handled = self.committed  # every record up to here is written or skipped
        #: The row being built (None: none), its journal step and latest record time.
        self.row: dict[str, Any] | None = None
        self.row_step: int | None = None
        self.row_time = 0.0
        self.config: dict[str, Any] = {}
        #: History keys already given the journal step as x axis in this W&B run directory.
        self.defined: set[str] = set()
        self.unshown: dict[str, int] = {}
        self.broken = False
        #: Times (ns) of the system-metrics samples the run holds, read when first needed.
        self.stats_times: set[int] | None = None

    # -- the W&B run -------------------------------------------------------------------------

    def _start(self) -> Any:
        if self.wb is not None:
            return self.wb
        if self.read_only:
            raise ExportError("internal: a dry-run sink cannot write")
        import wandb

        self.exp.stage_env()
        self.exp.root.mkdir(parents=True, exist_ok=True)
        info, manifest = self.run.info, self.rank.manifest
        settings = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, x_disable_meta=True,
            x_disable_machine_info=True, disable_git=True, save_code=False,
            x_save_requirements=False, host=_text(manifest.get("host")),
            git_commit=_text(manifest.get("git_commit")))
        journal = {"experiment": self.run.experiment, "run_id": self.run.run_id,
                   "journal_id": self.run.journal_id, "rank": self.rank.rank,
                   "world_size": manifest.get("world_size"), "host": manifest.get("host")}
        start = session_start(manifest)
        if self.exp.mode == "offline" and not self.exp.mode_chosen:
            self.notes.add(f"wandb: offline runs written to {self.exp.root} (the default; "
                           f"upload them with `wandb sync {self.exp.root}/offline-run-*`, or "
                           "sync with --mode online)")
        try:
            with _run_clock(start):
                self.wb = wandb.init(
                    project=self.project, entity=self.exp.entity, id=self.wb_id,
                    name=f"{info.get('run_name') or self.run.run_id}-rank{self.rank.rank}",
                    group=self.run.run_id, job_type="train", notes=info.get("description"),
                    config={"itwinai_journal": journal}, dir=str(self.exp.savedir),
                    mode=self.exp.mode, resume="allow", reinit="create_new", settings=settings)
        except Exception as e:  # noqa: BLE001 - wandb raises many types; one line for the user
            raise ExportError(f"wandb.init failed for {self.run.key} rank {self.rank.rank}: "
                              f"{e}") from e
        self._describe_machine(start)
        if self.exp.mode == "online":
            # A resumed online run knows what the server holds.
            summary = self.wb.summary
            server = max(int(summary.get(CURSOR_KEY) or 0), int(summary.get(TAIL_KEY) or 0))
            self.committed = max(self.committed, server)
            self.last_step = max(self.last_step, int(self.wb.summary.get("_step", -1)))
            self.handled = max(self.handled, self.committed)
        return self.wb

    def _describe_machine(self, start: float | None) -> None:
        """The training's start time and environment record instead of the exporting
        machine's, or a note saying which of them this wandb version did not take."""
        if start is not None and abs(self.wb.start_time - start) > 1e-3:
            self.notes.add("wandb: this wandb version did not take the journal's start time; "
                           "the runs start when they were exported")
        interface = getattr(self.wb, "_interface", None)
        if interface is None or not hasattr(interface, "publish_environment"):
            self.notes.add("wandb: this wandb version cannot take the training's environment "
                           "(program, host, Python, OS, git); the runs have none")
            return
        interface.publish_environment(environment_record(self.rank.manifest, start))

    def cursor(self) -> int:
        """What the run holds, or, for a sink kept open from an earlier `--watch` pass, what it
        has taken in."""
        if self.exp.mode == "online" and not self.read_only:
            self._start()
        return self.handled

    # -- writing -----------------------------------------------------------------------------

    def export(self, batch: pa.Table, cursor: int) -> None:
        try:
            self._export(batch, cursor)
        except BaseException:
            self.broken = True  # close() then ends the run rather than keep it for a next pass
            raise

    def _export(self, batch: pa.Table, cursor: int) -> None:
        cols = {c: batch[c].to_pylist() for c in
                ("seq", "time", "kind", "name", "step", "value", "text", "blob", "meta")}
        for seq, t, kind, name, step, value, text, blob, meta in zip(*cols.values()):
            if seq <= self.handled:
                continue  # already written (an online resume may know more than the files)
            meta_d = meta_of(meta)
            shown = row_step(step, meta_d)
            if shown is not step:
                self._note_step(shown)
            if kind == system_metrics.KIND:
                self._system_stats(t, text, meta_d)
            elif kind in ROW_KINDS:
                item = self._history_item(kind, name, value, text, blob, meta_d)
                if meta_d.get("logged_as") in STEPPED_KINDS:  # charted as what was logged
                    kind = "dict" if isinstance(item, dict) else "metric"
                self._add_to_row(kind, name, shown, t, item)
            else:
                self._side_record(seq, kind, name, step, text, blob, meta_d)
                if kind == "torch":
                    self._add_to_row(kind, name, shown, t, self._torch_value(name, blob))
            self.handled = seq
        self._flush_row()  # the batch's cursor goes with its last row
        self.handled = max(self.handled, cursor)

    def _add_to_row(self, kind: str, name: str, step: int | float | None, t: float,
                    item: Any) -> None:
        """Put a value into the row being built, or into a new row when it has the key already
        or another journal step (see the module docstring)."""
        if item is NOTHING:
            return
        key = history_key(name)
        if key != name:
            self.notes.add(f"wandb: history key {name!r} is stored as {key!r} (W&B drops an "
                           f"empty key, hides keys starting with '_', and {STEP_KEY!r} holds "
                           "the journal step)")
        row = self.row
        same_step = step is None or self.row_step is None or step == self.row_step
        if row is not None and (key in row or not same_step):
            self._flush_row()
            row = None
        if step is not None and kind in STEPPED_KINDS:
            # before a row takes the value: a failure leaves no half-made row behind
            self._define_step_metric(key, nested=isinstance(item, dict))
        if row is None:
            row = self.row = {}
            self.row_step, self.row_time = None, t
        if step is not None:
            self.row_step = step
        row[key] = item
        self.row_time = max(self.row_time, t)

    def _note_step(self, shown: int | float) -> None:
        if math.isnan(shown):
            self.notes.add(f"wandb: records whose step is not a number (kept in the journal's "
                           f"meta['step']) are charted at no step ({STEP_KEY} = NaN)")
        else:
            self.notes.add(f"wandb: records whose step is not a whole number within int64 "
                           f"(1.5, 2**70, '12') are charted at that exact step ({STEP_KEY}, a "
                           "W&B float64; a string at the number it spells)")

    def _define_step_metric(self, key: str, nested: bool) -> None:
        """Chart `key` against the journal step (for a dict value, every nested key under it:
        a list logged as a dict is one key, as wandb.log stores it)."""
        if key in self.defined:
            return
        if not chartable(key):
            self.notes.add(f"wandb: {key!r} is charted against W&B's _step: define_metric "
                           f"cannot name a key with '*' to chart it against {STEP_KEY!r}")
            self.defined.add(key)
            return
        wb = self._start()
        if not self.defined:
            wb.define_metric(STEP_KEY)
        wb.define_metric(f"{key}.*" if nested else key, step_metric=STEP_KEY)
        self.defined.add(key)

    def _flush_row(self) -> None:
        """Write the row being built at the next W&B step, with the journal step and the cursor
        in the same history record; pending config goes first, so the cursor never covers data
        that is not written."""
        self._flush_config()
        if self.row is None:
            return
        data = {**self.row, "_timestamp": self.row_time, CURSOR_KEY: self.handled}
        if self.row_step is not None:
            data[STEP_KEY] = self.row_step
        step = self.last_step + 1
        self._start().log(data, step=step, commit=True)
        self.last_step, self.committed = step, self.handled
        self.row, self.row_step = None, None

    def _flush_config(self) -> None:
        if self.config:
            self._start().config.update(self.config, allow_val_change=True)
            self.config = {}

    def _history_item(self, kind: str, name: str, value: float | None, text: str | None,
                      blob: str | None, meta: dict[str, Any]) -> Any:
        """The value `wandb.log({name: item})` would have put in the history, or NOTHING."""
        if kind == "metric":
            if "imag" in meta:
                self.notes.add("wandb: complex metrics are shown by their real part (W&B "
                               "charts real numbers); the journal keeps the imaginary part "
                               "in meta['imag']")
            return value
        if meta.get("surrogates"):
            self.notes.add("wandb: lone surrogates in texts are shown as U+FFFD, as W&B itself "
                           "stores them; the journal keeps the code points in "
                           "meta['surrogates']")
        if kind == "text" and meta.get("logged_as"):
            return self._logged_value(text, blob, meta)
        import wandb

        if kind == "histogram":
            h = json.loads(text or "{}")
            if not h.get("bins"):
                self._unshown("histogram without finite values")
                return NOTHING
            return wandb.Histogram(np_histogram=(h["counts"], h["bins"]))
        if kind in ("image", "figure"):
            if meta.get("media_type") == PLOTLY:
                try:
                    import plotly.io
                except ImportError as e:
                    raise ExportError("a plotly figure needs plotly to be exported to W&B: "
                                      "pip install plotly") from e
                return wandb.Plotly(plotly.io.from_json(self.blobs.read(blob).decode()))
            from PIL import Image

            with Image.open(self.blobs.path(blob)) as im:
                im.load()
                return wandb.Image(im)
        body = text if text is not None else self.blobs.read(blob).decode()
        return body if kind == "text" else json.loads(body)

    def _logged_value(self, text: str | None, blob: str | None, meta: dict[str, Any]) -> Any:
        """An object logged as `meta['logged_as']` that the journal keeps as its JSON (a metric
        that is not a number, an object a kind's capture cannot take): the JSON value, which
        `wandb.log` stores as it would the object (a string, a list, null, nested keys for a
        dict); an array's list as a numpy array, which wandb makes a list, or a histogram
        above 32 values, as it would the original array."""
        value = logged_value(text, blob, self.blobs)
        self.notes.add("wandb: objects logged as a kind that cannot hold them (a metric that "
                       "is not a number, ...) are shown as wandb.log shows them: their JSON "
                       "value (a string, a list, null, nested keys)")
        if meta.get("stringified"):
            self.notes.add("wandb: objects that JSON cannot hold (which wandb.log refuses) "
                           "are shown as their str()")
        if meta.get("type") in ARRAY_TYPES and isinstance(value, list):
            import numpy as np

            try:
                return np.asarray(value)
            except ValueError:  # ragged: not an array of numbers after all
                return value
        return value

    def _torch_value(self, name: str, blob: str | None) -> Any:
        """The logged torch object as `wandb.log` would take it, when it is tensors and
        containers only: `weights_only` loading cannot run code from the journal. Anything
        else stays an artifact only."""
        try:
            import torch
        except ImportError:
            self._unshown("torch object (torch is not installed here; kept as artifacts)")
            return NOTHING
        try:
            with self.blobs.open(blob or "") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any object weights_only loading refuses
            self._unshown("torch object that is not tensors (kept as artifacts)")
            return NOTHING

    def _system_stats(self, t: float, text: str | None, meta: dict[str, Any]) -> None:
        """A system-metrics sample as the StatsRecord W&B's own monitor writes, stamped with the
        sample's time (`publish_stats` would stamp the export's). Stats are not history rows,
        so the cursor does not cover them: a sample whose time the run's logs already hold (an
        export killed before its cursor was written) is not written again."""
        from wandb.proto import wandb_internal_pb2 as pb

        items = system_metrics.wandb_stats(system_metrics.sample(text), meta)
        nanos = round(t * 1e9)
        if not items or nanos in self._stats_written():
            return
        interface = getattr(self._start(), "_interface", None)
        if interface is None or not hasattr(interface, "_publish"):
            self._unshown("system-metrics sample (this wandb version cannot take them)")
            return
        stats = pb.StatsRecord(stats_type=pb.StatsRecord.StatsType.SYSTEM)
        stats.timestamp.FromNanoseconds(nanos)
        for key, value in items.items():
            stats.item.add(key=key, value_json=json.dumps(value))
        interface._publish(pb.Record(stats=stats))
        self.stats_times.add(nanos)

    def _stats_written(self) -> set[int]:
        if self.stats_times is None:
            self.stats_times = stats_timestamps(self.exp.root, self.wb_id, self.project)
        return self.stats_times

    def _unshown(self, what: str) -> None:
        self.unshown[what] = self.unshown.get(what, 0) + 1

    def _side_record(self, seq: int, kind: str, name: str, step: int | None, text: str | None,
                     blob: str | None, meta: dict[str, Any]) -> None:
        """Records that are not history values. Writing them again after a crash stores the
        same content (config keys, summary keys, artifact digests), so they need no cursor
        of their own: the next row or close() commits past them."""
        if kind == "param":
            self.config[name] = json.loads(text) if text is not None else None
            return
        if kind == "dataset":
            self._start().summary[f"datasets/{name}"] = json.loads(text or "{}")
        elif kind == "watch":
            if meta.get("log_graph", True):
                topo = json.loads(text if text is not None else self.blobs.read(blob))
                self._start().summary[f"graph_{name}"] = _graph(topo)
        elif kind in ARTIFACT_KINDS:
            self._artifact(seq, kind, name, step, blob, meta)

    def _artifact(self, seq: int, kind: str, name: str, step: int | None, blob: str | None,
                  meta: dict[str, Any]) -> None:
        import wandb

        wb = self._start()
        art_name = artifact_name(name)
        if art_name != name:
            self.notes.add(f"wandb: artifact {name!r} is stored as {art_name!r} (W&B allows "
                           "[A-Za-z0-9_.-], up to 128 characters)")
        art_type = "model" if kind in ("model", "best_model") else kind
        info = {k: v for k, v in meta.items() if k not in ("targets",)}
        art = wandb.Artifact(art_name, type=art_type,
                             metadata={**info, "journal_kind": kind, "journal_seq": seq,
                                       "step": step})
        if meta.get("type") == "directory":
            for f in self.blobs.tree(blob):
                art.add_file(str(self.blobs.path(f["sha256"])), name=f["path"],
                             policy="immutable")
        else:
            file_name = meta.get("file_name") or art_name
            art.add_file(str(self.blobs.path(blob)), name=file_name, policy="immutable")
        aliases = [f"step-{step}"] if step is not None else []
        if kind == "best_model":
            aliases.append("best")
        wb.log_artifact(art, aliases=aliases)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """End of this pass over the rank. A rank still being written keeps its W&B run open
        for the next `--watch` pass; the exporter's close() ends it. Any other rank is
        committed and finished now."""
        if self.read_only:
            return
        if self.rank.status == "running" and not self.broken:
            self.exp._live[self.wb_id] = self
            return
        self.end()

    def end(self) -> None:
        """Commit what is left and finish the W&B run. After a failed export only finish it:
        the row being built when the export failed is left out (its records are not covered
        by a cursor yet, so the next sync exports them again), never written half-made."""
        self.exp._live.pop(self.wb_id, None)
        try:
            if not self.broken:
                self._commit_tail()
        finally:
            if self.wb is not None:
                self._finish()
            self._report()

    def _finish(self) -> None:
        wb, self.wb = self.wb, None
        log_file = Path(wb.settings.sync_file)
        wb.finish()
        if not wait_for_exit_record(log_file):
            raise ExportError(f"W&B did not finish writing {log_file} within 60 s; run the "
                              "sync again to check what it holds")

    def _commit_tail(self) -> None:
        """Write what is left (a row, pending config) and the cursor over trailing records
        that are not history rows (a summary key, written after them)."""
        self._flush_row()
        if self.handled > self.committed and self.wb is not None:
            # Only when something was written: a sync that merely skipped records (other
            # kinds or destinations) reads them again next time rather than start a W&B run.
            self.wb.summary[TAIL_KEY] = self.handled
            self.committed = self.handled

    def _report(self) -> None:
        for what, n in self.unshown.items():
            self.notes.add(f"wandb: {n} {what} of {self.run.key} rank {self.rank.rank} not "
                           "shown in the history")


def session_start(manifest: dict[str, Any]) -> float | None:
    """When the rank's first journal session started (the W&B run's start)."""
    sessions = manifest.get("sessions") or []
    start = sessions[0].get("start") if sessions else None
    return float(start) if isinstance(start, (int, float)) else None


def _text(value: Any) -> str | None:
    return str(value) if value else None


@contextmanager
def _run_clock(start: float | None) -> Iterator[None]:
    """While `wandb.init` runs, the clock W&B stamps the run's start with reads `start`.
    wandb offers no setting for it (`x_start_time` is overwritten by `init`); the run takes
    `time.time()` of its module when it is created. Only that module's view is changed, and
    only for the call (W&B runs are started one at a time here)."""
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


def environment_record(manifest: dict[str, Any], start: float | None) -> Any:
    """W&B's environment record (its `wandb-metadata.json`) of the training process, from the
    manifest: what W&B's own client would have recorded on the compute node, as far as the
    journal knows it (no hardware inventory)."""
    from wandb.proto import wandb_internal_pb2 as pb

    env = pb.EnvironmentRecord()
    sessions = manifest.get("sessions") or [{}]
    first = sessions[0]
    versions = manifest.get("versions") or {}
    if manifest.get("os"):
        env.os = str(manifest["os"])
    if versions.get("python"):
        impl = manifest.get("python_implementation")
        env.python = f"{impl} {versions['python']}" if impl else str(versions["python"])
    argv = [str(a) for a in first.get("argv") or []]
    cwd = first.get("cwd")
    if argv:
        program = argv[0]
        if cwd and not os.path.isabs(program):
            program = os.path.normpath(os.path.join(cwd, program))
        env.program = program
        env.args.extend(argv[1:])
        relative = os.path.relpath(program, cwd) if cwd else os.path.basename(program)
        env.code_path = env.code_path_local = (
            os.path.basename(program) if relative.startswith("..") else relative)
    if cwd:
        env.root = str(cwd)
    for field_name, value in (("host", first.get("host") or manifest.get("host")),
                              ("username", manifest.get("user")),
                              ("executable", manifest.get("executable"))):
        if value:
            setattr(env, field_name, str(value))
    if manifest.get("git_commit"):
        env.git.commit = str(manifest["git_commit"])
    for key, value in (manifest.get("job") or {}).items():
        if key.startswith("SLURM_"):
            env.slurm[key[len("SLURM_"):].lower()] = str(value)
    if start is not None:
        env.started_at.FromMicroseconds(int(start * 1e6))
    return env


def _graph(topo: dict[str, Any]) -> Any:
    """The watched module's topology as the wandb.Graph that wandb.watch would log."""
    import wandb
    from wandb.sdk.data_types.graph import Node

    graph = wandb.Graph(format="torch")
    for i, m in enumerate(topo.get("modules", [])):
        params = list(m.get("parameters", {}).items())
        graph.add_node(Node(id=i, name=m.get("name") or topo.get("name"),
                            class_name=m.get("class"), parameters=params,
                            num_parameters=[_numel(s) for _, s in params]))
    return graph


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = ["WandbExporter", "WandbSink", "committed_state", "iter_wandb_records",
           "wandb_run_id", "history_key", "artifact_name"]
