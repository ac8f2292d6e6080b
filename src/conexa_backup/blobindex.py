"""Which blobs each target holds, and which blobs each backup names (packs format, issue 15).

A cache in ``state_dir/packs/``: the truth is on the targets (every pack carries its own index,
docs/packs.md), and :meth:`BlobIndex.sync` brings this cache back to it from a target's
listing. One SQLite file, ``index.sqlite`` (0600, in a 0700 folder):

- ``blobs(blob, pack, length)``: what each pack holds. A pack's name is the hash of its bytes,
  so a pack holds the same blobs on every target: membership is stored once.
- ``held(target, pack, size)``: which packs each target holds (as its last listing showed,
  plus what this host wrote since).
- ``bad(target, pack, why)``: packs a verify, restore or drill proved damaged there (or listed
  with another size than stored): they hold nothing as far as backups go, and the next backup
  stores their blobs again; a row goes when the target no longer lists the pack.
- ``losses(target, at)`` and ``meta``: a counter bumped, in the same transaction, each time a
  target stops holding a pack (``at``: its value then), and this file's random id. Together
  they make a proof (:meth:`Losses.proof`): "every blob named here was held by these targets
  at this count" stays true while none of them has lost a pack since, which a backup checks
  for a whole folder of unchanged files at once instead of asking about each blob.

And per backup, ``refs/<id>.ids``: the backup's blob ids, sorted, unique, 32 bytes each, written
by the run that made it. Prune's garbage collection reads them (a sorted merge: memory flat in
the number of files) without downloading, or decrypting, any uploads index.

Memory stays flat: nothing here holds a set of every blob in Python; SQLite's page cache is
capped. Not thread-safe: the run that holds the lock uses it from one thread.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from conexa_backup.errors import ConexaError
from conexa_backup.packs import pack_name
from conexa_backup.state import private_dir
from conexa_backup.storage.base import Target

log = logging.getLogger(__name__)

FOLDER = "packs"
ID_BYTES = 32
_CACHE_KIB = 8192  # SQLite's page cache, at most
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (blob BLOB NOT NULL, pack BLOB NOT NULL, length INTEGER NOT
    NULL, PRIMARY KEY (blob, pack)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack);
CREATE TABLE IF NOT EXISTS held (target TEXT NOT NULL, pack BLOB NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (target, pack)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS held_by_pack ON held (pack);
CREATE TABLE IF NOT EXISTS bad (target TEXT NOT NULL, pack BLOB NOT NULL, why TEXT NOT NULL,
    PRIMARY KEY (target, pack)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS losses (target TEXT PRIMARY KEY, at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS lost (target TEXT NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (target, blob)) WITHOUT ROWID;
"""

# What a pack holds: (blob id, length) pairs; None when it could not be read here.
ReadIndex = Callable[[str], "list[tuple[str, int]] | None"]


@dataclass(frozen=True)
class HeldPack:
    """A pack a target holds: its name and stored size."""

    name: str
    size: int


def _raw(blob: str) -> bytes:
    return bytes.fromhex(blob)


@dataclass(frozen=True)
class Losses:
    """What :meth:`BlobIndex.losses` read: the file's id, the loss counter, and its value when
    each target last lost a pack (targets that never did are absent)."""

    index_id: str
    count: int
    at: dict[str, int]

    def proof(self, targets: Iterable[str]) -> str:
        """A proof that ``targets`` held some blobs now (``targets`` must have held every one
        of them: a committed backup naming them is what shows it)."""
        return json.dumps([self.index_id, self.count, sorted(set(targets))])

    def holds(self, proof: str | None, targets: Iterable[str], *, floor: int) -> bool:
        """Whether the blobs ``proof`` was made for are still held by every one of
        ``targets``: each was in it, and none has lost a pack since. False for None, a
        proof of another index file (one rebuilt since), one that cannot be read, and one
        counting more losses than ``floor``, the counter read before this run's sync: the
        index has gone back since (a power cut lost its last commits, or an older copy was
        put back), so a count it hands out again could pass for one the proof has seen."""
        if proof is None:
            return False
        try:
            index_id, count, proven = json.loads(proof)
        except (ValueError, TypeError):
            return False
        if index_id != self.index_id or not isinstance(count, int) \
                or not isinstance(proven, list) or count > floor:
            return False
        return all(t in proven and self.at.get(t, 0) <= count for t in targets)


