"""Trust: what protects the backups of a school's personal data (README, "Encryption,
signatures, immutability"), and what the tool does with hostile input.

- age encryption at rest: nothing readable on the target, the manifest says how it was
  encrypted, restores need the identity and refuse a wrong key or tampered ciphertext;
- Ed25519 manifest signatures: an altered, unsigned or foreign-signed manifest is damaged and
  is never listed as good, verified, restored or drilled;
- S3 Object Lock (moto): objects carry a retain-until date, locked versions cannot be deleted,
  prune still works (a delete marker) and says the copy is hidden, not deleted (more in
  test_s3_leftovers.py);
- secrets never reach argv, output, logs or JSON; a world-readable config holding literal
  secrets is warned about;
- hostile config files (fuzzed with hypothesis) and hostile manifests end in a clean refusal.

The CLI runs as a real subprocess (``ws.run``) wherever exit codes and output matter.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pyrage import x25519

from conexa_backup.actions.context import Context
from conexa_backup.config.loading import parse_config, permission_warning, secrets_written_in
from conexa_backup.config.models import Config
from conexa_backup.crypto import fingerprint
from conexa_backup.errors import ConfigError
from conexa_backup.server import listing
from conexa_backup.testing.compare import plain_dump, tree_snapshot
from conexa_backup.testing.emulators import S3Server
from tests.conftest import Workspace
from tests.test_failures import (
    assert_error,
    assert_ok,
    cli_argv,
    database_exists,
    listed_by_id,
    make_bin_dir,
    proc_files,
)

AGE_MAGIC = b"age-encryption.org/v1"
# A name the sample data surely holds (students' names are built from these parts), and a file
# name of the sample uploads: plaintext that must not be readable on an encrypted target.
KNOWN_PLAINTEXT = ["Conceição".encode(), "São Paulo".encode(), b"PGDMP", b"documentos/"]


# -- helpers ----------------------------------------------------------------------------------

def toml_str(value: object) -> str:
    """A TOML basic string (JSON string syntax is a subset TOML accepts)."""
    return json.dumps(str(value), ensure_ascii=False)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int) else toml_str(value)


def write_config(ws: Workspace, extra: str = "", *, url: str | None = None,
                 mode: int = 0o600, **database: object) -> Path:
    """Like ``ws.write_config``, with extra ``[database]`` keys and a file mode."""
    lines = [f"state_dir = {toml_str(ws.state)}", "[database]",
             f"url = {toml_str(url or ws.cluster.url(ws.dbname))}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in database.items()]
    lines += ["[uploads]", f"path = {toml_str(ws.uploads)}",
              "[[targets]]", 'name = "local"', 'type = "local"', f"path = {toml_str(ws.backups)}"]
    ws.config.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    ws.config.chmod(mode)
    return ws.config


@dataclass
class AgeKey:
    identity: str  # AGE-SECRET-KEY-1...
    recipient: str  # age1...
    file: Path


def make_age_key(path: Path) -> AgeKey:
    """An X25519 key pair; the identity written as an age-keygen style file (0600)."""
    ident = x25519.Identity.generate()
    recipient = str(ident.to_public())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# created: test\n# public key: {recipient}\n{ident}\n", encoding="utf-8")
    path.chmod(0o600)
    return AgeKey(str(ident), recipient, path)


def encryption_toml(key: AgeKey, *, identity: bool = True) -> str:
    text = f"[encryption]\nrecipients = [{toml_str(key.recipient)}]\n"
    if identity:
        text += f"identity_file = {toml_str(key.file)}\n"
    return text


@dataclass
class SigningKey:
    private: Path
    public: Path


def make_signing_key(folder: Path) -> SigningKey:
    """An Ed25519 key pair made with the openssl CLI, as the README says."""
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / "signing.key", folder / "signing.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)],
                   check=True, capture_output=True)
    private.chmod(0o600)
    return SigningKey(private, public)


def signing_toml(key_file: Path | None, public_key_file: Path | None) -> str:
    text = "[signing]\n"
    if key_file is not None:
        text += f"key_file = {toml_str(key_file)}\n"
    if public_key_file is not None:
        text += f"public_key_file = {toml_str(public_key_file)}\n"
    return text


def backup_json(ws: Workspace, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = ws.run("backup", "--json", *args, env=env)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def manifest_path(ws: Workspace, backup_id: str) -> Path:
    return ws.backups / backup_id / "manifest.json"


def read_manifest(ws: Workspace, backup_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest_path(ws, backup_id).read_bytes())
    return data


def write_manifest(ws: Workspace, backup_id: str, data: dict[str, Any]) -> None:
    manifest_path(ws, backup_id).write_bytes(
        (json.dumps(data, indent=2) + "\n").encode())


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def rehash_in_manifest(ws: Workspace, backup_id: str, name: str) -> None:
    """What an attacker with storage access (and no signing key) does after changing a file:
    make the manifest's size and SHA-256 match the new bytes."""
    data = read_manifest(ws, backup_id)
    stored = (ws.backups / backup_id / name).read_bytes()
    for artifact in data["artifacts"]:
        if artifact["name"] == name:
            artifact["size"] = len(stored)
            artifact["sha256"] = hashlib.sha256(stored).hexdigest()
            break
    else:
        raise AssertionError(f"{name} not in the manifest")
    write_manifest(ws, backup_id, data)


def staging_leftovers(ws: Workspace) -> list[Path]:
    staging = ws.state / "staging"
    return sorted(staging.iterdir()) if staging.exists() else []


def hidden_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_refused(result: subprocess.CompletedProcess[str], *codes: int) -> str:
    """Exit with one of ``codes``, one ``error:`` line, no traceback; return the output."""
    out = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode in codes, out
    assert "Traceback" not in result.stderr, out
    assert len(re.findall(r"(?m)^error: ", result.stderr)) == 1, out
    return result.stdout + result.stderr


# -- encryption at rest -----------------------------------------------------------------------

@pytest.fixture
def age_key(tmp_path: Path) -> AgeKey:
    return make_age_key(tmp_path / "keys" / "age-identity.txt")


def test_encrypted_artifacts_are_age_files_without_plaintext(ws: Workspace,
                                                             age_key: AgeKey) -> None:
    # The control: without encryption, the known plaintext is readable on the target (zstd
    # keeps literals as they are, and the dump starts with PGDMP once decompressed).
    plain_id = backup_json(ws)["id"]
    plain_bytes = b"".join(p.read_bytes() for p in (ws.backups / plain_id).iterdir())
    unzstd = b"".join(
        subprocess.run(["zstd", "-dc", str(p)], check=True, capture_output=True).stdout
        for p in (ws.backups / plain_id).glob("*.zst"))
    assert all(word in plain_bytes + unzstd for word in KNOWN_PLAINTEXT)

    ws.write_config(encryption_toml(age_key, identity=False))  # the backup host: no identity
    report = backup_json(ws)
    backup_id = report["id"]
    folder = ws.backups / backup_id
    names = sorted(p.name for p in folder.iterdir())
    artifacts = [n for n in names if n != "manifest.json"]
    assert artifacts and all(n.endswith(".age") for n in artifacts), names
    assert {"database.dump.zst.age", "uploads.tar.zst.age",
            "uploads.index.jsonl.zst.age"} <= set(artifacts)
    for name in artifacts:
        data = (folder / name).read_bytes()
        assert data.startswith(AGE_MAGIC), name
        for word in KNOWN_PLAINTEXT:
            assert word not in data, (name, word)
        # Not a zstd frame: the stock tools need the key first.
        assert subprocess.run(["zstd", "-t", "-q", str(folder / name)],
                              capture_output=True).returncode != 0, name

    manifest = read_manifest(ws, backup_id)
    assert AGE_MAGIC not in manifest_path(ws, backup_id).read_bytes()
    assert {a["name"] for a in manifest["artifacts"]} == set(artifacts)
    for artifact in manifest["artifacts"]:
        assert artifact["encryption"] == "age", artifact
        assert artifact["recipients"] == [fingerprint(age_key.recipient)], artifact
        assert age_key.recipient not in json.dumps(artifact)  # a fingerprint, not the key
        stored = (folder / artifact["name"]).read_bytes()
        assert artifact["size"] == len(stored)
        assert artifact["sha256"] == hashlib.sha256(stored).hexdigest()
    # The backup host needs no identity to check what it stored.
    assert_ok(ws.run("verify", backup_id))


