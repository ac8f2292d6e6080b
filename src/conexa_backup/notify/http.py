"""HTTP for notifiers: a POST or GET with a timeout and retries with backoff, through requests.

Retried (urllib3's ``Retry``): connection errors, timeouts, 429 (honouring ``Retry-After``,
capped at 30 s) and 5xx, with exponential backoff up to 8 s between tries; POST too,
deliberately: a receiver that got an event twice is better than one that never got it. Not
retried: other 4xx (a wrong URL or token does not fix itself). requests is imported when a
message is sent, not at start-up.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from conexa_backup.notify.base import NotifyError

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)
MAX_RETRY_AFTER = 30.0
RETRIED_STATUSES = frozenset({429, *range(500, 600)})

_sessions: dict[int, requests.Session] = {}
_lock = threading.Lock()


def _session(retries: int) -> requests.Session:
    """The session for ``retries`` attempts in all (one per retry policy, shared: its
    connections are reused from one notification to the next)."""
    with _lock:
        if retries not in _sessions:
            _sessions[retries] = _new_session(retries)
        return _sessions[retries]


def _new_session(retries: int) -> requests.Session:
    import requests
    from urllib3.util.retry import Retry

    class _CappedRetry(Retry):
        def get_retry_after(self, response: Any) -> float | None:
            after = super().get_retry_after(response)
            return None if after is None else min(after, MAX_RETRY_AFTER)

    # urllib3 logs each retry at WARNING with the request's path: a Slack or webhook URL's
    # path is its secret, and an unconfigured root logger would print it on stderr.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    again = max(0, retries - 1)
    policy = _CappedRetry(
        total=again, connect=again, read=again, status=again, other=0,
        backoff_factor=1.0, backoff_max=8.0, status_forcelist=RETRIED_STATUSES,
        allowed_methods=frozenset({"GET", "POST"}), respect_retry_after_header=True,
        raise_on_status=False)
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=policy)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "conexa-backup"
    return session


def request(url: str, *, payload: Any = None, timeout: float, retries: int,
            headers: dict[str, str] | None = None, what: str) -> int:
    """Send ``payload`` as JSON (POST), or a GET when None; return the HTTP status.

    Raises:
        NotifyError: naming ``what`` (never the URL: webhook URLs are secrets).
    """
    import requests

    session = _session(retries)
    try:
        if payload is None:
            response = session.get(url, headers=headers, timeout=timeout)
        else:
            response = session.post(url, json=payload, headers=headers, timeout=timeout)
    except (requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
            requests.exceptions.InvalidURL, ValueError):  # their messages quote the URL
        raise NotifyError(f"{what}: invalid URL (it must start with https://)") from None
    except requests.exceptions.RequestException as exc:
        # A read timeout on the last try comes as a ConnectionError (urllib3's MaxRetryError
        # wrapping a ReadTimeoutError): look at the causes, not the outer type.
        why = "timed out" if _timed_out(exc) else f"connection failed: {_reason(exc)}"
        raise NotifyError(f"{what}: {why} (after {retries} attempts)") from None
    status = response.status_code
    response.close()
    if status >= 400:
        tried = f" (after {retries} attempts)" if status in RETRIED_STATUSES else ""
        raise NotifyError(f"{what}: HTTP {status}{tried}")
    return status


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: urllib3's ``reason``, chained and argument exceptions."""
    found: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        reason = getattr(current, "reason", None)
        todo += [e for e in (reason, current.__cause__, current.__context__, *current.args)
                 if isinstance(e, BaseException)]
    return found


def _timed_out(exc: BaseException) -> bool:
    import requests
    from urllib3 import exceptions as u3
    # NewConnectionError (refused, unreachable) is a ConnectTimeoutError in urllib3's tree.
    return any(isinstance(e, (TimeoutError, u3.TimeoutError, requests.exceptions.Timeout))
               and not isinstance(e, u3.NewConnectionError) for e in _causes(exc))


def _reason(exc: BaseException) -> str:
    """The operating system's words for why a connection failed (never the URL)."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    return type(exc).__name__
