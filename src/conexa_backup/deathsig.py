"""Children die with the tool, even when it is killed outright (SIGKILL, OOM killer).

Each child leads its own process group (:mod:`process`), so a SIGKILL of the tool's own group
does not reach it: before this, an orphaned ``pg_restore`` went on loading a throwaway
database for minutes with parent PID 1 (issue 20). On Linux every child therefore asks the
kernel, before it runs the program, for a signal when its parent goes
(``prctl(PR_SET_PDEATHSIG)``); it survives ``execve``. Elsewhere nothing changes.

Choices, and why:

- **An exec helper, not ``preexec_fn``.** ``prctl`` must run in the child between ``fork``
  and ``exec``. ``subprocess``'s ``preexec_fn`` runs Python there, in a copy of a process
  whose other threads (stderr drains, upload threads, row counters) may have held locks at
  the fork; Python documents it as unsafe with threads (a child may deadlock before exec).
  Instead the child execs a fresh interpreter (``python -I -S``: no site, no environment
  variables read, about 15 ms) that calls ``prctl`` and then execs the program: the same pid
  and process group, so killing the group works as before, and nothing of our threads' state
  is ever used in the child.
- **It checks that the parent is still the tool after ``prctl``.** Had the tool died between
  the fork and that call, the child would already belong to init and no signal would ever
  come: it then stops itself with the same signal instead of running the program.
- **SIGTERM, not SIGKILL.** The death signal is not passed on to a child's own children (a
  forked process starts with none). ``pg_dump -j`` and ``pg_restore -j`` fork their workers,
  and a SIGKILLed leader leaves each worker finishing the table it is on (measured: with
  SIGKILL, tests/test_children.py's restore left both ``pg_restore`` workers running). On
  SIGTERM (and SIGINT), these tools' own handler sends SIGTERM to every worker and a cancel
  request for the server's running query, then exits; before they connect, SIGTERM's
  default action ends them. The price: a program that ignored SIGTERM would outlive us; the
  only children are PostgreSQL's client tools (a ``bin_dir`` wrapper script should ``exec``
  the real tool: what the script itself starts gets no death signal). The group kill
  (SIGKILL) on every normal exit path stays as it was.
- **The forking thread must outlive its child.** The kernel sends the signal when the
  *thread* that forked the child ends, not the process. :mod:`process` guarantees this: a
  child is always reaped (or killed and reaped) before the call that started it returns
  (``run``, and the ``stream``/``watch`` blocks), so a thread can only end after its
  children; a child must never be handed to another thread to be waited on.
  :func:`process.spawn_detached` (the API server's jobs, which outlive the call on purpose)
  does not use this.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

DEATH_SIGNAL = signal.SIGTERM

# Run as ``python -I -S -c HELPER <parent pid> <signal> <program path> <argv...>``. Stdlib
# only (``-S``: no site-packages), and it must stay tiny: it runs before every child.
HELPER = """\
import ctypes, os, signal, sys
parent, signum, program = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, signum, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    sys.stderr.write("conexa-backup: prctl(PR_SET_PDEATHSIG) failed: "
                     + os.strerror(ctypes.get_errno()) + "\\n")
    os._exit(126)
if os.getppid() != parent:  # the tool died before prctl: no signal would ever come
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)
# Python ignores these at start-up, and an ignored signal stays ignored across exec
# (subprocess resets them for the child it starts; this exec comes after that).
for ignored in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(ignored, signal.SIG_DFL)
try:
    os.execv(program, sys.argv[4:])
except OSError as exc:
    sys.stderr.write("conexa-backup: cannot run " + program + ": " + str(exc.strerror) + "\\n")
    os._exit(127)
"""


# The interpreter running us, as the kernel knows it: ``sys.executable`` may name a path this
# user cannot execute (a venv whose python links into root's 0700 home, run by another user:
# the process runs, yet exec of that path is refused). Exec'ed in the forked child, this
# magic link is that very binary, reached without walking the path again.
INTERPRETER = "/proc/self/exe"


def supported() -> bool:
    """Whether children can be tied to us: Linux, with /proc (to run the helper)."""
    return sys.platform == "linux" and Path(INTERPRETER).exists()


def wrap(program: str, argv: Sequence[str], parent: int | None = None) -> list[str]:
    """The argv that runs ``argv`` (``program``: its resolved path) as a child of process
    ``parent`` (default: this one) that receives :data:`DEATH_SIGNAL` when the thread that
    starts it ends, or ``argv`` unchanged where that is not :func:`supported`.

    The program then sees ``argv`` exactly as given (its ``/proc/PID/cmdline`` too). A
    program that cannot be executed makes the child exit 127, saying why on stderr.
    """
    if not supported():
        return list(argv)
    return [INTERPRETER, "-I", "-S", "-c", HELPER,
            str(os.getpid() if parent is None else parent), str(int(DEATH_SIGNAL)), program,
            *argv]
