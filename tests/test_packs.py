"""The pack format (issue 15): blob ids, writing packs, reading them back, the by-hand script."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import stat
import subprocess
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyrage import decrypt, x25519

from conexa_backup import catalog, packs
from conexa_backup.actions import uploads_index
from conexa_backup.errors import IntegrityError, UnusableCopyError
from conexa_backup.packs import PackWriter, StoredPack, blob_id, file_blobs, open_pack, read_index
from conexa_backup.storage.local import LocalTarget, LocalTargetConfig
from conexa_backup.testing.compare import tree_snapshot

SCRIPT = Path(__file__).parent.parent / "docs" / "restore_packs.py"
KEY = b"k" * 32


@dataclass
class Written:
    """Packs a writer closed: stored bytes by name, and what the writer said of each."""

    stored: dict[str, bytes]
    packs: list[StoredPack]

    def on_pack(self, pack: StoredPack) -> None:
        assert pack.path.stat().st_mode & 0o777 == 0o600
        self.stored[pack.name] = pack.path.read_bytes()
        self.packs.append(pack)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "staging"
    folder.mkdir(mode=0o700)
    yield folder
    assert list(folder.iterdir()) == []  # nothing left behind, whatever happened


@pytest.fixture(scope="module")
def age_key() -> x25519.Identity:
    return x25519.Identity.generate()


def write(scratch: Path, blobs: list[bytes], *, key: bytes | None = None,
          recipients: list[x25519.Recipient] | None = None, **kw: object) -> Written:
    written = Written({}, [])
    with PackWriter(scratch, written.on_pack, key=key, recipients=recipients or [],
                    **kw) as writer:  # type: ignore[arg-type]
        for data in blobs:
            writer.add(blob_id(data, key), data)
    return written


# -- ids ----------------------------------------------------------------------------------------

def test_blob_ids_are_sha256_or_keyed_hmac_and_keyed_ids_reveal_nothing() -> None:
    data = b"signed enrolment form"
    assert blob_id(data) == hashlib.sha256(data).hexdigest()
    assert blob_id(data, KEY) == hmac.new(KEY, data, hashlib.sha256).hexdigest()
    # Someone holding a known file cannot find it by its SHA-256, nor across schools.
    assert blob_id(data, KEY) != blob_id(data)
    assert blob_id(data, KEY) != blob_id(data, b"another school's key")
    assert blob_id(data, KEY) == blob_id(bytes(data), KEY)  # still deduplicates


def test_file_blobs_splits_large_files_into_fixed_pieces(tmp_path: Path) -> None:
    content = os.urandom(2500)
    (tmp_path / "big").write_bytes(content)
    seen: list[tuple[str, bytes]] = []
    got = file_blobs(tmp_path / "big", KEY, piece_size=1000,
                     on_piece=lambda i, d: seen.append((i, d)))
    pieces = [content[:1000], content[1000:2000], content[2000:]]
    assert got.size == 2500
    assert got.sha256 == hashlib.sha256(content).hexdigest()
    assert got.blobs == [blob_id(p, KEY) for p in pieces]
    assert seen == list(zip(got.blobs, pieces, strict=True))
    # A small file is one blob named by its SHA-256 (unkeyed); an empty file has none.
    assert file_blobs(io.BytesIO(b"abc")).blobs == [hashlib.sha256(b"abc").hexdigest()]
    assert file_blobs(io.BytesIO(b"")) == packs.FileBlobs(0, hashlib.sha256().hexdigest(), [])
    plain = file_blobs(io.BytesIO(content), piece_size=1000)
    assert plain.sha256 == got.sha256 and plain.blobs == [blob_id(p) for p in pieces]
    assert packs.PIECE_SIZE <= packs.PACK_SIZE


class _Trickle(io.RawIOBase):
    """A stream that returns at most 7 bytes a read (a pipe, a network file system)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, 7) if n >= 0 else 7)


def test_file_blobs_pieces_stay_fixed_on_short_reads() -> None:
    content = os.urandom(250)
    got = file_blobs(_Trickle(content), piece_size=100)  # type: ignore[arg-type]
    assert got.blobs == [blob_id(content[i:i + 100]) for i in (0, 100, 200)]


