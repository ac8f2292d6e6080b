"""Benchmark conexa-backup against the seed's pipelines and the bare PostgreSQL and tar tools.

    .venv/bin/python benchmarks/run.py --scale 1 --runs 3 --out docs/benchmarks.md

Starts a throwaway PostgreSQL cluster holding a Conexa-like database, an uploads folder and S3 /
GCS emulators on loopback; runs every pipeline ``--runs`` times in rotating round-robin order
(after ``--warmup`` unrecorded rounds); writes medians, ranges, output sizes, peak memory and the
project's goals, each met or not, to a Markdown report. Everything it creates (temporary
folders, the cluster, the emulators, restored databases) is removed at the end, also on Ctrl-C
or SIGTERM. See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import tomli_w

from conexa_backup import __version__
from conexa_backup.testing.cluster import Cluster
from conexa_backup.testing.compare import table_row_counts
from conexa_backup.testing.emulators import GCSServer, S3Server
from conexa_backup.testing.sample import load_conexa, make_uploads_tree

MB = 1_000_000
RSS_GOAL = 150 * MB
TIME_BIN = Path("/usr/bin/time")
REPO = Path(__file__).resolve().parent.parent
SOURCE_DB, LARGE_DB = "conexa", "conexa_large"
S3_BUCKET, GCS_BUCKET = "conexa-bench", "conexa-bench-gcs"
# Variables that would redirect conexa-backup or libpq away from the throwaway cluster.
AMBIENT = ("CONEXA_BACKUP_CONFIG", "DATABASE_URL", "PGPASSWORD", "PGDATABASE", "PGSERVICE")
# The seed's shell pipelines: the only shell in this project, here to reproduce the seed.
SEED_DUMP = 'set -o pipefail; pg_dump "$1" | gzip > "$2"'
SEED_RESTORE = 'gunzip -c "$1" | psql -q "$2" > /dev/null'


class CommandFailed(Exception):
    """A benchmarked or preparatory command exited non-zero."""


# -- running one command ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One timed command: argv lists piped into each other (no shell unless the argv is bash)."""

    stages: tuple[tuple[str, ...], ...]
    out: Path | None = None  # the last stage's stdout; None is /dev/null
    drain: bool = False  # read the last stage's stdout through a pipe instead of /dev/null
    check: bool = True
    errlog: Path | None = None  # where stderr goes (kept for notes); else a scratch file
    fsync: tuple[Path, ...] = ()  # files to fsync inside the timed span


def step(*argv: str | Path, **options: Any) -> Step:
    """A single-stage :class:`Step`."""
    return Step(stages=(tuple(str(a) for a in argv),), **options)


def _time_prefix(rss_file: Path) -> list[str]:
    return [str(TIME_BIN), "-f", "%M", "-o", str(rss_file)] if TIME_BIN.exists() else []


def _read_rss(path: Path) -> int | None:
    """The KiB that GNU time wrote last in ``path`` (earlier lines may be exit-status notes)."""
    try:
        lines = path.read_text(errors="replace").split()
        return int(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _drain(stream: IO[bytes] | None) -> None:
    assert stream is not None
    while stream.read(1 << 20):
        pass
    stream.close()


def _spawn(stages: Sequence[Sequence[str]], sink: IO[bytes] | int, drain: bool,
           err: IO[bytes], rss: Sequence[Path], env: Mapping[str, str],
           ) -> list[subprocess.Popen[bytes]]:
    procs: list[subprocess.Popen[bytes]] = []
    upstream: IO[bytes] | int = subprocess.DEVNULL
    for i, argv in enumerate(stages):
        last = i == len(stages) - 1
        stdout = sink if last and not drain else subprocess.PIPE
        # Own process group: a failure or Ctrl-C kills the whole stage, grandchildren included.
        proc = subprocess.Popen([*_time_prefix(rss[i]), *argv], stdin=upstream, stdout=stdout,
                                stderr=err, env=dict(env), process_group=0)
        procs.append(proc)
        if not isinstance(upstream, int):
            upstream.close()
        upstream = proc.stdout if proc.stdout is not None else subprocess.DEVNULL
    return procs


def run_step(cmd: Step, env: Mapping[str, str], scratch: Path) -> int | None:
    """Run ``cmd`` to completion; the largest peak RSS (KiB) among its stages, if known."""
    rss = [scratch / f"rss-{i}" for i in range(len(cmd.stages))]
    for path in rss:
        path.unlink(missing_ok=True)
    errlog = cmd.errlog or scratch / "stderr"
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        err = stack.enter_context(open(errlog, "wb"))
        sink: IO[bytes] | int = (stack.enter_context(open(cmd.out, "wb")) if cmd.out
                                 else subprocess.DEVNULL)
        try:
            procs = _spawn(cmd.stages, sink, cmd.drain, err, rss, env)
            if cmd.drain:
                _drain(procs[-1].stdout)
            codes = [p.wait() for p in procs]
        except OSError as exc:  # a program is missing
            raise CommandFailed(f"{shlex.join(cmd.stages[-1])}: {exc}") from exc
        finally:
            for proc in procs:
                _kill_group(proc)
    for path in cmd.fsync:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if cmd.check and any(codes):
        tail = errlog.read_text(errors="replace").strip().splitlines()[-5:]
        raise CommandFailed(f"{shlex.join(cmd.stages[-1])} exited {codes}: {' | '.join(tail)}")
    peaks = [kib for kib in map(_read_rss, rss) if kib is not None]
    return max(peaks) if peaks else None


# -- cases and results -----------------------------------------------------------------------------

def _nothing() -> None:
    return None


def _no_note() -> str:
    return ""


@dataclass
class Trial:
    """What one run of a case times, and how to size and clean up after it (untimed)."""

    steps: list[Step]
    size: Callable[[], int | None] = _nothing
    finish: Callable[[], str] = _no_note  # returns a note for the report ("" if nothing odd)
    # Read just before and after the timed steps; the difference is reported (its median) in
    # the notes as COUNTER_NOTE: the CPU the emulators spent serving a fan-out.
    counter: Callable[[], float] | None = None


COUNTER_NOTE = "emulators used {:.1f} CPU s"


@dataclass
class Case:
    key: str
    label: str
    build: Callable[[str], Trial]  # run tag ("w0", "r1"...) -> the trial, prepared untimed


@dataclass
class Sample:
    wall: float
    rss_kib: int | None
    size: int | None
    note: str
    counted: float | None = None
    cpu: float | None = None  # user + system seconds of the command and its descendants


@dataclass
class Result:
    case: Case
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self) -> float | None:
        return _median([s.wall for s in self.samples])

    def peak_bytes(self) -> int | None:
        kib = [s.rss_kib for s in self.samples if s.rss_kib is not None]
        return max(kib) * 1024 if kib else None

    def size(self) -> int | None:
        size = _median([s.size for s in self.samples])
        return None if size is None else int(size)

    def cpu(self) -> float | None:
        return _median([s.cpu for s in self.samples])

    def counted(self) -> float | None:
        return _median([s.counted for s in self.samples])


