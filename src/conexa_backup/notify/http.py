"""HTTP for notifiers: a POST or GET with a timeout and retries with backoff (stdlib only).

Retried: connection errors, timeouts, 429 (honouring ``Retry-After``, capped) and 5xx.
Not retried: other 4xx (a wrong URL or token does not fix itself).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from conexa_backup.notify.base import NotifyError

log = logging.getLogger(__name__)
MAX_RETRY_AFTER = 30.0


def request(url: str, *, payload: Any = None, timeout: float, retries: int,
            headers: dict[str, str] | None = None, what: str) -> int:
    """Send ``payload`` as JSON (POST), or a GET when None; return the HTTP status.

    Raises:
        NotifyError: naming ``what`` (never the URL: webhook URLs are secrets).
    """
    import urllib.error  # with http.client and ssl: loaded when a message is sent
    import urllib.request
    data = None if payload is None else json.dumps(payload).encode()
    hdrs = {"User-Agent": "conexa-backup", **(headers or {})}
    if data is not None:
        hdrs["Content-Type"] = "application/json"
    last = "no attempt"
    for attempt in range(1, retries + 1):
        try:
            req = urllib.request.Request(url, data=data, headers=hdrs,  # noqa: S310 - config
                                         method="GET" if data is None else "POST")
        except ValueError:  # its message quotes the URL, which is a secret
            raise NotifyError(f"{what}: invalid URL (it must start with https://)") from None
        delay = min(2.0 ** (attempt - 1), 8.0)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code != 429 and exc.code < 500:
                raise NotifyError(f"{what}: {last}") from None
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            if retry_after and retry_after.strip().isdigit():
                delay = min(float(retry_after), MAX_RETRY_AFTER)
        except ValueError:
            raise NotifyError(f"{what}: invalid URL") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
        if attempt < retries:
            log.info("%s: %s; retrying in %.0f s", what, last, delay)
            time.sleep(delay)
    raise NotifyError(f"{what}: {last} (after {retries} attempts)")
