"""Live sync: the sidecar a training process starts itself, against a real `mlflow server` on
127.0.0.1 that goes away and comes back, is never there, or outlives sidecars killed at random
moments. At the end the server must hold every point of the journal exactly once, with its
original step and timestamp."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import child_env, spawn
from mlflow_server import MlflowServer
from test_mlflow_export import MlflowClient, assert_histories_equal_journal

from itwinai_journal import Journal
from itwinai_journal.format.fsio import read_json
from itwinai_journal.loggers import JournalWarning, MLFlowLogger
from itwinai_journal.writer import live
from itwinai_sync.cli import main

TRAIN = """
import time
from pathlib import Path
from itwinai_journal.loggers import MLFlowLogger
lg = MLFlowLogger(savedir={savedir!r}, experiment_name="exp", tracking_uri={uri!r},
                  log_freq="batch", run_id="live", flush_interval=0.2, live_sync={live!r})
lg.create_logger_context()
lg.save_hyperparameters({{"lr": 0.1, "layers": [8, 4]}})
i = 0
for phase, gate in enumerate({gates!r}):
    for _ in range({per_phase}):
        lg.log(1.0 / (i + 1), "loss", step=i)
        if i % 10 == 0:
            lg.log(float(i), "val/acc", step=i)
        i += 1
        if i % 100 == 0:
            time.sleep({pause})
    print("phase", phase, "done", flush=True)
    while gate and not Path(gate).exists():
        time.sleep(0.05)
lg.destroy_logger_context()
"""


#: Processes a test started (training runs, sidecars), ended when it ends, also when it fails
#: while a training waits at a gate: each in its own process group.
_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _end_processes():
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _train(savedir: Path, uri: str, gates: list, per_phase: int, live: object = True,
           pause: float = 0.02, **env: str) -> subprocess.Popen:
    env.setdefault("ITWINAI_SYNC_LIVE_INTERVAL", "0.3")
    env.setdefault("ITWINAI_SYNC_LIVE_DRAIN", "20")  # a failed test leaves no sidecar for long
    proc = spawn(TRAIN.format(savedir=str(savedir), uri=uri, live=live, pause=pause,
                              gates=[str(g) if g else None for g in gates],
                              per_phase=per_phase), **env)
    _started.append(proc)
    return proc


def _status(savedir: Path) -> dict:
    try:
        return read_json(live.live_paths(savedir, "exp", "live")[1])
    except (OSError, ValueError):
        return {}


def _log(savedir: Path) -> str:
    path = live.live_paths(savedir, "exp", "live")[0]
    return path.read_text() if path.exists() else ""


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _wait(cond, timeout: float, what: str, savedir: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; sidecar log:\n{_log(savedir)}")


def _loss_points(uri: str) -> int:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    if exp is None:
        return 0
    return sum(len(client.get_metric_history(r.info.run_id, "loss"))
               for r in client.search_runs([exp.experiment_id]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ended(savedir: Path, states: tuple[str, ...]) -> dict:
    """The final status once the sidecar has said it ended and its process is gone."""
    status = _wait(lambda: _status(savedir).get("state") in states and _status(savedir),
                   120, f"the sidecar to end ({'/'.join(states)})", savedir)
    _wait(lambda: not _running(status["pid"]), 30, "the sidecar process to exit", savedir)
    return status


class _Unavailable(BaseHTTPRequestHandler):
    """What a tracker behind a proxy or load balancer answers while its backend is down."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


def _stand_in(outage: str, port: int) -> object | None:
    """What answers on the server's port during the outage: nothing (connection refused), a
    proxy whose backend is down (HTTP 503), or a hung server that takes connections and never
    answers (timed out)."""
    if outage == "HTTP 503":
        standin = ThreadingHTTPServer(("127.0.0.1", port), _Unavailable)
        threading.Thread(target=standin.serve_forever, daemon=True).start()
        return standin
    if outage == "timed out":
        hung = socket.socket()
        hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hung.bind(("127.0.0.1", port))
        hung.listen(64)  # the kernel completes connections; nobody ever reads them
        return hung
    return None


def _stop_stand_in(standin: object | None) -> None:
    if isinstance(standin, ThreadingHTTPServer):
        standin.shutdown()
        standin.server_close()
    elif isinstance(standin, socket.socket):
        standin.close()


