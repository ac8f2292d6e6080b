"""How long the status page's facts take to render, and how big they are (issue 16).

    .venv/bin/python benchmarks/status_page.py [--backups 1000] [--days 365]

Renders :func:`conexa_backup.statuspage.view` for ``--backups`` backups (one every 8 hours,
two targets, each with a verified copy) and charts of as many points over ``--days`` days,
as an admin sees it (every button): the worst case of ``GET /api/admin/page``, whose other
costs (the list snapshot, ``state_dir``) are the list's own (``benchmarks/api_list.py``).
Prints the median of five renders and the HTML's size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from conexa_backup.actions.history import History
from conexa_backup.charts import Point, Series
from conexa_backup.statuspage import Facts, view


def facts(count: int, days: int) -> Facts:
    now = datetime.now(UTC).replace(microsecond=0)
    backups: list[dict[str, Any]] = []
    for i in range(count):
        at = now - timedelta(hours=8 * i)
        backups.append({
            "id": at.strftime("%Y%m%dT%H%M%SZ"), "created_at": at.isoformat(),
            "kind": "scheduled", "size_bytes": 2_000_000_000, "status": "success",
            "state": "complete", "location": ["local", "s3"], "drills": {},
            "targets": [{"target": t, "state": "complete",
                         "verified_at": at.isoformat()} for t in ("local", "s3")]})
    points = [Point(now - timedelta(hours=8 * i), 1e9 + i) for i in range(count)]
    history = History(start=now - timedelta(days=days), end=now,
                      sizes=[Series("database", points), Series("uploads", points)],
                      durations=[Series("backup", points)],
                      recovery=[Series("drill", points[::21])], gaps=[Series("gap", points)],
                      rto_seconds=3600, rpo_seconds=26 * 3600)
    status = {"status": "OK", "summary": "every target has a recent backup",
              "listed_at": now.isoformat(), "targets": [
                  {"target": t, "status": "OK", "newest_backup": backups[0]["id"],
                   "backup_age_seconds": 60, "damaged": []} for t in ("local", "s3")]}
    return Facts(status=status, backups=backups, targets=["local", "s3"], drills=[],
                 history=history, days=days, max_backup_age_seconds=26 * 3600,
                 can_admin=True, can_restore=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backups", type=int, default=1000)
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args()
    found = facts(args.backups, args.days)
    view(found, "en")  # warm
    times = []
    for _ in range(5):
        start = time.perf_counter()
        html = view(found, "en")
        times.append(time.perf_counter() - start)
    print(f"view(): median {statistics.median(times) * 1000:.0f} ms for {args.backups} backups"
          f" over {args.days} days; {len(html.encode()) / 1e6:.2f} MB of HTML")


if __name__ == "__main__":
    main()
