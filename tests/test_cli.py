"""The itwinai-sync command line: inspection commands, exit codes, errors in one line."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from itwinai_journal import __version__
from itwinai_journal.loggers import MLFlowLogger, TensorBoardLogger
from itwinai_sync.cli import main


def _journal(savedir, run_id="r1", n=20, cls=MLFlowLogger, **kwargs):
    lg = cls(savedir=savedir, run_id=run_id, log_freq="batch", **kwargs)
    lg.create_logger_context()
    for i in range(n):
        lg.log(float(i), "loss", step=i)
    lg.destroy_logger_context()


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_version_and_help():
    assert __version__ in invoke("--version").output
    out = invoke("sync", "--help").output
    for text in ("--to", "mlflow", "tensorboard", "wandb", "--tracking-uri", "--logdir",
                 "--dry-run", "--watch", "--ranks"):
        assert text in out


def test_ls_shows_runs_status_records_and_sync_progress(tmp_path):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    _journal(savedir, "b", n=5, cls=TensorBoardLogger)
    out = invoke("ls", str(savedir)).output
    assert "exp" in out and "unnamed-experiment" in out
    assert "a  finished  1 rank(s)  20 records  -> mlflow" in out
    assert "b  finished  1 rank(s)  5 records  -> tensorboard" in out
    assert invoke(str(savedir), "--to", "tensorboard", "--run", "a").exit_code == 0
    rows = {r["run_id"]: r for r in json.loads(invoke("ls", str(savedir), "--json").output)}
    (synced,) = rows["a"]["synced"].values()
    assert synced == {"records": 20, "ranks": 1}
    assert rows["b"]["synced"] == {}
    assert "synced to tensorboard:" in invoke("ls", str(savedir)).output


def test_show_prints_manifest_kinds_and_last_values(tmp_path):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp", run_name="nice")
    out = invoke("show", str(savedir), "a").output
    assert "exp / a" in out and "run_name: nice" in out
    assert "records: 20 metric" in out
    assert "loss = 19" in out and "(step 19)" in out
    result = invoke("show", str(savedir), "nope")
    assert result.exit_code == 1 and "no run 'nope'" in result.output


def test_verify_exit_codes(tmp_path):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    ok = invoke("verify", str(savedir))
    assert ok.exit_code == 0 and "0 error(s)" in ok.output
    seg = next(savedir.glob("exp/a/rank-00000/segments/*.parquet"))
    seg.write_bytes(seg.read_bytes()[:-10] + b"0123456789")
    bad = invoke("verify", str(savedir))
    assert bad.exit_code == 1 and str(seg) in bad.output


def test_errors_are_one_line(tmp_path):
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    result = invoke(str(savedir), "--to", "nosuchtracker")
    assert result.exit_code != 0 and "unknown target 'nosuchtracker'" in result.output
    assert "Traceback" not in result.output
    proc = subprocess.run([sys.executable, "-m", "itwinai_sync.cli", str(tmp_path / "missing"),
                           "--to", "mlflow"], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = invoke(str(savedir), "--run", "zzz", "--to", "tensorboard")
    assert result.exit_code == 1 and "error: no run zzz" in result.output


def test_no_declared_destination_says_so(tmp_path):
    savedir = tmp_path / "mllogs"
    from itwinai_journal.loggers import ConsoleLogger

    lg = ConsoleLogger(savedir=savedir, run_id="c")
    lg.create_logger_context()
    lg.log(1.0, "x")
    lg.destroy_logger_context()
    out = invoke(str(savedir)).output
    assert "no runs with declared destinations (use --to)" in out
