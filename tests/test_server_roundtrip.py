"""The admin panel's whole path through the real server, against the real PostgreSQL cluster
and three targets (local disk, moto's S3, fake-gcs-server): trigger -> job -> list ->
download (from each target) -> restore -> the live data is the backup's again."""

from __future__ import annotations

import hashlib

from psycopg import sql

from conexa_backup.testing.compare import table_row_counts, tree_snapshot
from conexa_backup.testing.emulators import GCSServer, S3Server
from tests.apikit import start_api
from tests.conftest import Workspace
from tests.test_copies import cloud_targets

BACKUPS = "/api/admin/backups"


def test_trigger_list_download_restore_round_trip(ws: Workspace, s3_server: S3Server,
                                                  gcs_server: GCSServer) -> None:
    api = start_api(ws, config_extra=cloud_targets(s3_server.endpoint))
    try:
        live = ws.cluster.url(ws.dbname)
        rows, tree = table_row_counts(live), tree_snapshot(ws.uploads)

        started = api.post(f"{BACKUPS}/trigger")
        assert started.status_code == 202, started.text
        backup_id = started.json()["backupId"]
        job = api.wait_job(started.json()["jobId"])
        assert (job["state"], job["backup_id"]) == ("succeeded", backup_id), job

        listed = api.get(BACKUPS).json()["backups"]
        (entry,) = [b for b in listed if b["id"] == backup_id]
        assert entry["status"] == "success"
        assert sorted(entry["location"]) == ["gcs", "local", "s3"]
        assert listed[0]["id"] == backup_id  # newest first

        files = api.get(f"{BACKUPS}/{backup_id}/download").json()
        by_kind = {a["name"].split(".")[0]: a for a in files["artifacts"]}
        for target in ("local", "s3", "gcs"):
            got = api.get(f"{BACKUPS}/{backup_id}/download",
                          params={"artifact": "database", "target": target})
            assert got.status_code == 200, (target, got.text)
            assert hashlib.sha256(got.content).hexdigest() == by_kind["database"]["sha256"]

        # What the restore must undo: rows gone, an upload gone, a stranger added.
        table = next(name for name, count in rows.items() if count)
        ws.cluster.execute(sql.SQL("TRUNCATE {} CASCADE").format(
            sql.Identifier(*table.split(".", 1))), dbname=ws.dbname)
        victim = next(p for p in ws.uploads.rglob("*") if p.is_file())
        victim.unlink()
        (ws.uploads / "added-after-the-backup.txt").write_text("not in the backup")
        assert table_row_counts(live) != rows

        asked = api.post(f"{BACKUPS}/{backup_id}/restore", json={"confirm": backup_id})
        assert asked.status_code == 202, asked.text
        assert asked.json()["message"] == "Restauração iniciada"
        restored = api.wait_job(asked.json()["jobId"], timeout=300)
        assert restored["state"] == "succeeded", restored
        assert table_row_counts(live) == rows
        assert tree_snapshot(ws.uploads) == tree

        safety = restored["result"]["safety_backup_id"]
        after = {b["id"]: b for b in api.get(BACKUPS).json()["backups"]}
        assert set(after) == {backup_id, safety}  # the safety backup is listed at once
        assert after[safety]["kind"] == "safety"
    finally:
        api.stop()
