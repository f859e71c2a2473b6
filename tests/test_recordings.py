"""The recordings of what itwinai 0.4.2 does are in one directory, written by one script that
names no machine: nothing in the tests, the scripts or the README points at another place, or
at itwinai's virtualenv on a particular machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT
from recordings import RECORDINGS, REFERENCE_DIR

SCRIPT = ROOT / "scripts" / "record_itwinai_reference.py"


def test_every_mention_of_a_recording_names_one_in_the_reference_directory():
    assert sorted(REFERENCE_DIR.iterdir()) == sorted(RECORDINGS.values())
    mentioned, venvs = set(), set()
    for path in [*ROOT.glob("tests/*.py"), *ROOT.glob("scripts/*"), ROOT / "README.md"]:
        if path.name == "test_recordings.py":
            continue  # its patterns
        text = path.read_text()
        mentioned |= {ROOT / m for m in re.findall(r"tests/[\w/.-]+\.json", text)}
        venvs |= {m for m in re.findall(r"\S*itwinai-venv\S*", text)
                  if not m.startswith("/path/to/")}
    assert mentioned == set(RECORDINGS.values())
    assert venvs == set()  # a placeholder only, never a machine's path


def test_the_script_is_told_where_itwinai_is():
    """No default path: without --itwinai-python or ITWINAI_PYTHON it says what it needs."""
    env = {k: v for k, v in os.environ.items() if k != "ITWINAI_PYTHON"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--itwinai-python PATH or ITWINAI_PYTHON" in result.stderr
