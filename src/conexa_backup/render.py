"""Turning action results into what people and machines read (no logic, no I/O but output)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from conexa_backup.actions.incomplete import Incomplete, incomplete, removed_after
from conexa_backup.actions.monitor import LEVELS, drill_failure

if TYPE_CHECKING:  # types only: the CLI imports each action when its command runs
    from conexa_backup.actions.backup import BackupResult
    from conexa_backup.actions.drill import DrillResult
    from conexa_backup.actions.inspect import CopyCheck
    from conexa_backup.actions.monitor import Health, TargetHealth
    from conexa_backup.actions.prune import TargetPrune
    from conexa_backup.actions.restore import RestoreResult
    from conexa_backup.actions.setup import CheckResult
    from conexa_backup.catalog import Backup


def iso(dt: datetime | None) -> str | None:
    return dt.isoformat().replace("+00:00", "Z") if dt is not None else None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_age(seconds: float) -> str:
    minutes = max(0, int(seconds // 60))  # never "-5 min": a clock behind is said elsewhere
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} days {hours % 24} h"


def print_json(console: Console, data: Any) -> None:
    """One JSON document on stdout, nothing else."""
    console.file.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    console.file.flush()


def error_json(message: str, exit_code: int) -> dict[str, Any]:
    """What a ``--json`` command prints on stdout when it fails before its answer."""
    return {"ok": False, "error": message, "exit_code": exit_code}


# -- backup -----------------------------------------------------------------------------------

def backup_json(result: BackupResult) -> dict[str, Any]:
    m = result.manifest
    return {
        "id": m.id,
        "status": "partial" if result.partial else "complete",
        "kind": m.kind,
        "created_at": iso(m.started_at),
        "finished_at": iso(m.finished_at),
        "duration_seconds": round(result.seconds, 3),
        "size_bytes": m.size_bytes,
        "targets": result.stored_on,
        "failed_targets": result.failures,
        "skipped_targets": result.skipped,
        "warnings": result.warnings,
        "pruned": [prune_entry(p) for p in result.pruned],
        "artifacts": [a.model_dump() for a in m.artifacts],
    }


def backup_human(console: Console, result: BackupResult) -> None:
    m = result.manifest
    console.print(f"backup [bold]{m.id}[/] complete on {', '.join(result.stored_on)}: "
                  f"{human_bytes(m.size_bytes)} in {result.seconds:.1f} s")
    for name, error in result.failures.items():
        console.print(f"[red]failed on {name}[/]: ", end="")
        console.print(error, markup=False)
    for name, why in result.skipped.items():
        console.print(f"not stored on {name}: {why}", markup=False)
    for warning in result.warnings:
        console.print(f"[yellow]warning[/]: {escape(warning)}")
    for p in result.pruned:
        if p.gone():
            hidden = f" ({len(p.hidden)} hidden: the bucket keeps them)" if p.hidden else ""
            console.print(f"pruned {len(p.gone())} backup(s) from {p.target}{hidden}",
                          markup=False)
        if p.gc is not None and (p.gc.deleted or p.gc.repacked or p.gc.skipped):
            for line in gc_lines(p, dry_run=False):
                console.print(line, markup=False)
        for error in [*p.errors, *(p.gc.errors if p.gc else [])]:
            console.print(f"[red]prune failed on {p.target}[/]: ", end="")
            console.print(error, markup=False)


# -- list / status ----------------------------------------------------------------------------

Drills = dict[tuple[str, str], dict[str, Any]]  # (id, target) -> newest drill result


def backup_entry(b: Backup, drills: Drills | None = None) -> dict[str, Any]:
    m = b.manifest
    by_kind = {a.kind: a.size for a in m.artifacts} if m else {}
    proven = {c.target.name: _drill_summary(drills[(b.id, c.target.name)])
              for c in b.copies if drills and (b.id, c.target.name) in drills}
    return {
        "id": b.id,
        "created_at": iso(m.started_at) if m else None,
        "finished_at": iso(m.finished_at) if m else None,
        "kind": m.kind if m else None,
        "status": b.status,
        "size_bytes": m.size_bytes if m else sum(o.size for c in b.copies for o in c.objects),
        "database_bytes": by_kind.get("database"),
        "uploads_bytes": by_kind.get("uploads"),
        "uploads_files": m.uploads.files if m and m.uploads else None,
        # Stored, but with problems: the backup run's warnings (exit 3), files it could not
        # read, and why its uploads look wrong (empty or shrunken), if they do.
        "warnings": list(m.warnings) if m else [],
        "uploads_skipped": m.uploads.skipped if m and m.uploads else 0,
        "suspect": b.suspect,
        "targets": [c.target.name for c in b.good_copies],
        "damaged_targets": {c.target.name: {"at": why[0], "why": why[1], "reason": c.reason}
                            for c in b.copies if (why := c.why_damaged) is not None},
        "incomplete_targets": [c.target.name for c in b.copies if c.state == "incomplete"],
        # When prune may remove its incomplete copies (None: it has none).
        "removed_after": iso(removed_after(b.id)) if any(
            c.state == "incomplete" for c in b.copies) else None,
        "drills": proven,
        "signed_by": b.signed_by,  # the trusted key its signature verified with ([signing])
    }


def _drill_summary(d: dict[str, Any]) -> dict[str, Any]:
    return {"at": d.get("started_at"), "ok": d.get("ok"),
            "recovery_seconds": d.get("recovery_seconds"),
            "failed": None if d.get("ok") else drill_failure(d)}


def incomplete_line(found: Incomplete) -> str | None:
    """``2 incomplete copies, 140.0 MiB, removed by prune after …``, or None."""
    return found.describe(human_bytes(found.bytes))


def incomplete_json(found: Incomplete) -> dict[str, Any]:
    return {"copies": found.copies, "bytes": found.bytes,
            "removed_after": iso(found.removed_after)}


def list_human(console: Console, backups: Sequence[Backup], drills: Drills | None = None) -> None:
    if not backups:
        console.print("no backups yet")
        return
    _list_table(console, backups, drills)
    line = incomplete_line(incomplete(backups))
    if line is not None:  # under the table and its notes: disk the table does not show
        console.print(line, markup=False, highlight=False)


def _list_table(console: Console, backups: Sequence[Backup], drills: Drills | None) -> None:
    table = Table(box=None, pad_edge=False)
    signed = any(b.signed_by for b in backups)  # which key signed each: after a rotation
    for col in ("ID", "Created (UTC)", "Kind", "Size", "Targets", "Status", "Drill",
                *(["Signed by"] if signed else [])):
        # Ids and times are what scripts and people copy: never wrap or cut them.
        table.add_column(col, justify="right" if col == "Size" else "left",
                         no_wrap=col in ("ID", "Created (UTC)", "Size", "Status", "Signed by"))
    for b in reversed(backups):
        e = backup_entry(b, drills)
        created = (e["created_at"] or "-").replace("T", " ").rstrip("Z")[:19]
        status = e["status"] if e["status"] == "complete" else f"[yellow]{e['status']}[/]"
        if e["status"] == "complete" and (e["suspect"] or e["warnings"]):
            n = len(e["warnings"])
            tags = ["suspect"] * bool(e["suspect"]) + [f"{n} warning{'s' * (n != 1)}"] * bool(n)
            status = f"[yellow]complete ({', '.join(tags)})[/]"
        if e["damaged_targets"]:
            damaged = e["damaged_targets"]
            # Copies refused for their signature say so (which target: the lines below).
            what = "signature" if all(d["reason"] == "signature" for d in damaged.values()) \
                else ", ".join(damaged)
            status = f"[red]damaged[/] ({what})"
        where = ", ".join(e["targets"]) or "-"
        if e["incomplete_targets"]:
            where += f" (incomplete: {', '.join(e['incomplete_targets'])})"
        proven = ", ".join(f"{'ok' if d['ok'] else '[red]FAILED[/]'} ({t})"
                           for t, d in e["drills"].items()) or "-"
        table.add_row(b.id, created, e["kind"] or "-", human_bytes(e["size_bytes"]), where,
                      status, proven, *([e["signed_by"] or "-"] if signed else []))
    console.print(table)
    for b in reversed(backups):  # why, under the table: a reason does not fit in a column
        e = backup_entry(b, drills)
        for target, d in e["drills"].items():
            if d["failed"]:
                console.print(f"{b.id} on {target}: {d['failed']}", markup=False,
                              highlight=False)
        for target, d in e["damaged_targets"].items():
            since = f" since {d['at'][:19].replace('T', ' ')}" if d["at"] else ""
            console.print(f"{b.id} on {target}: damaged{since}: {d['why']}", markup=False,
                          highlight=False)
        # The run stores the suspect reason among its warnings, with more words after it.
        suspect = e["suspect"]
        notes = [*e["warnings"], *([suspect] if suspect and not any(
            w.startswith(suspect) for w in e["warnings"]) else [])]
        for note in notes:
            console.print(f"{b.id}: warning: {note}", markup=False, highlight=False)


def status_json(h: Health) -> dict[str, Any]:
    return {
        "status": h.label,
        "code": h.level,
        "summary": h.summary,
        "last_backup": backup_entry(h.last) if h.last else None,
        "age_seconds": round(h.age_seconds) if h.age_seconds is not None else None,
        "incomplete_backups": h.incomplete,
        "incomplete_copies": incomplete_json(h.leftovers),
        "restore_pending": h.restore_pending,
        "last_backup_run": h.last_run,
        "last_drill": h.last_drill,
        "targets": [{
            "target": t.target, "status": LEVELS[t.level], "newest_backup": t.newest_backup,
            "backup_age_seconds": round(t.backup_age_seconds)
            if t.backup_age_seconds is not None else None,
            "newest_successful_drill": t.newest_drill,
            "drill_age_seconds": round(t.drill_age_seconds)
            if t.drill_age_seconds is not None else None,
            "damaged": t.damaged,
            "max_backup_age_seconds": t.max_age_seconds, "max_backup_age_rule": t.age_rule,
            "problems": t.problems} for t in h.targets],
    }


def _ago(seconds: float | None) -> str:
    """The age as "3 h ago", or "never" (not "never ago") when there is none to measure."""
    return "never" if seconds is None else f"{human_age(seconds)} ago"


def _limit(t: TargetHealth) -> str:
    """``, at most 32 d (monthly archive tier: …)``: what the target's age is held to."""
    if t.max_age_seconds is None:
        return ""
    return f", at most {human_age(t.max_age_seconds)}: {t.age_rule}"


