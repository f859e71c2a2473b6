"""Compute-node safety of the journal writer, with real processes: SIGTERM wherever it lands
(inside a flush, a seal, the close at exit, twice), forked children (a real DataLoader with fork
workers, os.fork, multiprocessing), records the schema cannot hold, disk full while storing
payloads, file permissions, and filesystems without flock.

Every SIGTERM is sent to the whole process group, as slurmstepd does. Where a test needs the
signal to land at one precise point, the child instruments that point (a segment file whose
write, or a seal, waits until the main thread is inside `flush()` and then says so), so that
nothing depends on luck. A process that hangs fails its test when `wait` times out.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import fill_filesystem, spawn

from itwinai_journal import Journal, verify
from itwinai_journal.format import fsio
from itwinai_journal.loggers import MLFlowLogger
from itwinai_journal.writer.rank import JournalWriteError

FLUSH = 0.2
#: Records logged this long before a signal must be in the journal (flush_interval, and a
#: margin for a loaded 2-core machine).
SETTLE = FLUSH + 0.8

PREAMBLE = """
import os, signal, sys, threading, time, warnings
from itwinai_journal.format import segments
from itwinai_journal.writer import rank as writer
from itwinai_journal.loggers import MLFlowLogger

def say(*args):
    print(*args, flush=True)

lg = MLFlowLogger(savedir={savedir!r}, experiment_name="exp", run_id="r1", log_freq="batch",
                  log_on_workers=-1, flush_interval={flush})
lg.create_logger_context()
"""

#: The main thread is inside flush() while `in_flush` is set; `SlowFile` is the active segment
#: file with a write that waits for that, says "in-write", and takes a while.
IN_FLUSH = """
in_flush = threading.Event()
real_flush = writer.RankWriter.flush

def flush(self):
    in_flush.set()
    try:
        real_flush(self)
    finally:
        in_flush.clear()

writer.RankWriter.flush = flush

class SlowFile:
    def __init__(self, f):
        self.f = f

    def write(self, data):
        if in_flush.wait(60):
            say("in-write")
            time.sleep(1.5)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

real_seal = segments.seal

def slow_seal(*args, **kwargs):
    if in_flush.wait(60):
        say("in-seal")
        time.sleep(1.5)
    return real_seal(*args, **kwargs)
"""


def child(code: str, savedir: Path, flush: float = FLUSH, **env: str) -> subprocess.Popen:
    return spawn(PREAMBLE.format(savedir=str(savedir), flush=flush) + code, **env)


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}): {proc.stderr.read()}")
    raise AssertionError(f"no {text!r} from the child")


def sigterm_group(proc: subprocess.Popen, times: int = 1) -> None:
    for _ in range(times):
        os.killpg(proc.pid, signal.SIGTERM)


def exit_code(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """The child's exit status; a child still running after `timeout` (a hang) fails."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"still running {timeout} s after the signal: "
                             f"{proc.stderr.read()}") from None
    return proc.returncode


def rank_dir(savedir: Path, rank: int = 0) -> Path:
    return savedir / "exp" / "r1" / f"rank-{rank:05d}"


def manifest(savedir: Path, rank: int = 0) -> dict:
    return json.loads((rank_dir(savedir, rank) / "manifest.json").read_text())


def check_journal(savedir: Path, expected: list[tuple[str, int]], clean: bool = True) -> None:
    """The journal holds each expected (name, step) metric exactly once, its seq is contiguous
    from 1, and `verify` finds nothing (`clean`) or no error (after a SIGKILL: a torn tail)."""
    records = Journal(savedir).records().to_pylist()
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    got = Counter((r["name"], r["step"]) for r in records if r["kind"] == "metric")
    assert got == Counter(expected), (sorted(set(got) ^ set(expected))[:10],
                                      max(got.values(), default=0))
    problems = verify(savedir)
    assert (problems if clean else [p for p in problems if p.severity == "error"]) == []


def losses(start: int, stop: int, name: str = "loss") -> list[tuple[str, int]]:
    return [(name, i) for i in range(start, stop)]


# == SIGTERM ===================================================================================


