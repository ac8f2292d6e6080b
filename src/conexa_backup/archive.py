"""The uploads folder as a tar stream, and its safe extraction.

Archives are POSIX pax tar (GNU tar, bsdtar and Python read them): symlinks are stored as
links, never followed (only the uploads folder itself may be a link to it: its root is the
folder); permissions, owners, mtimes, empty folders and names are kept (non-ASCII and even
non-UTF-8 ones, byte for byte). Files are opened without following a link or waiting on a
FIFO swapped in meanwhile, and every header is taken where the walk is (relative to the open
folder, or from the open file). The walk keeps an explicit stack: depth is bounded by a limit
under the open-file limit, not by Python's recursion limit. What cannot be read, what lies
past that limit, and kinds a restore would refuse (:func:`unrestorable`), are skipped and
recorded, never fatal.
Extraction recreates every symlink exactly as stored (absolute, leaving the tree,
dangling), after every file and folder, and refuses anything that would
write outside the destination or through a link (absolute or ``..`` names, a path through a
link, hard links to outside) and device files, using the stdlib's ``data`` filter for files
and folders while keeping modes and owners (which that filter would discard).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import hashlib
import logging
import os
import pwd
import resource
import secrets
import stat
import tarfile
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from conexa_backup import tarcompat
from conexa_backup.errors import ConexaError, IntegrityError, UnsafeArchiveError
from conexa_backup.manifest import IndexEntry, shown_path
from conexa_backup.pipeline import CHUNK, Gather, Sink

log = logging.getLogger(__name__)


SKIPPED_LISTED = 100  # skipped paths named in the manifest; the rest are only counted


@dataclass
class Skipped:
    """Entries not stored: how many, and the first :data:`SKIPPED_LISTED` with the reason."""

    count: int = 0
    listed: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str, why: str) -> None:
        """Count ``path``; name the first ones, printably (a name that is not UTF-8 with
        ``\\xe9`` escapes: the manifest is JSON text)."""
        self.count += 1
        if len(self.listed) < SKIPPED_LISTED:
            self.listed.append((shown_path(path), why))
            log.warning("uploads: %s: %s; skipped", shown_path(path), why)


@dataclass
class TreeStats:
    """What an archive holds: regular files and their bytes, folders, links; and what the
    walk skipped."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0
    skipped: Skipped = field(default_factory=Skipped)


EntryHook = Callable[[IndexEntry], None]  # each file (with its SHA-256) and symlink stored


