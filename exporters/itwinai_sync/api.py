"""The exporter plugin interface.

A target (MLflow, W&B, TensorBoard, Prov4ML) is one module with one `Exporter` subclass,
registered under the entry-point group `itwinai_sync.exporters`. The sync engine does all the
target-independent work (finding runs, streaming records in seq order, filtering by kind and
route, batching, locks, the local ledger, progress, error isolation); an exporter only says how
one rank of one run is written:

    sink = exporter.open(run, rank, create=True)   # find or create the target run
    sink.cursor()                                  # highest seq the target already holds
    sink.export(batch, cursor)                     # write records, commit cursor with them
    sink.close()

The interface has no command line in it: a target declares its options as data
(`TargetOption`), which the `itwinai-sync` command turns into its own options, and receives
only its own options' values.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa

from itwinai_journal import RankInfo, RunInfo
from itwinai_journal.errors import ItwinaiSyncError, UsageError
from itwinai_journal.format.blobs import BlobStore
from itwinai_journal.format.fsio import fsync_dir, read_json, write_atomic
from itwinai_journal.format.names import experiment_dirname

ENTRY_POINT_GROUP = "itwinai_sync.exporters"
#: Directory, inside a target directory, of the per-journal sync locks.
LOCK_DIR = ".itwinai-sync-locks"
#: File naming the journal a target run directory belongs to.
JOURNAL_MARKER = ".itwinai-journal.json"


class ExportError(ItwinaiSyncError):
    """A problem exporting one run, reported in one line and isolated to that run."""


class TargetChanged(ItwinaiSyncError):
    """The target run a sink was writing to is no longer the one the target keeps for this
    journal rank (a concurrent sync of a copy of the journal converged on another one). The
    engine opens the rank again and continues from the kept run's cursor."""


class UnknownTarget(UsageError):
    """No exporter is registered under the name asked for."""


class TargetUnavailable(ItwinaiSyncError):
    """A target that cannot work here: its tracker library is missing, or not a version it
    drives."""


class OptionError(UsageError):
    """Target options that do not fit the targets chosen (see `TargetOption`)."""


@dataclass(frozen=True)
class TargetOption:
    """One option of a target, as data: the `itwinai-sync sync` command offers it as `flag`,
    and the target's `options` hold its value under `key` (None, or `default`, when it is not
    given). Options belong to the targets that declare them: a flag given on the command line
    goes to the chosen targets that declare it, it is an error when none of them does, and
    when targets that declare it differently (another meaning) would share it."""

    flag: str  # "--tracking-uri"
    help: str
    #: The key in the target's options (default: the flag without dashes, "_" for "-").
    key: str = ""
    #: "dir" and "file" are paths (a directory, a file), given to the target as `Path`.
    type: Literal["text", "int", "float", "dir", "file"] = "text"
    choices: tuple[str, ...] | None = None
    default: Any = None
    metavar: str | None = None
    #: Accepted but not listed by `--help` (kept for older command lines).
    hidden: bool = False

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.flag.lstrip("-").replace("-", "_"))


@dataclass
class Notes:
    """What an exporter wants the user to know (name mappings, dropped records, fallbacks),
    collected per sync and printed in the summary, each distinct line once."""

    lines: list[str] = field(default_factory=list)
    #: Notes come from the threads exporting ranks and runs at once.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, line: str) -> None:
        with self._lock:
            if line not in self.lines:
                self.lines.append(line)


class RankSink(ABC):
    """One rank of one journal run as it exists in a target."""

    def __init__(self, run: RunInfo, rank: RankInfo, notes: Notes):
        self.run = run
        self.rank = rank
        self.notes = notes
        #: The rank's payloads, as the reader hands them.
        self.blobs = rank.blobs
        #: The records of this rank with seq in (after, upto] that this target takes, in seq
        #: order, as the engine selects them: for a sink that rebuilds what it wrote earlier
        #: (MLflow's mapping of journal names to keys) without reading the journal itself.
        #: Set by the engine when it opens the sink.
        self.taken: Callable[[int, int], Iterator[pa.Table]] = _not_from_the_engine

    @abstractmethod
    def cursor(self) -> int:
        """The highest journal seq this target run holds (0 for none), read from the target."""

    @abstractmethod
    def export(self, batch: pa.Table, cursor: int) -> None:
        """Write `batch` (records with seq above the previous cursor, in seq order; possibly
        empty) and record `cursor` in the target in the same commit wherever the target allows,
        so that a crash leaves either both or neither."""

    def close(self) -> None:
        """Release target resources for this rank."""


def _not_from_the_engine(after: int, upto: int) -> Iterator[pa.Table]:
    raise RuntimeError("RankSink.taken is set by the sync engine, which opened no such sink")