@pytest.mark.parametrize("outage", ["connection refused", "HTTP 503", "timed out"])
def test_server_gone_mid_run_and_back_gets_every_point_exactly_once(tmp_path, outage):
    savedir, store = tmp_path / "mllogs", tmp_path / "mlflow"
    gates = [tmp_path / "outage", tmp_path / "back", None]
    server = MlflowServer(store)
    server.start()
    try:
        # A short MLflow timeout (the sidecar's default is 30 s) keeps the hung case short.
        train = _train(savedir, server.uri, gates, per_phase=1000,
                       MLFLOW_HTTP_REQUEST_TIMEOUT="3")
        # The first phase reaches the server while the training runs (it waits at the gate).
        _wait(lambda: _loss_points(server.uri) == 1000, 120, "the first phase live", savedir)
        port = server.port
        server.stop()
        standin = _stand_in(outage, port)
        gates[0].touch()
        # The sidecar reports the outage for what it is (it may have seen the connection
        # refused before the stand-in answered).
        # The status shows the second phase waiting (1000 losses, 100 accuracies), once the
        # training has written it.
        _wait(lambda: (_status(savedir).get("targets", {}).get("mlflow") or {})
              .get("error") == outage
              and _status(savedir)["targets"]["mlflow"]["pending"] >= 1100, 90,
              f"the sidecar to report {outage}", savedir)
        listing = CliRunner().invoke(main, ["ls", str(savedir)]).output
        assert "mlflow: behind since" in listing and outage in listing, listing
        _stop_stand_in(standin)
        # The second phase is journaled while the server is down; same store, same port.
        server = MlflowServer(store, port=port)
        server.start()
        gates[1].touch()
        _, err = train.communicate(timeout=180)
        assert train.returncode == 0, err
        status = _ended(savedir, ("done",))
        assert status["targets"]["mlflow"]["behind_since"] is None
        assert status["targets"]["mlflow"]["pending"] == 0
        text = _log(savedir)
        assert "mlflow: BEHIND since" in text and "reachable again" in text, text
        assert_histories_equal_journal(MlflowClient(server.uri), savedir, run_id="live")
        assert Journal(savedir).metrics(run_id="live").num_rows == 3000 + 300
        assert _loss_points(server.uri) == 3000
    finally:
        server.stop()


