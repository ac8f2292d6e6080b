"""The uploads folder as a tar stream, and its safe extraction.

Archives are POSIX pax tar (GNU tar, bsdtar and Python read them): symlinks are stored as
links, never followed; permissions, owners, mtimes, empty folders and non-ASCII names are kept.
Extraction refuses anything that would land outside the destination (absolute paths, ``..``,
links pointing out) and device files, using the stdlib's ``data`` filter for the checks while
keeping modes and owners (which that filter would discard).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from conexa_backup import tarcompat
from conexa_backup.errors import ConexaError, IntegrityError, UnsafeArchiveError
from conexa_backup.pipeline import CHUNK, Gather, Sink

log = logging.getLogger(__name__)


@dataclass
class TreeStats:
    """What an archive holds: regular files and their bytes, folders, links."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0


FileHook = Callable[[str, int, str], None]  # (archive path, size, sha256 hex)


class _PaddedFile:
    """Reads exactly ``size`` bytes: zeros if the file shrank while we read it (like GNU tar).

    Hashes what it returns, so the uploads index records exactly what the archive holds.
    """

    def __init__(self, raw: BinaryIO, size: int, path: str) -> None:
        self._raw = raw
        self._left = size
        self._path = path
        self.shrank = False
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._raw.read(n)
        if len(data) < n:
            if not self.shrank:
                log.warning("%s: file shrank while being read; padded with zeros", self._path)
            self.shrank = True
            data += b"\0" * (n - len(data))
        self._left -= len(data)
        self.sha256.update(data)
        return data


def write_tree(root: Path, out: Sink, on_file: FileHook | None = None) -> TreeStats:
    """Write the tree under ``root`` as a tar stream to ``out``; return what it held.

    ``on_file`` is called for every regular file stored, with its SHA-256. Files that vanish
    while the tree is walked are skipped (the uploads folder is live).

    Raises:
        ConexaError: ``root`` is missing or not a folder, or something in it is unreadable.
    """
    if not root.is_dir():
        raise ConexaError(f"uploads folder {root} does not exist or is not a folder")
    stats = TreeStats()
    with tar_writer(out, root) as tar:
        _add_dir(tar, root, ".", stats, on_file)
    return stats


class _TarOut(Gather):
    """What tarfile writes to: :class:`~conexa_backup.pipeline.Gather` with the ``tell()``
    tarfile's "w" mode needs.

    Not tarfile's stream mode ("w|"): it buffers with ``bytes +=``, copying its whole buffer on
    every write, which made each small file cost ~0.4 ms (20,000 files: 8.4 s; measured).
    """

    def tell(self) -> int:
        return self.written


class _ForgetfulTarFile(tarfile.TarFile):
    """Keeps nothing per file written. TarFile keeps every TarInfo (~1 KB a file: 100,000
    small files cost 100 MB; measured) and every file's inode, to write later hard links as
    links; we store those as content (see :func:`write_tree`), so it need not remember."""

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: Any = None) -> None:
        super().addfile(tarinfo, fileobj)
        self.members.clear()  # type: ignore[attr-defined]  # undocumented, not in the stubs
        self.inodes.clear()  # type: ignore[attr-defined]


@contextlib.contextmanager
def tar_writer(out: Sink, root: Path) -> Iterator[tarfile.TarFile]:
    """A pax tar stream to ``out`` whose first member is ``root`` itself, as ``.`` (its mode
    and mtime); leaving the block normally writes the end-of-archive blocks and flushes."""
    buffered = _TarOut(out)
    # On an exception TarFile's __exit__ writes nothing more: the caller discards the stream.
    with _ForgetfulTarFile(fileobj=buffered, mode="w",  # type: ignore[arg-type]  # write+tell
                           format=tarfile.PAX_FORMAT) as tar:
        tar.copybufsize = CHUNK  # type: ignore[attr-defined]  # not in the stubs; addfile reads it
        tar.addfile(tar.gettarinfo(str(root), arcname="."))
        yield tar
    buffered.flush()


def move_file(tar: tarfile.TarFile, path: Path, *, only_if_closed: bool = False) -> bool:
    """Store the regular file ``path`` under its name, then delete it.

    With ``only_if_closed``, first prove that no process has it open for writing: the kernel
    grants a read lease only then (Linux). When that cannot be proved (a writer, or a file
    system without leases), nothing is done: the caller keeps the file for later.

    Returns False (and stores nothing) when ``path`` does not exist, is not a regular file, or
    may still be written.

    Raises:
        ConexaError: it cannot be read.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):  # never open a FIFO or follow a link
            return False
        with open(path, "rb") as fh:
            if only_if_closed and not _no_writers(fh.fileno()):
                return False
            # Sized from the open file, after the lease: what we store is what it holds.
            info = tar.gettarinfo(arcname=path.name, fileobj=fh)
            tar.addfile(info, fh)
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ConexaError(f"cannot read {path}: {exc.strerror}") from None
    return True


def _no_writers(fd: int) -> bool:
    """Whether no process has ``fd``'s file open for writing, proved by taking a read lease
    (held until ``fd`` is closed; a writer opening it meanwhile would wait for us)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EAGAIN: open for writing somewhere; anything else: cannot tell
        return False
    return True


