"""The status page of ``serve`` (issue 16), in a real browser against a real server, over a
real history made by the real CLI with its clock moved by ``faketime``: weeks of daily
backups on two targets (one an archive tier that gets the first backup of each month), a
failed run, a partial one, drills that passed and one that failed on a damaged copy.

What the page says is compared with what the CLI says of the same state (``status --json``,
``list --json``); nothing may leave loopback, and no console error may occur.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from conexa_backup.testing.cluster import Cluster
from tests.apikit import Api, make_token, running, start_api
from tests.browser import DESKTOP, PHONE, Seen, open_page, screenshot
from tests.conftest import Workspace, module_workspace

FAKETIME = shutil.which("faketime")
pytestmark = pytest.mark.skipif(FAKETIME is None, reason="faketime (Debian package) missing: "
                                "scripts/bootstrap.sh --test installs it")
DAYS_BACK = 34  # the history's first backup, in days before now
SKIPPED = (20, 19, 18)  # days with no backup: a gap over the RPO
FAILED_DAY = 12  # a run that failed (its database is missing)
DRILLED = (30, 14, 2)  # days with a drill that passed
DAMAGED_DAY = 8  # the day a drill found the newest copy on "local" damaged


def _extra(root: Path, archive: Path | None = None) -> str:
    """Two targets: "local" keeps everything, "archive" only the first backup of a month."""
    return (f'[[targets]]\nname = "archive"\ntype = "local"\n'
            f'path = "{archive or root / "archive"}"\nretention = {{ keep_monthly = 12 }}\n'
            '[retention]\nkeep_daily = 90\nprune_after_backup = false\n'
            '[monitoring]\nmax_backup_age = "26h"\n[drill]\nrto_objective = "1h"\n')


def _faked(ws: Workspace, when: datetime, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with its clock (and its children's) starting at ``when``, UTC."""
    assert FAKETIME is not None
    return subprocess.run(
        [FAKETIME, "-f", "@" + when.strftime("%Y-%m-%d %H:%M:%S"), sys.executable, "-m",
         "conexa_backup", "--config", str(ws.config), *args],
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL, check=False,
        env={**os.environ, "TZ": "UTC"})


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster
            ) -> Iterator[Workspace]:
    """The workspace after its history; its config has both targets."""
    ws = module_workspace(tmp_path_factory.mktemp("page"), cluster)
    now = datetime.now(UTC).replace(microsecond=0)
    start = (now - timedelta(days=DAYS_BACK)).replace(hour=3, minute=0, second=0)
    first_of_month = next(d for d in range(DAYS_BACK - 1, 3, -1)
                          if (start + timedelta(days=DAYS_BACK - d)).day == 1)
    ws.write_config(_extra(ws.root))
    for back in range(DAYS_BACK, 0, -1):
        day = start + timedelta(days=DAYS_BACK - back)
        if back in SKIPPED:
            continue
        if back == FAILED_DAY:
            ws.write_config(_extra(ws.root), database="conexa_no_such_database")
            assert _faked(ws, day, "backup").returncode == 1
            ws.write_config(_extra(ws.root))
            continue
        if back == first_of_month:  # the archive gets this one, and cannot store it
            ws.write_config(_extra(ws.root, archive=Path("/dev/null/archive")))
            done = _faked(ws, day, "backup")
            assert done.returncode == 3, done.stderr  # partial: stored on "local" only
            ws.write_config(_extra(ws.root))
            continue
        done = _faked(ws, day, "backup")
        assert done.returncode == 0, done.stderr
        if back in DRILLED:
            drilled = _faked(ws, day + timedelta(hours=1), "verify", "--drill", "--json")
            assert drilled.returncode == 0, drilled.stdout + drilled.stderr
        if back == DAMAGED_DAY:
            newest = max(b["id"] for b in json.loads(ws.run("list", "--json").stdout))
            dump = ws.backups / newest / "database.dump.zst"
            dump.write_bytes(b"not zstd" + dump.read_bytes()[8:])
            drilled = _faked(ws, day + timedelta(hours=1), "verify", "--drill", "--target",
                             "local", "--json")
            assert drilled.returncode != 0
    assert ws.run("backup").returncode == 0  # today's, on the real clock: status is fresh
    yield ws
    for name in cluster.databases():
        if name.startswith(ws.dbname):
            cluster.drop_database(name)


@pytest.fixture(scope="module")
def api(history: Workspace) -> Iterator[Api]:
    with running(start_api(history, config_extra=_extra(history.root))) as served:
        yield served


