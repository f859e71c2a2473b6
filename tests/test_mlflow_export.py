"""End to end: journals replayed into MLflow, against the embedded sqlite store and against a
real `mlflow server` over HTTP, with exact values, steps and timestamps, and exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import child_env
from mlflow_server import MlflowServer, hermetic_mlflow_env

from itwinai_journal import Journal
from itwinai_journal.loggers import LoggersCollection, MLFlowLogger, TensorBoardLogger
from itwinai_sync.cli import main
from itwinai_sync.targets.mlflow import mlflow_key

os.environ.update({"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
os.environ.pop("MLFLOW_TRACKING_URI", None)
mlflow = pytest.importorskip("mlflow")
MlflowClient = mlflow.MlflowClient


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


def sync(savedir: Path, *args: str) -> str:
    result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow", *args],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def write_journal(savedir: Path, n: int = 300, run_id: str = "r1", ranks=(0,), close=True,
                  **kwargs) -> list[MLFlowLogger]:
    loggers = []
    for rank in ranks:
        lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_name="my run",
                          run_description="testing", log_freq="batch", log_on_workers=-1,
                          run_id=run_id, **kwargs)
        lg.create_logger_context(rank=rank)
        lg.save_hyperparameters({"lr": 0.001, "layers": [8, 4], "opt": "adam"})
        for i in range(n):
            lg.log(1.0 / (i + 1) + rank, "loss", step=i, batch_idx=i)
            if i % 10 == 0:
                lg.log(float(i), "val/acc", step=i)
        if close:
            lg.destroy_logger_context()
        loggers.append(lg)
    return loggers


def runs_by_role(client, experiment="exp"):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out: dict = {}
    for r in runs:
        out.setdefault((r.data.tags.get("itwinai.role"), r.data.tags.get("itwinai.rank")),
                       []).append(r)
    return out


def assert_histories_equal_journal(client, savedir, run_id="r1", experiment="exp"):
    """Every metric of every rank in MLflow exactly as in the journal: values, steps, ms
    timestamps, in order, and nothing more."""
    journal = Journal(savedir).metrics(run_id=run_id).to_pylist()
    children = {int(r.data.tags["itwinai.rank"]): r
                for (role, _), rs in runs_by_role(client, experiment).items() if role == "rank"
                for r in rs if r.data.tags["itwinai.run"] == f"{experiment}/{run_id}"}
    expected: dict = {}
    for m in journal:
        expected.setdefault((m["rank"], m["name"]), []).append(
            (m["step"] or 0, int(round(m["time"] * 1000)), m["value"]))
    seen = set()
    for (rank, name), points in expected.items():
        history = client.get_metric_history(children[rank].info.run_id, mlflow_key(name))
        got = sorted((h.step, h.timestamp, h.value) for h in history)
        assert got == sorted(points), f"rank {rank} {name}"
        seen.add((rank, mlflow_key(name)))
    for rank, child in children.items():
        keys = {(rank, k) for k in child.data.metrics}
        # Besides the journal's metrics, only its system-metrics samples (tested on their own
        # in test_system_metrics.py), each sample once: one point per step.
        for _, key in keys - seen:
            assert key.startswith("system/"), key
            steps = [h.step for h in client.get_metric_history(child.info.run_id, key)]
            assert len(steps) == len(set(steps)), key


def test_every_kind_arrives_in_the_embedded_store(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import torch
    from PIL import Image

    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_name="kinds",
                      run_description="all kinds", run_id="r1")
    lg.create_logger_context()
    lg.save_hyperparameters({"lr": 0.5, "batch": 32})
    lg.log(0.25, "loss", step=7)
    lg.log("some notes", "notes/readme.txt", kind="text")
    lg.log({"a": 1, "b": [1, 2]}, "config", kind="dict")
    fig = plt.figure(figsize=(2, 2))
    plt.plot([1, 2, 3])
    lg.log(fig, "plots/curve.png", kind="figure")
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    lg.log(pixels, "img/grid", kind="image")
    src = tmp_path / "ckpt.bin"
    src.write_bytes(b"checkpoint" * 10)
    lg.log(str(src), "checkpoints", kind="artifact")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("A")
    (tree / "sub" / "b.txt").write_text("B")
    lg.log(str(tree), "dirs", kind="artifact")
    lg.log(torch.arange(4), "tensors/t", kind="torch")
    model = torch.nn.Linear(3, 2)
    lg.log(model, "model", kind="model")
    import mlflow.data

    frame = pd.DataFrame({"x": [1, 2], "y": [0.5, 1.5]})
    lg.log(mlflow.data.from_pandas(frame, name="train_df"), "train_df", kind="dataset")
    lg.destroy_logger_context()

    out = sync(savedir)
    assert "exported" in out and "FAILED" not in out
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    roles = runs_by_role(client)
    (child,) = roles[("rank", "0")]  # one rank: one MLflow run, as MLFlowLogger makes online
    assert set(roles) == {("rank", "0")}
    assert child.info.run_name == "kinds"
    assert child.data.tags["mlflow.note.content"] == "all kinds"
    assert child.data.tags["itwinai.host"]
    assert "mlflow.parentRunId" not in child.data.tags
    assert child.data.tags["itwinai.main"] == "true"
    assert child.data.params == {"lr": "0.5", "batch": "32"}
    manifest = Journal(savedir).runs()[0].ranks[0].manifest
    end_ms = int(manifest["sessions"][-1]["end"] * 1000)
    assert (child.info.status, child.info.end_time) == ("FINISHED", end_ms)
    rec = Journal(savedir).metrics().to_pylist()[0]
    (point,) = client.get_metric_history(child.info.run_id, "loss")
    assert (point.value, point.step, point.timestamp) == (0.25, 7, int(round(rec["time"] * 1000)))

    rid = child.info.run_id
    dl = Path(client.download_artifacts(rid, "", str(tmp_path / "dl")))
    assert (dl / "notes" / "readme.txt").read_text() == "some notes"
    assert json.loads((dl / "config").read_text()) == {"a": 1, "b": [1, 2]}
    with Image.open(dl / "plots" / "curve.png") as im:
        assert im.size == (200, 200)
    with Image.open(dl / "img" / "grid.png") as im:
        assert np.array_equal(np.asarray(im), pixels)
    assert (dl / "checkpoints" / "ckpt.bin").read_bytes() == b"checkpoint" * 10
    assert (dl / "dirs" / "tree" / "a.txt").read_text() == "A"
    assert (dl / "dirs" / "tree" / "sub" / "b.txt").read_text() == "B"
    assert torch.equal(torch.load(dl / "tensors" / "t" / "t"), torch.arange(4))
    models = client.search_logged_models([child.info.experiment_id])
    assert [(m.name, str(m.status), m.source_run_id) for m in models] == [("model", "READY", rid)]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the export left no global state behind
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{savedir.resolve()}/mlflow.db")
    loaded = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    assert torch.equal(loaded.weight, model.weight)
    (inp,) = client.get_run(rid).inputs.dataset_inputs
    assert inp.dataset.name == "train_df"
    assert json.loads(inp.dataset.schema) == json.loads(
        mlflow.data.from_pandas(frame, name="train_df").to_dict()["schema"])

    # a second sync exports nothing and changes nothing
    before = _snapshot(client, savedir)
    out = sync(savedir)
    assert "up-to-date" in out and "exported 0 records" in out
    assert _snapshot(client, savedir) == before


def _snapshot(client, savedir):
    roles = runs_by_role(client)
    snap = {}
    for key, runs in roles.items():
        for r in runs:
            rid = r.info.run_id
            hist = {k: sorted((h.step, h.timestamp, h.value)
                              for h in client.get_metric_history(rid, k)) for k in r.data.metrics}
            arts = sorted(a.path for a in client.list_artifacts(rid))
            snap[(key, rid)] = (hist, dict(r.data.params), arts,
                                len(client.get_run(rid).inputs.dataset_inputs))
    models = client.search_logged_models([client.get_experiment_by_name("exp").experiment_id])
    return snap, len(models)


def test_server_over_http_two_ranks_resync_changes_nothing(tmp_path, server):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=500, ranks=(0, 1), run_id="http")
    out = sync(savedir, "--tracking-uri", server.uri)
    assert "exported 1106 records" in out  # 2 x (3 params + 500 loss + 50 val/acc)
    assert "View run" not in out  # MLflow's own per-run links would flood a 1024-rank sync
    client = MlflowClient(server.uri)
    roles = runs_by_role(client)
    mine = {k: [r for r in v if r.data.tags["itwinai.run"] == "exp/http"]
            for k, v in roles.items()}
    assert len(mine[("parent", None)]) == 1
    assert len(mine[("rank", "0")]) == 1 and len(mine[("rank", "1")]) == 1
    parent_id = mine[("parent", None)][0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in mine[("rank", "0")] + mine[("rank", "1")]
            } == {parent_id}
    assert {r.info.run_name for r in mine[("rank", "0")] + mine[("rank", "1")]} == {
        "worker_0", "worker_1"}
    assert_histories_equal_journal(client, savedir, run_id="http")
    before = _snapshot(client, savedir)
    sync(savedir, "--tracking-uri", server.uri)
    assert _snapshot(client, savedir) == before


def test_a_run_still_being_written_is_synced_in_parts(tmp_path, server):
    savedir = tmp_path / "mllogs"
    (lg,) = write_journal(savedir, n=100, run_id="live", close=False)
    lg._writer.flush()
    uri = ["--tracking-uri", server.uri]
    sync(savedir, *uri)
    client = MlflowClient(server.uri)
    (child,) = [r for r in runs_by_role(client)[("rank", "0")]
                if r.data.tags["itwinai.run"] == "exp/live"]
    assert len(client.get_metric_history(child.info.run_id, "loss")) == 100
    assert client.get_run(child.info.run_id).info.status == "RUNNING"
    for i in range(100, 250):
        lg.log(float(i), "loss", step=i, batch_idx=i)
    lg.destroy_logger_context()
    out = sync(savedir, *uri)
    assert "exported 150 records (150 metric)" in out
    history = client.get_metric_history(child.info.run_id, "loss")
    assert sorted(h.step for h in history) == list(range(250))
    assert client.get_run(child.info.run_id).info.status == "FINISHED"
    assert_histories_equal_journal(client, savedir, run_id="live")


def _sync_process(savedir: Path, uri: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "itwinai_sync.cli", str(savedir), "--to", "mlflow",
         "--tracking-uri", uri],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=hermetic_mlflow_env(child_env()), start_new_session=True)


def _cursor(client, run_key: str) -> int:
    exp = client.get_experiment_by_name("exp")
    if exp is None:
        return 0
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("itwinai.run") == run_key and r.data.tags.get("itwinai.rank")]
    return int(runs[0].data.tags.get("itwinai.cursor", 0)) if runs else 0


def test_sigkill_mid_sync_then_rerun_is_exact(tmp_path, server):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=24_000, run_id="killed")  # 24 000 + 2 400 points, 3 params
    total = Journal(savedir).runs()[0].records
    client = MlflowClient(server.uri)
    cursors = []
    for delay in (4.0, 6.0, 8.0):
        proc = _sync_process(savedir, server.uri)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        cursors.append(_cursor(client, "exp/killed"))
    assert any(0 < c < total for c in cursors), cursors  # killed mid-way at least once
    proc = _sync_process(savedir, server.uri)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert _cursor(client, "exp/killed") == total
    assert_histories_equal_journal(client, savedir, run_id="killed")


def test_two_syncs_at_once_leave_no_duplicates(tmp_path, server):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=3000, run_id="twin")
    procs = [_sync_process(savedir, server.uri) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert any("busy" in o or "synced" in o for o, _ in outs)
    client = MlflowClient(server.uri)
    assert len([r for r in runs_by_role(client)[("rank", "0")]
                if r.data.tags["itwinai.run"] == "exp/twin"]) == 1
    assert_histories_equal_journal(client, savedir, run_id="twin")


def test_dry_run_run_filter_and_ranks_0(tmp_path):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=20, run_id="a", ranks=(0, 1))
    write_journal(savedir, n=10, run_id="b")
    out = sync(savedir, "--dry-run")
    assert "would export" in out and "exp/a" in out and "exp/b" in out
    assert not (savedir / "mlflow.db").exists() or not runs_by_role(
        MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db"))
    out = sync(savedir, "--run", "b", "--ranks", "0")
    assert "exp/b" in out and "exp/a" not in out
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    roles = runs_by_role(client)
    assert set(roles) == {("rank", "0")}
    (flat,) = roles[("rank", "0")]
    assert flat.info.run_name == "my run"
    assert len(client.get_metric_history(flat.info.run_id, "loss")) == 10


def test_a_broken_run_is_reported_and_the_others_synced(tmp_path):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=50, run_id="good")
    write_journal(savedir, n=50, run_id="bad")
    seg = next((savedir / "exp" / "bad" / "rank-00000" / "segments").glob("*.parquet"))
    seg.write_bytes(b"PAR1 this is not parquet")
    result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow"])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "exp/bad" in result.output
    assert "Traceback" not in result.output
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    good = [r for r in runs_by_role(client)[("rank", "0")]
            if r.data.tags["itwinai.run"] == "exp/good"]
    assert len(client.get_metric_history(good[0].info.run_id, "loss")) == 50


def test_rejected_names_are_mapped_and_reported(tmp_path):
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", run_id="r1")
    lg.create_logger_context()
    long_name = "x" * 300
    lg.log(1.0, "acc@top1", step=0)
    lg.log(2.0, long_name, step=0)
    lg.log(3.0, "../escape", step=0)
    lg.destroy_logger_context()
    out = sync(savedir)
    assert "'acc@top1' is stored as 'acc_top1'" in out
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    (child,) = runs_by_role(client)[("rank", "0")]
    keys = set(child.data.metrics)
    assert keys == {"acc_top1", mlflow_key(long_name), "_/escape"}
    assert len(mlflow_key(long_name)) <= 250
    assert mlflow_key(long_name) != mlflow_key("x" * 299)


def test_collection_routes_records_only_to_loggers_that_accepted_them(tmp_path):
    savedir = tmp_path / "mllogs"
    coll = LoggersCollection([
        MLFlowLogger(savedir=savedir, experiment_name="exp", log_freq=2, run_id="r1"),
        TensorBoardLogger(savedir=savedir, log_freq="batch"),
    ])
    coll.create_logger_context()
    for i in range(10):
        coll.log(float(i), "loss", step=i, batch_idx=i)
    coll.destroy_logger_context()
    out = sync(savedir)
    assert "not for this target: 5 metric" in out
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    (child,) = runs_by_role(client)[("rank", "0")]
    steps = sorted(h.step for h in client.get_metric_history(child.info.run_id, "loss"))
    assert steps == [0, 2, 4, 6, 8]


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    from itwinai_journal import Journal as J
    from itwinai_sync.api import Notes
    from itwinai_sync.targets.mlflow import MlflowExporter

    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=1, run_id="declared", tracking_uri="sqlite:///declared.db")
    write_journal(savedir, n=1, run_id="plain")
    runs = {r.run_id: r for r in J(savedir).runs()}
    default = f"sqlite:///{savedir.resolve()}/mlflow.db"
    exp = MlflowExporter(savedir, {}, Notes())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert exp.tracking_uri(runs["plain"]) == default
    assert exp.tracking_uri(runs["declared"]) == "sqlite:///declared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert exp.tracking_uri(runs["plain"]) == "sqlite:///env.db"
    assert exp.tracking_uri(runs["declared"]) == "sqlite:///declared.db"
    cli = MlflowExporter(savedir, {"tracking_uri": "sqlite:///cli.db"}, Notes())
    assert cli.tracking_uri(runs["declared"]) == "sqlite:///cli.db"


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's")
def test_responses_of_the_server_synced_to_are_acknowledged_at_once(tmp_path, monkeypatch,
                                                                   quickacked):
    """A server of several uvicorn workers (MLflow's default) holds each response's body until
    its headers are acknowledged (uvicorn issue #3149): during a sync, every response read from
    it is preceded by TCP_QUICKACK, so the client acknowledges at once. Nothing else in the
    process is touched: no request to it after the sync, none to another server."""
    import requests

    from itwinai_sync.targets import quickack

    sent: list[int] = []
    real_send = requests.Session.send

    def send(self, request, **kwargs):
        sent.append(requests.utils.urlparse(request.url).port)
        return real_send(self, request, **kwargs)

    savedir = tmp_path / "mllogs"
    write_journal(savedir, n=2500, ranks=(0, 1), run_id="acks")
    with MlflowServer(tmp_path / "server", workers=2) as srv, \
            MlflowServer(tmp_path / "other") as other:
        monkeypatch.setattr(requests.Session, "send", send)
        sync(savedir, "--tracking-uri", srv.uri)
        # the parent, two ranks' runs, their 6 params and 5 500 points, the cursors, statuses
        assert sent.count(srv.port) > 12 and set(sent) == {srv.port}
        assert quickacked == sent
        assert quickack._servers == {}
        del sent[:], quickacked[:]
        assert_histories_equal_journal(MlflowClient(srv.uri), savedir, run_id="acks")
        MlflowClient(other.uri).search_experiments()
        assert srv.port in sent and other.port in sent and quickacked == []


def test_requests_are_full_and_the_cursor_rides_in_the_last(tmp_path, monkeypatch):
    """Into a store that keeps each point once, requests of metrics alone hold MLflow's 1000
    entities; the batch's last request carries the cursor, alone when the points filled the
    ones before; a param's request carries it too, never over the limit (which the store
    itself enforces). Every point arrives once."""
    from mlflow import MlflowClient

    from itwinai_sync.targets.mlflow import TAG_CURSOR, BatchWriter

    savedir = tmp_path / "mllogs"
    for run_id, before, after in (("full", 20_000, 0), ("param", 999, 2001)):
        lg = MLFlowLogger(savedir=savedir, experiment_name="exp", log_freq="batch",
                          run_id=run_id)
        lg.create_logger_context()
        for i in range(before + after):
            if i == before and after:
                lg.log(0.1, "lr", kind="param")
            lg.log(float(i), "loss", step=i)
        lg.destroy_logger_context()
    requests: dict[str, list[tuple[int, int, bool]]] = {}
    real = BatchWriter.__call__

    def counted(self, run_id, metrics, params, tags):
        assert not self.rest  # the embedded store: MLflow's own limits apply
        requests.setdefault(run_id, []).append(
            (len(metrics), len(params), [t.key for t in tags] == [TAG_CURSOR]))
        return real(self, run_id, metrics, params, tags)

    monkeypatch.setattr(BatchWriter, "__call__", counted)
    for run_id in ("full", "param"):
        result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow", "--run", run_id])
        assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{savedir / 'mlflow.db'}")
    shapes = {}
    for run in client.search_runs([client.get_experiment_by_name("exp").experiment_id]):
        shapes[run.data.tags["itwinai.run"]] = requests[run.info.run_id]
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [
            (i, float(i)) for i in range(20_000 if "full" in run.data.tags["itwinai.run"]
                                         else 3000)]
        assert run.data.tags[TAG_CURSOR] == str(Journal(savedir).run(
            run.data.tags["itwinai.run"].split("/")[1]).ranks[0].last_seq)
    assert shapes == {
        "exp/full": [(1000, 0, False)] * 20 + [(0, 0, True)],
        # 999 points fill no request; with the param's and its cursor they would be 1001
        "exp/param": [(999, 0, False), (998, 1, True), (1000, 0, False), (3, 0, True)],
    }


def test_a_request_that_fails_in_flight_stops_the_rank_and_the_next_sync_completes_it(
        tmp_path, monkeypatch):
    """Requests without the cursor are sent while the next is built: one that fails is
    reported, nothing after it is sent, the cursor stays where the store has it, and the next
    sync sends the rest, each point once."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from itwinai_sync.targets.mlflow import TAG_CURSOR, BatchWriter

    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="exp", log_freq="batch", run_id="f")
    lg.create_logger_context()
    for i in range(5000):
        lg.log(float(i), "loss", step=i)
    lg.destroy_logger_context()
    sent: list[int] = []
    real = BatchWriter.__call__

    def failing(self, run_id, metrics, params, tags):
        sent.append(len(metrics))
        if len(sent) == 3:
            raise MlflowException("injected: the store refused this request")
        return real(self, run_id, metrics, params, tags)

    monkeypatch.setattr(BatchWriter, "__call__", failing)
    result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow"])
    assert result.exit_code == 1 and "injected: the store refused this request" in result.output
    assert sent == [1000, 1000, 1000]  # the fourth was built, and never sent
    client = MlflowClient(f"sqlite:///{savedir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert TAG_CURSOR not in run.data.tags  # no request with the cursor went
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2000
    monkeypatch.setattr(BatchWriter, "__call__", real)
    result = CliRunner().invoke(main, [str(savedir), "--to", "mlflow"])
    assert result.exit_code == 0, result.output
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(i, float(i)) for i in range(5000)]
    assert client.get_run(run.info.run_id).data.tags[TAG_CURSOR] == str(
        Journal(savedir).run("f").ranks[0].last_seq)
