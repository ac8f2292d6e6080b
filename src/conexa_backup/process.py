"""The only module that starts subprocesses.

Rules it enforces (principle 5):
- argument lists only, never a shell;
- secrets travel in the child's environment, never in argv; logged command lines are the argv
  alone, and environment values are never logged;
- stderr is drained by a thread into a bounded tail, so a chatty child never blocks on a full
  pipe and a failure can say what the child last wrote;
- a child is killed when the code driving it fails, so nothing is left running: each child
  leads its own process group and the whole group is killed, so the parallel workers of
  ``pg_dump -j``/``pg_restore -j`` go with it instead of finishing their table unseen;
- a child dies with the tool even when the tool is killed outright (Linux,
  :mod:`deathsig`): the code that starts a child reaps it before returning, so the thread
  that started it (whose end the kernel watches) always outlives it;
- the one exception: the API server's jobs (the CLI run in the background) outlive the call
  that starts them, by design; :func:`spawn_detached` starts one, :func:`poll_child` reaps it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from conexa_backup import deathsig, signals
from conexa_backup.errors import ProcessError

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 20


def format_argv(argv: Sequence[str]) -> str:
    """Quote ``argv`` for a log line (argv never holds secrets; see module docstring)."""
    return shlex.join(argv)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours plus ``extra`` (which may hold secrets)."""
    env = dict(os.environ)
    if extra:
        env.update(extra)
    return env


class _StderrTail:
    """Drain a pipe in a thread, keeping the last lines (and logging each at debug).

    With ``pattern``, every line it matches is also queued for :meth:`Running.matches`; a
    final ``None`` marks the end of the stream.
    """

    def __init__(self, stream: IO[bytes], name: str, pattern: re.Pattern[str] | None = None
                 ) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._pattern = pattern
        self.matches: queue.SimpleQueue[re.Match[str] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, args=(stream, name), daemon=True)
        signals.start(self._thread)

    def _drain(self, stream: IO[bytes], name: str) -> None:
        try:
            with stream:
                for raw in stream:
                    line = raw.decode("utf-8", "replace").rstrip()
                    if not line:
                        continue
                    self._lines.append(line)
                    log.debug("%s: %s", name, line)
                    found = self._pattern.search(line) if self._pattern else None
                    if found:
                        self.matches.put(found)
        finally:
            self.matches.put(None)

    def text(self) -> str:
        self._thread.join(timeout=5)
        return "\n".join(self._lines)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
    stdout_path: str | None = None,
) -> str:
    """Run ``argv`` to completion and return its stdout (empty when sent to ``stdout_path``).

    Raises:
        ProcessError: the program is missing or exited non-zero; the message carries the
            tail of its stderr.
    """
    label = what or os.path.basename(argv[0])
    log.info("running %s", format_argv(argv))
    with contextlib.ExitStack() as stack:
        out: IO[bytes] | int = subprocess.PIPE
        if stdout_path is not None:
            fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            out = stack.enter_context(os.fdopen(fd, "wb"))
        proc: subprocess.Popen[bytes] | None = None
        try:
            with signals.held():  # see _started
                proc = _popen(argv, env, label, out)
            stdout, stderr = proc.communicate()
        except BaseException:  # Ctrl-C, SIGTERM: take its workers down too
            if proc is not None:
                _kill_group(proc)
            raise
    if proc.returncode != 0:
        tail = "\n".join(stderr.decode("utf-8", "replace").splitlines()[-STDERR_TAIL_LINES:])
        raise ProcessError(
            f"{label} failed (exit {proc.returncode})", returncode=proc.returncode,
            stderr_tail=tail,
        )
    return (stdout or b"").decode("utf-8", "replace")


