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
(tables) goes to `<savedir>/wandb/.data` unless WANDB_DATA_DIR is set. System metrics, console
capture, git and requirements of the sync machine are not recorded: they would be mistaken for
the training job's.

Steps: W&B needs strictly increasing steps and one `log` call per step. Records of one step go
into one row (`_timestamp` = the latest record time of that step). A record whose step is at or
below the row already written, or whose name is already in the row of its step, cannot be
stored: `--on-step-regression drop` (default) skips and reports it, `fail` stops the run.
Records without step join the row being built when their name is not in it yet, else they open
the next step (last step + 1); with no row being built they go to last step + 1. The row of the
last step of a rank that is still running is held back until a later step arrives or the rank
ends, because more records of that step may still be logged.

Kinds: metric -> history value; histogram (from `watch`) -> wandb.Histogram; image and
matplotlib figure -> wandb.Image; plotly figure -> wandb.Plotly; text -> wandb.Html (escaped,
in <pre>); dict -> wandb.Table (flattened key, JSON value); param -> config; watch -> a
wandb.Graph in the summary (`graph_<name>`); dataset -> summary `datasets/<name>`; torch,
artifact, model, best_model -> W&B artifacts referring to the journal's blob files in place
(policy "immutable": blobs are content-addressed and never change, so nothing is copied).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo

from .exporter import LOCK_DIR, Exporter, ExportError, Notes, RankSink

#: History key holding the highest journal seq a row covers (a leading '_' keeps it out of the
#: W&B charts, like _step and _timestamp; wandb 0.31 accepts and stores it).
CURSOR_KEY = "_itwinai_seq"
#: Summary key for the cursor over trailing records that are not history rows, written after
#: them. Not CURSOR_KEY itself: wandb-core writes the summary it derives from a history row
#: *before* that row in the transaction log, so a summary `_itwinai_seq` can be on disk while
#: its row is not (a kill in between); explicit summary writes are in order.
TAIL_KEY = "_itwinai_seq_tail"
#: Kinds that become values of a history row.
ROW_KINDS = frozenset({"metric", "histogram", "image", "figure", "text", "dict"})
ARTIFACT_KINDS = frozenset({"torch", "artifact", "model", "best_model"})
PLOTLY = "application/vnd.plotly.v1+json"
_BAD_PROJECT = re.compile(r"[/\\#?%:\s]")
_BAD_ARTIFACT = re.compile(r"[^A-Za-z0-9_.\-]")
DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_run_id(journal_id: str, rank: int) -> str:
    """Deterministic W&B run id of a journal rank (W&B ids allow [a-z0-9])."""
    return hashlib.sha1(f"{journal_id}\0{rank}".encode()).hexdigest()[:16]


def history_key(name: str) -> str:
    """W&B hides keys starting with '_' and owns _step, _timestamp, _runtime: such journal
    names get an 'itwinai' prefix (`_loss` -> `itwinai_loss`)."""
    return "itwinai" + name if name.startswith("_") else name


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


# -- the exporter ----------------------------------------------------------------------------