def test_restore_without_identity_names_identity_file(ws: Workspace, age_key: AgeKey,
                                                      tmp_path: Path) -> None:
    ws.write_config(encryption_toml(age_key, identity=False))
    backup_id = backup_json(ws)["id"]
    target, dest = f"{ws.dbname}_noid", tmp_path / "restored uploads"

    result = ws.run("restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                    "--yes")
    message = assert_error(result, 2, "encrypted", "identity_file")
    assert "Traceback" not in message
    assert not database_exists(ws, target)
    assert not dest.exists()
    assert staging_leftovers(ws) == []

    drill = ws.run("verify", "--drill", backup_id)
    assert drill.returncode != 0
    assert "identity_file" in drill.stdout + drill.stderr
    assert "Traceback" not in drill.stderr


def test_encrypted_round_trip_and_drill(ws: Workspace, age_key: AgeKey, tmp_path: Path) -> None:
    ws.write_config(encryption_toml(age_key))
    backup_id = backup_json(ws)["id"]
    target, dest = f"{ws.dbname}_decrypted", tmp_path / "decrypted uploads"

    assert_ok(ws.run("restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                     "--yes"))
    assert plain_dump(ws.cluster.env(), target) == plain_dump(ws.cluster.env(), ws.dbname)
    assert tree_snapshot(dest) == tree_snapshot(ws.uploads)
    assert staging_leftovers(ws) == []

    drill = ws.run("verify", "--drill", backup_id, "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert all(r["ok"] for r in json.loads(drill.stdout)["drills"]), drill.stdout


def test_identity_from_the_environment(ws: Workspace, age_key: AgeKey, tmp_path: Path) -> None:
    ws.write_config(encryption_toml(age_key, identity=False)
                    + 'identity = "${AGE_IDENTITY}"\n')
    env = {"AGE_IDENTITY": age_key.identity}
    backup_id = backup_json(ws, env=env)["id"]
    target = f"{ws.dbname}_envid"
    result = ws.run("restore", backup_id, "--only", "database", "--to-database", target,
                    "--yes", env=env)
    assert result.returncode == 0, result.stderr
    assert plain_dump(ws.cluster.env(), target) == plain_dump(ws.cluster.env(), ws.dbname)


def test_wrong_identity_fails_cleanly(ws: Workspace, age_key: AgeKey, tmp_path: Path) -> None:
    ws.write_config(encryption_toml(age_key, identity=False))
    backup_id = backup_json(ws)["id"]
    other = make_age_key(tmp_path / "keys" / "someone else.txt")
    ws.write_config(encryption_toml(age_key, identity=False)
                    + f"identity_file = {toml_str(other.file)}\n")
    target, dest = f"{ws.dbname}_wrongkey", tmp_path / "wrong key uploads"
    dbs = ws.cluster.databases()

    result = ws.run("restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                    "--yes")
    # Refused before any work: the manifest's recipients are not the configured identity's.
    assert_error(result, 2, "cannot decrypt", backup_id, fingerprint(age_key.recipient))
    assert "no good copy" not in result.stderr  # the copy is intact: the key does not fit
    assert other.identity not in result.stdout + result.stderr
    assert ws.cluster.databases() == dbs
    assert not dest.exists()
    assert hidden_siblings(tmp_path) == []
    assert staging_leftovers(ws) == []

    # In place, too: the live system is left exactly as it was.
    live_db, live_tree = plain_dump(ws.cluster.env(), ws.dbname), tree_snapshot(ws.uploads)
    result = ws.run("restore", backup_id, "--yes", "--no-safety-backup")
    assert_error(result, 2, "cannot decrypt")
    assert plain_dump(ws.cluster.env(), ws.dbname) == live_db
    assert tree_snapshot(ws.uploads) == live_tree
    assert ws.cluster.databases() == dbs
    assert hidden_siblings(ws.uploads.parent) == []
    assert staging_leftovers(ws) == []


@pytest.mark.parametrize("artifact", ["database.dump.zst.age", "uploads.tar.zst.age"])
@pytest.mark.parametrize("where", ["header", "payload"])
def test_tampered_ciphertext_with_matching_manifest_is_refused(
        ws: Workspace, age_key: AgeKey, tmp_path: Path, artifact: str, where: str) -> None:
    """An attacker with storage access but no signing key changes one byte of ciphertext and
    fixes the manifest's size and SHA-256: age's authentication refuses it."""
    ws.write_config(encryption_toml(age_key))
    backup_id = backup_json(ws)["id"]
    path = ws.backups / backup_id / artifact
    flip_byte(path, 40 if where == "header" else None)
    rehash_in_manifest(ws, backup_id, artifact)
    assert_ok(ws.run("verify", backup_id))  # the checksums match now: only age can tell

    target, dest = f"{ws.dbname}_tampered", tmp_path / "tampered uploads"
    dbs = ws.cluster.databases()
    result = ws.run("restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                    "--yes")
    assert_error(result, 1, "cannot decrypt", artifact)
    assert ws.cluster.databases() == dbs
    assert not database_exists(ws, target)
    assert not dest.exists()
    assert hidden_siblings(tmp_path) == []
    assert staging_leftovers(ws) == []

    drill = ws.run("verify", "--drill", backup_id)
    assert drill.returncode == 1, drill.stdout + drill.stderr
    assert "cannot decrypt" in drill.stdout + drill.stderr
    assert ws.cluster.databases() == dbs


@pytest.mark.skipif(shutil.which("age") is None, reason="the age CLI is not installed")
def test_stock_tools_read_an_encrypted_dump(ws: Workspace, age_key: AgeKey,
                                            tmp_path: Path) -> None:
    """README, "Restoring by hand": age -d -i key FILE.age | zstd -dc | pg_restore."""
    ws.write_config(encryption_toml(age_key, identity=False))
    backup_id = backup_json(ws)["id"]
    folder = ws.backups / backup_id
    dump = tmp_path / "by hand.dump"
    script = 'set -o pipefail; age -d -i "$1" "$2" | zstd -d -q -o "$3"'
    by_hand = subprocess.run(["bash", "-c", script, "-", str(age_key.file),
                              str(folder / "database.dump.zst.age"), str(dump)],
                             capture_output=True, text=True, check=False)
    assert by_hand.returncode == 0, by_hand.stderr
    assert dump.read_bytes().startswith(b"PGDMP")
    toc = subprocess.run(["pg_restore", "-l", str(dump)], capture_output=True, text=True,
                         check=False)
    assert toc.returncode == 0, toc.stderr
    assert "TABLE DATA public students" in toc.stdout, toc.stdout
    untar = subprocess.run(
        ["bash", "-c", 'set -o pipefail; age -d -i "$1" "$2" | zstd -dc | tar -tf -', "-",
         str(age_key.file), str(folder / "uploads.tar.zst.age")],
        capture_output=True, text=True, check=False)
    assert untar.returncode == 0, untar.stderr
    assert "documentos/São Paulo.txt" in untar.stdout


# -- signed manifests -------------------------------------------------------------------------

@pytest.fixture
def signing(tmp_path: Path) -> SigningKey:
    return make_signing_key(tmp_path / "signing keys")


def _alter_hostname(ws: Workspace, backup_id: str) -> None:
    data = read_manifest(ws, backup_id)
    data["hostname"] += ".attacker.example"
    write_manifest(ws, backup_id, data)


def _alter_same_size(ws: Workspace, backup_id: str) -> None:
    """One character of a row count changed: the file keeps its size."""
    path = manifest_path(ws, backup_id)
    text = path.read_text(encoding="utf-8")
    match = re.search(r'"public\.students": (\d)', text)
    assert match is not None
    digit = "1" if match.group(1) != "1" else "2"
    path.write_text(text[:match.start(1)] + digit + text[match.end(1):], encoding="utf-8")


def _alter_whitespace(ws: Workspace, backup_id: str) -> None:
    path = manifest_path(ws, backup_id)
    path.write_bytes(path.read_bytes() + b"\n")


def _alter_sha256(ws: Workspace, backup_id: str) -> None:
    """Point the manifest at other bytes: the attack signatures exist to stop."""
    flip_byte(ws.backups / backup_id / "database.dump.zst")
    rehash_in_manifest(ws, backup_id, "database.dump.zst")


def _delete_signature(ws: Workspace, backup_id: str) -> None:
    (ws.backups / backup_id / "manifest.json.sig").unlink()


def _garble_signature(ws: Workspace, backup_id: str) -> None:
    (ws.backups / backup_id / "manifest.json.sig").write_bytes(b"not base64 at all!\n")


ALTERATIONS = {
    "hostname": _alter_hostname,
    "same size": _alter_same_size,
    "whitespace": _alter_whitespace,
    "artifact hash": _alter_sha256,
    "signature deleted": _delete_signature,
    "signature garbled": _garble_signature,
}


def assert_refused_everywhere(ws: Workspace, backup_id: str, tmp_path: Path) -> None:
    """restore (side by side and in place), verify and drills refuse ``backup_id``; nothing
    is created or changed."""
    dbs = ws.cluster.databases()
    live_db, live_tree = plain_dump(ws.cluster.env(), ws.dbname), tree_snapshot(ws.uploads)
    target, dest = f"{ws.dbname}_forged", tmp_path / "forged uploads"
    for args in (["restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                  "--yes"],
                 ["restore", backup_id, "--yes"],
                 ["restore", "latest", "--yes"],
                 ["verify", backup_id],
                 ["verify", "--drill", backup_id],
                 ["verify", "--drill", "latest"]):
        assert_refused(ws.run(*args), 1, 2)
    every = ws.run("verify", "--all", "--json")
    assert every.returncode == 1, every.stdout + every.stderr
    checks = {c["id"]: c for c in json.loads(every.stdout)["checks"]}
    assert not checks[backup_id]["ok"], checks
    assert "sign" in " ".join(checks[backup_id]["problems"]), checks
    assert ws.cluster.databases() == dbs
    assert plain_dump(ws.cluster.env(), ws.dbname) == live_db
    assert tree_snapshot(ws.uploads) == live_tree
    assert not dest.exists()
    assert hidden_siblings(tmp_path) == [] and hidden_siblings(ws.uploads.parent) == []
    assert staging_leftovers(ws) == []
    # No safety backup either: nothing was about to be replaced.
    assert list(listed_by_id(ws)) == [backup_id]


def test_signed_backup_verifies(ws: Workspace, signing: SigningKey, tmp_path: Path) -> None:
    ws.write_config(signing_toml(signing.private, signing.public))
    backup_id = backup_json(ws)["id"]
    sig = ws.backups / backup_id / "manifest.json.sig"
    assert sig.is_file() and sig.stat().st_size < 200
    assert listed_by_id(ws)[backup_id]["status"] == "complete"
    assert_ok(ws.run("verify", backup_id))
    drill = ws.run("verify", "--drill", backup_id)
    assert drill.returncode == 0, drill.stdout + drill.stderr
    target = f"{ws.dbname}_signed"
    assert_ok(ws.run("restore", backup_id, "--only", "database", "--to-database", target,
                     "--yes"))
    # Hosts that only read backups need only the public key.
    ws.write_config(signing_toml(None, signing.public))
    shutil.rmtree(ws.state / "cache", ignore_errors=True)
    assert listed_by_id(ws)[backup_id]["status"] == "complete"
    assert_ok(ws.run("verify", backup_id))


@pytest.mark.parametrize("alteration", list(ALTERATIONS))
def test_altered_manifest_is_refused(ws: Workspace, signing: SigningKey, tmp_path: Path,
                                     alteration: str) -> None:
    ws.write_config(signing_toml(signing.private, signing.public))
    backup_id = backup_json(ws)["id"]
    ALTERATIONS[alteration](ws, backup_id)
    assert_refused_everywhere(ws, backup_id, tmp_path)
    # A host that never saw the backup before lists it as damaged.
    shutil.rmtree(ws.state / "cache", ignore_errors=True)
    entry = listed_by_id(ws)[backup_id]
    assert (entry["status"], entry["targets"]) == ("damaged", []), entry


@pytest.mark.parametrize("alteration", list(ALTERATIONS))
def test_altered_manifest_is_listed_damaged_on_the_backup_host(
        ws: Workspace, signing: SigningKey, alteration: str) -> None:
    """The host that made (and listed) the backup must see the alteration too."""
    ws.write_config(signing_toml(signing.private, signing.public))
    backup_id = backup_json(ws)["id"]
    assert listed_by_id(ws)[backup_id]["status"] == "complete"
    ALTERATIONS[alteration](ws, backup_id)
    entry = listed_by_id(ws)[backup_id]
    assert (entry["status"], entry["targets"]) == ("damaged", []), entry


def test_refusal_says_why(ws: Workspace, signing: SigningKey) -> None:
    ws.write_config(signing_toml(signing.private, signing.public))
    backup_id = backup_json(ws)["id"]
    _alter_hostname(ws, backup_id)
    for args in (["verify", backup_id], ["restore", backup_id, "--yes"]):
        assert_error(ws.run(*args), 1, backup_id, "signature")


def test_backup_signed_with_another_key_is_refused(ws: Workspace, signing: SigningKey,
                                                   tmp_path: Path) -> None:
    ws.write_config(signing_toml(signing.private, signing.public))
    good = backup_json(ws)["id"]
    # Someone with storage credentials and their own key replaces manifest and signature.
    forger = make_signing_key(tmp_path / "forger")
    forged = read_manifest(ws, good)
    forged["hostname"] += ".forged"
    forged_bytes = (json.dumps(forged, indent=2) + "\n").encode()
    manifest_path(ws, good).write_bytes(forged_bytes)
    sig = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey",
                          str(forger.private), "-in", str(manifest_path(ws, good))],
                         check=True, capture_output=True).stdout
    (ws.backups / good / "manifest.json.sig").write_bytes(base64.b64encode(sig) + b"\n")
    # The control: the forged signature is valid for the forger's key.
    ws.write_config(signing_toml(None, forger.public))
    shutil.rmtree(ws.state / "cache", ignore_errors=True)
    assert listed_by_id(ws)[good]["status"] == "complete"

    ws.write_config(signing_toml(signing.private, signing.public))
    shutil.rmtree(ws.state / "cache", ignore_errors=True)
    assert listed_by_id(ws)[good]["status"] == "damaged"
    assert_refused_everywhere(ws, good, tmp_path)


def test_backup_host_with_the_wrong_public_key(ws: Workspace, signing: SigningKey,
                                               tmp_path: Path) -> None:
    """Signed with one key, checked with another: every backup is damaged, none restored."""
    other = make_signing_key(tmp_path / "other")
    ws.write_config(signing_toml(signing.private, other.public))
    backup_id = backup_json(ws)["id"]
    assert listed_by_id(ws)[backup_id]["status"] == "damaged"
    assert_refused_everywhere(ws, backup_id, tmp_path)



# -- key rotation: several trusted public keys ------------------------------------------------

def key_id_of(public: Path) -> str:
    """A signing key's id as the README says to compute it: SHA-256 of the key's 32 raw bytes
    (the tail of its DER form), 16 hex digits."""
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(public), "-outform", "DER"],
                         check=True, capture_output=True).stdout
    return "sha256:" + hashlib.sha256(der[-32:]).hexdigest()[:16]


def trust_toml(key_file: Path | None, *publics: Path) -> str:
    """``[signing]`` with the list form: every key in ``publics`` trusted."""
    text = "[signing]\n" + (f"key_file = {toml_str(key_file)}\n" if key_file else "")
    return text + f"public_key_files = [{', '.join(toml_str(p) for p in publics)}]\n"


def test_rotated_signing_key_keeps_older_backups_trusted(ws: Workspace, signing: SigningKey,
                                                         tmp_path: Path) -> None:
    """After a rotation, backups signed with the old key and with the new one are both good
    (trusted keys: old and new), and each says which key signed it."""
    ws.write_config(signing_toml(signing.private, signing.public))
    old = backup_json(ws)["id"]
    new_key = make_signing_key(tmp_path / "new keys")
    ws.write_config(trust_toml(new_key.private, signing.public, new_key.public))
    new = backup_json(ws)["id"]
    old_id, new_id = key_id_of(signing.public), key_id_of(new_key.public)
    assert old_id != new_id
    entries = listed_by_id(ws)
    assert [entries[b]["status"] for b in (old, new)] == ["complete", "complete"], entries
    assert (entries[old]["signed_by"], entries[new]["signed_by"]) == (old_id, new_id)
    human = assert_ok(ws.run("list"))
    assert old_id in human and new_id in human, human
    for backup_id in (old, new):
        assert_ok(ws.run("verify", backup_id))
    assert_ok(ws.run("restore", old, "--only", "database", "--to-database",
                     f"{ws.dbname}_old_key", "--yes"))
    # A reading host with a fresh cache agrees.
    ws.write_config(trust_toml(None, new_key.public, signing.public))
    shutil.rmtree(ws.state / "cache", ignore_errors=True)
    assert listed_by_id(ws)[old]["signed_by"] == old_id


def test_backup_signed_by_a_key_no_longer_trusted_says_unknown_key(
        ws: Workspace, signing: SigningKey, tmp_path: Path) -> None:
    """Drop the old key from the trusted ones: its backups are refused as signed by an
    unknown key (named by its id), not as altered."""
    ws.write_config(signing_toml(signing.private, signing.public))
    old = backup_json(ws)["id"]
    new_key = make_signing_key(tmp_path / "new keys")
    ws.write_config(signing_toml(new_key.private, new_key.public))
    entry = listed_by_id(ws)[old]
    assert entry["status"] == "damaged", entry
    why = entry["damaged_targets"]["local"]["why"]
    assert "unknown key" in why and key_id_of(signing.public) in why, why
    assert "changed after" not in why, why
    message = assert_error(ws.run("restore", old, "--yes"), 1, old, "unknown key")
    assert "changed after" not in message
    assert_error(ws.run("verify", old), 1, "unknown key")


def test_signature_of_an_older_manifest_without_a_key_id(ws: Workspace, signing: SigningKey,
                                                         tmp_path: Path) -> None:
    """A manifest made before signatures named their key (no ``signed_by``) still verifies,
    and the key that verified it is named; checked with other keys only, it is refused and
    the message says both possibilities."""
    ws.write_config(signing_toml(signing.private, signing.public))
    backup_id = backup_json(ws)["id"]
    data = read_manifest(ws, backup_id)
    data.pop("signed_by", None)
    write_manifest(ws, backup_id, data)
    sig = subprocess.run(["openssl", "pkeyutl", "-sign", "-rawin", "-inkey",
                          str(signing.private), "-in", str(manifest_path(ws, backup_id))],
                         check=True, capture_output=True).stdout
    (ws.backups / backup_id / "manifest.json.sig").write_bytes(base64.b64encode(sig) + b"\n")
    other = make_signing_key(tmp_path / "other")
    ws.write_config(trust_toml(None, other.public, signing.public))
    entry = listed_by_id(ws)[backup_id]
    assert (entry["status"], entry["signed_by"]) == ("complete", key_id_of(signing.public))
    ws.write_config(trust_toml(None, other.public))
    why = listed_by_id(ws)[backup_id]["damaged_targets"]["local"]["why"]
    assert "changed after it was made" in why and "not trusted here" in why, why


@pytest.mark.parametrize(("signing_text", "expected"), [
    ('public_key_files = "/etc/k.pub"\n', r"signing\.public_key_files \(line \d+\): .*list"),
    ("public_key_files = []\n", r"signing\.public_key_files \(line \d+\): .*at least 1"),
    ('public_key_file = "/etc/a.pub"\npublic_key_files = ["/etc/b.pub"]\n',
     r"signing.*: set public_key_file or public_key_files, not both"),
])
def test_trusted_keys_config_errors_are_one_line(signing_text: str, expected: str) -> None:
    text = ('[database]\nurl = "postgresql://u@h/db"\n'
            '[[targets]]\nname = "l"\ntype = "local"\npath = "/tmp/x"\n[signing]\n'
            + signing_text)
    with pytest.raises(ConfigError, match=r"fuzz\.toml: " + expected) as caught:
        parse_config(text, Path("fuzz.toml"), env={})
    assert "\n" not in str(caught.value)


def test_unreadable_trusted_key_is_named(tmp_path: Path, signing: SigningKey) -> None:
    missing = tmp_path / "gone.pub"
    text = ('[database]\nurl = "postgresql://u@h/db"\n'
            '[[targets]]\nname = "l"\ntype = "local"\npath = "/tmp/x"\n'
            + trust_toml(None, signing.public, missing))
    ctx = Context(parse_config(text, Path("fuzz.toml"), env={}))
    with pytest.raises(ConfigError, match=r"^signing\.public_key_files: cannot load .*gone\.pub"):
        _ = ctx.verifier


# -- a copy refused for its signature: messages -----------------------------------------------

def _altered_on_a_second_target(ws: Workspace, signing: SigningKey, tmp_path: Path) -> str:
    """A signed backup on targets ``local`` and ``second``, its manifest altered on
    ``second`` only; its id."""
    second = tmp_path / "second"
    ws.write_config(signing_toml(signing.private, signing.public)
                    + f'[[targets]]\nname = "second"\ntype = "local"\npath = {toml_str(second)}\n')
    backup_id = backup_json(ws)["id"]
    altered = second / backup_id / "manifest.json"
    altered.write_bytes(altered.read_bytes() + b"\n")
    return backup_id


def test_copy_refused_for_its_signature_is_listed_damaged_signature(
        ws: Workspace, signing: SigningKey, tmp_path: Path) -> None:
    """``list`` says ``damaged (signature)``; JSON and the API give the copy's reason."""
    backup_id = _altered_on_a_second_target(ws, signing, tmp_path)
    row = next(line for line in assert_ok(ws.run("list")).splitlines()
               if line.startswith(backup_id))
    assert "damaged (signature)" in row, row
    entry = listed_by_id(ws)[backup_id]
    assert entry["targets"] == ["local"], entry
    assert entry["damaged_targets"]["second"]["reason"] == "signature", entry
    ctx = Context(parse_config(ws.config.read_text(), ws.config))
    api = listing.entry(ctx.scan(ctx.targets())[0], {}, {})
    copies = {c["target"]: c for c in api["targets"]}
    assert (copies["second"]["state"], copies["second"]["reason"]) == ("damaged", "signature")
    assert (copies["local"]["state"], copies["local"]["reason"]) == ("complete", None)


def test_restore_from_a_copy_refused_for_its_signature_fails(
        ws: Workspace, signing: SigningKey, tmp_path: Path) -> None:
    """``restore --from`` the refused copy's target says why and exits 1 (failed), never
    "no complete copy" (a usage error); the good copy still restores."""
    backup_id = _altered_on_a_second_target(ws, signing, tmp_path)
    result = ws.run("restore", "--from", "second", backup_id, "--only", "database",
                    "--to-database", f"{ws.dbname}_second", "--yes")
    message = assert_error(result, 1, backup_id, "second", "signature")
    assert "no complete copy" not in message
    assert not database_exists(ws, f"{ws.dbname}_second")
    assert_ok(ws.run("restore", "--from", "local", backup_id, "--only", "database",
                     "--to-database", f"{ws.dbname}_local", "--yes"))

# -- S3 Object Lock (moto) --------------------------------------------------------------------

_buckets = iter(range(1_000_000))


@pytest.fixture
def locked_bucket(s3_server: S3Server) -> str:
    """A fresh bucket created with Object Lock (hence versioning) enabled."""
    name = f"conexa-locked-{os.getpid()}-{next(_buckets)}"
    s3_server.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def s3_target_toml(s3_server: S3Server, bucket: str, extra: str = "") -> str:
    return (f'[[targets]]\nname = "s3"\ntype = "s3"\nbucket = {toml_str(bucket)}\n'
            f"endpoint_url = {toml_str(s3_server.endpoint)}\nretries = 2\n" + extra)


def _retain_until(client: Any, bucket: str, key: str) -> tuple[str, datetime]:
    head = client.head_object(Bucket=bucket, Key=key)
    return head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")


def test_object_lock_stores_retain_until(ws: Workspace, s3_server: S3Server,
                                         locked_bucket: str) -> None:
    ws.write_config(s3_target_toml(s3_server, locked_bucket,
                                   'object_lock_mode = "COMPLIANCE"\nobject_lock_days = 2\n'))
    before = datetime.now(UTC)
    report = backup_json(ws)
    after = datetime.now(UTC)
    assert report["targets"] == ["local", "s3"], report
    client = s3_server.client()
    keys = {o["Key"]: o["Size"]
            for o in client.list_objects_v2(Bucket=locked_bucket)["Contents"]}
    manifest_key = f"{report['id']}/manifest.json"
    assert manifest_key in keys
    # moto applies Object Lock to single PUTs only, not to multipart uploads (which get the
    # same arguments in CreateMultipartUpload): check the objects below one part (16 MiB),
    # which the tool sends with one PUT. With this sample data that is every object.
    small = [k for k, size in keys.items() if size < 16 << 20]
    assert manifest_key in small and len(small) >= 4, keys
    for key in small:
        mode, until = _retain_until(client, locked_bucket, key)
        assert mode == "COMPLIANCE", key
        assert before + timedelta(days=2, minutes=-1) <= until, (key, until)
        assert until <= after + timedelta(days=2, minutes=1), (key, until)


def test_locked_version_cannot_be_deleted_but_prune_hides_it(
        ws: Workspace, s3_server: S3Server, locked_bucket: str) -> None:
    ws.write_config("[retention]\nkeep_last = 1\n" + s3_target_toml(
        s3_server, locked_bucket, 'object_lock_mode = "COMPLIANCE"\nobject_lock_days = 2\n'))
    old = backup_json(ws, "--no-prune")["id"]
    new = backup_json(ws, "--no-prune")["id"]
    client = s3_server.client()
    manifest_key = f"{old}/manifest.json"
    versions = client.list_object_versions(Bucket=locked_bucket, Prefix=manifest_key)
    version = versions["Versions"][0]["VersionId"]

    # Stolen credentials cannot destroy the copy: the locked version stays.
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError) as refused:
        client.delete_object(Bucket=locked_bucket, Key=manifest_key, VersionId=version)
    assert refused.value.response["Error"]["Code"] == "AccessDenied"

    result = ws.run("prune", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    plans = {p["target"]: p for p in json.loads(result.stdout)}
    # Not deleted: hidden, and said so (the bucket keeps the locked versions until their date).
    assert plans["s3"]["deleted"] == [], plans["s3"]
    assert [h["id"] for h in plans["s3"]["hidden"]] == [old], plans["s3"]
    assert plans["s3"]["hidden"][0]["locked_until"].startswith("20")
    assert set(listed_by_id(ws)) == {new}
    visible = {o["Key"].split("/")[0]
               for o in client.list_objects_v2(Bucket=locked_bucket)["Contents"]}
    assert visible == {new}
    # Hidden behind delete markers; the locked versions are still there.
    after = client.list_object_versions(Bucket=locked_bucket, Prefix=f"{old}/")
    assert {m["Key"] for m in after.get("DeleteMarkers", [])} >= {manifest_key}
    assert version in {v["VersionId"] for v in after["Versions"]}
    assert _retain_until(client, locked_bucket, f"{new}/manifest.json")[0] == "COMPLIANCE"


@pytest.mark.parametrize("extra", [
    "",
    "retention = { keep_yearly = \"all\" }\n",
    "retention = { keep_daily = -1 }\n",
    "retention = {}\n",
    "retention = { keep_hourly = \"all\", keep_daily = 7 }\n",
], ids=["no days", "yearly all", "daily all", "empty retention", "hourly all"])
def test_object_lock_without_a_period_is_a_config_error(
        ws: Workspace, s3_server: S3Server, locked_bucket: str, extra: str) -> None:
    # A top-level [retention] is not the target's own: it does not set the lock period.
    ws.write_config("[retention]\nkeep_daily = 7\n" + s3_target_toml(
        s3_server, locked_bucket, 'object_lock_mode = "GOVERNANCE"\n' + extra))
    for command in (["backup"], ["list"]):
        result = ws.run(*command)
        message = assert_error(result, 2, "object_lock")
        assert len(message.strip().splitlines()) == 1, message
    assert not ws.backups.exists()
    assert "Contents" not in s3_server.client().list_objects_v2(Bucket=locked_bucket)


@pytest.mark.parametrize(("retention", "days"), [
    ("{ keep_daily = 7, keep_weekly = 4 }", 28),
    ("{ keep_daily = 7 }", 7),
    ("{ keep_monthly = 12 }", 372),
    ("{ keep_yearly = 2 }", 732),
    ("{ keep_daily = 7, keep_within = \"45d\" }", 45),
    ("{ keep_within = \"36h\" }", 1),
    ("{ keep_last = 3, keep_weekly = 2 }", 14),
    ("{ keep_hourly = 48 }", 2),
    ("{ keep_hourly = 30 }", 2),  # 30 hours reach into a second day: locked two
    ("{ keep_hourly = 24, keep_daily = 7 }", 7),
])
def test_lock_days_derived_from_the_target_retention(retention: str, days: int) -> None:
    text = ('state_dir = "/nonexistent/state"\n[database]\nurl = "postgresql://u@h/db"\n'
            '[[targets]]\nname = "s3"\ntype = "s3"\nbucket = "conexa-b"\n'
            f'object_lock_mode = "COMPLIANCE"\nretention = {retention}\n')
    config = parse_config(text, Path("lock.toml"), env={})
    assert config.targets[0].lock_days() == days  # type: ignore[attr-defined]


def test_lock_days_from_retention_reach_the_store(ws: Workspace, s3_server: S3Server,
                                                  locked_bucket: str) -> None:
    ws.write_config(s3_target_toml(
        s3_server, locked_bucket,
        'object_lock_mode = "GOVERNANCE"\nretention = { keep_daily = 7, keep_weekly = 4 }\n'))
    before = datetime.now(UTC)
    backup_id = backup_json(ws)["id"]
    mode, until = _retain_until(s3_server.client(), locked_bucket, f"{backup_id}/manifest.json")
    assert mode == "GOVERNANCE"
    assert abs(until - (before + timedelta(days=28))) < timedelta(minutes=2), until


# -- secrets ----------------------------------------------------------------------------------

@dataclass
class Watched:
    """One CLI run watched from outside: its result and the argv of every process seen."""

    result: subprocess.CompletedProcess[str]
    argvs: list[bytes]


def run_watched(ws: Workspace, *args: str, env: dict[str, str], needles: list[bytes],
                timeout: float = 180) -> Watched:
    """Run the CLI while polling every ``/proc/*/cmdline``; fail on a needle in any argv."""
    proc = subprocess.Popen(cli_argv(ws, *args), env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen: set[bytes] = set()
    leaks: list[tuple[int, bytes]] = []
    with proc:
        while proc.poll() is None:
            for pid, cmdline in proc_files("cmdline"):
                seen.add(cmdline)
                leaks += [(pid, cmdline) for n in needles if n in cmdline]
        out, err = proc.communicate(timeout=timeout)
    assert leaks == [], f"a secret in a process's argv: {leaks}"
    result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                         out.decode("utf-8", "replace"),
                                         err.decode("utf-8", "replace"))
    return Watched(result, sorted(seen))


class _Hook(http.server.BaseHTTPRequestHandler):
    """A Slack-like sink: answers with the status the test sets; keeps request paths."""

    status = 200
    paths: list[str] = []  # noqa: RUF012 - shared by the server's handler instances

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slack_sink() -> Iterator[tuple[str, type[_Hook]]]:
    """A local Slack-like HTTP sink; a handler class of its own per test."""

    class Hook(_Hook):
        status = 200
        paths: list[str] = []  # noqa: RUF012

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Hook
    finally:
        server.shutdown()
        server.server_close()


def all_text_below(*roots: Path) -> bytes:
    """Every file below ``roots`` that is not an artifact (logs, state, caches, manifests)."""
    chunks = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.endswith((".age", ".zst", ".gz")):
                chunks.append(path.read_bytes())
    return b"\n".join(chunks)


def test_secrets_never_in_argv_output_logs_or_json(
        ws: Workspace, s3_server: S3Server, slack_sink: tuple[str, type[_Hook]],
        tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    secrets = {
        "s3 secret key": f"S3sEcReT{token[:12]}",
        "slack webhook": f"/services/T0{token[:6]}/B0{token[6:12]}/xoxb{token[12:28]}",
        "database password": f"Pg-PassW0rd-{token[:10]}",
    }
    age = make_age_key(tmp_path / "keys" / "age.txt")
    secrets["age identity"] = age.identity
    secrets["age identity body"] = age.identity.removeprefix("AGE-SECRET-KEY-")
    needles = [v.encode() for v in secrets.values()]

    sink_url, hook = slack_sink
    pw_file = tmp_path / "db password"
    pw_file.write_text(secrets["database password"] + "\n", encoding="utf-8")
    pw_file.chmod(0o600)
    slow = make_bin_dir(tmp_path / "bin", 'sleep 0.3\nexec "$REAL" "$@"')
    prefix = f"secrets-{uuid.uuid4().hex[:8]}"

    def config(bucket: str = "conexa-test") -> None:
        write_config(
            ws,
            s3_target_toml(s3_server, bucket,
                           f'prefix = "{prefix}"\naccess_key_id = "testing"\n'
                           'secret_access_key = "${S3_SECRET}"\n')
            + encryption_toml(age, identity=False) + 'identity = "${AGE_IDENTITY}"\n'
            + '[[notify]]\ntype = "slack"\nwebhook_url = "${SLACK_URL}"\nretries = 1\n'
            'timeout = 5\nevents = ["success", "failure", "partial"]\n',
            password_file=pw_file, bin_dir=slow, globals=True)

    config()
    env = {"S3_SECRET": secrets["s3 secret key"], "SLACK_URL": sink_url + secrets["slack webhook"],
           "AGE_IDENTITY": age.identity}
    outputs: list[str] = []

    def watched(*args: str, code: int | tuple[int, ...] = 0,
                run_env: dict[str, str] | None = None) -> Watched:
        run = run_watched(ws, *args, env=run_env or env, needles=needles)
        codes = code if isinstance(code, tuple) else (code,)
        assert run.result.returncode in codes, run.result.stdout + run.result.stderr
        outputs.extend([run.result.stdout, run.result.stderr])
        return run

    backup = watched("--verbose", "backup", "--json")
    backup_id = json.loads(backup.result.stdout)["id"]
    assert json.loads(backup.result.stdout)["targets"] == ["local", "s3"]
    assert any(b"pg_dump" in argv for argv in backup.argvs), "never saw pg_dump running"
    target, dest = f"{ws.dbname}_secret", tmp_path / "secret uploads"
    restore = watched("--verbose", "restore", backup_id, "--from", "s3", "--to-database",
                      target, "--uploads-to", str(dest), "--yes", "--json")
    assert any(b"pg_restore" in argv for argv in restore.argvs), "never saw pg_restore"
    assert plain_dump(ws.cluster.env(), target) == plain_dump(ws.cluster.env(), ws.dbname)
    watched("--verbose", "verify", "--drill", backup_id, "--from", "s3", "--json")
    for args in (["list", "--json"], ["verify", "--all", "--json"], ["status", "--json"],
                 ["report", "--json"], ["check", "--json"]):
        watched("--verbose", *args, code=(0, 1))
    # The notifications went out (so a leak through them would have been exercised).
    assert any(p == secrets["slack webhook"] for p in hook.paths), hook.paths

    # Errors, with --verbose (tracebacks) and without.
    hook.status = 500  # Slack is down: the failed delivery is reported as a warning
    other = make_age_key(tmp_path / "keys" / "other.txt")
    needles += [other.identity.encode()]
    for verbose in (["--verbose"], []):
        wrong_key = {**env, "AGE_IDENTITY": other.identity}
        run = watched(*verbose, "restore", backup_id, "--to-database", f"{target}_x", "--yes",
                      code=2, run_env=wrong_key)  # refused before any work (preflight)
        assert "cannot decrypt" in run.result.stderr
        bad_identity = {**env, "AGE_IDENTITY": "AGE-SECRET-KEY-1" + secrets["age identity body"]
                        [::-1]}
        needles.append(secrets["age identity body"][::-1].encode())
        watched(*verbose, "restore", backup_id, "--to-database", f"{target}_y", "--yes",
                code=(1, 2), run_env=bad_identity)
        watched(*verbose, "restore", "20200101T000000Z", "--yes", code=2)
    config(bucket="no-such-bucket")
    partial = watched("--verbose", "backup", "--json", code=3)
    assert "warning: notification via slack failed" in partial.result.stderr
    assert json.loads(partial.result.stdout)["failed_targets"]
    plain = watched("backup", code=3)
    assert "no-such-bucket" in plain.result.stderr

    # The control: the secrets were really in play.
    assert secrets["database password"].encode() in pw_file.read_bytes()
    text = "\n".join(outputs).encode() + all_text_below(ws.state, ws.backups)
    for what, value in secrets.items():
        assert value.encode() not in text, f"the {what} leaked"
    assert other.identity.encode() not in text
    assert secrets["age identity body"][::-1].encode() not in text


# -- config file permissions ------------------------------------------------------------------

WARNING = re.compile(r"^warning: .*readable by other users.*chmod 600", re.MULTILINE)


def _url_with_password(ws: Workspace, password: str) -> str:
    c = ws.cluster
    return f"postgresql://postgres:{password}@{c.host}:{c.port}/{ws.dbname}"


def test_world_readable_config_with_a_literal_password_warns_once(ws: Workspace) -> None:
    password = f"Lit3ral-{uuid.uuid4().hex[:8]}"
    write_config(ws, url=_url_with_password(ws, password), mode=0o644)
    result = ws.run("list")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and WARNING.match(lines[0]), result.stderr
    assert "database.url" in lines[0] and str(ws.config) in lines[0]
    assert password not in result.stdout + result.stderr
    # The command still works, and says it once per run.
    backup = ws.run("backup")
    assert backup.returncode == 0, backup.stderr
    assert len(WARNING.findall(backup.stderr)) == 1, backup.stderr
    assert password not in backup.stdout + backup.stderr


def test_private_config_with_a_literal_password_does_not_warn(ws: Workspace) -> None:
    write_config(ws, url=_url_with_password(ws, "Lit3ral-pw"), mode=0o600)
    result = ws.run("list")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("shape", [
    "url variable",
    "password variable in url",
    "notifier and s3 variables",
])
def test_world_readable_config_with_only_variables_does_not_warn(
        ws: Workspace, s3_server: S3Server, shape: str) -> None:
    env = {"DB_URL": _url_with_password(ws, "FromTheEnv1"), "PGPW": "FromTheEnv2",
           "S3_SECRET": "FromTheEnv3", "SLACK_URL": "http://127.0.0.1:9/services/T/B/x"}
    if shape == "url variable":
        write_config(ws, url="${DB_URL}", mode=0o644)
    elif shape == "password variable in url":
        write_config(ws, url=_url_with_password(ws, "${PGPW}"), mode=0o644)
    else:
        write_config(ws, s3_target_toml(s3_server, "conexa-test",
                                        'access_key_id = "testing"\n'
                                        'secret_access_key = "${S3_SECRET}"\n')
                     + '[[notify]]\ntype = "slack"\nwebhook_url = "${SLACK_URL}"\n',
                     mode=0o644)
    result = ws.run("list", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


@pytest.mark.parametrize(("extra", "key"), [
    ('[[notify]]\ntype = "slack"\nwebhook_url = "https://hooks.slack.com/services/T/B/xoxb1"\n',
     "notify.0.webhook_url"),
    ('[[targets]]\nname = "s3"\ntype = "s3"\nbucket = "conexa-test"\n'
     'secret_access_key = "AKIAsecretLiteral"\n', "targets.1.secret_access_key"),
    ('[encryption]\nidentity = "AGE-SECRET-KEY-1LITERAL"\n', "encryption.identity"),
])
def test_literal_secrets_are_found(ws: Workspace, extra: str, key: str) -> None:
    text = write_config(ws, extra, mode=0o644).read_text(encoding="utf-8")
    assert secrets_written_in(text) == [key]
    warning = permission_warning(ws.config, text)
    assert warning is not None and key in warning and "chmod 600" in warning
    assert "LITERAL" not in warning and "xoxb1" not in warning and "Literal" not in warning
    ws.config.chmod(0o600)
    assert permission_warning(ws.config, text) is None


# -- hostile config files ---------------------------------------------------------------------

NASTY_STRINGS = [
    "", " ", "'", '"', '"""', "\\", "\n", "\r\n", "\t", "a\nb = 1", "[database]", "[[targets]]",
    "$(touch /tmp/conexa-pwned)", "`touch /tmp/conexa-pwned`", "; rm -rf / #", "| cat", "&&",
    "${UNSET_VARIABLE}", "${", "$", "${1BAD}", "$HOME", "../../etc/passwd", "/", ".", "~",
    "postgresql://", "postgresql://u:p@h/db", "postgresql://u@h:99999/db", "postgres://@/",
    "http://", "all", "none", "-1", "0", "1d", "0d", "30x", "1e9d", "zstd", "gzip", "local",
    "s3", "gcs", "slack", "email", "webhook", "heartbeat", "COMPLIANCE", "failure",
    "age1notakey", "AGE-SECRET-KEY-1", "São Paulo — Conceição", "\u202e", "\U0001f600",
    "\x00", "\x7f", "x" * 300,
]
_text = st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=20))
_scalar = st.one_of(
    _text,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2, 7, 64, 65, 257, 10**6]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(timezones=st.none() | st.just(UTC)),
    st.dates(),
    st.times(),
)
_key = st.one_of(st.sampled_from(["name", "type", "path", "url", "x", "", " ", "a.b", "\n"]),
                 st.text(max_size=8))
_anything = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_key, inner, max_size=3),
    max_leaves=6,
)