# -- writing and reading ------------------------------------------------------------------------

@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
def test_round_trip_through_stored_bytes(scratch: Path, age_key: x25519.Identity,
                                         encrypted: bool) -> None:
    blobs = [os.urandom(n) for n in (0, 1, 700, 3000, 100)]
    key = KEY if encrypted else None
    written = write(scratch, blobs, key=key, pack_size=3500,
                    recipients=[age_key.to_public()] if encrypted else None)
    assert len(written.packs) == 2  # closed before a blob would cross the pack size
    for pack in written.packs:
        stored = written.stored[pack.name]
        assert pack.name == hashlib.sha256(stored).hexdigest() and pack.size == len(stored)
        assert stored.startswith(packs.AGE_MAGIC if encrypted else b"\x28\xb5\x2f\xfd")
        assert pack.content_size <= 3500
        assert pack.key == f"packs/{pack.name[:2]}/{pack.name}"
    found: dict[str, bytes] = {}
    for name, stored in written.stored.items():
        with open_pack(name, io.BytesIO(stored), scratch, key=key,
                       identities=[age_key] if encrypted else None) as reader:
            found.update(reader.blobs())
            assert reader.index.ids == ("hmac-sha256" if encrypted else "sha256")
    assert found == {blob_id(b, key): b for b in blobs}


def test_dedup_within_a_pack_and_against_what_is_stored(scratch: Path) -> None:
    stored_before = {blob_id(b"already on the target")}
    written = Written({}, [])
    with PackWriter(scratch, written.on_pack, known=stored_before.__contains__) as writer:
        adds = [writer.add(blob_id(d), d) for d in
                (b"photo", b"photo", b"already on the target", b"homework")]
        # Two files with the same content, read in separate calls, give the same blobs.
        for _ in range(2):
            file_blobs(io.BytesIO(b"homework" * 10), piece_size=8, on_piece=writer.add)
    assert adds == [True, False, False, True]
    assert len(written.packs) == 1
    assert [b.id for b in written.packs[0].blobs] == [blob_id(b"photo"), blob_id(b"homework")]


def test_a_pack_closes_at_the_blob_limit(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs, "MAX_BLOBS", 3)
    written = write(scratch, [bytes([i]) for i in range(7)])
    assert [len(p.blobs) for p in written.packs] == [3, 3, 1]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