def test_server_never_reachable_then_itwinai_sync_completes_exactly_once(tmp_path):
    savedir = tmp_path / "mllogs"
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    # Switched on by the environment variable alone.
    secret = "s3cr3t-Pa55word-for-the-tracker"
    train = _train(savedir, uri, [None], per_phase=1500, live=None, ITWINAI_SYNC_LIVE="mlflow",
                   ITWINAI_SYNC_LIVE_DRAIN="1", MLFLOW_TRACKING_PASSWORD=secret,
                   MLFLOW_TRACKING_USERNAME="me")
    _, err = train.communicate(timeout=180)
    assert train.returncode == 0, err
    status = _ended(savedir, ("left",))
    rank = Journal(savedir).runs()[0].ranks[0]
    mlflow_state = status["targets"]["mlflow"]
    assert mlflow_state["behind_since"] and "connection refused" in mlflow_state["error"]
    assert mlflow_state["pending"] == rank.last_seq  # nothing was sent, all of it is known
    assert "left in the journal for `itwinai-sync`" in _log(savedir)
    assert not [p for p in savedir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    listing = CliRunner().invoke(main, ["ls", str(savedir)]).output
    assert "live sync: left" in listing, listing
    assert "mlflow, when it ended: behind since" in listing, listing
    with MlflowServer(tmp_path / "mlflow", port=port) as server:
        result = CliRunner().invoke(main, [str(savedir)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert_histories_equal_journal(MlflowClient(server.uri), savedir, run_id="live")
        assert _loss_points(server.uri) == 1500
        again = CliRunner().invoke(main, [str(savedir)], catch_exceptions=False)
        assert "up-to-date" in again.output
        assert _loss_points(server.uri) == 1500


def _sidecar(savedir: Path, parent: int, log) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "itwinai_sync.cli", "live", str(savedir), "--run", "exp/live",
         "--parent", str(parent), "--interval", "0.2"],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    _started.append(proc)
    return proc


def test_sidecars_killed_at_random_moments_lose_and_duplicate_nothing(tmp_path):
    savedir = tmp_path / "mllogs"
    rng = random.Random(17)
    with MlflowServer(tmp_path / "mlflow") as server:
        train = _train(savedir, server.uri, [None], per_phase=30_000, pause=0.05)
        pid = _wait(lambda: _status(savedir).get("pid"), 60, "the sidecar", savedir)
        kills, seen = 0, 0
        with open(tmp_path / "replacements.log", "ab") as log:
            while train.poll() is None and kills < 4:
                # Once this sidecar is exporting (the server got new points from it), kill it
                # at a random moment: in a batch, between batches, between passes.
                _wait(lambda after=seen: train.poll() is not None
                      or _loss_points(server.uri) > after, 120, "a live export", savedir)
                seen = _loss_points(server.uri)
                time.sleep(rng.uniform(0.0, 1.0))
                os.kill(pid, signal.SIGKILL)
                kills += 1
                pid = _sidecar(savedir, train.pid, log).pid
            _, err = train.communicate(timeout=240)
            assert train.returncode == 0, err  # the training never noticed
            assert kills >= 3, "the training ended before the sidecars were killed"
            os.kill(pid, signal.SIGKILL)  # the last one too, whatever it was doing
        exported_live = _loss_points(server.uri)
        assert exported_live > 0  # the killed sidecars had exported part of it live
        assert Journal(savedir).metrics(run_id="live").num_rows == 33_000
        result = CliRunner().invoke(main, [str(savedir)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert_histories_equal_journal(MlflowClient(server.uri), savedir, run_id="live")
        assert _loss_points(server.uri) == 30_000


def test_a_killed_training_process_leaves_no_sidecar_behind(tmp_path):
    savedir = tmp_path / "mllogs"
    with MlflowServer(tmp_path / "mlflow") as server:
        train = _train(savedir, server.uri, [tmp_path / "never", None], per_phase=500)
        assert train.stdout.readline().startswith("phase 0 done")
        sidecar = _wait(lambda: _status(savedir).get("pid"), 60, "the sidecar", savedir)
        os.killpg(train.pid, signal.SIGKILL)
        train.wait(timeout=30)
        status = _ended(savedir, ("done",))
        assert status["pid"] == sidecar
        assert "the training process has ended" in _log(savedir)
        assert_histories_equal_journal(MlflowClient(server.uri), savedir, run_id="live")
        assert _loss_points(server.uri) == 500


def test_without_itwinai_sync_installed_live_sync_warns_once_and_logging_goes_on(
        tmp_path, monkeypatch):
    monkeypatch.setattr(live, "find_spec", lambda name: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(live, "_said", set())
    with pytest.warns(JournalWarning, match="itwinai-sync is not installed"):
        lg = MLFlowLogger(savedir=tmp_path / "a", run_id="a", live_sync=True)
        lg.create_logger_context()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = MLFlowLogger(savedir=tmp_path / "b", run_id="b", live_sync=True)
        other.create_logger_context()
    lg.log(1.0, "loss", step=0)
    lg.destroy_logger_context()
    other.destroy_logger_context()
    assert Journal(tmp_path / "a").metrics().num_rows == 1
    assert not (tmp_path / "a" / ".sync").exists() or not any((tmp_path / "a" / ".sync").rglob(
        "*.json"))


@pytest.mark.parametrize(("arg", "env", "expected"), [
    (None, "", None), (None, "0", None), (None, "off", None), (None, "1", []),
    (None, "all", []), (None, "mlflow, wandb", ["mlflow", "wandb"]), (False, "1", None),
    (True, "", []), ("tensorboard", "", ["tensorboard"]), (["mlflow"], "0", ["mlflow"]),
])
def test_live_sync_setting(monkeypatch, arg, env, expected):
    monkeypatch.setenv(live.ENV, env)
    assert live.targets_of(arg) == expected


@pytest.mark.parametrize(("rank", "workers", "starts"), [
    (0, 0, True), (1, 0, False), (0, -1, True), (1, -1, False), (2, [2, 3], True),
    (3, [2, 3], False), (1, 1, True), (0, [-1], True),
])
def test_the_lowest_logging_rank_starts_the_sidecar(rank, workers, starts):
    assert live.starts_here(rank, workers) is starts
