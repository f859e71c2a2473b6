#!/usr/bin/env bash
# Creates .venv if missing and installs the project with every extra (tests included), under
# constraints.txt so that nothing drags torch away from the CPU build 2.13.0. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[all,test]'