def status_human(console: Console, h: Health) -> None:
    """A Nagios-style first line, then one line per target."""
    console.print(f"CONEXA-BACKUP {h.label} - {escape(h.summary)}", highlight=False)
    for t in h.targets:
        console.print(f"  {t.target}: {LEVELS[t.level]}; newest backup "
                      f"{t.newest_backup or '-'} ({_ago(t.backup_age_seconds)}{_limit(t)}); "
                      f"last good drill {_ago(t.drill_age_seconds)}",
                      markup=False, highlight=False)
        for d in t.damaged:
            since = f" since {d['at'][:19].replace('T', ' ')}" if d["at"] else ""
            console.print(f"    {d['id']} damaged{since}: {d['why']}", markup=False,
                          highlight=False)
    if h.last_run is not None:
        console.print(f"  last backup run: {h.last_run.get('outcome')} at "
                      f"{h.last_run.get('time')}", markup=False, highlight=False)
    line = incomplete_line(h.leftovers)
    if line is not None:
        console.print(f"  {line}", markup=False, highlight=False)


# -- verify / check / restore -----------------------------------------------------------------

def verify_json(checks: Sequence[CopyCheck]) -> dict[str, Any]:
    return {
        "ok": bool(checks) and all(c.ok for c in checks),
        "checks": [{"id": c.backup_id, "target": c.target, "ok": c.ok,
                    "bytes_read": c.bytes_read, "problems": c.problems} for c in checks],
    }


