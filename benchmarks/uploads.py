"""Benchmark the uploads stage: the packs format against the tar format (issue 15).

    .venv/bin/python benchmarks/uploads.py --out docs/benchmarks.md

Both formats, in the same run, on the same trees, to a local target (so the figures are the
tool's, not a network's): uploads-only backups (``run_backup(parts=("uploads",))``, each in a
child process whose wall time and peak RSS, from ``wait4``, are recorded, and the time of its
uploads stage alone: the tar and its index, or the packs and theirs). ``os.sync()`` before
each measured run, so no run pays for the writes of the one before.

1. **Unchanged tree**: a first backup of the benchmark's uploads (``--files``, about 500 MB
   in 5,600 files by default: ``make_uploads_tree``), then a second of the same tree;
   ``--runs`` rounds, medians. The same on the many-small-files tree of ``benchmarks/run.py``
   (``--small-files``, 100,000 by default; 0 skips it). Goal: the second's uploads stage
   takes at most 5% of the first's and stores at most 1% of its bytes. Beside it, the limit
   of any backup that must notice a changed file: GNU ``find`` printing each entry's size,
   times, inode, mode and owner (what the file cache compares), output discarded.
2. **Growth**: ``--days`` daily backups of a tree like (1) (``--growth-files``) that
   grows 1% a day (new files; a few renamed and deleted each day). Goals: stored bytes at
   most 1.5x the final tree (tar: about ``days`` times), and the last day's uploads stage at
   most 10% of a full backup's time.
3. **Restore**: the packs backup of (1) restored by ``restore --only uploads`` against the
   limit, GNU ``tar -x`` of an uncompressed tar of the same tree from a local file. Goal:
   at most 1.2x.
4. **Many files** (``--many-files``, default 1,000,000 one-line files in folders of 1,000):
   peak RSS of a packs backup, a prune with garbage collection, and a restore. Goal: each
   under 150 MB.

Everything is made in a temporary folder removed at the end. Appends the results under
"## Uploads: packs against tar (issue 15)" to ``--out`` (or prints them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import tomli_w

from conexa_backup.testing.sample import make_uploads_tree


@dataclass
class Run:
    seconds: float
    peak_mb: float
    stage: float = 0.0  # a backup's uploads stage alone (the child says), else 0


def log(text: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", file=sys.stderr, flush=True)


def measured(argv: Sequence[str | Path], env: dict[str, str] | None = None) -> Run:
    """Run ``argv``; its wall time and peak RSS (the child's own, from ``wait4``).

    Raises:
        RuntimeError: it failed (its stderr's tail in the message).
    """
    os.sync()  # the last run's writes flushed first: none slows this one (either format)
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode not in (0, 3):
            err.seek(0)
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): "
                               f"{err.read()[-2000:].decode(errors='replace')}")
        out.seek(0)
        said = out.read().decode().split()
    # A child of ours says how long the operation itself took (not Python's start-up), and
    # a backup how long its uploads stage took.
    return Run(float(said[0]) if said else seconds, usage.ru_maxrss / 1024,
               float(said[1]) if len(said) > 1 else 0.0)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def drop_caches_note(work: Path | None) -> str:
    where = f"trees and targets in {work}" if work else "trees and targets in the temp folder"
    return (f"{where}; page cache warm (no root-only cache drop between runs: both formats "
            "alike)")


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work

    def config(self, name: str, uploads: Path, fmt: str, target: Path) -> Path:
        doc = {"state_dir": str(self.work / "state" / name),
               "database": {"url": "postgresql://127.0.0.1:9/unused"},
               "uploads": {"path": str(uploads), "format": fmt},
               "retention": {"keep_last": 1000},
               "targets": [{"name": "local", "type": "local", "path": str(target)}]}
        path = self.work / f"{name}.toml"
        path.write_text(tomli_w.dumps(doc))
        path.chmod(0o600)
        return path

    def child(self, *args: str | Path) -> Run:
        return measured([sys.executable, __file__, "--child", *args])


def child_main(op: str, config: str, *rest: str) -> int:
    """One measured operation, in a child process."""
    from conexa_backup.actions import backup, backup_packs
    from conexa_backup.actions.backup import run_backup
    from conexa_backup.actions.context import Context
    from conexa_backup.actions.prune import prune
    from conexa_backup.actions.restore import RestoreOptions, run_restore
    from conexa_backup.config.loading import load_config

    # The uploads stage of either format: what the time goals are about (the rest
    # of a run, the manifest and the target's listing, is the same for both).
    stage = [0.0]
    for module, name in ((backup_packs, "store_uploads"), (backup, "_store_tar")):
        def timed(*a: object, _real: object = getattr(module, name), **k: object) -> object:
            begun = time.perf_counter()
            try:
                return _real(*a, **k)  # type: ignore[operator]
            finally:
                stage[0] += time.perf_counter() - begun
        setattr(module, name, timed)
    ctx = Context(load_config(Path(config))[0])
    start = time.perf_counter()
    if op == "backup":
        run_backup(ctx, parts=("uploads",), prune=False)
    elif op == "restore":
        run_restore(ctx, RestoreOptions(ref=rest[0], only="uploads", uploads_to=Path(rest[1]),
                                        safety_backup=False))
    elif op == "prune":
        prune(ctx)
    else:
        raise SystemExit(f"unknown child op {op}")
    print(f"{time.perf_counter() - start:.4f} {stage[0]:.4f}")
    return 0


def stored(target: Path) -> int:
    return sum(p.stat().st_size for p in target.rglob("*") if p.is_file())


# -- 1. unchanged tree ---------------------------------------------------------------------------

FIND_FORMAT = "%s %T@ %C@ %i %m %U %G\n"  # what the file cache compares of each entry


def find_seconds(root: Path) -> float:
    """Wall time of GNU ``find`` stat'ing every entry under ``root`` (its output discarded):
    the limit of a backup that must stat each file to see whether it changed."""
    os.sync()
    start = time.perf_counter()
    subprocess.run(["find", str(root), "-printf", FIND_FORMAT], stdout=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - start


def unchanged(bench: Bench, uploads: Path, runs: int,
              name: str = "unchanged") -> dict[str, dict[str, float]]:
    """``runs`` rounds per format of a first backup (new target and state) then a second;
    medians (and ``find``'s, under ``"find"``)."""
    out: dict[str, dict[str, float]] = {}
    finds = sorted(find_seconds(uploads) for _ in range(runs))
    out["find"] = {"seconds": finds[runs // 2]}
    for fmt in ("tar", "packs"):
        rounds = []
        for i in range(runs):
            target = bench.work / f"{name}-{fmt}"
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(bench.work / "state" / f"{name}-{fmt}", ignore_errors=True)
            config = bench.config(f"{name}-{fmt}", uploads, fmt, target)
            first = bench.child("backup", config)
            first_bytes = stored(target)
            second = bench.child("backup", config)
            rounds.append({"first_s": first.seconds, "first_stage": first.stage,
                           "first_mb": first.peak_mb, "first_bytes": first_bytes,
                           "second_s": second.seconds, "second_stage": second.stage,
                           "second_mb": second.peak_mb,
                           "second_bytes": stored(target) - first_bytes})
            log(f"{name} {fmt} round {i + 1}: {rounds[-1]}")
        out[fmt] = {k: sorted(r[k] for r in rounds)[runs // 2] for k in rounds[0]}
        log(f"{name} {fmt}: {out[fmt]}")
    return out


# -- 2. growth -----------------------------------------------------------------------------------

def grow(root: Path, day: int, share: float = 0.01) -> None:
    """Add ``share`` of the tree's bytes as new files; rename two files and delete one."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    target = int(sum(p.stat().st_size for p in files) * share)
    folder = root / "novos" / f"dia-{day:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    added, n = 0, 0
    while added < target:
        size = min(200_000, target - added) or 1
        (folder / f"envio-{n:04d}.bin").write_bytes(os.urandom(size))
        added, n = added + size, n + 1
    victims = [p for p in files if "novos" not in p.parts][day * 3:day * 3 + 3]
    for p in victims[:2]:
        p.rename(p.with_name(f"renomeado-{day}-{p.name}"))
    for p in victims[2:]:
        p.unlink()


def growth(bench: Bench, days: int, files: int, kib: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for fmt in ("tar", "packs"):
        tree = bench.work / f"growth-tree-{fmt}"
        make_uploads_tree(tree, files=files, seed=5, incompressible_kib=kib)
        target = bench.work / f"growth-{fmt}"
        config = bench.config(f"growth-{fmt}", tree, fmt, target)
        first = bench.child("backup", config)
        last = first
        for day in range(1, days):
            grow(tree, day)
            last = bench.child("backup", config)
        out[fmt] = {"tree_bytes": tree_bytes(tree), "stored_bytes": stored(target),
                    "full_s": first.seconds, "last_s": last.seconds,
                    "full_stage": first.stage, "last_stage": last.stage}
        log(f"growth {fmt}: {out[fmt]}")
        shutil.rmtree(target)
        shutil.rmtree(tree)
    return out


# -- 3. restore ----------------------------------------------------------------------------------

def latest_id(target: Path) -> str:
    ids = sorted(p.name for p in target.iterdir() if (p / "manifest.json").is_file())
    return ids[-1]


def restore(bench: Bench, uploads: Path, runs: int) -> dict[str, float]:
    tarball = bench.work / "plain.tar"
    subprocess.run(["tar", "-cf", str(tarball), "-C", str(uploads), "."], check=True)
    config = bench.work / "unchanged-packs.toml"
    backup_id = latest_id(bench.work / "unchanged-packs")
    tar_times, packs_times = [], []
    for i in range(runs):
        dest = bench.work / f"tar-x-{i}"
        dest.mkdir()
        tar_times.append(measured(["tar", "-xf", tarball, "-C", dest]).seconds)
        shutil.rmtree(dest)
        dest = bench.work / f"packs-x-{i}"
        packs_times.append(bench.child("restore", config, backup_id, dest).seconds)
        shutil.rmtree(dest)
    tarball.unlink()
    result = {"tar_x_s": sorted(tar_times)[runs // 2], "packs_s": sorted(packs_times)[runs // 2]}
    log(f"restore: {result}")
    return result


# -- 4. many files -------------------------------------------------------------------------------

def many_files(root: Path, n: int) -> None:
    for i in range(0, n, 1000):
        folder = root / f"{i // 1000:04d}"
        folder.mkdir(parents=True)
        for j in range(min(1000, n - i)):
            (folder / f"f{j:03d}.txt").write_bytes(f"file {i + j}\n".encode())


def many(bench: Bench, n: int) -> dict[str, float]:
    tree = bench.work / "many"
    log(f"making {n} files")
    many_files(tree, n)
    target = bench.work / "many-packs"
    config = bench.config("many", tree, "packs", target)
    first = bench.child("backup", config)
    second = bench.child("backup", config)
    pruned = bench.child("prune", config)
    dest = bench.work / "many-restored"
    restored = bench.child("restore", config, latest_id(target), dest)
    result = {"files": n, "backup_s": first.seconds, "backup_mb": first.peak_mb,
              "second_s": second.seconds, "second_mb": second.peak_mb,
              "prune_s": pruned.seconds, "prune_mb": pruned.peak_mb,
              "restore_s": restored.seconds, "restore_mb": restored.peak_mb}
    log(f"many files: {result}")
    for path in (tree, target, dest):
        shutil.rmtree(path, ignore_errors=True)
    return result


# -- report --------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def unchanged_rows(tree: str, u: dict[str, dict[str, float]]) -> list[str]:
    """The table rows of :func:`unchanged`'s results for one tree (``tree``: its label)."""
    t, p, limit = u["tar"], u["packs"], u["find"]["seconds"]
    share_t = p["second_stage"] / p["first_stage"]
    share_b = p["second_bytes"] / max(p["first_bytes"], 1)
    return [
        f"| first backup{tree}: uploads stage (whole run) | {t['first_stage']:.3f} s "
        f"({t['first_s']:.3f} s), {t['first_bytes'] / 1e6:,.1f} MB stored, "
        f"{t['first_mb']:.0f} MB RSS | {p['first_stage']:.3f} s ({p['first_s']:.3f} s), "
        f"{p['first_bytes'] / 1e6:,.1f} MB, {p['first_mb']:.0f} MB RSS | |",
        f"| second, unchanged{tree}: uploads stage (whole run) | {t['second_stage']:.3f} s "
        f"({t['second_s']:.3f} s), {t['second_bytes'] / 1e6:,.1f} MB | "
        f"{p['second_stage']:.3f} s ({p['second_s']:.3f} s): {share_t:.1%} of the first's "
        f"stage ({p['second_s'] / p['first_s']:.1%} of its run), "
        f"{p['second_bytes'] / 1e6:,.3f} MB ({share_b:.2%}) | ≤ 5% time, ≤ 1% bytes: "
        f"{verdict(share_t <= 0.05 and share_b <= 0.01)} |",
        f"| the limit{tree}: `find` stat'ing every entry | | {limit:.3f} s: "
        f"{limit / p['first_stage']:.1%} of the first's stage | |",
    ]


def report(args: argparse.Namespace, uploads: tuple[int, int], res: dict[str, object]) -> str:
    u: dict[str, dict[str, float]] = res["unchanged"]  # type: ignore[assignment]
    g: dict[str, dict[str, float]] = res.get("growth", {})  # type: ignore[assignment]
    lines = [
        "## Uploads: packs against tar (issue 15)", "",
        f"`.venv/bin/python benchmarks/uploads.py {' '.join(args.argv)}` on "
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; uploads-only backups to a local target, each in "
        f"a child process (wall time; peak RSS from `wait4`); {drop_caches_note(args.work)}.", "",
        f"Tree: {uploads[0]:,} files, {uploads[1] / 1e6:,.0f} MB.", "",
        "| | tar | packs | goal |", "|---|---:|---:|---|",
    ]
    lines += unchanged_rows("", u)
    if "small" in res:
        small: dict[str, dict[str, float]] = res["small"]  # type: ignore[assignment]
        lines += unchanged_rows(f" ({args.small_files:,} small files)", small)
    if g:
        gt, gp = g["tar"], g["packs"]
        ratio_t = gt["stored_bytes"] / gt["tree_bytes"]
        ratio_p = gp["stored_bytes"] / gp["tree_bytes"]
        last = gp["last_stage"] / gp["full_stage"]
        lines += [
            f"| {args.days} days, +1%/day: stored / final tree | {ratio_t:.1f}x | {ratio_p:.2f}x "
            f"| ≤ 1.5x: {verdict(ratio_p <= 1.5)} |",
            f"| last day's uploads stage / a full one's (whole runs) | "
            f"{gt['last_stage'] / gt['full_stage']:.0%} ({gt['last_s'] / gt['full_s']:.0%}) | "
            f"{last:.1%} ({gp['last_s'] / gp['full_s']:.1%}) | ≤ 10%: {verdict(last <= 0.10)} |",
        ]
    if "restore" in res:
        r: dict[str, float] = res["restore"]  # type: ignore[assignment]
        ratio = r["packs_s"] / r["tar_x_s"]
        lines.append(f"| restore (median of {args.runs}) | `tar -xf` (plain tar, the limit): "
                     f"{r['tar_x_s']:.2f} s | {r['packs_s']:.2f} s ({ratio:.2f}x) | ≤ 1.2x: "
                     f"{verdict(ratio <= 1.2)} |")
    if "many" in res:
        m: dict[str, float] = res["many"]  # type: ignore[assignment]
        worst = max(m["backup_mb"], m["prune_mb"], m["restore_mb"], m["second_mb"])
        lines.append(
            f"| {int(m['files']):,} files, peak RSS | | backup {m['backup_mb']:.0f} MB "
            f"({m['backup_s']:.0f} s), again {m['second_mb']:.0f} MB ({m['second_s']:.0f} s), "
            f"prune {m['prune_mb']:.0f} MB ({m['prune_s']:.0f} s), restore "
            f"{m['restore_mb']:.0f} MB ({m['restore_s']:.0f} s) | < 150 MB: "
            f"{verdict(worst < 150)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return child_main(*argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=5600)
    p.add_argument("--small-files", type=int, default=100_000)
    p.add_argument("--incompressible-kib", type=int, default=180)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--growth-files", type=int, default=5600)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--many-files", type=int, default=1_000_000)
    p.add_argument("--skip", action="append", default=[],
                   choices=["growth", "restore", "many"])
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path, default=None,
                   help="where trees and targets are made (default: the system's temp "
                        "folder); a tmpfs such as /dev/shm measures the tool, not the disk")
    args = p.parse_args(argv)
    args.argv = argv
    with tempfile.TemporaryDirectory(prefix="bench-uploads-", dir=args.work) as tmp:
        bench = Bench(Path(tmp))
        uploads = bench.work / "uploads"
        log(f"making the uploads tree ({args.files} files)")
        make_uploads_tree(uploads, files=args.files, seed=0,
                          incompressible_kib=args.incompressible_kib)
        size = (sum(1 for p in uploads.rglob("*") if p.is_file()), tree_bytes(uploads))
        res: dict[str, object] = {"unchanged": unchanged(bench, uploads, args.runs)}
        if args.small_files:
            small = bench.work / "many-small"
            log(f"making the small-files tree ({args.small_files} files)")
            make_uploads_tree(small, files=args.small_files, seed=1, incompressible_kib=1)
            res["small"] = unchanged(bench, small, args.runs, name="small")
            for path in (small, bench.work / "small-tar", bench.work / "small-packs"):
                shutil.rmtree(path)
        if "restore" not in args.skip:
            res["restore"] = restore(bench, uploads, args.runs)
        if "growth" not in args.skip:
            res["growth"] = growth(bench, args.days, args.growth_files,
                                   args.incompressible_kib)
        if "many" not in args.skip:
            res["many"] = many(bench, args.many_files)
    text = report(args, size, res)
    print(json.dumps(res, indent=1), file=sys.stderr)
    if args.out:
        with args.out.open("a") as fh:
            fh.write("\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