@pytest.mark.parametrize("where, signals", [("write", 1), ("seal", 1), ("write", 2)])
def test_sigterm_while_the_main_thread_is_inside_a_flush(tmp_path, where, signals):
    """The main thread is provably inside flush() (a backlog flush, Lightning's save(), a seal)
    when SIGTERM reaches the process group, once or twice: the process ends by SIGTERM within
    seconds, every record logged is written once, the session is sealed and interrupted."""
    savedir = tmp_path / "mllogs"
    code = IN_FLUSH + f"""
for i in range(1000):
    lg.log(float(i), "loss", step=i)
lg._writer.flush()
if {where!r} == "write":
    lg._writer._file = SlowFile(lg._writer._file)
else:
    lg._writer.seal_records = 2000
    segments.seal = slow_seal
for i in range(1000, 3000):
    lg.log(float(i), "loss", step=i)
lg._writer.flush()  # SIGTERM arrives while this waits
say("flush returned")
time.sleep(600)
"""
    proc = child(code, savedir, flush=30.0)
    wait_for(proc, f"in-{where}")
    sigterm_group(proc, signals)
    assert exit_code(proc) == -signal.SIGTERM
    check_journal(savedir, losses(0, 3000))
    session = manifest(savedir)["sessions"][-1]
    assert (session["status"], session["last_seq"]) == ("interrupted", 3000)
    assert not list((rank_dir(savedir) / "segments").glob("*.jsonl"))


def test_sigterm_during_the_close_at_exit(tmp_path):
    """The script has ended and the exit hook is sealing the session when SIGTERM arrives: the
    process ends by SIGTERM once everything is written. The session is `finished`: the close
    that ends it was the script's own end, under way before the signal (which `sigterm_at`
    records); `interrupted` is for a session SIGTERM itself ends, or that is killed after it."""
    savedir = tmp_path / "mllogs"
    code = """
real_seal = segments.seal

def slow_seal(*args, **kwargs):
    say("in-seal")
    time.sleep(1.5)
    return real_seal(*args, **kwargs)

segments.seal = slow_seal
for i in range(500):
    lg.log(float(i), "loss", step=i)
"""
    proc = child(code, savedir, flush=30.0)
    wait_for(proc, "in-seal")
    sigterm_group(proc)
    assert exit_code(proc) == -signal.SIGTERM
    check_journal(savedir, losses(0, 500))
    session = manifest(savedir)["sessions"][-1]
    assert session["status"] == "finished" and session["sigterm_at"] >= session["start"]


def test_a_user_handler_that_lets_training_go_on(tmp_path):
    """A SIGTERM handler installed before the logger that only sets a flag (checkpoint at the
    end of the step, then stop): the journal is flushed and marked interrupted at the signal
    (in case SIGKILL follows), the handler runs, the process goes on logging and ends normally;
    nothing is lost. The job chose to finish, and did: the session ends `finished`, with the
    signal's time kept in `sigterm_at`."""
    savedir = tmp_path / "mllogs"
    code = """
stop = []
signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
""" + PREAMBLE.format(savedir=str(savedir), flush=FLUSH) + """
step = 0
while not stop:
    lg.log(float(step), "loss", step=step)
    step += 1
    if step == 2000:
        say("logging")
    time.sleep(0.0002)
interrupted = json.load(open(lg._writer.rank_dir / "manifest.json"))["sessions"][-1]["status"]
for i in range(5):
    lg.log(float(i), "after", step=i)
lg.destroy_logger_context()
say("steps", step, interrupted)
"""
    proc = spawn("import json, signal\n" + code)
    wait_for(proc, "logging")
    sigterm_group(proc)
    assert exit_code(proc) == 0, proc.stderr.read()
    out = proc.stdout.read().split()
    steps, status_at_signal = int(out[out.index("steps") + 1]), out[out.index("steps") + 2]
    assert status_at_signal == "interrupted"  # written at the signal, before the process went on
    check_journal(savedir, losses(0, steps) + losses(0, 5, "after"))
    session = manifest(savedir)["sessions"][-1]
    assert session["status"] == "finished"
    assert session["start"] <= session["sigterm_at"] <= session["end"]


def test_a_user_handler_that_exits_ends_the_session_interrupted(tmp_path):
    """A SIGTERM handler installed before the logger that ends the program (sys.exit): the
    session SIGTERM ended is `interrupted`, with its end, its last seq and `sigterm_at`, and
    the process exits with the handler's code; nothing is lost."""
    savedir = tmp_path / "mllogs"
    code = """
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(3))
""" + PREAMBLE.format(savedir=str(savedir), flush=FLUSH) + """
step = 0
while True:
    lg.log(float(step), "loss", step=step)
    step += 1
    if step == 2000:
        say("logging")
    time.sleep(0.0002)
"""
    proc = spawn("import signal, sys\n" + code)
    wait_for(proc, "logging")
    sigterm_group(proc)
    assert exit_code(proc) == 3, proc.stderr.read()
    n = Journal(savedir).metrics().num_rows
    assert n >= 2000
    check_journal(savedir, losses(0, n))
    session = manifest(savedir)["sessions"][-1]
    assert (session["status"], session["last_seq"]) == ("interrupted", n)
    assert session["start"] <= session["sigterm_at"] <= session["end"]