class _PaddedFile:
    """Reads exactly ``left`` bytes of the open file ``fd``: zeros if the file shrank while we
    read it (like GNU tar).

    Hashes what it returns, so the uploads index records exactly what the archive holds.
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name
        self.left = 0  # bytes still to return: set from the header
        self.shrank = False
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = os.read(self._fd, n)
        while 0 < len(data) < n:  # a short read is not the end (network file systems)
            more = os.read(self._fd, n - len(data))
            if not more:
                break
            data += more
        if len(data) < n:
            if not self.shrank:
                log.warning("%s: file shrank while being read; padded with zeros",
                            shown_path(self.name))
            self.shrank = True
            data += b"\0" * (n - len(data))
        self.left -= len(data)
        self.sha256.update(data)
        return data


def write_tree(root: Path, out: Sink, on_entry: EntryHook | None = None) -> TreeStats:
    """Write the tree under ``root`` as a tar stream to ``out``; return what it held.

    ``on_entry`` is called for every regular file (with its SHA-256) and symlink stored.
    Entries that vanish while the tree is walked are left out (the uploads folder is live);
    entries that cannot be opened or listed, and kinds :func:`unrestorable` refuses, are
    skipped and counted in ``stats.skipped``.

    Raises:
        ConexaError: ``root`` is missing, not a folder or cannot be listed, or a file failed
        while being read.
    """
    if not root.is_dir():
        raise ConexaError(f"uploads folder {root} does not exist or is not a folder")
    stats = TreeStats()
    with tar_writer(out, root) as tar, contextlib.closing(walk(root, stats.skipped)) as entries:
        for entry in entries:
            _add_entry(tar, entry, stats, on_entry)
    return stats


PROBE_SAMPLE = 100_000  # files `check` opens at most: a random sample on larger trees


@dataclass
class Probe:
    """What :func:`probe_tree` found: regular files, how many it opened, what a backup would
    skip."""

    files: int = 0
    tried: int = 0  # files it tried to open: all of them, or the sample
    skipped: Skipped = field(default_factory=Skipped)


def probe_tree(root: Path, sample: int = PROBE_SAMPLE) -> Probe:
    """Do what :func:`write_tree` does without storing anything: list every folder, examine
    every entry, and open every regular file (on trees of more than ``sample`` files, a
    uniform random sample of ``sample`` of them). What a backup would skip is recorded.

    Raises:
        ConexaError: ``root`` is missing, not a folder or cannot be listed.
    """
    if not root.is_dir():
        raise ConexaError(f"uploads folder {root} does not exist or is not a folder")
    probe = Probe()
    chosen: list[str] = []
    with contextlib.closing(walk(root, probe.skipped)) as entries:
        for entry in entries:
            if entry.kind != stat.S_IFREG:
                continue
            probe.files += 1
            if len(chosen) < sample:
                chosen.append(entry.rel)
            elif (slot := secrets.randbelow(probe.files)) < sample:  # reservoir sampling
                chosen[slot] = entry.rel
    for rel in chosen:
        probe.tried += 1
        try:
            os.close(open_file(root / rel)[0])
        except FileNotFoundError:
            continue
        except Replaced as exc:
            probe.skipped.add(rel, f"replaced while being examined: now {exc}")
        except OSError as exc:
            probe.skipped.add(rel, f"cannot read: {exc.strerror}")
    return probe


class _TarOut(Gather):
    """What tarfile writes to: :class:`~conexa_backup.pipeline.Gather` with the ``tell()``
    tarfile's "w" mode needs.

    Not tarfile's stream mode ("w|"): it buffers with ``bytes +=``, copying its whole buffer on
    every write, which made each small file cost ~0.4 ms (20,000 files: 8.4 s; measured).
    """

    def tell(self) -> int:
        return self.written


_TAR_TYPES = {stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE,
              stat.S_IFLNK: tarfile.SYMTYPE}


class _ForgetfulTarFile(tarfile.TarFile):
    """Keeps nothing per file written. TarFile keeps every TarInfo (~1 KB a file: 100,000
    small files cost 100 MB; measured) and every file's inode, to write later hard links as
    links; we store those as content (see :func:`write_tree`), so it need not remember.

    Makes headers from a stat already taken (:meth:`header`), with owner names looked up once
    per archive and owner: ``gettarinfo`` stats by path again and re-reads /etc/passwd and
    /etc/group for every entry (~31 µs a file).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unames: dict[int, str] = {}
        self._gnames: dict[int, str] = {}

    def header(self, name: str, st: os.stat_result, linkname: str = "") -> tarfile.TarInfo:
        """The header ``gettarinfo`` would make for a file, folder or symlink (``linkname``
        its target) with the lstat ``st``, named ``name``: same type, mode, owners, size and
        mtime; a regular file is never a hard link (we store content, see above)."""
        info = self.tarinfo(name)
        info.type = _TAR_TYPES[stat.S_IFMT(st.st_mode)]
        info.mode = st.st_mode
        info.uid, info.gid = st.st_uid, st.st_gid
        info.size = st.st_size if info.type == tarfile.REGTYPE else 0
        info.mtime = st.st_mtime
        info.linkname = linkname
        info.uname = _cached(self._unames, st.st_uid, lambda uid: pwd.getpwuid(uid).pw_name)
        info.gname = _cached(self._gnames, st.st_gid, lambda gid: grp.getgrgid(gid).gr_name)
        return info

    def addfile(self, tarinfo: tarfile.TarInfo, fileobj: Any = None) -> None:
        super().addfile(tarinfo, fileobj)
        self.members.clear()  # type: ignore[attr-defined]  # undocumented, not in the stubs
        self.inodes.clear()  # type: ignore[attr-defined]


