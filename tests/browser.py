"""A real browser for the web pages' tests (issue 16): Debian's Chromium, headless, driven by
Playwright. ``scripts/bootstrap.sh --test`` installs it; never ``playwright install`` (it
downloads browsers, and only the package registries are reachable).

:func:`open_page` hands a page that records what the tests must see none of: console errors,
uncaught exceptions, and requests to anywhere but loopback (the pages ship everything they
need). Screenshots go to :data:`ARTEFACTS` (``test-artefacts/``, or ``$CONEXA_TEST_ARTEFACTS``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
ARTEFACTS = Path(os.environ.get("CONEXA_TEST_ARTEFACTS", ROOT / "test-artefacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DESKTOP, PHONE = (1280, 900), (360, 740)
_LOCAL = {"127.0.0.1", "localhost", "::1", ""}


@dataclass
class Seen:
    """What the page did that a test must find none of."""

    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions
    remote: list[str] = field(default_factory=list)  # requests that left loopback


@contextmanager
def open_page(size: tuple[int, int] = DESKTOP, locale: str = "en-US"
              ) -> Iterator[tuple[Page, Seen]]:
    """A fresh page of a headless Chromium, ``size`` pixels (width, height), and what it saw;
    ``locale`` is what it asks pages for (``Accept-Language``). Requests that would leave
    loopback are recorded and aborted."""
    seen = Seen()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]},
                                    locale=locale, accept_downloads=True)
            page.on("console", lambda m: seen.errors.append(m.text) if m.type == "error"
                    else None)
            page.on("pageerror", lambda exc: seen.errors.append(str(exc)))

            def guard(route: object) -> None:
                request = route.request  # type: ignore[attr-defined]
                url = urlsplit(request.url)
                if url.scheme in ("http", "https", "ws", "wss") \
                        and url.hostname not in _LOCAL:
                    seen.remote.append(request.url)
                    route.abort()  # type: ignore[attr-defined]
                else:
                    route.continue_()  # type: ignore[attr-defined]

            page.route("**/*", guard)
            yield page, seen
        finally:
            browser.close()


def screenshot(page: Page, name: str) -> Path:
    """Save the whole page as ``ARTEFACTS/name.png`` (kept after the run, to look at)."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
