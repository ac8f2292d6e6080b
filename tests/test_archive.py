"""The uploads folder as tar: faithful round trips, stock-tool compatibility, safe extraction."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from conexa_backup import archive
from conexa_backup.archive import (
    SKIPPED_LISTED,
    Entry,
    Replaced,
    TreeStats,
    _add_entry,
    _add_file,
    _ForgetfulTarFile,
    extract_stream,
    move_file,
    open_file,
    probe_tree,
    scan_tree,
    tar_writer,
    unrestorable,
    write_tree,
)
from conexa_backup.errors import ConexaError, IntegrityError, UnsafeArchiveError
from conexa_backup.manifest import IndexEntry
from conexa_backup.pipeline import CHUNK
from conexa_backup.testing.compare import tree_snapshot
from conexa_backup.testing.sample import make_uploads_tree


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("uploads") / "uploads"
    make_uploads_tree(root, files=80, seed=11, incompressible_kib=16)
    return root


@pytest.fixture(scope="module")
def archived(uploads: Path) -> tuple[bytes, TreeStats]:
    out = io.BytesIO()
    stats = write_tree(uploads, out)
    return out.getvalue(), stats


# -- round trip ---------------------------------------------------------------------------------

def test_round_trip_is_exact(uploads: Path, archived: tuple[bytes, TreeStats],
                             tmp_path: Path) -> None:
    data, written = archived
    dest = tmp_path / "restored"
    extracted = extract_stream(io.BytesIO(data), dest)
    before, after = tree_snapshot(uploads), tree_snapshot(dest)
    assert after == before
    # The sample exercises what matters; make sure it was really there to compare.
    kinds = {entry[0] for entry in before.values()}
    assert kinds == {"file", "dir", "symlink"}
    assert before["financeiro/extrato.csv"][1] == 0o600
    assert before["financeiro"][1] == 0o750
    assert before["scripts/converter fotos.sh"][1] == 0o755
    assert before["documentos/arquivados 2025"][0] == "dir"
    assert before["atalhos/alunos-2026"] == ("symlink", 0o777, None, "../alunos/2026", 0)
    assert extracted == written


def test_root_folder_mode_and_mtime_kept(uploads: Path, archived: tuple[bytes, TreeStats],
                                         tmp_path: Path) -> None:
    dest = tmp_path / "restored"
    extract_stream(io.BytesIO(archived[0]), dest)
    assert stat.S_IMODE(dest.stat().st_mode) == stat.S_IMODE(uploads.stat().st_mode)
    assert int(dest.stat().st_mtime) == int(uploads.stat().st_mtime)


def test_stats_match_scan_tree(uploads: Path, archived: tuple[bytes, TreeStats]) -> None:
    _, stats = archived
    assert stats == scan_tree(uploads)
    snapshot = tree_snapshot(uploads)
    files = [e for e in snapshot.values() if e[0] == "file"]
    assert stats.files == len(files)
    assert stats.bytes == sum(e[2] or 0 for e in files)
    assert stats.dirs == sum(1 for e in snapshot.values() if e[0] == "dir")
    assert stats.symlinks == sum(1 for e in snapshot.values() if e[0] == "symlink")


def test_symlinks_are_not_followed(uploads: Path, archived: tuple[bytes, TreeStats]) -> None:
    with tarfile.open(fileobj=io.BytesIO(archived[0]), mode="r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
    link = members["atalhos/alunos-2026"]
    assert link.issym() and link.linkname == "../alunos/2026"
    # Nothing is archived "through" the directory symlink.
    assert not any(name.startswith("atalhos/alunos-2026/") for name in members)


def test_archive_is_pax_and_readable_by_gnu_tar(archived: tuple[bytes, TreeStats]) -> None:
    if shutil.which("tar") is None:
        pytest.skip("tar not installed")
    proc = subprocess.run(["tar", "-tvf", "-"], input=archived[0], capture_output=True,
                          check=False, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert proc.returncode == 0, proc.stderr
    listing = proc.stdout.decode("utf-8")
    assert "documentos/São Paulo.txt" in listing
    assert "documentos/Conceição — ata de reunião.txt" in listing
    assert "atalhos/alunos-2026 -> ../alunos/2026" in listing
    with tarfile.open(fileobj=io.BytesIO(archived[0]), mode="r:") as tar:
        assert tar.format == tarfile.PAX_FORMAT


def test_gnu_tar_extracts_the_same_tree(uploads: Path, archived: tuple[bytes, TreeStats],
                                        tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("tar not installed")
    dest = tmp_path / "by-gnu-tar"
    dest.mkdir()
    subprocess.run(["tar", "-xpf", "-", "-C", str(dest)], input=archived[0], check=True,
                   capture_output=True)
    assert tree_snapshot(dest) == tree_snapshot(uploads)


def test_small_files_reach_the_sink_in_large_writes(tmp_path: Path) -> None:
    """Headers and padding are gathered: the byte path sees ~1 MiB writes, not one per file,
    and what it sees is a valid archive of every file."""
    for i in range(2000):
        (tmp_path / f"f{i:04}.txt").write_bytes(b"x" * (i % 700))
    writes: list[int] = []
    out = io.BytesIO()

    class Sink:
        def write(self, data: bytes) -> None:
            writes.append(len(data))
            out.write(data)

    stats = write_tree(tmp_path, Sink())
    assert stats.files == 2000
    assert len(writes) <= out.tell() // CHUNK + 2, writes  # all but the last are >= 1 MiB
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        sizes = {m.name: m.size for m in tar.getmembers() if m.isfile()}
    assert sizes == {f"f{i:04}.txt": i % 700 for i in range(2000)}


def test_memory_does_not_grow_with_the_number_of_files(tmp_path: Path) -> None:
    """10,000 small files: the writer keeps nothing per file. tarfile alone would keep every
    header (~1 KB each: 8.5 MiB here) and every inode (4 MiB here); peak is 1.7 MiB."""
    for i in range(10_000):
        (tmp_path / f"f{i:05}").write_bytes(b"x" * 100)

    class Null:
        def write(self, data: bytes) -> None:
            pass

    tracemalloc.start()
    try:
        stats = write_tree(tmp_path, Null())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert stats.files == 10_000
    assert peak < 5 << 19, f"peak {peak / 2**20:.1f} MiB"  # 2.5 MiB


def test_move_file_waits_for_writers_when_asked(tmp_path: Path) -> None:
    """A file another process still writes (a forged "finished" report from pg_dump) is not
    moved early; once closed it is, whole."""
    folder = tmp_path / "dump"
    folder.mkdir()
    data = folder / "57.dat"
    data.write_bytes(b"first half,")
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'ab'); print('open', "
         "flush=True); sys.stdin.read(); f.write(b'second half'); f.close()", str(data)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"open\n"
        out = io.BytesIO()
        with tar_writer(out, folder) as tar:
            assert not move_file(tar, data, only_if_closed=True)
            assert data.read_bytes() == b"first half,"  # untouched, still there
            assert writer.stdin is not None
            writer.stdin.close()
            assert writer.wait(10) == 0
            assert move_file(tar, data, only_if_closed=True)
        assert not data.exists()
    finally:
        writer.kill()
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        member = tar.extractfile("57.dat")
        assert member is not None and member.read() == b"first half,second half"


def test_hard_links_are_stored_as_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"shared content")
    os.link(src / "a.txt", src / "b.txt")
    out = io.BytesIO()
    stats = write_tree(src, out)
    assert (stats.files, stats.bytes) == (2, 28)
    dest = tmp_path / "dest"
    extract_stream(io.BytesIO(out.getvalue()), dest)
    assert (dest / "b.txt").read_bytes() == b"shared content"
    assert tree_snapshot(dest) == tree_snapshot(src)


def test_empty_folder(tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.mkdir()
    out = io.BytesIO()
    assert write_tree(src, out) == TreeStats()
    dest = tmp_path / "dest"
    assert extract_stream(io.BytesIO(out.getvalue()), dest) == TreeStats()
    assert list(dest.iterdir()) == []


def test_fifo_is_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.txt").write_bytes(b"kept")
    os.mkfifo(src / "pipe")
    out = io.BytesIO()
    stats = write_tree(src, out)
    assert (stats.files, stats.bytes) == (1, 4)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar:
        assert sorted(tar.getnames()) == [".", "keep.txt"]
    assert stats.skipped.listed == [("pipe", "a FIFO: cannot be restored")]


def test_kinds_no_restore_recreates_are_skipped_and_recorded(tmp_path: Path) -> None:
    """One rule (``unrestorable``) for both directions: what the backup keeps, extraction
    accepts; what extraction would refuse, the backup skips, names and counts."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.txt").write_bytes(b"kept")
    os.mkfifo(src / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "sock"))
        out = io.BytesIO()
        stats = write_tree(src, out)
    assert stats.skipped.count == 2
    assert dict(stats.skipped.listed) == {"pipe": "a FIFO: cannot be restored",
                                          "sock": "a socket: cannot be restored"}
    extracted = extract_stream(io.BytesIO(out.getvalue()), tmp_path / "dest")
    assert (extracted.files, extracted.bytes) == (stats.files, stats.bytes) == (1, 4)
    assert unrestorable(stat.S_IFIFO) and unrestorable(stat.S_IFCHR)
    assert all(unrestorable(k) is None for k in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK))


