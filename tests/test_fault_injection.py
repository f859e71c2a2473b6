"""Fault injection: prove the durability and exactly-once guarantees with real processes.

* SIGKILL of a logging process at random moments: the journal stays readable and verifiable,
  seq is contiguous, values are what was logged, and every record logged more than
  `flush_interval` (plus a margin) before the kill is there. Half of the trials resume the same
  run id, so seq must continue across killed sessions.
* Crash points inside the writer (an `os._exit` at a precise step: a deterministic SIGKILL).
* SIGKILL of `python -m itwinai_sync.cli` over and over during one large export (MLflow server,
  embedded MLflow sqlite store, TensorBoard), then a complete run: the target holds every point
  exactly once.
* Two syncs at once; a corrupted segment; a job resumed after SIGTERM; steps going backwards.

Kill points are chosen by record progress (random targets spread over the export, read from the
sync ledger or the event file names, plus a random delay) and by random delays; every assertion
holds wherever the kill lands, and none is about how long anything took (the one time-based
check is the durability promise itself: what was logged flush_interval + 0.5 s before the kill
is on disk). Each test prints a
summary line (visible with `pytest -s`). `--slow` runs more trials and more journals. The random
choices are seeded: set FAULT_INJECTION_SEED to replay or vary them.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import child_env, spawn
from mlflow_server import MlflowServer, hermetic_mlflow_env
from test_mlflow_export import assert_histories_equal_journal, runs_by_role
from test_tensorboard_export import (
    accumulate,
    assert_complete,
    assert_scalars_exact,
    rank_dir,
    session_hparams,
)

from itwinai_journal import Journal, verify
from itwinai_journal.format.names import experiment_dirname
from itwinai_journal.loggers import MLFlowLogger
from itwinai_sync.api import Notes
from itwinai_sync.cli import main
from itwinai_sync.engine import target_lock
from itwinai_sync.ledger import Ledger
from itwinai_sync.targets.mlflow import mlflow_key
from itwinai_sync.targets.tensorboard import EVENTS_RE, TensorBoardExporter

mlflow = pytest.importorskip("mlflow")
MlflowClient = mlflow.MlflowClient

SEED = int(os.environ.get("FAULT_INJECTION_SEED", "20240611"))
FLUSH_INTERVAL = 0.2
#: A record printed as logged this long before the kill must have survived it.
DURABLE_AFTER = FLUSH_INTERVAL + 0.5

#: verify() warnings that describe a crash-consistent state, not damage: a SIGKILL between the
#: rename of a sealed segment and its index line, and a SIGKILL while a rank is being opened
#: (before its manifest exists). The next session repairs both; the trials count them.
CRASH_STATE_WARNINGS = ("not yet in the index", "no manifest yet")


def report(name: str, **figures: object) -> None:
    """One summary line per test, visible with `pytest -s`."""
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[fault-injection] {name}: {text} (seed {SEED})")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    """Run ids and world size must not leak in from the environment the tests run in."""
    for var in ("ITWINAI_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID",
                "WORLD_SIZE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts (each in its own process group); whatever is still running at
    the end of the test is killed, group and all."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("fault-mlflow-server")) as srv:
        yield srv


# -- processes --------------------------------------------------------------------------------


def sync_env() -> dict[str, str]:
    return hermetic_mlflow_env(child_env())


def sync_command(savedir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "itwinai_sync.cli", str(savedir), *args]


def start(cmd: list[str], procs: list, env: dict[str, str] | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or sync_env(), start_new_session=True)
    procs.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """Wait for a process to exit by itself; kill its group if it does not in `timeout`."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"{proc.args} did not finish in {timeout} s\n{out}\n{err}") from None


