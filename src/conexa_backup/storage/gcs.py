"""``type = "gcs"``: Google Cloud Storage through google-cloud-storage.

Uploads are resumable uploads sent in 8 MiB chunks (GCS has no part-count limit; memory is one
chunk), with a CRC32C of the whole stream checked against the store's when the upload is
finalised. Nothing is visible under the key before that; an aborted upload is cancelled.
Honours ``STORAGE_EMULATOR_HOST`` (then no credentials are used).

google-cloud-storage is imported only when a GCS target is created.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO, ClassVar, Literal

from pydantic import Field

from conexa_backup.errors import ObjectNotFoundError, StorageError, first_line
from conexa_backup.storage.base import (
    GuardedReader,
    ObjectInfo,
    TargetConfig,
    check_key,
    normalize_prefix,
)

# A multiple of 256 KiB, as resumable uploads require. Each chunk is one HTTP round trip (Google
# advises at least 8 MiB for speed; its own default, 100 MiB, would break the memory budget).
# The library holds a chunk about twice: 16 MiB took a three-target backup to 163 MB peak RSS,
# over the 150 MB goal; 8 MiB, 142 MB (measured, docs/benchmarks.md).
CHUNK = 8 << 20


class GCSTargetConfig(TargetConfig):
    """A GCS bucket (and prefix). Credentials: ``credentials_file``, else the default chain."""

    type_name: ClassVar[str] = "gcs"
    type: Literal["gcs"]
    bucket: str = Field(default_factory=lambda: os.environ.get("GCS_BUCKET", ""), min_length=3)
    prefix: str = ""
    project: str | None = Field(default_factory=lambda: os.environ.get("GCS_PROJECT_ID"))
    credentials_file: Path | None = Field(
        default_factory=lambda: Path(os.environ["GCS_KEY_FILE"])
        if os.environ.get("GCS_KEY_FILE") else None)
    storage_class: str | None = None


class _GCSUpload:
    def __init__(self, target: GCSTarget, key: str) -> None:
        from google.cloud.storage.fileio import BlobWriter

        self._t = target
        self._key = key
        blob = target.bucket.blob(target.full_key(key), chunk_size=CHUNK)
        if target.config.storage_class:
            blob.storage_class = target.config.storage_class
        self._writer = BlobWriter(blob, chunk_size=CHUNK, checksum="crc32c",
                                  content_type="application/octet-stream")
        self._size = 0

    def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except Exception as exc:
            self.abort()
            raise self._t.error(exc, self._key) from None
        self._size += len(data)

    def commit(self) -> ObjectInfo:
        try:
            self._writer.close()  # sends the last chunk; the library compares CRC32C
        except Exception as exc:
            self.abort()
            raise self._t.error(exc, self._key) from None
        return ObjectInfo(self._key, self._size)

    def abort(self) -> None:
        # Cancels the resumable session: nothing is finalised. Best effort: an unfinished
        # session expires by itself.
        with contextlib.suppress(Exception):
            self._writer.terminate()


class GCSTarget:
    """Implements :class:`conexa_backup.storage.base.Target` on a GCS bucket."""

    def __init__(self, config: GCSTargetConfig) -> None:
        from google.cloud import storage

        self.name = config.name
        self.config = config
        self.prefix = normalize_prefix(config.prefix)
        try:
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                client = storage.Client(project=config.project or "emulator",
                                        credentials=AnonymousCredentials())  # type: ignore[no-untyped-call]
            elif config.credentials_file is not None:
                client = storage.Client.from_service_account_json(
                    str(config.credentials_file), project=config.project)
            else:
                client = storage.Client(project=config.project)
        except Exception as exc:
            raise StorageError(self.name, f"cannot create a GCS client: {exc}") from None
        self.client = client
        self.bucket = client.bucket(config.bucket)

    def describe(self) -> str:
        return f"gs://{self.config.bucket}/{self.prefix}"

    def full_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def error(self, exc: Exception, key: str | None) -> StorageError:
        from google.api_core import exceptions as gexc

        # Resumable-upload errors carry the HTTP response rather than an api_core class.
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, gexc.NotFound) or status == 404:
            if key is not None and self._bucket_exists():
                return ObjectNotFoundError(self.name, f"no object {key!r}")
            return StorageError(self.name, f"bucket {self.config.bucket!r} does not exist")
        if isinstance(exc, gexc.Forbidden | gexc.Unauthorized) or status in (401, 403):
            return StorageError(self.name, f"access denied to bucket {self.config.bucket!r}")
        first = first_line(exc)
        return StorageError(self.name, f"{self.describe()}: {first}")

    def _bucket_exists(self) -> bool:
        try:
            return bool(self.bucket.exists())
        except Exception:
            return False

    def writer(self, key: str) -> _GCSUpload:
        check_key(key)
        return _GCSUpload(self, key)

    def open(self, key: str) -> BinaryIO:
        blob = self.bucket.blob(self.full_key(key))
        try:
            blob.reload()
            reader = blob.open("rb", chunk_size=CHUNK)
        except Exception as exc:
            raise self.error(exc, key) from None
        return GuardedReader(reader, lambda exc: self.error(exc, key))  # type: ignore[return-value]

    def presign(self, key: str, seconds: int) -> str | None:
        """A V4 signed GET URL for ``key``, valid ``seconds``, signed here with the service
        account's private key; None for credentials that hold no key (the emulator's
        anonymous ones, a VM's metadata token): the caller proxies instead.

        Raises:
            StorageError: signing failed.
        """
        from google.auth.credentials import Signing

        if not isinstance(self.client._credentials, Signing):
            return None
        blob = self.bucket.blob(self.full_key(key))
        try:
            url: str = blob.generate_signed_url(version="v4", method="GET",
                                                expiration=timedelta(seconds=seconds))
        except Exception as exc:
            raise self.error(exc, key) from None
        return url

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        try:
            for blob in self.client.list_blobs(self.bucket, prefix=self.prefix + prefix):
                yield ObjectInfo(blob.name[len(self.prefix):], int(blob.size or 0), blob.updated,
                                 None if blob.generation is None else str(blob.generation))
        except Exception as exc:
            raise self.error(exc, None) from None

    def delete(self, key: str) -> None:
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self.full_key(key))
        try:
            blob.delete()
        except gexc.NotFound:
            pass
        except Exception as exc:
            raise self.error(exc, key) from None


def create(config: GCSTargetConfig) -> GCSTarget:
    """Registry entry point."""
    return GCSTarget(config)
