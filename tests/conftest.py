import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="run the longer fault-injection trials")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="longer trial: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


#: Variables from which the journal takes a run id or world size, or that switch live sync on:
#: a test must not inherit them from the environment it runs in (a CI job may well be a SLURM
#: job).
LAUNCHER_ENV = ("ITWINAI_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID",
                "SLURM_PROCID", "WORLD_SIZE", "ITWINAI_SYNC_LIVE")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in LAUNCHER_ENV:
        monkeypatch.delenv(var, raising=False)
    # Tests that count a journal's records exactly must not get a background system-metrics
    # sample by chance (one every 10 s by default): in-process tests run without the sampler
    # unless they ask for it (test_system_metrics.py). Processes started through `spawn` and
    # `child_env` do not inherit this, so they run with the default, as users do.
    monkeypatch.setenv("ITWINAI_SYSTEM_METRICS_INTERVAL", "0")


def train_watched_linear(logger, steps: int = 3):
    """A tiny nn.Linear trained a few steps under `watch` (log='all', every call), logging its
    loss; returns the model. Shared by the exporters' watch tests."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    logger.log(model, "model", kind="watch", log="all", log_freq=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        logger.log(loss.item(), "loss", step=step)
    return model


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ITWINAI_", "SLURM_",
                                                                      "TORCHELASTIC_"))}
    env.update(extra)
    return env


def spawn(code: str, **env: str) -> subprocess.Popen:
    """Run `code` in a fresh Python process (its own process group), stdout piped."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(**env),
        start_new_session=True,
    )


@pytest.fixture
def quickacked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The peer port of each TCP_QUICKACK this process sets on a socket, in order (the
    socket.socket class is Python's, so its setsockopt can be watched)."""
    ports: list[int] = []
    real = socket.socket.setsockopt

    def setsockopt(self, level, option, *value):
        if (level, option) == (socket.IPPROTO_TCP, getattr(socket, "TCP_QUICKACK", None)):
            ports.append(self.getpeername()[1])
        return real(self, level, option, *value)

    monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
    return ports


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MiB tmpfs: a real ENOSPC, and a real read-only remount. Needs root (as in CI)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_filesystem(mnt: Path) -> Path:
    """Fill the filesystem to the last byte; returns the file to delete to free it again."""
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return filler