def run_to_end(cmd: list[str], procs: list, timeout: float = 600) -> str:
    proc = start(cmd, procs)
    out, err = finish(proc, timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out


def sleep_unless_exited(proc: subprocess.Popen, seconds: float) -> None:
    try:
        proc.wait(timeout=max(seconds, 0.0))
    except subprocess.TimeoutExpired:
        pass


def sigkill(proc: subprocess.Popen) -> bool:
    """SIGKILL the process group if the process still runs; True if it was killed."""
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the pid is still ours
    return True


def cli(*args: str) -> tuple[int, str]:
    """`itwinai-sync ARGS` in this process."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def sync_ok(savedir: Path, *args: str) -> str:
    code, out = cli(savedir, *args)
    assert code == 0 and "FAILED" not in out, out
    return out


# -- journals ---------------------------------------------------------------------------------


def loss_value(rank: int, step: int) -> float:
    return 1.0 / (step + 1) + rank


def write_journal(savedir: Path, experiment: str, run_id: str, steps: int, ranks=(0,),
                  seal: int = 1000) -> None:
    """A finished run: per step a `loss`, every 10 steps a `val/acc`, a few params at the start
    and one more every 3000 steps; sealed in segments of about `seal` records, so an export
    commits (and a kill can land) at many points."""
    for rank in ranks:
        lg = MLFlowLogger(savedir=savedir, experiment_name=experiment, run_name=f"{run_id} run",
                          log_freq="batch", log_on_workers=-1, run_id=run_id)
        lg.create_logger_context(rank=rank)
        lg._writer.seal_records = seal
        lg.save_hyperparameters({"lr": 0.001, "layers": [8, 4], "opt": "adam"})
        for i in range(steps):
            lg.log(loss_value(rank, i), "loss", step=i, batch_idx=i)
            if i % 10 == 0:
                lg.log(i / 7 + rank, "val/acc", step=i)
            if i % 3000 == 2999:
                lg.save_hyperparameters({f"phase_{i // 3000}": i})
            if i % seal == seal - 1:
                lg._writer.flush()
        lg.destroy_logger_context()


def journal_params(savedir: Path, run_id: str, rank: int) -> dict[str, object]:
    """Each param's logged value (first one wins, as in MLflow), decoded from its JSON."""
    out: dict[str, object] = {}
    for r in Journal(savedir).records(run_id=run_id, rank=rank, kinds=["param"]).to_pylist():
        out.setdefault(r["name"], json.loads(r["text"]))
    return out


def last_seqs(savedir: Path, run_id: str) -> dict[int, int]:
    run = Journal(savedir).run(run_id)
    return {r.rank: r.last_seq for r in run.ranks}


# -- target state -----------------------------------------------------------------------------


def ledger_progress(savedir: Path, experiment: str, run_id: str) -> int:
    """Records the sync ledger says are exported (all ranks): cheap to poll, never ahead of
    the target (the ledger is written after each commit)."""
    done = 0
    for path in (savedir / ".sync").glob("*/*.json"):  # one file per target and journal
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("run") == f"{experiment}/{run_id}":
            done += sum(entry.get("cursors", {}).values())
    return done


def mlflow_runs_of(client, experiment: str, run_id: str) -> list:
    key = f"{experiment}/{run_id}"
    return [r for rs in runs_by_role(client, experiment).values() for r in rs
            if r.data.tags.get("itwinai.run") == key]


def mlflow_cursor(client, experiment: str, run_id: str) -> int:
    """The cursors committed in MLflow (child run tags), summed over ranks."""
    return sum(int(r.data.tags.get("itwinai.cursor", 0))
               for r in mlflow_runs_of(client, experiment, run_id)
               if r.data.tags.get("itwinai.role") == "rank")


def tb_progress(run_dir: Path) -> int:
    """The cursors committed in TensorBoard (complete event file names), summed over ranks."""
    done = 0
    for path in run_dir.glob("rank-*"):
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            continue
        done += max((int(m.group(2)) for m in map(EVENTS_RE.match, names) if m), default=0)
    return done


def check_mlflow_exact(client, savedir: Path, experiment: str, run_id: str) -> dict[str, int]:
    """The MLflow side of a journal run is exactly the journal: one parent and one child per
    rank, every metric point once (value, step, ms timestamp), params, and each child's cursor
    at the rank's last seq. Returns the figures (records checked, duplicates, losses)."""
    runs = mlflow_runs_of(client, experiment, run_id)
    seqs = last_seqs(savedir, run_id)
    roles = Counter((r.data.tags.get("itwinai.role"), r.data.tags.get("itwinai.rank"))
                    for r in runs)
    journal = Journal(savedir).metrics(run_id=run_id).to_pylist()
    expected = Counter((m["rank"], mlflow_key(m["name"]), m["step"] or 0,
                        int(round(m["time"] * 1000)), m["value"]) for m in journal)
    got: Counter = Counter()
    children = {int(r.data.tags["itwinai.rank"]): r for r in runs
                if r.data.tags.get("itwinai.role") == "rank"}
    for rank, child in children.items():
        for key in {k for (rk, k, *_) in expected if rk == rank} | set(child.data.metrics):
            for h in client.get_metric_history(child.info.run_id, key):
                got[(rank, key, h.step, h.timestamp, h.value)] += 1
    figures = {"records_checked": len(journal),
               "duplicates": sum((got - expected).values()),
               "losses": sum((expected - got).values())}
    parents = {("parent", None): 1} if len(seqs) > 1 else {}  # one rank: one MLflow run
    assert roles == Counter({**parents, **{("rank", str(r)): 1 for r in seqs}}), roles
    assert figures["duplicates"] == 0 and figures["losses"] == 0, figures
    assert_histories_equal_journal(client, savedir, run_id=run_id, experiment=experiment)
    for rank, child in children.items():
        assert int(child.data.tags["itwinai.cursor"]) == seqs[rank]
        params = {k: str(v) for k, v in journal_params(savedir, run_id, rank).items()}
        assert child.data.params == params
    return figures


def tb_expected_hparams(savedir: Path, run_id: str, rank: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in journal_params(savedir, run_id, rank).items():
        if isinstance(value, bool) or isinstance(value, str):
            out[name] = value
        elif isinstance(value, (int, float)):
            out[name] = float(value)
        else:
            out[name] = json.dumps(value)
    return out


def check_tensorboard_exact(savedir: Path, run_id: str, logdir: Path | None = None
                            ) -> dict[str, int]:
    """Every rank's TensorBoard directory is exactly the journal: each scalar once, in order,
    with step, wall time and value; files tiling the seq range; hparams as logged."""
    figures = Counter()
    for rank in last_seqs(savedir, run_id):
        path = rank_dir(savedir, run_id, rank, logdir=logdir)
        acc = accumulate(path)
        journal = Counter(Journal(savedir).metrics(run_id=run_id, rank=rank)["name"]
                          .to_pylist())
        tags = acc.Tags()["scalars"]
        got = Counter({t: len(acc.Scalars(t)) for t in tags})
        figures["records_checked"] += sum(journal.values())
        figures["duplicates"] += sum((got - journal).values())
        figures["losses"] += sum((journal - got).values())
        assert assert_scalars_exact(acc, savedir, run_id, rank) == sum(journal.values())
        assert_complete(path, savedir, run_id, rank)
        hparams = tb_expected_hparams(savedir, run_id, rank)
        if hparams:
            assert session_hparams(acc) == hparams
    return dict(figures)


# == 1a. SIGKILL while logging ==================================================================

LOGGING_CHILD = """
import time
from itwinai_journal.loggers import MLFlowLogger

lg = MLFlowLogger(savedir={savedir!r}, experiment_name="fi", run_id={run_id!r},
                  log_on_workers=-1, flush_interval={flush})
lg.create_logger_context()
lg._writer.seal_records = {seal}
print(f"ready {{lg._writer.last_seq}} at {{time.time()!r}}", flush=True)
step = {start}
while True:
    for _ in range(1000):
        lg.log((step * 7919 % 10007) / 64.0 - 3.5, "loss", step=step)
        step += 1
    print(f"logged {{step}} at {{time.time()!r}}", flush=True)
    time.sleep(0.015)
"""

PROGRESS_RE = re.compile(r"^(ready|logged) (\d+) at (\S+)$")


def expected_logged_values(steps: np.ndarray) -> np.ndarray:
    return (steps * 7919 % 10007) / 64.0 - 3.5


def classify(problems) -> tuple[list, int]:
    """verify() errors (there must be none), and how many crash-state warnings were seen."""
    known = [p for p in problems if p.severity == "warning"
             and any(k in p.message for k in CRASH_STATE_WARNINGS)]
    return [p for p in problems if p.severity == "error"], len(known)


@dataclass
class LoggingTotals:
    trials: int = 0
    resumed_trials: int = 0
    records_checked: int = 0
    guaranteed: int = 0
    recovered_beyond_guarantee: int = 0
    losses: int = 0
    duplicates: int = 0
    torn_tails: int = 0
    known_crash_states: int = 0
    sessions_killed_before_first_flush: int = 0


def check_killed_run(savedir: Path, run_id: str, start: int, kill_time: float,
                     lines: list[tuple[str, int, float]], totals: LoggingTotals) -> int:
    """Check one run after its logging process was killed; returns its record count."""
    runs = [r for r in Journal(savedir).runs() if r.run_id == run_id]
    if runs:
        table = Journal(savedir).metrics(run_id=run_id)
        seq = table["seq"].to_numpy()
        steps = table["step"].to_numpy()
        values = table["value"].to_numpy()
    else:  # killed before the run directory existed
        seq = steps = np.zeros(0, np.int64)
        values = np.zeros(0)
    n = len(seq)
    logged = [(count, t) for what, count, t in lines if what == "logged"]
    guaranteed = max((c for c, t in logged if t < kill_time - DURABLE_AFTER), default=start)
    last_printed = max((c for c, _ in logged), default=start)
    totals.records_checked += n
    totals.guaranteed += guaranteed - start
    totals.recovered_beyond_guarantee += max(0, n - guaranteed)
    totals.losses += max(0, guaranteed - n)
    totals.duplicates += n - len(np.unique(steps))
    if n == start:
        totals.sessions_killed_before_first_flush += 1

    assert np.array_equal(seq, np.arange(1, n + 1)), "seq is not contiguous from 1"
    assert np.array_equal(steps, seq - 1), "a step is missing, repeated or out of order"
    assert np.array_equal(values, expected_logged_values(steps)), "a value differs"
    assert n >= start, f"{run_id}: records of an earlier session were lost ({n} < {start})"
    assert n >= guaranteed, (
        f"{run_id}: records logged more than {DURABLE_AFTER} s before the kill are missing: "
        f"steps {n}..{guaranteed - 1}")
    assert n <= last_printed + 1000, f"{run_id}: more records than were logged"
    ready = [c for what, c, _ in lines if what == "ready"]
    if ready:  # the new session continued seq right after what the journal held
        assert ready == [start], (ready, start)
    if runs:
        (rank,) = runs[0].ranks
        sessions = rank.manifest.get("sessions", [])
        firsts = [s["first_seq"] for s in sessions]
        assert firsts == sorted(firsts) and all(f <= n + 1 for f in firsts), firsts
        if ready:
            assert firsts[-1] == start + 1
    return n


class ProgressReader(threading.Thread):
    """Collects a logging child's progress lines while it runs; `ready` is set once it
    started logging (or its output ended)."""

    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[tuple[str, int, float]] = []
        self.ready = threading.Event()

    def run(self) -> None:
        for line in self.stream:
            m = PROGRESS_RE.match(line.strip())
            if m:
                self.lines.append((m.group(1), int(m.group(2)), float(m.group(3))))
                self.ready.set()
        self.ready.set()


def run_logging_trials(savedir: Path, procs: list, trials: int, max_delay: float,
                       rng: random.Random) -> LoggingTotals:
    """Odd trials resume a run (continuing its steps; a new resumed run every 20 trials),
    even ones start a fresh run. Most kills land a random time after the child started
    logging; every fifth lands a random time after it was started (imports, opening the rank,
    recovering a killed session, the first batches)."""
    totals = LoggingTotals()
    resumed: dict[str, int] = {}  # records each resumed run holds
    for k in range(trials):
        resume = k % 2 == 1
        run_id = f"resumed-{k // 20}" if resume else f"fresh-{k:03d}"
        start_step = resumed.setdefault(run_id, 0) if resume else 0
        seal = rng.choice([2_000, 20_000, 100_000])
        proc = spawn(LOGGING_CHILD.format(savedir=str(savedir), run_id=run_id, start=start_step,
                                          seal=seal, flush=FLUSH_INTERVAL))
        procs.append(proc)
        reader = ProgressReader(proc.stdout)
        reader.start()
        if k % 5 == 3:
            delay = rng.uniform(0.05, 1.5)
        else:
            delay = rng.uniform(0.0, max_delay)
            assert reader.ready.wait(timeout=120), "the logging child never started logging"
        sleep_unless_exited(proc, delay)
        kill_time = time.time()
        killed = sigkill(proc)
        proc.wait(timeout=60)
        reader.join(timeout=60)
        assert killed, f"the logging child exited by itself: {proc.stderr.read()}"
        n = check_killed_run(savedir, run_id, start_step, kill_time, reader.lines, totals)
        if resume:
            resumed[run_id] = n
            totals.resumed_trials += 1
        totals.trials += 1
        run_path = savedir / "fi" / run_id
        if run_path.exists():
            problems = verify(run_path)
            real, known = classify(problems)
            assert real == [], real
            totals.known_crash_states += known
            totals.torn_tails += sum("torn" in p.message for p in problems)
    real, _ = classify(verify(savedir))
    assert real == [], real
    # One more session on each resumed run, ended normally: it repairs what the kills left.
    for run_id, n in resumed.items():
        lg = MLFlowLogger(savedir=savedir, experiment_name="fi", run_id=run_id,
                          log_on_workers=-1)
        lg.create_logger_context()
        for step in range(n, n + 10):
            lg.log((step * 7919 % 10007) / 64.0 - 3.5, "loss", step=step)
        lg.destroy_logger_context()
        m = Journal(savedir).metrics(run_id=run_id)
        assert m["seq"].to_pylist() == list(range(1, n + 11))
        assert verify(savedir / "fi" / run_id) == []
    return totals


def test_sigkill_while_logging_keeps_everything_older_than_flush_interval(tmp_path, procs):
    totals = run_logging_trials(tmp_path / "mllogs", procs, 20, 1.5, random.Random(SEED))
    report("SIGKILL while logging", **vars(totals))
    assert totals.losses == 0 and totals.duplicates == 0


@pytest.mark.slow
def test_sigkill_while_logging_many_trials(tmp_path, procs):
    totals = run_logging_trials(tmp_path / "mllogs", procs, 80, 3.0, random.Random(SEED + 1))
    report("SIGKILL while logging (slow)", **vars(totals))
    assert totals.losses == 0 and totals.duplicates == 0


# -- crash points inside the writer ------------------------------------------------------------

CRASH_CHILD = """
import os
from itwinai_journal.format import segments
from itwinai_journal.writer import rank as writer
from itwinai_journal.loggers import MLFlowLogger

def crash(*args, **kwargs):
    os._exit(9)  # as a SIGKILL right here: no handler, no flush, no atexit

point = {point!r}
lg = MLFlowLogger(savedir={savedir!r}, experiment_name="fi", run_id="crash", log_on_workers=-1,
                  flush_interval=30)
if point == "open: before the manifest":
    writer.segments.recover = crash
lg.create_logger_context()
for i in range(500):
    lg.log(i * 0.5, "loss", step=i)
lg._writer.flush()  # 500 records in the active segment: they must survive
for i in range(500, 600):
    lg.log(i * 0.5, "loss", step=i)
if point == "seal: before the index line":
    segments.append_index = crash
elif point == "seal: before the temporary file is renamed":
    keep = os.replace
    segments.os.replace = lambda a, b: crash() if str(b).endswith(".parquet") else keep(a, b)
elif point == "seal: before the active segment is removed":
    keep = os.unlink
    segments.os.unlink = lambda p: crash() if str(p).endswith(".jsonl") else keep(p)
elif point == "close: before the manifest":
    writer.RankWriter._write_manifest = crash
if point.startswith("seal"):
    lg._writer.flush()
    lg._writer._seal_active(reopen=True)
lg.destroy_logger_context()
os._exit(0)
"""

CRASH_POINTS = {
    "open: before the manifest": 0,
    "seal: before the temporary file is renamed": 600,
    "seal: before the index line": 600,
    "seal: before the active segment is removed": 600,
    "close: before the manifest": 600,
}


@pytest.mark.parametrize("point", [
    "open: before the manifest",
    "seal: before the temporary file is renamed",
    "seal: before the index line",
    "seal: before the active segment is removed",
    "close: before the manifest",
])
def test_writer_crash_points(tmp_path, procs, point):
    """A deterministic SIGKILL (os._exit) at one step of opening, sealing or closing: what was
    flushed is readable and exportable at once, a resumed session repairs the rank, continues
    seq and syncs on without duplicates, and verify() reports no error for the state the crash
    left (warnings only)."""
    savedir = tmp_path / "mllogs"
    proc = spawn(CRASH_CHILD.format(point=point, savedir=str(savedir)))
    procs.append(proc)
    _, err = finish(proc, 120)
    assert proc.returncode == 9, err
    kept = CRASH_POINTS[point]
    crash_state = verify(savedir)

    if kept:
        m = Journal(savedir).metrics(run_id="crash")
        assert m["seq"].to_pylist() == list(range(1, kept + 1))
        assert m["value"].to_pylist() == [i * 0.5 for i in range(kept)]
        sync_ok(savedir, "--to", "tensorboard")
        assert check_tensorboard_exact(savedir, "crash")["records_checked"] == kept
    lg = MLFlowLogger(savedir=savedir, experiment_name="fi", run_id="crash", log_on_workers=-1)
    lg.create_logger_context()
    for i in range(kept, kept + 50):
        lg.log(i * 0.5, "loss", step=i)
    lg.destroy_logger_context()
    m = Journal(savedir).metrics(run_id="crash")
    assert m["seq"].to_pylist() == list(range(1, kept + 51))
    assert m["step"].to_pylist() == list(range(kept + 50))
    sync_ok(savedir, "--to", "tensorboard")
    assert check_tensorboard_exact(savedir, "crash")["records_checked"] == kept + 50
    assert verify(savedir) == []
    errors = [str(p) for p in crash_state if p.severity == "error"]
    assert errors == [], errors


# == 1b/1c. SIGKILL of the sync, then complete ===================================================


@dataclass
class KillStats:
    kills: int = 0
    #: killed after it had committed part of the export (the cursor advanced, not to the end)
    kills_mid_export: int = 0
    #: killed before its first commit: start-up, finding or creating the target runs, or
    #: inside its first commit
    kills_before_first_commit: int = 0
    exited_before_kill: int = 0
    cursors: list[int] = field(default_factory=list)


def kill_sync_repeatedly(cmd: list[str], procs: list, *, total: int, kills: int,
                         progress: Callable[[], int], committed: Callable[[], int],
                         rng: random.Random, first_delay: tuple[float, float], jitter: float,
                         poll: float) -> KillStats:
    """Start the sync `kills` times and SIGKILL it each time. The first kill lands a random
    delay (drawn from `first_delay`) after the start, or as soon as 1/`kills` of the export is
    committed if that comes first, so start-up and target-run creation are hit too. The others
    land at random record targets spread over what is left of the export (at least one more
    commit of this process, at most an even share of what is left per remaining kill, so the
    export is not finished early): wait until `progress()` reaches the target, then a random
    delay up to `jitter`, so the kill falls inside the following commits. The committed cursor
    must never go backwards."""
    stats = KillStats(cursors=[committed()])
    for k in range(kills):
        before = stats.cursors[-1]
        proc = start(cmd, procs)
        if k == 0:
            until = time.monotonic() + rng.uniform(*first_delay)
            cap = before + total / kills
            while proc.poll() is None and time.monotonic() < until and progress() < cap:
                time.sleep(poll)
        else:
            room = max(0, int(0.85 * total) - before) / (kills - k)
            target = before + 1 + room * rng.random()
            deadline = time.monotonic() + 600
            while proc.poll() is None and progress() < target:
                assert time.monotonic() < deadline, "the sync made no progress"
                time.sleep(poll)
            sleep_unless_exited(proc, rng.uniform(0, jitter))
        killed = sigkill(proc)
        out, err = finish(proc, 120)
        cursor = committed()
        assert before <= cursor <= total, (stats.cursors, cursor, total)
        stats.cursors.append(cursor)
        if not killed:
            assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
            stats.exited_before_kill += 1
            continue
        stats.kills += 1
        if cursor == before:
            stats.kills_before_first_commit += 1
        elif cursor < total:
            stats.kills_mid_export += 1
    return stats


def kill_figures(stats: KillStats, total: int) -> dict[str, int]:
    return {"kills": stats.kills, "kills_mid_export": stats.kills_mid_export,
            "kills_before_first_commit": stats.kills_before_first_commit,
            "exited_before_kill": stats.exited_before_kill, "journal_records": total}


def mlflow_kill_trial(savedir: Path, procs: list, rng: random.Random, *, uri: str | None,
                      experiment: str, run_id: str, steps: int, ranks=(0,), kills: int = 20
                      ) -> dict[str, int]:
    write_journal(savedir, experiment, run_id, steps, ranks)
    total = sum(last_seqs(savedir, run_id).values())
    db = savedir / "mlflow.db"
    client = MlflowClient(uri or f"sqlite:///{savedir.resolve()}/mlflow.db")
    target = ["--to", "mlflow", *(["--tracking-uri", uri] if uri else [])]

    def committed() -> int:  # never create the embedded store from here: the sync does
        return mlflow_cursor(client, experiment, run_id) if uri or db.exists() else 0

    stats = kill_sync_repeatedly(
        sync_command(savedir, *target), procs, total=total, kills=kills, rng=rng,
        first_delay=(0.5, 4.0), jitter=0.25, poll=0.01, committed=committed,
        progress=lambda: ledger_progress(savedir, experiment, run_id))
    code, out = cli(savedir, *target)  # the final, complete run
    assert code == 0 and "FAILED" not in out, out
    figures = check_mlflow_exact(client, savedir, experiment, run_id)
    assert {r.info.status for r in mlflow_runs_of(client, experiment, run_id)} == {"FINISHED"}
    code, out = cli(savedir, *target)  # and a further run adds nothing
    assert code == 0 and "up-to-date" in out and "exported 0 records" in out, out
    return {**kill_figures(stats, total), **figures}


def test_mlflow_server_sync_killed_20_times_then_exact(tmp_path, procs, mlflow_server):
    figures = mlflow_kill_trial(tmp_path / "mllogs", procs, random.Random(SEED + 2),
                                uri=mlflow_server.uri, experiment="fi-kill-server",
                                run_id="big", steps=27_000)
    report("SIGKILL of sync to an MLflow server", **figures)
    assert figures["kills"] + figures["exited_before_kill"] == 20


def test_mlflow_sqlite_sync_killed_then_exact(tmp_path, procs):
    """The embedded store: the sync process is the database writer, so a kill lands inside
    MLflow's own transactions (the 20-kill version is in the slow tests)."""
    figures = mlflow_kill_trial(tmp_path / "mllogs", procs, random.Random(SEED + 3), uri=None,
                                experiment="fi-kill-sqlite", run_id="big", steps=5_000,
                                kills=3)
    report("SIGKILL of sync to the embedded MLflow sqlite store", **figures)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_mlflow_sync_killed_several_journals(tmp_path, procs, request, store):
    uri = request.getfixturevalue("mlflow_server").uri if store == "server" else None
    rng = random.Random(SEED + 4)
    totals: Counter = Counter()
    for j, (steps, ranks) in enumerate([(27_000, (0,)), (12_000, (0, 1)), (22_000, (0,))]):
        totals.update(mlflow_kill_trial(tmp_path / f"mllogs{j}", procs, rng, uri=uri,
                                        experiment=f"fi-slow-{store}-{j}", run_id=f"j{j}",
                                        steps=steps, ranks=ranks))
    report(f"SIGKILL of sync to MLflow ({store}), 3 journals (slow)", **totals)


def tensorboard_kill_trial(savedir: Path, procs: list, rng: random.Random, *, run_id: str,
                           steps: int, ranks=(0,), kills: int = 20) -> dict[str, int]:
    experiment = "fi-kill-tb"
    write_journal(savedir, experiment, run_id, steps, ranks)
    total = sum(last_seqs(savedir, run_id).values())
    logdir = savedir / "tb"
    run_dir = logdir / experiment_dirname(experiment) / run_id
    target = ["--to", "tensorboard", "--logdir", str(logdir)]
    stats = kill_sync_repeatedly(
        sync_command(savedir, *target), procs, total=total, kills=kills, rng=rng,
        first_delay=(0.3, 1.5), jitter=0.01, poll=0.002,
        progress=lambda: tb_progress(run_dir), committed=lambda: tb_progress(run_dir))
    # Whatever a kill left half-written is a temporary file: the next sync removes it.
    code, out = cli(savedir, *target)
    assert code == 0 and "FAILED" not in out, out
    figures = check_tensorboard_exact(savedir, run_id, logdir)
    files = sorted(p.name for p in run_dir.rglob("*"))
    code, out = cli(savedir, *target)
    assert code == 0 and "up-to-date" in out and "exported 0 records" in out, out
    assert sorted(p.name for p in run_dir.rglob("*")) == files
    return {**kill_figures(stats, total), **figures}


def test_tensorboard_sync_killed_20_times_then_exact(tmp_path, procs):
    figures = tensorboard_kill_trial(tmp_path / "mllogs", procs, random.Random(SEED + 5),
                                     run_id="big", steps=27_000)
    report("SIGKILL of sync to TensorBoard", **figures)
    assert figures["kills"] + figures["exited_before_kill"] == 20


@pytest.mark.slow
def test_tensorboard_sync_killed_several_journals(tmp_path, procs):
    rng = random.Random(SEED + 6)
    totals: Counter = Counter()
    for j, (steps, ranks) in enumerate([(60_000, (0,)), (25_000, (0, 1, 2)), (40_000, (0,))]):
        totals.update(tensorboard_kill_trial(tmp_path / f"mllogs{j}", procs, rng,
                                             run_id=f"j{j}", steps=steps, ranks=ranks))
    report("SIGKILL of sync to TensorBoard, 3 journals (slow)", **totals)


SYNC_CRASH_CHILD = """
import os, sys
{patch}
from itwinai_sync.cli import main
sys.argv = ["itwinai-sync", *{args!r}]
main()
"""

MLFLOW_COMMIT_CRASH = """
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
real_set_tags = SqlAlchemyStore._set_tags
commits = [0]
def set_tags(self, run_id, tags):
    if any(t.key == "itwinai.cursor" for t in tags):
        commits[0] += 1
        if commits[0] == 3:
            os._exit(9)  # batch 3's metrics are committed, its cursor tag is not
    return real_set_tags(self, run_id, tags)
SqlAlchemyStore._set_tags = set_tags
"""


def test_mlflow_sqlite_crash_between_metric_and_cursor_commits(tmp_path, procs):
    """MLflow's SQL store commits a log_batch's params, metrics and tags in separate
    transactions, so a crash can leave a batch's metrics without the cursor tag that covers
    them (exactly this is forced here, with every request sent to MLflow's log_batch, as
    ITWINAI_SYNC_SQLITE_ROWS=0 and any store but sqlite have it: targets/sqlite_rows.py
    commits them together). The re-sync sends them again; the store must still end with each
    point once."""
    savedir = tmp_path / "mllogs"
    experiment, run_id = "fi-commit-crash", "r"
    write_journal(savedir, experiment, run_id, 4000)
    proc = spawn(SYNC_CRASH_CHILD.format(patch=MLFLOW_COMMIT_CRASH,
                                         args=[str(savedir), "--to", "mlflow"]),
                 MLFLOW_DISABLE_TELEMETRY="true", ITWINAI_SYNC_SQLITE_ROWS="0")
    procs.append(proc)
    _, err = finish(proc, 300)
    assert proc.returncode == 9, err
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    cursor = mlflow_cursor(client, experiment, run_id)
    (child,) = [r for r in mlflow_runs_of(client, experiment, run_id)
                if r.data.tags["itwinai.role"] == "rank"]
    stored = sum(len(client.get_metric_history(child.info.run_id, key))
                 for key in child.data.metrics)
    covered = Journal(savedir).metrics(run_id=run_id).filter(pc.field("seq") <= cursor).num_rows
    assert 0 < cursor and stored > covered, (cursor, stored, covered)  # the window was hit
    sync_ok(savedir, "--to", "mlflow")
    figures = check_mlflow_exact(client, savedir, experiment, run_id)
    report("crash between MLflow's metric and cursor commits (sqlite)",
           resent_points=stored - covered, **figures)


TB_HPARAMS_CRASH = """
from itwinai_sync.targets import tensorboard
real_write = tensorboard.TensorBoardSink._write
hparams_writes = [0]
def write(self, name, body):
    if name == tensorboard.HPARAMS_FILE:
        hparams_writes[0] += 1
    elif hparams_writes[0] == 2:
        os._exit(9)  # params merged into the hparams file, their batch's events not written
    real_write(self, name, body)
tensorboard.TensorBoardSink._write = write
"""


def test_tensorboard_crash_between_hparams_and_events(tmp_path, procs):
    """A batch with params rewrites the hparams file before its events file is renamed into
    place; a crash in between (forced here) must not lose or duplicate anything."""
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "fi-hparams-crash", "r", 7000)
    proc = spawn(SYNC_CRASH_CHILD.format(patch=TB_HPARAMS_CRASH,
                                         args=[str(savedir), "--to", "tensorboard"]))
    procs.append(proc)
    _, err = finish(proc, 300)
    assert proc.returncode == 9, err
    path = rank_dir(savedir, "r")
    assert "phase_0" in session_hparams(accumulate(path))  # merged ahead of its events
    cursor = tb_progress(path.parent)
    phase_0 = Journal(savedir).records(run_id="r", kinds=["param"]).to_pylist()[-2]
    assert phase_0["name"] == "phase_0" and cursor < phase_0["seq"], cursor
    sync_ok(savedir, "--to", "tensorboard")
    figures = check_tensorboard_exact(savedir, "r")
    report("crash between the TensorBoard hparams file and its batch's events", **figures)


# == 1d. Concurrent syncs =======================================================================


def statuses_in(out: str, run_key: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines()
            if re.match(r"^(synced|up-to-date|busy|FAILED)\s", line) and f" {run_key} " in line]


@pytest.mark.parametrize("target", ["mlflow", "tensorboard"])
def test_two_syncs_of_one_savedir_at_once(tmp_path, procs, request, target):
    """Started together on the same savedir and target: both succeed, one takes the run (the
    other finds it busy, or up to date if it came later), and the target is exact."""
    rounds = 3 if request.config.getoption("--slow") else 1
    figures: Counter = Counter()
    seen: Counter = Counter()
    for j in range(rounds):
        savedir = tmp_path / f"mllogs{j}"
        experiment, run_id = f"fi-twin-{target}", f"twin{j}"
        write_journal(savedir, experiment, run_id, 2500, ranks=(0, 1))
        if target == "mlflow":
            uri = request.getfixturevalue("mlflow_server").uri
            args = ["--to", "mlflow", "--tracking-uri", uri]
        else:
            args = ["--to", "tensorboard"]
        both = [start(sync_command(savedir, *args), procs) for _ in range(2)]
        outs = [finish(p) for p in both]
        assert [p.returncode for p in both] == [0, 0], outs
        statuses = [s for out, _ in outs for s in statuses_in(out, f"{experiment}/{run_id}")]
        seen.update(statuses)
        assert len(statuses) == 2 and "FAILED" not in statuses, outs
        assert statuses.count("synced") >= 1, outs
        if target == "mlflow":
            figures.update(check_mlflow_exact(MlflowClient(uri), savedir, experiment, run_id))
        else:
            figures.update(check_tensorboard_exact(savedir, run_id))
    report(f"two syncs at once to {target}", rounds=rounds, statuses=dict(seen), **figures)


def two_copies_kill_trial(savedir: Path, copy: Path, procs: list, rng: random.Random, *,
                          target: list[str], rounds: int, committed: Callable[[], int],
                          total: int, poll: float, jitter: float, exclusive: bool
                          ) -> dict[str, int]:
    """`rounds` times: a sync from the savedir and one from its copy start together; once the
    target's committed cursor reaches a random point of what is left (plus a random delay),
    both are SIGKILLed; in the last round only one of them, and the other runs to its end.
    Then both run again together. With an `exclusive` target (a lock at the target) the
    committed cursor never goes back; two syncs writing one MLflow run both set its cursor tag,
    the last one wins, and a cursor that went back only makes a later sync send points the run
    holds already, which MLflow stores once (the final check counts them)."""
    stats = KillStats(cursors=[committed()])
    for k in range(rounds):
        before = stats.cursors[-1]
        pair = [start(sync_command(d, *target), procs) for d in (savedir, copy)]
        room = max(0, int(0.85 * total) - before) / (rounds - k)
        goal = before + 1 + room * rng.random()
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in pair) and committed() < goal:
            assert time.monotonic() < deadline, "the syncs made no progress"
            time.sleep(poll)
        time.sleep(rng.uniform(0, jitter))
        victims = [rng.randrange(2)] if k == rounds - 1 else [0, 1]
        stats.kills += sum(sigkill(pair[i]) for i in victims)
        for i, proc in enumerate(pair):
            out, err = finish(proc)
            if i not in victims:
                assert proc.returncode == 0, (out, err)
        cursor = committed()
        assert (before if exclusive else 0) <= cursor <= total, (stats.cursors, cursor)
        stats.kills_mid_export += before < cursor < total
        stats.kills_before_first_commit += cursor == before < total
        stats.cursors.append(cursor)
    final = [start(sync_command(d, *target), procs) for d in (savedir, copy)]
    for proc in final:
        out, err = finish(proc)
        assert proc.returncode == 0 and "FAILED" not in out, (out, err)
    return kill_figures(stats, total)


