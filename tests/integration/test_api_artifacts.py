"""Artifact downloads through the API: local files the job announced, presigned S3 (moto server), clear 404s."""

import asyncio
import hashlib
from datetime import datetime, timezone

import httpx
import pytest

from kiln_store import artifacts, make_engine
from kiln_testing import MotoS3
from kiln_testing.api import api_client


@pytest.fixture()
def setup(nats_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = MotoS3().start()
    db = f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"
    with api_client(tmp_path, nats_url=nats_server.url, database_url=db, artifact_s3_endpoint_url=s3.url) as c:
        yield c, db, s3, tmp_path
    s3.stop()


def add_artifact(db, job_id, name, uri, data, epoch):
    async def go():
        engine = make_engine(db)
        async with engine.begin() as conn:
            await conn.execute(artifacts.insert().values(
                event_id=f"{job_id}-{name}-{epoch}", job_id=job_id, attempt=1, name=name, uri=uri, size=len(data),
                sha256=hashlib.sha256(data).hexdigest(), epoch=epoch, time=datetime.now(timezone.utc)))
        await engine.dispose()
    asyncio.run(go())


def test_download_local_and_s3_artifacts(setup):
    client, db, s3, tmp = setup
    job = client.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": "/d"}).json()["id"]
    (tmp / "e1.pt").write_bytes(b"epoch one")
    (tmp / "e2.pt").write_bytes(b"epoch two")
    add_artifact(db, job, "last.pt", str(tmp / "e1.pt"), b"epoch one", 1)
    add_artifact(db, job, "last.pt", str(tmp / "e2.pt"), b"epoch two", 2)
    r = client.get(f"/api/v1/jobs/{job}/artifacts/last.pt")
    assert r.status_code == 200 and r.content == b"epoch two"  # newest version
    assert r.headers["x-kiln-sha256"] == hashlib.sha256(b"epoch two").hexdigest()
    assert client.get(f"/api/v1/jobs/{job}/artifacts/last.pt", params={"epoch": 1}).content == b"epoch one"
    assert len(client.get(f"/api/v1/jobs/{job}/artifacts").json()) == 2

    s3c = s3.client()
    s3c.create_bucket(Bucket="models")
    s3c.put_object(Bucket="models", Key="j/best.pt", Body=b"best weights")
    add_artifact(db, job, "best.pt", "s3://models/j/best.pt", b"best weights", 2)
    r = client.get(f"/api/v1/jobs/{job}/artifacts/best.pt", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].startswith(s3.url)
    assert httpx.get(r.headers["location"]).content == b"best weights"


def test_artifact_errors_are_404_with_a_reason(setup):
    client, db, s3, tmp = setup
    job = client.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": "/d"}).json()["id"]
    r = client.get(f"/api/v1/jobs/{job}/artifacts/nope.pt")
    assert r.status_code == 404 and "has no artifact 'nope.pt'" in r.json()["detail"]
    add_artifact(db, job, "gone.pt", "/elsewhere/on/another/host.pt", b"x", 1)
    r = client.get(f"/api/v1/jobs/{job}/artifacts/gone.pt")
    assert r.status_code == 404 and "cannot read" in r.json()["detail"]
    assert client.get("/api/v1/jobs/nojob/artifacts/x.pt").status_code == 404
