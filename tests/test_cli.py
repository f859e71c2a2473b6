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
    assert synced == {"records": 20, "of": 20, "ranks": 1}
    assert rows["b"]["synced"] == {}
    assert "synced to tensorboard:" in invoke("ls", str(savedir)).output
    # a ledger file that is not a ledger entry is skipped: the ledger only mirrors the targets
    (ledger_file,) = [p for p in (savedir / ".sync").glob("*/*.json") if p.name != "target.json"]
    for junk in ("[1, 2]", '{"cursors": {}}', "{not json"):
        (ledger_file.parent / "junk.json").write_text(junk)
        result = invoke("ls", str(savedir), "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == list(rows.values())


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


def _hand_made_rank(run_dir, rank, sessions, index_last_seq=None):
    rank_dir = run_dir / f"rank-{rank:05d}"
    (rank_dir / "segments").mkdir(parents=True)
    (rank_dir / "manifest.json").write_text(json.dumps(
        {"rank": rank, "destinations": {"mlflow": {}}, "sessions": sessions}))
    if index_last_seq is not None:
        (rank_dir / "index.jsonl").write_text(
            json.dumps({"segment": 1, "first_seq": 1, "last_seq": 7}) + "\n"
            + json.dumps({"segment": 2, "first_seq": 8, "last_seq": index_last_seq}) + "\n")


def test_ls_finds_runs_down_to_the_layouts_depth_and_counts_from_manifests_and_indexes(tmp_path):
    """Run discovery matches an os.walk over the tree (no descent into runs or hidden
    directories); counts take the larger of the closed sessions' last_seq and the index's.
    (Runs named like journal directories and symlinked experiments: test_untrusted_journal.)"""
    import os

    from itwinai_journal import Journal
    from itwinai_journal.read.journal import find_run_dirs

    savedir = tmp_path / "mllogs"
    run_dirs = [savedir / "exp" / "r1", savedir / "prov_logs" / "deep" / "exp" / "r2"]
    for d in run_dirs:
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"experiment": "exp", "run_id": d.name}))
    _hand_made_rank(run_dirs[0], 0, [{"status": "finished", "last_seq": 30}], index_last_seq=30)
    _hand_made_rank(run_dirs[0], 1, [{"status": "finished", "last_seq": 5},
                                     {"status": "running"}], index_last_seq=12)
    (run_dirs[0] / "rank-00002").mkdir()  # no manifest yet
    _hand_made_rank(run_dirs[1], 0, [{"status": "failed", "last_seq": 3}])
    (savedir / ".hidden/exp/r3").mkdir(parents=True)
    (savedir / ".hidden/exp/r3/run.json").write_text("{}")

    def walked(top):
        for root, dirs, files in os.walk(top):
            if "run.json" in files:
                dirs[:] = []
                yield root
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))

    assert [str(d) for d in find_run_dirs(savedir)] == list(walked(savedir)) \
        == [str(d) for d in run_dirs]
    assert list(find_run_dirs(run_dirs[0])) == [run_dirs[0]]
    assert list(find_run_dirs(tmp_path / "missing")) == []

    r1, r2 = Journal(savedir).runs()
    assert [(r.rank, r.path, r.status, r.last_seq) for r in r1.ranks] == [
        (0, run_dirs[0] / "rank-00000", "finished", 30),
        (1, run_dirs[0] / "rank-00001", "running", 12),
        (2, run_dirs[0] / "rank-00002", "running", 0)]
    assert r1.ranks[2].manifest == {} and r1.records == 42 and r2.status == "failed"
    rows = json.loads(invoke("ls", str(savedir), "--json").output)
    assert [(r["run_id"], r["status"], r["ranks"], r["records"]) for r in rows] == [
        ("r1", "running", 3, 42), ("r2", "failed", 1, 3)]


def test_ls_imports_no_sync_engine_exporter_or_view(tmp_path):
    """`ls` starts fast: the sync engine, views, pyarrow.compute and exporter plugins (each
    with its option definitions) are only imported by the commands that use them."""
    savedir = tmp_path / "mllogs"
    _journal(savedir, "a", experiment_name="exp")
    code = ("import sys\nfrom itwinai_sync.cli import main\n"
            f"main(['ls', {str(savedir)!r}], standalone_mode=False)\n"
            "print(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert "a  finished  1 rank(s)  20 records  -> mlflow" in proc.stdout
    loaded = set(proc.stdout.split("\n")[-2].split())
    for module in ("itwinai_sync.engine", "itwinai_sync.inspect", "itwinai_sync.targets.mlflow",
                   "itwinai_sync.targets.wandb", "itwinai_sync.targets.tensorboard",
                   "itwinai_sync.targets.prov4ml",
                   "pyarrow.compute", "filelock", "mlflow", "wandb", "torch"):
        assert module not in loaded
