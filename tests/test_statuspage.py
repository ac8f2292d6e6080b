"""The status page's rendering (:mod:`conexa_backup.statuspage`), without a server: the
language choice, escaping of everything that comes from targets and errors, and what each
role is shown. The page in a real browser: tests/test_status_page.py."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conexa_backup.actions.history import History
from conexa_backup.statuspage import Facts, choose_lang, shell, view

NOW = datetime(2026, 12, 6, 8, 0, tzinfo=UTC)
EVIL = '<img src=x onerror="alert(1)">'


@pytest.mark.parametrize(("header", "asked", "chosen"), [
    (None, None, "en"),
    ("pt-BR,pt;q=0.9,en;q=0.8", None, "pt"),
    ("en-US,en;q=0.9,pt;q=0.8", None, "en"),
    ("fr-FR,fr;q=0.9", None, "en"),  # nothing the page speaks: English
    ("fr;q=1, pt;q=0.5, en;q=0.4", None, "pt"),  # by weight, not by order
    ("en;q=0, pt", None, "pt"),  # q=0: "not this one"
    ("pt;q=bogus, en", None, "en"),  # an unreadable weight counts as 0
    ("pt-BR", "en", "en"),  # ?lang= wins
    ("en", "xx", "en"),  # an unknown ?lang= is ignored
])
def test_the_language_follows_accept_language(header: str | None, asked: str | None,
                                              chosen: str) -> None:
    assert choose_lang(header, asked) == chosen


def _facts(**changes: Any) -> Facts:
    history = History(start=NOW - timedelta(days=30), end=NOW, sizes=[], durations=[],
                      recovery=[], gaps=[], rto_seconds=3600, rpo_seconds=26 * 3600)
    base: dict[str, Any] = {
        "status": {"status": "CRITICAL", "summary": f"local: {EVIL}",
                   "listed_at": "2026-12-06T07:59:00Z",
                   "targets": [{"target": "local", "status": "CRITICAL",
                                "newest_backup": "20261206T030000Z",
                                "backup_age_seconds": 5 * 3600,
                                "damaged": [{"id": "20261205T030000Z", "why": EVIL}]}]},
        "backups": [
            {"id": "20261206T030000Z", "created_at": "2026-12-06T03:00:00Z",
             "kind": "scheduled", "size_bytes": 1000, "status": "success", "state": "complete",
             "location": ["local"], "drills": {},
             "targets": [{"target": "local", "state": "complete", "verified_at": None}]},
            {"id": "20261205T030000Z", "created_at": "2026-12-05T03:00:00Z",
             "kind": "scheduled", "size_bytes": 1000, "status": "damaged", "state": "damaged",
             "location": [], "drills": {"local": {"ok": False}},
             "targets": [{"target": "local", "state": "damaged", "why": EVIL}]},
        ],
        "targets": ["local", "gcs"], "drills": [], "history": history, "days": 30,
        "max_backup_age_seconds": 26 * 3600,
        "not_sent": {"20261206T030000Z": {"gcs": "not for this archive tier"}},
    }
    return Facts(**(base | changes))


def test_nothing_from_targets_or_errors_reaches_the_page_as_markup() -> None:
    html = view(_facts(can_admin=True, can_restore=True), "en")
    assert EVIL not in html and "&lt;img src=x" in html
    assert "<img" not in html


def test_each_copy_says_its_state_in_words() -> None:
    html = view(_facts(), "en")
    cells = re.findall(r'data-cell="(\w+)"', html)
    assert cells == ["complete", "policy", "damaged", "missing"]
    assert "✓ complete" in html and "○ not sent (policy)" in html and "✗ damaged" in html
    assert "✗ drill failed" in html and "not verified yet" in html


def test_buttons_follow_the_role() -> None:
    def actions(html: str) -> list[str]:
        return re.findall(r'data-action="(\w+)"(?: data-id="(\w+)")?', html)  # type: ignore[return-value]

    assert [a for a, *_ in actions(view(_facts(), "en"))] == ["days"] * 3  # read-only
    admin = view(_facts(can_admin=True), "en")
    assert "restore" not in {a for a, *_ in actions(admin)}
    assert {"download", "trigger"} <= {a for a, *_ in actions(admin)}
    both = actions(view(_facts(can_admin=True, can_restore=True), "en"))
    # A backup with no good copy offers no download or restore, only delete.
    damaged = [a for a, i in both if i == "20261205T030000Z"]
    assert damaged == ["delete"]


def test_a_late_newest_backup_is_marked_not_only_coloured() -> None:
    late = _facts()
    late.status["targets"][0]["backup_age_seconds"] = 27 * 3600
    assert '<span class="bad">✗ 20261206T030000Z' in view(late, "en")
    assert '<span class="good">✓ 20261206T030000Z' in view(_facts(), "en")


def test_the_shell_holds_no_facts_and_its_words_cannot_close_their_block() -> None:
    page = shell("pt")
    assert '<html lang="pt">' in page and "20261206" not in page
    block = page.split('<script type="application/json" id="words">')[1].split("</script>")[0]
    words = json.loads(block)
    assert words["confirm_restore"].startswith("Restaurar a cópia {id}?")
    assert "</" not in block


def test_portuguese_throughout_durations_and_months_included() -> None:
    late = _facts()
    late.status["targets"][0]["backup_age_seconds"] = 4 * 86400
    html = view(late, "pt")
    assert "há 4 dias (objetivo: menos de 26 h)" in html
    assert " days" not in html and ">06 nov</text>" in html  # the charts' dates too
    assert "Objetivo: RTO 1 h." in html  # what a screen reader says of a chart