def _median(values: Sequence[float | None]) -> float | None:
    """The median of the values that were measured, if any."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def measure(case: Case, tag: str, run: Callable[[Step], int | None]) -> Sample:
    trial = case.build(tag)
    try:
        counter = trial.counter
        before = counter() if counter else 0.0
        cpu_before = _children_cpu()
        start = time.perf_counter()
        peaks = [run(s) for s in trial.steps]
        wall = time.perf_counter() - start
        cpu = _children_cpu() - cpu_before
        counted = counter() - before if counter else None
        size = trial.size()
    except BaseException:
        with contextlib.suppress(Exception):
            trial.finish()
        raise
    known = [p for p in peaks if p is not None]
    return Sample(wall, max(known) if known else None, size, trial.finish(), counted, cpu)


def _children_cpu() -> float:
    """CPU seconds of every child process that has exited and been waited for: around the
    timed steps, the command's own (its descendants included; not the emulators)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def run_all(cases: list[Case], runs: int, warmup: int,
            run: Callable[[Step], int | None]) -> dict[str, Result]:
    """Round-robin: every round runs each case once, the order rotated by one each round."""
    results = {c.key: Result(c) for c in cases}
    for rnd in range(warmup + runs):
        tag = f"w{rnd}" if rnd < warmup else f"r{rnd - warmup + 1}"
        shift = rnd % len(cases)
        for case in cases[shift:] + cases[:shift]:
            try:
                sample = measure(case, tag, run)
            except CommandFailed as exc:
                results[case.key].errors.append(str(exc))
                print(f"[{tag}] {case.label}: FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            rss = f"{sample.rss_kib * 1024 / MB:.0f} MB" if sample.rss_kib else "?"
            print(f"[{tag}] {case.label}: {sample.wall:.2f} s, peak RSS {rss} {sample.note}",
                  file=sys.stderr, flush=True)
            if rnd >= warmup:
                results[case.key].samples.append(sample)
    return results


# -- small filesystem helpers ----------------------------------------------------------------------

def tree_stats(root: Path) -> tuple[int, int]:
    """(regular files, their bytes) below ``root``, never following symlinks."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = (Path(dirpath) / name).lstat()
            if (st.st_mode & 0o170000) == 0o100000:
                files, size = files + 1, size + st.st_size
    return files, size


def file_sizes(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths)


def subdirs(path: Path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_dir()} if path.is_dir() else set()


def unlink(*paths: Path) -> str:
    for path in paths:
        path.unlink(missing_ok=True)
    return ""


# -- the benchmark ---------------------------------------------------------------------------------

class Bench:
    """The data, fixtures and cases of one benchmark, inside the work folder ``work``."""

    def __init__(self, args: argparse.Namespace, work: Path, cluster: Cluster,
                 s3: S3Server, gcs: GCSServer) -> None:
        self.args, self.work, self.cluster, self.s3, self.gcs = args, work, cluster, s3, gcs
        for sub in ("scratch", "configs", "out", "fixtures"):
            (work / sub).mkdir()
        self.scratch, self.fixtures = work / "scratch", work / "fixtures"
        self.uploads, self.small = work / "uploads", work / "many-small"
        self.rows: dict[str, dict[str, int]] = {}  # database -> its row counts
        self.backup_ids: dict[str, str] = {}  # fixture name -> its conexa-backup backup id

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in AMBIENT}
        return {**env, **self.cluster.env()}

    def run(self, cmd: Step) -> int | None:
        return run_step(cmd, self.env(), self.scratch)

    def conexa(self, config: Path, *args: str) -> tuple[str, ...]:
        return (sys.executable, "-m", "conexa_backup", "--config", str(config), "--quiet", *args)

    def config(self, name: str, *, db: str = SOURCE_DB, uploads: Path | None = None,
               targets: list[dict[str, str]], dump_jobs: int = 1) -> Path:
        doc: dict[str, Any] = {"state_dir": str(self.work / "state"),
                               "database": {"url": self.cluster.url(db)}}
        if dump_jobs > 1:
            doc["database"]["dump_jobs"] = dump_jobs
        if uploads is not None:
            # The tar format: these rows compare with the seed's tar pipeline and with the
            # figures of earlier reports; packs against tar is benchmarks/uploads.py's.
            doc["uploads"] = {"path": str(uploads), "format": "tar"}
        doc["targets"] = targets
        path = self.work / "configs" / f"{name}.toml"
        path.write_text(tomli_w.dumps(doc), encoding="utf-8")
        return path

    def local(self, key: str) -> tuple[dict[str, str], Path]:
        folder = self.work / "out" / key
        return {"name": "local", "type": "local", "path": str(folder)}, folder

    # -- setup ---------------------------------------------------------------------------------
    def make_data(self) -> None:
        args = self.args
        log(f"generating the database (scale {args.scale})")
        self.cluster.create_database(SOURCE_DB)
        load_conexa(self.cluster.url(SOURCE_DB), args.scale)
        self.rows[SOURCE_DB] = table_row_counts(self.cluster.url(SOURCE_DB))
        if args.large_scale:
            log(f"generating the large database (scale {args.large_scale})")
            self.cluster.create_database(LARGE_DB)
            load_conexa(self.cluster.url(LARGE_DB), args.large_scale)
            self.rows[LARGE_DB] = table_row_counts(self.cluster.url(LARGE_DB))
        log(f"generating uploads ({args.files} files, incompressible up to "
            f"{args.incompressible_kib} KiB)")
        make_uploads_tree(self.uploads, files=args.files, seed=0,
                          incompressible_kib=args.incompressible_kib)
        if args.many_small_files:
            log(f"generating {args.many_small_files} small files")
            make_uploads_tree(self.small, files=args.many_small_files, seed=1,
                              incompressible_kib=1)

    def make_fixtures(self) -> None:
        """What the restore cases read: the seed's dump, a custom archive, a conexa backup."""
        log("making the restore fixtures")
        fx = self.fixtures
        self.run(step("bash", "-c", SEED_DUMP, "bash", self.cluster.url(SOURCE_DB),
                      fx / "dump.sql.gz"))
        # The limit for a restore: what pg_restore -j2 does from the best input it can have,
        # a seekable file whose table of contents holds every data block's offset.
        self.run(step("pg_dump", "-Fc", "-Z0", "-f", fx / "conexa.dump", "-d", SOURCE_DB))
        self.fixture_backup("fixture", SOURCE_DB, self.uploads)
        self.fixture_backup("fixture_db", SOURCE_DB, None)  # what the drill proves
        if self.args.large_scale:
            self.run(step("pg_dump", "-Fc", "-Z0", "-f", fx / "conexa_large.dump",
                          "-d", LARGE_DB))
            self.fixture_backup("fixture_large", LARGE_DB, None)

    def fixture_backup(self, name: str, db: str, uploads: Path | None) -> None:
        """A conexa-backup backup to restore from, and its database artifact decompressed
        (``fixtures/<name>.dump``): the same dump, for bare ``pg_restore``."""
        target, folder = self.local(name)
        config = self.config(name, db=db, uploads=uploads, targets=[target])
        proc = subprocess.run(self.conexa(config, "backup", "--json"), env=self.env(),
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CommandFailed(f"fixture backup exited {proc.returncode}: {proc.stderr}")
        self.backup_ids[name] = backup_id = json.loads(proc.stdout)["id"]
        self.run(step("zstd", "-dqf", "-o", self.fixtures / f"{name}.dump",
                      folder / backup_id / "database.dump.zst"))

    # -- cases ---------------------------------------------------------------------------------
    def seed_dump_step(self, db: str, out: Path) -> Step:
        return step("bash", "-c", SEED_DUMP, "bash", self.cluster.url(db), out, fsync=(out,))

    def seed_backup(self, key: str, label: str) -> Case:
        out = self.work / "out" / key
        out.mkdir()
        dump, tgz = out / "dump.sql.gz", out / "uploads.tar.gz"

        def build(_tag: str) -> Trial:
            return Trial([self.seed_dump_step(SOURCE_DB, dump),
                          step("tar", "-czf", tgz, "-C", self.uploads, ".", fsync=(tgz,))],
                         size=lambda: file_sizes(dump, tgz), finish=lambda: unlink(dump, tgz))
        return Case(key, label, build)

    def seed_tar(self, key: str, label: str, uploads: Path) -> Case:
        tgz = self.work / "out" / f"{key}.tar.gz"

        def build(_tag: str) -> Trial:
            return Trial([step("tar", "-czf", tgz, "-C", uploads, ".", fsync=(tgz,))],
                         size=lambda: file_sizes(tgz), finish=lambda: unlink(tgz))
        return Case(key, label, build)

    def bare(self, key: str, label: str, cmd: Step) -> Case:
        return Case(key, label, lambda _tag: Trial([cmd]))

    def pg_dump_directory(self, key: str, label: str, db: str = SOURCE_DB) -> Case:
        out = self.work / "out" / f"{key}.dir"

        def build(_tag: str) -> Trial:
            return Trial([step("pg_dump", "-Fd", "-j2", "-Z0", "-f", out, "-d", db)],
                         size=lambda: tree_stats(out)[1],
                         finish=lambda: shutil.rmtree(out, ignore_errors=True) or "")
        return Case(key, label, build)

    def zstd_reference(self, key: str, label: str) -> Case:
        out = self.work / "out" / f"{key}.dump.zst"
        cmd = Step(stages=(("pg_dump", "-Fc", "-Z0", "-d", SOURCE_DB), ("zstd", "-3", "-T2")),
                   out=out, fsync=(out,))
        return Case(key, label,
                    lambda _tag: Trial([cmd], size=lambda: file_sizes(out),
                                       finish=lambda: unlink(out)))

    def cloud_targets(self, tag: str) -> list[dict[str, str]]:
        return [{"name": "s3", "type": "s3", "bucket": S3_BUCKET,
                 "endpoint_url": self.s3.endpoint, "prefix": f"run-{tag}"},
                {"name": "gcs", "type": "gcs", "bucket": GCS_BUCKET, "prefix": f"run-{tag}"}]

    def emulator_cpu(self) -> float:
        """CPU seconds used so far by moto (threads of this process) and fake-gcs-server."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime + self.gcs.cpu_seconds()

    def conexa_backup(self, key: str, label: str, *, db: str = SOURCE_DB,
                      uploads: Path | None, clouds: tuple[str, ...] = (),
                      dump_jobs: int = 1) -> Case:
        target, folder = self.local(key)

        def build(tag: str) -> Trial:
            targets = [target, *(t for t in self.cloud_targets(tag) if t["name"] in clouds)]
            config = self.config(f"{key}-{tag}", db=db, uploads=uploads, targets=targets,
                                 dump_jobs=dump_jobs)
            before = subdirs(folder)

            def made() -> list[Path]:
                return [folder / name for name in sorted(subdirs(folder) - before)]
            return Trial([step(*self.conexa(config, "backup"))],
                         size=lambda: sum(tree_stats(p)[1] for p in made()),
                         finish=lambda: self.delete_backups(config, made()),
                         counter=self.emulator_cpu if clouds else None)
        return Case(key, label, build)

    def delete_backups(self, config: Path, folders: list[Path]) -> str:
        """Remove this run's backups from every target (``conexa-backup delete --force``: the
        newest is one of them), untimed."""
        notes = [] if len(folders) == 1 else [f"{len(folders)} backups made"]
        for folder in folders:
            proc = subprocess.run(self.conexa(config, "delete", folder.name, "--yes", "--force"),
                                  env=self.env(), capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                notes.append(f"delete exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
            shutil.rmtree(folder, ignore_errors=True)
        return "; ".join(notes)

    def check_and_drop(self, db: str, source: str) -> str:
        """Compare the restored row counts with those of ``source``, then drop ``db``."""
        try:
            same = table_row_counts(self.cluster.url(db)) == self.rows[source]
        finally:
            self.cluster.drop_database(db)
        return "" if same else "row counts differ from the source"

    def seed_restore(self, key: str, label: str) -> Case:
        dump, errlog = self.fixtures / "dump.sql.gz", self.scratch / "psql-stderr"

        def build(tag: str) -> Trial:
            db = f"restored_{key}_{tag}"
            self.cluster.create_database(db)

            def finish() -> str:
                lines = errlog.read_text(errors="replace").splitlines()
                errors = sum("ERROR:" in line for line in lines)
                notes = [f"{errors} psql errors (ignored)" if errors else "",
                         self.check_and_drop(db, SOURCE_DB)]
                return "; ".join(n for n in notes if n)
            # The seed ignores psql's errors: no ON_ERROR_STOP, exit status unchecked.
            cmd = step("bash", "-c", SEED_RESTORE, "bash", dump, self.cluster.url(db),
                       check=False, errlog=errlog)
            return Trial([cmd], finish=finish)
        return Case(key, label, build)

    def bare_restore(self, key: str, label: str, dump: str, source: str = SOURCE_DB) -> Case:
        def build(tag: str) -> Trial:
            db = f"restored_{key}_{tag}"
            self.cluster.create_database(db)
            cmd = step("pg_restore", "-j2", "-d", db, self.fixtures / dump)
            return Trial([cmd], finish=lambda: self.check_and_drop(db, source))
        return Case(key, label, build)

    def conexa_restore(self, key: str, label: str, fixture: str = "fixture",
                       source: str = SOURCE_DB) -> Case:
        config = self.work / "configs" / f"{fixture}.toml"

        def build(tag: str) -> Trial:
            db = f"restored_{key}_{tag}"
            cmd = step(*self.conexa(config, "restore", self.backup_ids[fixture],
                                    "--to-database", db, "--only", "database"))
            return Trial([cmd], finish=lambda: self.check_and_drop(db, source))
        return Case(key, label, build)

    def conexa_drill(self, key: str, label: str, fixture: str) -> Case:
        config = self.work / "configs" / f"{fixture}.toml"

        def build(_tag: str) -> Trial:
            return Trial([step(*self.conexa(config, "verify", self.backup_ids[fixture],
                                            "--drill"))])
        return Case(key, label, build)

    def quick(self, key: str, label: str, *args: str) -> Case:
        """A command monitoring runs every few minutes, against the fixture's config (status
        exits 1 or 2 when it warns: only its time counts here)."""
        config = self.work / "configs" / "fixture.toml"
        return self.bare(key, label, step(*self.conexa(config, *args), check=False))

    def cases(self) -> list[Case]:
        a, up = self.args, self.uploads
        cases = [
            self.seed_backup("seed", "seed: `pg_dump | gzip` + `tar -czf`"),
            self.conexa_backup("conexa", "conexa-backup backup (local)", uploads=up),
            self.bare("pg_dump", "`pg_dump -Fc -Z0 > /dev/null`",
                      step("pg_dump", "-Fc", "-Z0", "-d", SOURCE_DB)),
            self.bare("tar", "`tar -cf - -C uploads .` (read and discarded)",
                      step("tar", "-cf", "-", "-C", up, ".", drain=True)),
            self.zstd_reference("zstd", "`pg_dump -Fc -Z0 | zstd -3 -T2 > file`"),
            self.conexa_backup("conexa_db", "conexa-backup backup, database only", uploads=None),
            self.conexa_backup("conexa_db_par", "conexa-backup backup, database only, "
                               "`dump_jobs = 2`", uploads=None, dump_jobs=2),
            self.pg_dump_directory("pg_dump_dir", "`pg_dump -Fd -j2 -Z0 -f dir` (parallel, "
                                   "uncompressed)"),
            self.bare("startup", "`python -m conexa_backup --version` (start-up cost alone)",
                      step(sys.executable, "-m", "conexa_backup", "--version")),
            self.quick("status_json", "`conexa-backup status --json`", "status", "--json"),
            self.quick("list_json", "`conexa-backup list --json`", "list", "--json"),
            self.conexa_backup("fanout", "conexa-backup backup to local + S3 + GCS",
                               uploads=up, clouds=("s3", "gcs")),
            self.conexa_backup("fanout_s3", "conexa-backup backup to local + S3",
                               uploads=up, clouds=("s3",)),
            self.seed_restore("seed_restore", "seed: `gunzip -c | psql -q`"),
            self.bare_restore("pg_restore", "`pg_restore -j2` (custom file from `pg_dump -f`)",
                              "conexa.dump"),
            self.bare_restore("pg_restore_own", "`pg_restore -j2` of the same dump "
                              "conexa-backup restores (its artifact, decompressed)",
                              "fixture.dump"),
            self.conexa_restore("conexa_restore", "conexa-backup restore --only database"),
            self.conexa_drill("drill", "conexa-backup verify --drill (a database-only backup)",
                              "fixture_db"),
        ]
        if a.many_small_files:
            n = f"{a.many_small_files} small files"
            cases += [
                self.bare("small_tar", f"`tar -cf -` (read and discarded), {n}",
                          step("tar", "-cf", "-", "-C", self.small, ".", drain=True)),
                self.seed_tar("small_seed", f"seed: `tar -czf`, {n}", self.small),
                self.conexa_backup("small_conexa", f"conexa-backup backup (local), {n}",
                                   uploads=self.small),
            ]
        if a.large_scale:
            s = f"scale {a.large_scale:g}"
            cases += [
                self.bare("large_pg_dump", f"`pg_dump -Fc -Z0 > /dev/null`, {s}",
                          step("pg_dump", "-Fc", "-Z0", "-d", LARGE_DB)),
                self.conexa_backup("large_conexa", f"conexa-backup backup (local), {s}",
                                   db=LARGE_DB, uploads=up),
                self.pg_dump_directory("large_pg_dump_dir", f"`pg_dump -Fd -j2 -Z0 -f dir`, {s}",
                                       db=LARGE_DB),
                self.conexa_backup("large_conexa_db", f"conexa-backup backup, database only, {s}",
                                   db=LARGE_DB, uploads=None),
                self.conexa_backup("large_conexa_db_par", "conexa-backup backup, database only, "
                                   f"`dump_jobs = 2`, {s}", db=LARGE_DB, uploads=None,
                                   dump_jobs=2),
                self.bare_restore("large_pg_restore", f"`pg_restore -j2` (custom file from "
                                  f"`pg_dump -f`), {s}", "conexa_large.dump", LARGE_DB),
                self.bare_restore("large_pg_restore_own", f"`pg_restore -j2` of the same dump, {s}",
                                  "fixture_large.dump", LARGE_DB),
                self.conexa_restore("large_conexa_restore", "conexa-backup restore --only "
                                    f"database, {s}", "fixture_large", LARGE_DB),
                self.conexa_drill("large_drill", f"conexa-backup verify --drill, {s}",
                                  "fixture_large"),
            ]
        return cases


def log(text: str) -> None:
    print(f"-- {text}", file=sys.stderr, flush=True)


# -- what the report says about the machine and the data -------------------------------------------

def first_line(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "not found"
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def proc_field(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def package_version(name: str) -> str:
    return first_line(["dpkg-query", "-W", "-f", "${Version}", name])


def git_revision() -> str:
    rev = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    # Changes to tracked files, but not to the report this script itself rewrites.
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no", "--", ".", ":!docs/benchmarks.md"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"{rev}{' + uncommitted changes' if dirty else ''}"


def query(cluster: Cluster, db: str, sql: str) -> str:
    with cluster.connect(db) as conn:
        row = conn.execute(sql.encode()).fetchone()
    return str(row[0]) if row else "?"


def machine_info(cluster: Cluster) -> list[tuple[str, str]]:
    mem_kib = proc_field("/proc/meminfo", "MemTotal").split()[0]
    return [
        ("CPUs (`nproc`)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", proc_field("/proc/cpuinfo", "model name")),
        ("RAM", f"{int(mem_kib) / 1024**2:.1f} GiB" if mem_kib.isdigit() else "?"),
        ("OS / kernel", f"{platform.system()} {platform.release()}"),
        ("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("PostgreSQL server", query(cluster, "postgres", "SHOW server_version")),
        ("pg_dump", first_line(["pg_dump", "--version"])),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("zstd", first_line(["zstd", "--version"]).strip("* ")),
        ("gzip / tar", f"{first_line(['gzip', '--version'])} / {first_line(['tar', '--version'])}"),
        ("peak RSS from", f"`{TIME_BIN} -f %M`, GNU time {package_version('time')}"
         if TIME_BIN.exists() else "not measured (/usr/bin/time missing: apt-get install time)"),
        ("conexa-backup", f"{__version__} at {git_revision()}"),
    ]


def db_info(cluster: Cluster, db: str) -> str:
    size = int(query(cluster, db, "SELECT pg_database_size(current_database())"))
    counts = table_row_counts(cluster.url(db))
    return (f"{size / MB:.1f} MB (`pg_database_size`), {len(counts)} tables, "
            f"{sum(counts.values()):,} rows")


def data_info(bench: Bench) -> list[tuple[str, str]]:
    a, fx = bench.args, bench.fixtures
    files, size = tree_stats(bench.uploads)
    rows = [
        (f"database `{SOURCE_DB}`, scale {a.scale:g}", db_info(bench.cluster, SOURCE_DB)),
        ("its `pg_dump -Fc -Z0` archive", f"{file_sizes(fx / 'conexa.dump') / MB:.1f} MB"),
        ("its `pg_dump | gzip`", f"{file_sizes(fx / 'dump.sql.gz') / MB:.1f} MB"),
        ("uploads", f"{files:,} files, {size / MB:.1f} MB (`--files {a.files} "
                    f"--incompressible-kib {a.incompressible_kib}`)"),
    ]
    if a.many_small_files:
        files, size = tree_stats(bench.small)
        rows.append(("many-small-files tree", f"{files:,} files, {size / MB:.1f} MB"))
    if a.large_scale:
        rows.append((f"database `{LARGE_DB}`, scale {a.large_scale:g}",
                     db_info(bench.cluster, LARGE_DB)))
    return rows


# -- the report ------------------------------------------------------------------------------------

# (title, case keys, blurb); a group is shown when its last case was measured (the optional
# groups end with a case that only their option creates).
GROUPS: list[tuple[str, list[str], str]] = [
    ("Backup: database + uploads", ["seed", "conexa", "pg_dump", "tar"],
     "The seed's two commands are timed together; the bare producers are shown for scale."),
    ("Database only", ["pg_dump", "zstd", "pg_dump_dir", "conexa_db", "conexa_db_par",
                       "startup"],
     "conexa-backup with no `[uploads]` section against the bare producer; the last row is the "
     "fixed cost of starting Python and importing conexa-backup, included in every "
     "conexa-backup time."),
    ("Three copies: local + S3 + GCS", ["conexa", "fanout_s3", "fanout"],
     "Same backup, one local target against local + S3 (moto) + GCS (fake-gcs-server). The "
     "emulators run on the same cores as the backup: the note gives the CPU time they spent "
     "serving the uploads (moto, in the benchmark's own process, and fake-gcs-server), time "
     "that real S3 and GCS spend on their own machines; the CPU s column is conexa-backup's "
     "own (with its pg_dump), what the copies cost it."),
    ("Start-up", ["startup", "status_json", "list_json"],
     "What monitoring and the admin API's jobs run every few minutes, on a warm cache, against "
     "the fixture backup's config (one local target, one backup)."),
    ("Restore (database)", ["seed_restore", "pg_restore", "pg_restore_own", "conexa_restore",
                            "drill"],
     "Each into a new database, dropped afterwards; row counts checked against the source. "
     "The first `pg_restore` row is the limit: a seekable `pg_dump -f` file, whose table of "
     "contents gives each table's data offset. conexa-backup's dump is written by `pg_dump` "
     "into a pipe, without offsets: the second `pg_restore` row is that dump as stored; "
     "conexa-backup fills the offsets into its staging copy before `pg_restore` reads it. The "
     "drill restores a database-only backup into a throwaway database and proves it (row "
     "counts, schema objects), then drops it."),
    ("Many small files", ["tar", "small_tar", "small_seed", "conexa", "small_conexa"],
     "Rows without a file count use the regular uploads tree."),
    ("Large scale", ["pg_dump", "large_pg_dump", "large_pg_dump_dir", "large_conexa_db",
                     "large_conexa_db_par", "conexa", "large_conexa", "large_pg_restore",
                     "large_pg_restore_own", "large_conexa_restore", "large_drill"],
     "Rows without a scale use the regular database. The fixed costs (Python start-up, "
     "connecting, creating the database) weigh less here."),
]


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:  # a "|" inside a cell, even in `code`, needs "\\|"
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def mb(value: int | None) -> str:
    return "—" if value is None else f"{value / MB:.1f}"


def result_row(res: Result) -> list[str]:
    walls = [s.wall for s in res.samples]
    notes = sorted({s.note for s in res.samples if s.note})
    counted = res.counted()
    if counted is not None:
        notes.insert(0, COUNTER_NOTE.format(counted))
    if res.errors:
        notes.append(f"FAILED {len(res.errors)} time(s): {res.errors[0][:300]}")
    median, cpu = res.median(), res.cpu()
    return [res.case.label, "—" if median is None else f"{median:.2f}",
            f"{min(walls):.2f}-{max(walls):.2f}" if walls else "—",
            "—" if cpu is None else f"{cpu:.2f}",
            mb(res.size()), mb(res.peak_bytes()), "; ".join(notes)]


def group_sections(results: dict[str, Result], extras: Mapping[str, list[str]]) -> list[str]:
    header = ["pipeline", "median s", "min-max s", "CPU s", "output MB", "peak RSS MB", "notes"]
    lines: list[str] = []
    for title, keys, blurb in GROUPS:
        if keys[-1] not in results:
            continue
        present = [results[k] for k in keys if k in results]
        lines += [f"### {title}", "", blurb, "",
                  *md_table(header, [result_row(r) for r in present]), "",
                  *extras.get(title, [])]
    return lines


Goal = tuple[str, str, bool | None]  # (goal, measured, met; None when not measured)


def ratio(results: dict[str, Result], num: str, den: str, minus: float = 0.0) -> float | None:
    """(median of ``num`` - ``minus``) / median of ``den``."""
    a = results[num].median() if num in results else None
    b = results[den].median() if den in results else None
    return (a - minus) / b if a is not None and b else None


def ratio_goal(text: str, value: float | None, limit: float, *, at_least: bool) -> Goal:
    if value is None:
        return text, "not measured", None
    return text, f"{value:.2f}x", value >= limit if at_least else value <= limit


def rss_goals(results: dict[str, Result]) -> list[Goal]:
    goals: list[Goal] = []
    for key in ("conexa", "conexa_db", "fanout", "conexa_restore", "small_conexa",
                "large_conexa"):
        if key in results:
            peak = results[key].peak_bytes()
            goals.append((f"peak RSS ≤ 150 MB: {results[key].case.label}",
                          f"{mb(peak)} MB" if peak else "not measured",
                          None if peak is None else peak <= RSS_GOAL))
    return goals


def flat_goal(results: dict[str, Result], key: str, text: str, *, both_ways: bool) -> list[Goal]:
    """Peak RSS of ``key`` within 10% of the regular backup's (or at most 10% above it)."""
    if key not in results or "conexa" not in results:
        return []
    base, other = results["conexa"].peak_bytes(), results[key].peak_bytes()
    if not base or other is None:
        return [(text, "not measured", None)]
    change = other / base - 1
    met = abs(change) <= 0.10 if both_ways else change <= 0.10
    return [(text, f"{mb(base)} → {mb(other)} MB ({change:+.0%})", met)]


