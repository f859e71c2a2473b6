"""`itwinai-sync --to wandb`, offline: real loggers write journals in tmp_path, the CLI exports
them, and the `.wandb` transaction logs W&B wrote are decoded with W&B's own protobuf
definitions (tests/wandb_records.py) to check exactly what `wandb sync` would upload.

Never online: WANDB_MODE=offline and every W&B directory points into tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np
import plotly.graph_objects as go
import pytest
import torch
import wandb_records as wr
from click.testing import CliRunner
from conftest import child_env, train_watched_linear

from itwinai_journal import Journal
from itwinai_journal.loggers import LoggersCollection, MLFlowLogger, WandBLogger
from itwinai_sync.api import ExportError
from itwinai_sync.cli import main
from itwinai_sync.targets.wandb import logfile
from itwinai_sync.targets.wandb.logfile import committed_state
from itwinai_sync.targets.wandb.rows import wandb_run_id

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline and silent, its directories in tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp_path / "wandb-env" / var.lower()
        path.mkdir(parents=True)
        monkeypatch.setenv(var, str(path))


def sync(savedir: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, [str(savedir), "--to", "wandb", *args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def wandb_id(savedir: Path, run_id: str, rank: int) -> str:
    """The W&B run id of a journal rank (derived from the journal's identity)."""
    return wandb_run_id(Journal(savedir).run(run_id).journal_id, rank)


def wandb_files(savedir: Path, wb_id: str) -> list[Path]:
    return wr.find_run_files(savedir / "wandb", run_id=wb_id)


def history(files: list[Path]) -> list[dict]:
    return [row for f in files for row in wr.history_rows(wr.read_records(f))]


def points(rows: list[dict]) -> Counter:
    """(journal step, key) occurrences of user values in history rows."""
    return Counter((row.get("itwinai/step"), k) for row in rows for k in row
                   if not k.startswith("_") and k != "itwinai/step")


def journal(savedir: Path) -> list[dict]:
    return Journal(savedir).records().to_pylist()


# --------------------------------------------------------------------------------------------


def test_export_history_config_media_artifacts(tmp_path):
    savedir = tmp_path / "mllogs"
    mlf = MLFlowLogger(savedir=savedir, experiment_name="mlexp", log_freq="batch")
    wbl = WandBLogger(savedir=savedir, project_name="wbproj", log_freq="batch")
    loggers = LoggersCollection([mlf, wbl])
    loggers.create_logger_context()
    loggers.save_hyperparameters({"lr": 0.01, "layers": [64, 32], "optim": "adam"})
    for step in range(5):
        loggers.log(1.0 / (step + 1), "loss", step=step)
        loggers.log(0.1 * step, "acc", step=step)
    loggers.log(np.full((8, 6, 3), 200, dtype=np.uint8), "sample", kind="image", step=4)
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    loggers.log(fig, "curve", kind="figure", step=4)
    plt.close(fig)
    loggers.log(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])), "interactive", kind="figure",
                step=4)
    loggers.log("epoch <5> done", "status", kind="text", step=4)
    loggers.log({"a": 1, "b": {"c": [1, 2]}}, "report", kind="dict", step=4)
    state = torch.nn.Linear(2, 2).state_dict()
    torch.save(state, tmp_path / "w.pt")
    loggers.log(state, "weights", kind="torch")
    run_id = loggers.run_id
    loggers.destroy_logger_context()

    out = sync(savedir)
    assert "exported" in out
    wb_id = wandb_id(savedir, run_id, 0)
    files = wandb_files(savedir, wb_id)
    assert len(files) == 1 and files[0].parent.parent == savedir / "wandb"
    records = wr.read_records(files[0])
    run_rec = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run_rec.project, run_rec.run_group, run_rec.display_name) == (
        "wbproj", run_id, f"{run_id}-rank0")
    # the training's start, machine and program, from the manifest (not the sync machine's)
    manifest = Journal(savedir).run(run_id).rank(0).manifest
    session = manifest["sessions"][0]
    assert run_rec.start_time.ToMicroseconds() == int(session["start"] * 1e6)
    (env,) = [r.environment for r in records if r.WhichOneof("record_type") == "environment"]
    assert env.started_at.ToMicroseconds() == int(session["start"] * 1e6)
    assert (env.host, env.username, env.os, env.executable) == (
        session["host"], manifest["user"], manifest["os"], manifest["executable"])
    assert env.python == f"{manifest['python_implementation']} {manifest['versions']['python']}"
    assert [env.program, *env.args] == [
        os.path.normpath(os.path.join(session["cwd"], session["argv"][0])), *session["argv"][1:]]
    assert env.root == session["cwd"] and env.git.commit == (manifest["git_commit"] or "")

    recs = journal(savedir)
    rows = history(files)
    assert [r["_step"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows:
        step = row["itwinai/step"]
        assert row["loss"] == 1.0 / (step + 1) and row["acc"] == 0.1 * step
        times = [r["time"] for r in recs if r["step"] == step or
                 (step == 4 and r["step"] is None and r["kind"] != "param")]
        assert row["_timestamp"] == max(times)
    last = rows[-1]
    assert last["sample"]["_type"] == "image-file"
    assert (last["sample"]["width"], last["sample"]["height"]) == (6, 8)
    assert last["curve"]["_type"] == "image-file"
    assert last["interactive"]["_type"] == "plotly-file"
    # as wandb.log({identifier: item}) stores them: the string, nested keys, the tensors
    assert last["status"] == "epoch <5> done"
    assert last["report"] == {"a": 1, "b": {"c": [1, 2]}}
    weights = torch.load(tmp_path / "w.pt", weights_only=True)
    assert last["weights"]["weight"] == weights["weight"].tolist()
    assert last["weights"]["bias"] == weights["bias"].tolist()

    config = wr.config(records)
    assert {k: config[k] for k in ("lr", "layers", "optim")} == {
        "lr": 0.01, "layers": [64, 32], "optim": "adam"}
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    torch_art = next(a for a in artifacts if a.name == "weights")
    assert torch_art.type == "torch"
    (entry,) = torch_art.manifest.contents
    record = next(r for r in recs if r["name"] == "weights")
    assert Path(entry.local_path).name == record["blob"]  # the blob itself, not a copy
    assert wr.summary(records)["_itwinai_seq"] == max(r["seq"] for r in recs)

    # Nothing new: no new W&B run directory, nothing exported.
    assert "up-to-date" in sync(savedir)
    assert wandb_files(savedir, wb_id) == files


def test_one_wandb_run_per_rank_grouped_by_the_journal_run(tmp_path):
    savedir = tmp_path / "mllogs"
    for rank in (0, 1):
        logger = WandBLogger(savedir=savedir, project_name="ddp", run_id="job7",
                             log_on_workers=-1)
        logger.create_logger_context(rank=rank)
        logger.log(float(rank), "loss", step=0)
        logger.destroy_logger_context()
    sync(savedir, "--ranks", "0")
    assert not wandb_files(savedir, wandb_id(savedir, "job7", 1))
    sync(savedir)
    for rank in (0, 1):
        (path,) = wandb_files(savedir, wandb_id(savedir, "job7", rank))
        records = wr.read_records(path)
        run_rec = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run_rec.run_group, run_rec.display_name) == ("job7", f"job7-rank{rank}")
        assert [r["loss"] for r in wr.history_rows(records)] == [float(rank)]


def test_offline_by_default_even_with_an_api_key(tmp_path, monkeypatch):
    """The default is offline files whatever the environment holds (an API key, a netrc,
    WANDB_MODE=online): a sync never goes online, nor waits for a server, unless --mode online
    asks for it; the summary says where the runs are and how to upload them."""
    from itwinai_sync.targets.wandb.exporter import WandbExporter

    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password k3y\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    assert WandbExporter(tmp_path, {}, None).mode == "offline"
    assert WandbExporter(tmp_path, {"mode": "online"}, None).mode == "online"
    savedir = tmp_path / "mllogs"
    _log_steps(savedir, "key", range(3))
    out = sync(savedir)
    assert "exported 6 records (6 metric)" in out
    assert f"offline runs written to {savedir / 'wandb'}" in out and "wandb sync" in out
    (path,) = wandb_files(savedir, wandb_id(savedir, "key", 0))
    assert path.parent.name.startswith("offline-run-")
    assert [r["loss"] for r in history([path])] == [0.0, 1.0, 2.0]


def _log_steps(savedir: Path, run_id: str, steps: range) -> None:
    logger = WandBLogger(savedir=savedir, project_name="resync", run_id=run_id)
    logger.create_logger_context()
    for step in steps:
        logger.log(float(step), "loss", step=step)
        logger.log(step * 2.0, "lr", step=step)
    logger.destroy_logger_context()


def test_resync_appends_only_new_records_to_the_same_run(tmp_path):
    savedir = tmp_path / "mllogs"
    _log_steps(savedir, "job1", range(0, 10))
    sync(savedir)
    _log_steps(savedir, "job1", range(10, 25))  # the job resumed: a new session, seq goes on
    assert "would export 30 metric" in sync(savedir, "--dry-run")
    sync(savedir)
    sync(savedir)

    wb_id = wandb_id(savedir, "job1", 0)
    files = wandb_files(savedir, wb_id)
    assert len(files) == 2  # W&B offline writes one directory per process; same run id
    rows = history(files)
    counts = points(rows)
    assert sum(counts.values()) == len(journal(savedir)) == 50
    assert set(counts.values()) == {1}
    assert [r["_step"] for r in rows] == list(range(25))
    assert [r["_step"] for r in history(files[1:])] == list(range(10, 25))
    assert all(r["loss"] == r["_step"] and r["lr"] == 2 * r["_step"] for r in rows)
    assert committed_state(savedir / "wandb", wb_id, "resync") == (50, 24)


def test_rows_group_records_of_one_step_and_records_without_step(tmp_path):
    """A record joins the row being built while it adds a new key at the same journal step; a
    record without step joins any row (and a row of step-less records takes the step of the
    next stepped record). W&B's _step counts rows; the journal step is 'itwinai/step'."""
    savedir = tmp_path / "mllogs"
    logger = WandBLogger(savedir=savedir, project_name="nostep", run_id="n")
    logger.create_logger_context()
    for value in (1.0, 2.0):
        logger.log(value, "a")
        logger.log(-value, "b")
    logger.log(5.0, "a", step=5)
    logger.log(6.0, "b")  # joins step 5, 'b' is not in it yet
    logger.log(7.0, "c", step=6)
    logger.destroy_logger_context()
    sync(savedir)
    rows = history(wandb_files(savedir, wandb_id(savedir, "n", 0)))
    assert [(r["_step"], r.get("itwinai/step"), r.get("a"), r.get("b"), r.get("c"))
            for r in rows] == [(0, None, 1.0, -1.0, None), (1, None, 2.0, -2.0, None),
                               (2, 5, 5.0, 6.0, None), (3, 6, None, None, 7.0)]


def test_live_rank_synced_mid_step_keeps_every_point_once(tmp_path):
    """A live run synced mid-way: what is in the journal is written (its last row at the end
    of the pass); records of the same step that come later are a row of their own at the same
    journal step."""
    savedir = tmp_path / "mllogs"
    logger = WandBLogger(savedir=savedir, project_name="live", run_id="l",
                         flush_interval=0.05)
    logger.create_logger_context()
    for step in range(3):
        logger.log(float(step), "train_loss", step=step)
        logger.log(float(step) / 2, "val_loss", step=step)
    logger.log(3.0, "train_loss", step=3)
    time.sleep(0.5)  # flushed to the journal, the session still open
    sync(savedir)
    wb_id = wandb_id(savedir, "l", 0)
    assert [r["itwinai/step"] for r in history(wandb_files(savedir, wb_id))] == [0, 1, 2, 3]
    logger.log(1.5, "val_loss", step=3)
    logger.log(4.0, "train_loss", step=4)
    logger.destroy_logger_context()
    sync(savedir)
    rows = history(wandb_files(savedir, wb_id))
    assert [(r["_step"], r["itwinai/step"], r.get("train_loss"), r.get("val_loss"))
            for r in rows] == [(0, 0, 0.0, 0.0), (1, 1, 1.0, 0.5), (2, 2, 2.0, 1.0),
                               (3, 3, 3.0, None), (4, 3, None, 1.5), (5, 4, 4.0, None)]


def test_follow_passes_keep_one_wandb_run_open_per_live_rank(tmp_path):
    """`--watch` runs the engine again and again with one exporter: a rank still being
    written keeps its W&B run open between passes (one run directory, not one per pass)."""
    from itwinai_sync.engine import SyncEngine, SyncRequest

    savedir = tmp_path / "mllogs"
    logger = WandBLogger(savedir=savedir, project_name="follow", run_id="f",
                         flush_interval=0.05)
    logger.create_logger_context()
    engine = SyncEngine(SyncRequest(savedir=savedir, targets=["wandb"]))
    try:
        for step in range(4):
            logger.log(float(step), "loss", step=step)
            logger.log(float(step), "acc", step=step)
            time.sleep(0.3)
            (result,) = engine.run()
            assert result.status in ("synced", "up-to-date"), result.error
        logger.destroy_logger_context()
        engine.run()
    finally:
        engine.close()
    files = wandb_files(savedir, wandb_id(savedir, "f", 0))
    assert len(files) == 1
    rows = history(files)
    assert [(r["_step"], r["loss"], r["acc"]) for r in rows] == [
        (s, float(s), float(s)) for s in range(4)]


def test_artifacts_models_and_datasets_of_an_mlflow_journal(tmp_path):
    """`--to wandb` also takes journals written for MLflow: files, directories (rebuilt from
    the tree listing), models and dataset descriptions."""
    savedir = tmp_path / "mllogs"
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(b"\0\1")
    logger = MLFlowLogger(savedir=savedir, experiment_name="arts", run_id="a")
    logger.create_logger_context()
    logger.log(str(src), "checkpoints", kind="artifact")
    logger.log(str(src / "a.txt"), "notes/a.txt", kind="artifact")
    logger.log(torch.nn.Linear(2, 1), "net", kind="model", step=3)
    import mlflow.data

    logger.log(mlflow.data.from_numpy(np.zeros((4, 2)), name="train-set"), "train-set",
               kind="dataset")
    logger.destroy_logger_context()
    assert "'notes/a.txt' is stored as 'notes-a.txt'" in sync(savedir)
    records = wr.read_records(wandb_files(savedir, wandb_id(savedir, "a", 0))[0])
    arts = {r.artifact.name: r.artifact for r in records
            if r.WhichOneof("record_type") == "artifact"}
    assert sorted(arts) == ["checkpoints", "net", "notes-a.txt"]
    tree = {c.path: Path(c.local_path).read_bytes() for c in arts["checkpoints"].manifest.contents}
    assert tree == {"a.txt": b"alpha", "sub/b.bin": b"\0\1"}
    assert (arts["net"].type, sorted(arts["net"].aliases)) == ("model", ["latest", "step-3"])
    assert [c.path for c in arts["net"].manifest.contents] == ["model.pt"]
    described = wr.summary(records)["datasets/train-set"]
    assert json.loads(described["profile"])["features_shape"] == [4, 2]


def test_steps_that_go_back_lose_nothing(tmp_path):
    """The README tour's pattern (batch metrics at the global step, epoch metrics at
    step=epoch) and a step logged twice: W&B keeps every record, in journal order, as
    itwinai's WandBLogger does (it ignores `step`); the charts use the journal step."""
    savedir = tmp_path / "mllogs"
    logger = WandBLogger(savedir=savedir, project_name="reg", run_id="job", log_freq="batch")
    logger.create_logger_context()
    global_step = 0
    for epoch in range(3):
        for batch_idx in range(4):
            logger.log(float(global_step), "train_loss", step=global_step, batch_idx=batch_idx)
            global_step += 1
        logger.log(float(epoch) / 10, "val_acc", step=epoch)
        logger.log(f"epoch {epoch}", "status", kind="text", step=epoch)
    logger.log(99.0, "train_loss", step=11)  # the last step again
    logger.destroy_logger_context()
    out = sync(savedir, "--on-step-regression", "fail")  # accepted, no longer has an effect
    assert "no longer has an effect" in out and "dropped" not in out
    files = wandb_files(savedir, wandb_id(savedir, "job", 0))
    rows = history(files)
    got = [(r["itwinai/step"], k, r[k]) for r in rows for k in ("train_loss", "val_acc",
                                                                 "status") if k in r]
    want = [(r["step"], r["name"], r["value"] if r["kind"] == "metric" else r["text"])
            for r in journal(savedir)]
    assert got == want  # every record once, in journal order
    assert [r["_step"] for r in rows] == list(range(len(rows)))
    metrics = {r.metric.name: r.metric.step_metric for r in wr.read_records(files[0])
               if r.WhichOneof("record_type") == "metric"}
    assert metrics == {"itwinai/step": "", "train_loss": "itwinai/step",
                       "val_acc": "itwinai/step"}


def test_watch_records_histograms_and_they_reach_wandb(tmp_path):
    savedir = tmp_path / "mllogs"
    logger = WandBLogger(savedir=savedir, project_name="watch", run_id="w", log_freq="batch")
    logger.create_logger_context()
    model = train_watched_linear(logger)
    logger.destroy_logger_context()

    recs = journal(savedir)
    (topo,) = [r for r in recs if r["kind"] == "watch"]
    modules = json.loads(topo["text"])["modules"]
    assert modules[0]["class"] == "Linear"
    assert modules[0]["parameters"] == {"weight": [3, 4], "bias": [3]}
    hists = [r for r in recs if r["kind"] == "histogram"]
    numel = {"weight": 12, "bias": 3}
    by_name: dict[str, list[dict]] = {}
    for r in hists:
        by_name.setdefault(r["name"], []).append(r)
        h = json.loads(r["text"])
        assert len(h["bins"]) == 65 and len(h["counts"]) == 64
        assert sum(h["counts"]) == h["num"] == numel[r["name"].split("/")[1]]
        assert h["min"] >= h["bins"][0] and h["max"] <= h["bins"][-1]
        assert r["step"] is None and r["batch_idx"] is None and r["value"] is None
        assert json.loads(r["meta"])["source"] == "watch"
    assert sorted(by_name) == ["gradients/bias", "gradients/weight", "parameters/bias",
                               "parameters/weight"]
    for name, found in by_name.items():
        assert [json.loads(r["meta"])["call"] for r in found] == [1, 2, 3], name
    # The gradient histogram is the gradient backward left in .grad (the last one here).
    last_grad = json.loads(by_name["gradients/bias"][-1]["text"])
    assert last_grad["sum"] == pytest.approx(float(model.bias.grad.sum()), rel=1e-5)

    sync(savedir)
    files = wandb_files(savedir, wandb_id(savedir, "w", 0))
    rows = history(files)
    assert [r["_step"] for r in rows] == [0, 1, 2]
    for name, found in by_name.items():
        got = [r[name] for r in rows if name in r]
        assert [g["_type"] for g in got] == ["histogram"] * 3
        want = [json.loads(r["text"]) for r in found]
        assert [g["values"] for g in got] == [w["counts"] for w in want]
        for g, w in zip(got, want):
            assert g["bins"] == pytest.approx(w["bins"])
    summary = wr.summary(wr.read_records(files[0]))
    assert summary["graph_model"]["_type"] == "graph-file"


def test_watch_hooks_stop_with_the_logger(tmp_path):
    logger = WandBLogger(savedir=tmp_path / "mllogs", project_name="w", run_id="x")
    logger.create_logger_context()
    model = torch.nn.Linear(2, 1)
    logger.log(model, "model", kind="watch", log="parameters", log_freq=2)
    for _ in range(4):
        model(torch.zeros(1, 2))
    logger.destroy_logger_context()
    model(torch.zeros(1, 2))  # after close: no record, and the hooks are removed
    assert not model._forward_hooks
    recs = journal(tmp_path / "mllogs")
    assert [json.loads(r["meta"])["call"] for r in recs if r["kind"] == "histogram"] == [
        2, 2, 4, 4]


def test_watch_rejects_what_wandb_watch_rejects(tmp_path):
    logger = WandBLogger(savedir=tmp_path / "mllogs", project_name="w", run_id="x")
    logger.create_logger_context()
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="log must be one of"):
        logger.log(model, "model", kind="watch", log="weights")
    with pytest.raises(TypeError, match="unexpected keyword"):
        logger.log(model, "model", kind="watch", every=3)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        logger.log([1, 2], "model", kind="watch")
    logger.destroy_logger_context()
    assert journal(tmp_path / "mllogs") == []