def test_a_handler_that_wraps_ours_decides_whether_the_process_ends(tmp_path):
    """A handler registered after the loggers exist that calls the one it found (ours), as
    Lightning's signal connector does (`_HandlersCompose`: its own flag, then the previous
    handler): the journal is flushed and marked, and the process is not ended behind that
    handler's back; it stops when its flag says so. Closing the session is then the program's
    own doing: `finished`, the signal kept in `sigterm_at`."""
    savedir = tmp_path / "mllogs"
    code = """
received = []
found = signal.getsignal(signal.SIGTERM)

def compose(signum, frame):
    received.append(signum)
    found(signum, frame)

signal.signal(signal.SIGTERM, compose)
step = 0
while not received:
    lg.log(float(step), "loss", step=step)
    step += 1
    if step == 1000:
        say("logging")
    time.sleep(0.0002)
lg.log(1.0, "after", step=0)
say("steps", step)
"""
    proc = child(code, savedir)
    wait_for(proc, "logging")
    sigterm_group(proc)
    assert exit_code(proc) == 0, proc.stderr.read()
    steps = int(proc.stdout.read().split()[-1])
    check_journal(savedir, losses(0, steps) + [("after", 0)])
    session = manifest(savedir)["sessions"][-1]
    assert session["status"] == "finished" and "sigterm_at" in session


SIGTERM_TRIAL = """
flush_each_step = {flush_each_step}
step = 0
while True:
    for _ in range(100):
        lg.log(float(step), "loss", step=step)
        step += 1
    if flush_each_step:
        lg._writer.flush()
    say("logged", step)
"""


def sigterm_trials(tmp_path: Path, trials: int, seed: int) -> None:
    """SIGTERM at a random moment of a loop that logs as fast as it can (the flusher and the
    backlog flush busy) or flushes after every step (Lightning's save()): the process always
    ends by SIGTERM within seconds with every record it logged written once."""
    import random

    rng = random.Random(seed)
    for k in range(trials):
        savedir = tmp_path / f"trial-{k}"
        proc = child(SIGTERM_TRIAL.format(flush_each_step=k % 2 == 1), savedir)
        wait_for(proc, "logged")
        time.sleep(rng.uniform(0.0, 1.0))
        sigterm_group(proc)
        assert exit_code(proc) == -signal.SIGTERM, proc.stderr.read()
        # The signal may cut the last line short ("logged" without its count): only whole
        # lines are claims.
        printed = [int(words[1]) for words in map(str.split, proc.stdout.read().splitlines())
                   if len(words) == 2 and words[0] == "logged" and words[1].isdigit()]
        n = Journal(savedir).metrics().num_rows
        assert n >= max(printed, default=0)
        check_journal(savedir, losses(0, n))
        assert manifest(savedir)["sessions"][-1]["status"] == "interrupted"


def test_sigterm_at_random_moments(tmp_path):
    sigterm_trials(tmp_path, 4, 14)


@pytest.mark.slow
def test_sigterm_at_random_moments_many_trials(tmp_path):
    sigterm_trials(tmp_path, 40, 1401)


# == the end of a session ======================================================================


def test_options_json_cannot_hold_never_stop_the_close(tmp_path):
    """create_logger_context keywords are declared in the manifest: values JSON cannot hold (an
    object, a self-referencing list, a dict with tuple keys) are declared by their repr, and
    the close returns (it used to wait for ever on a flusher killed by the TypeError)."""
    savedir = tmp_path / "mllogs"
    code = f"""
cyclic = []
cyclic.append(cyclic)
from itwinai_journal.loggers import TensorBoardLogger
lg2 = TensorBoardLogger(savedir={str(savedir)!r}, run_id="r2")
lg2.create_logger_context(rank=0, obj=object(), cyclic=cyclic, keys={{(1, 2): 3}})
for i in range(100):
    lg2.log(float(i), "loss", step=i)
lg2.destroy_logger_context()
say("closed")
"""
    proc = child(code, savedir)
    assert exit_code(proc, 60) == 0, proc.stderr.read()
    assert "closed" in proc.stdout.read()
    assert "Traceback" not in proc.stderr.read()
    rank = savedir / "unnamed-experiment" / "r2" / "rank-00000"
    found = json.loads((rank / "manifest.json").read_text())
    declared = found["destinations"]["tensorboard"]
    assert declared["obj"].startswith("<object object at ")
    assert (declared["cyclic"], declared["keys"]) == ("[[...]]", "{(1, 2): 3}")
    assert found["sessions"][-1]["status"] == "finished"
    assert found["dropped_records"] == 0
    assert [r["step"] for r in Journal(savedir).records(run_id="r2").to_pylist()] == \
        list(range(100))
    assert verify(savedir) == []


