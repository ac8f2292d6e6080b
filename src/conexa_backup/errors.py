"""The error tree and the exit codes: the only place where codes are chosen.

Every problem the tool knows how to describe is raised as a :class:`ConexaError` subclass
where it is detected; ``cli.py`` turns it into one line on stderr and the class's exit code.
Anything else is a bug and is reported as such (with a traceback under ``--verbose``).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Documented exit codes (README, "Exit codes")."""

    OK = 0
    FAILURE = 1
    USAGE = 2  # bad command line or configuration
    PARTIAL = 3  # some copies failed, at least one is complete
    LOCKED = 4  # another run holds the lock
    INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2, as a shell reports it
    TERMINATED = 143  # SIGTERM: 128 + 15


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (servers and libraries write several), or its type
    name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ConexaError(Exception):
    """Base class: a failure with a message fit to show a user as one line."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(ConexaError):
    """The configuration file is missing, malformed or invalid."""

    exit_code = ExitCode.USAGE


class UsageError(ConexaError):
    """The command line asks for something impossible (unknown backup id, bad option mix)."""

    exit_code = ExitCode.USAGE


class BackupNotFoundError(UsageError):
    """No backup has this id on any target (the API answers 404 ``backup_not_found``)."""


class LockedError(ConexaError):
    """Another conexa-backup run holds the lock in ``state_dir``."""

    exit_code = ExitCode.LOCKED


class BusyError(LockedError):
    """A job cannot start: a run holds the lock, or one of the server's own jobs is active.

    ``holder`` says who ("pid 123, backup" or "job <id> (backup)"), ``since`` when it took the
    lock (ISO 8601, or None when unknown), for the API's 409 answer.
    """

    def __init__(self, message: str, *, holder: str, since: str | None) -> None:
        super().__init__(message)
        self.holder = holder
        self.since = since


class JobNotFoundError(ConexaError):
    """No job has this id (or the id is not one we could have made)."""


class ProcessError(ConexaError):
    """A child process (pg_dump, pg_restore, psql...) failed; carries its stderr tail."""

    def __init__(self, message: str, *, returncode: int | None, stderr_tail: str) -> None:
        detail = f": {stderr_tail.strip()}" if stderr_tail.strip() else ""
        super().__init__(f"{message}{detail}")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class DatabaseError(ConexaError):
    """The database could not be reached or refused an operation."""


class StorageError(ConexaError):
    """A storage target failed (unreachable, full, permission denied, missing object)."""

    def __init__(self, target: str, message: str) -> None:
        super().__init__(f"target {target!r}: {message}")
        self.target = target


class ObjectNotFoundError(StorageError):
    """The requested key does not exist on the target."""


class IntegrityError(ConexaError):
    """Stored bytes do not match the manifest (size or SHA-256), or a restore check failed."""


class SignatureError(IntegrityError):
    """A manifest refused for its signature: none, not readable, altered, or made by a key
    that is not trusted here (``[signing]``)."""


class UnsafeArchiveError(ConexaError):
    """An archive member would land outside its destination or is a device/special file.

    Not an :class:`IntegrityError`: an intact copy can hold such a member (a backup written
    by another tool); it is refused for what it is, never taken for a damaged copy.
    """


class UnusableCopyError(ConexaError):
    """A copy whose stored bytes match its manifest but that cannot be restored here (a key
    that does not fit, an archive member refused): not damaged, so never "no good copy"."""


class PreflightError(ConfigError):
    """This host lacks something a restore (or drill) needs: an age identity that fits the
    backup, a client tool, a role allowed to create the database, room to stage it. Found
    before any work, so nothing was done (no safety backup either)."""


class PartialFailure(ConexaError):
    """The run completed on some targets but failed on others; ``result`` is what it made."""

    exit_code = ExitCode.PARTIAL

    def __init__(self, message: str, *, result: object = None) -> None:
        super().__init__(message)
        self.result = result
