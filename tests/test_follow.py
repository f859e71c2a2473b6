"""Following journals that are still being written: the follower of `itwinai_journal.read`
(each record once while segments are sealed, torn lines, how far a live rank has written), and
what is built on it: `itwinai-sync tail` and `--watch`."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import child_env, spawn
from test_tensorboard_export import accumulate, assert_complete, assert_scalars_exact, rank_dir

from itwinai_journal import Journal
from itwinai_journal.format import segments
from itwinai_journal.loggers import MLFlowLogger, TensorBoardLogger
from itwinai_journal.read.follow import Follower, written_seq
from itwinai_sync.inspect.tail import Tail

WRITER = """
import time
from itwinai_journal.loggers import TensorBoardLogger
lg = TensorBoardLogger(savedir={savedir!r}, log_freq="batch", log_on_workers=-1,
                       run_id="live", flush_interval=0.2)
lg.create_logger_context(rank={rank})
lg._writer.seal_records = 700
for i in range({n}):
    lg.log(1.0 / (i + 1), "loss", step=i)
    if i % 50 == 0:
        time.sleep(0.05)
lg.destroy_logger_context()
"""


def _watch(savedir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "itwinai_sync.cli", str(savedir), "--to", "tensorboard",
         "--watch", "--interval", "0.3", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        start_new_session=True)


def test_watch_follows_a_live_two_rank_run_to_a_complete_duplicate_free_target(tmp_path):
    savedir = tmp_path / "mllogs"
    savedir.mkdir()
    n = 3000
    writers = [spawn(WRITER.format(savedir=str(savedir), rank=r, n=n)) for r in (0, 1)]
    while not list(savedir.glob("*/live/rank-*/manifest.json")):
        time.sleep(0.05)
    watcher = _watch(savedir)
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    out, err = watcher.communicate(timeout=120)
    assert watcher.returncode == 0, err
    assert out.count("[pass ") >= 2, out  # it really followed the run over several passes
    for rank in (0, 1):
        path = rank_dir(savedir, "live", rank)
        assert assert_scalars_exact(accumulate(path), savedir, "live", rank) == n
        assert_complete(path, savedir, "live", rank)


def test_ctrl_c_stops_after_committing_and_a_rerun_completes(tmp_path):
    savedir = tmp_path / "mllogs"
    savedir.mkdir()
    writer = spawn(WRITER.format(savedir=str(savedir), rank=0, n=200_000))
    while not list(savedir.glob("*/live/rank-*/segments/*")):
        time.sleep(0.05)
    watcher = _watch(savedir)
    time.sleep(4.0)
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=60)
    assert watcher.returncode == 130, (out, err)
    assert "stopping after the batch in progress" in err
    os.killpg(writer.pid, signal.SIGTERM)  # the job hits its time limit
    writer.wait(timeout=60)
    assert Journal(savedir).runs()[0].status == "interrupted"
    path = rank_dir(savedir, "live")
    done = len(accumulate(path).Scalars("loss")) if path.exists() else 0
    total = Journal(savedir).metrics().num_rows
    assert 0 < done < total, (done, total)  # stopped mid-way, with what it had committed
    rerun = _watch(savedir)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert assert_scalars_exact(accumulate(path), savedir, "live") == total
    assert_complete(path, savedir, "live")


# -- the follower ------------------------------------------------------------------------------


def _closed_journal(savedir: Path, n: int) -> Path:
    """A run of `n` metric records, closed (every segment sealed); its rank directory."""
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="r", log_freq="batch")
    lg.create_logger_context()
    for i in range(n):
        lg.log(float(i), "loss", step=i)
    lg.destroy_logger_context()
    (rank,) = Journal(savedir).run("r").ranks
    return rank.path


def _line(seq: int, text: str | None = None) -> bytes:
    kind = "text" if text is not None else "metric"
    value = None if text is not None else float(seq)
    return segments.encode_row((seq, 1000.0 + seq, kind, "x", seq, None, value, text, None,
                                None)).encode()


def test_follower_takes_complete_lines_only_and_each_record_once(tmp_path):
    """An active segment written by hand, byte by byte as a writer's appends land: a line
    without its newline (torn, or still being written) is not taken until it is complete,
    then it is taken once; a damaged line between complete ones is skipped."""
    savedir = tmp_path / "mllogs"
    rank_dir = _closed_journal(savedir, 5)
    active = rank_dir / "segments" / "000099.jsonl"
    follower = Follower(savedir)
    (first,) = follower.poll()
    assert first.table["seq"].to_pylist() == [1, 2, 3, 4, 5] and first.rank == 0
    line6, line7 = _line(6), _line(7)
    active.write_bytes(line6 + line7[:10])
    (new,) = follower.poll()
    assert new.table["seq"].to_pylist() == [6]
    assert follower.poll() == []
    with open(active, "ab") as f:
        f.write(line7[10:] + b'{"seq": damaged\n' + _line(9))
    (new,) = follower.poll()
    assert new.table["seq"].to_pylist() == [7, 9]
    assert new.table["value"].to_pylist() == [7.0, 9.0]
    assert follower.poll() == []
    # The same records through the decoder the reader and the verifier use.
    got = segments.read_jsonl(active, strict=False)
    assert [row[0] for row in got.rows] == [6, 7, 9] and not got.torn_tail


def test_follower_selects_records_and_reads_only_the_newest_segments_for_last(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="r", log_freq="batch")
    lg.create_logger_context()
    lg._writer.seal_records = 10
    for i in range(95):
        lg.log(float(i), "loss", step=i)
        if i % 10 == 9:
            lg._writer.flush()
    lg.log("note", "t", kind="text")
    lg._writer.flush()

    def texts(t):
        import pyarrow.compute as pc

        return t.filter(pc.equal(t["kind"], "text"))

    follower = Follower(savedir, "exp/r", select=texts)
    (got,) = follower.poll(last=1)
    assert got.table["name"].to_pylist() == ["t"]
    lg.log(1.0, "loss", step=95)
    lg.log("again", "t", kind="text")
    lg.destroy_logger_context()
    (got,) = follower.poll()
    assert got.table["text"].to_pylist() == ["again"]  # the metric moved the cursor too
    assert Follower(savedir, "nope").poll() == []


def test_written_seq_reads_the_last_complete_line_of_the_active_segment(tmp_path):
    """The last line may be longer than the bytes read from the end at first (a long text
    record), and may be followed by a torn one: the seq is the last complete line's."""
    savedir = tmp_path / "mllogs"
    rank_dir = _closed_journal(savedir, 5)
    (rank,) = Journal(savedir).run("r").ranks
    assert written_seq(rank) == 5
    active = rank_dir / "segments" / "000099.jsonl"
    active.write_bytes(_line(6) + _line(7, "x" * 50_000) + _line(8)[:20])
    assert written_seq(rank) == 7
    with open(active, "ab") as f:
        f.write(_line(8)[20:])
    assert written_seq(rank) == 8


