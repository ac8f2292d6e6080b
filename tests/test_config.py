"""backup.toml: finding, parsing, validating, and the messages users see when it is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from conexa_backup.actions.setup import starter_config
from conexa_backup.config import Config, find_config, loading, parse_config
from conexa_backup.config.loading import find_line
from conexa_backup.errors import ConfigError, ExitCode
from conexa_backup.storage.local import LocalTargetConfig

REPO = Path(__file__).resolve().parents[1]
SRC = Path("/etc/conexa/backup.toml")  # only used in messages; never read

VALID = """\
state_dir = "/var/lib/cb"

[database]
url = "postgresql://conexa@db.internal:5432/conexa"

[[targets]]
name = "local"
type = "local"
path = "/var/backups/conexa"
"""

TWO_TARGETS = """\
[database]
url = "postgresql://conexa@localhost/conexa"

[[targets]]
name = "first"
type = "local"
path = "/a"

[[targets]]
name = "second"
type = "local"
path = "/b"
"""


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(text, SRC, {} if env is None else env)


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    assert info.value.exit_code == ExitCode.USAGE
    return str(info.value)


# -- a valid file -----------------------------------------------------------------------------

def test_valid_file_and_defaults() -> None:
    config = parse(VALID)
    assert config.state_dir == Path("/var/lib/cb")
    assert config.database.url == "postgresql://conexa@db.internal:5432/conexa"
    assert config.database.password_file is None
    assert config.database.jobs == 2
    assert config.database.globals is False
    assert config.database.maintenance_database == "postgres"
    assert config.database.bin_dir is None
    assert config.uploads is None
    assert config.compression.algorithm == "zstd"
    assert config.compression.level is None
    assert config.compression.threads == 0
    assert len(config.targets) == 1
    target = config.targets[0]
    assert isinstance(target, LocalTargetConfig)
    assert (target.name, target.type) == ("local", "local")
    assert target.path == Path("/var/backups/conexa")


def test_state_dir_default() -> None:
    config = parse(VALID.replace('state_dir = "/var/lib/cb"\n', ""))
    assert config.state_dir == Path("/var/lib/conexa-backup")


def test_every_key_set() -> None:
    text = """\
[database]
url = "postgresql://conexa@db.internal:5432/conexa"
password_file = "/etc/cb/pw"
jobs = 8
globals = true
maintenance_database = "template1"
bin_dir = "/usr/lib/postgresql/16/bin"

[uploads]
path = "/srv/uploads"

[compression]
algorithm = "gzip"
level = 9
threads = 4

