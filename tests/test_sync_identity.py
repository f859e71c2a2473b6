"""Exactly once at the target whatever reaches it: two syncs from two copies of one savedir at
once, two spellings of one target, two different journals that share an experiment and run id,
two journals of one run (a LoggersCollection with a Prov4MLLogger), a journal with a missing
segment, and a run whose writer was killed. Real processes, a real `mlflow server` over HTTP,
the sqlite store, TensorBoard's own reader."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import child_env, spawn
from mlflow_server import MlflowServer, hermetic_mlflow_env
from test_fault_injection import (
    check_mlflow_exact,
    check_tensorboard_exact,
    mlflow_runs_of,
    write_journal,
)
from test_tensorboard_export import accumulate, assert_complete, assert_scalars_exact, rank_dir

from itwinai_journal import Journal
from itwinai_journal.loggers import LoggersCollection, MLFlowLogger, Prov4MLLogger
from itwinai_journal.read.liveness import SILENT_AFTER, writer_gone
from itwinai_sync.cli import main
from itwinai_sync.targets.mlflow import canonical_uri

mlflow = pytest.importorskip("mlflow")
MlflowClient = mlflow.MlflowClient


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("identity-mlflow-server")) as srv:
        yield srv


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


# -- two syncs at once, each reading its own copy of the savedir -------------------------------

#: A sync process that, right before its first write to the target, waits (up to 8 s) until
#: the other sync has got there too: without exclusion at the target both then write, which
#: is exactly the interleaving that duplicated data. With it, the second sync is refused
#: before it writes anything and the first goes on after the wait.
BARRIER_SYNC = """
import os, sys, time
from pathlib import Path

