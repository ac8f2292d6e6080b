"""Encryption at rest (age, via pyrage) and manifest signatures (Ed25519, via cryptography).

- Artifacts are encrypted after compression to age X25519 recipients: the backup host needs
  only public keys, so a compromised backup host cannot read old backups. Files are standard
  age files (``age -d -i key.txt file.age``).
- pyrage writes plaintext before it notices tampering, so decryption always goes to a private
  temporary file that is used only after decryption (and its authentication) succeeded.
- A signed manifest (``manifest.json.sig``, an Ed25519 signature of the manifest's exact
  bytes) lets ``verify``/``restore`` refuse a backup changed by someone holding only storage
  credentials: the manifest pins every artifact's SHA-256.

Both libraries are imported only when configured (``pip install 'conexa-backup[crypto]'``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import IO, Any

from conexa_backup import signals
from conexa_backup.errors import ConfigError, IntegrityError
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


def load_public_key(path: Path) -> Any:
    serialization = _import("cryptography.hazmat.primitives.serialization")
    ed25519 = _import("cryptography.hazmat.primitives.asymmetric.ed25519")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"signing.public_key_file: cannot load {path}: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"signing.public_key_file: {path} is not an Ed25519 key")
    return key


def check_signature(public_key: Any, manifest: bytes, signature: bytes | None,
                    where: str) -> None:
    """Raise IntegrityError unless ``signature`` is a valid signature of ``manifest``."""
    exceptions = _import("cryptography.exceptions")
    if signature is None:
        raise IntegrityError(f"{where}: manifest is not signed")
    try:
        public_key.verify(base64.b64decode(signature.strip(), validate=True), manifest)
    except (exceptions.InvalidSignature, ValueError):
        raise IntegrityError(f"{where}: manifest signature is invalid: the backup was "
                             "changed after it was made") from None


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
