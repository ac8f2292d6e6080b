"""``conexa-backup`` sent a signal by itself at an exact point of storing an artifact.

Used by tests/test_interrupted_commit.py, run as ``python tests/signal_at.py --config FILE
backup`` (or ``restore ...``) with ``SIGNAL_AT=ARTIFACT:POINT:SIGNAL``, e.g.
``uploads.tar.zst:committed:SIGTERM``. ARTIFACT is the last part of the stored key (the
first upload whose key ends with ``/ARTIFACT`` is the one); POINT is

- ``first-target``: the first target has committed it (it is in place there), the others not
  yet;
- ``committed``: every live target has committed it, and the run has not yet seen it
  returned.

``SIGNAL_AT=prune:start:SIGNAL`` sends it as the prune after a complete backup begins on a
target (the backup is committed and kept).

With ``DELETE_FAILS=NAME``, every delete on the local target NAME fails (a target that went
away while the run cleaned up).

The signal is sent with ``os.kill`` to this process, as from outside, and taken by the
handler the run installed before the hook returns (a Python call follows it, and Python
runs pending handlers on entering a function), so it lands exactly there. The hook lives
here, not in the product: it wraps :meth:`MultiUpload.commit`, looked up at call time.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from conexa_backup.__main__ import main
from conexa_backup.actions import prune as prune_module
from conexa_backup.errors import StorageError
from conexa_backup.storage.base import ObjectInfo
from conexa_backup.storage.fanout import MultiUpload
from conexa_backup.storage.local import LocalTarget

ARTIFACT, POINT, SIGNAL = os.environ["SIGNAL_AT"].split(":")
assert POINT in ("first-target", "committed", "start"), POINT
_done = False


def _land() -> None:
    """Nothing: entering it is where Python runs the signal's handler."""


def _send() -> None:
    global _done
    _done = True
    sys.stderr.write(f"signal_at: {SIGNAL} at {ARTIFACT} {POINT}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.Signals[SIGNAL])
    _land()


_commit = MultiUpload.commit


def _commit_then_signal(self: MultiUpload) -> dict[str, ObjectInfo]:
    hit = not _done and self.key.endswith("/" + ARTIFACT)
    uploads: dict[str, Any] = self._uploads
    if hit and POINT == "first-target":
        first = next(iter(uploads.values()))
        inner = first.commit

        def first_then_signal() -> ObjectInfo:
            info: ObjectInfo = inner()
            _send()
            return info

        first.commit = first_then_signal
    stored = _commit(self)
    if hit and POINT == "committed":
        _send()
    return stored


MultiUpload.commit = _commit_then_signal  # type: ignore[method-assign]

_prune_target = prune_module.prune_target


def _signal_then_prune(*args: Any, **kwargs: Any) -> Any:
    if ARTIFACT == "prune" and not _done:
        _send()
    return _prune_target(*args, **kwargs)


prune_module.prune_target = _signal_then_prune

_delete = LocalTarget.delete
DELETE_FAILS = os.environ.get("DELETE_FAILS")


def _delete_or_fail(self: LocalTarget, key: str) -> None:
    if self.name == DELETE_FAILS:
        raise StorageError(self.name, f"cannot delete {key}: injected failure")
    _delete(self, key)


LocalTarget.delete = _delete_or_fail  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "conexa-backup"
    main()
