#!/usr/bin/env bash
# Creates .venv if missing, installs the project with every extra the tests need (under
# constraints.txt), lints, and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[all,test]'
.venv/bin/ruff check src exporters tests scripts
.venv/bin/python -m pytest "$@"
