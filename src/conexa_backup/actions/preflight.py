"""What a restore needs, checked before it does any work.

An in-place restore first takes a safety backup of the live system (to every target), then
fetches and restores. Whatever would make it fail later and is cheap to know now is checked
before that, so that a restore this host cannot finish costs nothing and leaves nothing:

- an age identity that fits the backup, when it is encrypted: the manifest records each
  artifact's recipients' fingerprints, compared with those of the configured identities;
- the client tools it will run (``pg_restore``; ``pg_dump`` for the safety backup);
- a role allowed to create the database (``CREATEDB`` or superuser) and, in place, to rename
  the live one (its owner);
- room in ``state_dir/staging`` for the dump and beside the uploads folder for the tree, as
  far as the manifest tells (a lower bound: compressed sizes).

Drills use :func:`check_identity` alone: a drill this host cannot decrypt is "could not
drill", not a failed one.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conexa_backup.crypto import fingerprint
from conexa_backup.errors import PreflightError
from conexa_backup.manifest import Artifact, Manifest

if TYPE_CHECKING:
    from conexa_backup.actions.context import Context
    from conexa_backup.postgres import ConnInfo

# The artifacts each part of a restore or drill reads (a packs backup: its index).
DATABASE_READS = ("database",)
UPLOADS_READS = ("uploads", "uploads-index")


def reads(manifest: Manifest, *, database: bool, uploads: bool) -> list[Artifact]:
    """The artifacts of ``manifest`` a restore of those parts reads."""
    kinds = (DATABASE_READS if database else ()) + (UPLOADS_READS if uploads else ())
    return [a for a in manifest.artifacts if a.kind in kinds]


def identity_fingerprints(identities: Sequence[Any]) -> list[str]:
    """The recipient fingerprints (as the manifest records them) of age identities."""
    return sorted({fingerprint(str(identity.to_public())) for identity in identities})


def check_identity(ctx: Context, backup_id: str, artifacts: Sequence[Artifact]) -> None:
    """Unless none of ``artifacts`` is encrypted: an age identity must be configured, and one
    must be a recipient of each encrypted artifact (when the manifest names its recipients;
    an older manifest that does not is left to decryption itself).

    Raises:
        PreflightError: no identity configured, or none fits; the message names the
        fingerprints the backup was encrypted to and those of the configured identities.
        ConfigError: the configured identity cannot be read or is not an age identity.
    """
    encrypted = [a for a in artifacts if a.encryption is not None]
    if not encrypted:
        return
    wanted = sorted({fp for a in encrypted for fp in a.recipients})
    to = f" to {', '.join(wanted)}" if wanted else ""
    enc = ctx.config.encryption
    if enc.identity is None and enc.identity_file is None:
        raise PreflightError(
            f"backup {backup_id} is encrypted{to} and no age identity is configured here: "
            "set [encryption] identity_file (or identity) where restores and drills run")
    have = identity_fingerprints(ctx.keys().identities())
    unfit = [a.name for a in encrypted if a.recipients and not set(a.recipients) & set(have)]
    if unfit:
        source = "encryption.identity" if enc.identity is not None else \
            f"encryption.identity_file {enc.identity_file}"
        raise PreflightError(
            f"cannot decrypt backup {backup_id} here: it was encrypted{to}, and the "
            f"configured identities ({source}) are {', '.join(have)}: none fits; configure "
            "the identity of one of its recipients")


def check_tools(info: ConnInfo, tools: Sequence[str]) -> None:
    """Each client tool in ``tools`` can be run (from ``[database] bin_dir``, else PATH).

    Raises:
        PreflightError: naming the tools not found, and where they were looked for.
    """
    missing = [t for t in tools if shutil.which(info.tool(t)) is None]
    if missing:
        where = f"in [database] bin_dir {info.bin_dir}" if info.bin_dir else "on PATH"
        raise PreflightError(f"{', '.join(missing)} not found {where}: install the "
                             "PostgreSQL client tools or set [database] bin_dir")


def check_role(info: ConnInfo, replaces: str | None) -> None:
    """The role may create databases (``CREATEDB`` or superuser) and, when ``replaces`` names
    an existing database, rename it (its owner, a member of its owner role, or superuser).

    Raises:
        PreflightError: it may not. DatabaseError: the server cannot be reached.
    """
    with info.connect(info.maintenance_db) as conn:
        row = conn.execute("SELECT current_user, rolsuper, rolcreatedb FROM pg_roles "
                           "WHERE rolname = current_user").fetchone()
        if row is None:
            return  # no pg_roles row for us: let the server itself decide
        user, superuser, createdb = row
        if not (superuser or createdb):
            raise PreflightError(
                f"role {user!r} may not create databases, and a restore creates one: "
                f"ALTER ROLE {user} CREATEDB, or restore as a role that may")
        if replaces is None or superuser:
            return
        owner = conn.execute("SELECT pg_has_role(current_user, datdba, 'MEMBER') "
                             "FROM pg_database WHERE datname = %s", (replaces,)).fetchone()
    if owner is not None and not owner[0]:
        raise PreflightError(f"role {user!r} does not own database {replaces!r}, so it cannot "
                             "swap a restored copy in: restore as its owner, or use "
                             "--to-database")


def check_space(where: Path, need: int, what: str) -> None:
    """At least ``need`` bytes free on the file system of ``where`` (or of its nearest
    existing parent); when that cannot be measured, nothing is said.

    Raises:
        PreflightError: less is free (how much, and how much ``what`` needs).
    """
    folder = where
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need:
        raise PreflightError(f"{folder}: {_mib(free)} free, and {what} needs at least "
                             f"{_mib(need)}: free some space first")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def staging_need(artifact: Artifact) -> int:
    """A lower bound of the bytes a dump takes in staging: the decompressed dump is not
    smaller than its compressed stored form (1% spared for the compressor's framing), and an
    encrypted one is first decrypted beside it."""
    plain = artifact.size - artifact.size // 100
    return plain * 2 if artifact.encryption is not None else plain


def check_restore(ctx: Context, manifest: Manifest, *, database: str | None,
                  uploads: Path | None, replaces: str | None, safety_dump: bool) -> None:
    """Everything :func:`restore.run_restore` will need, before it does anything:
    ``database``/``uploads``, where each part is restored (None: not restored);
    ``replaces``, the live database swapped out; ``safety_dump``, whether a safety backup
    will dump the live database first.

    Raises:
        PreflightError: what is missing (see the module docstring). ConfigError: an
        unreadable identity. DatabaseError: the server cannot be reached.
    """
    check_identity(ctx, manifest.id, reads(manifest, database=database is not None,
                                           uploads=uploads is not None))
    dump = manifest.artifact("database")
    if database is not None and dump is not None:
        tools = ["pg_restore"]
        if safety_dump:
            tools += ["pg_dump"] + (["pg_dumpall"] if ctx.config.database.globals else [])
        check_tools(ctx.db, tools)
        check_space(ctx.config.state_dir / "staging", staging_need(dump),
                    f"the database dump of backup {manifest.id}")
        check_role(ctx.db, replaces)
    if uploads is not None and manifest.uploads is not None:
        check_space(uploads.parent, manifest.uploads.bytes,
                    f"the uploads of backup {manifest.id}")