class Exporter(ABC):
    """A sync target type. One instance per sync invocation, shared by worker threads."""

    #: The `--to` name, also the destination name loggers declare.
    name: ClassVar[str]
    #: Kinds this target shows; records of other kinds are skipped and counted.
    kinds: ClassVar[frozenset[str]]
    #: Largest number of records handed to `RankSink.export` at once.
    batch_records: ClassVar[int] = 10_000
    #: Whether several runs may be exported at once in threads of one process.
    parallel_runs: ClassVar[bool] = True
    #: For a target that takes `text` records only when they hold an object logged as another
    #: kind (meta['logged_as']): those kinds. None: every text record of a taken kind.
    texts_logged_as: ClassVar[frozenset[str] | None] = None
    #: Whether the ranks of one run may be exported at once in threads of one process (each
    #: rank by one thread; the exporter makes what ranks share, such as a parent run, safe).
    parallel_ranks: ClassVar[bool] = False

    #: This target's options (e.g. --tracking-uri), which the `sync` command offers.
    cli_options: ClassVar[tuple[TargetOption, ...]] = ()

    def __init__(self, savedir: Path, options: dict[str, Any], notes: Notes):
        self.savedir = savedir
        #: The values of this target's own options only (see `own_options`).
        self.options = options
        self.notes = notes

    @abstractmethod
    def target_key(self, run: RunInfo) -> str:
        """Identifies the target instance this run goes to (type + URI/project/logdir); used
        for locks and the ledger."""

    @abstractmethod
    def open(self, run: RunInfo, rank: RankInfo, create: bool) -> RankSink | None:
        """The sink for one rank; None when `create` is False and the target has nothing."""

    def describe(self, run: RunInfo) -> str:
        """Where the run goes, for messages (defaults to the target key)."""
        return self.target_key(run)

    def connect(self, run: RunInfo) -> None:
        """Reach the target of `run` (raise ExportError, one line, when it cannot be reached),
        before any rank is exported."""

    def lock_dir(self, run: RunInfo) -> Path | None:
        """Directory at the target holding the per-journal sync locks, so that every sync
        writing there excludes the others, whichever copy of the savedir it reads; None for
        a target without a directory of its own (the lock is then in the savedir)."""
        return None

    def forget_unreachable(self) -> None:
        """Forget that a target could not be reached, so that it is tried again."""

    def close(self) -> None:
        """Release resources held for the whole sync."""


class DirectoryExporter(Exporter):
    """A target that is a directory tree of its own (TensorBoard's logdir, Prov4ML's
    provenance directory): each journal run in `<root>/<experiment>/<run_id>`, claimed for its
    journal (`claim_journal_dir`), and the sync locks in `<root>/.itwinai-sync-locks`, so that
    every sync writing there excludes the others whichever copy of the savedir it reads."""

    #: The directory tree, set by the subclass's constructor.
    root: Path

    def target_key(self, run: RunInfo) -> str:
        return f"{self.name}:{self.root}"

    def lock_dir(self, run: RunInfo) -> Path:
        return self.root / LOCK_DIR

    def experiment_dir(self, run: RunInfo) -> Path:
        return self.root / experiment_dirname(run.experiment)

    def journal_dir(self, run: RunInfo) -> Path | None:
        """The run's directory claimed for this journal, None when there is none yet."""
        return find_journal_dir(self.experiment_dir(run), run.run_id, run)

    def claim_run_dir(self, run: RunInfo) -> Path:
        """The run's directory, claimed for this journal now if it is not yet."""
        return claim_journal_dir(self.experiment_dir(run), run.run_id, run, self.notes,
                                 self.name)

    def run_dir(self, run: RunInfo) -> Path:
        """The journal's directory, or where it will be when it has none yet."""
        return self.journal_dir(run) or self.experiment_dir(run) / run.run_id

    def describe(self, run: RunInfo) -> str:
        return str(self.run_dir(run))


def find_journal_dir(parent: Path, name: str, run: RunInfo) -> Path | None:
    """The directory below `parent` that holds `run`'s export: `name`, or
    `name.journal-<id>` when `name` belongs to another journal with the same experiment and
    run id; None when there is none yet. A directory belongs to the journal its marker names."""
    for candidate in _journal_dir_names(name, run):
        if _marker_id(parent / candidate) == run.journal_id:
            return parent / candidate
    return None


