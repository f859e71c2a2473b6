"""The journal's promises under real processes: several ranks, SIGKILL, SIGTERM, resume,
tampering, and no tracker import on the compute-node side."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import spawn

from itwinai_journal import Journal, verify
from itwinai_journal.loggers import MLFlowLogger

LOG_N = """
import sys, time
from itwinai_journal.loggers import MLFlowLogger
lg = MLFlowLogger(savedir=sys.argv[1] if len(sys.argv) > 1 else {savedir!r},
                  experiment_name="exp", run_id={run_id!r}, flush_interval={flush},
                  log_on_workers=-1)
lg.create_logger_context(rank={rank})
for i in range({n}):
    lg.log(float(i), "loss", step=i)
print("logged", flush=True)
{after}
"""


def _script(savedir, n, rank=0, run_id="r1", flush=0.2, after=""):
    return LOG_N.format(savedir=str(savedir), n=n, rank=rank, run_id=run_id, flush=flush,
                        after=after)


def _wait_line(proc, text, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if text in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}): {proc.stderr.read()}")
    raise AssertionError(f"no {text!r} from child")


def _manifest(savedir, run_id="r1", rank=0):
    return json.loads((savedir / "exp" / run_id / f"rank-{rank:05d}" / "manifest.json")
                      .read_text())


def test_two_processes_are_two_ranks_of_one_run(tmp_path):
    procs = [spawn(_script(tmp_path, 5000, rank=r)) for r in (0, 1)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    runs = Journal(tmp_path).runs()
    assert len(runs) == 1 and [r.rank for r in runs[0].ranks] == [0, 1]
    for rank in (0, 1):
        m = Journal(tmp_path).metrics(rank=rank)
        assert m["seq"].to_pylist() == list(range(1, 5001))
        assert m["value"].to_pylist() == [float(i) for i in range(5000)]
    assert runs[0].status == "finished"
    assert verify(tmp_path) == []


def test_sigkill_after_flush_interval_keeps_every_record(tmp_path):
    n = 20_000
    proc = spawn(_script(tmp_path, n, flush=0.2, after="time.sleep(600)"))
    _wait_line(proc, "logged")
    time.sleep(0.2 * 3 + 0.5)  # well past flush_interval
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    m = Journal(tmp_path).metrics()
    assert m.num_rows == n
    assert m["step"].to_pylist() == list(range(n))
    assert m["value"].to_pylist() == [float(i) for i in range(n)]
    problems = verify(tmp_path)
    assert [p for p in problems if p.severity == "error"] == []
    assert all("torn" in p.message for p in problems)
    assert _manifest(tmp_path)["sessions"][-1]["status"] == "running"


def test_sigkill_mid_logging_leaves_a_readable_prefix(tmp_path):
    proc = spawn(_script(tmp_path, 10**9, flush=0.05))
    time.sleep(3.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    m = Journal(tmp_path).metrics()
    assert m.num_rows > 0
    n = m.num_rows
    assert m["seq"].to_pylist() == list(range(1, n + 1))
    assert m["value"].to_pylist() == [float(i) for i in range(n)]
    assert [p for p in verify(tmp_path) if p.severity == "error"] == []


def test_sigterm_flushes_everything_and_marks_interrupted(tmp_path):
    n = 50_000
    proc = spawn(_script(tmp_path, n, flush=30.0, after="time.sleep(600)"))
    _wait_line(proc, "logged")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert Journal(tmp_path).metrics().num_rows == n
    session = _manifest(tmp_path)["sessions"][-1]
    assert session["status"] == "interrupted"
    assert session["last_seq"] == n
    # the active segment was sealed: nothing is left as JSONL, and verify is clean
    seg_dir = tmp_path / "exp" / "r1" / "rank-00000" / "segments"
    assert not list(seg_dir.glob("*.jsonl"))
    assert verify(tmp_path) == []


def test_sigterm_chains_an_existing_handler(tmp_path):
    after = "time.sleep(600)"
    code = """
import signal, sys
def handler(signum, frame):
    print("user handler ran", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, handler)
