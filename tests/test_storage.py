"""The storage contract, run against every target type, and fan-out.

``local`` on a temporary folder, ``s3`` through moto's real HTTP S3 API (boto3 over HTTP), and
``gcs`` through fake-gcs-server (google-cloud-storage over HTTP). To add a type, extend
``TARGET_KINDS`` and ``_make_target``. Tests that poke at the file system directly live in
``TestLocalSpecifics``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from conexa_backup.catalog import scan
from conexa_backup.errors import ObjectNotFoundError, StorageError
from conexa_backup.manifest import MANIFEST_NAME
from conexa_backup.scratch import scratch_name
from conexa_backup.storage.base import ObjectInfo, Target, check_key
from conexa_backup.storage.fanout import AllTargetsFailed, MultiUpload
from conexa_backup.storage.gcs import GCSTargetConfig
from conexa_backup.storage.local import LocalTarget, LocalTargetConfig
from conexa_backup.storage.registry import create_target, target_types
from conexa_backup.storage.s3 import MAX_PART, MAX_PARTS, S3TargetConfig, max_object_size, part_size
from conexa_backup.testing.emulators import S3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET

TARGET_KINDS = ["local", "s3", "gcs"]
BID = "20260301T021500Z"
_prefixes = itertools.count()


def _make_target(kind: str, base: Path, name: str = "t1", *, s3: S3Server | None = None) -> Target:
    # Each cloud target gets a fresh prefix in the shared bucket: tests never see each other.
    prefix = f"test-{os.getpid()}-{next(_prefixes)}/{name}"
    if kind == "local":
        return LocalTarget(LocalTargetConfig(name=name, type="local", path=base / name))
    if kind == "s3":
        assert s3 is not None
        return create_target(S3TargetConfig(name=name, type="s3", bucket=S3_BUCKET,
                                            prefix=prefix, endpoint_url=s3.endpoint))
    if kind == "gcs":
        return create_target(GCSTargetConfig(name=name, type="gcs", bucket=GCS_BUCKET,
                                             prefix=prefix))
    raise AssertionError(kind)


@pytest.fixture(params=TARGET_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "gcs":
        request.getfixturevalue("gcs_server")
    return str(request.param)


@pytest.fixture
def make_target(kind: str, tmp_path: Path, s3_server: S3Server) -> Callable[[str], Target]:
    return lambda name: _make_target(kind, tmp_path, name, s3=s3_server)


@pytest.fixture
def target(make_target: Callable[[str], Target]) -> Target:
    return make_target("t1")


def put(target: Target, key: str, data: bytes, pieces: int = 3) -> ObjectInfo:
    upload = target.writer(key)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        upload.write(data[i:i + step])
    return upload.commit()


def read(target: Target, key: str) -> bytes:
    with target.open(key) as fh:
        return fh.read()


def keys(target: Target, prefix: str = "") -> list[str]:
    return sorted(o.key for o in target.list(prefix))


def broken_local(tmp_path: Path, name: str) -> LocalTarget:
    """A target whose folder cannot be created, even by root: its parent is a regular file."""
    blocker = tmp_path / f"{name}-is-a-file"
    blocker.write_bytes(b"not a folder")
    return LocalTarget(LocalTargetConfig(name=name, type="local", path=blocker / "backups"))


# -- the contract -------------------------------------------------------------------------------

class TestTargetContract:
    def test_commit_makes_object_visible(self, target: Target) -> None:
        data = os.urandom(300_000)
        upload = target.writer(f"{BID}/database.dump.zst")
        upload.write(data[:1000])
        assert keys(target) == []  # nothing visible before commit
        upload.write(data[1000:])
        info = upload.commit()
        assert info.key == f"{BID}/database.dump.zst"
        assert info.size == len(data)
        assert read(target, f"{BID}/database.dump.zst") == data
        listed = list(target.list())
        assert [(o.key, o.size) for o in listed] == [(f"{BID}/database.dump.zst", len(data))]
        assert listed[0].modified is not None and listed[0].modified.tzinfo is not None

    def test_empty_object(self, target: Target) -> None:
        info = target.writer(f"{BID}/empty").commit()
        assert info.size == 0
        assert read(target, f"{BID}/empty") == b""

    def test_commit_replaces_existing(self, target: Target) -> None:
        put(target, f"{BID}/x", b"old contents")
        put(target, f"{BID}/x", b"new")
        assert read(target, f"{BID}/x") == b"new"
        assert keys(target) == [f"{BID}/x"]

    def test_abort_leaves_nothing(self, target: Target) -> None:
        upload = target.writer(f"{BID}/database.dump.zst")
        upload.write(b"partial" * 1000)
        upload.abort()
        upload.abort()  # idempotent, never raises
        assert keys(target) == []
        with pytest.raises(ObjectNotFoundError):
            target.open(f"{BID}/database.dump.zst")

    def test_abort_keeps_previous_version(self, target: Target) -> None:
        put(target, f"{BID}/x", b"committed")
        upload = target.writer(f"{BID}/x")
        upload.write(b"replacement that never lands")
        upload.abort()
        assert read(target, f"{BID}/x") == b"committed"

    def test_list_prefix_filters(self, target: Target) -> None:
        other = "20260302T021500Z"
        for key in (f"{BID}/a", f"{BID}/b", f"{other}/a", "README"):
            put(target, key, key.encode())
        assert keys(target, f"{BID}/") == [f"{BID}/a", f"{BID}/b"]
        assert keys(target, f"{other}/") == [f"{other}/a"]
        assert keys(target, "2026030") == [f"{BID}/a", f"{BID}/b", f"{other}/a"]
        assert keys(target, "nothing") == []
        assert keys(target) == sorted([f"{BID}/a", f"{BID}/b", f"{other}/a", "README"])
        put(target, "packs/ab/ab12.pack", b"p")
        put(target, "packs/cd/cd34.pack", b"q")
        assert keys(target, "packs/") == ["packs/ab/ab12.pack", "packs/cd/cd34.pack"]
        assert keys(target, "packs/a") == ["packs/ab/ab12.pack"]
        assert keys(target, "packs/cd/") == ["packs/cd/cd34.pack"]
        assert keys(target, f"{BID}/b") == [f"{BID}/b"]
        assert keys(target, "nothing/") == keys(target, "packs/ab/ab12.pack/") == []
        sizes = {o.key: o.size for o in target.list()}
        assert sizes[f"{BID}/a"] == len(f"{BID}/a")

    def test_list_of_never_used_target_is_empty(self, target: Target) -> None:
        assert keys(target) == []

    def test_delete_is_idempotent(self, target: Target) -> None:
        put(target, f"{BID}/a", b"1")
        put(target, f"{BID}/b", b"2")
        target.delete(f"{BID}/a")
        target.delete(f"{BID}/a")
        target.delete(f"{BID}/never-existed")
        target.delete("20991231T000000Z/nothing-here-either")
        assert keys(target) == [f"{BID}/b"]
        assert read(target, f"{BID}/b") == b"2"

    def test_open_missing_key(self, target: Target) -> None:
        with pytest.raises(ObjectNotFoundError) as info:
            target.open(f"{BID}/nope")
        assert info.value.target == "t1"
        assert f"{BID}/nope" in str(info.value)
        put(target, f"{BID}/other", b"x")
        with pytest.raises(ObjectNotFoundError):
            target.open(f"{BID}/nope")

    @pytest.mark.parametrize("bad", [
        "../x", "/abs", "a//b", ".hidden", "", "a/../b", "a/.tmp-x", "a/", "..", ".",
        "a\\b", "a b", "ü",
    ])
    def test_invalid_keys_rejected(self, target: Target, bad: str) -> None:
        with pytest.raises(ValueError, match="invalid storage key"):
            target.writer(bad)
        with pytest.raises(ValueError, match="invalid storage key"):
            target.open(bad)
        with pytest.raises(ValueError, match="invalid storage key"):
            target.delete(bad)
        assert keys(target) == []

    def test_targets_are_independent(self, make_target: Callable[[str], Target]) -> None:
        one, two = make_target("one"), make_target("two")
        put(one, f"{BID}/a", b"1")
        assert keys(two) == []
        assert one.describe() != two.describe()

    def test_catalog_ignores_foreign_keys(self, target: Target) -> None:
        put(target, f"{BID}/database.dump.zst", b"dump")
        for key in ("README.txt", "notes/todo.txt", "2026-03-01/db.dump", "20260301/x"):
            put(target, key, b"someone else's")
        assert "README.txt" in keys(target)  # the target lists what is there...
        backups = scan([target])  # ...but the catalog only sees <backup id>/<name>
        assert [b.id for b in backups] == [BID]
        assert [o.key for o in backups[0].copies[0].objects] == [f"{BID}/database.dump.zst"]
        assert backups[0].status == "incomplete"

    def test_catalog_ignores_nested_keys(self, target: Target) -> None:
        put(target, f"{BID}/database.dump.zst", b"dump")
        put(target, f"{BID}/extra/notes.txt", b"someone else's")
        backups = scan([target])
        assert [o.key for o in backups[0].copies[0].objects] == [f"{BID}/database.dump.zst"]


# -- local specifics ------------------------------------------------------------------------------

class TestLocalSpecifics:
    @pytest.fixture
    def local(self, tmp_path: Path) -> LocalTarget:
        target = _make_target("local", tmp_path, "nas")
        assert isinstance(target, LocalTarget)
        return target

    def test_created_through_registry(self, tmp_path: Path) -> None:
        assert "local" in target_types()
        config = LocalTargetConfig(name="reg", type="local", path=tmp_path / "reg")
        target = create_target(config)
        assert isinstance(target, LocalTarget)
        assert target.describe() == str(tmp_path / "reg")

    def test_modes(self, local: LocalTarget) -> None:
        old = os.umask(0o022)
        try:
            put(local, f"{BID}/database.dump.zst", b"secret dump")
        finally:
            os.umask(old)
        assert stat.S_IMODE(local.root.stat().st_mode) == 0o700
        assert stat.S_IMODE((local.root / BID).stat().st_mode) == 0o700
        assert stat.S_IMODE((local.root / BID / "database.dump.zst").stat().st_mode) == 0o600

    def test_modes_with_permissive_umask(self, local: LocalTarget) -> None:
        old = os.umask(0)
        try:
            put(local, f"{BID}/database.dump.zst", b"secret dump")
        finally:
            os.umask(old)
        assert stat.S_IMODE(local.root.stat().st_mode) == 0o700
        assert stat.S_IMODE((local.root / BID).stat().st_mode) == 0o700
        assert stat.S_IMODE((local.root / BID / "database.dump.zst").stat().st_mode) == 0o600

    def test_abort_removes_temporary_file(self, local: LocalTarget) -> None:
        upload = local.writer(f"{BID}/x")
        upload.write(b"data")
        temps = [p for p in (local.root / BID).iterdir() if p.name.startswith(".")]
        assert len(temps) == 1  # written under a hidden name...
        assert keys(local) == []  # ...which is never listed
        upload.abort()
        assert not (local.root / BID).exists()  # nor the folder it made

    def test_commit_leaves_no_temporary_file(self, local: LocalTarget) -> None:
        put(local, f"{BID}/x", b"data")
        assert [p.name for p in (local.root / BID).iterdir()] == ["x"]

    def test_hidden_files_and_folders_ignored(self, local: LocalTarget) -> None:
        put(local, f"{BID}/x", b"data")
        (local.root / ".DS_Store").write_bytes(b"junk")
        (local.root / BID / ".tmp-x.999").write_bytes(b"leftover of a crash")
        (local.root / ".snapshot" / BID).mkdir(parents=True)
        (local.root / ".snapshot" / BID / "x").write_bytes(b"nas snapshot")
        assert keys(local) == [f"{BID}/x"]
        assert keys(local, f".snapshot/{BID}/") == keys(local, f"{BID}/.tmp-x") == []

    def test_a_prefix_is_listed_from_its_folder_never_through_a_link(
            self, local: LocalTarget, tmp_path: Path) -> None:
        put(local, "packs/ab/ab12.pack", b"p")
        elsewhere = tmp_path / "elsewhere"
        (elsewhere / "cd").mkdir(parents=True)
        (elsewhere / "cd" / "cd34.pack").write_bytes(b"not ours")
        (local.root / "packs" / "cd").symlink_to(elsewhere / "cd")
        (local.root / "linked").symlink_to(elsewhere)
        assert keys(local, "packs/") == keys(local) == ["packs/ab/ab12.pack"]
        assert keys(local, "packs/cd/") == keys(local, "linked/cd/") == []

    def test_delete_removes_empty_backup_folder_only(self, local: LocalTarget) -> None:
        put(local, f"{BID}/a", b"1")
        put(local, f"{BID}/b", b"2")
        put(local, "top-level", b"3")
        local.delete(f"{BID}/a")
        assert (local.root / BID).is_dir()  # not empty yet
        local.delete(f"{BID}/b")
        assert not (local.root / BID).exists()
        local.delete("top-level")
        assert local.root.is_dir()  # the root itself is never removed
        assert list(local.root.iterdir()) == []

    def test_delete_keeps_folder_with_foreign_files(self, local: LocalTarget) -> None:
        put(local, f"{BID}/a", b"1")
        (local.root / BID / ".keep").write_bytes(b"")
        local.delete(f"{BID}/a")
        assert (local.root / BID / ".keep").exists()

    def test_catalog_sees_foreign_files_only_when_shaped_like_backups(
            self, local: LocalTarget) -> None:
        local.root.mkdir(mode=0o700)
        (local.root / "random.tar").write_bytes(b"placed by hand")
        (local.root / "old-backups").mkdir()
        (local.root / "old-backups" / "dump.sql").write_bytes(b"placed by hand")
        assert keys(local) == ["old-backups/dump.sql", "random.tar"]
        assert scan([local]) == []

    def test_unwritable_location_is_storage_error(self, tmp_path: Path) -> None:
        target = broken_local(tmp_path, "usb")
        with pytest.raises(StorageError) as info:
            target.writer(f"{BID}/x")
        assert info.value.target == "usb"
        assert str(info.value).startswith("target 'usb': ")
        assert str(target.root) in str(info.value)

    def test_unreadable_location_is_storage_error(self, tmp_path: Path) -> None:
        target = broken_local(tmp_path, "usb")
        with pytest.raises(StorageError) as info:
            target.open(f"{BID}/x")
        assert info.value.target == "usb"
        assert keys(target) == []  # not a folder: nothing there

    def test_check_key_accepts_our_keys(self) -> None:
        for key in (f"{BID}/database.dump.zst", f"{BID}-2/uploads.tar.gz", "a",
                    f"{BID}/{MANIFEST_NAME}"):
            assert check_key(key) == key


# -- fan-out --------------------------------------------------------------------------------------

class TestMultiUpload:
    def test_one_broken_target(self, tmp_path: Path) -> None:
        good = _make_target("local", tmp_path, "good")
        bad = broken_local(tmp_path, "bad")
        upload = MultiUpload([bad, good], f"{BID}/database.dump.zst")
        assert set(upload.failures) == {"bad"}
        assert "target 'bad'" in upload.failures["bad"]
        assert upload.write(b"abc") == 3
        upload.write(b"def")
        stored = upload.commit()
        assert list(stored) == ["good"]
        assert stored["good"].size == 6
        assert read(good, f"{BID}/database.dump.zst") == b"abcdef"
        assert set(upload.failures) == {"bad"}

    def test_all_good_targets(self, tmp_path: Path) -> None:
        targets = [_make_target("local", tmp_path, n) for n in ("a", "b", "c")]
        upload = MultiUpload(targets, f"{BID}/x")
        upload.write(b"same bytes everywhere")
        stored = upload.commit()
        assert sorted(stored) == ["a", "b", "c"]
        assert upload.failures == {}
        for t in targets:
            assert read(t, f"{BID}/x") == b"same bytes everywhere"

    def test_all_broken(self, tmp_path: Path) -> None:
        targets = [broken_local(tmp_path, "x"), broken_local(tmp_path, "y")]
        with pytest.raises(AllTargetsFailed) as info:
            MultiUpload(targets, f"{BID}/x")
        assert set(info.value.failures) == {"x", "y"}
        assert isinstance(info.value, StorageError)
        assert "every target failed" in str(info.value)

    def test_target_failing_mid_stream(self, tmp_path: Path) -> None:
        good = _make_target("local", tmp_path, "good")
        flaky = _make_target("local", tmp_path, "flaky")
        upload = MultiUpload([good, flaky], f"{BID}/x")
        upload.write(b"first")
        # Pull the folder out from under the flaky target: its commit (rename) must fail.
        (tmp_path / "flaky" / BID / f".tmp-{scratch_name('x')}").unlink()
        upload.write(b"second")
        stored = upload.commit()
        assert list(stored) == ["good"]
        assert set(upload.failures) == {"flaky"}
        assert read(good, f"{BID}/x") == b"firstsecond"
        assert keys(flaky) == []

    def test_abort(self, tmp_path: Path) -> None:
        targets = [_make_target("local", tmp_path, n) for n in ("a", "b")]
        upload = MultiUpload(targets, f"{BID}/x")
        upload.write(b"data")
        upload.abort()
        assert all(keys(t) == [] for t in targets)


# -- large objects and S3 part arithmetic ----------------------------------------------------------

def test_object_larger_than_one_part(target: Target) -> None:
    """Crosses the first multipart boundary (16 MiB) and GCS's 8 MiB chunks."""
    data = os.urandom(1 << 20) * 17 + b"tail"
    info = put(target, f"{BID}/big.bin", data, pieces=40)
    assert info.size == len(data)
    assert hashlib.sha256(read(target, f"{BID}/big.bin")).digest() == \
        hashlib.sha256(data).digest()
    assert [o.size for o in target.list(BID)] == [len(data)]


