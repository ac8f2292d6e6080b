"""Names for our scratch files that say who made them, so leftovers of killed runs can be found.

A run killed outright (SIGKILL, the OOM killer, a power cut) runs no clean-up: its staging dump,
drill folder or a target's half-written ``.tmp-*`` file stays behind. Every such name carries
``.<pid>@<where>``, where ``<where>`` is the host name, its boot and the pid namespace: a pid
means something only within all three (containers sharing a host name, a cloned VM, a backup
folder shared over NFS). A later run removes the name as soon as that process is gone. Names
made anywhere else, or by a process that still exists, are left alone: only age
(:data:`STALE_AFTER_SECONDS`) removes those, so a live run's scratch is
never touched. A recycled pid only delays the clean-up.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path

_OWNER = re.compile(r"\.(\d+)@([^/@]+)$")
STALE_AFTER_SECONDS = 24 * 3600  # no run of ours lasts a day


def stale(path: Path, now: float) -> bool:
    """Whether ``path`` is scratch of a run killed outright: :func:`abandoned`, or older than
    :data:`STALE_AFTER_SECONDS` whoever made it.

    Raises:
        OSError: it cannot be examined.
    """
    return abandoned(path.name) or now - path.lstat().st_mtime > STALE_AFTER_SECONDS


@functools.cache
def _where() -> str:
    """``<host>+<boot>.<pid namespace>``; ``<host>+`` where that cannot be read (never judged)."""
    host = socket.gethostname()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        pidns = Path("/proc/self/ns/pid").stat().st_ino
    except OSError:
        return f"{host}+"
    return f"{host}+{boot.split('-')[0]}.{pidns:x}"


def scratch_name(stem: str) -> str:
    """``stem`` tagged with this process and where it runs: ``<stem>.<pid>@<where>``."""
    return f"{stem}.{os.getpid()}@{_where()}"


def abandoned(name: str) -> bool:
    """Whether ``name`` (from :func:`scratch_name`) was made here (same host, boot and pid
    namespace) by a process that no longer exists. Untagged names, names made elsewhere and
    live processes' are never abandoned."""
    found = _OWNER.search(name)
    if found is None or found[2] != _where() or _where().endswith("+"):
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
