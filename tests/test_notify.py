"""Alerts (README, "Alerts"): every notifier type against a real local server.

Slack, webhook and heartbeat go to a pytest-httpserver sink; email to an aiosmtpd server
(plain, STARTTLS with login, implicit TLS) with a self-signed certificate made here. The CLI
runs as a real subprocess (``ws.run``), as cron runs it, so exit codes, stderr and the log file
are what an operator sees. The contract under test: the right message reaches every channel
that asked for it, and a notifier that fails never changes the run's result nor leaks a secret.
"""

from __future__ import annotations

import email
import email.policy
import ipaddress
import json
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_httpserver import HTTPServer

from conexa_backup.testing.cluster import free_port

# pytest-httpserver listens on "localhost" by default, which may resolve to ::1 first; its
# session fixture reads this when first used, after collection.
os.environ.setdefault("PYTEST_HTTPSERVER_HOST", "127.0.0.1")

HOST = socket.gethostname()
MISSING_DB = "conexa_no_such_database"
SEED_VARS = ("SLACK_WEBHOOK_URL", "BACKUP_NOTIFY_EMAIL", "SMTP_HOST", "SMTP_PORT", "SMTP_USER",
             "SMTP_PASSWORD", "SMTP_FROM", "SMTP_SECURITY", "CONEXA_TOKEN")
EVENT_KEYS = {"schema", "kind", "outcome", "title", "host", "time", "backup_id",
              "duration_seconds", "size_bytes", "targets", "error", "details", "body"}


@pytest.fixture(autouse=True)
def _no_seed_notifiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed's variables add notifiers: only the tests that set them get them."""
    for var in SEED_VARS:
        monkeypatch.delenv(var, raising=False)


# -- helpers ----------------------------------------------------------------------------------

def _toml(value: Any) -> str:
    """A TOML value (JSON string syntax is valid TOML for basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def notifier(type_: str, **keys: Any) -> str:
    """One ``[[notify]]`` table (``from_`` for the reserved word ``from``)."""
    lines = ["[[notify]]", f"type = {_toml(type_)}"]
    lines += [f"{k.rstrip('_')} = {_toml(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def requests_to(server: HTTPServer, path: str) -> list[Any]:
    return [req for req, _ in server.log if req.path == path]


def manifest(ws: Any, backup_id: str, target_dir: Path | None = None) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        ((target_dir or ws.backups) / backup_id / "manifest.json").read_text())
    return data


def size_of(man: dict[str, Any]) -> int:
    return sum(int(a["size"]) for a in man["artifacts"])


def log_text(ws: Any) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in (ws.state / "logs").glob("*.log"))


def _last_line_id(stdout: str) -> str:
    backup_id = stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d{8}T\d{6}Z(-\d+)?", backup_id), stdout
    return backup_id


@contextmanager
def silent_port() -> Iterator[int]:
    """A TCP port that accepts connections (kernel backlog) but never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


# -- SMTP sink --------------------------------------------------------------------------------

@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: Any
    tls: bool
    authenticated: bool


@dataclass
class Inbox:
    mails: list[Mail] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append(Mail(
            envelope.mail_from, list(envelope.rcpt_tos),
            email.message_from_bytes(envelope.original_content or envelope.content,
                                     policy=email.policy.default),
            server.transport.get_extra_info("ssl_object") is not None,
            bool(session.authenticated)))
        return "250 OK"


@dataclass
class SmtpSink:
    port: int
    inbox: Inbox


USER, PASSWORD = "backup@conexa.test", "s3cret-smtp-pass"