def goals(results: dict[str, Result], args: argparse.Namespace) -> list[Goal]:
    seed_size, own_size = (results[k].size() if k in results else None
                           for k in ("seed", "conexa"))
    size_goal: Goal = ("backup output ≤ the seed's", "not measured", None)
    if seed_size and own_size:
        size_goal = (size_goal[0], f"{mb(own_size)} vs {mb(seed_size)} MB",
                     own_size <= seed_size)
    return [
        ratio_goal("backup ≥ 4x faster than the seed's (seed time / conexa-backup time)",
                   ratio(results, "seed", "conexa"), 4, at_least=True),
        size_goal,
        *scale_goals(results, "", ""),
        ratio_goal("local + S3 + GCS: conexa-backup's own CPU s ≤ 1.5x local only's "
                   "(wall time with the emulators on the same cores: reported, not a goal)",
                   cpu_ratio(results, "fanout", "conexa"), 1.5, at_least=False),
        *startup_goals(results),
        ratio_goal("restore ≥ 1.7x faster than the seed's (seed time / conexa-backup time)",
                   ratio(results, "seed_restore", "conexa_restore"), 1.7, at_least=True),
        *(scale_goals(results, f"scale {args.large_scale:g}: ", "large_")
          if args.large_scale else []),
        *rss_goals(results),
        *flat_goal(results, "large_conexa",
                   f"peak RSS at scale {args.large_scale:g} within 10% of scale {args.scale:g}"
                   if args.large_scale else "", both_ways=True),
        *flat_goal(results, "small_conexa",
                   f"peak RSS with {args.many_small_files} small files at most 10% above the "
                   "regular uploads tree's", both_ways=False),
    ]