SECTION_KEYS = {
    "database": ["url", "password_file", "jobs", "globals", "maintenance_database", "bin_dir"],
    "uploads": ["path"],
    "compression": ["algorithm", "level", "threads"],
    "retention": ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly",
                  "keep_yearly", "keep_within", "min_keep", "prune_after_backup"],
    "drill": ["database_url", "password_file", "checks", "rto_objective", "uploads_sample"],
    "monitoring": ["max_backup_age", "max_drill_age", "metrics_file", "currency"],
    "encryption": ["recipients", "identity_file", "identity"],
    "signing": ["key_file", "public_key_file", "public_key_files"],
}
TARGET_KEYS = ["name", "type", "path", "bucket", "prefix", "region", "endpoint_url",
               "storage_class", "sse", "kms_key_id", "access_key_id", "secret_access_key",
               "secret_access_key_file", "retries", "object_lock_mode", "object_lock_days",
               "retention", "price_per_gb_month", "project", "credentials_file"]
NOTIFY_KEYS = ["type", "name", "events", "timeout", "retries", "webhook_url", "url", "headers",
               "host", "port", "security", "username", "password", "password_file", "from",
               "to", "cafile", "start_url", "success_url", "failure_url", "kinds"]
PLAUSIBLE = st.sampled_from([
    "postgresql://postgres@127.0.0.1:5432/conexa", "/tmp/conexa-fuzz-never", 2, 1, True,
    False, "zstd", "gzip", "local", "s3", "gcs", "slack", "webhook", "email", "heartbeat",
    "7d", "36h", "COMPLIANCE", "GOVERNANCE", "AES256", ["failure"], ["success", "backup"],
    ["ops@example.org"], {"keep_daily": 7}, {"keep_daily": 7, "keep_weekly": 4},
    {"keep_yearly": "all"}, {"Authorization": "Bearer x"}, "conexa-backups", "all", -1,
    "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p",
])
_value = st.one_of(PLAUSIBLE, PLAUSIBLE, _anything)