def _authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                   auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and \
        (auth_data.login, auth_data.password) == (USER.encode(), PASSWORD.encode())
    # handled=False lets aiosmtpd answer 535; handled=True without a reply hangs the client.
    return AuthResult(success=True) if ok else AuthResult(success=False, handled=False)


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert, key) PEM files."""
    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def smtp(tls_cert: tuple[Path, Path]) -> Iterator[Callable[..., SmtpSink]]:
    """Start aiosmtpd servers: ``smtp(security="none"|"starttls"|"tls", login=bool)``."""
    started: list[Controller] = []

    def start(security: str = "none", *, login: bool = False) -> SmtpSink:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls_cert)
        kwargs: dict[str, Any] = {}
        if security == "starttls":
            kwargs.update(tls_context=context, require_starttls=True)
        elif security == "tls":
            kwargs.update(ssl_context=context, auth_require_tls=False)
        if login:
            kwargs.update(authenticator=_authenticator, auth_required=True)
        inbox = Inbox()
        port = free_port()  # Controller(port=0) does not report the port it got
        controller = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        started.append(controller)
        return SmtpSink(port, inbox)

    yield start
    for controller in started:
        controller.stop()


def email_notifier(sink: SmtpSink, security: str, cafile: Path | None = None,
                   **keys: Any) -> str:
    extra: dict[str, Any] = {"cafile": str(cafile)} if cafile else {}
    return notifier("email", host="127.0.0.1", port=sink.port, security=security,
                    from_="backup@conexa.test", to=["ops@conexa.test", "director@conexa.test"],
                    timeout=5, retries=1, **extra, **keys)


# -- Slack --------------------------------------------------------------------------------------

def test_slack_failed_backup_sends_a_readable_message_and_still_fails(
        ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/slack", method="POST").respond_with_data("ok")
    ws.write_config(notifier("slack", webhook_url=httpserver.url_for("/slack")),
                    database=MISSING_DB)

    result = ws.run("backup")

    assert result.returncode == 1, result.stderr
    assert "error:" in result.stderr and MISSING_DB in result.stderr
    assert "does not exist" in result.stderr
    assert "warning: notification" not in result.stderr
    httpserver.check_assertions()
    (request,) = requests_to(httpserver, "/slack")
    assert request.headers["Content-Type"] == "application/json"
    text = request.get_json()["text"]
    assert "backup FAILED" in text
    assert f"host: {HOST}" in text
    assert MISSING_DB in text and "does not exist" in text  # the error's tail
    assert text.startswith(":x:")


def test_slack_success_message_when_asked_for_it(ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/slack", method="POST").respond_with_data("ok")
    ws.write_config(notifier("slack", webhook_url=httpserver.url_for("/slack"),
                             events=["success"]))

    result = ws.run("backup")

    assert result.returncode == 0, result.stderr
    backup_id = _last_line_id(result.stdout)
    httpserver.check_assertions()
    (request,) = requests_to(httpserver, "/slack")  # the "start" event was not asked for
    text = request.get_json()["text"]
    assert f"backup {backup_id} complete" in text
    assert f"backup: {backup_id}" in text
    assert f"size: {size_of(manifest(ws, backup_id)) / 1e6:.1f} MB" in text
    assert re.search(r"duration: \d+\.\d s", text)
    assert "stored on: local" in text
    assert f"host: {HOST}" in text


def test_slack_default_events_send_nothing_on_success(ws: Any, httpserver: HTTPServer) -> None:
    ws.write_config(notifier("slack", webhook_url=httpserver.url_for("/slack")))

    result = ws.run("backup")

    assert result.returncode == 0, result.stderr
    assert httpserver.log == []
    httpserver.check_assertions()


# -- webhook ------------------------------------------------------------------------------------

def test_webhook_payload_follows_the_schema_with_custom_headers(
        ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    ws.write_config(notifier("webhook", url=httpserver.url_for("/hook"), events=["success"],
                             headers={"Authorization": "Bearer ${CONEXA_TOKEN}",
                                      "X-Conexa-Source": "backup"}))

    result = ws.run("backup", env={"CONEXA_TOKEN": "tok-abc-123"})

    assert result.returncode == 0, result.stderr
    backup_id = _last_line_id(result.stdout)
    httpserver.check_assertions()
    (request,) = requests_to(httpserver, "/hook")
    assert request.headers["Authorization"] == "Bearer tok-abc-123"
    assert request.headers["X-Conexa-Source"] == "backup"
    assert request.headers["Content-Type"] == "application/json"
    event = request.get_json()
    assert set(event) == EVENT_KEYS
    assert event["schema"] == "conexa-backup/event/v1"
    assert (event["kind"], event["outcome"]) == ("backup", "success")
    assert event["backup_id"] == backup_id
    assert event["title"] == f"backup {backup_id} complete"
    assert event["host"] == HOST
    assert event["time"].endswith("Z")
    sent = datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - sent).total_seconds()) < 120
    assert event["targets"] == {"ok": ["local"], "failed": {}}
    assert event["size_bytes"] == size_of(manifest(ws, backup_id))
    assert isinstance(event["duration_seconds"], float) and event["duration_seconds"] > 0
    assert event["error"] is None and event["body"] is None
    assert {"skipped_targets", "pruned"} <= set(event["details"])


def test_webhook_partial_backup_names_the_failed_target(
        ws: Any, httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file\n")
    ws.write_config(
        f'[[targets]]\nname = "broken"\ntype = "local"\npath = "{blocker / "backups"}"\n'
        + notifier("webhook", url=httpserver.url_for("/hook"), events=["failure", "partial"]))

    result = ws.run("backup")

    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "broken" in result.stderr
    httpserver.check_assertions()
    (request,) = requests_to(httpserver, "/hook")
    event = request.get_json()
    assert (event["kind"], event["outcome"]) == ("backup", "partial")
    assert event["targets"]["ok"] == ["local"]
    assert list(event["targets"]["failed"]) == ["broken"]
    assert event["targets"]["failed"]["broken"]
    assert event["backup_id"] and (ws.backups / event["backup_id"] / "manifest.json").is_file()
    assert "partially complete" in event["title"]


# -- retries, failures, timeouts ------------------------------------------------------------------

def test_429_with_retry_after_is_retried_then_delivered_once(
        ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_ordered_request("/hook", method="POST").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "1"})
    httpserver.expect_ordered_request("/hook", method="POST").respond_with_data("ok")
    ws.write_config(notifier("webhook", url=httpserver.url_for("/hook"), events=["success"],
                             retries=3))

    result = ws.run("backup")

    assert result.returncode == 0, result.stderr
    assert "warning: notification" not in result.stderr
    httpserver.check_assertions()
    first, second = requests_to(httpserver, "/hook")
    assert first.get_json() == second.get_json()
    assert [resp.status_code for _, resp in httpserver.log] == [429, 200]


def test_a_sink_failing_every_time_only_warns(ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("boom", status=500)
    ws.write_config(notifier("webhook", name="ops-hook", url=httpserver.url_for("/hook"),
                             events=["success"], retries=2))

    result = ws.run("backup")

    assert result.returncode == 0, result.stderr
    _last_line_id(result.stdout)
    assert re.search(r"warning: notification via ops-hook failed: .*HTTP 500", result.stderr)
    assert len(requests_to(httpserver, "/hook")) == 2  # retries = 2 attempts in all
    httpserver.check_assertions()
    log = log_text(ws)
    assert re.search(r"ERROR .*notification backup/success via ops-hook failed.*HTTP 500", log)


def test_a_notifier_that_never_answers_is_bounded_by_its_timeout(ws: Any) -> None:
    with silent_port() as port:
        ws.write_config(notifier("webhook", url=f"http://127.0.0.1:{port}/hook",
                                 events=["success"], timeout=1, retries=1))
        started = time.monotonic()
        result = ws.run("backup", timeout=60)
        elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    _last_line_id(result.stdout)
    assert re.search(r"warning: notification via webhook failed: .*timed out", result.stderr)
    # the dispatcher itself would give up after timeout x retries + 20 s: stay well below
    assert elapsed < 20, f"the run took {elapsed:.1f} s"


def test_an_unreachable_notifier_does_not_hide_the_backup_error(ws: Any) -> None:
    port = free_port()  # nobody listens: connection refused
    ws.write_config(notifier("slack", webhook_url=f"http://127.0.0.1:{port}/x", retries=1),
                    database=MISSING_DB)

    result = ws.run("backup")

    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert "warning: notification via slack failed" in result.stderr


# -- heartbeat ------------------------------------------------------------------------------------

def test_heartbeat_pings_start_then_success(ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request(re.compile(r"/ping/abc.*")).respond_with_data("OK")
    ws.write_config(notifier("heartbeat", url=httpserver.url_for("/ping/abc")))

    result = ws.run("backup")

    assert result.returncode == 0, result.stderr
    httpserver.check_assertions()
    assert [(r.method, r.path) for r, _ in httpserver.log] == [
        ("GET", "/ping/abc/start"), ("POST", "/ping/abc")]


def test_heartbeat_pings_start_then_fail(ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request(re.compile(r"/ping/abc.*")).respond_with_data("OK")
    ws.write_config(notifier("heartbeat", url=httpserver.url_for("/ping/abc")),
                    database=MISSING_DB)

    result = ws.run("backup")

    assert result.returncode == 1
    httpserver.check_assertions()
    assert [r.path for r, _ in httpserver.log] == ["/ping/abc/start", "/ping/abc/fail"]
    assert "does not exist" in httpserver.log[1][0].get_json()["text"]


def test_heartbeat_custom_success_url(ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request(re.compile(r"/(ping|custom).*")).respond_with_data("OK")
    ws.write_config(notifier("heartbeat", url=httpserver.url_for("/ping/abc"),
                             success_url=httpserver.url_for("/custom/ok")))

    result = ws.run("backup")

    assert result.returncode == 0, result.stderr
    httpserver.check_assertions()
    assert [r.path for r, _ in httpserver.log] == ["/ping/abc/start", "/custom/ok"]


# -- email --------------------------------------------------------------------------------------

def _check_mail(mail: Mail, *facts: str) -> str:
    assert mail.mail_from == "backup@conexa.test"
    assert sorted(mail.rcpt_tos) == ["director@conexa.test", "ops@conexa.test"]
    assert mail.message["To"] == "ops@conexa.test, director@conexa.test"
    assert mail.message.get_content_type() == "text/plain"
    body: str = mail.message.get_content()
    for fact in facts:
        assert fact in body, (fact, body)
    return body


def test_email_starttls_with_login_to_several_recipients(
        ws: Any, smtp: Callable[..., SmtpSink], tls_cert: tuple[Path, Path]) -> None:
    sink = smtp("starttls", login=True)
    ws.write_config(email_notifier(sink, "starttls", cafile=tls_cert[0], username=USER,
                                   password=PASSWORD, events=["success"]))

    result = ws.run("backup")

    assert result.returncode == 0, result.stderr
    assert "warning: notification" not in result.stderr
    backup_id = _last_line_id(result.stdout)
    (mail,) = sink.inbox.mails  # one message, two recipients
    assert mail.tls and mail.authenticated
    assert mail.message["Subject"] == f"[conexa-backup] backup {backup_id} complete"
    _check_mail(mail, f"backup: {backup_id}", f"host: {HOST}", "stored on: local", "size: ",
                "duration: ")


def test_email_refused_login_only_warns(
        ws: Any, smtp: Callable[..., SmtpSink], tls_cert: tuple[Path, Path]) -> None:
    sink = smtp("starttls", login=True)
    ws.write_config(email_notifier(sink, "starttls", cafile=tls_cert[0], username=USER,
                                   password="wrong-password", events=["success"]))

    result = ws.run("backup", timeout=60)

    assert result.returncode == 0, result.stderr
    _last_line_id(result.stdout)
    assert re.search(r"warning: notification via email failed: .*login refused \(535\)",
                     result.stderr)
    assert "wrong-password" not in result.stderr + log_text(ws)
    assert sink.inbox.mails == []


# AUTH over implicit TLS: aiosmtpd only knows STARTTLS as "TLS", and warns.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_email_implicit_tls(ws: Any, smtp: Callable[..., SmtpSink],
                            tls_cert: tuple[Path, Path]) -> None:
    sink = smtp("tls", login=True)
    ws.write_config(email_notifier(sink, "tls", cafile=tls_cert[0], username=USER,
                                   password=PASSWORD), database=MISSING_DB)

    result = ws.run("backup")

    assert result.returncode == 1
    assert "warning: notification" not in result.stderr
    (mail,) = sink.inbox.mails
    assert mail.tls and mail.authenticated
    assert mail.message["Subject"] == "[conexa-backup] backup FAILED"
    _check_mail(mail, f"host: {HOST}", "error:", MISSING_DB)


def test_email_starttls_rejects_an_unknown_certificate(
        ws: Any, smtp: Callable[..., SmtpSink]) -> None:
    """Without ``cafile`` the self-signed certificate is not trusted: no message is sent."""
    sink = smtp("starttls", login=True)
    ws.write_config(email_notifier(sink, "starttls", username=USER, password=PASSWORD,
                                   events=["success"]))

    result = ws.run("backup")

    assert result.returncode == 0, result.stderr
    assert re.search(r"warning: notification via email failed: .*CERTIFICATE_VERIFY_FAILED",
                     result.stderr)
    assert sink.inbox.mails == []


def test_email_plain_relay(ws: Any, smtp: Callable[..., SmtpSink]) -> None:
    sink = smtp("none")
    ws.write_config(email_notifier(sink, "none"), database=MISSING_DB)

    result = ws.run("backup")

    assert result.returncode == 1
    (mail,) = sink.inbox.mails
    assert not mail.tls
    _check_mail(mail, "backup FAILED", f"host: {HOST}", "does not exist")


def test_the_report_email_is_its_page_with_the_text_as_the_alternative(
        ws: Any, smtp: Callable[..., SmtpSink], tmp_path: Path) -> None:
    """``report --send``: the email's HTML part is the page ``--html`` writes, byte for byte,
    and renders in a real browser like it (nothing fetched, no error); the text stays."""
    from tests.browser import open_page

    sink = smtp("none")
    ws.write_config(email_notifier(sink, "none"))
    assert ws.run("backup").returncode == 0
    page = tmp_path / "report.html"
    result = ws.run("report", "--send", "--html", str(page), "--lang", "pt")
    assert result.returncode == 0, result.stderr
    (mail,) = sink.inbox.mails
    assert mail.message.get_content_type() == "multipart/alternative"
    text = mail.message.get_body(("plain",)).get_content()
    html = mail.message.get_body(("html",)).get_content()
    assert "backups: 1 runs, 1 ok" in text and "RPO:" in text
    assert html.replace("\r\n", "\n") == page.read_text()  # SMTP carries CRLF lines
    with open_page() as (browser, seen):
        browser.set_content(html)
        assert browser.locator("html").get_attribute("lang") == "pt"
        assert browser.locator(".verdict").count() == 2
        assert browser.locator("svg.chart:visible").count() == 4
        assert seen.errors == [] and seen.remote == []


def test_slack_gets_the_report_short_its_verdicts_and_key_numbers(
        ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/slack", method="POST").respond_with_data("ok")
    ws.write_config(notifier("slack", webhook_url=httpserver.url_for("/slack"),
                             events=["report"]))
    assert ws.run("backup").returncode == 0
    result = ws.run("report", "--send")
    assert result.returncode == 0, result.stderr
    (message,) = [r.get_json()["text"] for r in requests_to(httpserver, "/slack")]
    lines = message.splitlines()
    assert lines[0] == ":white_check_mark: *conexa-backup report, last 7 days*"
    assert lines[1].startswith("RPO ✓ OK: Every gap between backups")
    assert lines[2].startswith("RTO ✗ NOT MET: No restore drill ran in this period")
    assert lines[3:] == ["Runs: 1; complete: 1, partial: 0, failed: 0.",
                         "Drills: 0; passed: 0, failed: 0."]


# -- every channel at once ----------------------------------------------------------------------

def test_a_failed_backup_alerts_every_channel(
        ws: Any, httpserver: HTTPServer, smtp: Callable[..., SmtpSink]) -> None:
    httpserver.expect_request(re.compile(r"/.*")).respond_with_data("ok")
    sink = smtp("none")
    ws.write_config(
        notifier("slack", webhook_url=httpserver.url_for("/slack"))
        + notifier("webhook", url=httpserver.url_for("/hook"))
        + email_notifier(sink, "none")
        + notifier("heartbeat", url=httpserver.url_for("/hb")),
        database=MISSING_DB)

    result = ws.run("backup")

    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert "warning: notification" not in result.stderr
    httpserver.check_assertions()
    assert sorted(r.path for r, _ in httpserver.log) == ["/hb/fail", "/hb/start", "/hook",
                                                         "/slack"]
    assert "backup FAILED" in requests_to(httpserver, "/slack")[0].get_json()["text"]
    event = requests_to(httpserver, "/hook")[0].get_json()
    assert (event["kind"], event["outcome"], event["title"]) == ("backup", "failure",
                                                                 "backup FAILED")
    assert "does not exist" in event["error"]
    assert len(sink.inbox.mails) == 1
    assert sink.inbox.mails[0].message["Subject"] == "[conexa-backup] backup FAILED"


# -- notify-test ----------------------------------------------------------------------------------

def test_notify_test_reaches_every_notifier(
        ws: Any, httpserver: HTTPServer, smtp: Callable[..., SmtpSink]) -> None:
    httpserver.expect_request(re.compile(r"/.*"), method="POST").respond_with_data("ok")
    sink = smtp("none")
    ws.write_config(
        notifier("slack", webhook_url=httpserver.url_for("/slack"))
        + notifier("webhook", url=httpserver.url_for("/hook"))
        + email_notifier(sink, "none")
        + notifier("heartbeat", url=httpserver.url_for("/hb")))

    result = ws.run("notify-test", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [(n["notifier"], n["ok"]) for n in report["notifiers"]] == [
        ("slack", True), ("webhook", True), ("email", True), ("heartbeat", True)]
    httpserver.check_assertions()
    assert sorted(r.path for r, _ in httpserver.log) == ["/hb", "/hook", "/slack"]
    assert requests_to(httpserver, "/hook")[0].get_json()["kind"] == "test"
    assert "test notification" in requests_to(httpserver, "/slack")[0].get_json()["text"]
    assert len(sink.inbox.mails) == 1
    # a test message is not a run: nothing recorded
    assert not (ws.state / "runs.json").exists()


def test_notify_test_names_the_notifier_that_failed(ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/slack").respond_with_data("ok")
    httpserver.expect_request("/broken").respond_with_data("nope", status=500)
    ws.write_config(notifier("slack", webhook_url=httpserver.url_for("/slack"))
                    + notifier("webhook", name="broken-hook", url=httpserver.url_for("/broken"),
                               retries=1))

    result = ws.run("notify-test")

    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    assert any(re.match(r"ok\s+slack: sent", line) for line in lines), lines
    assert any(re.match(r"FAIL broken-hook: .*HTTP 500", line) for line in lines), lines
    httpserver.check_assertions()


def test_notify_test_without_notifiers_is_a_usage_error(ws: Any) -> None:
    result = ws.run("notify-test")

    assert result.returncode == 2
    assert "no [[notify]] configured" in result.stderr


# -- report --send --------------------------------------------------------------------------------

def test_report_send_goes_to_every_notifier_when_none_lists_report(
        ws: Any, httpserver: HTTPServer, smtp: Callable[..., SmtpSink]) -> None:
    """crontab.example's Monday line with notifiers left at their default events."""
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    sink = smtp("none")
    ws.write_config(notifier("webhook", url=httpserver.url_for("/hook"))
                    + email_notifier(sink, "none")
                    + notifier("heartbeat", url=httpserver.url_for("/hb")))
    ws.config.chmod(0o600)  # else a warning about the webhook URL in a readable file

    result = ws.run("--quiet", "report", "--days", "7", "--send")

    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    httpserver.check_assertions()
    # The heartbeat is not pinged: a report is not a backup run.
    (hook,) = [r.get_json() for r, _ in httpserver.log]
    assert (hook["kind"], hook["title"]) == ("report", "conexa-backup report, last 7 days")
    (mail,) = sink.inbox.mails
    assert mail.message["Subject"] == "[conexa-backup] conexa-backup report, last 7 days"
    assert "backups: 0 runs" in mail.message.get_body(("plain",)).get_content()
    assert "html" not in hook  # the page goes to email only: a webhook gets the facts


