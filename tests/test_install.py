"""Install (README, "Install") as written, then every line of crontab.example as cron runs it.

The README's install commands are read from the README itself (the fenced blocks after the
``<!-- install-commands: NAME -->`` markers) and run with ``/bin/sh -e`` in a copy of this
checkout, as root with Debian's root ``PATH``, with three paths moved into a throwaway prefix:
``/opt/conexa-backup``, ``/usr/local/bin`` and ``/etc/conexa-backup`` (the tool's default
config path, so ``$CONEXA_BACKUP_CONFIG`` names the moved one). The ``apt-get`` lines
are the only ones not run (they would change this machine); the tools they install must be
here. ``crontab`` is a stand-in that keeps the table in a file, so root's real crontab is left
alone and the test runs the table the install actually wrote.

Each job of that table then runs as cron runs it: ``/bin/sh -c COMMAND`` with cron's
environment (``HOME=/root``, ``SHELL``, ``LOGNAME`` and the table's own variable lines, with the
same three paths moved), no terminal, against the suite's real cluster, the config that
``init`` wrote edited as the README says (database, uploads, a local target, and the starter
file's email notifier uncommented, pointed at a real SMTP server). Every job must exit 0 and,
being ``--quiet``, print nothing: under cron any output is a mail to MAILTO.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from conexa_backup.testing.cluster import free_port

REPO = Path(__file__).resolve().parent.parent
DEBIAN_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CRON_DEFAULT_PATH = "/usr/bin:/bin"
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                    "__pycache__", ".*_cache", ".hypothesis", "*-output",
                                    "test-artefacts")
FAKE_CRONTAB = """#!/bin/sh
# Stands in for crontab(1): -l prints the saved table, - replaces it with standard input.
case "$1" in
  -l) if [ -f "{table}" ]; then exec cat "{table}"; fi
      echo "no crontab for root" >&2; exit 1 ;;
  -) exec cat > "{table}" ;;
  *) echo "fake crontab: unsupported: $*" >&2; exit 2 ;;
esac
"""


# -- the README's commands ----------------------------------------------------------------------

def readme_block(name: str) -> str:
    """The fenced block that follows ``<!-- install-commands: NAME -->`` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- install-commands: {re.escape(name)} -->\n```sh\n(.*?)```", text,
                      re.DOTALL)
    assert found, f"README.md has no ```sh block marked <!-- install-commands: {name} -->"
    return found.group(1)


@dataclass
class Prefix:
    """Where the system paths of the install go in this test."""

    root: Path
    moved: dict[str, Path] = field(init=False)

    def __post_init__(self) -> None:
        self.moved = {"/opt/conexa-backup": self.root / "opt" / "conexa-backup",
                      "/usr/local/bin": self.root / "usr-local-bin",
                      "/etc/conexa-backup": self.root / "etc" / "conexa-backup"}
        self.moved["/usr/local/bin"].mkdir(parents=True)

    def sub(self, text: str) -> str:
        for system, here in self.moved.items():
            text = text.replace(system, str(here))
        return text

    @property
    def link(self) -> Path:
        return self.moved["/usr/local/bin"] / "conexa-backup"

    @property
    def config(self) -> Path:
        return self.moved["/etc/conexa-backup"] / "backup.toml"


def run_block(name: str, prefix: Prefix, checkout: Path,
              fake_bin: Path) -> subprocess.CompletedProcess[str]:
    """Run a README block (``apt-get`` lines left out) as root's login shell would."""
    lines = readme_block(name).splitlines()
    script = "\n".join(line for line in lines if not line.startswith("apt-get "))
    env = {"PATH": f"{fake_bin}:{prefix.sub(DEBIAN_ROOT_PATH)}", "HOME": "/root",
           "LANG": "C.UTF-8",
           # The tool's own default, /etc/conexa-backup/backup.toml, moves with the prefix.
           "CONEXA_BACKUP_CONFIG": str(prefix.config),
           # This machine's package index settings (a local mirror and wheel folder).
           **{k: v for k, v in os.environ.items()
              if k.startswith("PIP_") or k.lower().endswith("_proxy")}}
    return subprocess.run(["/bin/sh", "-e", "-c", prefix.sub(script)], cwd=checkout, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=240, check=False)


# -- cron ---------------------------------------------------------------------------------------

@dataclass
class CronTable:
    env: dict[str, str]
    jobs: list[str]


def parse_crontab(text: str) -> CronTable:
    """Variable lines and job commands (after the five time fields), as cron reads them."""
    env = {"HOME": "/root", "LOGNAME": "root", "SHELL": "/bin/sh", "PATH": CRON_DEFAULT_PATH}
    jobs: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", line):
            name, value = line.split("=", 1)
            env[name] = value
        else:
            fields = line.split(None, 5)
            assert len(fields) == 6, f"not a cron job line: {line!r}"
            jobs.append(fields[5])
    return CronTable(env, jobs)