def test_a_failing_seal_at_close_with_warnings_as_errors_never_stops_the_close(tmp_path):
    """Warnings turned into errors (`-W error`, pytest's filterwarnings) and a seal that fails
    at the close (disk full): the warning cannot be raised in the writer's thread, and the
    close still returns, the records safe in the JSONL segment and the session recorded."""
    savedir = tmp_path / "mllogs"
    code = """
from itwinai_journal.format import segments

def full(*args, **kwargs):
    raise OSError(28, "No space left on device")

for i in range(100):
    lg.log(float(i), "loss", step=i)
lg._writer.flush()
warnings.simplefilter("error")
segments.seal = full
lg.destroy_logger_context()
say("closed")
"""
    proc = child(code, savedir)
    assert exit_code(proc, 60) == 0, proc.stderr.read()
    assert "closed" in proc.stdout.read()
    check_journal(savedir, losses(0, 100), clean=False)
    session = manifest(savedir)["sessions"][-1]
    assert (session["status"], session["last_seq"]) == ("finished", 100)
    assert list((rank_dir(savedir) / "segments").glob("*.jsonl"))  # not sealed: kept as is


def test_a_sigterm_whose_request_the_finished_flusher_missed_is_not_waited_for(tmp_path):
    """SIGTERM's handler asks each writer's flusher to write everything and waits for it. A
    flusher that ends the session between the handler's check and its request never answers:
    the handler must see that, not wait its full 20 s."""
    from itwinai_journal.writer import rank as journal_writer

    w = journal_writer.RankWriter(tmp_path / "exp" / "r1", 0, 1, {"experiment": "exp",
                                                                 "run_id": "r1"})
    w._stop, w._closed = "finished", True  # as close() asks, without waiting
    real_request = w._request

    def late_request(done):  # the flusher ends the session before the request is queued
        w._wake.put(None)
        w._thread.join(30)
        assert not w._thread.is_alive()
        real_request(done)

    w._request = late_request
    requested = w._interrupt(final=True)
    assert requested is None or requested.is_set()
    assert manifest(tmp_path)["sessions"][-1]["status"] == "finished"


def test_no_journal_thread_outlives_the_close(tmp_path):
    """close() returns only once the writer's thread has ended, not as soon as its last round
    released the caller: at interpreter exit, a daemon thread still running while the
    interpreter is finalized is ended abruptly by CPython, which aborted the process now and
    then (SIGABRT). The thread is kept busy after it released the close (a request queued
    during the last round, answered in its cleanup) to make that window wide."""
    from itwinai_journal.writer import rank as journal_writer

    w = journal_writer.RankWriter(tmp_path / "exp" / "r1", 0, 1, {"experiment": "exp",
                                                                 "run_id": "r1"})
    real_finish = w._finish
    late: list[str] = []

    def finish(status):  # in the thread, during the last round
        real_finish(status)
        w._waiters.append(lambda: (time.sleep(0.5), late.append("answered")))

    w._finish = finish
    w.close()
    assert not w._thread.is_alive() and late == ["answered"]
    assert manifest(tmp_path)["sessions"][-1]["status"] == "finished"


ATEXIT_LOG = """
import atexit
{early}
from itwinai_journal.loggers import LoggersCollection, MLFlowLogger, TensorBoardLogger
{late}
lg = MLFlowLogger(savedir={savedir!r}, experiment_name="exp", run_id="r1", log_freq="batch")
coll = LoggersCollection([MLFlowLogger(savedir={savedir!r}, experiment_name="exp",
                                       run_id="r2", log_freq="batch"),
                          TensorBoardLogger(savedir={savedir!r}, log_freq="batch")])
lg.create_logger_context()
coll.create_logger_context()
lg.log(1.0, "loss", step=0)
coll.log(1.0, "loss", step=0)
print("logged", flush=True)
"""
FINAL_LOGS = ("atexit.register(lambda: (lg.log(99.0, 'final_at_exit', step=1), "
              "coll.log(99.0, 'final_at_exit', step=1)))")


def test_an_exit_hook_registered_after_the_import_logs_into_the_session(tmp_path):
    """atexit runs hooks in reverse order: the journal's own hook is registered when the
    loggers are imported, so a hook the program registers later (even before it creates its
    loggers) runs first, and what it logs is journaled."""
    savedir = tmp_path / "mllogs"
    proc = spawn(ATEXIT_LOG.format(early="", late=FINAL_LOGS, savedir=str(savedir)))
    assert exit_code(proc, 60) == 0, proc.stderr.read()
    assert "not journaled" not in proc.stderr.read()
    for run_id in ("r1", "r2"):
        got = [(r["name"], r["step"]) for r in Journal(savedir).records(run_id=run_id)
               .to_pylist()]
        assert got == [("loss", 0), ("final_at_exit", 1)], run_id
    assert manifest(savedir)["sessions"][-1]["status"] == "finished"