""" + _script(tmp_path, 10, flush=30.0, after=after)
    proc = spawn(code)
    _wait_line(proc, "logged")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert "user handler ran" in out
    assert proc.returncode == 3
    assert _manifest(tmp_path)["sessions"][-1]["status"] == "interrupted"
    assert Journal(tmp_path).metrics().num_rows == 10


def test_uncaught_exception_marks_failed(tmp_path):
    proc = spawn(_script(tmp_path, 7, flush=30.0, after="raise RuntimeError('boom')"))
    proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert _manifest(tmp_path)["sessions"][-1]["status"] == "failed"
    assert Journal(tmp_path).metrics().num_rows == 7


def test_resume_after_kill_continues_seq(tmp_path):
    proc = spawn(_script(tmp_path, 1000, flush=0.1, after="time.sleep(600)"))
    _wait_line(proc, "logged")
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # a new job with the same run id (as after a time limit) appends a session
    lg = MLFlowLogger(savedir=tmp_path, experiment_name="exp", run_id="r1")
    lg.create_logger_context()
    for i in range(1000, 1500):
        lg.log(float(i), "loss", step=i)
    lg.destroy_logger_context()
    m = Journal(tmp_path).metrics()
    assert m["seq"].to_pylist() == list(range(1, 1501))
    assert m["step"].to_pylist() == list(range(1500))
    sessions = _manifest(tmp_path)["sessions"]
    assert [s["status"] for s in sessions] == ["running", "finished"]
    assert sessions[1]["first_seq"] == 1001
    assert verify(tmp_path) == []


def test_rollover_seals_segments_with_a_hash_chain(tmp_path):
    lg = MLFlowLogger(savedir=tmp_path, experiment_name="exp", run_id="r1")
    lg.create_logger_context()
    lg._writer.seal_records = 1000
    for i in range(5500):
        lg.log(float(i), "loss", step=i)
        if i % 1000 == 999:
            lg._writer.flush()
    lg.destroy_logger_context()
    rank_dir = tmp_path / "exp" / "r1" / "rank-00000"
    index = [json.loads(x) for x in (rank_dir / "index.jsonl").read_text().splitlines()]
    assert [e["count"] for e in index] == [1000] * 5 + [500]
    assert index[0]["prev"] == ""
    assert all(e["prev"] for e in index[1:])
    assert [e["first_seq"] for e in index] == [1, 1001, 2001, 3001, 4001, 5001]
    table = pq.read_table(rank_dir / "segments" / "000002.parquet")
    assert table["seq"][0].as_py() == 1001 and table.num_rows == 1000
    assert verify(tmp_path) == []


def _small_run(tmp_path):
    lg = MLFlowLogger(savedir=tmp_path, experiment_name="exp", run_id="r1")
    lg.create_logger_context()
    for i in range(100):
        lg.log(float(i), "loss", step=i)
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x00\x01" * 1000)
    lg.log(str(src), "ckpt", kind="artifact")
    lg.destroy_logger_context()
    return tmp_path / "exp" / "r1" / "rank-00000"


def test_verify_reports_a_tampered_segment(tmp_path):
    rank_dir = _small_run(tmp_path)
    assert verify(tmp_path) == []
    seg = rank_dir / "segments" / "000001.parquet"
    table = pq.read_table(seg)
    values = table["value"].to_pylist()
    values[5] = 42.0
    import pyarrow as pa

    pq.write_table(table.set_column(6, "value", pa.array(values, pa.float64())), seg)
    problems = verify(tmp_path)
    assert any("sha256 differs" in p.message and p.severity == "error" for p in problems)


def test_verify_reports_a_tampered_blob_and_a_broken_chain(tmp_path):
    rank_dir = _small_run(tmp_path)
    blob = next((rank_dir / "blobs").glob("*/*"))
    blob.write_bytes(b"not the original")
    index = rank_dir / "index.jsonl"
    first = json.loads(index.read_text().splitlines()[0])
    first["prev"] = "0" * 64
    index.write_text(json.dumps(first) + "\n")
    messages = [p.message for p in verify(tmp_path)]
    assert any("blob content does not match" in m for m in messages)
    assert any("hash chain broken" in m for m in messages)


def test_verify_reports_a_corrupt_line_in_an_active_segment(tmp_path):
    lg = MLFlowLogger(savedir=tmp_path, experiment_name="exp", run_id="r1")
    lg.create_logger_context()
    for i in range(10):
        lg.log(float(i), "loss", step=i)
    lg._writer.flush()
    seg = next((tmp_path / "exp" / "r1" / "rank-00000" / "segments").glob("*.jsonl"))
    lines = seg.read_bytes().split(b"\n")
    lines[3] = b"garbage"
    seg.write_bytes(b"\n".join(lines))
    problems = verify(tmp_path)
    assert any(p.severity == "error" and "line 4" in p.message for p in problems)
    lg._writer._closed = True  # leave the damaged segment as it is


def test_importing_the_journal_imports_no_tracker_or_torch():
    # numpy is not checked: pyarrow itself imports it.
    code = ("import sys, itwinai_journal, itwinai_journal.loggers\n"
            "bad = [m for m in ('mlflow', 'wandb', 'tensorboard', 'yprov4ml', 'prov4ml', 'torch',"
            " 'matplotlib', 'PIL', 'pandas') if m in sys.modules]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("bad", ["../escape", "a/b", ".hidden", "x\x00y", ""])
def test_bad_run_ids_are_refused(tmp_path, bad):
    lg = MLFlowLogger(savedir=tmp_path, run_id=bad)
    with pytest.raises((ValueError, TypeError)):
        lg.create_logger_context()
    assert not any(p for p in tmp_path.parent.iterdir() if p.name == "escape")