def two_copies_trials(tmp_path: Path, procs: list, request: pytest.FixtureRequest, target: str,
                      journals: int, rounds: int) -> Counter:
    rng = random.Random(SEED + 7)
    totals: Counter = Counter()
    for j in range(journals):
        savedir, copy = tmp_path / f"mllogs{j}", tmp_path / f"copy{j}"
        # one experiment per test: the MLflow server is shared by the module's tests
        experiment, run_id = f"fi-copies-{target}-{journals}x{rounds}", f"c{j}"
        write_journal(savedir, experiment, run_id, 27_000 if target == "tensorboard" else 12_000,
                      ranks=(0, 1))
        shutil.copytree(savedir, copy)
        total = sum(last_seqs(savedir, run_id).values())
        if target == "mlflow":
            uri = request.getfixturevalue("mlflow_server").uri
            client = MlflowClient(uri)
            args = ["--to", "mlflow", "--tracking-uri", uri]
            committed = functools.partial(mlflow_cursor, client, experiment, run_id)
        else:
            logdir = tmp_path / "tb"
            args = ["--to", "tensorboard", "--logdir", str(logdir)]
            committed = functools.partial(tb_progress,
                                          logdir / experiment_dirname(experiment) / run_id)
        fast = target == "tensorboard"
        totals.update(two_copies_kill_trial(
            savedir, copy, procs, rng, target=args, rounds=rounds, committed=committed,
            total=total, poll=0.002 if fast else 0.02, jitter=0.01 if fast else 0.25,
            exclusive=target == "tensorboard"))
        if target == "mlflow":
            totals.update(check_mlflow_exact(client, savedir, experiment, run_id))
        else:
            totals.update(check_tensorboard_exact(savedir, run_id, logdir))
        for d in (savedir, copy):  # and a further run of either adds nothing
            out = run_to_end(sync_command(d, *args), procs)
            assert "exported 0 records" in out, out
    assert totals["duplicates"] == totals["losses"] == 0
    return totals