def test_a_log_after_the_journals_exit_hook_is_reported_not_lost_in_silence(tmp_path):
    """A hook registered before the loggers were imported runs after the journal's own exit
    hook has ended the sessions: its records cannot be journaled (a session reopened at
    interpreter exit could never be closed), and each logger says so once (RuntimeWarning)
    instead of taking them into a queue nobody writes."""
    savedir = tmp_path / "mllogs"
    proc = spawn(ATEXIT_LOG.format(early=FINAL_LOGS, late="", savedir=str(savedir)))
    assert exit_code(proc, 60) == 0, proc.stderr.read()
    stderr = proc.stderr.read()
    assert stderr.count("before this call: this record and any logged later are not "
                        "journaled") == 2, stderr  # the logger, and the collection's member
    assert "Traceback" not in stderr
    for run_id in ("r1", "r2"):
        got = [(r["name"], r["step"]) for r in Journal(savedir).records(run_id=run_id)
               .to_pylist()]
        assert got == [("loss", 0)], run_id
    assert manifest(savedir)["sessions"][-1]["status"] == "finished"


# == forks =====================================================================================

DATALOADER = """
import torch
from torch.utils.data import DataLoader, Dataset

class Samples(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        lg.log(float(i), "sample", step=i)  # in a worker process
        return torch.tensor([float(i)])

loader = DataLoader(Samples(), batch_size=8, num_workers=2, multiprocessing_context="fork",
                    persistent_workers={persistent})
for b, x in enumerate(loader):
    lg.log(float(x.sum()), "loss", step=b)
say("logged")
time.sleep(600)
"""


@pytest.mark.parametrize("persistent", [False, True])
def test_dataloader_fork_workers_log_into_the_parents_journal(tmp_path, persistent):
    """A real DataLoader, num_workers=2, fork start method: what the workers log reaches the
    rank's journal once each, numbered by the parent; SIGTERM to the process group (workers
    still alive when persistent) ends everything within seconds, the session interrupted."""
    savedir = tmp_path / "mllogs"
    proc = child(DATALOADER.format(persistent=persistent), savedir)
    wait_for(proc, "logged")
    time.sleep(SETTLE)
    sigterm_group(proc)
    # With workers alive, their death makes torch's SIGCHLD handler raise in the parent while
    # the journal is being closed: the parent still ends by SIGTERM, as without the journal.
    assert exit_code(proc) == -signal.SIGTERM, proc.stderr.read()
    check_journal(savedir, losses(0, 64, "sample") + losses(0, 8))
    assert manifest(savedir)["sessions"][-1]["status"] == "interrupted"


def test_a_forked_child_that_exits_normally_leaves_the_parent_alone(tmp_path):
    """os.fork(); the child logs and exits normally (exit hooks run in it): the parent's
    segment, lock and session are untouched, the child's records are journaled by the parent,
    and what the parent logs afterwards survives SIGKILL."""
    savedir = tmp_path / "mllogs"
    code = """
for i in range(50):
    lg.log(float(i), "parent", step=i)
lg._writer.flush()
pid = os.fork()
if pid == 0:
    for i in range(30):
        lg.log(float(i), "child", step=i)
    sys.exit(0)
os.waitpid(pid, 0)
for i in range(50, 100):
    lg.log(float(i), "parent", step=i)
say("logged")
time.sleep(600)
"""
    proc = child(code, savedir)
    wait_for(proc, "logged")
    other = child("say('opened')", savedir)  # the rank is still held by the parent
    assert exit_code(other, 120) == 1
    assert "being written by another process" in other.stderr.read()
    time.sleep(SETTLE)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    check_journal(savedir, losses(0, 100, "parent") + losses(0, 30, "child"), clean=False)
    assert manifest(savedir)["sessions"][-1]["status"] == "running"


def test_a_forked_child_logging_past_the_backlog(tmp_path):
    """A child that logs more than the backlog (its own flushes run) never writes the parent's
    segment: no duplicate seq, every record once."""
    savedir = tmp_path / "mllogs"
    code = """
pid = os.fork()
if pid == 0:
    for i in range(25_000):
        lg.log(float(i), "child", step=i)
    sys.exit(0)
for i in range(1000):
    lg.log(float(i), "parent", step=i)
os.waitpid(pid, 0)
lg.destroy_logger_context()
"""
    proc = child(code, savedir)
    assert exit_code(proc, 120) == 0, proc.stderr.read()
    check_journal(savedir, losses(0, 1000, "parent") + losses(0, 25_000, "child"))
    assert manifest(savedir)["sessions"][-1]["status"] == "finished"


