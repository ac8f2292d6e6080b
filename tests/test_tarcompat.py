"""Extraction on Pythons without tarfile's filters (Debian 12's 3.11.2): see tarcompat.py.

The suite's Python has the filters, so the fallback is forced here (``NATIVE = False``);
tests/test_install.py runs the real thing with Debian's own python3.
"""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from conexa_backup import tarcompat
from conexa_backup.archive import extract_stream, write_tree
from conexa_backup.errors import UnsafeArchiveError
from conexa_backup.testing.compare import tree_snapshot
from conexa_backup.testing.sample import make_uploads_tree


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


MEMBERS = {
    "file": _member("a/b.txt"), "folder": _member("a", tarfile.DIRTYPE),
    "dotdot": _member("../escape"), "dotdot-deep": _member("a/b/../../../escape"),
    "symlink-inside": _member("a/l", tarfile.SYMTYPE, "../b.txt"),
    "symlink-out": _member("a/l", tarfile.SYMTYPE, "../../etc"),
    "symlink-absolute": _member("l", tarfile.SYMTYPE, "/etc/passwd"),
    "hardlink-inside": _member("h", tarfile.LNKTYPE, "a/b.txt"),
    "hardlink-out": _member("h", tarfile.LNKTYPE, "../x"),
    "char-device": _member("null", tarfile.CHRTYPE),
    "fifo": _member("pipe", tarfile.FIFOTYPE),
}


@pytest.mark.skipif(not tarcompat.NATIVE, reason="compares with the stdlib's filter")
@pytest.mark.parametrize("case", list(MEMBERS))
def test_checks_refuse_what_the_stdlib_data_filter_refuses(case: str, tmp_path: Path) -> None:
    member = MEMBERS[case]
    try:
        tarfile.data_filter(member, str(tmp_path))
        stdlib_refuses = False
    except tarfile.FilterError:
        stdlib_refuses = True

    try:
        tarcompat.data_checks(member, str(tmp_path))
        ours_refuses = False
    except tarcompat.FilterError:
        ours_refuses = True

    assert ours_refuses == stdlib_refuses


def test_absolute_name_refused(tmp_path: Path) -> None:
    # The stdlib strips the "/" (and archive.py refuses the renamed member); we refuse outright.
    with pytest.raises(tarcompat.FilterError, match="absolute path"):
        tarcompat.data_checks(_member("/etc/cron.d/x"), str(tmp_path))


@pytest.fixture
def no_stdlib_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tarcompat, "NATIVE", False)


@pytest.mark.usefixtures("no_stdlib_filters")
def test_round_trip_without_stdlib_filters_is_exact(tmp_path: Path) -> None:
    uploads, dest = tmp_path / "uploads", tmp_path / "restored"
    make_uploads_tree(uploads, files=40, seed=5)
    out = io.BytesIO()
    written = write_tree(uploads, out)

    extracted = extract_stream(io.BytesIO(out.getvalue()), dest)

    assert extracted == written
    assert tree_snapshot(dest) == tree_snapshot(uploads)  # modes, times, links included
    assert stat.S_IMODE(dest.stat().st_mode) == stat.S_IMODE(uploads.stat().st_mode)
    assert int(dest.stat().st_mtime) == int(uploads.stat().st_mtime)


@pytest.mark.usefixtures("no_stdlib_filters")
def test_escaping_member_refused_without_stdlib_filters(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = _member("../sentinel")
        tar.addfile(info, io.BytesIO(b""))

    # Refused by the extraction's own name check, before any filter: on every Python.
    with pytest.raises(UnsafeArchiveError, match=r"refusing archive member '\.\./sentinel'"):
        extract_stream(io.BytesIO(buf.getvalue()), tmp_path / "dest")
    assert not (tmp_path / "sentinel").exists()