@pytest.mark.parametrize("target", ["mlflow", "tensorboard"])
def test_two_copies_synced_at_once_and_killed_then_exact(tmp_path, procs, request, target):
    """A savedir and an rsync copy of it synced to one target at the same time, repeatedly
    killed: the target holds every record exactly once. TensorBoard: the lock in the logdir
    lets one sync in at a time. MLflow server: no shared lock, the claim protocol converges on
    one run per rank and points written twice are stored once."""
    totals = two_copies_trials(tmp_path, procs, request, target, journals=1, rounds=4)
    report(f"two copies synced at once to {target}, killed", **totals)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mlflow", "tensorboard"])
def test_two_copies_synced_at_once_and_killed_many_times(tmp_path, procs, request, target):
    totals = two_copies_trials(tmp_path, procs, request, target, journals=3, rounds=10)
    report(f"two copies synced at once to {target}, killed, 3 journals (slow)", **totals)


def test_a_run_held_by_another_sync_is_skipped_and_the_others_synced(tmp_path, procs):
    """Locks are per (target, journal): while one sync holds a run, another sync of the
    savedir reports that run busy, syncs the rest completely and exits 0."""
    savedir = tmp_path / "mllogs"
    for run_id in ("held", "free"):
        write_journal(savedir, "fi-lock", run_id, 3000)
    run = Journal(savedir).run("held")
    exporter = TensorBoardExporter(savedir, {}, Notes())
    lock = target_lock(exporter, Ledger(savedir, exporter.target_key(run), "tensorboard"), run)
    lock.acquire(timeout=0)
    try:
        out = run_to_end(sync_command(savedir, "--to", "tensorboard"), procs)
    finally:
        lock.release()
    assert statuses_in(out, "fi-lock/held") == ["busy"], out
    assert statuses_in(out, "fi-lock/free") == ["synced"], out
    assert not rank_dir(savedir, "held").exists()
    figures = check_tensorboard_exact(savedir, "free")
    out = run_to_end(sync_command(savedir, "--to", "tensorboard"), procs)
    assert statuses_in(out, "fi-lock/held") == ["synced"], out
    assert statuses_in(out, "fi-lock/free") == ["up-to-date"], out
    check_tensorboard_exact(savedir, "held")
    report("run held by another sync", **figures)