def barrier(_done=[]):
    if _done:
        return
    _done.append(1)
    Path({mine!r}).touch()
    deadline = time.monotonic() + 8
    while not Path({other!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.02)

{patch}
from itwinai_sync.cli import main
sys.argv = ["itwinai-sync", *{args!r}]
main()
"""

BEFORE_TENSORBOARD_WRITE = """
from itwinai_sync.targets import tensorboard
real_export = tensorboard.TensorBoardSink.export
def export(self, batch, cursor):
    barrier()
    return real_export(self, batch, cursor)
tensorboard.TensorBoardSink.export = export
"""

BEFORE_MLFLOW_CREATE = """
from mlflow.tracking.client import MlflowClient
real_create_run = MlflowClient.create_run
def create_run(self, *args, **kwargs):
    barrier()
    return real_create_run(self, *args, **kwargs)
MlflowClient.create_run = create_run
"""


def two_syncs_at_once(tmp_path: Path, patch: str, args: list[list[str]]
                      ) -> list[tuple[int, str, str]]:
    procs = []
    for i, a in enumerate(args):
        code = BARRIER_SYNC.format(mine=str(tmp_path / f"at-barrier-{i}"),
                                   other=str(tmp_path / f"at-barrier-{1 - i}"), patch=patch,
                                   args=[str(x) for x in a])
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=hermetic_mlflow_env(child_env()), start_new_session=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append((p.returncode, out, err))
    return results


def copy_of(savedir: Path, dest: Path) -> Path:
    """What `rsync -a` makes: the same files, elsewhere."""
    shutil.copytree(savedir, dest, symlinks=True)
    return dest


def test_two_copies_synced_at_once_into_one_tensorboard_logdir(tmp_path):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "twins", "r", 3000, ranks=(0, 1))
    copy = copy_of(savedir, tmp_path / "copy")
    logdir = tmp_path / "tb"
    results = two_syncs_at_once(tmp_path, BEFORE_TENSORBOARD_WRITE, [
        [d, "--to", "tensorboard", "--logdir", logdir] for d in (savedir, copy)])
    assert [code for code, _, _ in results] == [0, 0], results
    statuses = sorted(line.split()[0] for _, out, _ in results for line in out.splitlines()
                      if " twins/r -> tensorboard" in line)
    assert statuses == ["busy", "synced"], results
    figures = check_tensorboard_exact(savedir, "r", logdir)
    assert figures["duplicates"] == figures["losses"] == 0
    for d in (savedir, copy):  # a copy is the same journal: nothing left to export from either
        assert "exported 0 records" in sync_ok(d, "--to", "tensorboard", "--logdir", logdir)


@pytest.mark.parametrize("ranks", [(0,), (0, 1)])
def test_two_copies_synced_at_once_into_one_mlflow_server_converge(tmp_path, server, ranks):
    """No lock can be shared through an MLflow server: both syncs create the run(s) at the
    same moment, both see both, keep the same one and delete the other, and write their
    points into the one kept, where each is stored once."""
    savedir = tmp_path / "mllogs"
    experiment = f"twins-{len(ranks)}"
    write_journal(savedir, experiment, "r", 2000, ranks=ranks)
    copy = copy_of(savedir, tmp_path / "copy")
    results = two_syncs_at_once(tmp_path, BEFORE_MLFLOW_CREATE, [
        [d, "--to", "mlflow", "--tracking-uri", server.uri] for d in (savedir, copy)])
    assert [code for code, _, _ in results] == [0, 0], results
    client = MlflowClient(server.uri)
    figures = check_mlflow_exact(client, savedir, experiment, "r")
    assert figures["duplicates"] == figures["losses"] == 0
    deleted = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                 run_view_type=2)  # ViewType.DELETED_ONLY
    assert 1 <= len(deleted) <= len(ranks) + (len(ranks) > 1)  # what the losers had created
    for d in (savedir, copy):
        assert "exported 0 records" in sync_ok(d, "--to", "mlflow", "--tracking-uri",
                                                server.uri)


def test_two_spellings_of_one_target_are_one_target(tmp_path, server):
    """`sqlite:///a//b/../mlflow.db` and its normal form, `http://host:port/` and
    `http://host:port`: one key, so one lock, one ledger entry."""
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "spell", "r", 1500)
    (tmp_path / "db" / "b").mkdir(parents=True)
    plain = f"sqlite:///{tmp_path}/db/mlflow.db"
    odd = f"sqlite:///{tmp_path}//db/b/../mlflow.db"
    assert canonical_uri(odd) == canonical_uri(plain)
    assert canonical_uri(server.uri + "/") == canonical_uri(server.uri)
    assert canonical_uri("HTTP://User:pw@Example.ORG:80//api/") == "http://example.org/api"
    results = two_syncs_at_once(tmp_path, BEFORE_MLFLOW_CREATE, [
        [savedir, "--to", "mlflow", "--tracking-uri", uri] for uri in (plain, odd)])
    assert [code for code, _, _ in results] == [0, 0], results
    assert sorted(line.split()[0] for _, out, _ in results for line in out.splitlines()
                  if " spell/r -> mlflow" in line) == ["busy", "synced"], results
    check_mlflow_exact(MlflowClient(plain), savedir, "spell", "r")

    for uri in (server.uri, server.uri + "/"):
        sync_ok(savedir, "--to", "mlflow", "--tracking-uri", uri)
    check_mlflow_exact(MlflowClient(server.uri), savedir, "spell", "r")
    rows = json.loads(cli("ls", savedir, "--json")[1])
    assert sorted(rows[0]["synced"]) == sorted({f"mlflow:{canonical_uri(plain)}",
                                                f"mlflow:{server.uri}"})


def test_a_password_in_the_tracking_uri_is_never_written(tmp_path, server):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "secret", "r", 50)
    password = "s3cr3t%2Fpw"  # percent-encoded, as a URI password must be
    uri = server.uri.replace("http://", f"http://alice:{password}@")
    out = sync_ok(savedir, "--to", "mlflow", "--tracking-uri", uri)
    forms = {password, "s3cr3t/pw", "s3cr3t", "alice:"}
    for path in savedir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [f for f in forms if f.encode() in data], path
    assert not [f for f in forms if f in out], out
    check_mlflow_exact(MlflowClient(server.uri), savedir, "secret", "r")


# -- journals with an identity of their own ----------------------------------------------------


def test_another_journal_with_the_same_run_id_gets_runs_of_its_own(tmp_path, server):
    """Two clusters, one SLURM job id: same experiment and run id, different journals. The
    second never continues the first one's target runs; each target holds each journal
    exactly, and the second's runs say which journal they are."""
    first, second = tmp_path / "cluster-a", tmp_path / "cluster-b"
    write_journal(first, "shared", "slurm-42", 1200)
    write_journal(second, "shared", "slurm-42", 1700)
    logdir = tmp_path / "tb"
    to = [["--to", "mlflow", "--tracking-uri", server.uri],
          ["--to", "tensorboard", "--logdir", logdir]]
    for d in (first, second):
        for target in to:
            sync_ok(d, *target)
    tb_first = rank_dir(first, "slurm-42", logdir=logdir)
    assert assert_scalars_exact(accumulate(tb_first), first, "slurm-42") == 1320
    ids = [Journal(d).run("slurm-42").journal_id for d in (first, second)]
    assert ids[0] != ids[1]
    client = MlflowClient(server.uri)
    runs = mlflow_runs_of(client, "shared", "slurm-42")
    by_journal = {r.data.tags["itwinai.journal"]: r for r in runs}
    assert len(runs) == 2 and set(by_journal) == set(ids)
    assert by_journal[ids[0]].info.run_name == "slurm-42 run"
    assert by_journal[ids[1]].info.run_name == f"slurm-42 run [journal {ids[1][:8]}]"
    for journal_id, d in zip(ids, (first, second)):
        want = Journal(d).metrics(run_id="slurm-42").to_pylist()
        rid = by_journal[journal_id].info.run_id
        got = sorted((h.step, h.timestamp, h.value) for key in ("loss", "val/acc")
                     for h in client.get_metric_history(rid, key))
        assert got == sorted((m["step"], int(round(m["time"] * 1000)), m["value"])
                             for m in want)
    tb_second = tb_first.parent.with_name(f"slurm-42.journal-{ids[1][:8]}") / "rank-00000"
    assert assert_scalars_exact(accumulate(tb_second), second, "slurm-42") == 1870
    assert_complete(tb_second, second, "slurm-42")
    # and once more: nothing new anywhere
    for d in (first, second):
        for target in to:
            assert "exported 0 records" in sync_ok(d, *target)


def test_an_rsync_copy_and_a_resumed_job_stay_the_same_journal(tmp_path):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "same", "job", 500)
    sync_ok(savedir, "--to", "tensorboard", "--logdir", tmp_path / "tb")
    copy = copy_of(savedir, tmp_path / "copy")
    assert Journal(copy).run("job").journal_id == Journal(savedir).run("job").journal_id
    write_journal(copy, "same", "job", 300)  # the job resumed from the copy: a new session
    out = sync_ok(copy, "--to", "tensorboard", "--logdir", tmp_path / "tb")
    assert "exported 333 records" in out  # only the new session's records
    assert [p.name for p in (tmp_path / "tb" / "same").iterdir()] == ["job"]
    check_tensorboard_exact(copy, "job", tmp_path / "tb")


