"""SIGINT and SIGTERM: a run stops the way it stops on an error, and exits 130 or 143.

The handler raises :class:`Interrupted` in the main thread, so every ``finally`` runs and
partial files, children and throwaway databases are removed on the way out. Python raises
it between any two bytecodes, so code that must not be cut there runs inside :func:`held`
(see there: ``threading``'s locks). Two places would lose the exception, and the run would
carry on to its end as if no signal had come (on a large database: minutes):

- code that cannot propagate it: a ``__del__``, a weakref or gc callback, where Python prints
  "Exception ignored" and moves on. :func:`install` hooks ``sys.unraisablehook`` so that a
  lost :class:`Interrupted` is raised again at the next place that can propagate it;
- import-time machinery (class creation, pydantic's descriptors) that wraps it in another
  error: ``__main__`` imports the program inside :func:`held`.

A signal during start-up thus ends the run like one later: one ``error: interrupted`` line
and 128 + the signal's number, what shells and cron wrappers expect.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from conexa_backup.errors import ExitCode

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by :func:`install`'s handler; ``args[0]`` is the signal's
    name (``"SIGTERM"``), so code catching ``KeyboardInterrupt`` sees it as Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held = 0  # depth of held() blocks in the main thread
_pending: int | None = None  # a signal that came inside one


def _raise(signum: int, frame: object) -> None:
    global _pending
    if _held:
        _pending = signum  # raised as the held() block ends
        return
    # Raised now, it supersedes one still held: a second signal landing just as held()
    # leaves its block (after ``_held -= 1``, before the check) must not leave the first
    # behind, to be raised by the next held() block, in the middle of the cleanup.
    _pending = None
    raise Interrupted(signum)


RAISE_AGAIN_AFTER = 0.05  # seconds: long enough for the code that swallowed it to return


def _unraisable(info: Any) -> None:
    """Raise a lost :class:`Interrupted` again once the code that swallowed it has returned.

    Any Python code run here would meet the signal at once and lose it again, so another
    thread marks it as arrived a moment later (``interrupt_main``); the main thread then
    calls the handler at its next check. Lost again, it comes back here: it is never dropped.
    """
    if isinstance(info.exc_value, Interrupted):
        again = threading.Timer(RAISE_AGAIN_AFTER, _thread.interrupt_main,
                                (info.exc_value.signum,))
        again.daemon = True
        again.start()
        return
    _previous_hook(info)


_previous_hook = sys.unraisablehook


def install() -> None:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` in the main thread, and never let
    one be lost (see the module docstring). Main thread only (Python's rule for handlers)."""
    global _previous_hook
    for sig in HANDLED:
        signal.signal(sig, _raise)
    # Blocked by whoever started us, they would never stop the run (nor be seen to).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    if sys.unraisablehook is not _unraisable:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Raise a SIGINT/SIGTERM that arrives inside the block only as the block ends.

    Unlike blocking the signal (``pthread_sigmask``), this holds it whichever thread the
    kernel hands it to. Used for the main thread's calls into ``threading`` (a queue's
    ``put``, ``Thread.start``): ``Condition.wait`` interrupted while it takes its lock back
    leaves that lock released although another thread holds it; the queue then loses a
    wake-up, its consumer waits forever and so does the run that joins it (seen: a SIGTERM
    half a second into a backup, the process still there minutes later). Also for "start
    something, then enter the ``try`` that stops it" steps. Blocks held must end by
    themselves soon (a ``put`` with a timeout). Elsewhere than in the main thread, does
    nothing.
    """
    global _held, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


def start(thread: threading.Thread) -> None:
    """``thread.start()`` (which waits on a Condition) inside :func:`held`."""
    with held():
        thread.start()


def exit_code(exc: KeyboardInterrupt) -> ExitCode:
    """143 for SIGTERM, 130 for SIGINT and for a plain ``KeyboardInterrupt`` (what Python's
    own Ctrl-C handler raises)."""
    if isinstance(exc, Interrupted) and exc.signum == signal.SIGTERM:
        return ExitCode.TERMINATED
    return ExitCode.INTERRUPTED