class WandbExporter(Exporter):
    name = "wandb"
    kinds = frozenset(ROW_KINDS | ARTIFACT_KINDS | {"param", "watch", "dataset"})
    #: wandb keeps process-wide state (the service, staging, settings): one run at a time.
    parallel_runs = False

    def __init__(self, savedir: Path, options: dict[str, Any], notes: Notes):
        super().__init__(savedir, options, notes)
        #: Offline unless `--mode online`: an API key in the environment is no reason to go
        #: online (and to hang on an unreachable server) when the user did not ask for it.
        self.mode = options.get("mode") or "offline"
        self.mode_chosen = bool(options.get("mode"))
        self.entity = options.get("entity") or os.environ.get("WANDB_ENTITY") or None
        self.on_regression = options.get("on_step_regression") or "drop"
        self.root = savedir / "wandb"
        self._saved_env: dict[str, str | None] = {}
        #: Sinks of ranks still being written, kept open between passes of `--watch` (one W&B
        #: run directory per rank and sync process, not one per pass); ended in close().
        self._live: dict[str, WandbSink] = {}

    @classmethod
    def cli_options(cls) -> list[click.Option]:
        return [
            click.Option(["--project"], metavar="NAME",
                         help="W&B project (default: the WandBLogger's project_name, else the "
                              "experiment)."),
            click.Option(["--entity"], metavar="NAME", help="W&B entity (team or user)."),
            click.Option(["--mode"], type=click.Choice(["offline", "online"]), default=None,
                         help="W&B: offline run directories under SAVEDIR/wandb (the default, "
                              "whatever the environment says; upload with `wandb sync`), or "
                              "online."),
            click.Option(["--on-step-regression"], type=click.Choice(["drop", "fail"]),
                         default=None,
                         help="W&B: a record at or below a step already written is skipped "
                              "and reported (drop, default) or stops that run (fail)."),
        ]

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
        self.handled = self.committed  # every record up to here is written, dropped or skipped
        self.row: dict[str, Any] = {}
        self.row_step: int | None = None
        self.row_time = 0.0
        self.row_base = 0  # `handled` when the row being built was started
        self.config: dict[str, Any] = {}
        self.dropped = 0
        self.first_drop = ""
        self.unshown: dict[str, int] = {}
        self.broken = False

    # -- the W&B run -------------------------------------------------------------------------

    def _start(self) -> Any:
        if self.wb is not None:
            return self.wb
        if self.read_only:
            raise ExportError("internal: a dry-run sink cannot write")
        import wandb

        self.exp.stage_env()
        self.exp.root.mkdir(parents=True, exist_ok=True)
        info = self.run.info
        settings = wandb.Settings(
            silent=True, console="off", x_disable_stats=True, x_disable_meta=True,
            x_disable_machine_info=True, disable_git=True, save_code=False,
            x_save_requirements=False)
        journal = {"experiment": self.run.experiment, "run_id": self.run.run_id,
                   "journal_id": self.run.journal_id, "rank": self.rank.rank,
                   "world_size": self.rank.manifest.get("world_size"),
                   "host": self.rank.manifest.get("host")}
        if self.exp.mode == "offline" and not self.exp.mode_chosen:
            self.notes.add(f"wandb: offline runs written to {self.exp.root} (the default; "
                           f"upload them with `wandb sync {self.exp.root}/offline-run-*`, or "
                           "sync with --mode online)")
        try:
            self.wb = wandb.init(
                project=self.project, entity=self.exp.entity, id=self.wb_id,
                name=f"{info.get('run_name') or self.run.run_id}-rank{self.rank.rank}",
                group=self.run.run_id, job_type="train", notes=info.get("description"),
                config={"itwinai_journal": journal}, dir=str(self.exp.savedir),
                mode=self.exp.mode, resume="allow", reinit="create_new", settings=settings)
        except Exception as e:  # noqa: BLE001 - wandb raises many types; one line for the user
            raise ExportError(f"wandb.init failed for {self.run.key} rank {self.rank.rank}: "
                              f"{e}") from e
        if self.exp.mode == "online":
            # A resumed online run knows what the server holds.
            summary = self.wb.summary
            server = max(int(summary.get(CURSOR_KEY) or 0), int(summary.get(TAIL_KEY) or 0))
            self.committed = max(self.committed, server)
            self.last_step = max(self.last_step, int(self.wb.summary.get("_step", -1)))
            self.handled = max(self.handled, self.committed)
        return self.wb

    def cursor(self) -> int:
        """What the run holds, or, for a sink kept open from an earlier `--watch` pass, what it
        has taken in (its last row may wait in memory for the rest of its step)."""
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
            meta_d = json.loads(meta) if meta else {}
            if kind in ROW_KINDS:
                self._row_record(seq, t, kind, name, step, value, text, blob, meta_d)
            else:
                self._side_record(seq, kind, name, step, text, blob, meta_d)
            self.handled = seq
        self.handled = max(self.handled, cursor)

    def _row_record(self, seq: int, t: float, kind: str, name: str, step: int | None,
                    value: float | None, text: str | None, blob: str | None,
                    meta: dict[str, Any]) -> None:
        key = history_key(name)
        if key != name:
            self.notes.add(f"wandb: history key {name!r} is stored as {key!r} (W&B reserves "
                           "keys starting with '_')")
        if step is None:
            if self.row_step is None:
                self._new_row(self.last_step + 1)
            elif key in self.row:
                self._new_row(self.row_step + 1)
        elif self.row_step is not None and step == self.row_step:
            if key in self.row:
                return self._regression(seq, name, step, "twice at this step")
        elif step > (self.last_step if self.row_step is None else self.row_step):
            self._new_row(step)
        else:
            return self._regression(seq, name, step, "below the step already written")
        item = self._history_item(kind, name, value, text, blob, meta)
        if item is None:
            return
        self.row[key] = item
        self.row_time = max(self.row_time, t)

    def _new_row(self, step: int) -> None:
        self._flush_row()
        self.row_step = step
        self.row_base = self.handled

    def _flush_row(self) -> None:
        """Write the row being built with the cursor in the same history record; pending config
        goes first, so the cursor never covers data that is not written."""
        self._flush_config()
        if self.row_step is None:
            return
        if self.row:
            data = {**self.row, "_timestamp": self.row_time, CURSOR_KEY: self.handled}
            self._start().log(data, step=self.row_step, commit=True)
            self.last_step = self.row_step
            self.committed = self.handled
        self.row, self.row_step, self.row_time = {}, None, 0.0

    def _flush_config(self) -> None:
        if self.config:
            self._start().config.update(self.config, allow_val_change=True)
            self.config = {}

    def _regression(self, seq: int, name: str, step: int, why: str) -> None:
        last = self.row_step if self.row_step is not None else self.last_step
        where = (f"{self.run.key} rank {self.rank.rank} (W&B run {self.wb_id}): {name!r} at "
                 f"step {step} (seq {seq}) is {why} (step {last})")
        if self.exp.on_regression == "fail":
            raise ExportError(f"step regression in {where}; W&B needs increasing steps "
                              "(--on-step-regression drop skips such records)")
        self.dropped += 1
        self.first_drop = self.first_drop or where

    def _history_item(self, kind: str, name: str, value: float | None, text: str | None,
                      blob: str | None, meta: dict[str, Any]) -> Any:
        if kind == "metric":
            return value
        import wandb

        if kind == "histogram":
            h = json.loads(text or "{}")
            if not h.get("bins"):
                self.unshown["histogram without finite values"] = (
                    self.unshown.get("histogram without finite values", 0) + 1)
                return None
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
        if kind == "text":
            return wandb.Html(f"<pre>{html.escape(body)}</pre>", inject=False)
        rows = [[k, json.dumps(v)] for k, v in _flatten(json.loads(body)).items()]
        return wandb.Table(columns=["key", "value"], data=rows)

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
            listing = json.loads(self.blobs.read(blob))
            for f in listing["files"]:
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
        """End of this pass over the rank. A rank still being written keeps its W&B run (and
        the row of its last step) open for the next `--watch` pass; the exporter's close()
        ends it. Any other rank is committed and finished now."""
        if self.read_only:
            return
        if self.rank.status == "running" and not self.broken:
            self.exp._live[self.wb_id] = self
            return
        self.end()

    def end(self) -> None:
        self.exp._live.pop(self.wb_id, None)
        try:
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
        """Write what is left: the last row (held back while the rank is still being written,
        as more records of its step may come), pending config, and the cursor over trailing
        records that are not history rows (a summary key, written after them)."""
        if self.row_step is not None and self.rank.status == "running" and self.row:
            self._flush_config()
            target = self.row_base
            self.notes.add(f"wandb: {self.run.key} rank {self.rank.rank} is still running (or "
                           "was killed): the records of its last step wait for the next sync")
        else:
            self._flush_row()
            target = self.handled
        if target > self.committed and self.wb is not None:
            # Only when something was written: a sync that merely skipped records (other
            # kinds or destinations) reads them again next time rather than start a W&B run.
            self.wb.summary[TAIL_KEY] = target
            self.committed = target

    def _report(self) -> None:
        if self.dropped:
            self.notes.add(f"wandb: {self.dropped} record(s) of {self.run.key} rank "
                           f"{self.rank.rank} dropped, W&B needs increasing steps; first: "
                           f"{self.first_drop}")
        for what, n in self.unshown.items():
            self.notes.add(f"wandb: {n} {what} of {self.run.key} rank {self.rank.rank} not "
                           "shown")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (a non-dict value is one row under its key)."""
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


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