@contextlib.contextmanager
def tar_writer(out: Sink, root: Path) -> Iterator[_ForgetfulTarFile]:
    """A pax tar stream to ``out`` whose first member is ``root`` itself, as ``.`` (its mode
    and mtime); leaving the block normally writes the end-of-archive blocks and flushes."""
    buffered = _TarOut(out)
    # On an exception TarFile's __exit__ writes nothing more: the caller discards the stream.
    with _ForgetfulTarFile(fileobj=buffered, mode="w",  # our __init__ takes Any: write+tell
                           format=tarfile.PAX_FORMAT) as tar:
        tar.copybufsize = CHUNK  # type: ignore[attr-defined]  # not in the stubs; addfile reads it
        tar.addfile(_root_info(tar, root))
        yield tar
    buffered.flush()


def _root_info(tar: tarfile.TarFile, root: Path) -> tarfile.TarInfo:
    """``root`` as the member ``.``, from the folder itself: a root that is a link (an uploads
    path linked to the real folder, ``/var/www/app/uploads -> /srv/uploads``) is followed, as
    its listing is; only links below it are stored as links. A restore needs a folder there."""
    tar.dereference = True
    try:
        return tar.gettarinfo(str(root), arcname=".")
    finally:
        tar.dereference = False


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


def _cached(names: dict[int, str], key: int, lookup: Callable[[int], str]) -> str:
    """``names[key]``, looked up once; "" (as ``gettarinfo`` leaves it) for an unknown id."""
    name = names.get(key)
    if name is None:
        try:
            name = lookup(key)
        except KeyError:
            name = ""
        names[key] = name
    return name


