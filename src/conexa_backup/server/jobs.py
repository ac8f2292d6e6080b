"""Jobs: backups and restores the API starts, each the CLI itself run as a child process.

``python -m conexa_backup --config CFG --verbose <command> --json ...`` runs in its own
process group: a crash or an OOM kill in a job never takes the server down, and the job takes
the same ``flock`` (:mod:`conexa_backup.locking`) as a run started by cron. Each job is a
file, ``state_dir/jobs/<id>.json`` (0600, replaced atomically), and a folder beside it with
the child's stdout and stderr, so jobs outlive the server.

One :class:`JobStore` per server process. Its mutex makes "is anything running? then start"
one step, so two starts at once never both run; the lock probe catches a run of cron's or
another tool's. A child that still loses the race to such a run exits 4: the job is
``failed`` with the lock's message.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import secrets
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from conexa_backup import locking, process
from conexa_backup.errors import (
    BusyError,
    ConexaError,
    JobNotFoundError,
    LockedError,
    ProcessError,
    UsageError,
)
from conexa_backup.manifest import ID_PATTERN
from conexa_backup.server.job import (
    STDERR,
    STDOUT,
    Job,
    Kind,
    now,
    outcome,
    read_error,
    read_result,
    read_steps,
)
from conexa_backup.state import private_dir, write_json

JOBS_DIR = "jobs"
RESTARTED = "server restarted"
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ID_LENGTH = 16  # secrets.token_urlsafe(12)
_ONLY = ("database", "uploads")


def command(kind: str, args: Mapping[str, str]) -> list[str]:
    """The CLI's arguments (after ``--config CFG``) for a job; every restore is confirmed
    (``--yes``: the API asked the admin) and takes the safety backup. A backup's
    ``backup_id``, if given, is the id it is stored under (chosen ahead: ``backup --id``).

    Raises:
        UsageError: an unknown kind or argument, a malformed backup id, a bad ``only``.
    """
    allowed = {"backup": {"backup_id"}, "restore": {"backup_id", "to_database", "only"}}.get(kind)
    if allowed is None:
        raise UsageError(f"unknown job kind {kind!r}: 'backup' or 'restore'")
    if unknown := set(args) - allowed:
        raise UsageError(f"unknown argument(s) for a {kind} job: {', '.join(sorted(unknown))}")
    backup_id = args.get("backup_id", "")
    if (kind == "restore" or backup_id) and not ID_PATTERN.fullmatch(backup_id):
        raise UsageError(f"not a backup id: {backup_id[:80]!r}")
    if kind == "backup":
        return ["--verbose", "backup", "--json", *([f"--id={backup_id}"] if backup_id else [])]
    argv = ["--verbose", "restore", "--yes", "--json"]
    if (only := args.get("only")) is not None:
        if only not in _ONLY:
            raise UsageError("only must be 'database' or 'uploads'")
        argv.append(f"--only={only}")
    if (to_database := args.get("to_database")) is not None:
        if not to_database:
            raise UsageError("to_database must not be empty")
        argv.append(f"--to-database={to_database}")  # one word: a value never reads as a flag
    return [*argv, "--", backup_id]


class JobStore:
    """Start, follow, cancel and list jobs kept in ``state_dir/jobs``; thread-safe."""

    def __init__(self, state_dir: Path, config: Path, *, python: str = sys.executable,
                 env: Mapping[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.folder = state_dir / JOBS_DIR
        self._argv = [python, "-m", "conexa_backup", "--config", str(config)]
        self._env = dict(env) if env else None
        self._mutex = threading.RLock()
        self._active: dict[str, Job] = {}  # running jobs, ours or (after recover) orphans
        self._children: set[int] = set()  # pids we started and have not reaped

    # -- starting ------------------------------------------------------------------------

    def start(self, kind: str, args: Mapping[str, str], sub: str) -> Job:
        """Start a job as ``sub``; returns it ``running``.

        Raises:
            UsageError: bad kind or arguments (see :func:`command`).
            BusyError: a job of ours is active, or a run holds the lock.
            ProcessError: the child could not be started (the job is recorded ``failed``).
            ConexaError: ``state_dir`` cannot be written.
        """
        argv = self._argv + command(kind, args)
        with self._mutex:
            self.reap()
            self._refuse_if_busy()
            job = Job(secrets.token_urlsafe(12), _kind(kind), dict(args), sub,
                      backup_id=args.get("backup_id"))
            self._save(job)
            folder = self._private(self.folder / job.id)
            try:
                pid = process.spawn_detached(argv, env=self._env, stdout_path=folder / STDOUT,
                                             stderr_path=folder / STDERR)
            except ProcessError as exc:
                job.state, job.finished, job.error = "failed", now(), str(exc)
                self._save(job)
                raise
            self._children.add(pid)
            job.pid, job.pid_start = pid, process.start_time(pid)
            job.state, job.started = "running", now()
            self._active[job.id] = job
            self._save(job)
            return job

    @contextlib.contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """Hold the run lock (as ``what``) for the block, for work the server does itself
        (a delete): no job of ours may be active, and while it is held a job start, cron's
        backup or a prune is refused as busy.

        Raises:
            BusyError: a job of ours is active, or another run holds the lock.
        """
        held = contextlib.ExitStack()
        with self._mutex:  # a job start waits for it: never both
            self.reap()
            self._refuse_if_busy()
            try:
                held.enter_context(locking.run_lock(self._private(self.state_dir), what))
            except LockedError as exc:  # taken between the probe and the flock: say by whom
                found = locking.holder(self.state_dir)
                raise BusyError(str(exc), holder=_who(found) if found else "unknown",
                                since=found.since if found else None) from None
        with held:
            yield

    def _refuse_if_busy(self) -> None:
        if self._active:
            job = next(iter(self._active.values()))
            raise BusyError(f"job {job.id} ({job.kind}) is {job.state}",
                            holder=f"job {job.id} ({job.kind})", since=job.started)
        holder = locking.holder(self._private(self.state_dir))
        if holder is not None:
            who = _who(holder)
            since = f" since {holder.since}" if holder.since else ""
            raise BusyError(f"another conexa-backup run holds the lock ({who}){since}",
                            holder=who, since=holder.since)

    # -- following -----------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job, up to date; a running one with its progress so far.

        Raises:
            JobNotFoundError: no such job (or an id we never make: ``../``, too long...).
        """
        with self._mutex:
            self.reap()
            job = self._load(job_id)
            if job.active:
                job.steps = read_steps(self.folder / job.id)
            return job

    def list(self) -> list[Job]:
        """Every job, newest first (a running one without its progress: see :meth:`get`)."""
        with self._mutex:
            self.reap()
            jobs = []
            for path in self.folder.glob("*.json") if self.folder.is_dir() else []:
                with contextlib.suppress(JobNotFoundError):
                    jobs.append(self._load(path.stem))
            return sorted(jobs, key=lambda j: (j.created, j.id), reverse=True)

    def reap(self) -> builtins.list[Job]:
        """Record the end of every active job whose child has ended; return those jobs.

        Never waits: our children are polled (``waitpid``, ``WNOHANG``), an orphan (found
        running by :meth:`recover`, not our child) is over once its pid is gone or reused.
        """
        ended = []
        with self._mutex:
            for job in list(self._active.values()):
                assert job.pid is not None
                if job.pid in self._children:
                    code = process.poll_child(job.pid)
                    if code is None:
                        continue
                    self._children.discard(job.pid)
                    self._finish(job, code)
                elif not _still_running(job):
                    self._finish(job, None)
                else:
                    continue
                ended.append(job)
        return ended

    def _finish(self, job: Job, code: int | None) -> None:
        """Record how ``job`` ended: its exit ``code``, or None if unknown (an orphan)."""
        folder = self.folder / job.id
        job.exit_code, job.finished = code, now()
        job.result = read_result(folder)
        job.backup_id = _backup_id(job.result) or job.backup_id
        job.steps = read_steps(folder)
        if code is None and job.result is not None:
            # An orphan (its server was restarted) that wrote its --json answer: the CLI
            # prints it only once the work is done, and says a partial backup there.
            job.state = "partial" if job.result.get("status") == "partial" else "succeeded"
            job.error = f"{RESTARTED}; judged from its output (exit code unknown)"
        elif code is None and job.cancel_requested:
            job.state, job.error = "canceled", f"{RESTARTED}; canceled before it ended"
        elif code is None:
            job.state, job.error = "failed", f"{RESTARTED}; its exit code is unknown"
        else:
            job.state = outcome(code, job.cancel_requested)
            error = read_error(folder) if job.state != "succeeded" else None
            if code == 4:
                error = f"locked: {error or 'another run holds the lock'}"
            job.error = error
        self._active.pop(job.id, None)
        self._save(job)

    # -- stopping ------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Ask a running job to stop (SIGTERM to its process group: the CLI cleans up and
        exits 143); it is ``canceled`` once reaped. A job already over is returned as is.

        Raises:
            JobNotFoundError: no such job.
        """
        with self._mutex:
            self.reap()  # a child reaped is gone for good: no signal can reach a reused pid
            job = self._active.get(job_id) or self._load(job_id)
            if not job.active:
                return job
            assert job.pid is not None
            job.cancel_requested = True
            self._save(job)
            process.signal_group(job.pid, signal.SIGTERM)
            return job

    def recover(self) -> builtins.list[Job]:
        """At server start: a job recorded active whose process is gone (or whose pid now
        names another process) becomes ``failed: server restarted``; one still running (it
        outlived a killed server) is followed until it ends. Returns the jobs failed here.
        """
        failed = []
        with self._mutex:
            for job in self.list():
                if not job.active or job.id in self._active:
                    continue
                if _still_running(job):
                    self._active[job.id] = job
                    continue
                folder = self.folder / job.id
                if read_result(folder) is not None:  # it ended while no server ran: its
                    self._finish(job, None)  # answer says how (as for an orphan followed)
                    continue
                job.state, job.finished, job.error = "failed", now(), RESTARTED
                job.backup_id = _backup_id(job.result) or job.backup_id
                self._save(job)
                failed.append(job)
        return failed

    # -- files ---------------------------------------------------------------------------

    def _load(self, job_id: str) -> Job:
        if len(job_id) != _ID_LENGTH or not set(job_id) <= _ID_CHARS:
            raise JobNotFoundError(f"no job {job_id[:40]!r}")
        try:
            data = json.loads((self.folder / f"{job_id}.json").read_text(encoding="utf-8"))
            return Job.from_json(data)
        except (OSError, ValueError, TypeError, KeyError):
            raise JobNotFoundError(f"no job {job_id!r}") from None

    def _save(self, job: Job) -> None:
        path = self._private(self.folder) / f"{job.id}.json"
        try:
            write_json(path, job.to_json())
        except OSError as exc:
            raise ConexaError(f"cannot write job record {path}: {exc.strerror}") from None

    @staticmethod
    def _private(path: Path) -> Path:
        try:
            return private_dir(path)
        except OSError as exc:
            raise ConexaError(f"cannot create folder {path}: {exc.strerror}") from None


def _still_running(job: Job) -> bool:
    """Whether the process ``job`` started still runs (not merely one with the same pid)."""
    if job.pid is None or job.pid_start is None:
        return False
    return process.start_time(job.pid) == job.pid_start


def _kind(kind: str) -> Kind:
    return "backup" if kind == "backup" else "restore"  # checked by command()


def _backup_id(result: dict[str, Any] | None) -> str | None:
    value = result.get("id") if result else None
    return value if isinstance(value, str) else None


def _who(holder: locking.Holder) -> str:
    """The lock's holder as answered in a 409: ``pid 123, backup`` (or what the file says)."""
    return f"pid {holder.pid}, {holder.what}" if holder.pid else holder.what
