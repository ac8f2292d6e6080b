"""Restoring uploads: extracted beside the destination, checked, then swapped in.

The archive is extracted into a hidden sibling folder (same file system, so the swap is a
rename), its file count and bytes are compared with the manifest, and only then does it take
the destination's place; a live folder is kept under a ``.before-restore-<time>`` name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from conexa_backup import archive
from conexa_backup.actions import restore_packs, uploads_index
from conexa_backup.actions.fetch import from_first_good, local_writes, read_plain
from conexa_backup.catalog import Backup, Copy
from conexa_backup.errors import ConexaError, UnusableCopyError, UsageError
from conexa_backup.manifest import Manifest
from conexa_backup.scratch import scratch_name

if TYPE_CHECKING:
    from conexa_backup.actions.context import Context

log = logging.getLogger(__name__)


def staging_path(dest: Path, backup_id: str) -> Path:
    """Where the uploads of ``backup_id`` are extracted before the swap: a hidden sibling of
    ``dest`` named for this process, ``.<dest>.restoring-<id>.<pid>@<where>`` (see
    :mod:`conexa_backup.scratch`), recorded by the restore before it exists
    (:mod:`leftovers`)."""
    return dest.parent / scratch_name(f".{dest.name}.restoring-{backup_id}")


def _legacy_staging_path(dest: Path, backup_id: str) -> Path:
    """The name versions before leftovers records used (no owner in it)."""
    return dest.parent / f".{dest.name}.restoring-{backup_id}"


def has_uploads(manifest: Manifest) -> bool:
    """Whether the backup holds uploads: a tar-format one its ``uploads`` archive, a
    packs-format one its uploads index (the blobs are in the target's packs)."""
    if manifest.uploads is None:
        return False
    kind = "uploads-index" if manifest.uploads.format == "packs" else "uploads"
    return manifest.artifact(kind) is not None


def extract(ctx: Context, backup: Backup, dest: Path, source: str | None,
            fallbacks: list[str] | None = None,
            read_from: dict[str, str] | None = None) -> Path:
    """Extract the uploads of the first good copy next to ``dest``; return the folder.
    ``read_from`` gets what was read (the archive's name; a packs backup's index and
    ``packs/``) -> the target it was read from.

    A tar-format backup is its ``uploads`` archive; a packs-format one its uploads index
    and the blobs in the copy's target's packs (:mod:`restore_packs`). Copies skipped as
    damaged (or lacking blobs) are reported in ``fallbacks`` (see ``from_first_good``).

    Raises:
        IntegrityError: every copy is damaged or missing.
        UnusableCopyError: no copy could be used, some being intact: the archive (or index)
        tries to write outside its folder or through a link, or extracts to other counts
        than its manifest recorded, or cannot be decrypted here.
    """
    staging = staging_path(dest, backup.id)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConexaError(f"cannot create {dest.parent}: {exc.strerror}") from None

    def attempt(copy: Copy, manifest: Manifest) -> Path:
        expected = manifest.uploads
        assert expected is not None
        remove_tree(staging)  # what this run's attempt on a copy before this one left
        # An older version's leftover: restores hold the run lock, drills extract into a
        # folder of their own.
        remove_tree(_legacy_staging_path(dest, backup.id))
        got: uploads_index.Counts | archive.TreeStats
        try:
            with local_writes(dest.parent):
                if expected.format == "packs":
                    got = restore_packs.extract_copy(ctx, backup, copy, manifest, staging)
                else:
                    artifact = manifest.artifact("uploads")
                    assert artifact is not None
                    got = read_plain(copy, backup.id, artifact,
                                     lambda plain: archive.extract_stream(plain, staging),
                                     ctx.keys())
            counts = (got.files, got.bytes, got.symlinks)
            if counts != (expected.files, expected.bytes, expected.symlinks):
                # The stored bytes were verified: not a damaged copy, so no "no good copy".
                raise UnusableCopyError(
                    f"uploads from {copy.target.name!r} (intact) extract to {counts[0]} files"
                    f" / {counts[1]} bytes / {counts[2]} symlinks, manifest says "
                    f"{expected.files} / {expected.bytes} / {expected.symlinks}")
        except BaseException:
            remove_tree(staging)
            raise
        if read_from is not None:
            packs = expected.format == "packs"
            read = manifest.artifact("uploads-index" if packs else "uploads")
            assert read is not None
            read_from.update({read.name: copy.target.name,
                              **({"packs/": copy.target.name} if packs else {})})
        return staging

    return from_first_good(backup, attempt, prefer=source, fallbacks=fallbacks)


def remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def swap_in(staging: Path, dest: Path, keep_as: Path) -> Path | None:
    """Put ``staging`` at ``dest``; the previous ``dest`` (if any) moves to ``keep_as``.

    Uses an atomic exchange where the kernel offers one, so ``dest`` never disappears. On
    failure it undoes itself: ``dest`` is the live tree again and ``staging`` the restored one.
    Returns where the previous folder is kept, or None if there was none.
    """
    if keep_as.exists():
        raise UsageError(f"{keep_as} already exists; cannot keep the old uploads there")
    try:
        if not dest.exists() and not dest.is_symlink():
            staging.rename(dest)
            return None
        if _renameat2_exchange(staging, dest):
            try:
                staging.rename(keep_as)  # staging now holds the old tree
            except OSError:
                _renameat2_exchange(staging, dest)  # put the live tree back, then say why
                raise
        else:
            dest.rename(keep_as)
            try:
                staging.rename(dest)
            except OSError:
                keep_as.rename(dest)
                raise
    except OSError as exc:
        raise ConexaError(f"cannot swap in restored uploads at {dest}: {exc.strerror}") from None
    return keep_as


def check_destination(dest: Path) -> None:
    """``--uploads-to`` must be a new or empty folder: we never merge into existing files."""
    if dest.is_symlink() or dest.is_file():
        raise UsageError(f"--uploads-to {dest}: exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        raise UsageError(f"--uploads-to {dest}: folder is not empty")
