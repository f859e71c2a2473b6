"""`--watch` against runs that are still being written by other processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import child_env, spawn
from test_tensorboard_export import accumulate, assert_complete, assert_scalars_exact, rank_dir

from itwinai_journal import Journal

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
