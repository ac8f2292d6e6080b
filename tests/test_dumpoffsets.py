"""Data offsets filled into a dump that pg_dump wrote into a pipe (conexa_backup.dumpoffsets).

The reference is pg_dump itself: the same database dumped into a pipe and with ``-f`` at the
same (faked) second differ only in the offsets, and the patched pipe dump must be byte for byte
the ``-f`` file, for pg_dump 15, 16 and 18 (the three layouts of the archive versions read).
Run on the Conexa-like sample, Chinook, the Pagila schema, and a database made to trip a search
(an empty table, a row whose chunk length has four zero bytes, large objects holding the very
bytes a block header is found by). Mutated archives never make the finder raise nor point an
offset anywhere but at its own block's header; a wrong offset that reaches pg_restore anyway
is caught and the dump restored as stored.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conexa_backup import catalog, dumpoffsets
from conexa_backup.actions import restore_db
from conexa_backup.actions.context import Context
from conexa_backup.config import load_config
from conexa_backup.postgres import ConnInfo
from conexa_backup.testing.cluster import Cluster
from conexa_backup.testing.compare import plain_dump, table_row_counts
from tests.conftest import TEMPLATE_DB, Workspace
from tests.test_drill import drill_chinook, drill_pagila  # noqa: F401  (fixtures)

FAKE_TIME = "2026-01-02 03:04:05"  # both dumps made "at" the same second: same header bytes
# What a block header is found by (five zero bytes, then type 1, sign 0, a small dump id):
# stored in a large object, where a search that did not stop at binary data would be fooled.
DECOY = (b"\x00" * 5 + b"\x01\x00" + bytes([7, 0, 0, 0])) * 64


@pytest.fixture(scope="module")
def tricky(cluster: Cluster) -> Iterator[str]:
    name = "offsets_tricky"
    cluster.drop_database(name)
    cluster.create_database(name)
    cluster.execute(
        "CREATE TABLE a_before (id int PRIMARY KEY, note text);"
        "INSERT INTO a_before SELECT g, repeat('é', g % 50) FROM generate_series(1, 3000) g;"
        "CREATE TABLE b_empty (id int);"
        # One COPY line of exactly 2^24 bytes: its chunk length is 00 00 00 01, four zeros.
        "CREATE TABLE c_big (v text);"
        "INSERT INTO c_big SELECT repeat('x', (1 << 24) - 1);"
        "CREATE TABLE d_after (id bigint, b bytea);"
        "INSERT INTO d_after SELECT g, '\\x000000000001'::bytea FROM generate_series(1, 500) g;"
        f"SELECT lo_from_bytea(0, '\\x{DECOY.hex()}'::bytea);"
        "SELECT lo_from_bytea(0, '\\x00'::bytea);", name)
    yield name
    cluster.drop_database(name)


# pg_dump 16 and 18 (archive versions 1.15 and 1.16; the system's 15 writes 1.14), unpacked by
# scripts/bootstrap.sh --test from the PostgreSQL builds inside two PyPI wheels.
CLIENTS = Path(__file__).resolve().parents[1] / ".venv" / "pg-clients"


def _pg_dump(version: str) -> tuple[str, dict[str, str]]:
    if version == "15":
        return "pg_dump", {}
    folder = CLIENTS / version
    assert (folder / "bin" / "pg_dump").exists(), f"{folder}: run scripts/bootstrap.sh --test"
    return str(folder / "bin" / "pg_dump"), {"LD_LIBRARY_PATH": str(folder / "lib")}


def _dump(cluster: Cluster, db: str, *extra: str, version: str = "15") -> bytes:
    """``pg_dump -Fc -Z0`` at FAKE_TIME: into a pipe (no ``extra``) or a file (``-f``)."""
    program, env = _pg_dump(version)
    argv = ["faketime", "-f", FAKE_TIME, program, "-Fc", "-Z0", "--no-password", "-d", db,
            *extra]
    proc = subprocess.run(argv, env={**cluster.env(), **env}, capture_output=True, check=True)
    return proc.stdout


def _find(data: bytes, step: int) -> dumpoffsets.OffsetFinder:
    finder = dumpoffsets.OffsetFinder()
    for i in range(0, len(data), step):
        finder.feed(data[i:i + step])
    return finder


def _patched(data: bytes, tmp: Path, step: int = 1 << 20) -> bytes:
    finder = _find(data, step)
    offsets = finder.offsets()
    assert offsets, finder.failed  # every dataset here has table data
    path = tmp / "patched.dump"
    path.write_bytes(data)
    dumpoffsets.apply(path, offsets, finder.off_size)
    return path.read_bytes()


@pytest.mark.parametrize("dataset", ["conexa", "drill_chinook", "drill_pagila", "tricky"])
def test_a_patched_pipe_dump_is_pg_dumps_own_file(cluster: Cluster, tmp_path: Path,
                                                   request: pytest.FixtureRequest,
                                                   dataset: str) -> None:
    db = TEMPLATE_DB if dataset == "conexa" else request.getfixturevalue(dataset)
    piped = _dump(cluster, db)
    out = tmp_path / "file.dump"
    _dump(cluster, db, "-f", str(out))
    seekable = out.read_bytes()
    assert piped != seekable  # the pipe's copy lacks the offsets...
    for step in (1, 4096, 1 << 20):  # ...and however it is cut, the patch adds them
        if step == 1 and len(piped) > 2 << 20:
            continue
        assert _patched(piped, tmp_path, step) == seekable


@pytest.mark.parametrize("version", ["16", "18"])
@pytest.mark.parametrize("dataset", ["drill_chinook", "tricky"])
def test_other_pg_dump_versions(cluster: Cluster, tmp_path: Path,
                                request: pytest.FixtureRequest, dataset: str,
                                version: str) -> None:
    db = request.getfixturevalue(dataset)
    piped = _dump(cluster, db, version=version)
    assert piped[5:7] == bytes([1, {"16": 15, "18": 16}[version]])  # the archive's version
    out = tmp_path / "file.dump"
    _dump(cluster, db, "-f", str(out), version=version)
    assert _patched(piped, tmp_path, 4096) == out.read_bytes()


def test_large_objects_stop_the_search(cluster: Cluster, tricky: str) -> None:
    piped = _dump(cluster, tricky)
    toc = dumpoffsets.read_toc(piped)
    assert [s.text for s in toc.slots] == [True, True, True, True, False]
    finder = _find(piped, 1 << 16)
    offsets = finder.offsets()
    assert offsets is not None and len(offsets) == 5  # the blobs block is last: all found
    assert DECOY in piped  # the decoy is there to be found, and was not taken


def test_patched_dump_restores_in_parallel_to_the_same_database(
        cluster: Cluster, tmp_path: Path, tricky: str) -> None:
    path = tmp_path / "patched.dump"
    path.write_bytes(_patched(_dump(cluster, tricky), tmp_path))
    copy = "offsets_tricky_copy"
    cluster.drop_database(copy)
    cluster.create_database(copy)
    try:
        subprocess.run(["pg_restore", "-j2", "--exit-on-error", "-d", copy, str(path)],
                       env=cluster.env(), check=True, capture_output=True)
        assert plain_dump(cluster.env(), copy) == plain_dump(cluster.env(), tricky)
    finally:
        cluster.drop_database(copy)


def test_a_database_without_tables_has_nothing_to_fill(cluster: Cluster) -> None:
    cluster.drop_database("offsets_empty")
    cluster.create_database("offsets_empty")
    try:
        finder = _find(_dump(cluster, "offsets_empty"), 4096)
    finally:
        cluster.drop_database("offsets_empty")
    assert finder.failed is None and finder.offsets() == []


def test_archives_not_understood_are_left_alone(cluster: Cluster, tmp_path: Path) -> None:
    piped = _dump(cluster, TEMPLATE_DB)
    gzipped = subprocess.run(["pg_dump", "-Fc", "-Z1", "-d", TEMPLATE_DB],
                             env=cluster.env(), capture_output=True, check=True).stdout
    cases = {
        "compressed data": gzipped,
        "archive version 1.99": piped[:6] + bytes([99]) + piped[7:],
        "not a custom-format archive": b"PGDMQ" + piped[5:],
    }
    for reason, data in cases.items():
        finder = _find(data, 4096)
        assert finder.offsets() is None and finder.failed == reason
    truncated = _find(piped[: len(piped) // 2], 4096)
    assert truncated.failed is None and truncated.offsets() is None  # blocks not all found


def test_mutated_archives_never_get_a_wrong_offset(cluster: Cluster,
                                                   request: pytest.FixtureRequest) -> None:
    piped = _dump(cluster, request.getfixturevalue("drill_chinook"))
    toc = dumpoffsets.read_toc(piped)
    true = {s.field: pos for s, (_, pos) in zip(toc.slots, _find(piped, 1 << 20).offsets()
                                                   or [], strict=True)}
    rng = random.Random(17)
    patched = 0
    for _ in range(400):
        data = bytearray(piped)
        where = rng.choice([rng.randrange(toc.data_start), rng.randrange(len(data))])
        kind = rng.choice(["set", "zero", "insert", "delete", "cut"])
        if kind == "set":
            data[where] = rng.randrange(256)
        elif kind == "zero":
            data[where:where + 5] = b"\x00" * 5
        elif kind == "insert":
            data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        elif kind == "delete":
            del data[where:where + rng.randrange(1, 12)]
        else:
            del data[where:]
        finder = _find(bytes(data), rng.choice([1, 7, 4096, 1 << 20]) if len(data) < 1 << 20
                       else 1 << 20)
        offsets = finder.offsets()  # never raises
        if offsets is None:
            continue
        patched += 1
        got = dumpoffsets.read_toc(bytes(data))  # the finder read it: so can we
        moved = got.data_start != toc.data_start
        for slot, (field, pos) in zip(got.slots, offsets, strict=False):
            assert field == slot.field
            assert data[pos:pos + 6] == bytes([1 if slot.text else 3, 0]) + \
                slot.dump_id.to_bytes(4, "little")
            if not moved and where >= pos + 6 and kind != "cut":
                assert pos == true[field]  # a change after a block leaves its offset alone
        assert [p for _, p in offsets] == sorted({p for _, p in offsets})
    assert patched > 100  # most mutations hit row data, which the search passes over


# -- the restore that uses it -------------------------------------------------------------------

def _backup(ws: Workspace) -> tuple[Context, catalog.Backup]:
    ws.write_config(uploads=False)
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["id"]
    ctx = Context(load_config(ws.config)[0])
    backup = next(b for b in catalog.scan(ctx.targets()) if b.id == backup_id)
    return ctx, backup


def test_restore_fetches_a_patched_dump(ws: Workspace) -> None:
    ctx, backup = _backup(ws)
    staged = restore_db.fetch_dump(ctx, backup, None)
    try:
        assert staged.patched
        data = staged.path.read_bytes()
        assert not dumpoffsets.read_toc(data).slots  # no offset left "not set"
        staged.unpatch()
        assert len(dumpoffsets.read_toc(staged.path.read_bytes()).slots) > 5
    finally:
        staged.discard()
    assert not staged.path.exists()


@pytest.mark.parametrize("wrong", ["swapped offsets", "row counts"])
def test_a_wrong_patch_falls_back_to_the_dump_as_stored(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        wrong: str) -> None:
    ctx, backup = _backup(ws)
    if wrong == "swapped offsets":  # each points at a real header, of another table
        real = dumpoffsets.OffsetFinder.offsets

        def swapped(self: dumpoffsets.OffsetFinder) -> list[tuple[int, int]] | None:
            found = real(self)
            assert found is not None and len(found) > 2
            (f0, p0), (f1, p1) = found[0], found[1]
            return [(f0, p1), (f1, p0), *found[2:]]
        monkeypatch.setattr(dumpoffsets.OffsetFinder, "offsets", swapped)
    else:  # pg_restore accepted it, the counts did not
        real_check = restore_db.check_row_counts
        calls: list[int] = []

        def once_wrong(info: ConnInfo, name: str, expected: dict[str, int]) -> str:
            calls.append(1)
            if len(calls) == 1:
                raise restore_db.IntegrityError("restored database differs: invented")
            return real_check(info, name, expected)
        monkeypatch.setattr(restore_db, "check_row_counts", once_wrong)
    staged = restore_db.fetch_dump(ctx, backup, None)
    name = f"{ws.dbname}_fallback"
    assert backup.manifest is not None and backup.manifest.database is not None
    try:
        with caplog.at_level(logging.WARNING, "conexa_backup"):
            summary = restore_db.restore_into(ctx.db, staged, backup.manifest.database, name)
        assert "rows" in summary and not staged.patched
        assert "restoring the dump as stored" in caplog.text
        assert table_row_counts(ws.cluster.url(name)) == table_row_counts(
            ws.cluster.url(ws.dbname))
    finally:
        staged.discard()
        ws.cluster.drop_database(name)


def test_drill_of_a_patched_dump_counts_rows_once(ws: Workspace,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _backup(ws)
    calls: list[str] = []
    real_check = restore_db.check_row_counts

    def counting(info: ConnInfo, name: str, expected: dict[str, int]) -> str:
        calls.append(name)
        return real_check(info, name, expected)
    monkeypatch.setattr(restore_db, "check_row_counts", counting)
    result = ws.cli("verify", "--drill", "--json")
    out = json.loads(result.stdout)  # type: ignore[attr-defined]
    steps = {s["name"]: s for d in out["drills"] for s in d["steps"]}
    assert steps["row counts"]["ok"] and "rows" in steps["row counts"]["detail"]
    assert len(calls) == 1
