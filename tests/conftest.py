import os
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