def cron_run(table: CronTable, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", command], cwd="/", env=table.env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=240, check=False)


def cron_hours(line: str) -> set[int]:
    """The hours a job line runs at (its second field: ``*``, ``N``, ``A-B`` or a list)."""
    field = line.split()[1]
    if field == "*":
        return set(range(24))
    hours: set[int] = set()
    for part in field.split(","):
        first, _, last = part.partition("-")
        hours |= set(range(int(first), int(last or first) + 1))
    return hours


def test_the_optional_hourly_backup_line_is_commented_out_and_fills_the_other_hours() -> None:
    """Uncommented, the hourly line runs the same backup every hour but the daily one's, so
    the two never start together (the second would find the lock held and exit 4)."""
    text = (REPO / "crontab.example").read_text()
    backup = re.compile(r"(\S+ ){5}\s*conexa-backup --quiet backup")
    (hourly,) = [line for line in text.splitlines()
                 if line.startswith("# ") and backup.fullmatch(line[2:])]
    (daily,) = [line for line in text.splitlines() if backup.fullmatch(line)]
    assert parse_crontab(text).jobs.count("conexa-backup --quiet backup") == 1
    uncommented = parse_crontab(text.replace(hourly, hourly[2:]))
    assert uncommented.jobs.count("conexa-backup --quiet backup") == 2
    assert hourly[2:].split()[0] == daily.split()[0] == "0"  # on the hour: one backup an hour
    assert cron_hours(hourly[2:]).isdisjoint(cron_hours(daily))
    assert cron_hours(hourly[2:]) | cron_hours(daily) == set(range(24))
    assert 'max_backup_age = "2h"' in text and "keep_hourly" in text


# -- an SMTP server for the starter file's email notifier ----------------------------------------

class Inbox:
    def __init__(self) -> None:
        self.mails: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(message_from_bytes(envelope.original_content or envelope.content,
                                             policy=default_policy))
        return "250 OK"


@dataclass
class Smtp:
    port: int
    inbox: Inbox


@pytest.fixture
def smtp() -> Iterator[Smtp]:
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield Smtp(port, inbox)
    controller.stop()


def configure(text: str, ws: Any, root: Path, smtp_port: int) -> str:
    """The starter config as a sysadmin edits it: every key the README names, nothing else."""
    edits = {'state_dir = "/var/lib/conexa-backup"': f'state_dir = "{root / "state"}"',
             'url = "postgresql://conexa@localhost:5432/conexa"':
                 f'url = "{ws.cluster.url(ws.dbname)}"',
             'path = "/srv/conexa/uploads"': f'path = "{ws.uploads}"',
             'path = "/var/backups/conexa"': f'path = "{root / "backups"}"'}
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    # Uncomment the email notifier the starter file suggests; aim it at the SMTP server.
    head, marker, example = text.partition("# [[notify]]\n")
    assert marker and all(line.startswith("# ") for line in example.splitlines()), example
    notify = "[[notify]]\n" + "".join(line[2:] + "\n" for line in example.splitlines())
    notify = notify.replace('host = "localhost"\n', 'host = "127.0.0.1"\n') \
        .replace("port = 25\n", f"port = {smtp_port}\n")
    assert f"port = {smtp_port}\n" in notify and '"report"' in notify, notify
    return head + notify


# -- the test -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_readme_install_then_every_crontab_line_runs_as_cron_runs_it(
        ws: Any, tmp_path: Path, smtp: Smtp) -> None:
    for tool in ("/usr/bin/python3", "/usr/bin/pg_dump", "/usr/bin/zstd"):  # from apt-get
        assert os.access(tool, os.X_OK), f"{tool}: the README's apt-get line installs it"
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=NOT_COPIED, symlinks=True)
    prefix = Prefix(tmp_path / "prefix")
    fake_bin, table_file = tmp_path / "fake-bin", tmp_path / "root.crontab"
    fake_bin.mkdir()
    (fake_bin / "crontab").write_text(FAKE_CRONTAB.format(table=table_file))
    (fake_bin / "crontab").chmod(0o755)

    setup = run_block("setup", prefix, checkout, fake_bin)

    assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
    assert prefix.link.is_symlink()
    assert prefix.link.resolve() == prefix.moved["/opt/conexa-backup"] / "bin" / "conexa-backup"
    assert stat.S_IMODE(prefix.config.stat().st_mode) == 0o600
    prefix.config.write_text(configure(prefix.config.read_text(), ws, tmp_path, smtp.port))

    schedule = run_block("schedule", prefix, checkout, fake_bin)

    assert schedule.returncode == 0, schedule.stdout + schedule.stderr
    installed = table_file.read_text()
    assert installed == (checkout / "crontab.example").read_text()
    table = parse_crontab(prefix.sub(installed))
    assert table.env["PATH"] == prefix.sub("/usr/local/bin:/usr/bin:/bin")
    which = cron_run(table, "command -v conexa-backup")
    assert which.stdout.strip() == str(prefix.link), which
    assert [job.split()[:3] for job in table.jobs] == [
        ["conexa-backup", "--quiet", "backup"], ["conexa-backup", "--quiet", "verify"],
        ["conexa-backup", "--quiet", "report"], ["conexa-backup", "--quiet", "verify"]]

    for job in table.jobs:
        result = cron_run(table, job)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), (job, result)

    (mail,) = smtp.inbox.mails  # the weekly report; nothing failed, so nothing else
    assert mail["Subject"] == "[conexa-backup] conexa-backup report, last 7 days"
    assert "backups: 1 runs, 1 ok" in mail.get_body(("plain",)).get_content()
    assert "RPO" in mail.get_body(("html",)).get_content()  # and the report's page
    status = cron_run(table, "conexa-backup status")
    assert status.returncode == 0 and status.stdout.startswith("CONEXA-BACKUP OK"), status
    # The README's install leaves out the `server` extra: serve says what to install.
    serve = cron_run(table, "conexa-backup serve")
    assert serve.returncode == 2 and "Traceback" not in serve.stderr, serve
    assert "pip install 'conexa-backup[server]'" in serve.stderr, serve