def sign_in(page: Page, api: Api, role: str = "admin") -> None:
    page.goto(api.url + "/")
    page.fill("#token", make_token(role, lifetime=3600))
    page.keyboard.press("Enter")  # the form submits from the keyboard
    expect(page.locator("#state")).to_be_visible()


def cli_json(ws: Workspace, *args: str) -> Any:
    return json.loads(ws.run(*args, "--json").stdout)


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_page_says_what_the_cli_says(api: Api, size: tuple[int, int]) -> None:
    ws = api.ws
    status, listed = cli_json(ws, "status"), cli_json(ws, "list")
    with open_page(size) as (page, seen):
        sign_in(page, api)
        assert page.locator("html").get_attribute("lang") == "en"
        banner = page.locator("#state")
        assert banner.get_attribute("data-state") == status["status"]
        assert status["summary"] in banner.inner_text()
        targets = page.locator("#targets tbody tr")
        assert [targets.nth(i).get_attribute("data-target") for i in range(targets.count())] \
            == ["local", "archive"]
        local = page.locator('#targets tr[data-target="local"]')
        assert "passed" in local.inner_text() or "FAILED" in local.inner_text()
        newest = status["targets"][0]["newest_backup"]
        assert newest in local.inner_text()
        rows = page.locator("#backups tbody tr")
        month_ago = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y%m%dT%H%M%S")
        expected = sorted((b["id"] for b in listed if b["id"] >= month_ago), reverse=True)
        assert [rows.nth(i).get_attribute("data-id") for i in range(rows.count())] == expected
        cells = {c.get_attribute("data-cell") for c in page.locator("#backups td[data-cell]").all()}
        assert {"complete", "damaged", "policy"} <= cells
        for entry in listed:  # each copy's cell says what list --json says of it
            if entry["id"] not in expected:
                continue
            row = page.locator(f'#backups tr[data-id="{entry["id"]}"] td[data-cell]')
            shown = [row.nth(i).get_attribute("data-cell") for i in range(row.count())]
            assert shown == [_state(entry, t) for t in ("local", "archive")], entry["id"]
        assert page.locator("#backups .badge", has_text="drill passed").count() >= 1
        assert page.locator("#backups .badge", has_text="drill failed").count() == 1
        charts = page.locator("svg.chart:visible")
        assert charts.count() == 4
        report = cli_json(ws, "report", "--days", "30")
        points = [charts.nth(i).locator(".point").count() for i in range(4)]
        assert points[1] == report["backups"]["runs"]  # one point per run, failed ones too
        assert points[2] == report["drills"]["runs"]
        assert charts.nth(2).locator(".point.failed").count() == 1  # the failed drill
        assert charts.nth(1).locator(".point.failed").count() == 1  # the failed run
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= size[0]  # the backups table scrolls inside its own box
        if size == DESKTOP:  # ... and at a desktop's width it has no need to
            box = page.locator("#backups").locator("xpath=..")
            assert box.evaluate("e => e.scrollWidth <= e.clientWidth")
        screenshot(page, f"status-{'desktop' if size == DESKTOP else 'phone'}")
        page.get_by_role("button", name="90 days").click()
        expect(page.get_by_role("button", name="90 days")).to_have_attribute("aria-pressed", "true")
        assert page.locator("#backups tbody tr").count() == len(listed)
        _nothing_wrong(seen)


def _state(entry: dict[str, Any], target: str) -> str:
    """What the page's cell must say of ``entry``'s copy on ``target`` (list --json)."""
    if target in entry["targets"]:
        return "complete"
    if target in entry["damaged_targets"]:
        return "damaged"
    if target in entry["incomplete_targets"]:
        return "incomplete"
    return "missing" if target == "local" or entry["id"].endswith("01T030000Z") else "policy"


def _nothing_wrong(seen: Seen) -> None:
    assert seen.errors == [] and seen.remote == []


def test_a_read_only_role_sees_no_actions(api: Api) -> None:
    with open_page() as (page, seen):
        sign_in(page, api, role="viewer")
        assert page.locator("#backups tbody tr").count() > 10
        assert page.locator("button[data-action]:not([data-action=days])").count() == 0
        _nothing_wrong(seen)
    answer = api.get("/api/admin/page", role="viewer")
    assert answer.status_code == 200 and 'data-action="restore"' not in answer.text
    assert 'data-action="restore"' in api.get("/api/admin/page").text


