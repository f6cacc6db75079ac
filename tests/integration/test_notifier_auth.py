"""Notifier tickets: only a socket with a valid ticket opens, and it watches only what its ticket names.

Real nats-server, real uvicorn, real websockets client; the tickets are signed like the API signs them
(``kiln_testing.notifier.ticket``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest
import websockets
from kiln_contracts.tickets import CLOSE_UNAUTHORIZED, LEEWAY_S, TICKET_TTL_S, generate_keypair

from kiln_testing.notifier import (
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

RECHECK_S = 3


@pytest.fixture(scope="module")
def notifier(nats_url: str):
    with running_notifier(nats_url, recheck_s=RECHECK_S, auth_timeout_s=1) as address:
        yield address


@pytest.fixture()
async def js(nats_url: str):
    nc, js = await connect_js(nats_url)
    yield js
    await nc.close()


async def send(ws: Any, **op: Any) -> None:
    await ws.send(json.dumps(op))


async def refused(address: str, path: str, token: str | None = None, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    """Connect, expect exactly one ``error`` and a close; its code and the error."""
    async with ws_connect(address, path, token, **kwargs) as ws:
        code, got = await closed_with(ws)
    assert [m["type"] for m in got] == ["error"], got
    return code, got[0]


# -- no valid ticket, no socket --------------------------------------------------------------------------------------


async def test_no_ticket_is_closed_4401_after_the_auth_timeout_and_relays_nothing(notifier: str, js) -> None:
    job_id, project = new_job()
    await Publisher(js, job_id, project).epoch(1)  # history a subscription would replay at once
    started = time.monotonic()
    code, error = await refused(notifier, f"/api/v1/ws/jobs/{job_id}")
    assert code == CLOSE_UNAUTHORIZED and error["reason"].startswith("no ticket within 1 s")
    assert time.monotonic() - started >= 0.9
    code, error = await refused(notifier, "/api/v1/ws")
    assert code == CLOSE_UNAUTHORIZED and "Sec-WebSocket-Protocol" in error["reason"]


@pytest.mark.parametrize(("token", "reason"), [
    ("not-a-jwt", "ticket is not valid: DecodeError"),
    ("eyJhbGciOiJub25lIn0.e30.", "ticket is not valid: InvalidAlgorithmError"),  # unsigned: alg "none"
])
async def test_malformed_ticket_is_refused(notifier: str, token: str, reason: str) -> None:
    code, error = await refused(notifier, "/api/v1/ws", token)
    assert code == CLOSE_UNAUTHORIZED and error["reason"].startswith(reason)
    async with ws_connect(notifier, "/api/v1/ws") as ws:  # the same in the first frame
        await send(ws, op="auth", ticket=token)
        code, got = await closed_with(ws)
    assert code == CLOSE_UNAUTHORIZED and got[0]["reason"].startswith(reason) and token not in got[0]["reason"]


async def test_ticket_signed_with_another_key_is_refused(notifier: str, js) -> None:
    job_id, project = new_job()
    await Publisher(js, job_id, project).epoch(1)
    forged = ticket(jobs={job_id: project}, private_key=generate_keypair()[0])
    code, error = await refused(notifier, f"/api/v1/ws/jobs/{job_id}", forged)
    assert (code, error["reason"]) == (CLOSE_UNAUTHORIZED, "ticket signature is not valid")


async def test_expired_ticket_is_refused(notifier: str) -> None:
    stale = ticket(projects=["p1"], now=time.time() - 2 * TICKET_TTL_S)
    code, error = await refused(notifier, "/api/v1/ws", stale)
    assert (code, error["reason"]) == (CLOSE_UNAUTHORIZED, "ticket expired; ask the API for a new one")


async def test_ticket_replayed_after_its_expiry_is_refused(nats_url: str) -> None:
    # Valid for about one more second (its life plus the verifier's leeway), then replayed.
    issued = time.time() - TICKET_TTL_S - LEEWAY_S + 2
    token = ticket(projects=["p1"], now=issued)
    with running_notifier(nats_url) as address:
        async with ws_connect(address, "/api/v1/ws", token) as ws:
            await authorized(ws)
        await asyncio.sleep(max(0.0, int(issued) + TICKET_TTL_S + LEEWAY_S + 0.2 - time.time()))
        code, error = await refused(address, "/api/v1/ws", token)
    assert (code, error["reason"]) == (CLOSE_UNAUTHORIZED, "ticket expired; ask the API for a new one")


async def test_ticket_in_the_url_is_refused_and_never_logged(nats_url: str) -> None:
    token = ticket(projects=["p1"])
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    uvicorn_log = logging.getLogger("uvicorn")
    with running_notifier(nats_url, log_level="INFO") as address:
        uvicorn_log.addHandler(handler)  # after uvicorn has set up its logging
        try:
            code, error = await refused(address, f"/api/v1/ws?ticket={token}", token)  # even beside a good one
        finally:
            uvicorn_log.removeHandler(handler)
    assert code == 1008
    assert error["reason"].startswith("a ticket in the URL is refused (URLs end up in access logs): send it in the "
                                      "Sec-WebSocket-Protocol header")
    assert any("/api/v1/ws?ticket=[redacted]" in line for line in lines), lines
    assert not any(token in line or token[:40] in line for line in lines)


async def test_first_frame_must_be_auth_and_nothing_is_processed_before(notifier: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    async with ws_connect(notifier, "/api/v1/ws") as ws:
        await send(ws, op="subscribe", job_id=job_id)
        code, got = await closed_with(ws)
    assert code == CLOSE_UNAUTHORIZED and [m["type"] for m in got] == ["error"]
    assert got[0]["reason"] == 'not authorized yet: the first frame must be {"op": "auth", "ticket": "..."}'
    async with ws_connect(notifier, "/api/v1/ws") as ws:
        await ws.send(b"\x00\x01")
        code, got = await closed_with(ws)
    assert code == CLOSE_UNAUTHORIZED and got[0]["reason"].startswith("binary frames are not supported")

    # The single-job socket opens its subscription only once the first frame authorized it.
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}") as ws:
        await pub.epoch(1)
        await silence(ws, 0.3)
        await send(ws, op="auth", ticket=ticket(jobs={job_id: project}))
        hello = await authorized(ws)
        assert RECHECK_S - 1 <= hello["expires_at"] - time.time() <= RECHECK_S
        await expect(ws, "subscribed")
        assert len(await events(ws, 1)) == 1


async def test_header_ticket_is_never_echoed_and_needs_kiln_v1(notifier: str) -> None:
    token = ticket(projects=["p1"])
    async with ws_connect(notifier, "/api/v1/ws", token) as ws:
        assert ws.subprotocol == "kiln.v1"
        await authorized(ws)
    code, error = await refused(notifier, "/api/v1/ws", subprotocols=[f"kiln.ticket.{token}"])
    assert (code, error["reason"]) == (1008, "offer the subprotocol kiln.v1 beside the ticket")


# -- scope -----------------------------------------------------------------------------------------------------------


async def test_job_and_project_outside_the_ticket_are_refused_and_relay_nothing(notifier: str, js) -> None:
    (mine, my_project), (other, other_project) = new_job(), new_job()
    my_pub, other_pub = Publisher(js, mine, my_project), Publisher(js, other, other_project)
    await other_pub.epoch(1)
    async with ws_connect(notifier, "/api/v1/ws", ticket(jobs={mine: my_project}, projects=[my_project])) as ws:
        await authorized(ws)
        await send(ws, op="subscribe", job_id=other)
        assert await expect(ws, "error") == {
            "type": "error", "sub": f"job:{other}",
            "reason": f"job {other} is not covered by this ticket: ask the API for a ticket that names it"}
        await send(ws, op="subscribe", project=other_project)
        error = await expect(ws, "error")
        assert error["sub"] == f"project:{other_project}" and "not covered by this ticket" in error["reason"]
        await send(ws, op="subscribe", job_id=mine)  # the socket stays open
        await expect(ws, "subscribed")
        await send(ws, op="subscribe", project=my_project)
        await expect(ws, "subscribed")
        await other_pub.epoch(2)
        await other_pub.finished()
        mine_sent = await my_pub.epoch(1)
        got = await events(ws, 2)  # once for the job, once for its project
        assert sorted(m["sub"] for m in got) == [f"job:{mine}", f"project:{my_project}"]
        assert set(ids(got)) == {mine_sent.id}
        await silence(ws, 0.5)  # nothing of the other job, live or replayed

    # On the single-job socket a job outside the ticket ends the socket, before anything of it is sent.
    code, error = await refused(notifier, f"/api/v1/ws/jobs/{other}", ticket(jobs={mine: my_project}))
    assert code == CLOSE_UNAUTHORIZED and error["reason"].startswith(f"job {other} is not covered by this ticket")


async def test_a_job_is_read_only_in_the_project_its_ticket_names(notifier: str, js) -> None:
    job_id, project = new_job()
    twin = Publisher(js, job_id, f"{project}-other")  # the same job id in another project
    real = Publisher(js, job_id, project)
    before = [await twin.epoch(1), await real.epoch(1), await twin.logs("not yours")]
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        assert ids(await events(ws, 1)) == [before[1].id]
        await twin.epoch(2)
        await twin.logs("still not yours")
        live = await real.epoch(2)
        assert ids(await events(ws, 1)) == [live.id]
        await silence(ws, 0.5)


# -- renewal ---------------------------------------------------------------------------------------------------------


async def test_renewal_keeps_the_socket_open_past_its_first_deadline(notifier: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
        first = (await authorized(ws))["expires_at"]
        await expect(ws, "subscribed")
        await asyncio.sleep(max(0.0, first - 1 - time.time()))  # a second later: a ticket with a later iat
        await send(ws, op="renew", ticket=ticket(jobs={job_id: project}, private_key=generate_keypair()[0]))
        assert (await expect(ws, "error"))["reason"] == "renewal refused: ticket signature is not valid"
        await send(ws, op="renew", ticket=ticket(jobs={job_id: project}))
        renewed = (await expect(ws, "renewed"))["expires_at"]
        assert renewed > first
        await asyncio.sleep(max(0.0, first + 0.5 - time.time()))
        live = await pub.epoch(1)  # past the first deadline, still relayed
        assert ids(await events(ws, 1)) == [live.id]
        code, got = await closed_with(ws)  # not renewed again: closed at the new deadline
    assert time.time() >= renewed - 0.1
    assert code == CLOSE_UNAUTHORIZED and got == [{"type": "error", "reason": "ticket not renewed in time: reconnect "
                                                                             "with a new ticket and your cursors"}]


async def test_without_renewal_the_socket_is_closed_4401_at_its_deadline(notifier: str) -> None:
    async with ws_connect(notifier, "/api/v1/ws", ticket(projects=["p1"])) as ws:
        deadline = (await authorized(ws))["expires_at"]
        await send(ws, op="subscribe", project="p1")
        await expect(ws, "subscribed")
        code, got = await closed_with(ws)
    assert deadline - 0.1 <= time.time() <= deadline + 2
    assert code == CLOSE_UNAUTHORIZED and got[-1]["reason"].startswith("ticket not renewed in time")


async def test_renewal_that_drops_a_held_subscription_closes_the_socket(notifier: str) -> None:
    (job_a, proj_a), (job_b, proj_b) = new_job(), new_job()
    both = {job_a: proj_a, job_b: proj_b}
    async with ws_connect(notifier, "/api/v1/ws", ticket(jobs=both)) as ws:
        await authorized(ws)
        for job_id in both:
            await send(ws, op="subscribe", job_id=job_id)
            await expect(ws, "subscribed")
        await send(ws, op="renew", ticket=ticket(jobs=both))
        await expect(ws, "renewed")
        await send(ws, op="unsubscribe", job_id=job_b)
        await expect(ws, "unsubscribed")
        await send(ws, op="renew", ticket=ticket(jobs={job_a: proj_a}))  # b is no longer held: fine
        await expect(ws, "renewed")
        await send(ws, op="subscribe", job_id=job_b)  # the renewed ticket governs what comes next
        assert "not covered by this ticket" in (await expect(ws, "error"))["reason"]
        await send(ws, op="renew", ticket=ticket(jobs={job_a: f"{proj_a}-moved"}))  # a, but in another project
        code, got = await closed_with(ws)
    assert code == CLOSE_UNAUTHORIZED
    assert got == [{"type": "error",
                    "reason": f"the renewed ticket no longer covers job:{job_a}: reconnect with a new ticket"}]


async def test_renewal_by_another_user_closes_the_socket(notifier: str) -> None:
    job_id, project = new_job()
    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", ticket(jobs={job_id: project})) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        await send(ws, op="renew", ticket=ticket(jobs={job_id: project}, sub="user-2"))
        code, got = await closed_with(ws)
    assert code == CLOSE_UNAUTHORIZED
    assert got[-1]["reason"] == "the renewed ticket is for another user: reconnect with your own ticket"


# -- Origin ----------------------------------------------------------------------------------------------------------


async def test_origin_must_be_listed_when_auth_is_on(nats_url: str, notifier: str) -> None:
    token = ticket(projects=["p1"])
    with running_notifier(nats_url, allowed_origins="https://kiln.example") as address:
        with pytest.raises(websockets.InvalidStatus) as refused_origin:
            async with ws_connect(address, "/api/v1/ws", token, origin="https://evil.example"):
                pass
        assert refused_origin.value.response.status_code == 403
        async with ws_connect(address, "/api/v1/ws", token, origin="https://kiln.example") as ws:
            await authorized(ws)
        async with ws_connect(address, "/api/v1/ws", token) as ws:  # no Origin: a CLI, guarded by its ticket
            await authorized(ws)
    # An empty list with auth on: no browser origin at all, while a CLI still gets in with its ticket.
    with pytest.raises(websockets.InvalidStatus) as refused_origin:
        async with ws_connect(notifier, "/api/v1/ws", token, origin="http://127.0.0.1:5173"):
            pass
    assert refused_origin.value.response.status_code == 403
    async with ws_connect(notifier, "/api/v1/ws", token) as ws:
        await authorized(ws)


# -- every frame answered --------------------------------------------------------------------------------------------


async def test_binary_frames_and_unknown_ops_are_answered(notifier: str, js) -> None:
    job_id, project = new_job()
    pub = Publisher(js, job_id, project)
    token = ticket(jobs={job_id: project})
    async with ws_connect(notifier, "/api/v1/ws", token) as ws:
        await authorized(ws)
        await ws.send(b'{"op": "subscribe"}')
        assert await expect(ws, "error") == {"type": "error", "reason": "binary frames are not supported; send "
                                                                        "JSON text"}
        await send(ws, op="explode")
        assert (await expect(ws, "error"))["reason"] == "unknown op: expected one of auth, renew, subscribe, unsubscribe"
        await ws.send("{not json")
        assert (await expect(ws, "error"))["reason"].startswith("Invalid JSON")
        await send(ws, op="auth", ticket=token)
        assert (await expect(ws, "error"))["reason"].startswith("already authorized")
        await send(ws, op="subscribe", job_id=job_id)  # still open and working
        await expect(ws, "subscribed")

    async with ws_connect(notifier, f"/api/v1/ws/jobs/{job_id}", token) as ws:
        await authorized(ws)
        await expect(ws, "subscribed")
        await ws.send(b"\x00")
        assert (await expect(ws, "error"))["reason"] == "binary frames are not supported; send JSON text"
        await send(ws, op="subscribe", job_id=job_id)
        assert (await expect(ws, "error"))["reason"] == ("subscribe: this socket watches one job and takes only "
                                                         "renew; use /api/v1/ws")
        await send(ws, op="explode")
        assert (await expect(ws, "error"))["reason"].startswith("unknown op")
        live = await pub.epoch(1)  # answered, not closed
        assert ids(await events(ws, 1)) == [live.id]


@pytest.mark.parametrize(("query", "reason"), [
    ("after_events=abc", "after_events: Input should be a valid integer"),
    ("after_events=-1", "after_events: Input should be greater than or equal to 0"),
    ("after_logs=9223372036854775808", "after_logs: Input should be less than or equal to 9223372036854775807"),
])
async def test_invalid_cursor_is_answered_then_closed_1008(notifier: str, query: str, reason: str) -> None:
    job_id, project = new_job()
    code, error = await refused(notifier, f"/api/v1/ws/jobs/{job_id}?{query}", ticket(jobs={job_id: project}))
    assert code == 1008 and error["reason"].startswith(reason)
