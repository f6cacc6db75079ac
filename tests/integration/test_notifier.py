"""Notifier, single-job socket: real nats-server, real uvicorn, real websockets client."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets
from kiln_contracts import Heartbeat, subjects

from kiln_testing.notifier import (  # noqa: E402
    Publisher,
    authorized,
    closed_with,
    connect_js,
    events,
    expect,
    ids,
    new_job,
    running_notifier,
    silence,
    ticket,
    ws_connect,
)


@pytest.fixture(scope="module")
def notifier(nats_url: str):
    with running_notifier(nats_url) as address:
        yield address


@pytest.fixture()
async def js(nats_url: str):
    nc, js = await connect_js(nats_url)
    yield js
    await nc.close()


async def test_healthz_reports_nats(notifier: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://{notifier}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "nats": True}


async def test_live_events_arrive_in_order(notifier: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        hello = await expect(ws, "subscribed")
        assert hello == {"type": "subscribed", "sub": f"job:{job_id}", "after_events": None, "after_logs": None}
        sent = [await pub.epoch(n) for n in (1, 2, 3)] + [await pub.finished()]
        got = await events(ws, 4)
    assert ids(got) == [e.id for e in sent]
    assert [m["event"]["data"]["kind"] for m in got] == ["epoch", "epoch", "epoch", "finished"]
    assert [m["event"]["data"].get("epoch") for m in got[:3]] == [1, 2, 3]
    assert all(m["stream"] == "events" and m["job_id"] == job_id and m["sub"] == f"job:{job_id}" for m in got)
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4


async def test_late_client_gets_history_then_live(notifier: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    history = [await pub.epoch(1), await pub.logs("epoch 1 done"), await pub.epoch(2)]
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        replayed = await events(ws, 3)
        live = [await pub.epoch(3), await pub.finished()]
        got = await events(ws, 2)
        await silence(ws)
    # Two streams, two consumers: per stream the order is exact; across streams only the set is.
    assert sorted(ids(replayed)) == sorted(e.id for e in history)
    assert [m["event"]["id"] for m in replayed if m["stream"] == "events"] == [history[0].id, history[2].id]
    assert [m for m in replayed if m["stream"] == "logs"][0]["event"]["data"]["lines"][0]["text"] == "epoch 1 done"
    assert ids(got) == [e.id for e in live]


async def test_reconnect_after_cursor_resumes_exactly(notifier: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    sent = [await pub.epoch(n) for n in (1, 2, 3)] + [await pub.finished()]
    log_1, log_2 = await pub.logs("a"), await pub.logs("b")
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        first = await events(ws, 6)
    ev_seqs = [m["seq"] for m in first if m["stream"] == "events"]
    log_seqs = [m["seq"] for m in first if m["stream"] == "logs"]
    path = f"/api/v1/ws/jobs/{job_id}?after_events={ev_seqs[1]}&after_logs={log_seqs[0]}"
    async with ws_connect(notifier, path, ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        hello = await expect(ws, "subscribed")
        assert (hello["after_events"], hello["after_logs"]) == (ev_seqs[1], log_seqs[0])
        rest = await events(ws, 3)
        await silence(ws)
        later = await pub.logs("c")
        assert ids(await events(ws, 1)) == [later.id]
    assert [m["event"]["id"] for m in rest if m["stream"] == "events"] == [sent[2].id, sent[3].id]
    assert [m["event"]["id"] for m in rest if m["stream"] == "logs"] == [log_2.id]
    assert log_1.id not in ids(rest)


async def test_invalid_messages_are_skipped(notifier: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        await js.publish(subjects.event(project, job_id, "epoch"), b"not json")
        good = await pub.epoch(1)
        future = good.model_dump(mode="json") | {"v": 99, "id": "future-version"}
        await js.publish(subjects.event(project, job_id, "epoch"), json.dumps(future).encode())
        last = await pub.finished()
        assert ids(await events(ws, 2)) == [good.id, last.id]
        await silence(ws, 0.3)


async def test_heartbeats_only_on_request(notifier: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    await pub.publish(Heartbeat(runner="r1"), source="runner")
    marker = await pub.epoch(1)
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        assert ids(await events(ws, 1)) == [marker.id]
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}?heartbeats=1", ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        assert [m["event"]["data"]["kind"] for m in await events(ws, 2)] == ["heartbeat", "epoch"]


async def test_bad_job_id_and_cursor_are_refused(notifier: str) -> None:
    # Checked once the ticket is: an error saying what is wrong, then 1008 (do not retry as is).
    async with ws_connect(notifier, "/api/v1/ws/jobs/bad.id", ticket(jobs={"j1": "p1"})) as ws:
        code, got = await closed_with(ws)
    assert code == 1008 and [m["type"] for m in got] == ["error"] and "not a valid subject token" in got[0]["reason"]
    async with ws_connect(notifier, "/api/v1/ws/jobs/j1?after_events=-1", ticket(jobs={"j1": "p1"})) as ws:
        code, got = await closed_with(ws)
    assert code == 1008 and got[0]["reason"] == "after_events: Input should be greater than or equal to 0"


async def test_origin_check(nats_url: str) -> None:
    with running_notifier(nats_url, allowed_origins="https://kiln.example") as address:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with ws_connect(address, "/api/v1/ws", ticket(projects=["p1"]), origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        async with ws_connect(address, "/api/v1/ws", ticket(projects=["p1"]), origin="https://kiln.example") as ws:
            await authorized(ws)
            await ws.send('{"op": "nonsense"}')
            assert (await expect(ws, "error"))["reason"]