def _no_writers(fd: int) -> bool:
    """Whether no process has ``fd``'s file open for writing, proved by taking a read lease
    (held until ``fd`` is closed; a writer opening it meanwhile would wait for us)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EAGAIN: open for writing somewhere; anything else: cannot tell
        return False
    return True


def unrestorable(file_type: int) -> str | None:
    """Why an entry of ``file_type`` (``stat.S_IFMT`` bits) cannot be restored, or None.

    The one rule both directions follow: :func:`write_tree` skips (and reports) exactly what
    this refuses, and extraction refuses the same, so whatever a backup stores restores.
    Files, folders and symlinks (any target: links are data, never followed) are restored;
    device nodes, FIFOs and sockets are not (recreating them is no upload's business).
    """
    if file_type in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        return None
    return _SPECIAL.get(file_type, "a special file")


_SPECIAL = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
            stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
_KIND_NAMES = {**_SPECIAL, stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symlink"}


def _member_type(member: tarfile.TarInfo) -> int:
    """The ``stat.S_IFMT`` kind a member would create (a hard link makes a regular file)."""
    if member.isreg() or member.islnk():
        return stat.S_IFREG
    kinds = ((member.isdir, stat.S_IFDIR), (member.issym, stat.S_IFLNK),
             (member.ischr, stat.S_IFCHR), (member.isblk, stat.S_IFBLK),
             (member.isfifo, stat.S_IFIFO))
    return next((kind for test, kind in kinds if test()), 0)


class Entry(NamedTuple):
    """An entry the walk found: its path below the root, its ``stat.S_IFMT`` kind, and the
    open folder holding it (valid until the walk moves on) with its name there; and the
    lstat the walk took (the packs format's file cache is consulted with it, so that an
    unchanged file is never opened)."""

    rel: str
    kind: int
    dir_fd: int
    name: str
    st: os.stat_result | None = None


# Files are opened where the walk found them (relative to their folder's fd), never through
# a link (O_NOFOLLOW), and without waiting (O_NONBLOCK: a FIFO swapped in after the walk's
# stat would block the open and every read; regular files ignore the flag), then fstat'ed.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY


class Replaced(Exception):
    """A file the walk saw is now something else (a symlink, a FIFO...)."""


def open_file(path: str | Path, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """An fd of the regular file ``path`` (relative to ``dir_fd``), opened as
    :data:`_FILE_FLAGS` says, and its fstat.

    Raises:
        Replaced: it is a symlink or no longer a regular file.
        OSError: it cannot be opened.
    """
    try:
        fd = os.open(path, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise Replaced("a symlink") from None
        raise
    st = os.fstat(fd)
    kind = stat.S_IFMT(st.st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        raise Replaced(_KIND_NAMES.get(kind, "a special file"))
    return fd, st


MAX_DEPTH = 1000  # folder levels below the uploads folder listed at most (see _max_depth)
_FD_RESERVE = 64  # descriptors the walk leaves free for the rest of the process


def _max_depth() -> int:
    """How deep the walk lists folders: :data:`MAX_DEPTH`, fewer when the open-file limit is
    low. The walk keeps one fd open per level of the current path (that is what keeps it
    inside the tree), so the depth must stay well under the soft ``RLIMIT_NOFILE``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_DEPTH
    return max(1, min(MAX_DEPTH, soft - _FD_RESERVE))


@dataclass
class _Level:
    """One open folder on the walk's current path: its fd, path, and its sorted names not
    examined yet (``names``: an iterator)."""

    fd: int
    rel: str
    names: Iterator[str]
    prefix: str = ""  # what goes before a name to make its path below the root

    def __post_init__(self) -> None:
        self.prefix = "" if self.rel == "." else f"{self.rel}/"


def walk(root: Path, skipped: Skipped) -> Generator[Entry, None, None]:
    """Every entry below ``root`` a backup stores, folders before what they hold. Entries that
    vanish meanwhile are left out (the uploads folder is live); those that cannot be listed or
    examined, and kinds :func:`unrestorable` refuses, are recorded in ``skipped``.

    Each folder is opened once, without following a link (``root`` itself excepted: it may
    be a link to the uploads folder), and what it holds is examined relative to it: a folder
    swapped for a link meanwhile never leads the walk out of the tree. The walk keeps an
    explicit stack (no recursion: any depth), one open fd per level; a folder deeper than
    :func:`_max_depth`, or one that cannot be opened for lack of descriptors, is stored
    empty and recorded as skipped.

    Raises:
        ConexaError: ``root`` itself cannot be listed.
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:  # nothing at all can be read: that is no backup of the uploads
        raise ConexaError(f"cannot read uploads folder {root}: {exc.strerror}") from None
    stack = [_Level(fd, ".", iter(()))]
    try:
        try:
            stack[0].names = iter(sorted(os.listdir(fd)))
        except OSError as exc:
            raise ConexaError(f"cannot read uploads folder {root}: {exc.strerror}") from None
        depth_limit = _max_depth()
        # Locals: this loop runs once per entry of the tree (measured: a fifth of an
        # unchanged packs backup's time was the walk's own Python).
        lstat, ifmt, regular, folder = os.lstat, stat.S_IFMT, stat.S_IFREG, stat.S_IFDIR
        while stack:
            level = stack[-1]
            name = next(level.names, None)
            if name is None:
                os.close(stack.pop().fd)
                continue
            rel = level.prefix + name
            try:
                st = lstat(name, dir_fd=level.fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                skipped.add(rel, f"cannot read: {exc.strerror}")
                continue
            kind = ifmt(st.st_mode)
            if kind != regular and kind != folder and (why := unrestorable(kind)) is not None:
                skipped.add(rel, f"{why}: cannot be restored")
                continue
            yield Entry(rel, kind, level.fd, name, st)
            if kind == folder:
                if len(stack) > depth_limit:
                    skipped.add(rel, f"cannot list folder: more than {depth_limit} "
                                "levels deep")
                elif (sub := _open_folder(level.fd, name, rel, skipped)) is not None:
                    stack.append(sub)
    finally:
        for level in stack:
            os.close(level.fd)


def _open_folder(parent: int, name: str, rel: str, skipped: Skipped) -> _Level | None:
    """The folder ``name`` of the open folder ``parent``, opened and listed; None when it
    vanished or cannot be (then recorded: also EMFILE/ENFILE, out of descriptors)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        skipped.add(rel, f"cannot list folder: {exc.strerror}")
        return None
    try:
        return _Level(fd, rel, iter(sorted(os.listdir(fd))))
    except OSError as exc:
        os.close(fd)
        skipped.add(rel, f"cannot list folder: {exc.strerror}")
        return None


def _add_entry(tar: _ForgetfulTarFile, entry: Entry, stats: TreeStats,
               on_entry: EntryHook | None) -> None:
    """Store one entry (a folder's contents come next, from :func:`walk`). Folders and links
    are not opened: their header, examined relative to the open folder holding them (never
    by path: a parent swapped for a link would lead outside the tree), says all."""
    if entry.kind == stat.S_IFREG:
        _add_file(tar, entry, stats, on_entry)
        return
    try:
        st = os.stat(entry.name, dir_fd=entry.dir_fd, follow_symlinks=False)
        kind = stat.S_IFMT(st.st_mode)
        target = os.readlink(entry.name, dir_fd=entry.dir_fd) if kind == stat.S_IFLNK else ""
    except FileNotFoundError:  # removed while we walk
        return
    except OSError as exc:
        stats.skipped.add(entry.rel, f"cannot read: {exc.strerror}")
        return
    if kind == stat.S_IFDIR:
        tar.addfile(tar.header(entry.rel, st))
        stats.dirs += 1
    elif kind == stat.S_IFLNK:
        tar.addfile(tar.header(entry.rel, st, target))
        stats.symlinks += 1
        if on_entry is not None:
            on_entry(IndexEntry(entry.rel, "symlink", target=target))
    else:  # replaced by a file (stored next run) or a special file since the walk saw it
        stats.skipped.add(entry.rel, "replaced while being read")


def _add_file(tar: _ForgetfulTarFile, entry: Entry, stats: TreeStats,
              on_entry: EntryHook | None) -> None:
    """Store a regular file, its header from the open file (what we store is what it held
    when opened). One that cannot be opened, or is no longer a regular file, is skipped and
    recorded; one that fails while being read stops the run (half its bytes are already in
    the stream).

    Raises:
        ConexaError: reading an opened file failed.
    """
    try:
        fd, st = open_file(entry.name, entry.dir_fd)
    except FileNotFoundError:
        return
    except Replaced as exc:
        stats.skipped.add(entry.rel, f"replaced while being read: now {exc}")
        return
    except OSError as exc:
        stats.skipped.add(entry.rel, f"cannot read: {exc.strerror}")
        return
    try:
        padded = _PaddedFile(fd, entry.rel)
        info = tar.header(entry.rel, st)  # the open file's one fstat: sized as opened
        padded.left = info.size
        tar.addfile(info, padded)
    except OSError as exc:
        raise ConexaError(f"cannot read {shown_path(entry.rel)}: {exc.strerror}") from None
    finally:
        os.close(fd)
    stats.files += 1
    stats.bytes += info.size
    if on_entry is not None:
        on_entry(IndexEntry(entry.rel, "file", size=info.size,
                            sha256=padded.sha256.hexdigest()))


def _clean_name(name: str, what: str, kind: str = "archive member") -> str:
    """``name`` (a member's path or a hard link's target; or, ``kind`` "index entry", a
    packs backup's index path) as a plain relative path.

    Raises:
        UnsafeArchiveError: it is empty, absolute or has a ``..`` part.
    """
    if "\0" in name:  # no file name holds one: the OS would cut the name there
        raise UnsafeArchiveError(f"refusing {kind} {what!r}: NUL byte in its name")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"refusing {kind} {what!r}: absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refusing {kind} {what!r}: path contains '..'")
    return "/".join(parts) or "."


