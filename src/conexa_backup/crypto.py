"""Encryption at rest (age, via pyrage) and manifest signatures (Ed25519, via cryptography).

- Artifacts are encrypted after compression to age X25519 recipients: the backup host needs
  only public keys, so a compromised backup host cannot read old backups. Files are standard
  age files (``age -d -i key.txt file.age``).
- pyrage writes plaintext before it notices tampering, so decryption always goes to a private
  temporary file that is used only after decryption (and its authentication) succeeded.
- A signed manifest (``manifest.json.sig``, an Ed25519 signature of the manifest's exact
  bytes) lets ``verify``/``restore`` refuse a backup changed by someone holding only storage
  credentials: the manifest pins every artifact's SHA-256. The manifest names the key that
  signs it (``signed_by``, a :func:`key_id`); readers may trust several keys (a rotation).

Both libraries are imported only when configured (``pip install 'conexa-backup[crypto]'``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from conexa_backup import signals
from conexa_backup.errors import ConfigError, IntegrityError, SignatureError
from conexa_backup.pipeline import Gather, Sink

SIGNATURE_NAME = "manifest.json.sig"


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module.split('.')[0]} is needed for [encryption]/[signing]: "
                          "pip install 'conexa-backup[crypto]'") from None


def fingerprint(recipient: str) -> str:
    """A short, stable name for a recipient public key (recorded in the manifest)."""
    return "sha256:" + hashlib.sha256(recipient.strip().encode()).hexdigest()[:16]


def parse_recipients(recipients: list[str]) -> list[Any]:
    x25519 = _import("pyrage.x25519")
    try:
        return [x25519.Recipient.from_str(r.strip()) for r in recipients]
    except Exception as exc:
        raise ConfigError(f"encryption.recipients: not an age X25519 recipient: {exc}") from None


def load_identities(text: str, where: str) -> list[Any]:
    """Every ``AGE-SECRET-KEY-...`` line of an age identity file."""
    x25519 = _import("pyrage.x25519")
    keys = [line.strip() for line in text.splitlines() if line.strip().startswith("AGE-SECRET-")]
    if not keys:
        raise ConfigError(f"{where}: no AGE-SECRET-KEY found")
    try:
        return [x25519.Identity.from_str(k) for k in keys]
    except Exception:
        raise ConfigError(f"{where}: invalid age identity") from None


class Encryptor:
    """A sink that age-encrypts what is written and passes ciphertext on.

    pyrage's streaming API pulls from a reader, so it runs in a thread reading a pipe that
    ``write`` feeds; ``finish`` closes the pipe and waits. An error downstream (every target
    failed) stops the thread, closes the pipe, and is raised here.
    """

    def __init__(self, recipients: list[Any], out: Sink) -> None:
        pyrage = _import("pyrage")
        self._error: BaseException | None = None
        read_fd, write_fd = os.pipe()
        self._writer = os.fdopen(write_fd, "wb", buffering=1 << 20)
        reader = os.fdopen(read_fd, "rb")

        def run() -> None:
            forward = _Forward(out, self)
            try:
                pyrage.encrypt_io(reader, forward, recipients)
                forward.close()
            except BaseException as exc:  # the producer's thread raises it
                self._error = self._error or exc
            finally:
                reader.close()

        self._thread = threading.Thread(target=run, name="age-encrypt", daemon=True)
        signals.start(self._thread)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes) -> None:
        self._raise()
        try:
            self._writer.write(data)
        except BrokenPipeError:
            self._thread.join()
            self._raise()
            raise

    def finish(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._writer.close()
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop the thread after a failure elsewhere (never raises)."""
        with contextlib.suppress(OSError):
            self._writer.close()
        self._thread.join()


class _Forward:
    """What pyrage writes ciphertext to (64 KiB at a time): gathered into 1 MiB chunks for the
    next sink (:class:`~conexa_backup.pipeline.Gather`), so the byte path keeps its large
    buffers; keeps the real error if it fails."""

    def __init__(self, out: Sink, owner: Encryptor) -> None:
        self._gather, self._owner = Gather(out), owner

    def write(self, data: bytes) -> int:
        try:
            return self._gather.write(data)
        except BaseException as exc:
            self._owner._error = exc  # the reason, which pyrage will only report as OSError
            raise

    def flush(self) -> None:
        pass  # pyrage flushes after every piece; the rest goes out in close()

    def close(self) -> None:
        try:
            self._gather.flush()
        except BaseException as exc:
            self._owner._error = exc
            raise


def decrypt_to(raw: IO[bytes], dest: IO[bytes], identities: list[Any]) -> None:
    """Decrypt ``raw`` into ``dest`` (a private temporary file the caller discards on error).

    Raises:
        IntegrityError: wrong key, or the ciphertext was tampered with.
    """
    pyrage = _import("pyrage")
    try:
        pyrage.decrypt_io(raw, dest, identities)
    except (OSError, pyrage.DecryptError) as exc:
        raise IntegrityError(f"cannot decrypt ({exc}): wrong identity, or the data was "
                             "altered") from None