class BlobIndex:
    """The open cache; see the module docstring. Use :meth:`open` as a context manager."""

    def __init__(self, folder: Path) -> None:
        """Open (or create) the cache in ``folder``. A file SQLite calls damaged is moved
        aside and rebuilt empty (it is a cache: the next sync refills it from the targets).

        Raises:
            ConexaError: it cannot be created at all.
        """
        self.folder = folder
        private_dir(folder)
        private_dir(folder / "refs")
        self.path = folder / "index.sqlite"
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as exc:
            moved = self.path.with_name(f"{self.path.name}.corrupt-{os.getpid()}")
            log.warning("pack index %s is damaged (%s); moved to %s, rebuilding from the "
                        "targets", self.path, exc, moved)
            with contextlib.suppress(OSError):
                self.path.replace(moved)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            try:
                self._db = self._connect()
            except sqlite3.Error as err:
                raise ConexaError(f"cannot create the pack index {self.path}: {err}") from None

    @classmethod
    def open(cls, state_dir: Path) -> BlobIndex:
        return cls(state_dir / FOLDER)

    def _connect(self) -> sqlite3.Connection:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            db.execute("PRAGMA temp_store = FILE")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('id', ?)", (os.urandom(16).hex(),))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('losses', '0')")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> BlobIndex:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what targets hold ---------------------------------------------------------------------

    def note_everywhere(self, targets: Sequence[str]) -> None:
        """Remember, for this connection, the blobs every one of ``targets`` holds now, so
        that :meth:`everywhere` answers the common case (an unchanged file) with one point
        query. Blobs stored later are not in it: callers ask :meth:`holders` then."""
        self._db.execute("DROP TABLE IF EXISTS temp.everywhere")
        # Hex text, not raw bytes: :meth:`present` matches a JSON list of ids against it.
        self._db.execute("CREATE TEMP TABLE everywhere (blob TEXT PRIMARY KEY) WITHOUT ROWID")
        self._db.execute(
            "INSERT INTO temp.everywhere SELECT lower(hex(b.blob)) FROM blobs b JOIN held h "
            "ON h.pack = b.pack WHERE h.target IN (SELECT value FROM json_each(?)) "
            "GROUP BY b.blob HAVING COUNT(DISTINCT h.target) = ?",
            (json.dumps(list(targets)), len(set(targets))))

    def everywhere(self, blob: str) -> bool:
        """Whether ``blob`` was held by every target :meth:`note_everywhere` named."""
        return self._db.execute("SELECT 1 FROM temp.everywhere WHERE blob = ?",
                                (blob,)).fetchone() is not None

    def present(self, blobs: Iterable[str]) -> set[str]:
        """Those of ``blobs`` that :meth:`everywhere` holds, in one query (a folder's)."""
        rows = self._db.execute(
            "SELECT blob FROM temp.everywhere WHERE blob IN (SELECT value FROM json_each(?))",
            (json.dumps(list(blobs)),))
        return {r[0] for r in rows}

    def holders(self, blob: str) -> set[str]:
        """The targets holding ``blob`` in some pack."""
        rows = self._db.execute(
            "SELECT DISTINCT h.target FROM blobs b JOIN held h ON h.pack = b.pack "
            "WHERE b.blob = ?", (_raw(blob),))
        return {r[0] for r in rows}

    def has(self, target: str, blob: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM blobs b JOIN held h ON h.pack = b.pack "
            "WHERE b.blob = ? AND h.target = ? LIMIT 1", (_raw(blob), target)).fetchone()
        return row is not None

    def packs_holding(self, target: str, blob: str) -> list[str]:
        """The packs on ``target`` that hold ``blob`` (usually one)."""
        rows = self._db.execute(
            "SELECT b.pack FROM blobs b JOIN held h ON h.pack = b.pack "
            "WHERE b.blob = ? AND h.target = ?", (_raw(blob), target))
        return [r[0].hex() for r in rows]

    def known_pack(self, name: str) -> bool:
        """Whether this cache knows what pack ``name`` holds."""
        return self._db.execute("SELECT 1 FROM blobs WHERE pack = ? LIMIT 1",
                                (_raw(name),)).fetchone() is not None

    def add_pack(self, name: str, blobs: Iterable[tuple[str, int]],
                 targets: Iterable[tuple[str, int]] = ()) -> None:
        """Record what pack ``name`` holds, and that each (target, stored size) holds it."""
        raw = _raw(name)
        with self._tx():
            self._db.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?, ?)",
                                 ((_raw(b), raw, n) for b, n in blobs))
            self._db.executemany("INSERT OR REPLACE INTO held VALUES (?, ?, ?)",
                                 ((t, raw, size) for t, size in targets))

    def drop_held(self, target: str, name: str) -> None:
        """``target`` no longer holds pack ``name`` (deleted, or gone from its listing)."""
        with self._tx():
            self._db.execute("DELETE FROM held WHERE target = ? AND pack = ?",
                             (target, _raw(name)))
            self._lost_one(target)
            self._forget_unheld(name)

    def _lost_one(self, target: str) -> None:
        """Count a pack ``target`` no longer holds (inside the transaction that drops it), so
        that no proof made before stands for ``target`` (:meth:`Losses.holds`)."""
        self._db.execute("UPDATE meta SET v = CAST(v AS INTEGER) + 1 WHERE k = 'losses'")
        self._db.execute("INSERT OR REPLACE INTO losses SELECT ?, CAST(v AS INTEGER) FROM meta "
                         "WHERE k = 'losses'", (target,))

    def losses(self) -> Losses:
        """The loss counter as it stands (read it after :meth:`sync`)."""
        meta = dict(self._db.execute("SELECT k, v FROM meta").fetchall())
        at = dict(self._db.execute("SELECT target, at FROM losses").fetchall())
        return Losses(meta["id"], int(meta["losses"]), at)

    def held(self, target: str) -> Iterator[HeldPack]:
        """Every pack ``target`` holds, as far as this cache knows."""
        rows = self._db.execute("SELECT pack, size FROM held WHERE target = ? ORDER BY pack",
                                (target,)).fetchall()
        return (HeldPack(r[0].hex(), r[1]) for r in rows)

    def pack_blobs(self, name: str) -> list[tuple[str, int]]:
        """(blob id, length) of every blob pack ``name`` holds (empty when unknown)."""
        rows = self._db.execute("SELECT blob, length FROM blobs WHERE pack = ? ORDER BY blob",
                                (_raw(name),))
        return [(r[0].hex(), r[1]) for r in rows]

    def sync(self, target: Target, read_index: ReadIndex,
             on_lost: Callable[[str, list[bytes]], object] | None = None) -> list[str]:
        """Bring what ``target`` holds up to its listing of ``packs/``: packs gone from it are
        dropped; listed packs this cache does not know are read with ``read_index`` (a
        download: once per pack, ever, while the cache lives). Returns the listed packs that
        could not be read: their blobs count as absent (stored again where needed), and
        garbage collection never touches them. ``on_lost(name, ids)`` hears of each pack
        the target no longer holds, with its blob ids (raw, sorted), before they are forgotten.

        Raises:
            StorageError: the target cannot be listed.
        """
        listed = {}
        for obj in target.list("packs/"):
            name = pack_name(obj.key)
            if name is not None:
                listed[name] = obj.size
        unreadable = []
        bad = self.bad_packs(target.name)
        with self._tx():
            self._db.execute("DELETE FROM bad WHERE target = ? AND pack NOT IN "
                             "(SELECT value FROM json_each(?))",  # gone: nothing to avoid
                             (target.name, json.dumps(sorted(listed))))
            have = {p.name: p.size for p in self.held(target.name)}
            for name in have.keys() - listed.keys():
                log.warning("target %s no longer holds pack %s; its blobs will be stored again",
                            target.name, name)
                self._lose(target.name, name, on_lost)
            for name in have.keys() & listed.keys():
                if have[name] != listed[name]:  # same name, other bytes: not what was stored
                    why = f"listed with {listed[name]} bytes, stored with {have[name]}"
                    log.warning("target %s: pack %s %s: taken as damaged", target.name, name,
                                why)
                    self._lose(target.name, name, on_lost)
                    self._db.execute("INSERT OR REPLACE INTO bad VALUES (?, ?, ?)",
                                     (target.name, _raw(name), why))
                    bad.add(name)
        for name in sorted(listed.keys() - have.keys() - bad):
            if self.known_pack(name):
                self.add_pack(name, (), [(target.name, listed[name])])
                continue
            blobs = read_index(name)
            if blobs is None:
                unreadable.append(name)
                continue
            self.add_pack(name, blobs, [(target.name, listed[name])])
        return unreadable

    def _lose(self, target: str, name: str,
              on_lost: Callable[[str, list[bytes]], object] | None) -> None:
        """``target`` no longer holds pack ``name``: its blobs go to ``lost`` (this
        connection's, for :meth:`lost_blobs`) before they are forgotten."""
        raw = _raw(name)
        self._db.execute("INSERT OR IGNORE INTO temp.lost SELECT ?, blob FROM blobs "
                         "WHERE pack = ?", (target, raw))
        if on_lost is not None:
            on_lost(name, sorted(_raw(b) for b, _ in self.pack_blobs(name)))
        self._db.execute("DELETE FROM held WHERE target = ? AND pack = ?", (target, raw))
        self._lost_one(target)
        self._forget_unheld(name)

    def lost_blobs(self, target: str) -> Iterator[bytes]:
        """Raw ids, sorted, of the blobs of packs :meth:`sync` (on this connection) found
        gone from ``target`` or damaged there, that no pack it still holds has."""
        rows = self._db.execute(
            "SELECT l.blob FROM temp.lost l WHERE l.target = ? AND NOT EXISTS (SELECT 1 FROM "
            "blobs b JOIN held h ON h.pack = b.pack WHERE b.blob = l.blob AND h.target = ?) "
            "ORDER BY l.blob", (target, target))
        return (r[0] for r in rows)

    def mark_bad(self, target: str, name: str, why: str) -> None:
        """Pack ``name`` on ``target`` was proven damaged (a verify, restore or drill read
        it): it no longer counts as holding anything there, so the next backup stores its
        blobs again; :meth:`sync` skips it while the target lists it."""
        with self._tx():
            self._lose(target, name, None)
            self._db.execute("INSERT OR REPLACE INTO bad VALUES (?, ?, ?)",
                             (target, _raw(name), why[:500]))

    def bad_packs(self, target: str) -> set[str]:
        return {r[0].hex() for r in self._db.execute("SELECT pack FROM bad WHERE target = ?",
                                                     (target,))}

    def _forget_unheld(self, name: str) -> None:
        """Forget what pack ``name`` holds once no target holds it."""
        raw = _raw(name)
        self._db.execute("DELETE FROM blobs WHERE pack = ? AND NOT EXISTS "
                         "(SELECT 1 FROM held WHERE pack = ?)", (raw, raw))

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- what backups name ---------------------------------------------------------------------

    def refs_path(self, backup_id: str) -> Path:
        return self.folder / "refs" / f"{backup_id}.ids"

    def write_refs(self, backup_id: str, blobs: Iterable[str]) -> None:
        """Record the blob ids backup ``backup_id`` names, sorted and unique, atomically."""
        with self.refs_writer(backup_id) as refs:
            refs.add(blobs)

    @contextlib.contextmanager
    def refs_writer(self, backup_id: str) -> Iterator[RefsWriter]:
        """A :class:`RefsWriter` for ``backup_id``: fed while a backup walks its tree, written
        (sorted, unique, atomically) when the block ends normally; discarded otherwise. The
        temporary files of writers killed outright go first (the caller holds the run lock:
        no other writer is at work)."""
        for stale in (self.folder / "refs").glob(".*.ids.*"):
            stale.unlink(missing_ok=True)
        writer = RefsWriter(self.refs_path(backup_id))
        try:
            yield writer
            writer.commit()
        finally:
            writer.close()

    def refs_touch(self, backup_id: str, ids: Iterable[bytes]) -> bool:
        """Whether backup ``backup_id`` names any of ``ids`` (raw, sorted): a merge of its
        refs with them (both streamed). False when its refs are unknown here.
        """
        if not self.has_refs(backup_id):
            return False
        wanted = iter(ids)
        want: bytes | None = next(wanted, None)
        if want is None:
            return False
        for raw in self.read_refs(backup_id):
            while want is not None and want < raw:
                want = next(wanted, None)
            if want is None:
                return False
            if want == raw:
                return True
        return False

    def has_refs(self, backup_id: str) -> bool:
        return self.refs_path(backup_id).is_file()

    def read_refs(self, backup_id: str) -> Iterator[bytes]:
        """The raw (32-byte) blob ids of ``backup_id``, sorted. Raises OSError when absent."""
        return _read_ids(self.refs_path(backup_id))

    def forget_refs(self, keep: Sequence[str]) -> None:
        """Remove the refs of backups not in ``keep`` (gone from every target)."""
        wanted = {f"{i}.ids" for i in keep}
        for path in (self.folder / "refs").iterdir():
            if path.name not in wanted:
                path.unlink(missing_ok=True)

    def packs_with(self, blob: str) -> list[str]:
        """Every pack this cache knows to hold ``blob``, whichever target holds it (naming
        the pack at fault when a target lacks the blob)."""
        rows = self._db.execute("SELECT pack FROM blobs WHERE blob = ? ORDER BY pack",
                                (_raw(blob),))
        return [r[0].hex() for r in rows]


