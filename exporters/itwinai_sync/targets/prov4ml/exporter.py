"""The Prov4ML exporter, and the sink that holds one rank's records until it commits them as
new documents (see the package docstring)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_sync import compat
from itwinai_sync.api import (
    DirectoryExporter,
    ExportError,
    Notes,
    RankSink,
    TargetOption,
    TargetUnavailable,
)

from .. import system_metrics
from . import layout
from .build import Job, Settings, build_rank
from .naming import prov_name

#: Defaults of Prov4MLLogger, used for runs that did not declare a prov4ml destination.
DEFAULTS = {"prov_user_namespace": "www.example.org", "save_after_n_logs": 100,
            "create_graph": True, "create_svg": True}


class Prov4mlExporter(DirectoryExporter):
    name = "prov4ml"
    kinds = frozenset({"metric", "param", "flops_pb", "flops_pe", "system", "carbon",
                       "execution_time", "model", "best_model", "torch", "artifact",
                       "prov_documents", "text", system_metrics.KIND})
    #: Metrics that are not numbers, which yprov4ml takes as they are (other texts are not
    #: for this target: itwinai's Prov4MLLogger has no text kind).
    texts_logged_as = frozenset({"metric"})
    #: The batches are held until the documents are built (once per rank and sync): few, large.
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
        version = compat.yprov4ml_version()
        if not version.startswith(compat.SUPPORTED_YPROV4ML) and version != "unknown":
            raise TargetUnavailable(
                f"the prov4ml exporter drives yprov4ml {compat.SUPPORTED_YPROV4ML}x; {version} is "
                "installed, whose API and documents differ (2.x takes contexts as its Context "
                "enum, has no run index or timestamp arguments, writes another document "
                "layout): pip install --no-deps -r requirements-prov4ml-nodeps.txt")

    cli_options = (
        TargetOption("--dir", key="prov_dir", type="dir", metavar="DIR",
                     help="Prov4ML provenance directory (default: SAVEDIR/prov)."),
    )

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
        found = self.journal_dir(run)
        path = found / layout.rank_dir_name(rank.rank) if found is not None else None
        if not create and (path is None or layout.committed_documents(path) is None):
            return None
        return Prov4mlSink(self, run, rank, path, create)


class Prov4mlSink(RankSink):
    """One rank's documents. The batches the engine hands over are held until a commit, which
    builds the documents from the records the committed ones cover (kept beside them, see
    `layout`) and those batches: the journal itself is never read again."""

    def __init__(self, exporter: Prov4mlExporter, run: RunInfo, rank: RankInfo,
                 path: Path | None, create: bool):
        super().__init__(run, rank, exporter.notes)
        self.exporter = exporter
        #: The rank's directory; None until the run's directory is claimed for this journal
        #: by the first build.
        self.path = path
        if create and path is not None:  # the engine holds the journal's lock: leftovers
            layout.recover(path)         # are no one's any more
        self._committed = self.cursor()
        self._pending = self._committed
        #: Batches taken since the last commit.
        self._batches: list[pa.Table] = []
        self._failed = False

    def _folder(self) -> Path | None:
        return layout.committed_folder(self.path) if self.path is not None else None

    def cursor(self) -> int:
        return layout.committed_cursor(self._folder())

    def export(self, batch: pa.Table, cursor: int) -> None:
        if cursor < self._pending:
            raise ExportError(f"{self.rank.path}: cursor {cursor} goes back from "
                              f"{self._pending}")
        if batch.num_rows:
            self._batches.append(batch)
        self._pending = cursor
        if self.rank.status != "running" and cursor >= self.rank.last_seq:
            self._commit()  # the rank's last batch: commit with it

    def close(self) -> None:
        if self._pending > self._committed and not self._failed:
            self._commit()

    def _commit(self) -> None:
        cursor = self._pending
        try:
            folder = self._folder()
            held = [layout.read_held(folder)] if self._committed and folder is not None else []
            # Never empty: the engine hands a first batch only when it has a record for this
            # target, and a later one only once the documents hold records.
            records = pa.concat_tables([*held, *self._batches], promote_options="default")
            if self.path is None:
                self.path = self.exporter.claim_run_dir(self.run) / layout.rank_dir_name(
                    self.rank.rank)
            build_rank(Job(self.run, self.rank, self.path,
                           self.exporter.settings(self.run, self.rank), self.notes, records,
                           cursor))
        except BaseException:
            self._failed = True
            raise
        self._committed = cursor
        self._batches = []
