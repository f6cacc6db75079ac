"""Notifier, multi-job socket and slow clients: real nats-server, real uvicorn, real websockets clients."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import websockets

from kiln_testing.notifier import (
    small_window_socket,  # noqa: E402
    Publisher,
    authorized,
    connect_js,
    events,
    expect,
    ids,
    new_job,
    next_message,
    running_notifier,
    silence,
    ticket,
    ws_connect,
)


@pytest.fixture()
async def js(nats_url: str):
    nc, js = await connect_js(nats_url)
    yield js
    await nc.close()


async def send(ws: Any, **op: Any) -> None:
    await ws.send(json.dumps(op))


async def test_subscribe_jobs_and_projects(nats_url: str, js) -> None:
    (job_a, proj_a), (job_b, proj_b) = new_job(), new_job()
    a, b = Publisher(js, job_a, proj_a), Publisher(js, job_b, proj_b)
    old_a = await a.epoch(1)
    with running_notifier(nats_url) as address:
        async with ws_connect(address, "/api/v1/ws", ticket(jobs={job_a: proj_a}, projects=[proj_b])) as ws:
            await authorized(ws)
            await send(ws, op="subscribe", job_id=job_a)
            assert (await expect(ws, "subscribed"))["sub"] == f"job:{job_a}"
            assert ids(await events(ws, 1)) == [old_a.id]  # a job subscription replays its history
            await b.epoch(1)  # before the project subscription: not replayed (no cursor)
            await send(ws, op="subscribe", project=proj_b)
            hello = await expect(ws, "subscribed")
            assert hello == {"type": "subscribed", "sub": f"project:{proj_b}", "after_events": None}

            new_a, new_b = await a.epoch(2), await b.epoch(2)
            got = {m["event"]["id"]: m for m in await events(ws, 2)}
            assert got[new_a.id]["sub"] == f"job:{job_a}" and got[new_b.id]["sub"] == f"project:{proj_b}"
            assert got[new_b.id]["job_id"] == job_b

            await send(ws, op="subscribe", job_id=job_a)
            assert (await expect(ws, "error"))["reason"].startswith("already subscribed")
            await send(ws, op="unsubscribe", job_id=job_a)
            assert await expect(ws, "unsubscribed") == {"type": "unsubscribed", "sub": f"job:{job_a}"}
            await a.epoch(3)
            last_b = await b.finished()
            assert ids(await events(ws, 1)) == [last_b.id]
            await silence(ws, 0.3)

            # Resume the project from a cursor: exactly what came after it.
            await send(ws, op="unsubscribe", project=proj_b)
            await expect(ws, "unsubscribed")
            await send(ws, op="subscribe", project=proj_b, after_events=got[new_b.id]["seq"])
            await expect(ws, "subscribed")
            assert ids(await events(ws, 1)) == [last_b.id]


async def test_bad_operations_are_answered_not_fatal(nats_url: str) -> None:
    with running_notifier(nats_url, max_subscriptions=1) as address:
        async with ws_connect(address, "/api/v1/ws", ticket(jobs={"j1": "p1", "j2": "p2"})) as ws:
            await authorized(ws)
            for bad in ("{", '{"op": "explode"}', '{"op": "subscribe"}', '{"op": "subscribe", "job_id": "a.b"}',
                        '{"op": "subscribe", "project": "p", "after_logs": 3}', '{"op": "unsubscribe", "job_id": "x"}'):
                await ws.send(bad)
                assert (await expect(ws, "error"))["reason"], bad
            await send(ws, op="subscribe", job_id="j1")
            await expect(ws, "subscribed")
            await send(ws, op="subscribe", job_id="j2")
            assert "at most 1" in (await expect(ws, "error"))["reason"]


async def test_stalled_client_is_cut_off_and_resumes_without_loss(nats_url: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    path = f"/api/v1/ws/jobs/{job_id}"
    total = 200
    # A queue of 32 lets the healthy client (read by this busy test process) ride out a loaded machine; 200 x 64 KB
    # (~13 MB) still exceeds what the stalled one can absorb (~3 MB of kernel buffers + 32 queued messages, ~2 MB),
    # so it must overflow.
    with running_notifier(nats_url, client_queue=32, close_timeout_s=30) as address:
        stalled = await ws_connect(address, path, ticket(jobs={job_id: project}), sock=small_window_socket(address),
                                   max_queue=1)
        async with ws_connect(address, path, ticket(jobs={job_id: project})) as healthy:
            await authorized(healthy)
            await expect(healthy, "subscribed")
            reader = asyncio.create_task(events(healthy, total, timeout=30))
            published = []
            # ~64 KB each, ~13 MB in all: more than the kernel buffers a non-reading peer still absorbs (~3 MB
            # on loopback, where the send buffer autotunes to 4 MB), so the server's sender really blocks.
            for _ in range(total):
                published.append(await pub.noisy_logs(64_000))
            published_at = time.monotonic()
            got = await reader
            lag = time.monotonic() - published_at
        assert ids(got) == [e.id for e in published]
        assert lag < 10.0, f"healthy client delayed {lag:.2f}s by the stalled one"

        # The stalled client now reads: what the server had sent, the overflow notice, then a 1013 close.
        received: list[dict[str, Any]] = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                received.append(json.loads(await asyncio.wait_for(stalled.recv(), 20)))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert [m["type"] for m in received[:2]] == ["authorized", "subscribed"]
        notice = received[-1]
        assert notice["type"] == "overflow", notice
        relayed = [m for m in received if m["type"] == "event"]
        assert 0 < len(relayed) < total
        assert ids(relayed) == [e.id for e in published[: len(relayed)]]  # a prefix: nothing skipped
        cursor = notice["dropped_after"][f"job:{job_id}"]
        assert cursor == {"after_events": None, "after_logs": relayed[-1]["seq"]}

        # Reconnecting with the cursor replays exactly the rest. A replay of megabytes may itself outrun this
        # reader's queue: then the client is told where it stopped and resumes from there, as the web page does.
        rest: list[dict[str, Any]] = []
        for _ in range(20):
            async with ws_connect(address, f"{path}?after_logs={cursor['after_logs']}",
                                  ticket(jobs={job_id: project})) as again:
                await authorized(again)
                await expect(again, "subscribed")
                while len(relayed) + len(rest) < total:
                    msg = await next_message(again, 10.0)
                    if msg["type"] == "overflow":
                        cursor = msg["dropped_after"][f"job:{job_id}"]
                        assert cursor["after_logs"] == (rest or relayed)[-1]["seq"]  # where it really stopped
                        break
                    assert msg["type"] == "event", msg
                    rest.append(msg)
                else:
                    await silence(again, 0.3)
                    break
        assert ids(relayed) + ids(rest) == [e.id for e in published]


async def test_fast_client_replays_long_history_through_small_queue(nats_url: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    history = [await pub.epoch(n, epochs=300) for n in range(1, 301)]
    with running_notifier(nats_url, client_queue=4) as address:
        async with ws_connect(address, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
            await authorized(ws)
            await expect(ws, "subscribed")
            assert ids(await events(ws, len(history))) == [e.id for e in history]
            await silence(ws, 0.3)
