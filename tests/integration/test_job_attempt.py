"""A job's REST representation agrees with its timeline across retries and hand-backs: the real API, a real
metrics-writer process, real NATS JetStream, SQLite and PostgreSQL.  The runner's and the reaper's events are
published as they publish them (``RunningJob._requeue``, ``Reaper._handle_lost``)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import nats
import pytest

from kiln_contracts import Event, JobStatus, JobStatusChanged, streams, utcnow
from kiln_testing.writer import WriterProc
from kiln_testing.api import api_client

SPEC = {"model": "yolov8n.yaml", "dataset": "/data/shapes", "train": {"epochs": 3, "imgsz": 64}}


@pytest.fixture()
def api_and_writer(nats_server, db_url, tmp_path):
    # its lifespan applies the migrations before the writer starts
    with api_client(tmp_path, nats_url=nats_server.url, database_url=db_url) as client:
        writer = WriterProc(nats_server.url, db_url, tmp_path / "writer.log", batch_ms=20).start()
        try:
            asyncio.run(writer.ready())
            yield client
        finally:
            asyncio.run(writer.stop())


def _publish(nats_url: str, *events: Event) -> None:
    async def go() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await streams.ensure_streams(js)
        for ev in events:
            await js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
        await nc.close()

    asyncio.run(go())


def _status(job_id: str, attempt: int, status: JobStatus, reason: str, *, source: str = "runner",
            seq: int = 1, event_id: str | None = None, skew_s: float = 0.0) -> Event:
    ev = Event.new(job_id=job_id, project="default", attempt=attempt, seq=seq, source=source,
                   data=JobStatusChanged(status=status, reason=reason, runner="r1" if source == "runner" else ""))
    return ev.model_copy(update={"time": utcnow() + timedelta(seconds=skew_s), "id": event_id or ev.id})


def _settled(client: TestClient, job_id: str, entries: int) -> dict[str, Any]:
    """The job once the writer has projected ``entries`` status events."""
    deadline = time.monotonic() + 20
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if len(job["timeline"]) >= entries:  # the projection is committed with the timeline's rows
            return job
        assert time.monotonic() < deadline, f"timeline never reached {entries} entries: {job}"
        time.sleep(0.05)


def _agrees(client: TestClient, job: dict[str, Any]) -> tuple[str, int, str]:
    """Status, attempt and reason of the job; the timeline's last entry and the job list say the same."""
    last = job["timeline"][-1]
    mine = (job["status"], job["attempt"], job["reason"])
    assert mine == (last["status"], last["attempt"], last["reason"]), (mine, job["timeline"])
    listed = [j for j in client.get("/api/v1/jobs").json() if j["id"] == job["id"]]
    assert [(j["status"], j["attempt"], j["reason"]) for j in listed] == [mine]
    return mine


def test_attempt_follows_hand_backs_and_retries_and_a_cancel_ends_the_current_attempt(api_and_writer, nats_server):
    client = api_and_writer
    job = client.post("/api/v1/jobs", json={**SPEC, "start": True}).json()
    jid, url = job["id"], nats_server.url
    assert _agrees(client, _settled(client, jid, 1)) == ("queued", 1, "waiting for a runner of pool default")

    _publish(url, _status(jid, 1, JobStatus.starting, "claimed by r1", seq=1),
             _status(jid, 1, JobStatus.running, "", seq=2))
    assert _agrees(client, _settled(client, jid, 3))[:2] == ("running", 1)

    # runner r1 shuts down: it hands the job back as attempt 2 (a `queued` event of attempt 2, nothing terminal)
    handed = "runner r1 shut down; handed back as attempt 2"
    _publish(url, _status(jid, 2, JobStatus.queued, handed))
    assert _agrees(client, _settled(client, jid, 4)) == ("queued", 2, handed)

    # another runner claims attempt 2; its clock is a second behind r1's: the timeline still ends with its claim
    _publish(url, _status(jid, 2, JobStatus.starting, "claimed by r2", skew_s=-1.0))
    assert _agrees(client, _settled(client, jid, 5)) == ("starting", 2, "claimed by r2")

    # its heartbeats stop: the reaper retries it as attempt 3
    retried = "attempt 2 lost (runner r2 stopped sending heartbeats); retrying"
    _publish(url, _status(jid, 3, JobStatus.queued, retried, source="reaper", event_id=f"{jid}-3-queued"))
    assert _agrees(client, _settled(client, jid, 6)) == ("queued", 3, retried)

    # cancelling the queued attempt 3 ends attempt 3 (an end recorded for attempt 1 would be ignored: stuck queued)
    assert client.post(f"/api/v1/jobs/{jid}/cancel").status_code == 202
    assert _agrees(client, _settled(client, jid, 7)) == ("cancelled", 3, "cancelled by owner")  # who cancelled