class _Extraction:
    """Writes members into ``dest``: files and folders as they come, symlinks last.

    Creating links only after every file and folder means nothing is ever written through
    a link of the archive's own making (a member whose path passes through a link is refused
    outright), so a link may point anywhere, exactly as stored.
    """

    def __init__(self, tar: tarfile.TarFile, dest: Path, stats: TreeStats) -> None:
        self.tar, self.dest, self.stats = tar, dest, stats
        self.links: dict[str, tarfile.TarInfo] = {}
        self.dirs: list[tarfile.TarInfo] = []

    def run(self) -> None:
        for member in self.tar:
            self.member(member)
        for name, link in self.links.items():
            self.symlink(name, link)
        # Folder modes and times last (as tarfile does): creating entries changes them.
        for folder in sorted(self.dirs, key=lambda m: m.name, reverse=True):
            path = self.dest / folder.name
            self.tar.chown(folder, path, numeric_owner=False)
            self.tar.utime(folder, path)
            self.tar.chmod(folder, path)

    def _refuse(self, name: str, why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"refusing archive member {name!r}: {why}")

    def _check_path(self, raw: str, name: str, *, is_link: str = "stored twice") -> None:
        """Refuse a path that passes through a symlink of this archive (or is one: ``is_link``
        says why that is refused)."""
        if not self.links:  # the usual case: no link read yet
            return
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            if "/".join(parts[:i]) in self.links:
                raise self._refuse(raw, "its path passes through a symlink of the archive"
                                   if i < len(parts) else is_link)

    def member(self, member: tarfile.TarInfo) -> None:
        name = _clean_name(member.name, member.name)
        self._check_path(member.name, name)
        why = unrestorable(_member_type(member))
        if why is not None:
            raise self._refuse(member.name, f"it is {why}")
        if name == "." and not member.isdir():
            raise self._refuse(member.name, "the archive's root is not a folder")
        if member.issym():
            self.links[name] = member  # created last, see the class docstring
            self.stats.symlinks += 1
            return
        if member.islnk():
            self._check_hardlink(member)
        safe = _safe_member(tarcompat.replace(member, name=name), str(self.dest))
        if safe.isdir():
            tarcompat.extract(self.tar, safe, str(self.dest), set_attrs=False)
            if name != ".":
                self.stats.dirs += 1
            self.dirs.append(safe)
            return
        tarcompat.extract(self.tar, safe, str(self.dest))  # checked above
        if safe.isreg():
            self.stats.files += 1
            self.stats.bytes += safe.size

    def _check_hardlink(self, member: tarfile.TarInfo) -> None:
        """A hard link may only join a regular file already extracted here."""
        target = _clean_name(member.linkname, member.name)
        self._check_path(member.name, target, is_link="hard link to a symlink")
        try:
            ok = stat.S_ISREG((self.dest / target).lstat().st_mode)
        except OSError:
            ok = False
        if not ok:
            raise self._refuse(member.name, "hard link to something not extracted before it")

    def symlink(self, name: str, link: tarfile.TarInfo) -> None:
        path = self.dest / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            path.symlink_to(link.linkname)  # the text as stored, never resolved
        except FileExistsError:
            raise self._refuse(link.name, "stored twice") from None
        self.tar.chown(link, path, numeric_owner=False)  # lchown for a link
        os.utime(path, (link.mtime, link.mtime), follow_symlinks=False)


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """Refuse hazards (stdlib ``data`` filter), keep mode bits (minus set-id) and owners.

    For files, folders and hard links only: the filter refuses symlinks that point out, which
    :class:`_Extraction` recreates as stored.
    """
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

    Symlinks are recreated exactly as stored, after everything else (see :class:`_Extraction`).

    Raises:
        UnsafeArchiveError: a member would be written outside ``dest`` or through a link, or
        is a kind :func:`unrestorable` refuses (a device file, a FIFO).
        IntegrityError/ConexaError: the stream is not a valid tar archive.
    """
    dest.mkdir(mode=0o700, parents=False, exist_ok=True)
    stats = TreeStats()
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
            _Extraction(tar, dest.resolve(), stats).run()
    except tarfile.TarError as exc:
        raise IntegrityError(f"uploads archive is damaged: {exc}") from None
    return stats



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