[[targets]]
name = "nas"
type = "local"
path = "/mnt/nas"
"""
    config = parse(text)
    assert config.database.password_file == Path("/etc/cb/pw")
    assert config.database.jobs == 8
    assert config.database.globals is True
    assert config.database.maintenance_database == "template1"
    assert config.database.bin_dir == Path("/usr/lib/postgresql/16/bin")
    assert config.uploads is not None and config.uploads.path == Path("/srv/uploads")
    assert (config.compression.algorithm, config.compression.level,
            config.compression.threads) == ("gzip", 9, 4)


def test_config_is_frozen() -> None:
    config = parse(VALID)
    with pytest.raises(ValueError, match="frozen"):
        config.state_dir = Path("/elsewhere")  # type: ignore[misc]


# -- unknown keys: file, dotted path and line -----------------------------------------------------

def test_unknown_top_level_key() -> None:
    message = error_of("colour = 'blue'\n" + VALID)
    assert message.startswith(f"{SRC}: ")
    assert "colour (line 1): unknown key" in message
    assert "blue" not in message


def test_unknown_key_in_database() -> None:
    text = VALID.replace('[database]\n', '[database]\nport = 5432\n')
    message = error_of(text)
    assert str(SRC) in message
    assert "database.port (line 4): unknown key" in message


def test_unknown_key_in_second_target() -> None:
    text = TWO_TARGETS.replace('path = "/b"\n', 'path = "/b"\nbucket = "secret-bucket"\n')
    message = error_of(text)
    assert "targets.1.bucket (line 13): unknown key" in message
    assert "secret-bucket" not in message


# -- other validation errors ----------------------------------------------------------------------

def test_missing_required_key() -> None:
    text = VALID.replace('url = "postgresql://conexa@db.internal:5432/conexa"\n', "")
    message = error_of(text)
    assert str(SRC) in message
    assert "database.url" in message
    assert "required key is missing" in message


def test_missing_database_table() -> None:
    text = VALID.replace('[database]\nurl = "postgresql://conexa@db.internal:5432/conexa"\n', "")
    assert "database: required key is missing" in error_of(text)


def test_malformed_toml_names_the_line() -> None:
    text = VALID.replace('[database]\n', '[database]\nurl = = "x"\n')
    message = error_of(text)
    assert message.startswith(f"{SRC}: invalid TOML")
    assert "line 4" in message


def test_wrong_type() -> None:
    text = VALID.replace('[database]\n', '[database]\njobs = "many"\n')
    message = error_of(text)
    assert "database.jobs (line 4)" in message
    assert "integer" in message
    assert "many" not in message


def test_out_of_range_and_bad_choice() -> None:
    text = VALID + '\n[compression]\nalgorithm = "lz4"\nlevel = 30\n'
    message = error_of(text)
    assert "compression.algorithm (line 12)" in message
    assert "'zstd' or 'gzip'" in message
    assert "compression.level (line 13)" in message
    assert "lz4" not in message


def test_unknown_target_type() -> None:
    message = error_of(VALID.replace('type = "local"', 'type = "ftp"'))
    assert "targets.0.type (line 8)" in message
    assert "unknown target type; known types: gcs, local, s3" in message  # what is accepted
    assert "ftp" not in message


def test_bad_target_name() -> None:
    message = error_of(VALID.replace('name = "local"', 'name = "../evil"'))
    assert "targets.0.name (line 7)" in message


def test_duplicate_target_names() -> None:
    message = error_of(TWO_TARGETS.replace('name = "second"', 'name = "first"'))
    assert "targets" in message
    assert "unique" in message
    assert "repeated: first" in message


def test_empty_targets_list() -> None:
    text = 'targets = []\n[database]\nurl = "postgresql://u@h/db"\n'
    message = error_of(text)
    assert "targets (line 1)" in message
    assert "at least 1" in message


def test_no_targets_at_all() -> None:
    message = error_of('[database]\nurl = "postgresql://u@h/db"\n')
    assert "targets: required key is missing" in message


def test_non_postgresql_url_rejected() -> None:
    message = error_of(VALID.replace("postgresql://", "mysql://"))
    assert "database.url (line 4)" in message
    assert "postgresql://" in message
    assert "db.internal" not in message  # the value itself is never echoed


def test_postgres_scheme_alias_accepted() -> None:
    config = parse(VALID.replace("postgresql://", "postgres://"))
    assert config.database.url.startswith("postgres://")


# -- ${VAR} expansion and DATABASE_URL ------------------------------------------------------------

def test_variable_expansion() -> None:
    text = VALID.replace("conexa@db.internal", "${DB_USER}:${DB_PASS}@db.internal").replace(
        '"/var/backups/conexa"', '"${BACKUP_ROOT}/conexa"')
    config = parse(text, {"DB_USER": "app", "DB_PASS": "s3cr3t", "BACKUP_ROOT": "/mnt/nas"})
    assert config.database.url == "postgresql://app:s3cr3t@db.internal:5432/conexa"
    assert config.targets[0].path == Path("/mnt/nas/conexa")  # type: ignore[attr-defined]


def test_unset_variable_names_key_and_variable_without_values() -> None:
    text = VALID.replace("conexa@db.internal", "${DB_USER}:${DB_PASS}@db.internal")
    message = error_of(text, {"DB_USER": "topsecretuser"})
    assert str(SRC) in message
    assert "database.url" in message
    assert "${DB_PASS}" in message
    assert "not set" in message
    assert "topsecretuser" not in message
    assert "db.internal" not in message


def test_unset_variable_inside_target_list() -> None:
    text = TWO_TARGETS.replace('path = "/b"', 'path = "${NAS}/b"')
    message = error_of(text)
    assert "targets.1.path" in message
    assert "${NAS}" in message


def test_dollar_without_braces_is_literal() -> None:
    config = parse(VALID.replace('"/var/backups/conexa"', '"/backups/$HOME/x"'), {"HOME": "/h"})
    assert config.targets[0].path == Path("/backups/$HOME/x")  # type: ignore[attr-defined]


def test_database_url_env_overrides_file() -> None:
    config = parse(VALID, {"DATABASE_URL": "postgresql://seed@seed-db:5433/seed"})
    assert config.database.url == "postgresql://seed@seed-db:5433/seed"


def test_database_url_env_provides_missing_url() -> None:
    text = VALID.replace('url = "postgresql://conexa@db.internal:5432/conexa"\n', "")
    config = parse(text, {"DATABASE_URL": "postgresql://seed@seed-db/seed"})
    assert config.database.url == "postgresql://seed@seed-db/seed"


def test_empty_database_url_env_is_ignored() -> None:
    assert parse(VALID, {"DATABASE_URL": ""}).database.url.startswith("postgresql://conexa@")


def test_bad_database_url_env_is_rejected() -> None:
    message = error_of(VALID, {"DATABASE_URL": "mysql://seed@x/y"})
    assert "database.url" in message
    assert "seed@x" not in message


# -- find_config ----------------------------------------------------------------------------------

@pytest.fixture
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the /etc fallback somewhere empty so the machine's /etc never matters."""
    missing = tmp_path / "etc" / "backup.toml"
    monkeypatch.setattr(loading, "SYSTEM_CONFIG", missing)
    return missing


