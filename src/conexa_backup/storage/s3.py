"""``type = "s3"``: AWS S3 and S3-compatible stores (MinIO, R2, B2, Wasabi) through boto3.

Uploads are multipart, streamed: bytes are spooled into one part at a time (in memory up to
1 MiB, in ``$TMPDIR`` beyond) and each part is sent with its SHA-256, which S3 verifies. Part sizes
grow with the object (16 MiB for the first 1,000 parts, doubling every 1,000), so any object up
to S3's 5 TiB limit fits in its 10,000 parts without knowing the size in advance. After
completion the store's composite SHA-256 is compared with ours: what S3 holds is what we sent.
Nothing is visible under the key before ``CompleteMultipartUpload``.

boto3 is imported only when an S3 target is created.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator

from conexa_backup.durations import parse_duration
from conexa_backup.errors import ObjectNotFoundError, StorageError
from conexa_backup.storage.base import (
    GuardedReader,
    ObjectInfo,
    TargetConfig,
    check_key,
    normalize_prefix,
)

MiB = 1 << 20
MIN_PART = 16 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
PARTS_PER_TIER = 1_000
# Small objects (manifests) stay in memory; a part's first 8 MiB in memory cost 8 MB of peak RSS
# on a three-target backup for nothing (measured): the part goes to disk anyway.
SPOOL_IN_MEMORY = 1 * MiB


class S3TargetConfig(TargetConfig):
    """An S3 bucket (and key prefix). Credentials: the config, else the standard AWS chain."""

    type_name: ClassVar[str] = "s3"
    type: Literal["s3"]
    bucket: str = Field(default_factory=lambda: os.environ.get("AWS_S3_BUCKET", ""),
                        min_length=3)
    prefix: str = ""
    region: str | None = Field(default_factory=lambda: os.environ.get("AWS_REGION"))
    endpoint_url: str | None = None
    storage_class: str | None = None
    sse: Literal["AES256", "aws:kms"] | None = None
    kms_key_id: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    secret_access_key_file: Path | None = None
    retries: int = Field(default=6, ge=1, le=20)  # attempts per request, with backoff
    # S3 Object Lock (the bucket must have it enabled): copies cannot be deleted or
    # overwritten before their time, even with stolen credentials.
    object_lock_mode: Literal["GOVERNANCE", "COMPLIANCE"] | None = None
    object_lock_days: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _lock_days(self) -> S3TargetConfig:
        if self.object_lock_mode and self.lock_days() is None:
            raise ValueError("object_lock_mode needs object_lock_days, or a retention table "
                             "on this target with finite keep_* counts to derive it from")
        return self

    def lock_days(self) -> int | None:
        """Days to lock each object: ``object_lock_days``, else as long as this target's own
        retention could keep a backup (hourly N: N hours, rounded up to whole days; daily N:
        N days, weekly N: 7N, monthly N: 31N, yearly N: 366N, keep_within)."""
        if self.object_lock_days is not None:
            return self.object_lock_days
        r = self.retention
        if r is None:
            return None
        hours = [(r.keep_hourly, 1), (r.keep_daily, 24), (r.keep_weekly, 7 * 24),
                 (r.keep_monthly, 31 * 24), (r.keep_yearly, 366 * 24)]
        if any(c is not None and c < 0 for c, _ in hours):
            return None  # "keep all": no finite lock to derive
        days = [-(-c * h // 24) for c, h in hours if c]  # ceil: never shorter than kept
        if r.keep_within:
            days.append(max(1, parse_duration(r.keep_within).days))
        return max(days) if days else None

    def locked_until(self, stored: datetime | None) -> datetime | None:
        """Until when Object Lock keeps an object stored at ``stored`` (as :meth:`lock_days`
        says now; None when this target does not lock). An unknown store time is taken as
        now: locked for the whole period, never judged unlocked by a guess."""
        days = self.lock_days() if self.object_lock_mode else None
        if days is None:
            return None
        return (stored or datetime.now(UTC)) + timedelta(days=days)


def part_size(part_number: int) -> int:
    """Size of part ``part_number`` (1-based): 16 MiB, doubling every 1,000 parts, max 5 GiB."""
    tier = (part_number - 1) // PARTS_PER_TIER
    return min(MIN_PART << tier, MAX_PART)


def max_object_size(parts: int = MAX_PARTS) -> int:
    """The largest object ``parts`` parts can hold under :func:`part_size`."""
    return sum(part_size(n) for n in range(1, parts + 1))


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class _S3Upload:
    """A multipart upload fed by ``write``; see the module docstring."""

    def __init__(self, target: S3Target, key: str, lock: bool = True) -> None:
        self._t = target
        self._key = key
        self._lock = lock
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._part_digests: list[bytes] = []
        self._spool = self._new_spool()
        self._spool_hash = hashlib.sha256()
        self._spool_len = 0
        self._size = 0

    @staticmethod
    def _new_spool() -> tempfile.SpooledTemporaryFile[bytes]:
        return tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, prefix="conexa-part-")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = part_size(len(self._parts) + 1) - self._spool_len
            piece = view[:room]
            self._spool.write(piece)
            self._spool_hash.update(piece)
            self._spool_len += len(piece)
            self._size += len(piece)
            view = view[len(piece):]
            if self._spool_len == part_size(len(self._parts) + 1):
                self._send_part()

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._upload_id = self._t.call(
                "create_multipart_upload", Key=self._t.full_key(self._key),
                ChecksumAlgorithm="SHA256", **self._t.put_args(self._lock))["UploadId"]
        number = len(self._parts) + 1
        digest = self._spool_hash.digest()
        self._spool.seek(0)
        response = self._t.call(
            "upload_part", Key=self._t.full_key(self._key), UploadId=self._upload_id,
            PartNumber=number, Body=self._spool, ContentLength=self._spool_len,
            ChecksumAlgorithm="SHA256", ChecksumSHA256=_b64(digest))
        self._parts.append({"PartNumber": number, "ETag": response["ETag"],
                            "ChecksumSHA256": _b64(digest)})
        self._part_digests.append(digest)
        self._spool.close()
        self._spool, self._spool_hash, self._spool_len = self._new_spool(), hashlib.sha256(), 0

    def commit(self) -> ObjectInfo:
        key = self._t.full_key(self._key)
        if self._upload_id is None:  # small object: one PUT, whole-object checksum
            digest = self._spool_hash.digest()
            self._spool.seek(0)
            response = self._t.call("put_object", Key=key, Body=self._spool,
                                    ContentLength=self._spool_len, ChecksumAlgorithm="SHA256",
                                    ChecksumSHA256=_b64(digest),
                                    **self._t.put_args(self._lock))
            expected = _b64(digest)
        else:
            if self._spool_len or not self._parts:
                self._send_part()
            response = self._t.call(
                "complete_multipart_upload", Key=key, UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts})
            composite = hashlib.sha256(b"".join(self._part_digests)).digest()
            expected = f"{_b64(composite)}-{len(self._parts)}"
        self._spool.close()
        stored = response.get("ChecksumSHA256")
        if stored and stored.split("-")[0] != expected.split("-")[0]:
            self._t.delete(self._key)
            raise StorageError(self._t.name, f"{self._key}: the store's SHA-256 ({stored}) "
                                             f"differs from what was sent ({expected})")
        return ObjectInfo(self._key, self._size)

    def abort(self) -> None:
        self._spool.close()
        if self._upload_id is not None:
            # An unfinished upload is invisible anyway; lifecycle rules expire it.
            with contextlib.suppress(StorageError):
                self._t.call("abort_multipart_upload", Key=self._t.full_key(self._key),
                             UploadId=self._upload_id)


class _Sized:
    """botocore's StreamingBody reads everything on ``read(None)``, not ``read(-1)``."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._body.read(None if n < 0 else n)
        return data

    def close(self) -> None:
        self._body.close()