def test_killed_export_resumes_exactly_once(tmp_path, monkeypatch):
    savedir = tmp_path / "mllogs"
    steps, names = 4000, ("loss", "acc")
    logger = WandBLogger(savedir=savedir, project_name="kill", run_id="k")
    logger.create_logger_context()
    for step in range(steps):
        for i, name in enumerate(names):
            logger.log(step + i / 10, name, step=step)
    logger.destroy_logger_context()
    wb_id = wandb_id(savedir, "k", 0)

    # wandb-core flushes its transaction log every 15 s by default; 0.2 s here so that the
    # kill lands after some rows are on disk and before all of them are. WANDB_SERVICE (set by
    # the exports this test process ran) is not passed on: the child must start its own
    # wandb-core, in its own process group, so that the kill takes it down too.
    env = {k: v for k, v in child_env().items() if k != "WANDB_SERVICE"}
    env["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"] = "0.2"
    code = f"from itwinai_sync.cli import main; main([{str(savedir)!r}, '--to', 'wandb'])"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            cursor, _ = committed_state(savedir / "wandb", wb_id, "kill")
            if cursor > steps // 4:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the export ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the process group: the child and its wandb-core
        proc.wait()
    killed_at, _ = committed_state(savedir / "wandb", wb_id, "kill")
    assert 0 < killed_at < steps * len(names)

    # The killed export's wandb-core (its own session) lives on for ~2 s and flushes what it
    # buffered: the re-sync must wait for that before reading the cursor. With the 0.2 s flush
    # interval above, 3 s without a change is enough (the default waits 20 s).
    monkeypatch.setattr(logfile, "QUIET_SECONDS", 3.0)
    out = sync(savedir)
    assert "exported" in out and "waited" in out
    files = wandb_files(savedir, wb_id)
    assert len(files) == 2
    rows = history(files)
    counts = Counter((row["itwinai/step"], k) for row in rows for k in names if k in row)
    assert len(counts) == steps * len(names) and set(counts.values()) == {1}
    for row in rows:
        step = row["itwinai/step"]
        assert row["loss"] == step and row["acc"] == step + 0.1
    assert committed_state(savedir / "wandb", wb_id, "kill")[0] == steps * len(names)