def test_two_syncs_of_different_runs_run_in_parallel(tmp_path, procs, mlflow_server):
    """Two processes, each given its own run of one savedir, export at the same time to one
    MLflow server: neither waits for or blocks the other, both finish exact."""
    savedir = tmp_path / "mllogs"
    experiment = "fi-parallel"
    for run_id in ("left", "right"):
        write_journal(savedir, experiment, run_id, 6000)
    totals = {run_id: sum(last_seqs(savedir, run_id).values()) for run_id in ("left", "right")}
    args = ["--to", "mlflow", "--tracking-uri", mlflow_server.uri]
    both = {run_id: start(sync_command(savedir, *args, "--run", run_id), procs)
            for run_id in totals}
    overlap = False  # seen both runs part-way through at one moment (reported only)
    while any(p.poll() is None for p in both.values()):
        done = {r: ledger_progress(savedir, experiment, r) for r in totals}
        overlap = overlap or all(0 < done[r] < totals[r] for r in totals)
        time.sleep(0.05)
    figures: Counter = Counter()
    client = MlflowClient(mlflow_server.uri)
    for run_id, proc in both.items():
        out, err = finish(proc)
        assert proc.returncode == 0, (out, err)
        other = "right" if run_id == "left" else "left"
        assert statuses_in(out, f"{experiment}/{run_id}") == ["synced"], out
        assert statuses_in(out, f"{experiment}/{other}") == [], out
        figures.update(check_mlflow_exact(client, savedir, experiment, run_id))
    report("two syncs of different runs in parallel", overlap_observed=overlap, **figures)


