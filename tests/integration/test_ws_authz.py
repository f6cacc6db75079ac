"""The WebSocket half of the access matrix: 2 projects x 3 roles against a real API (which issues the tickets) and a
real notifier (which trusts only the API's public key), with real events of a job in each project on NATS."""

from __future__ import annotations

import asyncio
import json
from itertools import product

import nats
import pytest
import websockets

from kiln_contracts.streams import ensure_streams
from kiln_testing import NatsServer
from kiln_testing.api import TICKET_PUBLIC, api_client, bearer, make_user
from kiln_testing.notifier import Publisher, public_key_file, running_notifier

ROLES = ("viewer", "member", "admin")
SPEC = {"model": "yolov8n.yaml", "dataset": "/data/shapes", "train": {"epochs": 1, "imgsz": 64}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wsauthz")
    server = NatsServer(tmp / "nats")
    server.start()
    try:
        with api_client(tmp, nats_url=server.url) as owner:
            users = {(p, r): make_user(owner, f"{p.lower()}-{r}", p, r)[1] for p, r in product("AB", ROLES)}
            jobs = {p: owner.post("/api/v1/jobs", json=SPEC | {"project": p}).json()["id"] for p in "AB"}

            async def publish():
                nc = await nats.connect(server.url)
                js = nc.jetstream()
                await ensure_streams(js)
                for p, job in jobs.items():
                    await Publisher(js, job, p).epoch(1)
                await nc.close()

            asyncio.run(publish())
            with running_notifier(server.url, ticket_public_key_file=public_key_file(TICKET_PUBLIC)) as where:
                yield owner, users, jobs, where
    finally:
        server.stop()


async def first_messages(url: str, ticket: str, *ops: dict, wanted: int) -> list[dict]:
    out = []
    async with websockets.connect(url, subprotocols=["kiln.v1", f"kiln.ticket.{ticket}"]) as ws:
        for op in ops:
            await ws.send(json.dumps(op))
        async with asyncio.timeout(10):
            while len(out) < wanted:
                out.append(json.loads(await ws.recv()))
    return out


@pytest.mark.parametrize("project, role", list(product("AB", ROLES)))
def test_each_role_watches_its_own_project_and_nothing_else(world, project, role):
    owner, users, jobs, where = world
    key, other = users[(project, role)], "B" if project == "A" else "A"
    # the API issues tickets only for what the caller may read
    assert owner.post("/api/v1/ws-tickets", json={"jobs": [jobs[other]]}, headers=bearer(key)).status_code == 404
    assert owner.post("/api/v1/ws-tickets", json={"projects": [other]}, headers=bearer(key)).status_code == 404
    ticket = owner.post("/api/v1/ws-tickets", json={"jobs": [jobs[project]], "projects": [project]},
                        headers=bearer(key)).json()["ticket"]

    # its own job on the single-job socket: the history arrives
    got = asyncio.run(first_messages(f"ws://{where}/api/v1/ws/jobs/{jobs[project]}", ticket, wanted=3))
    assert [m["type"] for m in got] == ["authorized", "subscribed", "event"], got
    assert got[2]["event"]["job_id"] == jobs[project] and got[2]["event"]["project"] == project

    # on the multi socket: its own job and project open; the other project's job and project are refused
    ops = [{"op": "subscribe", "job_id": jobs[other]}, {"op": "subscribe", "project": other},
           {"op": "subscribe", "job_id": jobs[project]}]
    got = asyncio.run(first_messages(f"ws://{where}/api/v1/ws", ticket, *ops, wanted=5))
    errors = [m for m in got if m["type"] == "error"]
    assert {e["sub"] for e in errors} == {f"job:{jobs[other]}", f"project:{other}"}, got
    assert all("not covered by this ticket" in e["reason"] for e in errors)
    events = [m for m in got if m["type"] == "event"]
    assert events and {e["event"]["job_id"] for e in events} == {jobs[project]}

    # the other project's job on the single-job socket: refused, nothing of it sent
    async def refused():
        async with websockets.connect(f"ws://{where}/api/v1/ws/jobs/{jobs[other]}",
                                      subprotocols=["kiln.v1", f"kiln.ticket.{ticket}"]) as ws:
            msgs = []
            try:
                async for m in ws:
                    msgs.append(json.loads(m))
            except websockets.ConnectionClosedError:
                pass
            return msgs, ws.close_code

    msgs, code = asyncio.run(refused())
    assert code == 4401 and not [m for m in msgs if m["type"] == "event"], msgs