def scale_goals(results: dict[str, Result], prefix: str, key: str) -> list[Goal]:
    """The goals measured on one database: the regular one (``key`` "") or the large one
    ("large_", where fixed costs weigh less); ``prefix`` starts each goal's text."""
    return [
        ratio_goal(f"{prefix}database-only backup ≤ 1.3x `pg_dump -Fc -Z0 > /dev/null`",
                   ratio(results, f"{key}conexa_db", f"{key}pg_dump"), 1.3, at_least=False),
        ratio_goal(f"{prefix}database-only backup with `dump_jobs = 2` < `pg_dump -Fc -Z0 > "
                   "/dev/null` (faster than one stream)",
                   ratio(results, f"{key}conexa_db_par", f"{key}pg_dump"), 0.9999,
                   at_least=False),
        ratio_goal(f"{prefix}restore ≤ 1.15x `pg_restore -j2` of a seekable `pg_dump -f` file "
                   f"+ {FIXED_S} s: (restore - {FIXED_S} s) / limit",
                   ratio(results, f"{key}conexa_restore", f"{key}pg_restore", minus=FIXED_S),
                   1.15, at_least=False),
        ratio_goal(f"{prefix}drill of a database-only backup ≤ 1.25x that limit + {FIXED_S} s",
                   ratio(results, f"{key}drill", f"{key}pg_restore", minus=FIXED_S), 1.25,
                   at_least=False),
    ]