def claim_journal_dir(parent: Path, name: str, run: RunInfo, notes: Notes, what: str) -> Path:
    """`run`'s directory below `parent`, created if needed. A directory is claimed by renaming
    a temporary one holding the marker onto its name, which fails when it exists and is not
    empty: so two journals (synced by two processes) never share one, and a second journal
    with the same experiment and run id gets `name.journal-<first 8 digits of its id>`."""
    found = find_journal_dir(parent, name, run)
    if found is not None:
        return found
    parent.mkdir(parents=True, exist_ok=True)
    for candidate in _journal_dir_names(name, run):
        path = parent / candidate
        if not path.exists() or not any(path.iterdir()):
            tmp = parent / f".claim-{candidate}-{secrets.token_hex(4)}"
            tmp.mkdir()
            marker = {"journal_id": run.journal_id, "run": run.key}
            write_atomic(tmp / JOURNAL_MARKER, (json.dumps(marker) + "\n").encode())
            try:
                os.rename(tmp, path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                fsync_dir(parent)
        if _marker_id(path) == run.journal_id:
            if candidate != name:
                notes.add(f"{what}: {parent / name} belongs to another journal of {run.key}; "
                          f"this one ({run.path}) is exported to {path}")
            return path
    raise ExportError(f"{what}: {parent / name} and {path} belong to other journals of "
                      f"{run.key}")


def _journal_dir_names(name: str, run: RunInfo) -> tuple[str, str]:
    return name, f"{name}.journal-{run.journal_id[:8]}"


def _marker_id(path: Path) -> str | None:
    try:
        marker = read_json(path / JOURNAL_MARKER)
    except (OSError, ValueError):
        return None
    return marker.get("journal_id") if isinstance(marker, dict) else None


def param_str(value: Any, meta: str | dict[str, Any] | None) -> str:
    """A param as the `str()` itwinai's MLflow, TensorBoard and Prov4ML loggers hand their
    tracker: the journal keeps the JSON of the value and, when the logged object's own str()
    differs from that of its JSON (a tuple, a numpy number, a Path), that str() in
    meta['str']."""
    given = (meta if isinstance(meta, dict) else meta_of(meta)).get("str")
    return given if isinstance(given, str) else str(value)


#: Range of the int64 steps of MLflow and TensorBoard.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def meta_of(meta: str | None) -> dict[str, Any]:
    """A record's meta as a dict ({} when it has none, or when it is not a JSON object)."""
    if not meta:
        return {}
    try:
        d = json.loads(meta)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def int64_step(exact: Any) -> int | None:
    """A step the journal's int64 column could not hold (kept in meta['step']: 1.5, 2**70,
    '3') as a tracker with int64 steps takes it: `int()` of it, as torch's SummaryWriter sets
    `event.step = int(global_step)` (1.5 -> 1, '3' -> 3, -2.7 -> -2), clamped to the int64
    range (2**70 -> 2**63 - 1, where SummaryWriter and MLflow refuse it). None when `int()`
    refuses the value (NaN, a list): the tracker's place for a record without a step."""
    if isinstance(exact, bool):
        return int(exact)
    try:
        number = int(exact)
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(number, INT64_MIN), INT64_MAX)


def logged_value(text: str | None, blob: str | None, blobs: BlobStore) -> Any:
    """The value of a `text` record that holds the JSON of an object logged as another kind
    (meta['logged_as']: a metric that is not a number, an object W&B takes as it is)."""
    body = text if text is not None else blobs.read(blob or "").decode()
    return json.loads(body)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@lru_cache(maxsize=8)
def _registered(path: tuple[str, ...]) -> dict[str, metadata.EntryPoint]:
    """The exporters' entry points found on `path`. Scanning every installed distribution
    takes about 10 ms, and one `sync` asks for each target to build its options: one scan per
    `sys.path` (what decides which distributions are seen) instead of one per question."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def exporter_names() -> list[str]:
    return sorted(_registered(tuple(sys.path)))


def load_exporter(name: str) -> type[Exporter]:
    """The exporter class registered as `name`. Exporter modules import their tracker library
    lazily (in methods), so loading a class is cheap and `--help` works without the library."""
    eps = _registered(tuple(sys.path))
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise UnknownTarget(f"unknown target {name!r} (available: {known})")
    try:
        cls = eps[name].load()
    except ImportError as e:
        raise TargetUnavailable(
            f"the {name} exporter needs its library: pip install 'itwinai-sync[{name}]' ({e})"
        ) from e
    declared = cls.cli_options
    if not (isinstance(declared, (tuple, list))
            and all(isinstance(o, TargetOption) for o in declared)):
        # A plugin written for the click-based interface of earlier versions (a classmethod
        # returning click options): unusable, but it must not break the other targets.
        raise TargetUnavailable(f"the {name} exporter declares its options in a form this "
                                "version does not read: cli_options must be a tuple of "
                                "itwinai_sync.api.TargetOption")
    return cls


def own_options(exporter: type[Exporter], given: dict[str, Any]) -> dict[str, Any]:
    """The options an exporter is created with: each option it declares, with its value from
    `given` (keys of its own options) or its default. A key it does not declare is an error,
    not ignored: a value meant for another target, or a misspelt one."""
    values = {option.key: option.default for option in exporter.cli_options}
    unknown = sorted(set(given) - set(values))
    if unknown:
        raise OptionError(f"{exporter.name} has no option {', '.join(unknown)} (its options: "
                          f"{', '.join(values) or 'none'})")
    return {**values, **given}


@contextmanager
def scoped_env(values: dict[str, str], restore: tuple[str, ...] = ()) -> Iterator[None]:
    """Set `values` in os.environ, and afterwards put back these and the `restore` variables:
    tracker libraries read their settings from the environment, and some set variables as a
    side effect (mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI), which would redirect later
    exports in the same process."""
    saved = {k: os.environ.get(k) for k in (*values, *restore)}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