def verify_human(console: Console, checks: Sequence[CopyCheck]) -> None:
    for c in checks:
        mark = "[green]ok[/]" if c.ok else "[red]FAILED[/]"
        console.print(f"{c.backup_id} on {c.target}: {mark} ({human_bytes(c.bytes_read)} read)")
        for problem in c.problems:
            console.print(f"  {problem}", markup=False)


def check_json(results: Sequence[CheckResult]) -> dict[str, Any]:
    return {"ok": all(r.ok for r in results),
            "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail, "warnings": r.warnings}
                       for r in results]}


def check_human(console: Console, results: Sequence[CheckResult]) -> None:
    for r in results:
        mark = "[green]ok[/]  " if r.ok else "[red]FAIL[/]"
        console.print(f"{mark} {r.name}: ", end="")
        console.print(r.detail, markup=False)
        for warning in r.warnings:
            console.print("     [yellow]warning[/]: ", end="")
            console.print(warning, markup=False)


def restore_human(console: Console, r: RestoreResult) -> None:
    console.print(f"restored backup [bold]{r.backup_id}[/] in {r.seconds:.1f} s "
                  "(recovery time; the objective is under 1 hour)")
    for line in read_from_lines(r.read_from):
        console.print(line, markup=False, highlight=False)
    if r.safety_backup_id:
        console.print(f"safety backup of the previous state: {r.safety_backup_id}")
    if r.database:
        console.print(f"database: {r.database}", markup=False)
    if r.previous_database:
        console.print(f"previous database kept as: {r.previous_database}", markup=False)
    if r.uploads:
        console.print(f"uploads: {r.uploads}", markup=False)
    if r.previous_uploads:
        console.print(f"previous uploads kept in: {r.previous_uploads}", markup=False)


