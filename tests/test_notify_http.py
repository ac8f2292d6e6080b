"""The notifiers' HTTP (notify/http.py, issue 18): requests with urllib3's Retry, against a
real HTTP server (pytest-httpserver) and a port nobody listens on."""

from __future__ import annotations

import time

import pytest
from pytest_httpserver import HTTPServer

from conexa_backup.notify import http
from conexa_backup.notify.base import NotifyError
from conexa_backup.testing.cluster import free_port


def test_5xx_then_ok_is_retried_and_4xx_is_not(httpserver: HTTPServer) -> None:
    httpserver.expect_ordered_request("/h", method="POST").respond_with_data("no", status=503)
    httpserver.expect_ordered_request("/h", method="POST").respond_with_data("ok")
    assert http.request(httpserver.url_for("/h"), payload={"a": 1}, timeout=5, retries=3,
                        what="hook") == 200
    assert [r.get_json() for r, _ in httpserver.log] == [{"a": 1}, {"a": 1}]
    httpserver.clear()
    httpserver.expect_request("/h").respond_with_data("gone", status=404)
    with pytest.raises(NotifyError, match=r"^hook: HTTP 404$"):
        http.request(httpserver.url_for("/h"), payload={"a": 1}, timeout=5, retries=3,
                     what="hook")
    assert len(httpserver.log) == 1  # a wrong URL or token does not fix itself


def test_retry_after_is_honoured_but_capped(httpserver: HTTPServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_RETRY_AFTER", 0.5)
    monkeypatch.setattr(http, "_sessions", {})
    httpserver.expect_ordered_request("/h").respond_with_data(
        "later", status=429, headers={"Retry-After": "3600"})
    httpserver.expect_ordered_request("/h").respond_with_data("ok")
    started = time.monotonic()
    assert http.request(httpserver.url_for("/h"), timeout=5, retries=2, what="ping") == 200
    assert time.monotonic() - started < 10  # not the hour it asked for
    assert [r.method for r, _ in httpserver.log] == ["GET", "GET"]


def test_failures_name_the_notifier_never_the_url(caplog: pytest.LogCaptureFixture) -> None:
    secret = "/services/T000/B000/very-secret-token"
    with pytest.raises(NotifyError) as refused:
        http.request(f"http://127.0.0.1:{free_port()}{secret}", payload={}, timeout=2,
                     retries=2, what="slack notifier 'ops'")
    text = str(refused.value)
    assert text.startswith("slack notifier 'ops': connection failed: ")
    assert "refused" in text.lower() and "(after 2 attempts)" in text
    assert "very-secret-token" not in text and "127.0.0.1" not in text
    with pytest.raises(NotifyError, match="invalid URL") as invalid:
        http.request(f"hooks.example{secret}", payload={}, timeout=2, retries=1, what="w")
    assert "very-secret-token" not in str(invalid.value)
    assert "very-secret-token" not in caplog.text  # urllib3 logs retries with the path
