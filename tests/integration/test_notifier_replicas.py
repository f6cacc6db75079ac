"""Several notifier replicas side by side: the cursor belongs to the client, so it may resume on any replica.

Two notifier servers on one nats-server; events (and log batches) keep flowing while a client hops from one replica
to the other with its cursors: it sees every event exactly once, in stream order.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kiln_contracts import MetricsLogged

from kiln_testing.notifier import (  # noqa: E402
    Publisher,
    authorized,
    connect_js,
    expect,
    new_job,
    running_notifier,
    ticket,
    ws_connect,
)


async def _read(ws: Any, got: list[dict[str, Any]], cursor: dict[str, int], until: int) -> None:
    """Read events into ``got`` (advancing the per-stream cursor) until ``until`` of them were received."""
    while len(got) < until:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg["type"] == "event":
            got.append(msg)
            cursor[msg["stream"]] = msg["seq"]


async def test_a_client_hopping_between_replicas_with_its_cursor_sees_no_gap_and_no_duplicate(nats_url: str):
    nc, js = await connect_js(nats_url)
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    total = 300
    sent: list[str] = []

    async def produce() -> None:  # ~150 messages/s, one log batch in every five, while the client hops
        for n in range(total):
            ev = await (pub.logs(f"line {n}") if n % 5 == 4 else pub.publish(MetricsLogged(step=n, metrics={"l": n})))
            sent.append(ev.id)
            await asyncio.sleep(1 / 150)

    with running_notifier(nats_url) as a, running_notifier(nats_url) as b:
        producer = asyncio.create_task(produce())
        got: list[dict[str, Any]] = []
        cursor: dict[str, int] = {}
        for hop, (address, until) in enumerate(((a, 60), (b, 140), (a, 220), (b, total))):
            query = "&".join(f"after_{s}={q}" for s, q in sorted(cursor.items()))
            path = f"/api/v1/ws/jobs/{job_id}" + (f"?{query}" if query else "")
            async with ws_connect(address, path, ticket(jobs={job_id: project})) as ws:  # each replica checks it
                await authorized(ws)
                hello = await expect(ws, "subscribed")
                if hop:
                    assert hello["after_events"] == cursor.get("events")
                await _read(ws, got, cursor, until)
            # leaving mid-stream: the producer goes on publishing while nobody watches
        await producer
        # a second client, on the other replica, from the start: the same messages in the same order
        async with ws_connect(b, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
            await authorized(ws)
            await expect(ws, "subscribed")
            again: list[dict[str, Any]] = []
            await _read(ws, again, {}, total)
    await nc.close()

    ids = [m["event"]["id"] for m in got]
    assert len(ids) == len(set(ids)) == total, "duplicates or missing events across the hops"
    assert set(ids) == set(sent)
    for stream in ("events", "logs"):
        mine = [m for m in got if m["stream"] == stream]
        seqs = [m["seq"] for m in mine]
        assert seqs == sorted(set(seqs)), f"{stream}: sequences not strictly increasing across the hops"
        stream_ids = {m["event"]["id"] for m in mine}
        assert [m["event"]["id"] for m in mine] == [i for i in sent if i in stream_ids]  # publishing order
    assert sorted(m["event"]["id"] for m in again) == sorted(ids)