def test_missing_bucket_is_a_clear_storage_error(kind: str, tmp_path: Path,
                                                 s3_server: S3Server) -> None:
    if kind == "local":
        target: Target = broken_local(tmp_path, "gone")
    elif kind == "s3":
        target = create_target(S3TargetConfig(name="gone", type="s3", bucket="no-such-bucket",
                                              endpoint_url=s3_server.endpoint))
    else:
        target = create_target(GCSTargetConfig(name="gone", type="gcs", bucket="no-such-bucket"))
    with pytest.raises(StorageError, match="gone") as excinfo:
        upload = target.writer(f"{BID}/x")
        upload.write(b"x")
        upload.commit()
    if kind != "local":
        assert "no-such-bucket" in str(excinfo.value) and "does not exist" in str(excinfo.value)
        with pytest.raises(StorageError, match="does not exist"):
            list(target.list())


def test_part_sizes_fit_a_terabyte_and_s3_limits() -> None:
    tb = 10**12
    sizes = []
    while sum(sizes) < tb:
        sizes.append(part_size(len(sizes) + 1))
    assert len(sizes) <= MAX_PARTS  # S3's 10,000-part limit
    assert all(5 << 20 <= s <= MAX_PART for s in sizes)  # 5 MiB minimum, 5 GiB maximum
    assert 5000 < len(sizes) <= 6000 and sizes[-1] == 512 << 20  # tier 6: 512 MiB parts
    assert max_object_size() >= 5 * (1 << 40)  # S3's 5 TiB object limit is reachable
    assert part_size(1) == part_size(1000) == 16 << 20 and part_size(1001) == 32 << 20
