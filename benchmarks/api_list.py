"""Benchmark ``GET /api/admin/backups`` (and ``/status``) of ``conexa-backup serve``.

    .venv/bin/python benchmarks/api_list.py --backups 1000 --clients 20 --requests 2000 \\
        --out docs/benchmarks.md

Makes one real small backup (a throwaway PostgreSQL cluster, a small uploads folder) on three
local targets, then fabricates ``--backups`` backups on each by copying it under other ids
(hard links for the artifacts; each manifest rewritten with its id and times, hourly apart,
unsigned). Starts the real server, times the first list request (cold: the manifest cache in
``state_dir`` empty, then again after a restart with it filled), warms it, and drives it with
``--clients`` threads (httpx, keep-alive) for ``--requests`` requests per endpoint. Baselines
in the same run, under the same load: ``GET /healthz`` of the same server (the HTTP stack's
own limit) and the same list answer bytes served from memory by a bare Starlette app under
uvicorn (what the payload alone costs). Appends the results under "## API: list" to
``--out`` (or prints them). Everything it starts is stopped, everything it makes removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt

from conexa_backup.manifest import ID_FORMAT, MANIFEST_NAME
from conexa_backup.testing.cluster import Cluster, free_port
from conexa_backup.testing.sample import load_conexa, make_uploads_tree

SECRET = "bench-secret-0123456789abcdef-0123456789"  # noqa: S105 - a throwaway server's
TARGETS = ("local", "nas", "offsite")
GOAL_P95_MS = 200.0
SCAN_LOG = re.compile(r"listed \d+ backup\(s\) on \d+ target\(s\) in ([\d.]+) s")
LIST, STATUS = "/api/admin/backups", "/api/admin/backups/status"


@dataclass
class Load:
    """Latencies (seconds) of one load run and its wall time."""

    name: str
    latencies: list[float]
    wall: float
    size: int

    def row(self) -> str:
        ms = sorted(x * 1000 for x in self.latencies)
        return (f"| {self.name} | {len(ms)} | {statistics.median(ms):.1f} | "
                f"{self.p95_ms:.1f} | {ms[-1]:.1f} | {len(ms) / self.wall:.0f} | "
                f"{self.size:,} |")

    @property
    def p95_ms(self) -> float:
        """The nearest-rank 95th percentile."""
        ms = sorted(x * 1000 for x in self.latencies)
        return ms[max(0, math.ceil(0.95 * len(ms)) - 1)]


def token() -> str:
    now = int(time.time())
    return jwt.encode({"sub": "bench", "role": "admin", "iat": now, "exp": now + 3600},
                      SECRET, algorithm="HS256")


def cli(config: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "conexa_backup", "--config", str(config),
                           *args], capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"conexa-backup {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def write_config(root: Path, url: str, uploads: Path, port: int) -> Path:
    config = root / "backup.toml"
    targets = "".join(f'[[targets]]\nname = "{t}"\ntype = "local"\npath = "{root / t}"\n'
                      for t in TARGETS)
    config.write_text(
        f'state_dir = "{root / "state"}"\n[database]\nurl = "{url}"\n'
        f'[uploads]\npath = "{uploads}"\n{targets}'
        f'[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[server.auth]\nalgorithms = ["HS256"]\nsecret = "{SECRET}"\n', encoding="utf-8")
    config.chmod(0o600)
    return config


def fabricate(root: Path, backup_id: str, count: int) -> None:
    """``count - 1`` more backups on every target: the real one's files under hourly ids."""
    for target in TARGETS:
        source = root / target / backup_id
        manifest = json.loads((source / MANIFEST_NAME).read_bytes())
        start = datetime.fromisoformat(manifest["started_at"])
        took = datetime.fromisoformat(manifest["finished_at"]) - start
        for i in range(1, count):
            when = start - timedelta(hours=i)
            new_id = when.astimezone(UTC).strftime(ID_FORMAT)
            folder = root / target / new_id
            folder.mkdir(mode=0o700)
            for item in source.iterdir():
                if item.name != MANIFEST_NAME:
                    os.link(item, folder / item.name)
            edited = {**manifest, "id": new_id, "started_at": when.isoformat(),
                      "finished_at": (when + took).isoformat()}
            (folder / MANIFEST_NAME).write_text(json.dumps(edited, indent=2))


@contextmanager
def serving(argv: list[str], url: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server child process, healthy at ``url``/healthz (or any 2xx at ``url``)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url, timeout=2).status_code < 300:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def first_request(base: str, headers: dict[str, str]) -> tuple[float, float]:
    """Seconds for the first list request, then for the second (warm)."""
    times = []
    for _ in range(2):
        began = time.perf_counter()
        answer = httpx.get(base + LIST, headers=headers, timeout=600)
        times.append(time.perf_counter() - began)
        answer.raise_for_status()
    return times[0], times[1]


def load(name: str, url: str, headers: dict[str, str], clients: int, total: int) -> Load:
    """``total`` GETs of ``url`` from ``clients`` threads at once, each on its own
    keep-alive connection; every answer must be 200."""
    latencies: list[float] = []
    sizes: list[int] = []
    lock = threading.Lock()
    left = [total]
    start = threading.Barrier(clients + 1)

    def client() -> None:
        with httpx.Client(headers=headers, timeout=120) as c:
            c.get(url).raise_for_status()  # connect outside the timed span
            start.wait()
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                began = time.perf_counter()
                answer = c.get(url)
                took = time.perf_counter() - began
                if answer.status_code != 200:
                    raise SystemExit(f"{url}: {answer.status_code} {answer.text[:200]}")
                with lock:
                    latencies.append(took)
                    sizes.append(len(answer.content))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return Load(name, latencies, time.perf_counter() - began, max(sizes))