def _table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from([*keys, "unknown_key"]), _value,
                           max_size=len(keys) + 1)


_config_tree = st.fixed_dictionaries(
    {},
    optional={
        "state_dir": _value,
        **{section: st.one_of(_table(keys), _anything) for section, keys in
           SECTION_KEYS.items()},
        "targets": st.one_of(st.lists(_table(TARGET_KEYS), max_size=3), _anything),
        "notify": st.one_of(st.lists(_table(NOTIFY_KEYS), max_size=2), _anything),
        "extra": _anything,
    },
)

TOML_TOKENS = ["[", "]", "[[", "]]", "=", '"', "'", '"""', "'''", "\n", " ", ",", "{", "}",
               ".", "#", "database", "targets", "url", "state_dir", "true", "1", "-1", "1e3",
               "nan", "inf", "1979-05-27T07:32:00Z", "\\u0000", "\\", "${X}", "$(id)", "é"]
_toml_ish = st.lists(st.one_of(st.sampled_from(TOML_TOKENS), st.text(max_size=5)),
                     max_size=40).map("".join)


def _parse(text: str) -> Config | None:
    """parse_config's contract: a Config, or ConfigError; anything else fails the test."""
    try:
        return parse_config(text, Path("fuzz.toml"), env={})
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("fuzz.toml"), message
        assert "Traceback" not in message
        return None