# -- signatures ---------------------------------------------------------------------------------

def load_signing_key(key_file: Path) -> Any:
    """The Ed25519 private key (a PEM file, e.g. from ``openssl genpkey -algorithm ed25519``).

    Raises:
        ConfigError: unreadable, or not an Ed25519 key.
    """
    serialization = _import("cryptography.hazmat.primitives.serialization")
    ed25519 = _import("cryptography.hazmat.primitives.asymmetric.ed25519")
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"signing.key_file: cannot load {key_file}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"signing.key_file: {key_file} is not an Ed25519 key")
    return key


def sign(manifest: bytes, key: Any) -> bytes:
    """An Ed25519 signature of ``manifest``, base64, with a key from :func:`load_signing_key`."""
    signature: bytes = key.sign(manifest)
    return base64.b64encode(signature) + b"\n"


def key_id(public_key: Any) -> str:
    """A short, stable id of an Ed25519 public key, recorded in the manifests it signs and
    shown by ``list``: ``sha256:`` and the first 16 hex digits of the SHA-256 of its 32 raw
    bytes (``openssl pkey -pubin -in KEY.pub -outform DER | tail -c 32 | sha256sum``)."""
    serialization = _import("cryptography.hazmat.primitives.serialization")
    raw: bytes = public_key.public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


_KEY_ID = re.compile(r"sha256:[0-9a-f]{16}")


def load_public_key(path: Path, setting: str = "signing.public_key_file") -> Any:
    """The Ed25519 public key in the PEM file ``path`` (``setting`` names it in errors).

    Raises:
        ConfigError: unreadable, or not an Ed25519 public key.
    """
    serialization = _import("cryptography.hazmat.primitives.serialization")
    ed25519 = _import("cryptography.hazmat.primitives.asymmetric.ed25519")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{setting}: cannot load {path}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{setting}: {path} is not an Ed25519 key")
    return key


def load_trusted_keys(paths: Sequence[Path], setting: str) -> TrustedKeys:
    """The keys in the PEM files ``paths`` (``setting`` names them in errors).

    Raises:
        ConfigError: a file unreadable, or not an Ed25519 public key.
    """
    return TrustedKeys([load_public_key(path, setting) for path in paths])


class TrustedKeys:
    """The Ed25519 public keys a manifest may be signed with (old and new ones, across a key
    rotation), by :func:`key_id`."""

    def __init__(self, keys: Sequence[Any]) -> None:
        self.keys = {key_id(k): k for k in keys}

    def check(self, manifest: bytes, signature: bytes | None, where: str) -> str:
        """The id of the trusted key that made ``signature``, a valid signature of
        ``manifest``. Every trusted key is tried, the one the manifest names first.

        Raises:
            SignatureError: no signature; not readable; made by a key the manifest names
            (``signed_by``) that is not trusted here ("signed by an unknown key", its id
            said); else altered. A manifest naming no key (made before key ids were
            recorded) may also be signed by a key not trusted here: the message says both.
        """
        exceptions = _import("cryptography.exceptions")
        if signature is None:
            raise SignatureError(f"{where}: manifest is not signed")
        altered = (f"{where}: manifest signature is invalid: the backup was changed after it "
                   "was made")
        try:
            raw = base64.b64decode(signature.strip(), validate=True)
        except ValueError:
            raise SignatureError(altered) from None
        claimed = signer_named(manifest)
        for kid in sorted(self.keys, key=lambda k: k != claimed):
            try:
                self.keys[kid].verify(raw, manifest)
            except (exceptions.InvalidSignature, ValueError):
                continue
            return kid
        if claimed is not None and claimed not in self.keys:
            raise SignatureError(f"{where}: manifest is signed by an unknown key {claimed} "
                                 f"(trusted here: {', '.join(self.keys)})")
        if claimed is None:
            raise SignatureError(f"{where}: manifest signature matches no trusted key: the "
                                 "backup was changed after it was made, or signed by a key "
                                 "not trusted here")
        raise SignatureError(altered)


def signer_named(manifest: bytes) -> str | None:
    """The key id an unverified manifest says signed it (``signed_by``), if it names one in
    the :func:`key_id` form; None otherwise (never raises)."""
    try:
        claimed = json.loads(manifest).get("signed_by")
    except (ValueError, AttributeError, RecursionError):
        return None
    return claimed if isinstance(claimed, str) and _KEY_ID.fullmatch(claimed) else None


def load_dedup_key(key_file: Path) -> bytes:
    """The packs format's dedup key: 32 bytes, written in ``key_file`` as 64 hex digits
    (``openssl rand -hex 32``), surrounding whitespace ignored.

    Raises:
        ConfigError: unreadable, or not 64 hex digits (the key itself is never quoted).
    """
    try:
        text = key_file.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"encryption.dedup_key_file: cannot read {key_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ConfigError(f"encryption.dedup_key_file: {key_file} does not hold 64 hex digits "
                          "(make one with `openssl rand -hex 32`)")
    return bytes.fromhex(text)