def test_a_flipped_byte_is_damage_naming_the_pack(scratch: Path, age_key: x25519.Identity,
                                                  encrypted: bool) -> None:
    written = write(scratch, [os.urandom(5000), os.urandom(5000)],
                    recipients=[age_key.to_public()] if encrypted else None)
    (name, stored), = written.stored.items()
    for where in (0, len(stored) // 2, len(stored) - 1):
        damaged = bytearray(stored)
        damaged[where] ^= 0x40
        for read in (lambda s: read_index(name, s, scratch, [age_key]),
                     lambda s: open_pack(name, s, scratch, identities=[age_key]).__enter__()):
            with pytest.raises(IntegrityError, match=f"pack {name}"):
                read(io.BytesIO(bytes(damaged)))
    with pytest.raises(IntegrityError, match=f"pack {name}: stored bytes do not match"):
        read_index(name, io.BytesIO(stored[:-1]), scratch, [age_key])


def test_a_blob_that_does_not_match_its_id_names_pack_and_blob(scratch: Path) -> None:
    written = Written({}, [])
    liar = blob_id(b"what the index says")
    with PackWriter(scratch, written.on_pack) as writer:
        writer.add(blob_id(b"fine"), b"fine")
        writer.add(liar, b"what the pack holds")
    (name, stored), = written.stored.items()
    with open_pack(name, io.BytesIO(stored), scratch) as reader:
        assert reader.read(blob_id(b"fine")) == b"fine"
        with pytest.raises(IntegrityError, match=f"pack {name}: blob {liar}"):
            reader.read(liar)
        with pytest.raises(IntegrityError, match=f"pack {name}: holds no blob"):
            reader.read(blob_id(b"elsewhere"))


def test_the_wrong_keys_make_a_pack_unusable_not_damaged(scratch: Path,
                                                         age_key: x25519.Identity) -> None:
    written = write(scratch, [b"a", b"b"], key=KEY, recipients=[age_key.to_public()])
    (name, stored), = written.stored.items()

    def opened(**kw: object) -> None:
        with open_pack(name, io.BytesIO(stored), scratch, **kw):  # type: ignore[arg-type]
            pass

    opened(key=KEY, identities=[age_key])
    with pytest.raises(UnusableCopyError, match="cannot decrypt"):
        opened(key=KEY, identities=[x25519.Identity.generate()])
    with pytest.raises(UnusableCopyError, match="an age identity is needed"):
        opened(key=KEY)
    with pytest.raises(UnusableCopyError, match=f"dedup key {packs.key_id(KEY)}, not this"):
        opened(key=b"another key", identities=[age_key])
    with pytest.raises(UnusableCopyError, match="a dedup_key is needed"):
        opened(identities=[age_key])


def test_a_targets_pack_index_is_rebuilt_from_its_packs_alone(tmp_path: Path,
                                                               scratch: Path) -> None:
    target = LocalTarget(LocalTargetConfig(name="disk", type="local", path=tmp_path / "disk"))
    blobs = [os.urandom(n) for n in (10, 2000, 2000, 5)]

    def upload(pack: StoredPack) -> None:
        upload = target.writer(pack.key)
        upload.write(pack.path.read_bytes())
        upload.commit()

    wrote: list[StoredPack] = []

    def upload_and_note(pack: StoredPack) -> None:
        upload(pack)
        wrote.append(pack)

    with PackWriter(scratch, upload_and_note, pack_size=2500) as w:
        for data in blobs:
            w.add(blob_id(data), data)
    rebuilt = {}
    for obj in target.list(packs.PACKS_PREFIX):
        name = packs.pack_name(obj.key)
        assert name is not None
        with target.open(obj.key) as stored:
            index = read_index(name, stored, scratch)
        rebuilt[name] = index.blobs
    assert rebuilt == {p.name: p.blobs for p in wrote} and len(wrote) == 2
    assert catalog.scan([target]) == []  # packs are no backup of their own
    assert packs.pack_name("20261130T021500Z/manifest.json") is None
    assert packs.pack_name(f"packs/00/{'ab' * 32}") is None
    with pytest.raises(ValueError, match="not a pack name"):
        packs.pack_key("../etc")


def test_a_failed_run_leaves_no_scratch(scratch: Path) -> None:
    with pytest.raises(RuntimeError), PackWriter(scratch, lambda p: None) as writer:
        writer.add(blob_id(b"x"), b"x")
        raise RuntimeError("the walk failed")

    def refuse(pack: StoredPack) -> None:
        raise RuntimeError("every target failed")

    with pytest.raises(RuntimeError), PackWriter(scratch, refuse) as writer:
        writer.add(blob_id(b"x"), b"x")
    with pytest.raises(ValueError, match="not a blob id"):
        PackWriter(scratch, refuse).add("photo.jpg", b"x")


def test_memory_stays_bounded_by_a_blob_not_a_pack(scratch: Path) -> None:
    """40 MiB in one pack, added and read back 1 MiB at a time: Python's heap stays far
    below the pack (zstd's and age's buffers are C, counted by the RSS figures instead)."""
    mib, count = 1 << 20, 40
    names: list[str] = []
    tracemalloc.start()
    try:
        def keep(pack: StoredPack) -> None:
            os.link(pack.path, scratch.parent / pack.name)
            names.append(pack.name)

        with PackWriter(scratch, keep, pack_size=64 * mib) as writer:
            for i in range(count):
                data = i.to_bytes(4, "big") * (mib // 4)
                writer.add(blob_id(data), data)
        with (scratch.parent / names[0]).open("rb") as stored, \
                open_pack(names[0], stored, scratch) as reader:
            total = sum(len(data) for _, data in reader.blobs())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == count * mib
    assert peak < 12 * mib, f"peak {peak / mib:.1f} MiB"


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blobs=st.lists(st.binary(max_size=300), max_size=30),
       pack_size=st.integers(min_value=1, max_value=2000), keyed=st.booleans())
def test_property_every_blob_added_comes_back_once(scratch: Path, blobs: list[bytes],
                                                   pack_size: int, keyed: bool) -> None:
    """With ``known`` fed by ``on_pack`` (as a run's index of stored blobs will be), every
    distinct blob is stored exactly once, whatever the pack boundaries."""
    key = KEY if keyed else None
    written, stored_ids = Written({}, []), set[str]()

    def on_pack(pack: StoredPack) -> None:
        written.on_pack(pack)
        stored_ids.update(b.id for b in pack.blobs)

    with PackWriter(scratch, on_pack, key=key, pack_size=pack_size,
                    known=stored_ids.__contains__) as writer:
        for data in blobs:
            writer.add(blob_id(data, key), data)
    back: list[tuple[str, bytes]] = []
    for name, stored in written.stored.items():
        with open_pack(name, io.BytesIO(stored), scratch, key=key) as reader:
            back += reader.blobs()
    assert sorted(back) == sorted({blob_id(b, key): b for b in blobs}.items())
    for pack in written.packs:  # a pack crosses its size only with a single blob
        assert pack.content_size <= pack_size or len(pack.blobs) == 1


# -- by hand ------------------------------------------------------------------------------------

def make_tree(root: Path) -> None:
    """Files (one of several pieces, one empty), nested folders, a symlink, modes, mtimes."""
    (root / "photos" / "2026").mkdir(parents=True)
    (root / "photos" / "2026" / "class.jpg").write_bytes(os.urandom(2500))
    (root / "photos" / "copy.jpg").write_bytes((root / "photos/2026/class.jpg").read_bytes())
    (root / "empty.txt").write_bytes(b"")
    (root / "report.pdf").write_bytes(b"%PDF-1.4 signed" * 20)
    (root / "report.pdf").chmod(0o640)
    (root / "empty dir").mkdir(mode=0o750)
    (root / "latest").symlink_to("photos/2026/class.jpg")
    for path, mtime in (("report.pdf", 1_600_000_000), ("photos/2026/class.jpg", 1_700_000_000),
                        ("photos/2026", 1_650_000_000), ("photos", 1_500_000_000),
                        ("empty dir", 1_400_000_000)):
        os.utime(root / path, ns=(mtime * 10**9 + 123, mtime * 10**9 + 123))


def index_tree(root: Path, writer: PackWriter, key: bytes | None) -> list[dict[str, object]]:
    """Uploads index entries (the format docs/packs.md gives) for every entry under root."""
    entries: list[dict[str, object]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st_ = path.lstat()
            entry: dict[str, object] = {
                "path": path.relative_to(root).as_posix(), "mode": stat.S_IMODE(st_.st_mode),
                "uid": st_.st_uid, "gid": st_.st_gid, "mtime_ns": st_.st_mtime_ns}
            if path.is_symlink():
                entry |= {"type": "symlink", "target": os.readlink(path)}  # noqa: PTH115 - exact text
            elif path.is_dir():
                entry |= {"type": "dir"}
            else:
                got = file_blobs(path, key, piece_size=1000, on_piece=writer.add)
                entry |= {"type": "file", "size": got.size, "sha256": got.sha256,
                          "blobs": got.blobs}
            entries.append(entry)
    return entries


def by_hand(index: Path, packs_dir: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/python3", str(SCRIPT), str(index), str(packs_dir),
                           str(dest)], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("pieces", [False, True], ids=["index whole", "index in pieces"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "age"])
def test_the_by_hand_script_rebuilds_the_tree(tmp_path: Path, scratch: Path,
                                              age_key: x25519.Identity, encrypted: bool,
                                              pieces: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src, stored_dir, packs_dir = tmp_path / "src", tmp_path / "stored", tmp_path / "packs"
    src.mkdir()
    stored_dir.mkdir()
    packs_dir.mkdir()
    make_tree(src)
    key = KEY if encrypted else None

    def keep(pack: StoredPack) -> None:
        (stored_dir / pack.name).write_bytes(pack.path.read_bytes())

    monkeypatch.setattr(uploads_index, "CUT_MASK", 0)  # a cut after every line
    with PackWriter(scratch, keep, key=key, pack_size=1500,
                    recipients=[age_key.to_public()] if encrypted else []) as writer:
        entries = index_tree(src, writer, key)
        lines = "".join(json.dumps(e) + "\n" for e in entries).encode()
        listed = []
        if pieces:  # as a backup stores it: each piece a blob, the list in its place
            cutter = uploads_index.Cutter(key, lambda chunk, data: writer.add(chunk.id, data))
            cutter.feed(lines.splitlines(keepends=True))
            listed = [chunk.to_line() for chunk in cutter.finish()]
            assert len(listed) >= 3
    assert len(writer.packs) >= 2
    for pack in stored_dir.iterdir():  # what a person does: age -d, then zstd -d
        compressed = pack
        if encrypted:
            compressed = tmp_path / f"{pack.name}.zst"
            compressed.write_bytes(decrypt(pack.read_bytes(), [age_key]))
        subprocess.run(["zstd", "-q", "-d", str(compressed), "-o", str(packs_dir / pack.name)],
                       check=True, timeout=60)
    index = tmp_path / "uploads.index.jsonl"
    index.write_bytes(b"".join(listed) if pieces else lines)
    done = by_hand(index, packs_dir, tmp_path / "restored")
    assert done.returncode == 0, done.stderr
    assert tree_snapshot(tmp_path / "restored") == tree_snapshot(src)
    assert (tmp_path / "restored" / "latest").is_symlink()
    if pieces:  # a piece that does not match what the list says is refused
        wrong = json.loads(listed[1])
        wrong["sha256"] = "0" * 64
        index.write_bytes(b"".join([listed[0], json.dumps(wrong).encode() + b"\n",
                                    *listed[2:]]))
        done = by_hand(index, packs_dir, tmp_path / "again")
        assert done.returncode != 0 and "does not match: damaged" in done.stderr, done.stderr


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "a/../../outside"])
def test_the_by_hand_script_refuses_paths_leaving_the_folder(tmp_path: Path,
                                                             path: str) -> None:
    index = tmp_path / "index.jsonl"
    index.write_text(json.dumps({"path": path, "type": "dir", "mode": 0o755}) + "\n",
                     encoding="utf-8")
    (tmp_path / "packs").mkdir()
    done = by_hand(index, tmp_path / "packs", tmp_path / "restored")
    assert done.returncode != 0 and "unsafe path" in done.stderr
    assert not (tmp_path / "outside").exists()


def test_the_by_hand_script_never_writes_through_a_link(tmp_path: Path, scratch: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "packs").mkdir()
    index = tmp_path / "index.jsonl"
    index.write_text(json.dumps({"path": "a", "type": "symlink", "target": str(outside)}) + "\n"
                     + json.dumps({"path": "a/x", "type": "file", "mode": 0o644}) + "\n",
                     encoding="utf-8")
    done = by_hand(index, tmp_path / "packs", tmp_path / "restored")
    assert done.returncode != 0 and "refused: a is a link" in done.stderr
    assert list(outside.iterdir()) == []


def test_the_by_hand_script_refuses_a_file_that_does_not_match(tmp_path: Path,
                                                               scratch: Path) -> None:
    packs_dir = tmp_path / "packs"
    packs_dir.mkdir()

    def keep(pack: StoredPack) -> None:
        subprocess.run(["zstd", "-q", "-d", str(pack.path), "-o", str(packs_dir / pack.name)],
                       check=True, timeout=60)

    with PackWriter(scratch, keep) as writer:
        writer.add(blob_id(b"homework"), b"homework")
    index = tmp_path / "index.jsonl"
    index.write_text(json.dumps({"path": "hw.txt", "type": "file", "mode": 0o644,
                                 "blobs": [blob_id(b"homework")],
                                 "sha256": blob_id(b"other")}) + "\n", encoding="utf-8")
    done = by_hand(index, packs_dir, tmp_path / "restored")
    assert done.returncode != 0 and "hw.txt: SHA-256 does not match" in done.stderr
