"""``GET /api/admin/backups/:id/download``: real server, real HTTP, a real backup of the real
PostgreSQL cluster; moto and fake-gcs-server for the pre-signed redirect."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from conexa_backup.testing.emulators import GCSServer, S3Server
from tests.apikit import Api, free_port, server_section, start_api
from tests.conftest import GCS_BUCKET, S3_BUCKET, Workspace
from tests.test_trust import encryption_toml, make_age_key

URL = "/api/admin/backups/{}/download"


def _backup(ws: Workspace) -> str:
    result = ws.run("backup", timeout=180)
    assert result.returncode == 0, result.stderr
    ids = sorted(p.name for p in ws.backups.iterdir() if not p.name.startswith("."))
    return ids[-1]


def _stored(root: Path, bid: str, word: str) -> Path:
    """The stored file ``word`` names in the backup's manifest on a local target."""
    if word == "manifest":
        return root / bid / "manifest.json"
    manifest = json.loads((root / bid / "manifest.json").read_bytes())
    name: str = next(a["name"] for a in manifest["artifacts"] if a["kind"] == word)
    return root / bid / name


def _fetch(api: Api, path: str, headers: dict[str, str] | None = None,
           stop_after: int | None = None) -> tuple[httpx.Response, bytes, Exception | None]:
    """GET ``path`` streaming; the body received (up to ``stop_after`` bytes, then the
    connection is dropped) and the error that ended it, if any."""
    body = bytearray()
    with httpx.Client(base_url=api.url, timeout=120) as client, client.stream(
            "GET", path, headers={**api.headers(), **(headers or {})}) as answer:
        try:
            for chunk in answer.iter_raw():
                body += chunk
                if stop_after is not None and len(body) >= stop_after:
                    del body[stop_after:]
                    break
        except httpx.HTTPError as exc:
            return answer, bytes(body), exc
        return answer, bytes(body), None


