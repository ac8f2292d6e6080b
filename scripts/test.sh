#!/usr/bin/env bash
# Install what the tests need and run the whole suite: lint, types, tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k restore -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --test
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy --strict"; .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "$@"