def test_a_multiprocessing_child_logs_records_of_every_kind(tmp_path):
    """A multiprocessing (fork) child exits through os._exit, skipping atexit: its last records
    still reach the parent, payloads included (written into the blob store by the child)."""
    savedir = tmp_path / "mllogs"
    code = """
import multiprocessing

def work():
    for i in range(500):
        lg.log(float(i), "child", step=i)
    lg.log("hello from the child", "note", kind="text", obj=object())
    lg.log(__file__, "script", kind="artifact")

if __name__ == "__main__":
    p = multiprocessing.get_context("fork").Process(target=work)
    p.start()
    p.join()
    lg.destroy_logger_context()
    say("exit", p.exitcode)
"""
    script = tmp_path / "script.py"
    script.write_text(PREAMBLE.format(savedir=str(savedir), flush=FLUSH) + code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "exit 0" in proc.stdout, proc.stderr
    check_journal(savedir, losses(0, 500, "child"))
    records = {r["name"]: r for r in Journal(savedir).records().to_pylist()}
    assert records["note"]["text"] == "hello from the child"
    assert json.loads(records["note"]["meta"])["kwargs"]["obj"].startswith("<object object")
    assert (rank_dir(savedir) / "blobs" / records["script"]["blob"][:2]
            / records["script"]["blob"]).read_bytes() == script.read_bytes()


def test_a_child_whose_parent_closed_its_writer_says_its_records_are_dropped(tmp_path):
    savedir = tmp_path / "mllogs"
    code = """
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(r, 1)  # the parent has closed its writer
    lg.log(1.0, "late", step=0)
    lg._writer.flush()
    os._exit(0)
lg.destroy_logger_context()
os.write(w, b"x")
os.waitpid(pid, 0)
"""
    proc = child(code, savedir)
    assert exit_code(proc, 120) == 0
    assert "did not reach the journal writer" in proc.stderr.read()
    check_journal(savedir, [])


def test_a_child_forked_without_pythons_fork_hooks(tmp_path):
    """fork() called from C (here libc's, through ctypes) runs none of Python's at-fork hooks:
    the writer notices the new pid at the child's first flush, warns that the records queued
    then cannot be told from the parent's and are dropped, and sends later ones to the parent.
    (The parent ends with os._exit: a libc fork in a process with pyarrow's threads can abort
    the parent's interpreter exit, with or without the journal. The system-metrics sampler is
    off: CPython re-creates the GIL in the child only in os.fork, so a libc fork while another
    thread is handing the GIL over, as the sampler does when it takes its first reading at the
    journal's open, leaves the child waiting for ever, with or without the journal.)"""
    savedir = tmp_path / "mllogs"
    code = """
import ctypes
lg.log(1.0, "parent", step=0)
if os.fork() == 0:  # an ordinary fork first: the parent makes the channel to its children
    os._exit(0)
pid = ctypes.PyDLL(None).fork()  # PyDLL: the forking thread keeps the GIL
if pid == 0:
    lg.log(2.0, "queued", step=0)
    lg._writer.flush()  # noticed here
    lg.log(3.0, "child", step=0)
    lg._writer.flush()
    os._exit(0)
os.waitpid(pid, 0)
lg.destroy_logger_context()
say("closed")
os._exit(0)
"""
    proc = child(code, savedir, ITWINAI_SYSTEM_METRICS_INTERVAL="0")
    assert exit_code(proc, 120) == 0, proc.stderr.read()
    assert "closed" in proc.stdout.read()
    assert "forked without Python's fork hooks" in proc.stderr.read()
    check_journal(savedir, [("parent", 0), ("child", 0)])


def test_records_a_child_sends_while_the_parent_seals_are_journaled_or_reported(tmp_path):
    """The parent's session ends while a forked child still logs: the child sends only after
    the parent's last round has received what was queued (the parent's seal waits for it, a
    deterministic worst case). Every record the child's send succeeded for is journaled; one
    the parent can no longer take fails on the child's side, which warns and counts it. None
    is lost in silence."""
    savedir = tmp_path / "mllogs"
    code = """
from itwinai_journal.writer import rank as writer
lg.log(0.0, "parent", step=0)
go_r, go_w = os.pipe()
done_r, done_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.read(go_r, 1)  # the parent's last round is over
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(100):
            lg.log(float(i), "child", step=i)
        lg._writer.flush()
    warned = sum("did not reach the journal writer" in str(w.message) for w in caught)
    os.write(done_w, f"{lg._writer._dropped} {warned}".encode())
    os._exit(0)
real_finish = writer.RankWriter._finish

def finish(self, status):  # in the flusher, after the session's last round
    os.write(go_w, b"x")
    say("child-lost-warned", os.read(done_r, 100).decode())
    real_finish(self, status)

writer.RankWriter._finish = finish
lg.destroy_logger_context()
os.waitpid(pid, 0)
"""
    proc = child(code, savedir)
    assert exit_code(proc, 60) == 0, proc.stderr.read()
    out = proc.stdout.read().split()
    lost, warned = (int(v) for v in out[out.index("child-lost-warned") + 1:][:2])
    journaled = [r for r in Journal(savedir).records().to_pylist() if r["name"] == "child"]
    assert len(journaled) + lost == 100
    assert warned == (1 if lost else 0)
    assert lost == 100  # this child sent after the parent stopped receiving: all refused
    check_journal(savedir, [("parent", 0)])
    assert manifest(savedir)["sessions"][-1]["status"] == "finished"


# == records the schema cannot hold ============================================================

UNSTORABLE = """
warnings.simplefilter("always")
w = lg._writer
now = time.time()
batch = [(now, "loss", i, None, float(i), "mlflow") for i in range(300)]
batch[100] = (now, "loss", 2**63, None, 1.0, "mlflow")  # beyond int64
batch[200] = (now, "bad\\udcff", 5, None, 1.0, "mlflow")  # a lone surrogate
for rec in batch:  # past log()'s checks: the writer must cope on its own
    w.append(rec)
w.flush()  # one columnar batch
w.append((now, "text", "note", None, None, None, "ok", None, None, "mlflow"))
w.append((now, "text", "note2", None, None, None, "x\\udcff", None, None, "mlflow"))
w.append((now, "text", "note3", None, None, None, "ok", None, {(1, 2): "tuple key"}, "mlflow"))
w.append((now, "loss", -2**63 - 1, None, 1.0, "mlflow"))
w.append((now, "loss", 300, None, 300.0, "mlflow"))
w.flush()  # a batch encoded record by record
lg.destroy_logger_context()
"""


def test_records_the_schema_cannot_hold_are_dropped_alone(tmp_path):
    savedir = tmp_path / "mllogs"
    proc = child(UNSTORABLE, savedir)
    assert exit_code(proc, 120) == 0, proc.stderr.read()
    assert proc.stderr.read().count("cannot be stored in the journal") == 1
    assert manifest(savedir)["dropped_records"] == 5
    expected = [s for s in range(301) if s not in (100, 200)]
    check_journal(savedir, [("loss", s) for s in expected])
    assert [r["name"] for r in Journal(savedir).records(kinds=["text"]).to_pylist()] == ["note"]
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="r1")  # the rank resumes
    lg.create_logger_context()
    lg.log(1.0, "loss", step=301)
    lg.destroy_logger_context()
    check_journal(savedir, [("loss", s) for s in [*expected, 301]])