# == 1e. A corrupted segment ====================================================================

CRASHED_WRITER = """
import os
from itwinai_journal.loggers import MLFlowLogger
lg = MLFlowLogger(savedir={savedir!r}, experiment_name="fi-corrupt", run_id="b",
                  log_on_workers=-1)
lg.create_logger_context()
for i in range(2000):
    lg.log(i * 0.5, "loss", step=i)
lg._writer.flush()
os._exit(0)  # the job died: the records stay in the active (JSONL) segment
"""


def corrupt(savedir: Path, how: str, procs: list) -> Path:
    """Damage run b of `savedir`; returns the damaged file."""
    seg_dir = savedir / "fi-corrupt" / "b" / "rank-00000" / "segments"
    if how == "garbage line in the active segment":
        path = seg_dir / "000001.jsonl"
        lines = path.read_bytes().split(b"\n")
        lines[1000] = b'{"seq": 1001, "ti\x00\x00\x00 bit rot'
        path.write_bytes(b"\n".join(lines))
    elif how == "truncated sealed segment":
        path = seg_dir / "000001.parquet"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "modified sealed segment (still readable)":
        path = seg_dir / "000001.parquet"
        table = pq.read_table(path)
        values = table["value"].to_pylist()
        values[len(values) // 2] = 1e9
        idx = table.schema.get_field_index("value")
        pq.write_table(table.set_column(idx, "value", pa.array(values, pa.float64())), path)
    else:  # pragma: no cover
        raise ValueError(how)
    return path


@pytest.mark.parametrize("how", [
    "truncated sealed segment",
    "garbage line in the active segment",
    "modified sealed segment (still readable)",
])
def test_a_corrupted_segment_fails_only_its_run(tmp_path, procs, how):
    savedir = tmp_path / "mllogs"
    for run_id in ("a", "c"):
        write_journal(savedir, "fi-corrupt", run_id, 2000)
    if how.startswith("garbage"):
        proc = spawn(CRASHED_WRITER.format(savedir=str(savedir)))
        procs.append(proc)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    else:
        write_journal(savedir, "fi-corrupt", "b", 2000)
    damaged = corrupt(savedir, how, procs)

    code, out = cli("verify", savedir)
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert any(str(damaged) in line for line in errors), out  # names the damaged file
    assert all(str(damaged.parents[2]) in line for line in errors), out  # only run b

    code, out = cli(savedir, "--to", "tensorboard", "--to", "mlflow")
    assert code == 1, out
    assert "Traceback" not in out
    for target in ("tensorboard", "mlflow"):
        assert re.search(rf"^FAILED  fi-corrupt/b -> {target}: .+", out, re.M), out
        for run_id in ("a", "c"):
            assert re.search(rf"^synced +fi-corrupt/{run_id} -> {target} ", out, re.M), out
    figures: Counter = Counter()
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    for run_id in ("a", "c"):
        figures.update(check_tensorboard_exact(savedir, run_id))
        figures.update(check_mlflow_exact(client, savedir, "fi-corrupt", run_id))
    report(f"corrupted segment ({how})", **figures)


# == 1f. Job segments: resume after SIGTERM, steps going backwards ==============================

JOB_CHILD = """
import time
from itwinai_journal.loggers import MLFlowLogger

lg = MLFlowLogger(savedir={savedir!r}, experiment_name={experiment!r}, log_freq="batch",
                  log_on_workers=-1, flush_interval=0.2)
lg.create_logger_context(rank={rank})
print(f"run {{lg.run_id}}", flush=True)
step, stop = {start}, {stop}
while stop is None or step < stop:
    lg.log(step * 0.001 + {session} * 1000 + {rank}, "loss", step=step)
    if step % 10 == 0:
        lg.log(step / 3 + {session}, "val/acc", step=step)
    step += 1
    if step % 250 == 0:
        print(f"logged {{step}}", flush=True)
        time.sleep(0.01)
lg.destroy_logger_context()
"""


def job(savedir: Path, experiment: str, run_id: str, rank: int, world: int, start_step: int,
        stop: int | None, session: int, procs: list) -> subprocess.Popen:
    proc = spawn(JOB_CHILD.format(savedir=str(savedir), experiment=experiment, rank=rank,
                                  start=start_step, stop=stop, session=session),
                 ITWINAI_RUN_ID=run_id, WORLD_SIZE=str(world))
    procs.append(proc)
    return proc


def wait_logged(proc: subprocess.Popen, at_least: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("logged") and int(line.split()[1]) >= at_least:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}): {proc.stderr.read()}")
    raise AssertionError(f"the job did not log {at_least} steps in {timeout} s")


