"""The shared live path: one feed per watched subject and process, fanning out to every caught-up client.

Clients join while events keep flowing, from the start, from a cursor or with nothing to replay: each switches
from its own replay to the shared feed without a gap or a duplicate, and however many clients watch a job the
notifier holds one live consumer per stream for it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kiln_contracts import MetricsLogged, subjects

from kiln_testing.notifier import (  # noqa: E402
    Publisher,
    authorized,
    connect_js,
    expect,
    new_job,
    running_notifier,
    silence,
    ticket,
    ws_connect,
)


async def _consumers_on(js: Any, stream: str, subject: str) -> int:
    return sum(1 for c in await js.consumers_info(stream) if c.config.filter_subject == subject)


async def _collect(address: str, path: str, scope: str, total: int, got: list[dict[str, Any]]) -> None:
    async with ws_connect(address, path, scope, max_queue=None) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        while len(got) < total:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert msg["type"] == "event", msg
            got.append(msg)
        await silence(ws, 0.3)


async def test_clients_joining_mid_stream_switch_to_the_shared_feed_without_gap_or_duplicate(nats_url: str):
    nc, js = await connect_js(nats_url)
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    total = 200
    sent: list[str] = []  # event ids in publishing order

    async def produce() -> None:  # ~200 messages/s, one log batch in every four
        for n in range(total):
            ev = await (pub.logs(f"line {n}") if n % 4 == 3 else pub.publish(MetricsLogged(step=n, metrics={"l": n})))
            sent.append(ev.id)
            await asyncio.sleep(0.005)

    with running_notifier(nats_url) as address:
        readers: list[tuple[set[str], list[dict[str, Any]], asyncio.Task[None]]] = []
        producer = asyncio.create_task(produce())
        for i in range(12):  # join at different points of the flow: history replay, then the feed
            while len(sent) < i * 15:
                await asyncio.sleep(0.005)
            got: list[dict[str, Any]] = []
            had: set[str] = set()
            path = f"/api/v1/ws/jobs/{job_id}"
            if i % 3 == 2:  # some resume with the cursors of what the first reader has received so far
                prefix = list(readers[0][1])
                if prefix:
                    cursor = {m["stream"]: m["seq"] for m in prefix}
                    path += "?" + "&".join(f"after_{k}={v}" for k, v in sorted(cursor.items()))
                    had = {m["event"]["id"] for m in prefix}
            scope = ticket(jobs={job_id: project})
            readers.append((had, got, asyncio.create_task(_collect(address, path, scope, total - len(had), got))))
        await producer
        await asyncio.gather(*(t for _, _, t in readers))
        ids = list(sent)
        for had, got, _ in readers:
            received = [m["event"]["id"] for m in got]
            assert len(received) == len(set(received)) and set(received) == set(ids) - had  # each exactly once
            for stream in ("events", "logs"):
                seqs = [m["seq"] for m in got if m["stream"] == stream]
                assert seqs == sorted(set(seqs))  # per stream: in order, no duplicate
    await nc.close()


async def test_many_clients_of_one_job_share_one_live_consumer_per_stream(nats_url: str):
    nc, js = await connect_js(nats_url)
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    await pub.epoch(1)  # some history, so that every client replays first
    # The ticket names the job's project: the notifier reads exactly that project's subjects.
    events_subject, logs_subject = subjects.job_events(job_id, project), subjects.job_logs(job_id, project)
    scope = ticket(jobs={job_id: project})
    with running_notifier(nats_url) as address:
        sockets = [await ws_connect(address, f"/api/v1/ws/jobs/{job_id}", scope).__aenter__() for _ in range(20)]
        try:
            for ws in sockets:
                await authorized(ws)
                await expect(ws, "subscribed")
                assert (await expect(ws, "event"))["seq"] > 0
            live = await pub.epoch(2)
            for ws in sockets:
                assert (await expect(ws, "event"))["event"]["id"] == live.id
            await asyncio.sleep(0.5)  # replay consumers are stopped in the background
            assert await _consumers_on(js, "KILN_EVENTS", events_subject) == 1
            assert await _consumers_on(js, "KILN_LOGS", logs_subject) == 1
        finally:
            for ws in sockets:
                await ws.close()
        await asyncio.sleep(0.5)
        assert await _consumers_on(js, "KILN_EVENTS", events_subject) == 0  # the last client took the feed along
    await nc.close()
