#!/usr/bin/env bash
# The main job on a built-in demo: a throwaway PostgreSQL with Conexa-like data and an uploads
# folder, backed up to a local folder, listed, verified, restored side by side and compared.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m conexa_backup.testing.demo "$@"