def restore_json(r: RestoreResult) -> dict[str, Any]:
    return {"id": r.backup_id, "database": r.database, "previous_database": r.previous_database,
            "uploads": str(r.uploads) if r.uploads else None,
            "previous_uploads": str(r.previous_uploads) if r.previous_uploads else None,
            "safety_backup_id": r.safety_backup_id, "duration_seconds": round(r.seconds, 3),
            "fallbacks": r.fallbacks, "read_from": r.read_from}


def read_from_lines(read_from: dict[str, str]) -> list[str]:
    """``database.dump.zst from target 's3'``: one line per artifact read."""
    return [f"{name} from target {target!r}" for name, target in read_from.items()]


class ProgressReporter:
    """Shows each step with a byte counter on a terminal (stderr)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (  # only on a terminal
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
        )
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=None),
            DownloadColumn(), console=console, transient=True,
        )
        self._task: Any = None

    def __enter__(self) -> ProgressReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def step(self, message: str) -> None:
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(message, total=None)

    def advance(self, nbytes: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, nbytes)


# -- prune --------------------------------------------------------------------------------------

def prune_entry(p: TargetPrune) -> dict[str, Any]:
    return {
        "target": p.target,
        "skipped": p.skipped,
        "deleted": p.deleted,
        # Deleted but kept by the bucket (versioned, Object Lock): until when, when locked.
        "hidden": [{"id": i, "locked_until": iso(until)} for i, until in p.hidden.items()],
        "errors": p.errors,
        "plan": [{"id": d.id, "keep": d.keep, "reason": d.reason} for d in p.decisions],
        "gc": gc_entry(p),
        "expired_versions": p.expired_versions,
        "aborted_uploads": p.aborted_uploads,
        "warnings": p.warnings,
    }


def hidden_until(until: datetime | None) -> str:
    """Why a hidden copy is still in the bucket, for people."""
    if until is None:
        return "kept by the bucket's versioning until a lifecycle rule expires it"
    return f"locked until {until.isoformat(timespec='seconds').replace('+00:00', 'Z')}"


def sweep_lines(p: TargetPrune, dry_run: bool) -> list[str]:
    """What prune cleared on an S3 target besides backups (would clear, in a dry run)."""
    lines = []
    if p.expired_versions:
        lines.append(f"{p.target}: {'would remove' if dry_run else 'removed'} "
                     f"{p.expired_versions} hidden version(s) whose Object Lock has ended")
    if p.aborted_uploads:
        lines.append(f"{p.target}: {'would abort' if dry_run else 'aborted'} "
                     f"{p.aborted_uploads} abandoned multipart upload(s) older than a day")
    return lines


def gc_entry(p: TargetPrune) -> dict[str, Any] | None:
    """Garbage collection of packs on one target (None: the target holds no packs)."""
    gc = p.gc
    if gc is None:
        return None
    return {"deleted_packs": gc.deleted, "deleted_bytes": gc.deleted_bytes,
            "repacked_packs": gc.repacked, "repacked_bytes": gc.repacked_bytes,
            "written_packs": gc.written, "written_bytes": gc.written_bytes,
            "freed_bytes": gc.freed, "waiting_packs": gc.waiting, "skipped": gc.skipped,
            "notes": gc.notes, "errors": gc.errors}


def gc_lines(p: TargetPrune, dry_run: bool) -> list[str]:
    """What garbage collection did (would do) on one target, in a few plain lines."""
    gc = p.gc
    if gc is None:
        return []
    if gc.skipped:
        return [f"{p.target}: no pack collected: {gc.skipped}"]
    verb = ("would delete", "would repack", "would free") if dry_run else \
        ("deleted", "repacked", "freed")
    line = (f"{p.target}: packs {verb[0]} {len(gc.deleted)} ({human_bytes(gc.deleted_bytes)}), "
            f"{verb[1]} {len(gc.repacked)} ({human_bytes(gc.repacked_bytes)})")
    if not dry_run and gc.written:
        line += f" into {len(gc.written)} new ({human_bytes(gc.written_bytes)})"
    line += f": {verb[2]} {human_bytes(gc.freed)}"
    if gc.waiting:
        line += f"; {gc.waiting} unreferenced pack(s) kept until the grace period ends"
    return [line, *(f"{p.target}: {note}" for note in gc.notes)]


def prune_human(console: Console, results: Sequence[TargetPrune], dry_run: bool) -> None:
    for p in results:
        if p.skipped:
            console.print(f"[yellow]{p.target}: not pruned[/] ({p.skipped})")
            continue
        table = Table(title=f"{p.target}", box=None, pad_edge=False, title_justify="left")
        table.add_column("ID")
        table.add_column("Decision")
        for d in p.decisions:
            verdict = "keep" if d.keep else ("would delete" if dry_run else "deleted")
            if not d.keep and d.id in p.hidden:
                why = hidden_until(p.hidden[d.id])
                verdict = f"{'would hide' if dry_run else 'hidden'} ({why})"
            elif not d.keep and not dry_run and d.id not in p.deleted:
                verdict = "[red]delete failed[/]"
            table.add_row(d.id, f"{verdict} ({'; '.join(d.reasons)})")
        console.print(table)
        for line in [*gc_lines(p, dry_run), *sweep_lines(p, dry_run)]:
            console.print(line, markup=False)
        for error in [*p.errors, *(p.gc.errors if p.gc else [])]:
            console.print("[red]error[/]: ", end="")
            console.print(error, markup=False)
        for warning in p.warnings:
            console.print("[yellow]warning[/]: ", end="")
            console.print(warning, markup=False)


# -- drills -------------------------------------------------------------------------------------

def drills_json(results: Sequence[DrillResult]) -> dict[str, Any]:
    return {"ok": bool(results) and all(r.ok for r in results),
            "drills": [r.to_dict() for r in results]}


def drills_human(console: Console, results: Sequence[DrillResult]) -> None:
    """A table of steps per drilled copy, then its recovery time: only when it was judged
    (a failed drill recovered nothing to time); a copy that could not be drilled here says
    why instead."""
    for r in results:
        if r.not_run is not None:
            console.print(f"restore drill of {r.backup_id} from {r.target}: [yellow]COULD NOT "
                          f"DRILL[/] here (not run; the copy is not judged)")
            console.print(f"  {r.not_run}\n", markup=False, highlight=False)
            continue
        verdict = "[green]PASSED[/]" if r.ok else "[red]FAILED[/]"
        table = Table(title=f"restore drill of {r.backup_id} from {r.target}: {verdict}",
                      box=None, pad_edge=False, title_justify="left")
        for col in ("Step", "Result", "Time", "Detail"):
            table.add_column(col, justify="right" if col == "Time" else "left")
        for s in r.steps:
            table.add_row(escape(s.name), "[green]ok[/]" if s.ok else "[red]FAIL[/]",
                          f"{s.seconds:.2f} s", escape(s.detail.splitlines()[0]))
        console.print(table)
        if r.measured:
            console.print(f"recovery time {r.recovery_seconds:.1f} s; objective "
                          f"{r.rto_objective_seconds:.0f} s\n")
        else:
            console.print("recovery time not measured: the drill failed\n")


def drill_junit(results: Sequence[DrillResult]) -> str:
    """JUnit XML: a test suite per drilled copy, a test case per step."""
    import xml.etree.ElementTree as ET  # for --junit only
    suites = ET.Element("testsuites", name="conexa-backup restore drills")
    for r in results:
        failures = sum(1 for s in r.steps if not s.ok)
        suite = ET.SubElement(suites, "testsuite", {
            "name": f"drill {r.backup_id} {r.target}", "tests": str(len(r.steps) or 1),
            "failures": str(failures), "errors": "0", "skipped": str(int(not r.steps)),
            "time": f"{r.recovery_seconds:.3f}", "timestamp": r.started_at.isoformat()})
        if not r.steps:  # could not drill here (or nothing to drill): skipped, not failed
            case = ET.SubElement(suite, "testcase", {
                "classname": f"drill.{r.target}", "name": "drill", "time": "0.000"})
            ET.SubElement(case, "skipped", message=r.not_run or "nothing to drill")
            continue
        for s in r.steps:
            case = ET.SubElement(suite, "testcase", {
                "classname": f"drill.{r.target}", "name": s.name, "time": f"{s.seconds:.3f}"})
            if not s.ok:
                ET.SubElement(case, "failure", message=s.detail.splitlines()[0]).text = s.detail
            else:
                ET.SubElement(case, "system-out").text = s.detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, "unicode") + "\n"


# -- report -------------------------------------------------------------------------------------

def report_text(r: dict[str, Any]) -> str:
    """The periodic report as plain text (printed, and the body sent to notifiers)."""
    b, d = r["backups"], r["drills"]
    lines = [f"period: {r['from'][:16]} to {r['to'][:16]} UTC ({r['period_days']} days)",
             f"backups: {b['runs']} runs, {b['success']} ok, {b['partial']} partial, "
             f"{b['failure']} failed"]
    lines += [f"  failed {f['time']}: {f['error']}" for f in b["failures"]]
    lines += [f"  {w['id']} stored with {len(w['warnings'])} warning(s): {w['warnings'][0]}"
              for w in b.get("with_warnings", []) if w["warnings"]]
    if b["sizes"]:
        lines.append("sizes: " + ", ".join(f"{s['id'][:8]} {human_bytes(s['bytes'])}"
                                           for s in b["sizes"][-14:]))
    gap = r["rpo"]["largest_gap_seconds"]
    lines.append(f"RPO: largest gap between backups "
                 f"{human_age(gap) if gap is not None else 'n/a'} "
                 f"(objective {human_age(r['rpo']['objective_seconds'])}): "
                 f"{'met' if r['rpo']['met'] else 'NOT MET'}")
    rec = d["recovery_seconds"]
    lines.append(f"drills: {d['runs']} run, {d['passed']} passed, {d['failed']} failed"
                 + (f", {d['not_run']} could not run here" if d.get("not_run") else "")
                 + (f"; recovery {rec['min']:.0f}-{rec['max']:.0f} s (median "
                    f"{rec['median']:.0f} s)" if rec else ""))
    missed = "NOT MET (the newest drill failed or was too slow, or none ran)"
    lines.append(f"RTO (objective {human_age(r['rto']['objective_seconds'])}): "
                 f"{'met' if r['rto']['met'] else missed}")
    lines += [f"DAMAGED: {d['id']} on {d['target']}"
              + (f" (since {d['at'][:16].replace('T', ' ')})" if d["at"] else "")
              + f": {d['why']}" for d in r.get("damaged", [])]
    for s in r["storage"]:
        cost = f", about {r['currency']} {s['monthly_cost']:.2f}/month" \
            if s["monthly_cost"] is not None else ""
        where = f" (could not list: {s['unreachable']})" if s["unreachable"] else ""
        lines.append(f"storage {s['target']}: {human_bytes(s['bytes'])}{cost}{where}")
    if r["monthly_cost"] is not None:
        lines.append(f"estimated storage cost: {r['currency']} {r['monthly_cost']:.2f}/month")
    return "\n".join(lines)