FIXED_S = 0.5  # start-up, connecting, creating the database: allowed on top of the limit
STARTUP_S = 0.2


def cpu_ratio(results: dict[str, Result], num: str, den: str) -> float | None:
    a = results[num].cpu() if num in results else None
    b = results[den].cpu() if den in results else None
    return a / b if a is not None and b else None


def startup_goals(results: dict[str, Result]) -> list[Goal]:
    found: list[Goal] = []
    for key in ("startup", "status_json", "list_json"):
        if key in results:
            t = results[key].median()
            found.append((f"{results[key].case.label} ≤ {STARTUP_S} s (warm cache)",
                          "not measured" if t is None else f"{t:.2f} s",
                          None if t is None else t <= STARTUP_S))
    return found


def goal_lines(items: list[Goal]) -> list[str]:
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    return md_table(["goal", "measured", ""], [(g, m, verdict[ok]) for g, m, ok in items])


def throughput_lines(bench: Bench, results: dict[str, Result]) -> list[str]:
    """Uploads throughput, estimated as (backup time - database-only time)."""
    if not {"small_conexa", "small_tar", "conexa", "tar"} <= set(results):
        return []
    rows = []
    db_only = results["conexa_db"].median() if "conexa_db" in results else None
    for name, root, key, tar in (("regular tree", bench.uploads, "conexa", "tar"),
                                 ("many small files", bench.small, "small_conexa", "small_tar")):
        files, size = tree_stats(root)
        full, bare = results[key].median(), results[tar].median()
        stage = full - db_only if full is not None and db_only is not None else None
        rows.append([name, f"{files:,}", mb(size), rate(files, size, stage),
                     rate(files, size, bare)])
    return ["Uploads throughput: conexa-backup's uploads stage is estimated as its backup time "
            "minus the database-only backup time.", "",
            *md_table(["tree", "files", "MB", "conexa-backup (estimated)", "`tar -cf -`"], rows),
            ""]