class S3Target:
    """Implements :class:`conexa_backup.storage.base.Target` on an S3 bucket."""

    def __init__(self, config: S3TargetConfig) -> None:
        import boto3
        from botocore.config import Config as BotoConfig

        self.name = config.name
        self.config = config
        self.prefix = normalize_prefix(config.prefix)
        secret = config.secret_access_key.get_secret_value() if config.secret_access_key else None
        if config.secret_access_key_file is not None:
            try:
                secret = config.secret_access_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise StorageError(self.name, f"cannot read secret_access_key_file: "
                                              f"{exc.strerror}") from None
        session = boto3.session.Session(
            aws_access_key_id=config.access_key_id, aws_secret_access_key=secret,
            region_name=config.region)
        self.client: Any = session.client(
            "s3", endpoint_url=config.endpoint_url,
            # s3v4: pre-signed URLs would otherwise be SigV2 (us-east-1, custom endpoints),
            # which AWS refuses for newer buckets and regions.
            # No payload signing: SigV4 would hash every byte of every part a second time
            # (botocore skips it by itself only over https). Each part and object we send
            # carries its SHA-256 in x-amz-checksum-sha256, a signed header, and the store
            # refuses a body that does not match it; the one other body, the list of parts
            # that completes an upload, is checked by the composite SHA-256 the store
            # returns (commit): the same protection, each byte hashed once.
            config=BotoConfig(retries={"max_attempts": config.retries, "mode": "standard"},
                              signature_version="s3v4", connect_timeout=10, read_timeout=120,
                              request_checksum_calculation="when_required",
                              response_checksum_validation="when_required",
                              s3={"payload_signing_enabled": False}))

    def describe(self) -> str:
        where = f" at {self.config.endpoint_url}" if self.config.endpoint_url else ""
        return f"s3://{self.config.bucket}/{self.prefix}{where}"

    def full_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_args(self, lock: bool = True) -> dict[str, Any]:
        """Headers every object is written with; no Object Lock ones unless ``lock``."""
        args: dict[str, Any] = {}
        if lock and self.config.object_lock_mode:
            days = self.config.lock_days() or 1
            args["ObjectLockMode"] = self.config.object_lock_mode
            args["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(days=days)
        if self.config.storage_class:
            args["StorageClass"] = self.config.storage_class
        if self.config.sse:
            args["ServerSideEncryption"] = self.config.sse
            if self.config.kms_key_id:
                args["SSEKMSKeyId"] = self.config.kms_key_id
        return args

    def call(self, method: str, **kwargs: Any) -> Any:
        """Call a client method on our bucket; map failures to StorageError (no secrets).

        botocore retries throttling, 5xx and dropped connections itself ("standard" mode,
        with backoff); what reaches us is permanent or persistent.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.config.bucket, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, kwargs.get("Key")) from None

    def _error(self, exc: Exception, key: str | None) -> StorageError:
        from botocore.exceptions import ClientError

        if not isinstance(exc, ClientError):
            return StorageError(self.name, f"{self.describe()}: {exc}")
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "error"))
        if code in ("NoSuchKey", "404", "NotFound") and key:
            return ObjectNotFoundError(self.name, f"no object {key!r}")
        what = {"NoSuchBucket": f"bucket {self.config.bucket!r} does not exist",
                "AccessDenied": f"access denied to bucket {self.config.bucket!r}"}.get(
            code, f"{code}: {err.get('Message', '')}".strip())
        return StorageError(self.name, what)

    def writer(self, key: str, *, lock: bool = True) -> _S3Upload:
        """Start writing ``key``; ``lock=False`` sends no Object Lock headers (``check``'s
        probe, which must not outlive the check; a bucket default retention still applies)."""
        check_key(key)
        return _S3Upload(self, key, lock)

    def open(self, key: str) -> BinaryIO:
        response = self.call("get_object", Key=self.full_key(key))
        body = response["Body"]
        # botocore/urllib3 read errors have no common base: any of them fails this copy.
        return GuardedReader(_Sized(body), lambda exc: StorageError(  # type: ignore[return-value]
            self.name, f"reading {key}: {exc}"))

    def presign(self, key: str, seconds: int) -> str:
        """A pre-signed GET URL for ``key``, valid ``seconds`` (signed here, no request).

        Raises:
            StorageError: no credentials to sign with.
        """
        from botocore.exceptions import BotoCoreError

        try:
            url: str = self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.config.bucket, "Key": self.full_key(key)},
                ExpiresIn=seconds)
        except BotoCoreError as exc:
            raise self._error(exc, key) from None
        return url

    def pages(self, method: str, prefix: str = "") -> Iterator[dict[str, Any]]:
        """The pages of a paginated listing (``list_objects_v2``, ``list_object_versions``,
        ``list_multipart_uploads``) of the full keys starting with our prefix + ``prefix``.

        Raises:
            StorageError: the listing failed (mapped as :meth:`call` does).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator(method)
        try:
            yield from paginator.paginate(Bucket=self.config.bucket, Prefix=self.prefix + prefix)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, None) from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for page in self.pages("list_objects_v2", prefix):
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][len(self.prefix):], obj["Size"],
                                 obj.get("LastModified"), obj.get("ETag"))

    def delete(self, key: str) -> None:
        self.call("delete_object", Key=self.full_key(key))


def create(config: S3TargetConfig) -> S3Target:
    """Registry entry point."""
    return S3Target(config)
