"""Events from action results: what notifiers, the run history and the metrics are told."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from conexa_backup.errors import ConexaError, PartialFailure
from conexa_backup.notify.base import Event, Kind

if TYPE_CHECKING:
    from conexa_backup.actions.backup import BackupResult
    from conexa_backup.actions.drill import DrillResult
    from conexa_backup.actions.prune import TargetPrune
    from conexa_backup.actions.restore import RestoreResult


def backup_event(result: BackupResult) -> Event:
    partial = result.partial
    m = result.manifest
    return Event(
        "backup", "partial" if partial else "success",
        f"backup {m.id} {'partially ' if partial else ''}complete",
        backup_id=m.id, duration_seconds=round(result.seconds, 3), size_bytes=m.size_bytes,
        targets_ok=list(result.stored_on), targets_failed=dict(result.failures),
        error="; ".join(result.warnings + result.prune_errors) or None,
        details={"skipped_targets": result.skipped, "warnings": result.warnings,
                 "pruned": sum(len(p.deleted) for p in result.pruned)})


def restore_event(result: RestoreResult) -> Event:
    """Restored; a copy passed over as damaged is named, with why, in ``details.fallbacks``
    (one line of text, so that email and Slack show it too)."""
    details = {"database": result.database, "uploads": str(result.uploads or "")}
    if result.read_from:
        details["read_from"] = ", ".join(f"{name} from {target!r}"
                                         for name, target in result.read_from.items())
    if result.fallbacks:
        details["fallbacks"] = "; ".join(result.fallbacks)
    fell_back = " from a fallback copy" if result.fallbacks else ""
    return Event("restore", "success", f"backup {result.backup_id} restored{fell_back}",
                 backup_id=result.backup_id, duration_seconds=round(result.seconds, 3),
                 details=details)


def drill_event(results: Sequence[DrillResult]) -> Event:
    """Passed, FAILED, or (every copy that did not pass could not be drilled here: no age
    identity) "could not run": still a failure for the notifiers, since nothing was proven,
    but said as such, never as a failed drill."""
    ok = all(r.ok for r in results)
    first = results[0]
    failed = {r.target: "; ".join(f"{s.name}: {s.detail}" for s in r.steps if not s.ok)
              or f"could not drill here: {r.not_run}" for r in results if not r.ok}
    verdict = "passed" if ok else "FAILED"
    if not ok and all(r.ok or r.not_run is not None for r in results):
        verdict = "could not run here"
    return Event(
        "drill", "success" if ok else "failure",
        f"restore drill of {first.backup_id} {verdict}",
        backup_id=first.backup_id,
        duration_seconds=max(r.recovery_seconds for r in results),
        targets_ok=[r.target for r in results if r.ok], targets_failed=failed,
        details={"recovery_seconds": {r.target: r.recovery_seconds for r in results},
                 "rto_objective_seconds": first.rto_objective_seconds})


def prune_event(results: Sequence[TargetPrune]) -> Event:
    errors = {p.target: "; ".join(p.errors + (p.gc.errors if p.gc else [])) or str(p.skipped)
              for p in results if p.errors or p.skipped or (p.gc and p.gc.errors)}
    deleted = sum(len(p.deleted) for p in results)
    return Event("prune", "partial" if errors else "success",
                 f"prune deleted {deleted} backup cop{'y' if deleted == 1 else 'ies'}",
                 targets_ok=[p.target for p in results if p.target not in errors],
                 targets_failed=errors,
                 details={"deleted": {p.target: p.deleted for p in results}})


# What a person did through the API, said when it went well and when it failed.
_ADMIN_DONE = {"trigger": "backup started", "restore": "restore of {id} started",
               "delete": "backup {id} deleted", "cancel": "job {job} canceled"}
_ADMIN_TRIED = {"trigger": "backup", "restore": "restore of {id}", "delete": "delete of {id}",
                "cancel": "cancel of job {job}"}


def admin_event(action: str, sub: str, outcome: str, backup_id: str | None = None,
                client: str | None = None, **detail: object) -> Event:
    """What a person did through the API (trigger, restore, delete, cancel) and how it went
    (``outcome`` as the audit log says it; ``failed: <code>`` is a failure): "restore of
    20261205T030000Z started by maria@escola". Never holds a token: ``sub`` names the caller.
    """
    ok = not outcome.startswith("failed")
    what = (_ADMIN_DONE if ok else _ADMIN_TRIED).get(action, action)
    what = what.format(id=backup_id, job=detail.get("job"))
    code = outcome.removeprefix("failed: ")
    title = f"{what} by {sub}" if ok else f"{what} by {sub} FAILED ({code})"
    return Event("admin", "success" if ok else "failure", title, backup_id=backup_id,
                 error=None if ok else outcome,
                 details={"action": action, "sub": sub, "client": client, "outcome": outcome,
                          **detail})


def failure_event(kind: Kind, exc: BaseException, seconds: float | None = None) -> Event:
    """A run that ended with an error (or was interrupted) after ``seconds``: how long a
    failed run took is history too (a run that hangs until it fails is drawn as long)."""
    if isinstance(exc, PartialFailure) and exc.result is not None:
        return backup_event(exc.result)  # type: ignore[arg-type]
    took = round(seconds, 3) if seconds is not None else None
    if isinstance(exc, KeyboardInterrupt):
        how = f" by {exc.args[0]}" if exc.args else ""
        return Event(kind, "failure", f"{kind} interrupted{how}", error=f"interrupted{how}",
                     duration_seconds=took)
    message = str(exc) if isinstance(exc, ConexaError) else f"{type(exc).__name__}: {exc}"
    return Event(kind, "failure", f"{kind} FAILED", error=message, duration_seconds=took)


def test_event() -> Event:
    return Event("test", "success", "conexa-backup test notification",
                 details={"note": "sent by `conexa-backup notify-test`"})


def report_event(report: dict[str, Any], text: str, html: str | None = None,
                 summary: str | None = None) -> Event:
    """The periodic report: ``text`` for email and webhooks, ``html`` (its page) for email,
    ``summary`` (a few lines) for chat."""
    return Event("report", "success", f"conexa-backup report, last {report['period_days']} days",
                 body=text, html=html, summary=summary)