def static_app(path: Path, port: int) -> None:
    """The baseline server: ``path``'s bytes as JSON at every GET, under uvicorn as serve
    runs it (one log line per request on stderr)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = path.read_bytes()

    async def answer(request: object) -> Response:
        return Response(body, media_type="application/json")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = Starlette(routes=[Route("/{path:path}", answer)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=True,
                server_header=False)


def run(args: argparse.Namespace) -> str:
    root = Path(tempfile.mkdtemp(prefix="conexa-bench-api-"))
    root.chmod(0o711)  # the cluster's parent folders must be traversable by postgres
    try:
        with Cluster(root / "pg") as cluster:
            cluster.create_database("conexa")
            load_conexa(cluster.url("conexa"), scale=0.01)
            uploads = root / "uploads"
            make_uploads_tree(uploads, files=20, seed=1)
            port = free_port()
            config = write_config(root, cluster.url("conexa"), uploads, port)
            backup_id = json.loads(cli(config, "backup", "--json"))["id"]
        fabricate(root, backup_id, args.backups)
        return measure(args, root, config, port)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(args: argparse.Namespace, root: Path, config: Path, port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token()}"}
    serve = [sys.executable, "-m", "conexa_backup", "--config", str(config), "serve"]
    log = root / "serve.log"
    with serving(serve, base + "/healthz", log):
        cold, second = first_request(base, headers)
    with serving(serve, base + "/healthz", log):
        restart, _ = first_request(base, headers)
        scans = [float(m) for m in SCAN_LOG.findall(log.read_text())]
        answer = httpx.get(base + LIST, headers=headers, timeout=60)
        listed = len(answer.json()["backups"])
        (root / "answer.json").write_bytes(answer.content)
        runs = [load("`GET /healthz` (no token): the HTTP stack alone", base + "/healthz", {},
                     args.clients, args.requests),
                load("`GET /api/admin/backups`", base + LIST, headers, args.clients,
                     args.requests),
                load("`GET /api/admin/backups/status`", base + STATUS, headers, args.clients,
                     max(args.requests // 4, args.clients))]
    static_port = free_port()
    static = [sys.executable, __file__, "--static", str(root / "answer.json"),
              "--port", str(static_port)]
    with serving(static, f"http://127.0.0.1:{static_port}/", root / "static.log"):
        runs.insert(1, load("the same list bytes from memory (bare Starlette + uvicorn)",
                            f"http://127.0.0.1:{static_port}/", {}, args.clients,
                            args.requests))
    return report(args, runs, listed, (cold, second, restart), scans)


def report(args: argparse.Namespace, runs: list[Load], listed: int,
           firsts: tuple[float, float, float], scans: list[float]) -> str:
    cold, second, restart = firsts
    lists = next(r for r in runs if r.name == "`GET /api/admin/backups`")
    met = "met" if lists.p95_ms < GOAL_P95_MS else "NOT met"
    cpus = os.cpu_count()
    lines = [
        "## API: list", "",
        f"`{' '.join(['.venv/bin/python', 'benchmarks/api_list.py', *sys.argv[1:]])}`, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_implementation()} "
        f"{platform.python_version()}, {cpus} cores (shared with other work while it ran).", "",
        f"{listed} backups listed ({args.backups} on each of {len(TARGETS)} local targets: "
        "one real small backup copied under hourly ids), admin JWT (HS256) on every request "
        f"but `/healthz`; {args.clients} concurrent clients (threads, httpx, keep-alive) on "
        "the same machine. Latency per request in ms, throughput over the run:", "",
        "| endpoint | requests | p50 | p95 | max | req/s | answer bytes |",
        "|---|---|---|---|---|---|---|",
        *[r.row() for r in runs], "",
        f"Goal: list p95 under {GOAL_P95_MS:.0f} ms with {args.clients} clients once warm: "
        f"**{met}** ({lists.p95_ms:.1f} ms).", "",
        "Cold: the server takes its snapshot as it starts (one scan: list every target, read "
        f"{listed * len(TARGETS)} manifests). With the manifest cache in `state_dir` empty "
        f"(every manifest read from its target, then cached) that scan took {scans[0]:.2f} s "
        f"and the first list request, sent as soon as `/healthz` answered, {cold:.2f} s; "
        f"after a restart, with the cache filled, {scans[-1]:.2f} s and {restart:.2f} s. "
        f"The second request: {second * 1000:.1f} ms. The snapshot is taken again after 30 s "
        "(the request that finds it aged pays one scan, others get the previous snapshot "
        "meanwhile) and at once after a change we know of (requests wait for that scan).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backups", type=int, default=1000, help="backups per target")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000, help="requests per endpoint")
    parser.add_argument("--out", type=Path, help="append the results to this Markdown file")
    parser.add_argument("--static", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.static is not None:
        static_app(args.static, args.port)
        return
    text = run(args)
    if args.out is not None:
        with open(args.out, "a", encoding="utf-8") as out:
            out.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