def loss_steps(savedir: Path, run_id: str, rank: int) -> list[int]:
    m = Journal(savedir).metrics(run_id=run_id, rank=rank, name="loss")
    return m["step"].to_pylist()


def test_job_resumed_after_sigterm_syncs_into_the_same_runs(tmp_path, procs, mlflow_server):
    """Job 1 (two ranks) is stopped by SIGTERM at its time limit; job 2, a new pair of
    processes with the same ITWINAI_RUN_ID, continues the steps. Synced after each job, the
    journal run stays one MLflow parent with the same two children, holding the full history,
    and one TensorBoard directory per rank."""
    savedir = tmp_path / "mllogs"
    experiment, run_id = "fi-stitch", "job-4242"
    client = MlflowClient(mlflow_server.uri)
    to_mlflow = ("--to", "mlflow", "--tracking-uri", mlflow_server.uri)
    to_tb = ("--to", "tensorboard")

    first = [job(savedir, experiment, run_id, r, 2, 0, None, 1, procs) for r in (0, 1)]
    for proc in first:
        wait_logged(proc, 2000)
    for proc in first:
        proc.send_signal(signal.SIGTERM)  # the time limit
    for proc in first:
        finish(proc, 60)
        assert proc.returncode == -signal.SIGTERM
    (run,) = Journal(savedir).runs()
    assert run.run_id == run_id and run.status == "interrupted"
    stopped = {r: len(loss_steps(savedir, run_id, r)) for r in (0, 1)}
    for r, n in stopped.items():
        assert loss_steps(savedir, run_id, r) == list(range(n)) and n >= 2000
    sync_ok(savedir, *to_mlflow)
    sync_ok(savedir, *to_tb)
    before = {r.info.run_id: r for r in mlflow_runs_of(client, experiment, run_id)}
    assert {r.info.status for r in before.values()} == {"KILLED"}

    second = [job(savedir, experiment, run_id, r, 2, stopped[r], stopped[r] + 1500, 2, procs)
              for r in (0, 1)]
    for proc in second:
        out, err = finish(proc, 120)
        assert proc.returncode == 0, err
        assert f"run {run_id}" in out
    (run,) = Journal(savedir).runs()
    for rank in run.ranks:
        sessions = rank.manifest["sessions"]
        assert [s["status"] for s in sessions] == ["interrupted", "finished"]
        assert sessions[1]["first_seq"] == sessions[0]["last_seq"] + 1
        assert loss_steps(savedir, run_id, rank.rank) == list(range(stopped[rank.rank] + 1500))
    out = sync_ok(savedir, *to_mlflow)
    assert "synced" in out
    sync_ok(savedir, *to_tb)

    after = {r.info.run_id: r for r in mlflow_runs_of(client, experiment, run_id)}
    assert set(after) == set(before)  # no new MLflow run: the same parent and children
    exp = client.get_experiment_by_name(experiment)
    assert len(client.search_runs([exp.experiment_id])) == 3
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    figures = check_mlflow_exact(client, savedir, experiment, run_id)
    figures_tb = check_tensorboard_exact(savedir, run_id)
    report("job resumed after SIGTERM", sessions=2, ranks=2, mlflow_runs=len(after),
           **figures, tb_records_checked=figures_tb["records_checked"],
           tb_duplicates=figures_tb["duplicates"], tb_losses=figures_tb["losses"])