def _same(value: object) -> str:
    """A value in a comparable form (W&B stores a whole float like 2.0 as the integer 2)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    return json.dumps(value)


def _spawn_export(savedir: Path) -> subprocess.Popen:
    """An export in a child process and its own process group (with its own wandb-core, see
    test_killed_export_resumes_exactly_once), reading a killed export's log after 3 s of
    quiet instead of 20."""
    env = {k: v for k, v in child_env().items() if k != "WANDB_SERVICE"}
    env["WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"] = "0.2"
    code = ("from itwinai_sync.targets.wandb import logfile; logfile.QUIET_SECONDS = 3.0\n"
            "from itwinai_sync.cli import main\n"
            f"main([{str(savedir)!r}, '--to', 'wandb'])\n")
    return subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_at_random_points_every_record_once(tmp_path, monkeypatch):
    """The README tour's pattern (batch metrics at the global step, epoch metrics, text and a
    dict at step=epoch), exported by processes SIGKILLed at random points and then synced to
    the end: every record of the journal is in W&B exactly once, and W&B's _step runs 0..n-1
    across all the run directories (no row repeated, none missing)."""
    import random

    savedir = tmp_path / "mllogs"
    logger = WandBLogger(savedir=savedir, project_name="killr", run_id="k", log_freq="batch")
    logger.create_logger_context()
    global_step = 0
    for epoch in range(30):
        for batch_idx in range(100):
            logger.log(global_step * 1e-3, "train_loss", step=global_step, batch_idx=batch_idx)
            global_step += 1
        logger.log(epoch / 100, "val_acc", step=epoch)
        logger.log(f"epoch {epoch}", "status", kind="text", step=epoch)
        logger.log({"lr": 0.1 / (epoch + 1)}, "sched", kind="dict", step=epoch)
    logger.destroy_logger_context()
    records = journal(savedir)
    wb_id = wandb_id(savedir, "k", 0)
    rng = random.Random(13)
    n = len(records)
    kills = [rng.randrange(n // 10, n * 4 // 10), rng.randrange(n * 6 // 10, n * 9 // 10)]
    for kill_at in kills:
        proc = _spawn_export(savedir)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if committed_state(savedir / "wandb", wb_id, "killr")[0] > kill_at:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the export ended before it could be killed"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    monkeypatch.setattr(logfile, "QUIET_SECONDS", 3.0)
    sync(savedir)

    # A kill may land while a child still waits for its predecessor's wandb-core to settle
    # (that one flushes for ~2 s after the kill): then the child has no run directory yet.
    files = wandb_files(savedir, wb_id)
    assert 2 <= len(files) <= len(kills) + 1
    rows = history(files)
    assert [r["_step"] for r in rows] == list(range(len(rows)))
    got = Counter()
    for row in rows:
        for key in ("train_loss", "val_acc", "status", "sched"):
            if key in row:
                got[(row["itwinai/step"], key, _same(row[key]))] += 1
    want = Counter()
    for r in records:
        value = r["value"] if r["kind"] == "metric" else (
            r["text"] if r["kind"] == "text" else json.loads(r["text"]))
        want[(r["step"], r["name"], _same(value))] += 1
    assert got == want and set(got.values()) == {1}
    assert committed_state(savedir / "wandb", wb_id, "killr")[0] == len(records)


def test_an_empty_or_starred_name_is_exported_and_a_failure_leaves_no_half_row(
        tmp_path, monkeypatch):
    """`c.log(1.0, "", step=0)` through a collection of W&B and TensorBoard: define_metric
    refuses an empty name (and wandb.log drops an empty key without a word), so the key is
    mapped, with a note; a name with '*' keeps its key but is charted against _step. When an
    export fails mid-batch, the row being built is not written half-made: the next sync
    writes every value once."""
    from itwinai_journal.loggers import TensorBoardLogger

    savedir = tmp_path / "mllogs"
    c = LoggersCollection([WandBLogger(savedir=savedir, project_name="keys"),
                           TensorBoardLogger(savedir=savedir)])
    c.create_logger_context()
    c.log(1.0, "", step=0)
    c.log(2.0, "a*b", step=0)
    c.log(3.0, "boom", step=1)
    run_id = c.run_id
    c.destroy_logger_context()

    import wandb.sdk.wandb_run as run_module

    real = run_module.Run.define_metric

    def define_metric(self, name, *args, **kwargs):
        if name == "boom":
            raise ExportError("define_metric refused 'boom'")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "define_metric", define_metric)
    out = " ".join(sync(savedir, code=1).split())
    assert "define_metric refused 'boom'" in out
    assert "history key '' is stored as 'itwinai_empty_name'" in out
    assert "'a*b' is charted against W&B's _step" in out
    files = wandb_files(savedir, wandb_id(savedir, run_id, 0))
    rows = history(files)
    assert rows == [{**rows[0], "itwinai_empty_name": 1.0, "a*b": 2.0, "itwinai/step": 0}]
    monkeypatch.undo()

    assert "exported 1 records (1 metric)" in sync(savedir)
    rows = history(wandb_files(savedir, wandb_id(savedir, run_id, 0)))
    assert points(rows) == Counter({(0, "itwinai_empty_name"): 1, (0, "a*b"): 1,
                                    (1, "boom"): 1})
    assert all(set(row) - {"itwinai/step"} - {k for k in row if k.startswith("_")}
               for row in rows)  # no row without a value