def test_skipped_paths_are_bounded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(SKIPPED_LISTED + 20):
        os.mkfifo(src / f"pipe{i:03d}")
    stats = write_tree(src, io.BytesIO())
    assert stats.skipped.count == SKIPPED_LISTED + 20
    assert len(stats.skipped.listed) == SKIPPED_LISTED


def test_probe_opens_every_file_or_a_sample_and_names_what_a_backup_skips(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i}.txt").write_bytes(b"x")
    os.mkfifo(src / "pipe")
    whole = probe_tree(src)
    assert (whole.files, whole.tried) == (20, 20)
    assert whole.skipped.listed == [("pipe", "a FIFO: cannot be restored")]
    sampled = probe_tree(src, sample=5)
    assert (sampled.files, sampled.tried) == (20, 5)


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ConexaError, match="does not exist"):
        write_tree(tmp_path / "nope", io.BytesIO())


def test_file_instead_of_folder_raises(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ConexaError, match="not a folder"):
        write_tree(tmp_path / "file", io.BytesIO())


def _race(monkeypatch: pytest.MonkeyPatch, root: Path, victim: str, action: str) -> None:
    """Delete ``victim`` for real after the walk saw it, before it is opened; or shrink it
    right after its tar header is taken from the open file."""
    if action == "delete":
        original_open = os.open

        def open_(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            if path == victim:
                (root / victim).unlink()
            return original_open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", open_)
        return
    original = _ForgetfulTarFile.header

    def header(self: _ForgetfulTarFile, name: str, st: os.stat_result,
               linkname: str = "") -> tarfile.TarInfo:
        info = original(self, name, st, linkname)
        if name == victim:
            (root / victim).write_bytes(b"tiny")
        return info

    monkeypatch.setattr(_ForgetfulTarFile, "header", header)


def test_file_vanishing_during_walk_is_skipped(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"aaa")
    (src / "b.txt").write_bytes(b"bbbb")
    (src / "c.txt").write_bytes(b"cc")
    _race(monkeypatch, src, "b.txt", "delete")
    out = io.BytesIO()
    stats = write_tree(src, out)
    assert not (src / "b.txt").exists()
    assert (stats.files, stats.bytes) == (2, 5)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar:
        assert sorted(tar.getnames()) == [".", "a.txt", "c.txt"]


def test_entry_gone_before_stat_is_skipped(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"aaa")
    real_listdir = os.listdir
    monkeypatch.setattr("conexa_backup.archive.os.listdir",
                        lambda path: [*real_listdir(path), "ghost.txt", "ghost-dir"])
    out = io.BytesIO()
    stats = write_tree(src, out)
    assert (stats.files, stats.dirs) == (1, 0)


def _add_swapped(tmp_path: Path, swap: str) -> tuple[TreeStats, bytes]:
    """``_add_file`` on ``f.txt``, seen by the walk as a regular file, then replaced by a FIFO
    (no writer: opening or reading it blocks forever) or a symlink to a file outside the tree.
    Run in a thread, so that a regression fails instead of hanging the suite."""
    src, outside = tmp_path / "src", tmp_path / "secret"
    src.mkdir()
    outside.write_bytes(b"secret")
    (src / "f.txt").write_bytes(b"plain text")
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    entry = Entry("f.txt", stat.S_IFMT(os.stat("f.txt", dir_fd=fd).st_mode), fd, "f.txt")
    (src / "f.txt").unlink()
    if swap == "fifo":
        os.mkfifo(src / "f.txt")
    else:
        (src / "f.txt").symlink_to(outside)
    stats, out = TreeStats(), io.BytesIO()
    try:
        with tar_writer(out, src) as tar:
            worker = threading.Thread(target=_add_file, args=(tar, entry, stats, None),
                                      daemon=True)
            worker.start()
            worker.join(timeout=30)
            assert not worker.is_alive(), "blocked on the FIFO"
    finally:
        os.close(fd)
    return stats, out.getvalue()


@pytest.mark.parametrize("swap", ["fifo", "symlink"])
def test_file_replaced_after_the_walk_saw_it_is_skipped(tmp_path: Path, swap: str) -> None:
    """Before: the FIFO blocked the backup forever; the symlink was followed and the file
    outside the tree stored as ``f.txt``."""
    stats, data = _add_swapped(tmp_path, swap)
    now = "a FIFO" if swap == "fifo" else "a symlink"
    assert (stats.files, stats.skipped.count) == (0, 1)
    assert stats.skipped.listed == [("f.txt", f"replaced while being read: now {now}")]
    assert b"secret" not in data
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        assert tar.getnames() == ["."]


def test_probe_does_not_block_on_a_fifo_or_follow_a_link(tmp_path: Path) -> None:
    """What ``check`` opens is opened the same way (here: a FIFO and a link seen as files)."""
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "pipe")
    (src / "link").symlink_to(tmp_path)
    for name in ("pipe", "link"):
        with pytest.raises(Replaced):
            os.close(open_file(src / name))