def merged(streams: Iterable[Iterator[bytes]]) -> Iterator[bytes]:
    """The union of sorted streams of ids, sorted, each id once."""
    last = None
    for raw in heapq.merge(*streams):
        if raw != last:
            yield raw
            last = raw


class RefsWriter:
    """Blob ids gathered in sorted runs of at most :attr:`RUN` (memory stays flat: longer
    lists go to temporary files next to ``path``), written merged, sorted and unique to
    ``path`` by :meth:`commit`. An unchanged backup adds every id again: a list sort per run
    costs a fraction of a B-tree insert per id (measured)."""

    RUN = 1 << 16  # ids sorted in memory at once (about 5 MB)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids: list[bytes] = []
        self._joined: list[str] = []  # see add_joined
        self._runs: list[Path] = []

    def add(self, blobs: Iterable[str]) -> None:
        for blob in blobs:  # one at a time: ``blobs`` may be a whole backup's ids
            self._ids.append(bytes.fromhex(blob))
            if len(self._ids) >= self.RUN:
                self._spill()

    def add_joined(self, blobs: str) -> None:
        """:meth:`add` of comma-joined ids (as a folder block holds them): converted a
        thousand at a time, not one by one."""
        if blobs:
            self._joined.append(blobs)
            if len(self._joined) >= 1024:
                self._convert()

    def _convert(self) -> None:
        raw = bytes.fromhex(",".join(self._joined).replace(",", ""))
        self._joined.clear()
        self._ids.extend(raw[i:i + ID_BYTES] for i in range(0, len(raw), ID_BYTES))
        if len(self._ids) >= self.RUN:
            self._spill()

    def _spill(self) -> None:
        run = self.path.with_name(f".{self.path.name}.run{len(self._runs)}")
        fd = os.open(run, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._runs.append(run)
        with os.fdopen(fd, "wb") as out:
            out.write(b"".join(sorted(set(self._ids))))
        self._ids = []

    def _sorted(self) -> Iterator[bytes]:
        self._convert()
        if not self._runs:
            return iter(sorted(set(self._ids)))
        if self._ids:
            self._spill()
        return merged(_read_ids(run) for run in self._runs)

    def commit(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 16) as out:
                for raw in self._sorted():
                    out.write(raw)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        self._ids, self._joined = [], []
        for run in self._runs:
            run.unlink(missing_ok=True)
        self._runs = []


def _read_ids(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(ID_BYTES * 4096):
            for i in range(0, len(chunk), ID_BYTES):
                yield chunk[i:i + ID_BYTES]