def test_a_journal_from_before_identities_has_a_stable_derived_one(tmp_path):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "old", "job", 10)
    run_json = savedir / "old" / "job" / "run.json"
    info = json.loads(run_json.read_text())
    assert len(info.pop("journal_id")) == 32
    run_json.write_text(json.dumps(info, indent=1))  # as journals were written before
    derived = Journal(savedir).run("job").journal_id
    assert derived == hashlib.sha256(run_json.read_bytes()).hexdigest()[:32]
    assert Journal(copy_of(savedir, tmp_path / "copy")).run("job").journal_id == derived
    run_json.write_text(json.dumps({**info, "journal_id": "../../x"}))  # not an identity
    assert Journal(savedir).run("job").journal_id == hashlib.sha256(
        run_json.read_bytes()).hexdigest()[:32]


# -- a gap in the seqs ------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["tensorboard", "mlflow"])
def test_a_missing_segment_stops_the_cursor_until_it_is_restored(tmp_path, target):
    savedir = tmp_path / "mllogs"
    write_journal(savedir, "gap", "r", 900, seal=200)  # 990 records + 3 params, 5+ segments
    seg_dir = savedir / "gap" / "r" / "rank-00000" / "segments"
    index = [json.loads(line) for line in (seg_dir.parent / "index.jsonl").read_text()
             .splitlines()]
    third = index[2]
    held = seg_dir / third["file"]
    aside = tmp_path / third["file"]
    held.rename(aside)

    code, out = cli(savedir, "--to", target)
    assert code == 1, out
    assert (f"FAILED  gap/r -> {target}: rank 0: records {third['first_seq']}.."
            f"{third['last_seq']} are missing" in out), out
    assert f"segment {third['file']} listed in the index is missing" in out
    journal = Journal(savedir).metrics(run_id="r").to_pylist()
    before_gap = [m for m in journal if m["seq"] < third["first_seq"]]
    if target == "tensorboard":
        acc = accumulate(rank_dir(savedir, "r"))
        assert sum(len(acc.Scalars(t)) for t in acc.Tags()["scalars"]) == len(before_gap)
    else:
        client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
        (run,) = mlflow_runs_of(client, "gap", "r")
        assert int(run.data.tags["itwinai.cursor"]) == third["first_seq"] - 1
        assert sum(len(client.get_metric_history(run.info.run_id, k))
                   for k in ("loss", "val/acc")) == len(before_gap)
    code, out = cli(savedir, "--to", target)  # still missing: still an error, nothing skipped
    assert code == 1 and "are missing" in out, out

    aside.rename(held)
    sync_ok(savedir, "--to", target)
    if target == "tensorboard":
        check_tensorboard_exact(savedir, "r")
    else:
        check_mlflow_exact(client, savedir, "gap", "r")


