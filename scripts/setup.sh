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
# yprov4ml (the prov4ml target) without its declared dependencies: its real ones are the
# [prov4ml] extra installed above. It also declares torchvision (never imported; a registry
# torchvision beside the CPU torch breaks `import torch`) and lightning (only for its Lightning
# logger). See requirements-prov4ml-nodeps.txt.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt -r requirements-prov4ml-nodeps.txt
