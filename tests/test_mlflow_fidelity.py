"""MLflow as the online MLFlowLogger of itwinai 0.4.2 would have left it, and the MLflow target's
own failure modes: one run for a one-rank run, MLflow's system tags, params as MLflow stores
them, artifact paths as itwinai writes them (compared with what itwinai 0.4.2 itself stores,
recorded in tests/reference/ by scripts/record_itwinai_reference.py), model
names and metric keys MLflow refuses or merges, `--ranks 0` then all ranks, a store killed while
being created, and a tracking server that is not there."""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow_reference
import pytest
import recordings
import torch
from click.testing import CliRunner
from conftest import child_env, spawn
from mlflow_server import hermetic_mlflow_env
from test_fault_injection import check_mlflow_exact, mlflow_runs_of, write_journal
from test_mlflow_export import runs_by_role

from itwinai_journal import Journal
from itwinai_journal.loggers import MLFlowLogger
from itwinai_sync.cli import main

mlflow = pytest.importorskip("mlflow")
MlflowClient = mlflow.MlflowClient


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def sync_ok(*args: object) -> str:
    code, out = cli(*args)
    assert code == 0 and "FAILED" not in out, out
    return out


def embedded(savedir: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")


# -- side by side with itwinai 0.4.2 ----------------------------------------------------------


def test_the_export_holds_what_itwinais_own_logger_stores(tmp_path):
    ours = mlflow_reference.describe_store(Path(sys.executable), "journal", tmp_path)
    assert ours.pop("run_name") == "kinds"
    assert ours == recordings.load("mlflow")


def test_system_tags_come_from_the_journal(tmp_path, monkeypatch):
    """mlflow.user, mlflow.source.name/type and, when the job ran in a git checkout,
    mlflow.source.git.commit: the UI's User and Source columns, as the online logger fills
    them."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    monkeypatch.chdir(repo)
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "tags", "r", 5)
    sync_ok(savedir, "--to", "mlflow")
    (run,) = mlflow_runs_of(embedded(savedir), "tags", "r")
    tags = run.data.tags
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"] == sys.argv[0]
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.git.commit"] == commit
    assert "mlflow.parentRunId" not in tags and run.info.run_name == "r run"


# -- names MLflow refuses or would merge ------------------------------------------------------


def test_model_names_mlflow_refuses_are_mapped_and_what_follows_arrives(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="models", run_id="m")
    lg.create_logger_context()
    for i, name in enumerate(("model.pt", "checkpoints/best", "model:v1")):
        torch.manual_seed(i)
        lg.log(torch.nn.Linear(2, 2), name, kind="model")
        lg.log(float(i), "after", step=i)
    lg.destroy_logger_context()
    out = sync_ok(savedir, "--to", "mlflow")
    for name, mapped in (("model.pt", "model_pt"), ("checkpoints/best", "checkpoints_best"),
                         ("model:v1", "model_v1")):
        assert f"model name {name!r} is stored as {mapped!r}" in out, out
    client = embedded(savedir)
    (run,) = mlflow_runs_of(client, "models", "m")
    models = client.search_logged_models([run.info.experiment_id])
    assert sorted(m.name for m in models) == ["checkpoints_best", "model_pt", "model_v1"]
    assert {str(m.status) for m in models} == {"READY"}
    assert [h.value for h in client.get_metric_history(run.info.run_id, "after")] == [0, 1, 2]
    assert "up-to-date" in sync_ok(savedir, "--to", "mlflow")
    assert len(client.search_logged_models([run.info.experiment_id])) == 3


def log_points(savedir: Path, name: str, offset: float) -> None:
    lg = MLFlowLogger(savedir=savedir, experiment_name="keys", run_id="k")
    lg.create_logger_context()
    for step in range(5):
        lg.log(offset + step, name, step=step)
    lg.destroy_logger_context()


def key_histories(client: MlflowClient) -> dict[str, list[float]]:
    (run,) = [r for r in mlflow_runs_of(client, "keys", "k") if r.data.metrics]
    return {key: [h.value for h in sorted(client.get_metric_history(run.info.run_id, key),
                                          key=lambda h: h.step)]
            for key in run.data.metrics}


def test_two_names_mapped_to_one_key_stay_two_series(tmp_path):
    """`loss@val` and `loss#val` both become `loss_val`: the second name (in journal order)
    gets a key of its own, the same in every sync, and the summary says so."""
    savedir = tmp_path / "mllogs"
    log_points(savedir, "loss@val", 0.0)
    out = sync_ok(savedir, "--to", "mlflow")
    assert "'loss@val' is stored as 'loss_val'" in out
    log_points(savedir, "loss#val", 100.0)  # a later session, a later sync
    out = sync_ok(savedir, "--to", "mlflow")
    histories = key_histories(embedded(savedir))
    (other,) = set(histories) - {"loss_val"}
    assert other.startswith("loss_val-")
    assert f"'loss#val' is stored as {other!r}: 'loss@val' is stored as 'loss_val'" in out
    assert histories == {"loss_val": [0.0, 1.0, 2.0, 3.0, 4.0],
                         other: [100.0, 101.0, 102.0, 103.0, 104.0]}
    fresh = tmp_path / "fresh.db"  # all at once into another store: the same keys
    sync_ok(savedir, "--to", "mlflow", "--tracking-uri", f"sqlite:///{fresh}")
    assert key_histories(MlflowClient(f"sqlite:///{fresh}")) == histories


def test_ranks_0_then_all_ranks_puts_rank_0_once(tmp_path):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "ranks", "r", 200, ranks=(0, 1))
    sync_ok(savedir, "--to", "mlflow", "--ranks", "0")
    client = embedded(savedir)
    (alone,) = mlflow_runs_of(client, "ranks", "r")
    assert alone.info.run_name == "r run" and "mlflow.parentRunId" not in alone.data.tags
    sync_ok(savedir, "--to", "mlflow")
    check_mlflow_exact(client, savedir, "ranks", "r")  # one parent, one run per rank
    roles = runs_by_role(client, "ranks")
    (parent,) = roles[("parent", None)]
    (rank0,) = roles[("rank", "0")]
    assert rank0.info.run_id == alone.info.run_id  # the same run, now nested
    assert rank0.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert rank0.info.run_name == "worker_0"


def test_a_user_keyword_named_targets_is_not_a_route(tmp_path):
    """Routes are meta's top-level `targets`, which only the writer sets; a keyword argument
    of that name is kept under meta's `kwargs` and routes nothing."""
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="kw", run_id="t")
    lg.create_logger_context()
    lg.log(0.5, "acc", step=1, targets=["wandb"])
    lg.log("text", "notes.txt", kind="text", targets="nowhere")
    lg.destroy_logger_context()
    meta = Journal(savedir).records(run_id="t")["meta"].to_pylist()
    assert [json.loads(m)["kwargs"]["targets"] for m in meta] == [["wandb"], "nowhere"]
    out = sync_ok(savedir, "--to", "mlflow")
    assert "exported 2 records (1 metric, 1 text)" in out
    (run,) = mlflow_runs_of(embedded(savedir), "kw", "t")
    assert run.data.metrics == {"acc": 0.5}