def _toml(tree: dict[str, Any]) -> str | None:
    try:
        return tomli_w.dumps(tree)
    except (TypeError, ValueError):
        return None  # not representable in TOML (e.g. a datetime with a strange zone)


FUZZ = settings(max_examples=int(os.environ.get("CONEXA_FUZZ_EXAMPLES", "300")),
                deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(_toml_ish)
def test_fuzz_toml_ish_text(text: str) -> None:
    _parse(text)


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_any_text(text: str) -> None:
    _parse(text)


@FUZZ
@given(_config_tree)
def test_fuzz_known_keys_with_wrong_types(tree: dict[str, Any]) -> None:
    text = _toml(tree)
    assume(text is not None)
    assert text is not None
    _parse(text)


@FUZZ
@given(st.data())
def test_fuzz_one_wrong_value_in_a_valid_config(data: st.DataObject) -> None:
    """A valid config with one value replaced: the error names that key, never its value."""
    tree: dict[str, Any] = {
        "state_dir": "/tmp/conexa-fuzz-never",
        "database": {"url": "postgresql://postgres@127.0.0.1:5432/conexa"},
        "uploads": {"path": "/srv/conexa/uploads"},
        "retention": {"keep_daily": 7},
        "targets": [{"name": "local", "type": "local", "path": "/tmp/conexa-fuzz-never-t"},
                    {"name": "s3", "type": "s3", "bucket": "conexa-backups",
                     "object_lock_mode": "COMPLIANCE", "retention": {"keep_daily": 7}}],
        "notify": [{"type": "slack", "webhook_url": "https://hooks.example.org/x"}],
    }
    assert _parse(tomli_w.dumps(tree)) is not None
    section = data.draw(st.sampled_from(["database", "uploads", "retention", "targets.0",
                                         "targets.1", "notify.0", "drill", "encryption",
                                         "signing", "compression", "monitoring"]))
    name, _, index = section.partition(".")
    table = tree.setdefault(name, {}) if not index else tree[name][int(index)]
    keys = {"targets": TARGET_KEYS, "notify": NOTIFY_KEYS}.get(name) or SECTION_KEYS[name]
    key = data.draw(st.sampled_from(keys))
    table[key] = data.draw(_anything)
    text = _toml(tree)
    assume(text is not None)
    assert text is not None
    try:
        parse_config(text, Path("fuzz.toml"), env={})
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml:"), str(exc)
        value = table[key]
        secret_keys = {"url", "database_url", "password", "secret_access_key", "webhook_url",
                       "identity", "headers", "access_key_id"}
        if (key in secret_keys and isinstance(value, str) and len(value) > 6
                and "$" not in value):
            assert value not in str(exc), (key, str(exc))  # never echo what may be a secret


@pytest.mark.parametrize("extra", [
    '[[targets]]\nname = []\ntype = "local"\npath = "/tmp/x"\n',
    '[[targets]]\nname = "l"\ntype = { a = 1 }\n',
    '[[targets]]\nname = "l"\ntype = "local"\npath = "/tmp/x"\n[[notify]]\ntype = ["slack"]\n',
])
def test_table_or_array_as_a_target_name_or_type(extra: str) -> None:
    text = '[database]\nurl = "postgresql://u@h/db"\n' + extra
    with pytest.raises(ConfigError, match=r"fuzz\.toml: (targets|notify)\.0\."):
        parse_config(text, Path("fuzz.toml"), env={})


# -- hostile config files, through the CLI ----------------------------------------------------

@pytest.mark.parametrize(("depth", "why"), [
    (50, r"x \(line 1\): unknown key"),
    (2000, "nested too deeply"),
    (5000, "nested too deeply"),
])
def test_deeply_nested_toml(depth: int, why: str) -> None:
    text = "x = " + "[" * depth + "]" * depth + "\n"
    with pytest.raises(ConfigError, match=r"fuzz\.toml: .*" + why):
        parse_config(text, Path("fuzz.toml"), env={})


def _hostile_configs(root: Path) -> dict[str, str | bytes]:
    head = (f"state_dir = {toml_str(root / 'state')}\n[database]\n"
            'url = "postgresql://postgres@127.0.0.1:1/conexa"\n')
    target = f'[[targets]]\nname = "local"\ntype = "local"\npath = {toml_str(root / "target")}\n'
    return {
        "shell metacharacters": head.replace(
            "postgres@", "$(touch /tmp/conexa-pwned);`id`@") + 'jobs = "2; rm -rf /"\n'
        + target,
        "quote in a key": head + '"data\\"ba\'se" = 1\n' + target,
        "newline in a key": head + '"data\\nerror: forged line" = 1\n' + target,
        "escape sequence in a key": head + '"\\u001b[2J\\u001b[31mred" = 1\n' + target,
        "unterminated string": head + target + 'prefix = "oops\n',
        "targets is a string": head + 'targets = "local"\n',
        "table as a path": head + target.replace("path = ", "path.x = "),
        "invalid utf-8": head.encode() + b"\xff\xfe\xfa = 1\n" + target.encode(),
        "empty file": "",
        "unset variable": head + target + 'prefix = "${NO_SUCH_VARIABLE_HERE}"\n',
        "huge integer": head + "jobs = 99999999999999999999\n" + target,
        "negative retention count as a float": head + target + "[retention]\nkeep_last = -1.5\n",
        "deep nesting": head + "x = " + "[" * 2000 + "]" * 2000 + "\n" + target,
        "NUL in state_dir": head.replace("/state", "/st\\u0000ate") + target,
        "array as a target type": head + target.replace('type = "local"', 'type = ["local"]'),
    }


def run_cli_in(folder: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conexa_backup", "--config", str(config), *args],
                          cwd=folder, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, check=False)


def assert_config_refused(folder: Path, config: Path, *commands: str) -> None:
    for command in commands:
        result = run_cli_in(folder, config, command)
        detail = f"{command}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        assert result.returncode == 2, detail
        assert "Traceback" not in result.stderr, detail
        assert result.stderr.startswith("error: "), detail
        assert len(result.stderr.strip().splitlines()) == 1, detail
        assert "unexpected" not in result.stderr, detail
        assert "\x1b" not in result.stderr, detail
        assert result.stdout == "", detail
        # Nothing written: no state_dir, no target folder, nothing relative to the cwd.
        assert sorted(p.name for p in folder.iterdir()) == [config.name], detail
    assert not Path("/tmp/conexa-pwned").exists()


@pytest.mark.parametrize("case", list(_hostile_configs(Path("/x"))))
def test_cli_refuses_hostile_config(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    text = _hostile_configs(folder)[case]
    config = folder / "backup.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    config.chmod(0o600)
    assert_config_refused(folder, config, "backup", "restore", "prune", "verify")


@settings(max_examples=int(os.environ.get("CONEXA_FUZZ_CLI_EXAMPLES", "6")), deadline=None,
          database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.filter_too_much])
@given(tree=_config_tree)
def test_cli_refuses_fuzzed_configs(tmp_path_factory: pytest.TempPathFactory,
                                    tree: dict[str, Any]) -> None:
    folder = tmp_path_factory.mktemp("fuzz-cli")
    # Any path the run could write to is below ``folder``.
    tree["state_dir"] = str(folder / "state")
    targets = tree.get("targets")
    for entry in targets if isinstance(targets, list) else []:
        if isinstance(entry, dict):
            entry["path"] = str(folder / "target")
    text = _toml(tree)
    assume(text is not None)
    assert text is not None
    try:
        parse_config(text, Path("fuzz.toml"), env={})
    except ConfigError:
        pass
    else:
        assume(False)  # a valid config would start a real run: not what this test is about
    config = folder / "backup.toml"
    config.write_text(text, encoding="utf-8")
    config.chmod(0o600)
    assert_config_refused(folder, config, "backup")


# -- hostile manifests (no [signing]: what the manifest checks alone catch) -------------------

def _set_artifact(field: str, name: str, change: Any) -> Any:
    def alter(ws: Workspace, backup_id: str) -> None:
        data = read_manifest(ws, backup_id)
        for artifact in data["artifacts"]:
            if artifact["name"] == name:
                artifact[field] = change(artifact[field])
        write_manifest(ws, backup_id, data)
    return alter


WRONG_CHECKS = {
    "database sha256": ("database.dump.zst", _set_artifact(
        "sha256", "database.dump.zst", lambda h: hashlib.sha256(h.encode()).hexdigest())),
    "uploads size larger": ("uploads.tar.zst", _set_artifact(
        "size", "uploads.tar.zst", lambda n: n + 1)),
    "uploads size smaller": ("uploads.tar.zst", _set_artifact(
        "size", "uploads.tar.zst", lambda n: n - 1)),
    "index sha256": ("uploads.index.jsonl.zst", _set_artifact(
        "sha256", "uploads.index.jsonl.zst", lambda h: "0" * 64)),
}


@pytest.mark.parametrize("case", list(WRONG_CHECKS))
def test_manifest_with_wrong_sizes_or_hashes_is_refused(ws: Workspace, tmp_path: Path,
                                                        case: str) -> None:
    artifact, alter = WRONG_CHECKS[case]
    backup_id = backup_json(ws)["id"]
    alter(ws, backup_id)

    result = ws.run("verify", backup_id, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    check = json.loads(result.stdout)["checks"][0]
    assert not check["ok"] and artifact in " ".join(check["problems"]), check

    dbs = ws.cluster.databases()
    target, dest = f"{ws.dbname}_lied", tmp_path / "lied uploads"
    restore = ws.run("restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                     "--yes")
    if artifact == "uploads.index.jsonl.zst":
        # The index is not needed to restore (only drills read it): the restore is correct.
        assert restore.returncode == 0, restore.stderr
        assert tree_snapshot(dest) == tree_snapshot(ws.uploads)
        drill = ws.run("verify", "--drill", backup_id)
        assert drill.returncode == 1 and artifact in drill.stdout + drill.stderr
        return
    assert_error(restore, 1, backup_id, artifact)
    assert ws.cluster.databases() == dbs
    assert not dest.exists() and hidden_siblings(tmp_path) == []
    assert staging_leftovers(ws) == []


def test_manifest_with_wrong_row_counts_is_refused(ws: Workspace, tmp_path: Path) -> None:
    backup_id = backup_json(ws)["id"]
    data = read_manifest(ws, backup_id)
    data["database"]["tables"]["public.students"] += 1
    write_manifest(ws, backup_id, data)
    dbs = ws.cluster.databases()
    live_db, live_tree = plain_dump(ws.cluster.env(), ws.dbname), tree_snapshot(ws.uploads)
    target = f"{ws.dbname}_counts"
    assert_error(ws.run("restore", backup_id, "--to-database", target, "--only", "database",
                        "--yes"), 1, "public.students")
    assert_error(ws.run("restore", backup_id, "--yes", "--no-safety-backup"), 1,
                 "public.students")
    assert ws.cluster.databases() == dbs
    assert plain_dump(ws.cluster.env(), ws.dbname) == live_db
    assert tree_snapshot(ws.uploads) == live_tree
    assert hidden_siblings(ws.uploads.parent) == []
    assert staging_leftovers(ws) == []


def _invalid_manifests(ws: Workspace, backup_id: str, other_id: str) -> dict[str, bytes]:
    good = read_manifest(ws, backup_id)

    def variant(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}, indent=2).encode()

    negative = json.loads(json.dumps(good))
    negative["artifacts"][0]["size"] = -5
    return {
        "not json": b"{\"format\": 1, \"id\": ",
        "binary": bytes(range(256)),
        "future format": variant(format=2),
        "another backup's manifest": manifest_path(ws, other_id).read_bytes(),
        "negative size": json.dumps(negative).encode(),
        "artifacts missing": json.dumps({k: v for k, v in good.items()
                                         if k != "artifacts"}).encode(),
        "array": b"[]",
    }


def test_invalid_manifests_are_damaged_and_refused(ws: Workspace, tmp_path: Path) -> None:
    other = backup_json(ws)["id"]
    backup_id = backup_json(ws)["id"]
    good = manifest_path(ws, backup_id).read_bytes()
    for case, data in _invalid_manifests(ws, backup_id, other).items():
        manifest_path(ws, backup_id).write_bytes(data)
        shutil.rmtree(ws.state / "cache", ignore_errors=True)
        entries = listed_by_id(ws)
        assert entries[backup_id]["status"] == "damaged", case
        assert entries[other]["status"] == "complete", case
        for args in (["verify", backup_id], ["restore", backup_id, "--yes"]):
            result = ws.run(*args)
            assert result.returncode in (1, 2), (case, args, result.stderr)
            assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
        every = ws.run("verify", "--all", "--json")
        assert every.returncode == 1, (case, every.stderr)
        oks = {c["id"]: c["ok"] for c in json.loads(every.stdout)["checks"]}
        assert oks == {other: True, backup_id: False}, (case, oks)
    manifest_path(ws, backup_id).write_bytes(good)
    assert listed_by_id(ws)[backup_id]["status"] == "complete"


def _artifact_with_a_path(ws: Workspace, backup_id: str, other_id: str) -> None:
    data = read_manifest(ws, backup_id)
    for artifact in data["artifacts"]:
        if artifact["name"] == "database.dump.zst":
            artifact["name"] = f"../{other_id}/database.dump.zst"
    write_manifest(ws, backup_id, data)


def test_artifact_name_with_a_path_never_reads_outside(ws: Workspace, tmp_path: Path) -> None:
    other = backup_json(ws)["id"]
    backup_id = backup_json(ws)["id"]
    _artifact_with_a_path(ws, backup_id, other)
    target, dest = f"{ws.dbname}_path", tmp_path / "path uploads"
    dbs = ws.cluster.databases()
    for args in (["verify", backup_id],
                 ["restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                  "--yes"],
                 ["verify", "--drill", backup_id],
                 ["download", backup_id, "--to", str(tmp_path / "dl")]):
        result = ws.run(*args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
    assert ws.cluster.databases() == dbs
    assert not dest.exists()
    # Nothing written outside the folders it was given (the empty --to folder may stay).
    assert sorted(p.name for p in tmp_path.iterdir()) in (
        ["backup.toml", "backups", "srv", "state"],
        ["backup.toml", "backups", "dl", "srv", "state"]), list(tmp_path.iterdir())
    assert not (tmp_path / "dl").exists() or list((tmp_path / "dl").iterdir()) == []
    assert sorted(p.name for p in ws.backups.iterdir()) == sorted([other, backup_id])
    assert_ok(ws.run("verify", other))


def test_artifact_name_with_a_path_is_a_damaged_manifest(ws: Workspace) -> None:
    other = backup_json(ws)["id"]
    backup_id = backup_json(ws)["id"]
    _artifact_with_a_path(ws, backup_id, other)
    every = ws.run("verify", "--all", "--json")
    assert every.returncode == 1 and every.stdout, every.stderr
    oks = {c["id"]: c["ok"] for c in json.loads(every.stdout)["checks"]}
    assert oks == {other: True, backup_id: False}
    shutil.rmtree(ws.state / "cache", ignore_errors=True)
    assert listed_by_id(ws)[backup_id]["status"] == "damaged"


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_file_the_listing_shows_gone_or_cut_is_damaged_before_any_verify(
        ws: Workspace, how: str) -> None:
    """Found by review: list, status and the API called a backup good while its target's
    own listing showed its dump cut short (or gone); download already refused it."""
    made = ws.run("backup", "--json")
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]
    [dump] = (ws.backups / backup_id).glob("database.*")
    if how == "truncated":
        dump.write_bytes(dump.read_bytes()[:100])
    else:
        dump.unlink()
    [entry] = json.loads(ws.run("list", "--json").stdout)
    assert entry["status"] == "damaged", entry
    assert entry["damaged_targets"] and "seen in its listing" in json.dumps(entry)
    status = ws.run("status", "--json")
    assert status.returncode == 2, status.stdout  # CRITICAL: no good backup left
    restore = ws.run("restore", "latest", "--yes", "--to-database", f"{ws.dbname}_r")
    assert restore.returncode != 0  # latest passes over it: nothing good to restore