@pytest.fixture
def three_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                no_system_config: Path) -> tuple[Path, Path, Path]:
    explicit = tmp_path / "explicit.toml"
    from_env = tmp_path / "from-env.toml"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for path in (explicit, from_env, cwd / "backup.toml"):
        path.write_text(VALID, encoding="utf-8")
    monkeypatch.chdir(cwd)
    return explicit, from_env, cwd / "backup.toml"


def test_find_config_explicit_wins(three_files: tuple[Path, Path, Path]) -> None:
    explicit, from_env, _ = three_files
    assert find_config(explicit, {"CONEXA_BACKUP_CONFIG": str(from_env)}) == explicit


def test_find_config_env_before_cwd(three_files: tuple[Path, Path, Path]) -> None:
    _, from_env, _ = three_files
    assert find_config(None, {"CONEXA_BACKUP_CONFIG": str(from_env)}) == from_env


def test_find_config_cwd(three_files: tuple[Path, Path, Path]) -> None:
    _, _, in_cwd = three_files
    found = find_config(None, {})
    assert found.resolve() == in_cwd.resolve()
    assert find_config(None, {"CONEXA_BACKUP_CONFIG": ""}).resolve() == in_cwd.resolve()


def test_find_config_system_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     no_system_config: Path) -> None:
    monkeypatch.chdir(tmp_path)
    no_system_config.parent.mkdir()
    no_system_config.write_text(VALID, encoding="utf-8")
    assert find_config(None, {}) == no_system_config


def test_find_config_nothing_found_has_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           no_system_config: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        find_config(None, {})
    assert "--config" in str(info.value)
    assert "CONEXA_BACKUP_CONFIG" in str(info.value)
    assert info.value.hint is not None and "init" in info.value.hint