# -- the embedded store, and a server that is not there --------------------------------------

KILLED_IN_MIGRATIONS = """
import os, sys
from alembic.ddl.impl import DefaultImpl
real_create_table = DefaultImpl.create_table
def create_table(self, table, **kw):
    real_create_table(self, table, **kw)
    if table.name.startswith("_alembic_tmp_"):
        os._exit(9)  # killed while MLflow rebuilds a table to create its schema
DefaultImpl.create_table = create_table
from itwinai_sync.cli import main
sys.argv = ["itwinai-sync", {savedir!r}, "--to", "mlflow"]
main()
"""


def test_a_sync_killed_while_creating_the_embedded_store_leaves_it_usable(tmp_path):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "fresh", "r", 300)
    proc = spawn(KILLED_IN_MIGRATIONS.format(savedir=str(savedir)),
                 MLFLOW_DISABLE_TELEMETRY="true")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 9, err
    sync_ok(savedir, "--to", "mlflow")
    check_mlflow_exact(embedded(savedir), savedir, "fresh", "r")
    assert not list(savedir.glob(".mlflow.db.*"))  # the half-built copy is gone


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("uri, why", [
    (f"http://127.0.0.1:{closed_port()}", "connection refused"),
    ("http://no-such-host.invalid:5000", "host 'no-such-host.invalid' not found"),
])
def test_an_unreachable_tracking_server_is_one_line_not_minutes_of_retries(tmp_path, uri, why):
    savedir = tmp_path / "mllogs"
    for run_id in ("a", "b"):
        write_journal(savedir, "away", run_id, 5)
    proc = subprocess.run(
        [sys.executable, "-m", "itwinai_sync.cli", str(savedir), "--to", "mlflow",
         "--tracking-uri", uri], capture_output=True, text=True,
        env=hermetic_mlflow_env(child_env()), timeout=120)  # MLflow's retries took 248 s
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert failed == [f"FAILED  away/{r} -> mlflow: cannot reach the MLflow tracking server at "
                      f"{uri}: {why}" for r in ("a", "b")], proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not os.path.exists(savedir / "mlflow.db")