# == disk full while storing payloads ===========================================================


def _payloads(lg: MLFlowLogger, src: Path, tag: int) -> None:
    """An image, a large text, an artifact file and a torch object, all new to the store."""
    import torch

    rng = np.random.default_rng(tag)
    lg.log(rng.integers(0, 255, (64, 64), dtype=np.uint8), f"img{tag}", kind="image")
    lg.log(f"{tag}" + "x" * 100_000, f"big{tag}", kind="text")
    src.write_bytes(rng.bytes(6000))
    lg.log(str(src), f"file{tag}", kind="artifact")
    lg.log(torch.full((500,), float(tag)), f"tensor{tag}", kind="torch")


def test_disk_full_while_storing_payloads(tiny_fs):
    """Disk full while images, text, artifacts and torch objects are stored during log():
    training goes on, one warning, every lost record counted, no temporary file left, and
    everything logged before or after is intact."""
    savedir = tiny_fs / "mllogs"
    src = tiny_fs.parent / "artifact.bin"  # outside the full filesystem: the source is fine
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="r1", flush_interval=0.05)
    lg.create_logger_context()
    _payloads(lg, src, 1)
    lg._writer.flush()
    filler = fill_filesystem(tiny_fs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _payloads(lg, src, 2)  # no exception reaches the training loop
        lg._writer.flush()
    assert len([w for w in caught if "cannot write" in str(w.message)]) == 1
    assert not list((savedir / "exp" / "r1" / "rank-00000" / "blobs").glob(".tmp-*"))
    filler.unlink()
    _payloads(lg, src, 3)
    lg.destroy_logger_context()
    assert manifest(savedir)["dropped_records"] == 4
    names = [r["name"] for r in Journal(savedir).records().to_pylist()]
    assert sorted(names) == sorted(f"{k}{t}" for t in (1, 3)
                                   for k in ("img", "big", "file", "tensor"))
    assert verify(savedir) == []


def test_disk_full_while_storing_a_payload_raises_when_strict(tiny_fs):
    savedir = tiny_fs / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="r1", strict=True)
    lg.create_logger_context()
    filler = fill_filesystem(tiny_fs)
    with pytest.raises(JournalWriteError, match="No space left"):
        lg.log(np.zeros((64, 64), np.uint8) + 7, "img", kind="image")
    assert not list((savedir / "exp" / "r1" / "rank-00000" / "blobs").glob(".tmp-*"))
    filler.unlink()
    lg.destroy_logger_context()
    assert manifest(savedir)["dropped_records"] == 1