def _corrupt(path: Path) -> None:
    """Flip one byte in the middle: same size, wrong SHA-256 (the listing cannot tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _downloads(api: Api) -> list[dict[str, Any]]:
    return [e for e in api.audit() if e["action"] == "download"]


def test_each_artifact_downloads_as_stored_with_its_headers(api: Api, ws: Workspace) -> None:
    bid = _backup(ws)
    for word in ("database", "uploads", "manifest"):
        stored = _stored(ws.backups, bid, word)
        answer, body, error = _fetch(api, URL.format(bid) + f"?artifact={word}")
        assert (answer.status_code, error) == (200, None), body[:300]
        assert body == stored.read_bytes()
        assert answer.headers["content-length"] == str(stored.stat().st_size)
        assert answer.headers["content-disposition"] == \
            f'attachment; filename="{bid}-{stored.name}"'
        assert answer.headers["accept-ranges"] == "bytes"
        assert answer.headers["x-conexa-target"] == "local"  # where it was read from
        assert answer.headers["etag"] == f'"{hashlib.sha256(body).hexdigest()}"'
        assert answer.headers["content-type"] == (
            "application/json" if word == "manifest" else "application/octet-stream")
    lines = _downloads(api)
    assert [(e["outcome"], e["detail"]["artifact"], e["detail"]["target"], e["sub"])
            for e in lines] == [("ok", w, "local", "maria@escola")
                                for w in ("database", "uploads", "manifest")]
    assert all(e["backup_id"] == bid for e in lines)


def test_an_encrypted_backup_is_sent_as_stored_ciphertext(ws: Workspace) -> None:
    key = make_age_key(ws.root / "keys" / "age.txt")
    api = start_api(ws, config_extra=encryption_toml(key, identity=False))  # no key to decrypt
    try:
        bid = _backup(ws)
        stored = _stored(ws.backups, bid, "database")
        assert stored.name.endswith(".age")
        answer, body, error = _fetch(api, URL.format(bid) + "?artifact=database")
        assert (answer.status_code, error, body) == (200, None, stored.read_bytes())
        assert body.startswith(b"age-encryption.org/v1")
        assert answer.headers["content-disposition"].endswith(f'{bid}-{stored.name}"')
        entry = next(f for f in api.get(URL.format(bid)).json()["artifacts"]
                     if f["artifact"] == "database")
        assert entry["encryption"] == "age"
    finally:
        api.stop()


def test_without_artifact_it_lists_the_files_and_their_urls(api: Api, ws: Workspace) -> None:
    bid = _backup(ws)
    answer = api.get(URL.format(bid))
    assert answer.status_code == 200
    listing = answer.json()
    manifest = json.loads((ws.backups / bid / "manifest.json").read_bytes())
    assert listing["backupId"] == bid
    assert listing["targets"] == ["local"] and listing["damaged_targets"] == []
    files = {f["artifact"]: f for f in listing["artifacts"]}
    for artifact in manifest["artifacts"]:
        entry = files[artifact["kind"]]
        assert (entry["name"], entry["size"], entry["sha256"]) == (
            artifact["name"], artifact["size"], artifact["sha256"])
    assert files["manifest"]["size"] == (ws.backups / bid / "manifest.json").stat().st_size
    for entry in listing["artifacts"]:  # every URL it gives works
        got = api.get(entry["url"])
        assert got.status_code == 200, got.text
        assert got.content == (ws.backups / bid / entry["name"]).read_bytes()


def test_a_corrupted_copy_aborts_the_response_and_is_recorded_damaged(
        api: Api, ws: Workspace) -> None:
    bid = _backup(ws)
    stored = _stored(ws.backups, bid, "uploads")
    _corrupt(stored)
    answer, body, error = _fetch(api, URL.format(bid) + "?artifact=uploads")
    assert answer.status_code == 200  # headers went out before the end was read
    assert error is not None or len(body) < stored.stat().st_size  # never a clean full end
    assert len(body) < stored.stat().st_size
    listing = api.get(URL.format(bid)).json()
    assert listing["damaged_targets"] == ["local"] and listing["targets"] == []
    assert [e["outcome"] for e in _downloads(api)][:2] == ["ok", "failed: damaged"]
    assert "download of" in api.log_text() and "SHA-256" in api.log_text()


def test_a_copy_whose_size_is_wrong_is_refused_before_any_byte(api: Api, ws: Workspace) -> None:
    bid = _backup(ws)
    stored = _stored(ws.backups, bid, "database")
    stored.write_bytes(stored.read_bytes()[:-10])
    answer = api.get(URL.format(bid) + "?artifact=database")
    assert answer.status_code == 409
    assert answer.json()["error"] == "damaged"
    assert _downloads(api)[-1]["outcome"] == "refused: damaged"


def test_target_chooses_the_copy_and_a_damaged_first_copy_is_passed_over(ws: Workspace) -> None:
    second = ws.root / "second"
    api = start_api(ws, config_extra=f'[[targets]]\nname = "second"\ntype = "local"\n'
                                     f'path = "{second}"\n')
    try:
        bid = _backup(ws)
        stored = _stored(ws.backups, bid, "database")
        _corrupt(stored)
        good = _stored(second, bid, "database").read_bytes()
        path = URL.format(bid) + "?artifact=database"
        answer, body, _ = _fetch(api, path + "&target=second")
        assert (answer.status_code, body) == (200, good)
        assert answer.headers["x-conexa-target"] == "second"
        assert _downloads(api)[-1]["detail"]["target"] == "second"
        _, body, _ = _fetch(api, path + "&target=local")  # asked for: read, and aborted
        assert len(body) < len(good)
        answer, body, _ = _fetch(api, path)  # now known damaged: the other copy first
        assert (answer.status_code, body) == (200, good)
        assert answer.headers["x-conexa-target"] == "second"
        assert _downloads(api)[-1]["detail"]["target"] == "second"
        assert api.get(path + "&target=nowhere").status_code == 422
    finally:
        api.stop()


def test_a_target_that_is_down_is_a_503_and_the_others_still_serve(ws: Workspace) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    api = start_api(ws, config_extra=f'[[targets]]\nname = "s3"\ntype = "s3"\n'
                                     f'bucket = "{S3_BUCKET}"\nendpoint_url = "{dead}"\n'
                                     f'retries = 1\n',
                    env={"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                         "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        result = ws.run("backup", timeout=180, env={"AWS_ACCESS_KEY_ID": "x",
                                                    "AWS_SECRET_ACCESS_KEY": "y",
                                                    "AWS_DEFAULT_REGION": "us-east-1"})
        assert result.returncode == 3, result.stderr  # partial: the local copy only
        bid = next(p.name for p in ws.backups.iterdir() if not p.name.startswith("."))
        answer = api.get(URL.format(bid) + "?artifact=database&target=s3")
        assert (answer.status_code, answer.json()["error"]) == (503, "target_unreachable")
        assert _downloads(api)[-1]["outcome"] == "failed: target_unreachable"
        answer, body, _ = _fetch(api, URL.format(bid) + "?artifact=database")
        assert (answer.status_code, body) == (200, _stored(ws.backups, bid,
                                                           "database").read_bytes())
    finally:
        api.stop()


def test_a_download_cut_half_way_resumes_with_range(api: Api, ws: Workspace) -> None:
    (ws.uploads / "video.bin").write_bytes(os.urandom(5 << 20))  # several 1 MiB chunks
    bid = _backup(ws)
    stored = _stored(ws.backups, bid, "uploads").read_bytes()
    size = len(stored)
    assert size > 3 << 20, "the uploads artifact must span several chunks"
    path = URL.format(bid) + "?artifact=uploads"
    _, first, _ = _fetch(api, path, stop_after=size // 2 + 12345)
    answer, rest, error = _fetch(api, path, {"Range": f"bytes={len(first)}-"})
    assert (answer.status_code, error) == (206, None)
    assert answer.headers["content-range"] == f"bytes {len(first)}-{size - 1}/{size}"
    assert answer.headers["content-length"] == str(size - len(first))
    assert first + rest == stored
    etag = answer.headers["etag"]
    for header, status, expected in [
            ({"Range": "bytes=10-19"}, 206, stored[10:20]),
            ({"Range": "bytes=-100"}, 206, stored[-100:]),
            ({"Range": f"bytes={size - 5}-{size + 100}"}, 206, stored[-5:]),
            ({"Range": "bytes=10-19", "If-Range": etag}, 206, stored[10:20]),
            ({"Range": "bytes=10-19", "If-Range": '"stale"'}, 200, stored),
            ({"Range": "bytes=5-1,7-9"}, 200, stored)]:
        answer, body, error = _fetch(api, path, header)
        assert (answer.status_code, body, error) == (status, expected, None), header
    answer, _, _ = _fetch(api, path, {"Range": f"bytes={size}-"})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == f"bytes */{size}"
    assert api.get(path, headers={"Range": "bytes=-0"}).status_code == 416
    assert _downloads(api)[-1]["outcome"] == "refused: range_not_satisfiable"


def test_a_range_of_a_damaged_copy_is_aborted_too(api: Api, ws: Workspace) -> None:
    bid = _backup(ws)
    stored = _stored(ws.backups, bid, "uploads")
    _corrupt(stored)  # the flipped byte is in the middle; the range asked for is before it
    answer, body, error = _fetch(api, URL.format(bid) + "?artifact=uploads",
                                 {"Range": "bytes=0-99"})
    assert answer.status_code == 206
    assert error is not None and body == b""


def test_viewers_are_refused_and_audited_as_refused(api: Api, ws: Workspace) -> None:
    bid = _backup(ws)
    for path in (URL.format(bid), URL.format(bid) + "?artifact=database"):
        answer = api.get(path, role="viewer")
        assert answer.status_code == 403
        assert answer.json()["error"] == "forbidden"
        assert api.get(path, role=None).status_code == 401
    assert [(e["outcome"], e["sub"]) for e in _downloads(api)] == [
        ("refused: forbidden", "maria@escola"), ("refused: missing_token", "-")] * 2


def test_bad_ids_artifacts_and_unknown_backups(api: Api, ws: Workspace) -> None:
    bid = _backup(ws)
    secret = ws.root / "secret.txt"
    secret.write_text("never served")
    with httpx.Client(base_url=api.url, timeout=60, headers=api.headers()) as client:
        for raw in ("..", "%2e%2e", "%2E%2E%2Fsecret.txt", "..%2f..%2fsecret.txt",
                    f"{bid}%00", "%00", "A" * 300, f"{bid}..", "latest"):
            answer = client.get(f"/api/admin/backups/{raw}/download?artifact=database")
            assert answer.status_code in (404, 422), (raw, answer.status_code)
            assert b"never served" not in answer.content
            assert answer.json()["error"] in ("bad_backup_id", "not_found"), raw
    answer = api.get(URL.format("20200101T000000Z") + "?artifact=database")
    assert (answer.status_code, answer.json()["error"]) == (404, "backup_not_found")
    answer = api.get(URL.format(bid) + "?artifact=../manifest.json")
    assert (answer.status_code, answer.json()["error"]) == (422, "unknown_artifact")
    outcomes = {e["outcome"] for e in _downloads(api)}
    assert {"refused: bad_backup_id", "refused: backup_not_found",
            "refused: unknown_artifact"} <= outcomes


def test_an_artifact_the_backup_does_not_have_is_a_404(ws: Workspace) -> None:
    port = free_port()
    ws.write_config(server_section(f"127.0.0.1:{port}"), uploads=False)
    api = start_api(ws, write_config=False)  # serve --listen on a free port, retried
    try:
        bid = _backup(ws)
        answer = api.get(URL.format(bid) + "?artifact=uploads")
        assert (answer.status_code, answer.json()["error"]) == (404, "artifact_not_found")
        assert api.get(URL.format(bid) + "?artifact=database").status_code == 200
    finally:
        api.stop()


def _cloud(endpoint: str) -> str:
    prefix = f"download-{os.getpid()}-{os.urandom(4).hex()}"
    return (f'[[targets]]\nname = "s3"\ntype = "s3"\nbucket = "{S3_BUCKET}"\n'
            f'prefix = "{prefix}"\nendpoint_url = "{endpoint}"\nretries = 2\n'
            f'[[targets]]\nname = "gcs"\ntype = "gcs"\nbucket = "{GCS_BUCKET}"\n'
            f'prefix = "{prefix}"\n')


def test_presigned_download_redirects_to_a_url_that_works(
        ws: Workspace, s3_server: S3Server, gcs_server: GCSServer) -> None:
    api = start_api(ws, server='download = "presigned"\n', config_extra=_cloud(s3_server.endpoint))
    try:
        bid = _backup(ws)
        stored = _stored(ws.backups, bid, "database").read_bytes()
        path = URL.format(bid) + "?artifact=database"
        answer = api.get(path + "&target=s3")
        assert answer.status_code == 307
        location = answer.headers["location"]
        assert location.startswith(s3_server.endpoint)
        # SigV4 (AWS refuses SigV2 for newer buckets and regions), valid five minutes.
        assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in location, location
        assert "X-Amz-Expires=300" in location and "X-Amz-Signature=" in location
        fetched = httpx.get(location, timeout=60)  # no token: the signature is the key
        assert (fetched.status_code, fetched.content) == (200, stored)
        assert _downloads(api)[-1]["outcome"] == "ok: redirected"
        # The local copy comes first and is proxied; the emulator's GCS credentials cannot
        # sign (anonymous): proxied too, said in the log.
        for target in ("local", "gcs"):
            answer, body, error = _fetch(api, path + f"&target={target}")
            assert (answer.status_code, body, error) == (200, stored, None), target
        assert "cannot pre-sign" in api.log_text()
        _, body, _ = _fetch(api, path)
        assert body == stored

        # A copy known damaged is never handed out by URL (its bytes would go unchecked):
        # it is proxied, and the SHA-256 check aborts the answer.
        name = f"{bid}/{_stored(ws.backups, bid, 'database').name}"
        listed = s3_server.client().list_objects_v2(Bucket=S3_BUCKET)["Contents"]
        key = next(o["Key"] for o in listed if o["Key"].endswith(name))
        bad = bytearray(stored)
        bad[len(bad) // 2] ^= 0xFF
        s3_server.client().put_object(Bucket=S3_BUCKET, Key=key, Body=bytes(bad))
        assert ws.run("verify", bid).returncode != 0  # records the S3 copy damaged
        answer, body, error = _fetch(api, path + "&target=s3")
        assert answer.status_code == 200 and error is not None and body != stored
    finally:
        api.stop()


def test_gcs_signs_urls_with_a_service_account_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GCS branch that cannot run against the emulator (it only has anonymous
    credentials): with a service-account key, the URL is signed here, offline (V4)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from conexa_backup.storage.gcs import GCSTarget, GCSTargetConfig

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({
        "type": "service_account", "project_id": "escola", "private_key_id": "k1",
        "private_key": pem, "client_email": "backup@escola.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}))
    target = GCSTarget(GCSTargetConfig(name="gcs", type="gcs", bucket="escola-backups",
                                       prefix="p", project="escola", credentials_file=key))
    url = target.presign("20261205T030000Z/database.dump.zst", 300)
    assert url is not None
    assert url.startswith("https://storage.googleapis.com/escola-backups/p/20261205T030000Z/"
                          "database.dump.zst?")
    assert "X-Goog-Expires=300" in url and "X-Goog-Signature=" in url
    assert "backup%40escola.iam.gserviceaccount.com" in url