def rate(files: int, size: int, seconds: float | None) -> str:
    if seconds is None or seconds <= 0:
        return "n/a"
    return f"{files / seconds:,.0f} files/s, {size / MB / seconds:.1f} MB/s"


METHOD = """\
- Every pipeline ran {runs} time(s) after {warmup} unrecorded warm-up round(s), round-robin:
  each round runs every pipeline once, the order rotated by one position per round, so no
  pipeline always runs at the same point of a round. Times are medians (min-max beside
  them). The machine may be shared: read ratios rather than absolute times.
- Wall time is `time.perf_counter()` around the whole command, from starting the process to its
  exit, including Python start-up and imports for conexa-backup. Files written by the
  baseline pipelines are fsync'ed inside the timed span, as conexa-backup's local target
  fsyncs what it writes. Restores are timed from an existing empty database for the seed and
  `pg_restore` (created untimed); conexa-backup creates its database inside its timed span,
  then checks every table's row count.
- CPU s is the user + system time of the command and every process it waited for (from
  `getrusage(RUSAGE_CHILDREN)` around the timed span): for conexa-backup, the Python process and
  the `pg_dump`/`pg_restore` it starts; never the PostgreSQL server or the emulators. Above the
  wall time, the command kept more than one core busy.
- Peak RSS is GNU time's `%M` (`/usr/bin/time -f %M`): the `ru_maxrss` that `wait4()` returns
  for the command, i.e. the largest resident set reached by any *single* process among the
  command and the descendants it waited for (a maximum, not a sum). For a pipeline it is the
  largest over its stages (bash, pg_dump, gzip, zstd...). For conexa-backup it covers the Python
  process and the `pg_dump`/`pg_restore` it starts: it equals the Python process's peak whenever
  Python is the largest of them, and is an upper bound on it otherwise, which is what the
  150 MB goal is about. PostgreSQL server backends (which serve pg_dump, pg_restore and psql)
  and the emulators are not descendants and are not counted. MB = 10^6 bytes.
- All data is in the page cache (freshly generated, then read again by any warm-up round):
  this measures the pipelines' CPU and I/O-path cost, not cold reads from disk.
- Output is the bytes of the files each pipeline wrote (all files of the backup folder for
  conexa-backup, manifest included); `—` when it wrote to /dev/null or restored.
- `tar -cf -` is read through a pipe and discarded by the benchmark: GNU tar detects an archive
  that is /dev/null and then skips reading file contents, which would time nothing.
- conexa-backup runs as `python -m conexa_backup --config CFG --quiet backup` with default
  settings (zstd level 1, one thread per core, `pg_restore` with 2 jobs); each run's backup
  is then removed with `conexa-backup delete` (untimed).
- The S3 emulator (moto) runs in a thread of the benchmark's own Python process and
  fake-gcs-server as a child process of it, both on this machine: in the three-copies row
  their request handling competes with conexa-backup for the same {cpus} cores, and their
  memory is not part of conexa-backup's peak RSS (conexa-backup is a separate child process).
  Real S3/GCS would move that work off the machine but add network latency and bandwidth.
- The seed's pipelines are run as the seed wrote them, through `bash -c` (with
  `set -o pipefail` for the dump, which the seed lacked); its restore ignores psql errors.
"""