# == permissions ===============================================================================


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_journal_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    """Collaborators on a shared project space read journals: every file is created with the
    mode the umask gives (0644 or 0660 here), not mkstemp's 0600."""
    savedir = tmp_path / "mllogs"
    umask_first = f"import os\nos.umask({umask:#o})\n"
    code = umask_first + PREAMBLE.format(savedir=str(savedir), flush=FLUSH) + """
lg.log(1.0, "loss", step=0)
lg.log("x" * 100_000, "big", kind="text")
lg.log(__import__("numpy").zeros((4, 4), "uint8"), "img", kind="image")
lg._writer.flush()
say("active", oct(os.stat(next(lg._writer.seg_dir.glob("*.jsonl"))).st_mode & 0o777))
lg.destroy_logger_context()
"""
    proc = spawn(code)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    want = 0o666 & ~umask
    assert f"active {want:#o}" in out
    run = savedir / "exp" / "r1"
    files = [run / "run.json", run / "rank-00000" / "manifest.json",
             run / "rank-00000" / "index.jsonl", *run.glob("rank-00000/segments/*"),
             *run.glob("rank-00000/blobs/*/*")]
    assert len(files) == 6
    assert {str(f.relative_to(run)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {
        str(f.relative_to(run)): oct(want) for f in files}


# == filesystems without flock =================================================================

NO_FLOCK = """
import errno, fcntl
real_flock = fcntl.flock

def flock(fd, operation):  # this filesystem has no flock for the rank's lock file
    if os.readlink(f"/proc/self/fd/{{fd}}").endswith(".writer.lock"):
        raise OSError({errno}, os.strerror({errno}))
    return real_flock(fd, operation)

fcntl.flock = flock
"""


@pytest.mark.parametrize("name", ["ENOSYS", "ENOLCK"])
def test_no_flock_falls_back_to_an_owner_file(tmp_path, monkeypatch, name):
    import errno
    import fcntl

    import filelock

    code = getattr(errno, name)
    real = fcntl.flock

    def flock(fd, operation):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".writer.lock"):
            raise OSError(code, os.strerror(code))
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(fsio, "_warned_no_flock", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock = fsio.lock_exclusively(tmp_path / ".writer.lock", tmp_path / ".writer.owner")
        with pytest.raises(filelock.Timeout):
            fsio.lock_exclusively(tmp_path / ".writer.lock", tmp_path / ".writer.owner")
    assert [str(w.message) for w in caught if "no flock" in str(w.message)] != []
    assert len([w for w in caught if "no flock" in str(w.message)]) == 1
    assert (tmp_path / ".writer.owner").read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not (tmp_path / ".writer.owner").exists()
    fsio.lock_exclusively(tmp_path / ".writer.lock", tmp_path / ".writer.owner").release()

    def broken(fd, operation):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)  # any other error is not a missing flock
    with pytest.raises(OSError, match="Input/output"):
        fsio.lock_exclusively(tmp_path / "other.lock", tmp_path / "other.owner")


def test_without_flock_a_second_live_writer_is_refused_and_a_dead_ones_rank_taken_over(
        tmp_path):
    """Real processes on a filesystem answering ENOLCK: training starts with one warning, a
    second process writing the same rank is refused while the first lives, and once the first
    is killed its rank is taken over (same host, pid gone) and seq continues."""
    savedir = tmp_path / "mllogs"
    no_flock = NO_FLOCK.format(errno="errno.ENOLCK")
    first = spawn(no_flock + PREAMBLE.format(savedir=str(savedir), flush=FLUSH) + """
for i in range(100):
    lg.log(float(i), "loss", step=i)
lg._writer.flush()
say("ready")
time.sleep(600)
""")
    wait_for(first, "ready")
    second = spawn(no_flock + PREAMBLE.format(savedir=str(savedir), flush=FLUSH))
    assert exit_code(second, 120) == 1
    assert "being written by another process" in second.stderr.read()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert first.stderr.read().count("has no flock") == 1
    third = spawn(no_flock + PREAMBLE.format(savedir=str(savedir), flush=FLUSH) + """
for i in range(100, 150):
    lg.log(float(i), "loss", step=i)
lg.destroy_logger_context()
""")
    assert exit_code(third, 120) == 0, third.stderr.read()
    check_journal(savedir, losses(0, 150))
    assert [s["status"] for s in manifest(savedir)["sessions"]] == ["running", "finished"]
    assert not (rank_dir(savedir) / ".writer.owner").exists()
