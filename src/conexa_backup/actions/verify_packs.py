"""Verify and download of packs-format backups (issue 15): every pack a copy needs is read
and checked (its bytes against its name, each blob against its id), each at most once per
target per run; a download also saves those packs, laid out for the by-hand script
(docs/packs.md). The reading itself is :mod:`restore_packs`'.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from conexa_backup import packs
from conexa_backup.actions.restore_packs import (
    PackReading,
    PackRun,
    dedup_key_for,
    fetch_packs,
    identities_for,
    lacking,
    plan_packs,
    read_needs,
    save_pack,
)
from conexa_backup.actions.uploads_index import Needs
from conexa_backup.blobindex import BlobIndex
from conexa_backup.catalog import Copy
from conexa_backup.errors import ConexaError, IntegrityError, ObjectNotFoundError
from conexa_backup.manifest import Manifest

if TYPE_CHECKING:
    from conexa_backup.actions.context import Context

log = logging.getLogger(__name__)


def verify_copy(ctx: Context, backup_id: str, copy: Copy, manifest: Manifest,
                run: PackRun) -> None:
    """Check the packs one packs-format copy needs on its target: each pack holding its
    blobs is downloaded and checked (stored bytes against the name, every blob against its
    id; once per target per ``run``), and every blob the index names must be in a good
    listed pack.

    Raises:
        IntegrityError: a blob lacks (naming the packs and files), or the index is damaged.
        UnusableCopyError: intact but unreadable with this host's keys.
        ConfigError: the backup is encrypted and this host holds no identity.
        StorageError: the target cannot be read.
    """
    keys = ctx.keys()
    where = f"target {copy.target.name!r}: backup {backup_id}"
    key = dedup_key_for(ctx, manifest, where)
    with read_needs(ctx, copy, backup_id, manifest, run=run, whole=True) as needs, \
            BlobIndex.open(ctx.config.state_dir) as index:
        reading = PackReading(copy.target, index, keys.staging, key,
                              identities_for(keys, manifest), run, whole=True)
        fetch_packs(reading, needs)
        damage = lacking(reading, needs, backup_id)
        if damage is not None:
            raise damage


def verify_stored(ctx: Context, backup_id: str, copy: Copy, run: PackRun) -> str:
    """Where no age identity is configured (a backup host) an encrypted backup's index
    cannot be read: check what can be. The backup's blob ids come from this host's refs
    (written by the run that made it), the packs holding them from the pack cache; each is
    downloaded and its stored bytes checked against its name (once per target per ``run``),
    and every blob must be in such a listed pack. Returns what was checked.

    Raises:
        IntegrityError: a blob lacks (naming the packs). StorageError: the target cannot be
        read.
    """
    with BlobIndex.open(ctx.config.state_dir) as index:
        if not index.has_refs(backup_id):
            return ("packs not checked here: the backup is encrypted, this host holds no "
                    "age identity, and no record of its blobs")
        with Needs(ctx.keys().staging) as needs:
            needs.want(index.read_refs(backup_id))
            reading = PackReading(copy.target, index, ctx.keys().staging, None, None, run,
                                  stored_only=True)
            fetch_packs(reading, needs)
            damage = lacking(reading, needs, backup_id)
    if damage is not None:
        raise damage
    return ("packs checked against their names only: blob ids need the age identity "
            "(encrypted backup)")


# -- download ------------------------------------------------------------------------------------

def download_packs(ctx: Context, backup_id: str, copy: Copy, manifest: Manifest,
                   folder: Path) -> int:
    """Save, as stored, the packs of the copy's target that hold the backup's blobs under
    ``folder/<2 hex>/<name>`` (the layout of a target's ``packs/``, which the by-hand script
    reads once decompressed), each checked against its name; return how many. Without an
    age identity for an encrypted backup the index cannot be read: every listed pack is
    saved.

    Raises:
        IntegrityError: a needed pack is damaged or missing (naming the files), or the index
            is. UnusableCopyError: the index cannot be used here. StorageError: unreadable.
    """
    keys = ctx.keys()
    target = copy.target
    run = PackRun()
    listed = run.listing(target)
    try:
        identities = identities_for(keys, manifest)
    except ConexaError as exc:
        log.warning("backup %s is encrypted and this host holds no identity (%s): saving "
                    "every pack of target %s", backup_id, exc, target.name)
        for name in sorted(listed):
            save_pack(target, name, folder / name[:2] / name)
        return len(listed)
    with read_needs(ctx, copy, backup_id, manifest) as needs, \
            BlobIndex.open(ctx.config.state_dir) as index:
        # The pieces the index was stored in are saved too: the by-hand script reads them.
        needs.want(bytes.fromhex(c) for c in needs.chunks)
        reading = PackReading(target, index, keys.staging, None, identities, run)
        saved = 0
        for name in plan_packs(reading, needs):
            path = folder / name[:2] / name
            try:
                save_pack(target, name, path)
                if not index.known_pack(name):
                    with path.open("rb") as stored:
                        found = packs.read_index(name, stored, keys.staging, identities)
                    index.add_pack(name, [(b.id, b.length) for b in found.blobs],
                                   [(target.name, listed[name])])
            except (IntegrityError, ObjectNotFoundError) as exc:
                reading.problems[name] = str(exc)
                path.unlink(missing_ok=True)
                continue
            held = sorted(needs.wanted_among([b for b, _ in index.pack_blobs(name)]))
            if not held:
                path.unlink()
                continue
            needs.found(held)
            saved += 1
        damage = lacking(reading, needs, backup_id)
        if damage is not None:
            raise damage
    return saved
