"""Identities minted with a scoped signing key: a trainer attempt (by its runner) and a third-party reader (by the
API).  Their rights come from the key's template, filled in by the server from the user's tags; the tests show what
they can do, what the server refuses, and that expiry and revocation cut them off."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import nats
import pytest
from nats.aio.client import RawCredentials
from nats.js import api as jsa

from kiln_contracts import subjects
from kiln_contracts.natsauth import jwt as nj
from kiln_contracts.natsauth import permissions as perms
from kiln_contracts.natsauth.mint import Minted, mint_third_party, mint_trainer
from kiln_contracts.natsauth.provision import add_third_party, provision
from kiln_contracts.natsauth.server import revoke
from kiln_testing.natsauth import AuthNats, Client, auth_nats, client

EVENTS, LOGS, JOBS = perms.EVENTS, perms.LOGS, perms.JOBS


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory):
    with auth_nats(tmp_path_factory.mktemp("natsauth-scoped"), ("gpu",)) as server:
        async def prepare() -> None:
            prov = await client(server, "provisioner")
            await provision(prov.js, ("gpu",))
            await prov.close()
            api = await client(server, "api")
            for project in ("p1", "p2"):
                await add_third_party(api.js, project, "acme")
            await api.close()
            runner = await client(server, "runner-gpu")  # some history in both projects
            for project in ("p1", "p2"):
                await runner.js.publish(subjects.event(project, "old", "status"), b"{}")
                await runner.js.publish(subjects.log(project, "old"), b"{}")
            await runner.close()

        asyncio.run(prepare())
        yield server


def trainer(server: AuthNats, project: str = "p1", job: str = "j1", ttl: int = 3600) -> Minted:
    seed = server.chain.seed_path("trainer").read_text()  # the runner's only NATS secret besides its own creds
    return mint_trainer(seed, server.chain.account, project, job, int(time.time()) + ttl, attempt=1)


def third_party(server: AuthNats, project: str = "p1", consumer: str = "acme") -> Minted:
    seed = server.chain.seed_path("third-party").read_text()
    return mint_third_party(seed, server.chain.account, project, consumer, int(time.time()) + 86400)


async def connect(server: AuthNats, minted: Minted, label: str, **options: Any) -> Client:
    return await Client(label).connect(server.url, minted.creds, minted.inbox_prefix, **options)


async def refused_connect(server: AuthNats, creds: str) -> str:
    try:
        nc = await nats.connect(server.url, user_credentials=RawCredentials(creds), allow_reconnect=False,
                                max_reconnect_attempts=0, connect_timeout=2)
    except Exception as exc:  # noqa: BLE001 - the server's refusal, whatever nats-py wraps it in
        return repr(exc)
    await nc.close()
    raise AssertionError("the server accepted the connection")


async def test_trainer_publishes_its_events_and_logs_with_acks_through_the_sdk_publisher(bus: AuthNats) -> None:
    from kiln_sdk._acks import AckPublisher

    t = await connect(bus, trainer(bus), "trainer")
    pub = await AckPublisher.open(t.nc)
    batch = await pub.start([(subjects.event("p1", "j1", "metrics"), b"{}", "j1-1-1"),
                             (subjects.event("p1", "j1", "epoch"), b"{}", "j1-1-2"),
                             (subjects.log("p1", "j1"), b"{}", "j1-1-3")])
    assert await batch.settle(timeout=5.0) == [None, None, None]
    ack = await t.js.publish(subjects.event("p1", "j1", "finished"), b"{}", headers={"Nats-Msg-Id": "j1-1-4"})
    assert ack.stream == EVENTS
    assert t.violations() == []
    await t.close()


def _pub(subject: str) -> Callable[[Client], Any]:
    return lambda c: c.js.publish(subject, b"{}")


TRAINER_REFUSED: list[tuple[str, Callable[[Client], Any]]] = [
    ("publish another job's events", _pub(subjects.event("p1", "j2", "finished"))),
    ("publish another project's events", _pub(subjects.event("p2", "j1", "finished"))),
    ("publish another job's logs", _pub(subjects.log("p1", "j2"))),
    ("publish a start command", _pub(subjects.start("gpu"))),
    ("publish a cancel", lambda c: c.nc.publish(subjects.cancel("j2"), b"{}")),
    ("write a claim", lambda c: c.nc.publish("$KV.kiln_claims.j1.2", b"x")),
    ("subscribe to every event", lambda c: c.nc.subscribe(subjects.EVENTS_ALL)),
    ("subscribe to others' inboxes", lambda c: c.nc.subscribe("_INBOX.>")),
    ("read stream info", lambda c: c.js.stream_info(EVENTS)),
    ("delete a stream", lambda c: c.js.delete_stream(EVENTS)),
    ("purge a stream", lambda c: c.js.purge_stream(EVENTS)),
    ("create a consumer", lambda c: c.js.add_consumer(EVENTS, jsa.ConsumerConfig(filter_subject="kiln.evt.p1.>"))),
]


@pytest.mark.parametrize(("what", "call"), TRAINER_REFUSED, ids=[w for w, _ in TRAINER_REFUSED])
async def test_trainer_is_refused(bus: AuthNats, what: str, call: Callable[[Client], Any]) -> None:
    t = await connect(bus, trainer(bus), "trainer")
    assert "permissions violation" in await t.refused(call(t))
    assert not t.nc.is_closed
    await t.close()


async def test_trainer_without_its_inbox_prefix_gets_no_acks(bus: AuthNats) -> None:
    m = trainer(bus)
    t = await Client("trainer").connect(bus.url, m.creds, "_INBOX")
    assert "subscription" in await t.refused(_pub(subjects.event("p1", "j1", "metrics"))(t))
    await t.close()


async def test_a_scoped_key_mints_nothing_but_its_shape(bus: AuthNats) -> None:
    key = nj.Key(bus.chain.seed_path("trainer").read_text().strip())
    user = nj.Key.new("user")
    god = nj.permission_block([">"], [">"])
    forged = nj.encode(nj.user_claims(user.public_key, "evil", issuer_account=bus.chain.account, permissions=god), key)
    assert "Authorization Violation" in await refused_connect(bus, nj.creds_text(forged, user))
    rogue = nj.Key.new("account")  # a signing key the account does not list
    token = nj.encode(nj.user_claims(user.public_key, "rogue", issuer_account=bus.chain.account, permissions=god),
                      rogue)
    assert "Authorization Violation" in await refused_connect(bus, nj.creds_text(token, user))
    tagless = nj.encode(nj.user_claims(user.public_key, "tagless", issuer_account=bus.chain.account), key)
    t = await Client("tagless").connect(bus.url, nj.creds_text(tagless, user), f"_INBOX.{user.public_key}")
    assert "permissions violation" in await t.refused(t.nc.publish(subjects.event("p1", "j1", "status"), b"{}"))
    await t.close()


async def test_trainer_creds_that_expire_mid_connection_are_closed_by_the_server(bus: AuthNats) -> None:
    m = trainer(bus, job="j3", ttl=2)
    t = await connect(bus, m, "trainer", allow_reconnect=False)
    await t.js.publish(subjects.event("p1", "j3", "status"), b"{}")
    assert m.expires_at is not None
    for _ in range(100):
        if t.closed_at is not None:
            break
        await asyncio.sleep(0.05)
    assert t.closed_wall is not None and "expired" in repr(t.nc.last_error).lower()
    closed_after_exp = t.closed_wall - m.expires_at
    print(f"expired creds: connection closed {closed_after_exp:+.2f} s after exp")
    assert closed_after_exp < 2.0  # exp has whole seconds; the server's timer fires within about a second
    while time.time() < m.expires_at + 1:  # the server compares whole seconds: refused once now > exp
        await asyncio.sleep(0.05)
    assert "Authorization Violation" in await refused_connect(bus, m.creds)


async def _drain(c: Client, stream: str, durable: str) -> list[str]:
    subject = subjects.project_events("p1") if stream == EVENTS else perms.pattern(subjects.log, "p1", "*")
    sub = await c.js.pull_subscribe(subject, durable=durable, stream=stream)  # binds (CONSUMER.INFO), never creates
    msgs = await sub.fetch(100, timeout=2)
    for m in msgs:
        await m.ack()
    return [m.subject for m in msgs]


async def test_third_party_reads_its_project_through_its_durables(bus: AuthNats) -> None:
    c = await connect(bus, third_party(bus), "third party")
    durable = perms.third_party_durable("p1", "acme")
    got = await _drain(c, EVENTS, durable) + await _drain(c, LOGS, durable)
    assert got and all(s.split(".")[2] == "p1" for s in got), got
    assert c.violations() == []
    await c.close()


async def _fetch(c: Client, stream: str, durable: str) -> None:
    sub = await c.js.pull_subscribe_bind(durable=durable, stream=stream)
    await sub.fetch(1, timeout=1)


TP_REFUSED: list[tuple[str, Callable[[Client], Any]]] = [
    ("read another project's durable", lambda c: _fetch(c, EVENTS, perms.third_party_durable("p2", "acme"))),
    ("read the writer's durable", lambda c: _fetch(c, EVENTS, "metrics-writer-events")),
    ("create a consumer on another project", lambda c: c.js.add_consumer(EVENTS, jsa.ConsumerConfig(
        name="tp-p1-acme2", durable_name="tp-p1-acme2", filter_subject=subjects.project_events("p2")))),
    ("widen its durable", lambda c: c.js.add_consumer(EVENTS, jsa.ConsumerConfig(
        name="tp-p1-acme", durable_name="tp-p1-acme", filter_subject=subjects.EVENTS_ALL))),
    ("make its durable push to a subject (gotcha 1)", lambda c: c.nc.request(
        f"$JS.API.CONSUMER.CREATE.{EVENTS}.tp-p1-acme.kiln.evt.p1.>", json.dumps({"stream_name": EVENTS, "config": {
            "name": "tp-p1-acme", "filter_subject": "kiln.evt.p1.>",
            "deliver_subject": subjects.cancel("victim")}}).encode(), timeout=1)),
    ("delete its durable", lambda c: c.js.delete_consumer(EVENTS, "tp-p1-acme")),
    ("read stream info", lambda c: c.js.stream_info(EVENTS)),
    ("get a stored message", lambda c: c.js.get_msg(EVENTS, seq=1)),
    ("subscribe to events", lambda c: c.nc.subscribe(subjects.project_events("p1"))),
    ("publish an event", _pub(subjects.event("p1", "j1", "finished"))),
]


@pytest.mark.parametrize(("what", "call"), TP_REFUSED, ids=[w for w, _ in TP_REFUSED])
async def test_third_party_is_refused(bus: AuthNats, what: str, call: Callable[[Client], Any]) -> None:
    c = await connect(bus, third_party(bus), "third party")
    assert "permissions violation" in await c.refused(call(c))
    await c.close()


async def test_revoked_user_is_cut_off_at_once_and_after_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with auth_nats(tmp_path, ("gpu",)) as server:
        prov = await client(server, "provisioner")
        await provision(prov.js, ("gpu",))
        await add_third_party(prov.js, "p1", "acme")
        await prov.close()
        victim, bystander = third_party(server), third_party(server)
        v = await connect(server, victim, "victim", allow_reconnect=False)
        b = await connect(server, bystander, "bystander")
        t0 = time.monotonic()
        assert await revoke(server.chain, victim.public_key, server.url, until=victim.expires_at) == "jwt updated"
        answered = time.monotonic() - t0
        for _ in range(400):
            if v.closed_at is not None:
                break
            await asyncio.sleep(0.005)
        assert v.closed_at is not None, "the revoked connection stayed open"
        print(f"revocation: pushed in {answered * 1000:.1f} ms, live connection closed "
              f"{(v.closed_at - t0) * 1000:.1f} ms after the push started")
        assert v.closed_at - t0 < 1.0
        assert "Authorization Violation" in await refused_connect(server, victim.creds)
        assert b.nc.is_connected and b.violations() == []
        await b.close()
        server.stop()
        server.start()  # the resolver keeps the pushed JWT: it beats the older one in resolver_preload
        assert "Authorization Violation" in await refused_connect(server, victim.creds)
        ok = await connect(server, third_party(server), "after restart")
        await ok.close()
