"""Names for our scratch files that say who made them, so leftovers of killed runs can be found.

A run killed outright (SIGKILL, the OOM killer, a power cut) runs no clean-up: its staging dump,
drill folder or a target's half-written ``.tmp-*`` file stays behind. Every such name carries
``.<pid>@<host>``; a later run removes it as soon as that process is gone. Names made on other
hosts (a shared backup folder) or by a process that still exists are left alone: only age
(:data:`conexa_backup.state.STALE_AFTER_SECONDS`) removes those, so a live run's scratch is never
touched. A recycled pid only delays the clean-up.
"""

from __future__ import annotations

import os
import re
import socket

_OWNER = re.compile(r"\.(\d+)@([^/]+)$")


def scratch_name(stem: str) -> str:
    """``stem`` tagged with this process and host: ``<stem>.<pid>@<host>``."""
    return f"{stem}.{os.getpid()}@{socket.gethostname()}"


def abandoned(name: str) -> bool:
    """Whether ``name`` (from :func:`scratch_name`) was made on this host by a process that no
    longer exists. Untagged names, other hosts' and live processes' are never abandoned."""
    found = _OWNER.search(name)
    if found is None or found[2] != socket.gethostname():
        return False
    pid = int(found[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists but belongs to another user
        return False
    return False