def _popen(argv: Sequence[str], env: Mapping[str, str] | None, label: str,
           stdout: IO[bytes] | int) -> subprocess.Popen[bytes]:
    """Start ``argv`` as the leader of its own process group (see :func:`_kill_group`), stderr
    piped, stdin closed, set to die with us (:mod:`deathsig`).

    Raises:
        ProcessError: the program is missing (or not executable).
    """
    environ = child_env(env)
    # Looked up here as Popen would (the child's PATH): the helper execs a path, and a missing
    # program must still fail here, before anything starts, with this message.
    program = shutil.which(argv[0], path=os.pathsep.join(os.get_exec_path(environ)))
    if program is None:
        raise ProcessError(f"{label} not found on PATH", returncode=None, stderr_tail="")
    try:
        return subprocess.Popen(
            deathsig.wrap(program, argv), env=environ, stdout=stdout, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, bufsize=0, process_group=0,
        )
    except FileNotFoundError as exc:  # removed since the look-up
        raise ProcessError(f"{label} not found on PATH", returncode=None,
                           stderr_tail="") from exc


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc``'s process group (it leads one: ``process_group=0``) and reap it.

    The group outlives its leader while workers remain, so this also runs after it exited."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Running:
    """A started child whose stdout the caller streams; see :func:`stream`."""

    def __init__(self, proc: subprocess.Popen[bytes], label: str, tail: _StderrTail) -> None:
        self.proc = proc
        self.label = label
        self._tail = tail

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def matches(self) -> Iterator[re.Match[str]]:
        """The child's stderr lines that match the ``pattern`` given to :func:`watch`, as
        they are written; ends when the child closes its stderr (normally: at exit)."""
        while (found := self._tail.matches.get()) is not None:
            yield found

    def wait_ok(self) -> None:
        """Wait for exit; raise :class:`ProcessError` (with stderr tail) unless it is 0."""
        code = self.proc.wait()
        if code != 0:
            raise ProcessError(
                f"{self.label} failed (exit {code})", returncode=code,
                stderr_tail=self._tail.text(),
            )


@contextlib.contextmanager
def stream(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, what: str | None = None
) -> Iterator[Running]:
    """Start ``argv`` with its stdout as a pipe for the caller to read.

    On leaving the block normally the caller must have called :meth:`Running.wait_ok`; if the
    block raises, the child is killed and reaped so that no process outlives the failure.

    Raises:
        ProcessError: the program is missing.
    """
    with _started(argv, env, what, subprocess.PIPE, None) as running:
        yield running


@contextlib.contextmanager
def watch(
    argv: Sequence[str], pattern: re.Pattern[str], *, env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> Iterator[Running]:
    """Start ``argv`` (stdout discarded) and follow its progress through :meth:`Running.matches`:
    the stderr lines that match ``pattern``. Same contract as :func:`stream` otherwise."""
    with _started(argv, env, what, subprocess.DEVNULL, pattern) as running:
        yield running


@contextlib.contextmanager
def _started(argv: Sequence[str], env: Mapping[str, str] | None, what: str | None,
             stdout: int, pattern: re.Pattern[str] | None) -> Iterator[Running]:
    label = what or os.path.basename(argv[0])
    log.info("running %s", format_argv(argv))
    proc: subprocess.Popen[bytes] | None = None
    try:
        # Started and watched, or not started: a signal in between would leave the child
        # running unseen (it is raised at the end of this block, where the except sees it).
        with signals.held():
            proc = _popen(argv, env, label, stdout)
            assert proc.stderr is not None
            tail = _StderrTail(proc.stderr, label, pattern)
        yield Running(proc, label, tail)
    except BaseException:
        if proc is not None:
            _kill_group(proc)
        raise
    finally:
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()


def spawn_detached(argv: Sequence[str], *, env: Mapping[str, str] | None, stdout_path: Path,
                   stderr_path: Path) -> int:
    """Start ``argv`` in the background and return its pid; nothing waits for it here.

    The child leads its own process group (so :func:`signal_group` reaches its workers too,
    and a Ctrl-C meant for us is not sent to it), its stdin is ``/dev/null`` and its stdout
    and stderr go to new files (0600). SIGINT/SIGTERM/SIGHUP are at their default and no
    signal is blocked in it, whatever our own threads do. The caller must reap it with
    :func:`poll_child`. ``posix_spawn`` rather than ``subprocess``: ``subprocess`` reaps
    children it has forgotten on its own, and would take their exit status from us.

    Raises:
        ProcessError: the program is missing or cannot be started.
    """
    log.info("starting in the background %s", format_argv(argv))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, str(stdout_path), flags, 0o600),
               (os.POSIX_SPAWN_OPEN, 2, str(stderr_path), flags, 0o600)]
    try:
        return os.posix_spawnp(
            argv[0], list(argv), child_env(env), file_actions=actions, setpgroup=0,
            setsigmask=(), setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
        )
    except OSError as exc:
        raise ProcessError(f"cannot start {os.path.basename(argv[0])}: {exc.strerror}",
                           returncode=None, stderr_tail="") from None


def poll_child(pid: int) -> int | None:
    """The exit code of our child ``pid`` if it has ended (reaping it), else None.

    Shell-style: a child killed by signal N gives 128 + N (143 for SIGTERM, 137 for an
    OOM kill). A pid that is not (or no longer) our child gives -1.
    """
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return -1
    if done == 0:
        return None
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def signal_group(pid: int, signum: int) -> bool:
    """Send ``signum`` to the process group led by ``pid``; False if it is gone."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return False
    return True


def start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22),
    or None if there is no such process or it has exited (a zombie not yet reaped): with the
    pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])