# -- tail ------------------------------------------------------------------------------------


def test_tail_reads_each_record_once_while_segments_are_sealed(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = TensorBoardLogger(savedir=savedir, log_freq="batch", run_id="live", flush_interval=0.1)
    lg.create_logger_context()
    lg._writer.seal_records = 7
    tail = Tail(savedir)
    seen = []
    for i in range(60):
        lg.log(float(i), "x", step=i)
        if i % 5 == 0:
            lg._writer.flush()
            seen += tail.poll(last=3) if not seen else tail.poll()
    lg.destroy_logger_context()
    seen += tail.poll()
    assert [p.step for p in seen] == list(range(60))
    assert len({p.seq for p in seen}) == 60
    assert len(list(savedir.rglob("*.parquet"))) >= 5  # it really followed sealing


def _reader(stream, q):
    for line in stream:
        q.put(line)


def test_tail_follow_prints_records_appended_after_it_started(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="live",
                      log_freq="batch", flush_interval=0.1)
    lg.create_logger_context()
    lg._writer.seal_records = 25  # segments seal while tail follows
    for i in range(5):
        lg.log(float(i), "before", step=i)
    lg._writer.flush()
    proc = subprocess.Popen(
        [sys.executable, "-m", "itwinai_sync.cli", "tail", str(savedir), "-f", "--interval",
         "0.2", "-n", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        start_new_session=True)
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    lines: list[str] = []

    def read_until(pred, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not pred():
            try:
                lines.append(q.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                err = proc.stderr.read() if proc.poll() is not None else ""
                raise AssertionError(f"timed out; got {lines}; stderr: {err}") from None

    try:
        read_until(lambda: len(lines) >= 3)
        assert all("before" in ln for ln in lines[:3])
        assert "before = 4" in lines[2]
        n = 100
        for i in range(n):
            lg.log(i * 0.5, "after", step=i)
            if i % 10 == 0:
                time.sleep(0.05)
        read_until(lambda: sum("after" in ln for ln in lines) >= n)
        time.sleep(0.6)  # a few more polls: nothing may come twice
        while not q.empty():
            lines.append(q.get())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lg.destroy_logger_context()
    after = [ln for ln in lines if " after = " in ln]
    seqs = [int(re.search(r"#(\d+)", ln).group(1)) for ln in after]
    assert seqs == list(range(6, 6 + n))  # each once, in order
    assert [int(re.search(r"step (\d+)", ln).group(1)) for ln in after] == list(range(n))
    assert all("exp/live rank 0" in ln for ln in after)
    assert len(lines) == 3 + n
    assert len(list(savedir.rglob("*.parquet"))) >= 3


def test_tail_against_a_live_writer_process_sees_every_record_once(tmp_path):
    """Polling as fast as it can while another process appends and seals: no record missed,
    none twice, whatever the moment each read lands on (JSONL growing, torn last line, JSONL
    replaced by Parquet)."""
    from conftest import spawn

    savedir = tmp_path / "mllogs"
    n = 20_000
    writer = spawn(f"""
        import time
        from itwinai_journal.loggers import TensorBoardLogger
        lg = TensorBoardLogger(savedir={str(savedir)!r}, log_freq="batch", run_id="live",
                               flush_interval=0.05)
        lg.create_logger_context()
        lg._writer.seal_records = 900
        for i in range({n}):
            lg.log(float(i), "x", step=i)
            if i % 500 == 0:
                time.sleep(0.01)
        lg.destroy_logger_context()
    """)
    tail = Tail(savedir)
    seen = []
    polls = 0
    while writer.poll() is None:
        seen += tail.poll()
        polls += 1
    assert writer.returncode == 0, writer.stderr.read()
    seen += tail.poll()
    assert polls > 5
    assert [p.step for p in seen] == list(range(n))
    assert [p.seq for p in seen] == list(range(1, n + 1))
