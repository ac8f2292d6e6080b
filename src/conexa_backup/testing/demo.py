"""The built-in demo: the main job, end to end, on throwaway data.

Starts a throwaway PostgreSQL with Conexa-like data and an uploads folder, then runs the real
command line: ``check``, ``backup``, ``list``, ``verify``, ``restore`` side by side, and shows
that the restored copy matches the original. Run with ``bash scripts/demo.sh``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conexa_backup.testing.cluster import Cluster
from conexa_backup.testing.compare import plain_dump, table_row_counts, tree_snapshot
from conexa_backup.testing.sample import load_conexa, make_uploads_tree


def _say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m", flush=True)


def _run(config: Path, *args: str) -> str:
    print(f"$ conexa-backup {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", "conexa_backup", "--config", str(config), *args],
                          capture_output=True, text=True, check=False)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed: `conexa-backup {' '.join(args)}` "
                         f"exited {proc.returncode}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=0.3,
                        help="sample database scale (1.0 is about 80 MB)")
    parser.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="conexa-demo-"))
    with Cluster() as cluster:
        _say(f"1. A throwaway PostgreSQL on port {cluster.port} with Conexa-like data")
        t0 = time.monotonic()
        cluster.create_database("conexa")
        load_conexa(cluster.url("conexa"), scale=args.scale)
        uploads = work / "uploads"
        make_uploads_tree(uploads, files=300)
        counts = table_row_counts(cluster.url("conexa"))
        print(f"database 'conexa': {len(counts)} tables, {sum(counts.values())} rows; "
              f"uploads: {uploads} ({time.monotonic() - t0:.1f} s)")
        config = work / "backup.toml"
        config.write_text(
            f'state_dir = "{work / "state"}"\n\n[database]\nurl = "{cluster.url("conexa")}"\n\n'
            f'[uploads]\npath = "{uploads}"\n\n'
            f'[[targets]]\nname = "local"\ntype = "local"\npath = "{work / "backups"}"\n',
            encoding="utf-8",
        )
        print(config.read_text(encoding="utf-8"))

        _say("2. Check the configuration and every connection")
        _run(config, "check")
        _say("3. Back up database and uploads")
        backup_id = _run(config, "backup").strip()
        _say("4. List and verify")
        _run(config, "list")
        _run(config, "verify", backup_id)
        _say("5. Restore side by side (the live database and folder are left alone)")
        restored = work / "restored-uploads"
        _run(config, "restore", backup_id, "--to-database", "conexa_restored",
             "--uploads-to", str(restored))

        _say("6. Is the restored copy the same?")
        same_db = plain_dump(cluster.env(), "conexa") == plain_dump(cluster.env(),
                                                                    "conexa_restored")
        same_counts = counts == table_row_counts(cluster.url("conexa_restored"))
        same_tree = tree_snapshot(uploads) == tree_snapshot(restored)
        print(f"database schema and data identical (pg_dump text): {same_db}")
        print(f"row counts identical in all {len(counts)} tables: {same_counts}")
        print(f"uploads identical (paths, bytes, modes, links, mtimes): {same_tree}")
    if args.keep:
        print(f"\ndemo files kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    ok = same_db and same_counts and same_tree
    _say("demo OK" if ok else "demo FAILED: the restored copy differs")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