def test_find_config_explicit_missing_is_error(three_files: tuple[Path, Path, Path],
                                              tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        find_config(missing, {})


def test_find_config_env_missing_does_not_fall_back(three_files: tuple[Path, Path, Path],
                                                   tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gone\.toml"):
        find_config(None, {"CONEXA_BACKUP_CONFIG": str(tmp_path / "gone.toml")})


def test_find_config_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        find_config(tmp_path, {})


# -- find_line ------------------------------------------------------------------------------------

FIND_LINE_TEXT = """\
state_dir = "/x"            # line 1

[database]                  # line 3
url = "postgresql://h/db"   # line 4
jobs = 3                    # line 5

[compression]               # line 7
algorithm = "zstd"          # line 8

[[targets]]                 # line 10
name = "a"                  # line 11
path = "/a"                 # line 12

[[targets]]                 # line 14
name = "b"                  # line 15
type = "local"              # line 16
"""


@pytest.mark.parametrize(("loc", "line"), [
    (("state_dir",), 1),
    (("database",), 3),
    (("database", "url"), 4),
    (("database", "jobs"), 5),
    (("compression", "algorithm"), 8),
    (("targets", 0), 10),
    (("targets", 0, "name"), 11),
    (("targets", 0, "path"), 12),
    (("targets", 1), 14),
    (("targets", 1, "name"), 15),
    (("targets", 1, "type"), 16),
    (("targets", 0, "type"), None),  # entry 0 has no type: must not report entry 1's
    (("targets", 2, "name"), None),  # no third entry
    (("database", "password_file"), None),
    (("uploads", "path"), None),
    (("nowhere",), None),
])
def test_find_line(loc: tuple[str | int, ...], line: int | None) -> None:
    assert find_line(FIND_LINE_TEXT, loc) == line


def test_find_line_empty_array_entry() -> None:
    text = '[[targets]]\n[[targets]]\nname = "b"\n'
    assert find_line(text, ("targets", 0, "name")) is None


# -- the shipped example --------------------------------------------------------------------------

def test_example_is_the_starter_config() -> None:
    example = (REPO / "backup.toml.example").read_bytes()
    assert example == starter_config().encode("utf-8")


def test_example_parses() -> None:
    text = (REPO / "backup.toml.example").read_text(encoding="utf-8")
    config = parse_config(text, REPO / "backup.toml.example", {"HOME": "/root"})
    assert isinstance(config, Config)
    assert config.database.url.startswith("postgresql://")
    assert config.uploads is not None
    assert [t.name for t in config.targets] == ["local"]
    assert config.compression.algorithm == "zstd"


# -- [server]: the HTTP API, fail closed ----------------------------------------------------------

SERVER = VALID + '\n[server]\n{server}\n[server.auth]\n{auth}\n'
HS = 'secret = "${JWT_SECRET}"'
JWT_ENV = {"JWT_SECRET": "x" * 40}


def server_config(server: str = "", auth: str = HS, env: dict[str, str] | None = None) -> Config:
    return parse(SERVER.format(server=server, auth=auth), JWT_ENV if env is None else env)


def server_error(server: str = "", auth: str = HS, env: dict[str, str] | None = None) -> str:
    message = error_of(SERVER.format(server=server, auth=auth), JWT_ENV if env is None else env)
    assert "x" * 40 not in message  # never the secret
    return message


def test_no_server_section_is_fine_for_the_cli() -> None:
    assert parse(VALID).server is None


def test_server_defaults() -> None:
    server = server_config().server
    assert server is not None
    assert (server.listen, server.allow_plain_http, server.download) == (
        "127.0.0.1:8765", False, "proxy")
    assert server.cors_origins == [] and server.tls_cert_file is None
    auth = server.auth
    assert auth.algorithms == ["HS256"]
    assert auth.secret is not None and auth.secret.get_secret_value() == "x" * 40
    assert (auth.role_claim, auth.admin_roles, auth.read_roles) == ("role", ["admin"], [])
    assert auth.restore_roles == ["admin"]  # default: admin_roles
    assert not auth.insecure_no_auth
    assert server_config(auth=HS + '\nadmin_roles = ["gestor"]').server.auth.restore_roles \
        == ["gestor"]  # type: ignore[union-attr]


def test_server_needs_its_auth_table() -> None:
    message = error_of(VALID + '\n[server]\nlisten = "127.0.0.1:9000"\n')
    assert "server.auth: required key is missing" in message


def test_server_unknown_keys_are_refused() -> None:
    assert "server.auth.algorithm (line 15): unknown key" in server_error(
        auth=HS + '\nalgorithm = "HS256"')
    assert "server.port" in server_error(server="port = 80")


@pytest.mark.parametrize("listen", ["8765", "localhost", ":8765", "127.0.0.1:99999",
                                    "127.0.0.1:http"])
def test_server_listen_must_be_host_port(listen: str) -> None:
    assert "server.listen (line 12): must be HOST:PORT" in server_error(
        server=f'listen = "{listen}"')


def test_server_reachable_listen_needs_tls_or_allow_plain_http() -> None:
    message = server_error(server='listen = "0.0.0.0:8765"')
    assert "server (line 11)" in message and "allow_plain_http" in message
    assert "tls_cert_file" in message
    server_config('listen = "0.0.0.0:8765"\nallow_plain_http = true')
    server_config('listen = "10.0.0.5:8765"\ntls_cert_file = "/c.pem"\ntls_key_file = "/k.pem"')
    for loopback in ("127.0.0.1:1", "[::1]:8765", "localhost:8765", "127.9.9.9:80"):
        server_config(f'listen = "{loopback}"')
    assert "set both or neither" in server_error(server='tls_cert_file = "/c.pem"')


def test_server_insecure_no_auth_only_on_loopback() -> None:
    config = server_config(auth="insecure_no_auth = true")  # no secret needed there
    assert config.server is not None and config.server.auth.insecure_no_auth
    message = server_error('listen = "0.0.0.0:8765"\nallow_plain_http = true',
                           "insecure_no_auth = true")
    assert "auth.insecure_no_auth: only allowed with a loopback listen" in message


@pytest.mark.parametrize("auth", ["", 'algorithms = ["HS256"]', 'secret = ""',
                                  'secret = "${EMPTY}"', 'secret = "  "'])
def test_server_hmac_needs_a_non_empty_secret(auth: str) -> None:
    message = server_error(auth=auth, env={"EMPTY": ""})
    assert "server.auth (line" in message and "secret" in message


def test_server_key_sources_fit_the_algorithms() -> None:
    assert "set only one" in server_error(auth=HS + '\nsecret_file = "/s"')
    assert "needs `secret` or `secret_file`" in server_error(auth=HS + '\njwks_url = '
                                                             '"https://app/jwks.json"')
    message = server_error(auth='algorithms = ["RS256"]')
    assert "RS256 needs `public_key_file` or `jwks_url`" in message
    assert "secret" in server_error(auth='algorithms = ["ES256"]\npublic_key_file = "/k"\n' + HS)
    assert "set only one" in server_error(
        auth='algorithms = ["EdDSA"]\npublic_key_file = "/k"\njwks_url = "https://a/j"')
    server_config(auth='algorithms = ["RS256", "ES256"]\njwks_url = "https://app/jwks.json"')
    server_config(auth='algorithms = ["EdDSA"]\npublic_key_file = "/etc/conexa/app.pem"')


def test_server_hmac_and_public_key_algorithms_are_never_mixed() -> None:
    message = server_error(auth='algorithms = ["RS256", "HS256"]\npublic_key_file = "/k"')
    assert "HS256 cannot be listed with RS256" in message


@pytest.mark.parametrize("algorithms", ['["none"]', '[]', '["hs256"]', '["HS1"]'])
def test_server_algorithms_are_a_known_non_empty_list(algorithms: str) -> None:
    assert "server.auth.algorithms" in server_error(auth=f"algorithms = {algorithms}\n{HS}")


def test_server_jwks_url_must_be_https_off_loopback() -> None:
    rs = 'algorithms = ["RS256"]\n'
    assert "https://" in server_error(auth=rs + 'jwks_url = "http://app.internal/jwks.json"')
    assert "https://" in server_error(auth=rs + 'jwks_url = "file:///etc/jwks.json"')
    server_config(auth=rs + 'jwks_url = "http://127.0.0.1:3000/jwks.json"')


def test_server_download_mode_and_empty_roles() -> None:
    assert "'proxy' or 'presigned'" in server_error(server='download = "redirect"')
    assert server_config('download = "presigned"').server.download == "presigned"  # type: ignore[union-attr]
    assert "role must not be empty" in server_error(auth=HS + '\nread_roles = [""]')


def test_server_secret_written_literally_is_found() -> None:
    """A world-readable file with the JWT secret in it gets the chmod 600 warning."""
    literal = SERVER.format(server="", auth='secret = "literal-jwt-secret"')
    assert loading.secrets_written_in(literal) == ["server.auth.secret"]
    assert loading.secrets_written_in(SERVER.format(server="", auth=HS)) == []


# -- [uploads] format: packs by default, where packs can go -----------------------------------

_AGE = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"


@pytest.mark.parametrize(("extra", "expected"), [
    ("", "packs"),
    (f'[encryption]\nrecipients = ["{_AGE}"]\n', "tar"),
    (f'[encryption]\nrecipients = ["{_AGE}"]\ndedup_key_file = "/k"\n', "packs"),
    ('[[targets]]\nname = "s3"\ntype = "s3"\nbucket = "locked-bucket"\n'
     'object_lock_mode = "COMPLIANCE"\nobject_lock_days = 30\n', "tar"),
])
def test_uploads_format_left_out_is_packs_where_packs_can_go(extra: str, expected: str) -> None:
    config = parse(VALID + '[uploads]\npath = "/srv/up"\n' + extra)
    assert config.uploads is not None and config.uploads.format == expected


def test_uploads_format_said_is_kept_or_refused_with_the_reason() -> None:
    tar = parse(VALID + '[uploads]\npath = "/srv/up"\nformat = "tar"\n')
    assert tar.uploads is not None and tar.uploads.format == "tar"
    with pytest.raises(ConfigError, match="dedup_key_file"):
        parse(VALID + '[uploads]\npath = "/srv/up"\nformat = "packs"\n'
              f'[encryption]\nrecipients = ["{_AGE}"]\n')