def test_segments_sealed_while_a_rank_is_read_are_not_a_gap(tmp_path):
    """A live rank: a segment sealed after the sync listed the segments is not missing, it is
    for the next pass (a sync must not fail a run that is simply being written)."""
    from itwinai_sync.engine import SyncEngine, SyncRequest

    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, experiment_name="live", run_id="l", log_freq="batch")
    lg.create_logger_context()
    lg._writer.seal_records = 100
    for i in range(250):
        lg.log(float(i), "loss", step=i)
    lg._writer.flush()  # sealed and indexed
    (rank,) = Journal(savedir).run("l").ranks
    engine = SyncEngine(SyncRequest(savedir=savedir, targets=["tensorboard"]))
    tables = engine._records(rank, 0)
    first = next(tables)  # the index is read and the segments listed: 1, and 2 (active)
    for i in range(250, 750):
        lg.log(float(i), "loss", step=i)
        if i % 250 == 249:
            lg._writer.flush()  # segments 2 and 3 sealed and indexed meanwhile
    seen = first.num_rows + sum(t.num_rows for t in tables)
    assert seen == 500  # 1 and 2, as listed; 3 is for the next pass
    lg.destroy_logger_context()
    rest = engine._records(Journal(savedir).run("l").ranks[0], seen)
    assert sum(t.num_rows for t in rest) == 250


# -- two journals of one run: a LoggersCollection with a Prov4MLLogger -------------------------


def log_collection(savedir: Path) -> None:
    """MLFlowLogger in savedir and Prov4MLLogger in its default provenance_save_dir
    (mllogs/prov_logs, relative to the working directory): two journals of one run."""
    coll = LoggersCollection([
        MLFlowLogger(savedir=str(savedir), experiment_name="coll", log_freq=2),
        Prov4MLLogger(experiment_name="coll", log_freq="batch"),
    ])
    coll.create_logger_context()
    coll.save_hyperparameters({"lr": 0.1})
    for i in range(40):
        coll.log(1.0 / (i + 1), "loss", step=i, batch_idx=i)  # MLflow takes every other one
    coll.log(0.75, "acc", step=40)  # both
    coll.log("done", "notes.txt", kind="text")  # MLflow only
    coll.destroy_logger_context()


def prov_metric_rows(savedir: Path, run_id: str) -> int:
    """Metric points in the Prov4ML documents' CSV files (epoch,value,timestep per line)."""
    files = list((savedir / "prov").rglob("metrics_GR0/*.csv"))
    return sum(len(f.read_text().splitlines()) - 1 for f in files)


def test_two_journals_of_one_collection_reach_each_target_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    savedir = tmp_path / "mllogs"
    log_collection(savedir)
    journals = {r.path.relative_to(savedir).parts[0]: r for r in Journal(savedir).runs()}
    assert set(journals) == {"coll", "prov_logs"}  # same experiment and run id, two journals
    main_j, prov_j = journals["coll"], journals["prov_logs"]
    run_id = main_j.run_id
    copy = copy_of(savedir, tmp_path / "copy")  # synced later without --to

    out = sync_ok(savedir, "--to", "mlflow")
    assert "busy" not in out
    client = MlflowClient(f"sqlite:///{savedir.resolve()}/mlflow.db")
    (run,) = mlflow_runs_of(client, "coll", run_id)  # the prov4ml journal made no run
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(h.step for h in loss) == list(range(0, 40, 2))  # each once
    assert len(client.get_metric_history(run.info.run_id, "acc")) == 1
    assert run.data.params == {"lr": "0.1"}
    assert "up-to-date" in sync_ok(savedir, "--to", "mlflow")
    assert main_j.key == prov_j.key and main_j.journal_id != prov_j.journal_id
    assert run.data.tags["itwinai.journal"] == main_j.journal_id

    out = sync_ok(savedir, "--to", "prov4ml")
    assert "busy" not in out and "FAILED" not in out
    prov_records = Journal(savedir).metrics(run_id=run_id)
    assert prov_metric_rows(savedir, run_id) == 41  # 40 losses + acc, from the prov journal
    assert len(list((savedir / "prov").glob("coll/*"))) == 1  # one provenance run
    assert prov_records.num_rows == 20 + 1 + 40 + 1
    assert "exported 0 records" in sync_ok(savedir, "--to", "prov4ml")

    out = sync_ok(savedir)  # the destinations the loggers declared: both up to date
    assert "exported 0 records" in out

    out = sync_ok(copy)  # a fresh copy, without --to: each target once, complete
    assert "busy" not in out
    client = MlflowClient(f"sqlite:///{copy.resolve()}/mlflow.db")
    (run,) = mlflow_runs_of(client, "coll", run_id)
    assert sorted(h.step for h in client.get_metric_history(run.info.run_id, "loss")) == list(
        range(0, 40, 2))
    assert prov_metric_rows(copy, run_id) == 41

    rows = json.loads(cli("ls", savedir, "--json")[1])
    (row,) = rows  # one run, with both journals
    assert sorted(j["path"] for j in row["journals"]) == sorted(
        str(r.path) for r in (main_j, prov_j))
    assert row["destinations"] == ["mlflow", "prov4ml"]
    code, text = cli("ls", savedir)
    assert text.count(run_id) == 1 + 2, text  # the run line and one line per journal


