#!/usr/bin/env bash
# Set up a fresh machine for conexa-backup development: system packages (PostgreSQL server and
# client tools, zstd) when missing, then a virtualenv in .venv with the package installed.
#   bash scripts/bootstrap.sh          # runtime only
#   bash scripts/bootstrap.sh --test   # plus test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
  || need_apt+=(postgresql)
command -v pg_dump >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v zstd >/dev/null 2>&1 || need_apt+=(zstd)
# tests/test_install.py makes a venv with Debian's own python3, as the README's Install does.
if [ "${1:-}" = "--test" ] && command -v apt-get >/dev/null 2>&1; then
  /usr/bin/python3 -c "import ensurepip, venv" >/dev/null 2>&1 || need_apt+=(python3-venv)
  # The web pages are tested in a real browser: Debian's Chromium, driven by Playwright.
  command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
  # The status page's history is made by the CLI with its clock moved (tests/test_status_page.py).
  command -v faketime >/dev/null 2>&1 || need_apt+=(faketime)
  # The README's by-hand restore of an encrypted backup (age -d | zstd -d | pg_restore).
  command -v age >/dev/null 2>&1 || need_apt+=(age)
fi
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need_apt[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "please install: ${need_apt[*]}" >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}" 2>&1 \
  | grep -v -e "^WARNING: Location" -e "is ignored: it is neither" || true
.venv/bin/python -c "import conexa_backup" # fail loudly if the install did not work
# An editable install has no bytecode, and where PYTHONDONTWRITEBYTECODE is set every start
# would compile the package again (~60 ms of a 0.1 s `status`): compile it once, as pip does
# for a wheel. Python ignores a .pyc older than its source.
.venv/bin/python -m compileall -q src >/dev/null
