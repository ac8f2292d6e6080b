"""``report --html`` (issue 16): the report as one self-contained page, made by the real CLI
from a real history (backups, a failed run, a drill), looked at in a real browser at desktop
and phone widths: the RPO and RTO sentences at the top, a chart point per run, nothing
fetched, no console error; in Portuguese on request."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from conexa_backup.testing.cluster import Cluster
from tests.browser import DESKTOP, PHONE, open_page, screenshot
from tests.conftest import Workspace, module_workspace

MISSING_DB = "conexa_no_such_database"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster
         ) -> Iterator[tuple[Workspace, Path]]:
    """A history (two backups around a failed run, then a drill) and its HTML report."""
    ws = module_workspace(tmp_path_factory.mktemp("report"), cluster)
    assert ws.run("backup").returncode == 0
    ws.write_config(database=MISSING_DB)
    assert ws.run("backup").returncode == 1
    ws.write_config()
    assert ws.run("backup").returncode == 0
    drilled = ws.run("verify", "--drill", "--json")
    assert drilled.returncode == 0, drilled.stderr
    out = ws.root / "report.html"
    result = ws.run("report", "--days", "7", "--html", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["backups"]["runs"] == 3
    yield ws, out
    cluster.drop_database(ws.dbname)


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_html_report_in_a_real_browser(made: tuple[Workspace, Path], size: tuple[int, int]
                                           ) -> None:
    _, out = made
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with open_page(size) as (page, seen):
        page.goto(out.as_uri())
        assert page.locator("html").get_attribute("lang") == "en"
        verdicts = page.locator(".verdict").all_inner_texts()
        assert len(verdicts) == 2
        assert verdicts[0].startswith("RPO ✓ OK") and "Every gap between backups" in verdicts[0]
        assert verdicts[1].startswith("RTO ✓ OK") and "restored everything in" in verdicts[1]
        assert "Runs: 3; complete: 2, partial: 0, failed: 1." in page.inner_text("main")
        assert "Drills: 1; passed: 1, failed: 0." in page.inner_text("main")
        charts = page.locator("svg.chart:visible")
        assert charts.count() == 4  # size, duration, recovery, gaps: one drawing each
        points = [charts.nth(i).locator(".point").count() for i in range(4)]
        assert points == [4, 3, 1, 2]  # 2 backups x (dump, uploads); 3 runs; 1 drill; 2 gaps
        assert charts.nth(1).locator(".point.failed").count() == 1
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= size[0]  # nothing wider than the screen
        name = "desktop" if size == DESKTOP else "phone"
        screenshot(page, f"report-{name}")
        assert seen.errors == [] and seen.remote == []


def test_the_report_in_portuguese(made: tuple[Workspace, Path]) -> None:
    ws, _ = made
    out = ws.root / "relatorio.html"
    assert ws.run("report", "--html", str(out), "--lang", "pt").returncode == 0
    text = out.read_text()
    assert '<html lang="pt">' in text and "Relatório de cópias de segurança" in text
    assert "Execuções: 3; completas: 2, parciais: 0, com falha: 1." in text
    assert ">banco de dados (dump)</text>" in text and ", falhou</title>" in text


def test_a_bad_language_or_an_unwritable_file_is_one_clear_line(
        made: tuple[Workspace, Path]) -> None:
    ws, _ = made
    bad = ws.run("report", "--html", str(ws.root / "x.html"), "--lang", "fr")
    assert bad.returncode == 2 and "--lang 'fr'" in bad.stderr
    assert not (ws.root / "x.html").exists()
    nowhere = ws.run("report", "--html", str(ws.root / "missing" / "x.html"))
    assert nowhere.returncode == 1
    assert "cannot write" in nowhere.stderr and "Traceback" not in nowhere.stderr