def test_resumed_run_whose_steps_go_backwards_keeps_both_points(tmp_path, procs,
                                                                 mlflow_server):
    """Session 2 restores a checkpoint and logs steps 1200.. again: MLflow keeps both points
    of each repeated step (different values and timestamps), TensorBoard keeps both events."""
    savedir = tmp_path / "mllogs"
    experiment, run_id = "fi-backwards", "restored"
    client = MlflowClient(mlflow_server.uri)
    to_mlflow = ("--to", "mlflow", "--tracking-uri", mlflow_server.uri)
    to_tb = ("--to", "tensorboard")
    proc = job(savedir, experiment, run_id, 0, 1, 0, 2000, 1, procs)
    finish(proc, 120)
    assert proc.returncode == 0
    sync_ok(savedir, *to_mlflow)  # synced between the sessions too: cursors, not steps, decide
    sync_ok(savedir, *to_tb)
    proc = job(savedir, experiment, run_id, 0, 1, 1200, 2800, 2, procs)
    finish(proc, 120)
    assert proc.returncode == 0
    sync_ok(savedir, *to_mlflow)
    sync_ok(savedir, *to_tb)

    assert loss_steps(savedir, run_id, 0) == list(range(2000)) + list(range(1200, 2800))
    figures = check_mlflow_exact(client, savedir, experiment, run_id)
    (child,) = [r for r in mlflow_runs_of(client, experiment, run_id)
                if r.data.tags["itwinai.role"] == "rank"]
    history = client.get_metric_history(child.info.run_id, "loss")
    per_step = Counter(h.step for h in history)
    assert all(per_step[s] == (2 if 1200 <= s < 2000 else 1) for s in range(2800))
    assert {h.value for h in history if h.step == 1500} == {1500 * 0.001 + s * 1000
                                                             for s in (1, 2)}
    acc = accumulate(rank_dir(savedir, run_id))
    events = acc.Scalars("loss")
    assert len(events) == 2000 + 1600
    assert Counter(e.step for e in events) == per_step
    assert len(acc.Scalars("val/acc")) == 200 + 160
    figures_tb = check_tensorboard_exact(savedir, run_id)
    report("steps going backwards", mlflow_points=len(history), tb_events=len(events),
           **figures, tb_duplicates=figures_tb["duplicates"], tb_losses=figures_tb["losses"])