def test_report_send_without_notifiers_prints_it_and_says_so(ws: Any) -> None:
    result = ws.run("--quiet", "report", "--send")

    assert result.returncode == 0, result.stderr
    assert "backups: 0 runs" in result.stdout  # even with --quiet: cron mails it to MAILTO
    assert result.stderr.strip() == (
        "warning: report not sent: no notifier that carries messages (email, Slack, webhook) "
        "is configured; printed here instead")


# -- the seed's environment variables -------------------------------------------------------------

def test_seed_env_adds_slack_and_email(
        ws: Any, httpserver: HTTPServer, smtp: Callable[..., SmtpSink]) -> None:
    httpserver.expect_request("/seed-slack", method="POST").respond_with_data("ok")
    sink = smtp("none")
    env = {"SLACK_WEBHOOK_URL": httpserver.url_for("/seed-slack"),
           "BACKUP_NOTIFY_EMAIL": "ops@conexa.test, director@conexa.test",
           "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(sink.port), "SMTP_SECURITY": "none",
           "SMTP_FROM": "backup@conexa.test"}

    result = ws.run("notify-test", "--json", env=env)

    assert result.returncode == 0, result.stderr
    assert [n["notifier"] for n in json.loads(result.stdout)["notifiers"]] == ["slack", "email"]
    httpserver.check_assertions()
    assert len(requests_to(httpserver, "/seed-slack")) == 1
    (mail,) = sink.inbox.mails
    _check_mail(mail, "conexa-backup test notification")

    # and they alert on a failed backup, as the seed's own script did
    httpserver.clear_log()
    ws.write_config(database=MISSING_DB)
    result = ws.run("backup", env=env)
    assert result.returncode == 1
    assert "backup FAILED" in requests_to(httpserver, "/seed-slack")[0].get_json()["text"]
    assert len(sink.inbox.mails) == 2


