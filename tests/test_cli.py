"""The command-line contract: names, help, README, JSON, output modes, files we write."""

from __future__ import annotations

import hashlib
import json
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from conexa_backup.cli import app
from tests.conftest import Workspace

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> dict[str, str]:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    return {name: (cmd.help or "") for name, cmd in group.commands.items()}


def test_contract_commands_exist() -> None:
    assert {"backup", "list", "restore", "verify", "status", "download", "delete", "init",
            "check"} <= set(_commands())


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_has_help_and_is_in_the_readme(name: str) -> None:
    assert _commands()[name].strip(), f"{name} has no help text"
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert f"conexa-backup {name}" in README.read_text(encoding="utf-8"), \
        f"`conexa-backup {name}` is not documented in README.md"


def test_readme_documents_every_exit_code() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Exit codes"):]
    for code in [*range(5), 130, 143]:
        assert f"| {code} |" in section


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", sorted(_commands()))
def test_global_options_are_accepted_after_every_command(name: str) -> None:
    """Parsed, not refused with "No such option" (``--help`` then stops before any work)."""
    for options in (["--config", "x.toml"], ["-c", "x.toml"], ["--verbose", "-q"],
                    ["-v", "--quiet"]):
        assert "Usage" in _help(name, *options), options


@pytest.mark.parametrize("name", ["", *sorted(_commands())])
def test_help_shows_flags_bare_and_lists_as_repeatable(name: str) -> None:
    text = _help(*([name] if name else []))
    assert "<bool>" not in text and "list[" not in text
    group = typer.main.get_command(app)
    command = group.commands[name] if name else group  # type: ignore[attr-defined]
    for param in command.params:
        if getattr(param, "multiple", False):
            row = next(line for line in text.splitlines() if param.opts[0] in line)
            assert "(repeatable)" in row, row


def test_global_options_after_the_command_take_effect(ws: Workspace, tmp_path: Path) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    argv = [sys.executable, "-m", "conexa_backup"]
    made = subprocess.run([*argv, "backup", "--config", str(ws.config), "--quiet"],
                          capture_output=True, text=True, cwd=elsewhere, check=False)
    assert made.returncode == 0 and made.stdout == "", made.stderr  # --quiet after: honoured
    listed = subprocess.run([*argv, "list", "--json", "-c", str(ws.config)],
                            capture_output=True, text=True, cwd=elsewhere, check=False)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 1
    # Given before and after the name, the later one wins.
    wrong = ws.run("list", "--config", str(tmp_path / "missing.toml"))
    assert wrong.returncode == 2 and "missing.toml" in wrong.stderr


@pytest.mark.parametrize("argv", [
    ["restore", "--only", "database", "--to-database", "x", "--yes"],
    ["download", "latest", "--to", "dl"],
    ["verify", "--drill"],
])
def test_commands_reading_one_copy_take_target_as_well_as_from(ws: Workspace,
                                                               argv: list[str]) -> None:
    by_from = ws.run(*argv, "--from", "nosuch")
    by_target = ws.run(*argv, "--target", "nosuch")
    assert by_from.returncode == by_target.returncode == 2, by_target.stderr
    assert "unknown target 'nosuch'" in by_target.stderr
    assert by_target.stderr == by_from.stderr


def test_drill_takes_one_target(ws: Workspace) -> None:
    both = ws.run("verify", "--drill", "--from", "local", "--target", "other")
    assert both.returncode == 2 and "one target" in both.stderr


def test_check_says_which_environment_variables_override_the_file(ws: Workspace) -> None:
    plain = ws.run("check")
    assert plain.returncode == 0, plain.stdout
    assert "environment" not in plain.stdout
    url = ws.cluster.url(ws.dbname)
    env = {"DATABASE_URL": url, "BACKUP_RETENTION_DAYS": "9"}
    overridden = ws.run("check", env=env)
    assert overridden.returncode == 0, overridden.stdout
    lines = [line for line in overridden.stdout.splitlines() if "environment:" in line]
    assert len(lines) == 2, overridden.stdout
    assert f"DATABASE_URL overrides [database] url of {ws.config}" in lines[0]
    assert 'BACKUP_RETENTION_DAYS sets [retention] keep_within = "9d"' in lines[1]
    assert "postgresql://" not in overridden.stdout  # nor is the URL (it may hold a password)
    checks = json.loads(ws.run("check", "--json", env=env).stdout)["checks"]
    assert [c["name"] for c in checks[:2]] == ["environment", "environment"]