def render_report(bench: Bench, machine: list[tuple[str, str]], data: list[tuple[str, str]],
                  results: dict[str, Result], when: tuple[datetime, datetime]) -> str:
    args = bench.args
    lines = [
        "# Benchmarks", "",
        f"Produced by `{command_line()}` from {when[0]:%Y-%m-%d %H:%M} to {when[1]:%H:%M} UTC "
        f"(`benchmarks/run.py`; rerun it to refresh this file).", "",
        "## Goals", "", *goal_lines(goals(results, args)), "",
        "## Results", "", *group_sections(results, {
            "Many small files": throughput_lines(bench, results)}),
        "## Machine", "", *md_table(["", ""], [*machine, ("load average at end", loadavg())]),
        "", "## Data", "", *md_table(["", ""], data), "",
        "## How it was measured", "",
        METHOD.format(runs=args.runs, warmup=args.warmup, cpus=len(os.sched_getaffinity(0))),
    ]
    return "\n".join(lines)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line() -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), *sys.argv])


# -- main ------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0,
                   help="sample database scale; 1.0 is about 80 MB on disk (default 1)")
    p.add_argument("--large-scale", type=float, metavar="S2",
                   help="also back up and restore a database at this scale (issue 7: 10x --scale) "
                        "and compare speed and peak RSS (default: off)")
    p.add_argument("--files", type=int, default=1000,
                   help="approximate number of files in the uploads folder (default 1000)")
    p.add_argument("--incompressible-kib", type=int, default=256,
                   help="incompressible uploads are up to this many KiB each (default 256)")
    p.add_argument("--many-small-files", type=int, default=0, metavar="N",
                   help="also benchmark an uploads tree of N tiny files, e.g. 100000 (default off)")
    p.add_argument("--runs", type=int, default=3, help="measured rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (default 1)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"),
                   help="Markdown report to write (default docs/benchmarks.md)")
    p.add_argument("--only", metavar="KEYS", default="",
                   help="run only these pipelines (comma-separated keys, e.g. conexa,fanout; for "
                        "an A/B of one change: the report then says the rest was not measured)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent folder for the temporary data (default: the system temp dir)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.scale <= 0 or args.files < 1:
        p.error("--runs and --files must be ≥ 1, --warmup ≥ 0, --scale > 0")
    if (args.large_scale is not None and args.large_scale <= 0) or args.many_small_files < 0:
        p.error("--large-scale must be > 0 and --many-small-files ≥ 0")
    return args


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[Bench]:
    """Work folder, cluster and emulators, torn down in reverse order whatever happens."""
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="conexa-bench-", dir=args.workdir))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        cluster = stack.enter_context(Cluster(base=work / "pg"))
        s3 = stack.enter_context(S3Server())
        s3.create_bucket(S3_BUCKET)
        gcs = stack.enter_context(GCSServer())
        gcs.create_bucket(GCS_BUCKET)
        # A second Ctrl-C must not cut the clean-up short.
        stack.callback(signal.signal, signal.SIGINT, signal.SIG_IGN)
        yield Bench(args, work, cluster, s3, gcs)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not TIME_BIN.exists():
        log("/usr/bin/time not found: peak RSS will not be measured (apt-get install time)")
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.now(UTC)
    try:
        with environment(args) as bench:
            bench.make_data()
            bench.make_fixtures()
            machine, data = machine_info(bench.cluster), data_info(bench)
            log(f"benchmarking: {args.warmup} warm-up + {args.runs} measured round(s)")
            cases = bench.cases()
            if args.only:
                keys = set(args.only.split(","))
                unknown = keys - {c.key for c in cases}
                if unknown:
                    log(f"unknown pipeline(s): {', '.join(sorted(unknown))}")
                    return 2
                cases = [c for c in cases if c.key in keys]
            results = run_all(cases, args.runs, args.warmup, bench.run)
            text = render_report(bench, machine, data, results, (started, datetime.now(UTC)))
    except KeyboardInterrupt:
        log("interrupted; everything created was removed")
        return 130
    except CommandFailed as exc:
        log(f"setup failed: {exc}")
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    log(f"report written to {args.out}")
    return 1 if any(r.errors for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