def test_file_shrinking_during_read_keeps_archive_valid(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(b"B" * 10_000)
    (src / "z.txt").write_bytes(b"after")
    _race(monkeypatch, src, "big.bin", "shrink")
    out = io.BytesIO()
    stats = write_tree(src, out)
    assert (stats.files, stats.bytes) == (2, 10_005)
    dest = tmp_path / "dest"
    extract_stream(io.BytesIO(out.getvalue()), dest)
    assert (dest / "big.bin").read_bytes() == b"tiny" + b"\0" * 9_996
    assert (dest / "z.txt").read_bytes() == b"after"  # the stream stayed aligned


def test_truncated_archive_is_an_error(archived: tuple[bytes, TreeStats],
                                       tmp_path: Path) -> None:
    data = archived[0]
    with pytest.raises(ConexaError):
        extract_stream(io.BytesIO(data[: len(data) // 2 + 100]), tmp_path / "dest")


def test_garbage_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConexaError, match="damaged"):
        extract_stream(io.BytesIO(b"this is not a tar archive" * 100), tmp_path / "dest")


# -- deep trees and headers taken where the walk is ----------------------------------------------

def make_deep_tree(root: Path, depth: int) -> None:
    """``root/a/a/.../a`` (``depth`` folders) with ``f.txt`` at the bottom, built one level at
    a time relative to the previous level's fd (no path ever gets long)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("a", 0o750, dir_fd=fd)
            sub = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("f.txt", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(out, b"deep")
        os.close(out)
    finally:
        os.close(fd)


def remove_deep_tree(root: Path) -> None:
    """Remove what :func:`make_deep_tree` made (and its copies), bottom up through fds: pytest
    (``shutil.rmtree``) recurses once per level and would fail on it."""
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        while "a" in os.listdir(fds[-1]):
            fds.append(os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        with contextlib.suppress(FileNotFoundError):
            os.unlink("f.txt", dir_fd=fds[-1])
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir("a", dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def deep_trees(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """``src`` (1,000 folders deep) and ``dest``; removed after."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1000 + 64:  # the walk's depth limit
        pytest.skip("open-file limit too low for 1,000 levels")
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_deep_tree(src, 1000)
    try:
        yield src, dest
    finally:
        for root in (src, dest):
            if root.exists():
                remove_deep_tree(root)


def deep_snapshot(root: Path) -> dict[str, object]:
    """``tree_snapshot``, which recurses once per level, with room for 1,000 of them (only
    here: the walk under test must need none)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 2_000)
    try:
        return dict(tree_snapshot(root))
    finally:
        sys.setrecursionlimit(limit)


def test_a_tree_1000_folders_deep_round_trips(deep_trees: tuple[Path, Path]) -> None:
    """Before: RecursionError at about 495 levels (two nested generators per level), and the
    whole backup lost, database included. (Extraction takes ~25 s here: the stdlib's data
    filter resolves every member's path, lstat-ing each of its parts.)"""
    src, dest = deep_trees
    out = io.BytesIO()
    stats = write_tree(src, out)
    assert (stats.files, stats.dirs, stats.skipped.count) == (1, 1000, 0)
    probe = probe_tree(src)
    assert (probe.files, probe.tried, probe.skipped.count) == (1, 1, 0)
    extract_stream(io.BytesIO(out.getvalue()), dest)
    assert deep_snapshot(dest) == deep_snapshot(src)


def test_folders_past_the_depth_limit_are_stored_empty_and_recorded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_DEPTH", 3, raising=False)  # before: no limit at all
    src = tmp_path / "src"
    make_deep_tree(src, 5)
    expected = [("a/a/a/a", "cannot list folder: more than 3 levels deep")]
    out = io.BytesIO()
    stats = write_tree(src, out)
    assert (stats.files, stats.dirs, stats.skipped.listed) == (0, 4, expected)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar:
        assert tar.getnames() == [".", "a", "a/a", "a/a/a", "a/a/a/a"]
    assert probe_tree(src).skipped.listed == expected


def test_depth_limit_leaves_room_under_the_open_file_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive.resource, "getrlimit", lambda _which: (200, 4096))
    assert archive._max_depth() == 200 - archive._FD_RESERVE
    monkeypatch.setattr(archive.resource, "getrlimit",
                        lambda _which: (archive.resource.RLIM_INFINITY,) * 2)
    assert archive._max_depth() == archive.MAX_DEPTH


def test_out_of_descriptors_skips_the_folder(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    make_deep_tree(src, 3)
    original_open, full = os.open, (src / "a").stat()

    def open_(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if dir_fd is not None and os.path.samestat(os.fstat(dir_fd), full):  # opening a/a
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return original_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_)
    stats = write_tree(src, io.BytesIO())
    assert stats.dirs == 2
    assert stats.skipped.listed == [("a/a", "cannot list folder: Too many open files")]


def _moved_parent(tmp_path: Path) -> tuple[Path, Path, int]:
    """``src/sub`` holding folder ``d`` (mode 0o705) and link ``l`` (to ``inside``), opened
    as the walk does; then ``src/sub`` is moved away and replaced by a link to ``outside``,
    whose ``d`` and ``l`` differ (mode 0o777, link to ``/etc/shadow``)."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    for top, mode, target in ((src / "sub", 0o705, "inside"), (outside, 0o777, "/etc/shadow")):
        (top / "d").mkdir(parents=True)
        (top / "d").chmod(mode)
        os.utime(top / "d", (1_000_000 + mode, 1_000_000 + mode))
        (top / "l").symlink_to(target)
        (top / "f.txt").write_bytes(b"x" * mode)
    fd = os.open(src / "sub", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    (src / "sub").rename(tmp_path / "moved")
    (src / "sub").symlink_to(outside)
    return src, outside, fd


def test_headers_come_from_the_walked_folder_not_its_path(tmp_path: Path) -> None:
    """Before: folder and link headers were taken by path (``src/sub/d``), through the link
    now there: mode, mtime and link text of the outside folder's entries."""
    src, _outside, fd = _moved_parent(tmp_path)
    stats, out, index = TreeStats(), io.BytesIO(), []
    try:
        with tar_writer(out, src) as tar:
            for name, kind in (("d", stat.S_IFDIR), ("l", stat.S_IFLNK), ("f.txt", stat.S_IFREG)):
                _add_entry(tar, Entry(f"sub/{name}", kind, fd, name), stats, index.append)
    finally:
        os.close(fd)
    assert (stats.dirs, stats.symlinks, stats.files, stats.skipped.count) == (1, 1, 1, 0)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar:
        d, link, f = tar.getmember("sub/d"), tar.getmember("sub/l"), tar.getmember("sub/f.txt")
    assert (d.mode, d.mtime) == (0o705, 1_000_000 + 0o705)
    assert (link.linkname, f.size) == ("inside", 0o705)
    assert index[0] == IndexEntry("sub/l", "symlink", target="inside")


def test_archive_is_byte_for_byte_what_gettarinfo_made(uploads: Path, tmp_path: Path) -> None:
    """Headers made from the walk's stat are those tarfile's ``gettarinfo`` made (types,
    modes, owners with names, sizes, mtimes, link text, pax records): the same archive."""
    out = io.BytesIO()
    write_tree(uploads, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:") as tar:
        names = tar.getnames()
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.PAX_FORMAT) as ref:
        for name in names:
            made = ref.gettarinfo(str(uploads / name), arcname=name)
            ref.inodes.clear()  # type: ignore[attr-defined]  # hard links: stored as content
            if made.isreg():
                with (uploads / name).open("rb") as fh:
                    ref.addfile(made, fh)
            else:
                ref.addfile(made)
    assert len(names) > 80
    assert out.getvalue() == (tmp_path / "ref.tar").read_bytes()


# -- hostile archives ---------------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes | None]


def _reg(name: str, data: bytes = b"pwned\n", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _link(name: str, target: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _dir(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def _special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return info, None


def _tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@pytest.fixture
def arena(tmp_path: Path) -> tuple[Path, Path]:
    """``dest`` to extract into and an empty ``sentinel`` folder right next to it."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    return tmp_path / "dest", sentinel


def _outside(tmp_path: Path, dest: Path) -> list[Path]:
    """Everything under tmp_path that is not dest (or inside it)."""
    return sorted(p for p in tmp_path.rglob("*") if dest not in (p, *p.parents))


HOSTILE: dict[str, list[Member]] = {
    "dotdot": [_reg("../sentinel/escape")],
    "dotdot-deep": [_reg("a/b/../../../sentinel/escape")],
    "symlink-to-sentinel-then-write": [
        _link("s", "../sentinel", tarfile.SYMTYPE), _reg("s/pwned")],
    "symlink-inside-then-write-out": [
        _link("here", ".", tarfile.SYMTYPE), _reg("here/../sentinel/pwned")],
    "symlink-chain-out": [
        _link("here", ".", tarfile.SYMTYPE), _link("here/up", "..", tarfile.SYMTYPE),
        _reg("here/up/sentinel/pwned")],
    "dir-through-symlink": [_link("s", "../sentinel", tarfile.SYMTYPE), _dir("s/d")],
    "hardlink-through-symlink": [
        _link("s", "../sentinel", tarfile.SYMTYPE), _link("h", "s/x", tarfile.LNKTYPE)],
    "file-then-symlink-of-its-name": [
        _reg("x"), _link("x", "../sentinel/pwned", tarfile.SYMTYPE)],
    "symlink-then-file-of-its-name": [
        _link("x", "../sentinel/pwned", tarfile.SYMTYPE), _reg("x")],
    "root-is-a-symlink": [_link(".", "../sentinel", tarfile.SYMTYPE), _reg("pwned")],
    "hardlink-to-a-symlink": [
        _link("s", "../sentinel/x", tarfile.SYMTYPE), _link("h", "s", tarfile.LNKTYPE)],
    "hardlink-out": [_link("h", "../sentinel/x", tarfile.LNKTYPE)],
    "hardlink-absolute": [_link("h", "/etc/passwd", tarfile.LNKTYPE)],
    "char-device": [_special("null", tarfile.CHRTYPE)],
    "block-device": [_special("disk", tarfile.BLKTYPE)],
    "fifo": [_special("pipe", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_refused(case: str, arena: tuple[Path, Path], tmp_path: Path) -> None:
    dest, sentinel = arena
    with pytest.raises(UnsafeArchiveError) as info:
        extract_stream(io.BytesIO(_tar(HOSTILE[case])), dest)
    assert not isinstance(info.value, IntegrityError)  # refused as unsafe, not "damaged"
    assert "refusing archive member" in str(info.value)
    assert list(sentinel.iterdir()) == []
    assert _outside(tmp_path, dest) == [sentinel]


def test_absolute_member_refused(arena: tuple[Path, Path], tmp_path: Path) -> None:
    dest, sentinel = arena
    target = sentinel / "pwned"  # absolute, but inside tmp_path: harmless if the bug triggers
    try:
        with pytest.raises(UnsafeArchiveError):
            extract_stream(io.BytesIO(_tar([_reg(str(target))])), dest)
    finally:
        escaped = list(sentinel.iterdir())
        for path in escaped:
            path.unlink()
    assert escaped == []


def test_nul_in_a_name_is_refused_as_such(arena: tuple[Path, Path]) -> None:
    """Before: "absolute path", which it is not."""
    info, data = _reg("x")
    info.pax_headers = {"path": "evil\0name"}  # a pax record may hold a NUL; ustar names not
    with pytest.raises(UnsafeArchiveError, match="NUL byte in its name"):
        extract_stream(io.BytesIO(_tar([(info, data)])), arena[0])


def test_links_inside_destination_are_fine(arena: tuple[Path, Path]) -> None:
    dest, _ = arena
    members = [_reg("docs/a.txt", b"A"), _link("docs/b.txt", "a.txt", tarfile.SYMTYPE),
               _link("c.txt", "docs/a.txt", tarfile.LNKTYPE),
               _link("docs/up", "..", tarfile.SYMTYPE)]
    stats = extract_stream(io.BytesIO(_tar(members)), dest)
    assert (dest / "docs" / "b.txt").read_bytes() == b"A"
    assert (dest / "c.txt").read_bytes() == b"A"
    assert (dest / "docs" / "up").readlink() == Path("..")
    assert (stats.files, stats.symlinks) == (1, 2)


def test_setuid_and_setgid_bits_are_stripped(arena: tuple[Path, Path]) -> None:
    dest, _ = arena
    members = [_reg("suid", b"#!/bin/sh\n", 0o4755), _reg("sgid", b"#!/bin/sh\n", 0o2750),
               _reg("shared", b"x", 0o664)]
    extract_stream(io.BytesIO(_tar(members)), dest)
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "sgid").stat().st_mode) == 0o750
    assert stat.S_IMODE((dest / "shared").stat().st_mode) == 0o664  # other modes are kept


def test_refusal_happens_before_later_members(arena: tuple[Path, Path]) -> None:
    """A hostile member stops extraction: nothing after it is written."""
    dest, sentinel = arena
    members = [_reg("first.txt"), _reg("../sentinel/evil"), _reg("after.txt")]
    with pytest.raises(UnsafeArchiveError):
        extract_stream(io.BytesIO(_tar(members)), dest)
    assert (dest / "first.txt").exists()
    assert not (dest / "after.txt").exists()
    assert list(sentinel.iterdir()) == []


def test_symlinks_come_back_exactly_as_stored(tmp_path: Path) -> None:
    """Links are data: absolute, leaving the tree, dangling, odd spellings all come back
    with the same text, and nothing is written through them."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "docs").mkdir(parents=True)
    outside.mkdir()
    (src / "docs" / "a.txt").write_bytes(b"A")
    targets = {"abs": "/etc/hostname", "abs-missing": "/nonexistent/x", "up": "../nowhere",
               "up-existing": "../outside", "docs/inside": "a.txt",
               "docs/dangling": "missing.txt", "docs/odd": ".//a.txt/../", "dir-link": "docs"}
    for name, target in targets.items():
        (src / name).symlink_to(target)
    out = io.BytesIO()
    written = write_tree(src, out)
    dest = tmp_path / "dest"
    extracted = extract_stream(io.BytesIO(out.getvalue()), dest)
    assert tree_snapshot(dest) == tree_snapshot(src)
    assert {n: os.readlink(dest / n) for n in targets} == targets  # noqa: PTH115 - verbatim
    assert extracted == written
    assert written.symlinks == len(targets)
    assert list(outside.iterdir()) == []
    assert _outside(tmp_path, dest) == sorted([outside, *src.rglob("*"), src])


def test_index_entries_name_files_and_link_targets(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_bytes(b"hello")
    (src / "abs").symlink_to("/etc/hostname")
    entries: list[IndexEntry] = []
    write_tree(src, io.BytesIO(), entries.append)
    assert sorted(entries, key=lambda e: e.path) == [
        IndexEntry("abs", "symlink", target="/etc/hostname"),
        IndexEntry("f.txt", "file", 5, hashlib.sha256(b"hello").hexdigest())]
    assert [IndexEntry.from_line(e.to_line()) for e in entries] == entries
    digest = hashlib.sha256(b"hello").hexdigest()
    old = json.dumps({"path": "f.txt", "size": 5, "sha256": digest}).encode()
    assert IndexEntry.from_line(old) == IndexEntry("f.txt", "file", 5, digest)  # older index
