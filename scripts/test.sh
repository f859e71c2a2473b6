#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), lints, and runs the test suite. Arguments go to pytest
# (e.g. `scripts/test.sh -k mlflow`, `scripts/test.sh --slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src exporters tests scripts
.venv/bin/python -m pytest "$@"