def test_a_refused_token_asks_to_sign_in_again(api: Api) -> None:
    with open_page() as (page, seen):
        page.goto(api.url + "/")
        expect(page.locator("#signin")).to_be_visible()
        page.fill("#token", make_token("admin", lifetime=-120))  # expired
        page.keyboard.press("Enter")
        expect(page.locator("#note")).to_contain_text("sign in again")
        expect(page.locator("#signin")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
        assert page.context.cookies() == []
        assert [e for e in seen.errors if "401" not in e] == [] and seen.remote == []


def test_download_restore_and_delete_from_the_page(api: Api) -> None:
    ws = api.ws
    listed = sorted(cli_json(ws, "list"), key=lambda b: b["id"])
    newest, oldest = listed[-1], listed[0]
    with open_page() as (page, seen):
        sign_in(page, api)
        page.get_by_role("button", name="365 days").click()
        expect(page.locator(f'#backups tr[data-id="{oldest["id"]}"]')).to_be_visible()
        row = page.locator(f'#backups tr[data-id="{newest["id"]}"]')
        row.get_by_role("button", name="Download").click()
        files = page.locator("#files")
        expect(files).to_be_visible()
        with page.expect_download() as got:
            files.get_by_role("button", name="database.dump.zst").click()
        saved = Path(got.value.path())
        manifest = json.loads((ws.backups / newest["id"] / "manifest.json").read_text())
        wanted = next(a for a in manifest["artifacts"] if a["kind"] == "database")
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == wanted["sha256"]
        files.get_by_role("button", name="Close").click()

        row.get_by_role("button", name="Restore").click()
        ok = page.locator("#confirm-ok")
        expect(ok).to_be_disabled()
        page.fill("#confirm-id", newest["id"][:-1])
        expect(ok).to_be_disabled()  # a wrong id never enables it
        page.fill("#confirm-id", newest["id"])
        expect(ok).to_be_enabled()
        ok.click()
        job = page.locator("#job")
        expect(job).to_contain_text("Restore")
        expect(job).to_have_attribute("data-state", "succeeded", timeout=180_000)
        screenshot(page, "status-restored")

        old = page.locator(f'#backups tr[data-id="{oldest["id"]}"]')
        old.get_by_role("button", name="Delete").click()
        page.keyboard.type(oldest["id"])  # the field has the focus
        page.keyboard.press("Enter")
        expect(page.locator("#note")).to_contain_text(f"Backup {oldest['id']} deleted from")
        expect(old).to_have_count(0)
        _nothing_wrong(seen)
    assert oldest["id"] not in {b["id"] for b in cli_json(ws, "list")}


def test_the_page_in_portuguese(api: Api) -> None:
    with open_page(PHONE, locale="pt-BR") as (page, seen):
        sign_in(page, api)
        assert page.locator("html").get_attribute("lang") == "pt"
        text = page.inner_text("main")
        assert "Cópias" in text and "Destinos" in text and "Histórico" in text
        assert page.get_by_role("button", name="90 dias").count() == 1
        screenshot(page, "status-pt-phone")
        _nothing_wrong(seen)


def test_the_page_is_self_contained_and_never_cached(api: Api) -> None:
    page = api.get("/", role=None, headers={"Accept-Language": "pt-BR,pt;q=0.9,en;q=0.8"})
    assert page.status_code == 200 and '<html lang="pt">' in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert page.headers["cache-control"] == "no-store"
    assert "http://" not in page.text and "https://" not in page.text
    script = api.get("/page.js", role=None)
    assert script.status_code == 200 and "sessionStorage" in script.text
    assert "http://" not in script.text and "https://" not in script.text
    assert api.get("/api/admin/page", role=None).status_code == 401


def test_the_page_works_from_the_keyboard(api: Api) -> None:
    with open_page() as (page, seen):
        page.goto(api.url + "/")
        expect(page.locator("#token")).to_be_focused()
        page.keyboard.type(make_token("admin", lifetime=3600))
        page.keyboard.press("Enter")
        expect(page.locator("#state")).to_be_visible()
        for _ in range(500):  # every button and scroll box on the way is a Tab stop
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.dataset.days") == "90":
                break
        else:
            pytest.fail("Tab never reached the 90-day period button")
        page.keyboard.press("Enter")
        ninety = page.get_by_role("button", name="90 days")
        expect(ninety).to_have_attribute("aria-pressed", "true")
        expect(ninety).to_be_focused()  # drawn anew, and the focus kept its place
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Enter")  # 30 days
        expect(page.get_by_role("button", name="30 days")).to_have_attribute("aria-pressed",
                                                                             "true")
        page.locator('button[data-action="restore"]').first.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#confirm")).to_be_visible()
        expect(page.locator("#confirm-id")).to_be_focused()
        page.keyboard.press("Escape")  # changed their mind: nothing starts
        expect(page.locator("#confirm")).to_be_hidden()
        assert page.locator("#job").is_hidden()
        _nothing_wrong(seen)
