"""tarfile's extraction filters (PEP 706) on every Python 3.11, Debian 12's 3.11.2 included.

The filters came in 3.11.4 (``tarfile.data_filter``, ``extract(filter=...)``,
``TarInfo.replace``); Debian 12's own ``python3`` is 3.11.2 without them, and the README
installs into a venv made from it. Where the stdlib has them they are used; elsewhere the same
checks of the ``data`` filter are made here, so a member is refused alike on both.
"""

from __future__ import annotations

import copy
import os
import tarfile
from pathlib import Path
from typing import Any

NATIVE = hasattr(tarfile, "data_filter")


class FilterError(tarfile.TarError):
    """A member the ``data`` filter refuses (the stdlib's own class where it has one)."""


FILTER_ERRORS: tuple[type[Exception], ...] = (
    (tarfile.FilterError, FilterError) if NATIVE else (FilterError,))


def data_checks(member: tarfile.TarInfo, dest: str) -> None:
    """The refusals of the stdlib ``data`` filter: absolute or escaping names, device files
    and FIFOs, links that are absolute or point outside ``dest``.

    Raises:
        FilterError: saying which.
    """
    root = Path(dest).resolve()
    name = member.name
    if name.startswith(("/", os.sep)) or Path(name).is_absolute():
        raise FilterError(f"{name!r} is an absolute path")
    if not (root / name).resolve().is_relative_to(root):
        raise FilterError(f"{name!r} would be extracted outside the destination")
    if not (member.isreg() or member.islnk() or member.isdir() or member.issym()):
        raise FilterError(f"{name!r} is a special file")
    if member.islnk() or member.issym():
        if Path(member.linkname).is_absolute():
            raise FilterError(f"{name!r} is a link to an absolute path")
        # A symlink's target is relative to its folder, a hard link's to the archive's root.
        base = root / name if member.issym() else root / "-"
        if not (base.parent / member.linkname).resolve().is_relative_to(root):
            raise FilterError(f"{name!r} would link outside the destination")


def data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """``tarfile.data_filter`` where it exists, else :func:`data_checks` (member unchanged).

    Raises:
        One of :data:`FILTER_ERRORS`.
    """
    if NATIVE:
        return tarfile.data_filter(member, dest)
    data_checks(member, dest)
    return member


def replace(member: tarfile.TarInfo, **changes: Any) -> tarfile.TarInfo:
    """A shallow copy of ``member`` with ``changes`` (``TarInfo.replace(deep=False)``)."""
    if NATIVE:
        return member.replace(**changes, deep=False)
    new = copy.copy(member)
    for key, value in changes.items():
        setattr(new, key, value)
    return new


def extract(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str, *,
            set_attrs: bool = True) -> None:
    """Extract one member that our own checks passed, with no filter of the stdlib's on top."""
    if NATIVE:
        tar.extract(member, path, set_attrs=set_attrs, filter="fully_trusted")
    else:
        tar.extract(member, path, set_attrs=set_attrs)  # checked by the caller
