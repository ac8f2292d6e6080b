"""``conexa-backup`` killed with SIGKILL at the N-th step of prune's garbage collection.

Used by tests/test_gc.py, run as ``python tests/gc_killer.py --config FILE prune``: with
``GC_KILL_AT=N`` the process kills itself (SIGKILL: no clean-up, no finally) just before or
just after the N-th call, counted in order, of the functions where GC changes a target or the
cache (``gc.upload_pack``, ``gc.delete_pack``, ``BlobIndex.add_pack``, ``drop_held``,
``write_refs``, ``forget_refs``). Each step's name goes to stderr (``step N: ...``), so a
test can say where it killed. The hook lives here, not in the product: the wrapped names are
module attributes the product looks up at call time.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from conexa_backup.__main__ import main
from conexa_backup.actions import gc
from conexa_backup.blobindex import BlobIndex

KILL_AT = int(os.environ.get("GC_KILL_AT", "0"))
_count = 0


def _step(what: str) -> None:
    global _count
    _count += 1
    sys.stderr.write(f"step {_count}: {what}\n")
    sys.stderr.flush()
    if _count == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)


def _around(owner: Any, name: str) -> None:
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _step(f"before {name}")
        result = inner(*args, **kwargs)
        _step(f"after {name}")
        return result

    setattr(owner, name, wrapped)


for _owner, _name in [(gc, "upload_pack"), (gc, "delete_pack"), (BlobIndex, "add_pack"),
                      (BlobIndex, "drop_held"), (BlobIndex, "write_refs"),
                      (BlobIndex, "forget_refs")]:
    _around(_owner, _name)

if __name__ == "__main__":
    sys.argv[0] = "conexa-backup"
    main()
