"""The W&B exporter, and the sink that writes one journal rank as one W&B run (see the
package docstring for identity, exactly once, rows and kinds)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_sync import compat
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

from .. import system_metrics
from .logfile import committed_state, settle_unfinished, stats_timestamps, wait_for_exit_record
from .machine import environment_record, text_or_none
from .rows import (
    ARRAY_TYPES,
    ARTIFACT_KINDS,
    CURSOR_KEY,
    NOTHING,
    PLOTLY,
    ROW_KINDS,
    STEP_KEY,
    STEPPED_KINDS,
    TAIL_KEY,
    artifact_name,
    chartable,
    graph,
    history_key,
    row_step,
    wandb_run_id,
)

_BAD_PROJECT = re.compile(r"[/\\#?%:\s]")
DEFAULT_BASE_URL = "https://api.wandb.ai"


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
        if why := compat.untested("wandb"):
            notes.add(f"wandb: {why}")
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
            x_save_requirements=False, host=text_or_none(self.rank.host),
            git_commit=text_or_none(manifest.get("git_commit")))
        journal = {"experiment": self.run.experiment, "run_id": self.run.run_id,
                   "journal_id": self.run.journal_id, "rank": self.rank.rank,
                   "world_size": manifest.get("world_size"), "host": manifest.get("host")}
        start = self.rank.started
        if self.exp.mode == "offline" and not self.exp.mode_chosen:
            self.notes.add(f"wandb: offline runs written to {self.exp.root} (the default; "
                           f"upload them with `wandb sync {self.exp.root}/offline-run-*`, or "
                           "sync with --mode online)")
        try:
            with compat.wandb_run_clock(start):
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
        if not compat.wandb_publish_environment(self.wb, environment_record(self.rank, start)):
            self.notes.add("wandb: this wandb version cannot take the training's environment "
                           "(program, host, Python, OS, git); the runs have none")

    def cursor(self) -> int:
        """What the run holds: read from its transaction logs when the sink was opened (and,
        online, from the resumed run's summary), then advanced by every batch committed."""
        if self.exp.mode == "online" and not self.read_only:
            self._start()
        return self.committed

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
        self.handled = max(self.handled, cursor)
        # The batch's cursor goes with its last row, or, when records after that row (or the
        # whole batch) are not rows, in the summary after them.
        self._commit_tail()

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
        stats = pb.StatsRecord(stats_type=pb.StatsRecord.StatsType.SYSTEM)
        stats.timestamp.FromNanoseconds(nanos)
        for key, value in items.items():
            stats.item.add(key=key, value_json=json.dumps(value))
        if not compat.wandb_publish_record(self._start(), pb.Record(stats=stats)):
            self._unshown("system-metrics sample (this wandb version cannot take them)")
            return
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
                self._start().summary[f"graph_{name}"] = graph(topo)
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
        that are not history rows (a summary key, written after them). A batch with nothing
        for W&B advances the cursor too (the engine hands one only to a run that exists, so
        this never starts a W&B run for records it does not take)."""
        self._flush_row()
        if self.handled > self.committed:
            self._start().summary[TAIL_KEY] = self.handled
            self.committed = self.handled

    def _report(self) -> None:
        for what, n in self.unshown.items():
            self.notes.add(f"wandb: {n} {what} of {self.run.key} rank {self.rank.rank} not "
                           "shown in the history")