def test_status_never_says_never_ago(ws: Workspace) -> None:
    result = ws.run("status")
    assert result.returncode == 2, result.stdout  # CRITICAL: no backup yet
    assert "never ago" not in result.stdout
    assert "newest backup - (never, at most 26 h" in result.stdout
    assert "last good drill never" in result.stdout


def test_module_entry_point_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "conexa_backup", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("conexa-backup ")
    # A lone --version is answered before the command line is built: the same answer.
    parsed = subprocess.run([sys.executable, "-m", "conexa_backup", "-q", "--version"],
                            capture_output=True, text=True, check=True).stdout
    assert parsed == out


def test_json_outputs_are_one_document_and_nothing_else(ws: Workspace) -> None:
    empty = ws.run("list", "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    none = ws.run("status", "--json")
    assert none.returncode == 2 and json.loads(none.stdout)["last_backup"] is None  # CRITICAL

    made = ws.run("backup", "--json")
    assert made.returncode == 0, made.stderr
    backup = json.loads(made.stdout)
    assert backup["status"] == "complete" and backup["targets"] == ["local"]

    listing = json.loads(ws.run("list", "--json").stdout)
    assert [b["id"] for b in listing] == [backup["id"]]
    entry = listing[0]
    assert {"id", "created_at", "status", "size_bytes", "targets"} <= set(entry)
    assert datetime.fromisoformat(entry["created_at"]).tzinfo == UTC
    assert entry["size_bytes"] == backup["size_bytes"] > 0

    status = json.loads(ws.run("status", "--json").stdout)
    assert status["last_backup"]["id"] == backup["id"] and status["age_seconds"] < 600
    verify = json.loads(ws.run("verify", "--json").stdout)
    assert verify["ok"] and verify["checks"][0]["bytes_read"] == backup["size_bytes"]
    check = json.loads(ws.run("check", "--json").stdout)
    assert check["ok"], check


def test_non_terminal_backup_prints_just_the_id_and_quiet_prints_nothing(ws: Workspace) -> None:
    plain = ws.run("backup")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert len(lines) == 1 and lines[0][:8].isdigit() and lines[0].endswith("Z")
    assert plain.stderr == ""
    quiet = ws.run("--quiet", "backup")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_files_we_write_are_private(ws: Workspace) -> None:
    backup_id = ws.run("backup").stdout.strip()
    for path in [ws.backups, ws.backups / backup_id, ws.state, ws.state / "logs"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    files = list((ws.backups / backup_id).iterdir()) + list((ws.state / "logs").iterdir())
    assert files
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    log = (ws.state / "logs" / f"backup-{day}.log").read_text()
    assert f"backup {backup_id} complete" in log


def test_download_fetches_checked_files_and_manifest(ws: Workspace, tmp_path: Path) -> None:
    backup_id = ws.run("backup").stdout.strip()
    result = ws.run("download", backup_id, "--to", str(tmp_path / "dl"))
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["id"] == backup_id
    for artifact in manifest["artifacts"]:
        data = (folder / artifact["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        assert stat.S_IMODE((folder / artifact["name"]).stat().st_mode) == 0o600
    again = ws.run("download", backup_id, "--to", str(tmp_path / "dl"))
    assert again.returncode == 2  # never overwrites


def test_delete_removes_only_that_backup(ws: Workspace) -> None:
    first = ws.run("backup").stdout.strip()
    second = ws.run("backup").stdout.strip()
    assert first != second
    # Things in the target folder that are not ours must survive.
    (ws.backups / "notes.txt").write_text("keep me")
    (ws.backups / "other").mkdir()
    (ws.backups / "other" / "x").write_text("keep me too")
    result = ws.run("delete", first, "--yes")
    assert result.returncode == 0, result.stderr
    assert not (ws.backups / first).exists()
    assert [b["id"] for b in json.loads(ws.run("list", "--json").stdout)] == [second]
    assert (ws.backups / "notes.txt").exists() and (ws.backups / "other" / "x").exists()
    assert ws.run("verify", second).returncode == 0
    assert ws.run("delete", "20000101T000000Z", "--yes").returncode == 2


def test_init_writes_a_private_starter_file_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "backup.toml"
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(path)]).exit_code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "[database]" in path.read_text()
    path.write_text("# edited")
    assert runner.invoke(app, ["init", str(path)]).exit_code == 2
    assert path.read_text() == "# edited"
    assert runner.invoke(app, ["init", str(path), "--force"]).exit_code == 0
    assert "[database]" in path.read_text()


def test_check_names_the_broken_part(ws: Workspace, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    ws.config.write_text(ws.config.read_text().replace(str(ws.backups), str(blocker / "sub")))
    result = ws.run("check", "--json")
    assert result.returncode == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["database"]["ok"] and checks["uploads"]["ok"]
    assert not checks["target local"]["ok"] and "local" in checks["target local"]["detail"]


def test_the_cli_never_imports_the_server_stack() -> None:
    """`conexa-backup[server]` is optional: a plain install must run every other command."""
    code = ("import sys, conexa_backup.cli, conexa_backup.__main__\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'uvicorn', 'jwt', 'httpx')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_serve_token_create_prints_the_token_once(tmp_path: Path) -> None:
    config = tmp_path / "backup.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[database]\nurl = '
                      f'"postgresql://u@h/db"\n[[targets]]\nname = "l"\ntype = "local"\n'
                      f'path = "{tmp_path / "b"}"\n[server.auth]\nsecret = "${{S}}"\n'
                      f'read_roles = ["monitor"]\n', encoding="utf-8")
    runner = CliRunner()
    env = {"S": "s" * 40}
    made = runner.invoke(app, ["-c", str(config), "-q", "serve", "token", "create", "nagios",
                               "--role", "monitor"], env=env)
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert token.startswith("cxb_") and len(token) > 40
    stored = (tmp_path / "state" / "server-tokens.json").read_text()
    assert hashlib.sha256(token.encode()).hexdigest() in stored and token not in stored
    again = runner.invoke(app, ["-c", str(config), "serve", "token", "create", "nagios",
                                "--role", "monitor", "--json"], env=env)
    assert again.exit_code == 2 and "exists already" in again.output
    other = runner.invoke(app, ["-c", str(config), "serve", "token", "create", "x",
                                "--role", "root", "--json"], env=env)
    assert other.exit_code == 2 and "none of" in other.output
    made = runner.invoke(app, ["-c", str(config), "serve", "token", "create", "cron",
                               "--role", "admin", "--json"], env=env)
    assert json.loads(made.stdout)["token"].startswith("cxb_")


def test_serve_token_list_and_revoke(tmp_path: Path) -> None:
    from conexa_backup.server.tokens import find_machine_token

    config = tmp_path / "backup.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[database]\nurl = '
                      f'"postgresql://u@h/db"\n[[targets]]\nname = "l"\ntype = "local"\n'
                      f'path = "{tmp_path / "b"}"\n[server.auth]\nsecret = "{"s" * 40}"\n',
                      encoding="utf-8")
    runner = CliRunner()
    def cli(*args: str) -> Any:
        return runner.invoke(app, ["-c", str(config), "serve", "token", *args])
    token = cli("create", "backup-script", "--role", "admin").stdout.strip()
    listed = cli("list", "--json")
    assert listed.exit_code == 0
    [entry] = json.loads(listed.stdout)
    assert (entry["name"], entry["role"]) == ("backup-script", "admin")
    assert token not in listed.stdout
    assert find_machine_token(tmp_path / "state", token) is not None
    assert cli("revoke", "backup-script").exit_code == 0
    assert find_machine_token(tmp_path / "state", token) is None
    assert cli("revoke", "backup-script").exit_code == 2
    assert json.loads(cli("list", "--json").stdout) == []


def test_the_suite_installs_what_the_server_extra_installs() -> None:
    """`pip install '.[server]'` is how the API is installed; the suite runs with the test
    extra, so that one must hold every package (and floor) the server extra asks for."""
    import tomllib

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text(
        encoding="utf-8"))["project"]["optional-dependencies"]
    assert set(extras["server"]) <= set(extras["test"])
