"""The example training job under a real launcher: `torchrun --standalone --nproc_per_node=4`,
gloo on CPU. Four processes journal one run (one rank directory each, one run id), and the sync
turns it into one MLflow parent with four worker runs and four TensorBoard directories."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT, child_env
from mlflow_server import hermetic_mlflow_env
from test_mlflow_export import assert_histories_equal_journal, runs_by_role
from test_tensorboard_export import accumulate, assert_complete, assert_scalars_exact, rank_dir

from itwinai_journal import Journal, verify
from itwinai_sync.cli import main

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("torch")

RUN_ID = "torchrun-4ranks"
EXPERIMENT = "itwinai-sync-demo"  # the example's default --experiment
WORLD = 4
PARAMS = {"lr": 0.05, "batch_size": 64, "epochs": 1, "optimizer": "SGD"}


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for var in ("ITWINAI_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID",
                "WORLD_SIZE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)


def loopback_only(cmd: list[str]) -> list[str]:
    """`cmd` in a private network namespace with only loopback, when the system allows it:
    torchrun's rendezvous store (a c10d TCPStore) listens on all interfaces, whatever the
    endpoint, and nothing of this test should be reachable from outside. Gloo is kept on `lo`
    by GLOO_SOCKET_IFNAME either way."""
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"],
                               capture_output=True)
        if probe.returncode == 0:
            return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *cmd]
    return cmd


@pytest.fixture(scope="module")
def journal(tmp_path_factory) -> Path:
    """Run the example once for the module: 4 ranks, 1 epoch."""
    savedir = tmp_path_factory.mktemp("torchrun") / "mllogs"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = hermetic_mlflow_env(child_env(ITWINAI_RUN_ID=RUN_ID, GLOO_SOCKET_IFNAME="lo",
                                        OMP_NUM_THREADS="1"))
    proc = subprocess.Popen(
        loopback_only([str(torchrun), "--standalone", f"--nproc_per_node={WORLD}",
                       str(ROOT / "scripts" / "train_example.py"), "--savedir", str(savedir),
                       "--epochs", "1"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=savedir.parent,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # timed out: stop torchrun and its workers
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{out}\n{err[-5000:]}"
    assert f"logged run {RUN_ID} into {savedir}/" in out
    return savedir


def sync(savedir: Path, *args: str) -> str:
    result = CliRunner().invoke(main, [str(savedir), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "FAILED" not in result.output
    return result.output


def test_four_ranks_journal_one_run(journal):
    (run,) = Journal(journal).runs()
    assert (run.experiment, run.run_id, run.status) == (EXPERIMENT, RUN_ID, "finished")
    assert run.info["run_name"] == "demo"
    assert [r.rank for r in run.ranks] == list(range(WORLD))
    for rank in run.ranks:
        m = rank.manifest
        assert (m["rank"], m["world_size"]) == (rank.rank, WORLD)
        assert m["job"]["ITWINAI_RUN_ID"] == RUN_ID and m["job"]["RANK"] == str(rank.rank)
        assert sorted(m["destinations"]) == ["mlflow", "tensorboard", "wandb"]
        assert [s["status"] for s in m["sessions"]] == ["finished"]
        records = Journal(journal).records(run_id=RUN_ID, rank=rank.rank).to_pylist()
        kinds = Counter(r["kind"] for r in records)
        assert kinds == {"param": 4, "metric": kinds["metric"], "figure": 1, "image": 1,
                         "artifact": 1, "model": 1}, kinds
        params = {r["name"]: json.loads(r["text"]) for r in records if r["kind"] == "param"}
        assert params == PARAMS
        metrics = Counter(r["name"] for r in records if r["kind"] == "metric")
        # 2048 samples / 4 ranks / batch 64 = 8 batches, logged at batch_idx 0 and 5
        assert metrics == {"train_loss": 2, "epoch_loss": 1, "epoch_accuracy": 1}, metrics
        by_kind = {r["kind"]: r for r in records}
        assert by_kind["figure"]["name"] == "loss_curve"
        assert by_kind["image"]["name"] == "first_layer_weights"
        assert by_kind["artifact"]["name"] == "checkpoints"
        assert json.loads(by_kind["model"]["meta"])["class"].endswith("Sequential")
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    # the ranks trained on different shards: their losses differ
    losses = {r: tuple(Journal(journal).metrics(run_id=RUN_ID, rank=r, name="train_loss")
                       ["value"].to_pylist()) for r in range(WORLD)}
    assert len(set(losses.values())) == WORLD
    assert verify(journal) == []


def test_mlflow_one_parent_with_four_workers(journal):
    out = sync(journal, "--to", "mlflow")
    assert f"synced     {EXPERIMENT}/{RUN_ID} -> mlflow" in out
    client = mlflow.MlflowClient(f"sqlite:///{journal.resolve()}/mlflow.db")
    roles = runs_by_role(client, EXPERIMENT)
    assert sorted(roles) == sorted([("parent", None)] + [("rank", str(r)) for r in range(WORLD)])
    assert all(len(runs) == 1 for runs in roles.values())
    (parent,) = roles[("parent", None)]
    assert parent.info.run_name == "demo"
    assert parent.data.tags["itwinai.world_size"] == str(WORLD)
    assert parent.info.status == "FINISHED"
    for r in range(WORLD):
        (child,) = roles[("rank", str(r))]
        assert child.info.run_name == f"worker_{r}"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags.get("itwinai.main") == ("true" if r == 0 else None)
        assert child.info.status == "FINISHED"
        assert child.data.params == {k: str(v) for k, v in PARAMS.items()}
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"loss_curve.png", "first_layer_weights.png", "checkpoints"} <= artifacts
    assert_histories_equal_journal(client, journal, run_id=RUN_ID, experiment=EXPERIMENT)
    exp = client.get_experiment_by_name(EXPERIMENT)
    models = client.search_logged_models([exp.experiment_id])
    children = {roles[("rank", str(r))][0].info.run_id for r in range(WORLD)}
    assert sorted(m.source_run_id for m in models) == sorted(children)
    assert "up-to-date" in sync(journal, "--to", "mlflow")


def test_tensorboard_four_rank_directories(journal):
    sync(journal, "--to", "tensorboard")
    run_dir = rank_dir(journal, RUN_ID, 0).parent
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [
        f"rank-{r:05d}" for r in range(WORLD)]
    for r in range(WORLD):
        path = rank_dir(journal, RUN_ID, r)
        acc = accumulate(path)
        assert assert_scalars_exact(acc, journal, RUN_ID, r) == 4
        assert_complete(path, journal, RUN_ID, r)
        assert sorted(acc.Tags()["images"]) == ["first_layer_weights", "loss_curve"]
