"""A re-run trains on its original's data or says why not: the real API, a real metrics-writer and a real runner
process (stand-in trainer) on real NATS JetStream and SQLite."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from kiln_testing.runners import RunnerProc
from kiln_testing.writer import WriterProc
from kiln_testing.api import api_client

TERMINAL = {"completed", "failed", "cancelled", "lost"}


@pytest.fixture()
def stack(nats_server, tmp_path):
    db = f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"
    with api_client(tmp_path, nats_url=nats_server.url, database_url=db, sweep_interval_s=3600) as client:
        writer = WriterProc(nats_server.url, db, tmp_path / "writer.log", batch_ms=20).start()
        runner = RunnerProc(nats_server.url, tmp_path / "runners", "r", tmp_path / "fake.log")
        try:
            asyncio.run(writer.ready())
            runner.wait_ready()
            yield client
        finally:
            runner.kill(signal.SIGKILL)
            runner.proc.wait()
            asyncio.run(writer.stop())


def ended(client: TestClient, job_id: str) -> dict:
    deadline = time.monotonic() + 30
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL and (job.get("details") or {}).get("dataset_snapshot") or (
                job["status"] == "failed"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_a_rerun_is_pinned_to_its_originals_dataset_snapshot(stack, tmp_path):
    data = tmp_path / "ds"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.jpg").write_bytes(b"x" * 100)
    (data / "data.yaml").write_text("path: .\ntrain: images\nval: images\nnames: {0: a}\n")
    first = stack.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": str(data), "start": True,
                                              "train": {"epochs": 1}}).json()
    original = ended(stack, first["id"])
    assert original["status"] == "completed"
    snapshot = original["details"]["dataset_snapshot"]

    same = stack.post(f"/api/v1/jobs/{first['id']}/rerun").json()
    assert same["spec"]["dataset_snapshot"] == snapshot and same["rerun_of"] == first["id"]
    assert ended(stack, same["id"])["status"] == "completed"

    (data / "images" / "b.jpg").write_bytes(b"y" * 50)  # the dataset changes
    pinned = ended(stack, stack.post(f"/api/v1/jobs/{first['id']}/rerun").json()["id"])
    assert pinned["status"] == "failed" and pinned["exit_class"] == "user_error"
    assert snapshot in pinned["reason"] and "changed" in pinned["reason"] and "data=latest" in pinned["reason"]
    now = pinned["reason"].split("now snapshot ")[1].split(",")[0]
    assert len(now) == 64 and now != snapshot

    latest = stack.post(f"/api/v1/jobs/{first['id']}/rerun", params={"data": "latest"}).json()
    assert latest["spec"]["dataset_snapshot"] is None
    done = ended(stack, latest["id"])
    assert done["status"] == "completed" and done["details"]["dataset_snapshot"] == now
    queued = [t for t in done["timeline"] if t["status"] == "queued"][0]
    assert f"re-run of {first['id']} on the current data ({first['id']} trained on {snapshot[:12]})" in queued["reason"]
    assert stack.post(f"/api/v1/jobs/{first['id']}/rerun", params={"data": "other"}).status_code == 422