# -- a writer that was killed -----------------------------------------------------------------

KILLED_WRITER = """
import os, time
from itwinai_journal.loggers import TensorBoardLogger
lg = TensorBoardLogger(savedir={savedir!r}, log_freq="batch", run_id="dead", flush_interval=0.1)
lg.create_logger_context()
for i in range(500):
    lg.log(float(i), "loss", step=i)
lg._writer.flush()
print("logged", flush=True)
time.sleep(600)
"""


def test_watch_stops_following_a_run_whose_writer_was_killed(tmp_path):
    savedir = tmp_path / "mllogs"
    writer = spawn(KILLED_WRITER.format(savedir=str(savedir)))
    try:
        assert writer.stdout.readline().strip() == "logged"
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    (run,) = Journal(savedir).runs()
    assert run.status == "running"  # the session never ended
    watcher = subprocess.Popen(
        [sys.executable, "-m", "itwinai_sync.cli", str(savedir), "--to", "tensorboard",
         "--watch", "--interval", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
        start_new_session=True)
    try:
        out, err = watcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(watcher.pid, signal.SIGKILL)
        watcher.communicate()
        raise AssertionError("--watch kept following a run whose writer is dead") from None
    assert watcher.returncode == 0, err
    assert f"its writer (pid {writer.pid} on " in out and "is gone" in out, out
    assert assert_scalars_exact(accumulate(rank_dir(savedir, "dead")), savedir, "dead") == 500
    assert "writer gone: 1 rank(s)" in cli("ls", savedir)[1]


def test_a_writer_on_another_host_is_presumed_gone_only_after_its_heartbeat_stops(tmp_path,
                                                                                  monkeypatch):
    from itwinai_journal.writer import rank as writer_module

    monkeypatch.setattr(writer_module, "HEARTBEAT_SECONDS", 0.2)
    savedir = tmp_path / "mllogs"
    lg = MLFlowLogger(savedir=savedir, run_id="beat")
    lg.create_logger_context()
    lg.log(1.0, "x", step=0)
    lg._writer.flush()
    (rank,) = Journal(savedir).run("beat").ranks
    session = rank.manifest["sessions"][-1]
    assert session["heartbeat"] == 0.2 and session["status"] == "running"
    (active,) = (rank.path / "segments").glob("*.jsonl")
    os.utime(active, (1, 1))
    deadline = time.monotonic() + 30
    while active.stat().st_mtime < 2 and time.monotonic() < deadline:  # the idle writer beats
        time.sleep(0.05)
    assert active.stat().st_mtime > 2
    assert writer_gone(rank.path, rank.manifest) is None  # this host: the pid is alive
    elsewhere = json.loads(json.dumps(rank.manifest))
    elsewhere["sessions"][-1]["host"] = "compute-node-17"
    now = time.time()
    assert writer_gone(rank.path, elsewhere, now=now) is None  # it beats: alive
    why = writer_gone(rank.path, elsewhere, now=now + SILENT_AFTER + 60)
    assert why is not None and "compute-node-17" in why and "presumed gone" in why
    del elsewhere["sessions"][-1]["heartbeat"]  # written before heartbeats: cannot tell
    assert writer_gone(rank.path, elsewhere, now=now + 10 * SILENT_AFTER) is None
    lg.destroy_logger_context()
    assert writer_gone(rank.path, Journal(savedir).run("beat").ranks[0].manifest) is None
