"""Benchmark ``GET /api/admin/backups/:id/download`` against what the disk and SHA-256 do alone.

    .venv/bin/python benchmarks/api_download.py --mb 400 --runs 3

Fabricates one backup on a local target (a manifest and an incompressible ``uploads.tar.zst``
of ``--mb`` MB, its SHA-256 in the manifest), starts a real ``conexa-backup serve`` on a free
loopback port, and downloads the artifact through it ``--runs`` times with httpx (streamed,
discarded), as often with ``curl -o /dev/null``, then as often with ``Range: bytes=<half>-``
(a resumed download: the server still reads and hashes the whole object). The baselines, in
the same run, are ``sha256sum`` and ``openssl dgst -sha256`` (the SHA-256 code Python's
hashlib uses) of the same file: the server's own work (read + hash) with nothing else, the
limit for a checked download. The file is read once first so all run from the page cache.
Peak RSS is the server's VmHWM (/proc/<pid>/status), before any download and after all of
them. Everything is removed at the
end. Prints a Markdown section (``--out`` appends it to a file).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import jwt

from conexa_backup import __version__
from conexa_backup.manifest import Artifact, Manifest

MB = 1_000_000
SECRET = "bench-secret-0123456789abcdef-0123456789"  # noqa: S105 - a throwaway server's
BACKUP_ID = "20261205T030000Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fabricate(root: Path, size_mb: int) -> Path:
    """A complete backup on a local target under ``root``: its artifact's path."""
    folder = root / BACKUP_ID
    folder.mkdir(parents=True, mode=0o700)
    path = folder / "uploads.tar.zst"
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        block = os.urandom(1 << 20)  # incompressible; varied so no two MiB are alike
        for i in range(size_mb * MB // len(block)):
            chunk = hashlib.sha256(i.to_bytes(8, "big")).digest() + block[32:]
            out.write(chunk)
            digest.update(chunk)
    now = datetime.now(UTC)
    manifest = Manifest(id=BACKUP_ID, tool_version=__version__, hostname="bench",
                        started_at=now, finished_at=now, artifacts=[Artifact(
                            name=path.name, kind="uploads", size=path.stat().st_size,
                            sha256=digest.hexdigest(), compression="zstd", content="tar")])
    (folder / "manifest.json").write_bytes(manifest.to_json())
    return path


def vm_hwm(pid: int) -> int:
    """Peak resident memory of ``pid`` so far, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def download(url: str, token: str, headers: dict[str, str] | None = None) -> tuple[float, int]:
    """Seconds and bytes for one streamed GET, body discarded."""
    got = 0
    start = time.perf_counter()
    with httpx.Client(timeout=600) as client, client.stream(
            "GET", url, headers={"Authorization": f"Bearer {token}", **(headers or {})}) as r:
        r.raise_for_status()
        for chunk in r.iter_raw(1 << 20):
            got += len(chunk)
    return time.perf_counter() - start, got


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def start_server(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = work / "backup.toml"
    config.write_text(
        f'state_dir = "{work / "state"}"\n[database]\nurl = "postgresql://127.0.0.1:1/none"\n'
        f'[[targets]]\nname = "local"\ntype = "local"\npath = "{work / "backups"}"\n'
        f'[server]\nlisten = "127.0.0.1:{port}"\n[server.auth]\nalgorithms = ["HS256"]\n'
        f'secret = "{SECRET}"\n', encoding="utf-8")
    config.chmod(0o600)
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-m", "conexa_backup", "--config", str(config),
                             "serve"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError((work / "serve.log").read_text(errors="replace"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=400, help="artifact size in MB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="append the section here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-download-", dir=args.workdir))
    proc = None
    try:
        path = fabricate(work / "backups", args.mb)
        size = path.stat().st_size
        timed(["sha256sum", str(path)])  # into the page cache, for both sides
        proc, url = start_server(work)
        idle = vm_hwm(proc.pid)
        token = jwt.encode({"sub": "bench", "role": "admin", "exp": int(time.time()) + 3600},
                           SECRET, algorithm="HS256")
        target = f"{url}/api/admin/backups/{BACKUP_ID}/download?artifact=uploads"
        baseline, ssl, api = [], [], []
        for _ in range(args.runs):
            baseline.append(timed(["sha256sum", str(path)]))
            ssl.append(timed(["openssl", "dgst", "-sha256", str(path)]))
            seconds, got = download(target, token)
            assert got == size, (got, size)
            api.append(seconds)
        curl = [timed(["curl", "-sSf", "-o", "/dev/null", "-H", f"Authorization: Bearer {token}",
                       target]) for _ in range(args.runs)]
        half, resumed = size // 2, []
        for _ in range(args.runs):
            seconds, got = download(target, token, {"Range": f"bytes={half}-"})
            assert got == size - half, (got, size - half)
            resumed.append(seconds)
        peak = vm_hwm(proc.pid)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    report = render(args, size, baseline, ssl, api, curl, resumed, idle, peak)
    print(report)
    if args.out is not None:
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(report)


def render(args: argparse.Namespace, size: int, baseline: list[float], ssl: list[float],
           api: list[float], curl: list[float], resumed: list[float], idle: int,
           peak: int) -> str:
    def rate(seconds: float, nbytes: int = size) -> str:
        return f"{nbytes / MB / seconds:,.0f} MB/s"

    b, o, a, c, r = (statistics.median(baseline), statistics.median(ssl),
                     statistics.median(api), statistics.median(curl), statistics.median(resumed))
    return (
        f"\n## API: download\n\n"
        f"`GET /api/admin/backups/:id/download?artifact=uploads` of one {size / MB:,.0f} MB "
        f"incompressible artifact on a local target, through a real `conexa-backup serve` on "
        f"loopback, streamed by httpx and discarded; median of {len(api)} runs, file in the "
        f"page cache. Baselines in the same run: `sha256sum` and `openssl dgst -sha256` of "
        f"the same file (read + hash, what every checked download must do). "
        f"{datetime.now(UTC):%Y-%m-%d}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (other "
        f"work on the machine slows every row alike; compare within the table).\n\n"
        f"```sh\n.venv/bin/python benchmarks/api_download.py --mb {args.mb} --runs {args.runs}"
        f"\n```\n\n"
        f"| | median time | throughput |\n|---|---|---|\n"
        f"| baseline: `sha256sum` | {b:.2f} s | {rate(b)} |\n"
        f"| baseline: `openssl dgst -sha256` (the SHA-256 code Python's hashlib uses) | "
        f"{o:.2f} s | {rate(o)} |\n"
        f"| API download (proxied, SHA-256 checked) | {a:.2f} s | {rate(a)} "
        f"({b / a:.0%} of `sha256sum`'s, {o / a:.0%} of openssl's) |\n"
        f"| the same, fetched by `curl -o /dev/null` (a C client: less competition for the "
        f"2 cores) | {c:.2f} s | {rate(c)} |\n"
        f"| API download resumed at half (`Range: bytes={size // 2}-`) | {r:.2f} s | "
        f"{rate(r, size - size // 2)} of body (the whole file is still read and "
        f"hashed) |\n\n"
        f"Server peak RSS (VmHWM): {idle / MB:.0f} MB started and idle, {peak / MB:.0f} MB "
        f"after every download above: memory does not grow with the artifact (1 MiB chunks, "
        f"one held back until the hash is checked).\n")


if __name__ == "__main__":
    main()