# -- secrets ------------------------------------------------------------------------------------

SLACK_PATH = "/services/T0SECRET/B0SECRET/xoxbWEBHOOKSECRET"
TOKEN = "tok-Very-Secret-4242"


def _assert_no_secret(texts: list[str], secrets: list[str]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked in:\n{text}"


def test_secrets_never_printed_nor_logged(ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request(SLACK_PATH).respond_with_data("down", status=500)
    httpserver.expect_request("/hook").respond_with_data("denied", status=403)
    slack_url = httpserver.url_for(SLACK_PATH)
    ws.write_config(
        notifier("slack", webhook_url=slack_url, events=["failure", "success"], retries=1)
        + notifier("webhook", url=httpserver.url_for("/hook"), events=["failure", "success"],
                   headers={"Authorization": "Bearer ${CONEXA_TOKEN}"}, retries=1))
    env = {"CONEXA_TOKEN": TOKEN}
    secrets = [slack_url, SLACK_PATH, "xoxbWEBHOOKSECRET", TOKEN]
    outputs: list[str] = []

    ok = ws.run("--verbose", "backup", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "warning: notification via slack failed" in ok.stderr
    assert "warning: notification via webhook failed" in ok.stderr
    outputs += [ok.stdout, ok.stderr]

    test = ws.run("--verbose", "notify-test", env=env)
    assert test.returncode == 1
    outputs += [test.stdout, test.stderr]

    ws.write_config(
        notifier("slack", webhook_url=slack_url, retries=1)
        + notifier("webhook", url=httpserver.url_for("/hook"),
                   headers={"Authorization": "Bearer ${CONEXA_TOKEN}"}, retries=1),
        database=MISSING_DB)
    failed = ws.run("--verbose", "backup", env=env)
    assert failed.returncode == 1
    assert "does not exist" in failed.stderr
    outputs += [failed.stdout, failed.stderr]

    # the secrets did reach the sink (so the test would notice a leak)
    assert any(r.headers.get("Authorization") == f"Bearer {TOKEN}" for r, _ in httpserver.log)
    assert any(r.path == SLACK_PATH for r, _ in httpserver.log)
    outputs.append(log_text(ws))
    assert "notification" in outputs[-1]
    _assert_no_secret(outputs, secrets)


def test_a_malformed_secret_url_is_not_logged(ws: Any) -> None:
    secret = "hooks.example.org/services/T0SECRET/B0SECRET/xoxbMALFORMED"
    ws.write_config(notifier("slack", webhook_url=secret, events=["success"]))

    result = ws.run("--verbose", "backup")

    assert result.returncode == 0, result.stderr
    assert "warning: notification via slack failed" in result.stderr
    _assert_no_secret([result.stdout, result.stderr, log_text(ws)], [secret, "xoxbMALFORMED"])