def _add_dir(tar: tarfile.TarFile, root: Path, rel: str, stats: TreeStats,
             on_file: FileHook | None) -> None:
    path = root if rel == "." else root / rel
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConexaError(f"cannot read uploads folder {path}: {exc.strerror}") from None
    for name in names:
        child_rel = name if rel == "." else f"{rel}/{name}"
        child = root / child_rel
        try:
            info = tar.gettarinfo(str(child), arcname=child_rel)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConexaError(f"cannot read {child}: {exc.strerror}") from None
        if info.isreg() or info.islnk():  # a second hard link is stored as content
            _add_file(tar, child, info, stats, on_file)
        elif info.isdir():
            tar.addfile(info)
            stats.dirs += 1
            _add_dir(tar, root, child_rel, stats, on_file)
        elif info.issym():
            tar.addfile(info)
            stats.symlinks += 1
        else:
            log.warning("%s: not a regular file, folder or symlink; skipped", child)


def _add_file(tar: tarfile.TarFile, path: Path, info: tarfile.TarInfo, stats: TreeStats,
              on_file: FileHook | None) -> None:
    if info.islnk():  # gettarinfo reports a second hard link as a link: store the content
        info.type = tarfile.REGTYPE
        info.linkname = ""
        info.size = path.stat().st_size
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConexaError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        padded = _PaddedFile(fh, info.size, str(path))
        tar.addfile(info, padded)
    stats.files += 1
    stats.bytes += info.size
    if on_file is not None:
        on_file(info.name, info.size, padded.sha256.hexdigest())


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Refuse hazards (stdlib ``data`` filter), keep mode bits (minus set-id) and owners."""
    try:
        checked = tarcompat.data_filter(member, dest)
    except tarcompat.FILTER_ERRORS as exc:
        raise UnsafeArchiveError(f"refusing archive member {member.name!r}: {exc}") from None
    if checked.name != member.name:  # the filter stripped a leading "/": never ours to write
        raise UnsafeArchiveError(f"refusing archive member {member.name!r}: absolute path")
    if member.mode is not None:
        member = tarcompat.replace(member,
                                   mode=member.mode & 0o1777 & ~(stat.S_ISUID | stat.S_ISGID))
    return member


def extract_stream(stream: IO[bytes], dest: Path) -> TreeStats:
    """Extract a tar stream into the (new, empty) folder ``dest``; return what it held.

    Raises:
        UnsafeArchiveError: a member would escape ``dest`` or is a device file.
        IntegrityError/ConexaError: the stream is not a valid tar archive.
    """
    dest.mkdir(mode=0o700, parents=False, exist_ok=True)
    stats = TreeStats()
    dest_str = str(dest.resolve())

    def count(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        safe = _safe_member(member, path)
        if safe.isreg():
            stats.files += 1
            stats.bytes += safe.size
        elif safe.isdir() and safe.name not in (".", "./"):
            stats.dirs += 1
        elif safe.issym():
            stats.symlinks += 1
        return safe

    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
            _extract_all(tar, dest_str, count)
    except tarfile.TarError as exc:
        raise IntegrityError(f"uploads archive is damaged: {exc}") from None
    return stats


def _extract_all(tar: tarfile.TarFile, dest: str,
                 check: Callable[[tarfile.TarInfo, str], tarfile.TarInfo]) -> None:
    """``extractall`` with ``check`` as the filter, on every Python 3.11 (see tarcompat).

    As ``extractall`` does, folders get their mode and times last, deepest first, so writing
    into them neither fails nor changes their times.
    """
    folders: list[tarfile.TarInfo] = []
    for member in tar:
        safe = check(member, dest)
        tarcompat.extract(tar, safe, dest, set_attrs=not safe.isdir())
        if safe.isdir():
            folders.append(safe)
    for folder in sorted(folders, key=lambda m: m.name, reverse=True):
        path = str(Path(dest, folder.name))
        tar.chown(folder, path, numeric_owner=False)
        tar.utime(folder, path)
        tar.chmod(folder, path)


def scan_tree(root: Path) -> TreeStats:
    """Count what :func:`write_tree` would archive (without reading contents)."""
    stats = TreeStats()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            if Path(dirpath, name).is_symlink():
                stats.symlinks += 1
                dirnames.remove(name)
            else:
                stats.dirs += 1
        for name in filenames:
            st = os.lstat(Path(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                stats.files += 1
                stats.bytes += st.st_size
            elif stat.S_ISLNK(st.st_mode):
                stats.symlinks += 1
    return stats
