"""Every service identity does its real work with its generated creds, and the server refuses what it must not do.

One nats-server in operator mode (full resolver, the generated config) for the module, provisioned by the
provisioner identity.  Where a service's own class is cheap to drive it is used as is (the API's Bus, the writer's
BatchConsumer, the forwarder's PullConsumer and TaskMap, the runner's Lease and Reaper, FastStream's pull
subscriber, the notifier's unsubscribe); otherwise the test makes the same nats-py calls as the service.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from nats.js import api as jsa

from kiln_contracts import (
    AuditAction, AuditRecorded, Event, JobSpec, JobStatus, JobStatusChanged, LogBatch, LogLine, StartJob, streams,
    subjects, utcnow,
)
from kiln_contracts.natsauth import permissions as perms
from kiln_contracts.natsauth.provision import add_third_party, missing_streams, provision, remove_third_party
from kiln_testing.natsauth import AuthNats, Client, auth_nats, client

POOLS = ("gpu", "cpu")
JOBS, EVENTS, LOGS = perms.JOBS, perms.EVENTS, perms.LOGS


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory):
    with auth_nats(tmp_path_factory.mktemp("natsauth"), POOLS) as server:
        async def prepare() -> None:
            prov = await client(server, "provisioner")
            await provision(prov.js, POOLS)
            await add_third_party(prov.js, "p9", "canary")  # a durable the known-gap test may damage
            assert prov.violations() == []
            await prov.close()

        asyncio.run(prepare())
        yield server


def _event(project: str, job: str, data: Any, source: str = "runner") -> Event:
    return Event(id=uuid.uuid4().hex, time=utcnow(), job_id=job, project=project, attempt=1, source=source, seq=1,
                 data=data)


def _start(job: str, pool: str, project: str = "p1") -> StartJob:
    return StartJob(job_id=job, spec=JobSpec(project=project, pool=pool, model="yolov8n.yaml", dataset="/data",
                                             max_attempts=3))


async def _publish(server: AuthNats, role: str, *events: Event) -> None:
    c = await client(server, role)
    for ev in events:
        await c.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
    assert c.violations() == []
    await c.close()


async def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_every_service_sees_its_streams_with_stream_info_only(bus: AuthNats) -> None:
    for role in perms.service_roles(POOLS)[1:]:
        c = await client(bus, role.name)
        assert await missing_streams(c.js, role.streams) == [], role.name
        assert c.violations() == [], role.name
        await c.close()


async def test_api_publishes_commands_events_audit_cancel_marks_and_makes_third_party_durables(bus: AuthNats) -> None:
    from kiln_api.adapters.bus import Bus

    c = await client(bus, "api")
    b = Bus(c.nc, await c.js.key_value(streams.CLAIMS_BUCKET))
    await b.publish_start(_start("api1", "cpu"))
    await b.publish_audit(AuditRecorded(id=uuid.uuid4().hex, actor="u1", action=AuditAction.job_started,
                                        project="p1", target="job:api1"))
    await b.request_cancel("api1", "p1", 1, "stopped by ada", queued=True)
    made = await add_third_party(c.js, "p1", "acme")
    await remove_third_party(c.js, "p1", "acme")
    await c.nc.flush()
    assert c.violations() == []
    assert [d.config.filter_subject for d in made] == [subjects.project_events("p1"), "kiln.log.p1.*"]
    await c.close()


async def test_runner_takes_its_pool_claims_registers_reaps_and_hears_cancels(bus: AuthNats) -> None:
    from faststream.middlewares import AckPolicy
    from faststream.nats import JStream, NatsBroker, NatsCredentials, NatsMessage, PullSub
    from kiln_api.adapters.bus import Bus
    from kiln_runner.reaper import Lease, Reaper

    a = await client(bus, "api")
    api_bus = Bus(a.nc, await a.js.key_value(streams.CLAIMS_BUCKET))
    r = await client(bus, "runner-gpu")
    js = r.js
    # main.py: update its durable (pinned filter), open the buckets, listen to cancels
    consumer = streams.runner_consumer("gpu", max_ack_pending=1000, ack_wait=60.0)
    await js.add_consumer(JOBS, consumer)
    claims, running, leases = [await js.key_value(b) for b in (streams.CLAIMS_BUCKET, streams.RUNNING_BUCKET,
                                                                streams.LEASES_BUCKET)]
    cancels: list[str] = []

    async def on_cancel(msg: Any) -> None:
        cancels.append(msg.subject)

    await r.nc.subscribe(subjects.CANCEL_ALL, cb=on_cancel)

    # FastStream's pull subscriber on the durable, as main.py declares it, on its own connection
    broker_errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        broker_errors.append(str(exc))

    broker = NatsBroker(bus.url, security=NatsCredentials(bus.creds("runner-gpu")),
                        inbox_prefix=bus.inboxes["runner-gpu"], error_cb=on_error)
    taken: list[StartJob] = []

    # FastStream's pull subscriber does not take the connection's inbox prefix: it needs its own (with the dot)
    @broker.subscriber(subjects.start("gpu"), stream=JStream(JOBS, declare=False), durable=consumer.durable_name,
                       pull_sub=PullSub(batch_size=1, timeout=1.0), ack_policy=AckPolicy.MANUAL,
                       decoder=lambda msg: msg.body, inbox_prefix=(bus.inboxes["runner-gpu"] + ".").encode())
    async def on_start(msg: NatsMessage) -> None:
        taken.append(StartJob.model_validate_json(msg.raw_message.data))
        await msg.ack()

    await api_bus.publish_start(_start("run1", "gpu"))
    await broker.start()
    try:
        await _until(lambda: [c.job_id for c in taken] == ["run1"])
    finally:
        await broker.stop()
    assert broker_errors == []

    # claim, read the cancel mark, register the attempt, beat, hand back
    await claims.create("run1.1", b"runner-a")
    await api_bus.request_cancel("run1", "p1", 1, "stop", queued=False)
    assert (await claims.get("run1.cancel")).value == b"stop"
    rec = {"cmd": _start("run1", "cpu").model_dump(mode="json"), "runner": "runner-b"}
    rev = await running.create("run1.1", json.dumps(rec).encode())
    rev = await running.update("run1.1", json.dumps(rec).encode(), last=rev)
    assert (await running.get("run1.1")).revision == rev
    await js.publish(subjects.event("p1", "run1", "status"), b"{}")
    await js.publish(subjects.log("p1", "run1"), b"{}")

    # the reaper: lease, then a silent attempt is retried on its own pool (here another one)
    assert await Lease(leases, "reaper", "runner-a", 10.0).hold()
    reaper = Reaper(js, running, leases, "runner-a", lost_after_s=0.0)
    await reaper.scan()
    assert await reaper.scan() == ["run1.1"]

    # a start command it cannot handle: nak with a delay, then dead-letter and terminate it
    from kiln_contracts.service import dead_letter

    await a.nc.publish(subjects.start("gpu"), b"not a command")  # core publish still lands in the work queue
    psub = await js.pull_subscribe(subjects.start("gpu"), durable=consumer.durable_name, stream=JOBS)
    (msg,) = await psub.fetch(1, timeout=5)
    await msg.nak(delay=0.1)
    (msg,) = await psub.fetch(1, timeout=5)
    await dead_letter(r.nc, consumer.durable_name or "", msg, "invalid start command")
    await claims.delete("run1.1")
    await r.nc.flush()
    await _until(lambda: cancels == [subjects.cancel("run1")])
    assert r.violations() == [] and a.violations() == []
    await r.close()
    await a.close()


async def test_metrics_writer_consumes_both_durables_and_dead_letters(bus: AuthNats) -> None:
    from kiln_metrics_writer.consumer import BatchConsumer

    good = _event("p1", "w1", JobStatusChanged(status=JobStatus.running))
    logs = _event("p1", "w1", LogBatch(lines=[LogLine(text="hello")]))
    await _publish(bus, "runner-gpu", good, logs)
    runner = await client(bus, "runner-gpu")
    await runner.js.publish(subjects.event("p1", "w1", "status"), b"poison")
    await runner.close()

    c = await client(bus, "metrics-writer")
    written: list[Any] = []

    async def write(batch: list[Any]) -> int:
        written.extend(batch)
        return len(batch)

    consumers = [BatchConsumer(c.nc, d, write, batch_size=50, batch_ms=5) for d in streams.writer_consumers()]
    tasks = [asyncio.create_task(x.run()) for x in consumers]
    dead: list[Any] = []
    try:
        await _until(lambda: {good.id, logs.id} <= {d.id for d in written})
        prov = await client(bus, "provisioner")  # the writer itself may not read the dead letters
        for _ in range(100):
            try:
                dead.append(await prov.js.get_last_msg(perms.DLQ, subjects.dlq("metrics-writer-events")))
                break
            except Exception:  # noqa: BLE001 - not there yet
                await asyncio.sleep(0.05)
        await prov.close()
    finally:
        for x in consumers:
            x.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert dead and dead[0].data == b"poison"
    assert c.violations() == []
    await c.close()


async def test_clearml_forwarder_fetches_acks_and_keeps_its_task_map(bus: AuthNats) -> None:
    from kiln_clearml_forwarder.adapters.task_map import TaskMap
    from kiln_clearml_forwarder.consumer import PullConsumer

    ev = _event("p1", "f1", JobStatusChanged(status=JobStatus.running))
    await _publish(bus, "runner-gpu", ev)
    c = await client(bus, "clearml-forwarder")
    task_map = await TaskMap.open(c.js, perms.CLEARML_TASKS_BUCKET)
    await task_map.put("f1", {"task_id": "t1", "project": "p1"})
    assert (await task_map.get("f1") or {})["task_id"] == "t1"
    seen: list[str] = []

    async def submit(msg: Any, event: Event) -> None:
        seen.append(event.id)
        await msg.ack()

    consumers = [PullConsumer(c.nc, d, submit, batch=100, fetch_ms=100) for d in streams.forwarder_consumers()]
    tasks = [asyncio.create_task(x.run()) for x in consumers]
    try:
        await _until(lambda: ev.id in seen)
    finally:
        for x in consumers:
            x.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert c.violations() == []
    await c.close()


async def test_notifier_replays_and_follows_with_ordered_consumers(bus: AuthNats) -> None:
    from kiln_notifier.adapters.consumers import NamedConsumers
    from kiln_notifier.adapters.jetstream import _unsubscribe_all, consumer_config

    first = _event("p1", "n1", JobStatusChanged(status=JobStatus.queued), source="api")
    await _publish(bus, "runner-gpu", first)
    c = await client(bus, "notifier")
    js = NamedConsumers(c.nc, timeout=2.0)  # as the notifier does: the unnamed create form is refused to it
    got: list[str] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.subject)

    high = (await js.stream_info(EVENTS)).state.last_seq
    last = (await js.get_last_msg(EVENTS, first.subject)).seq
    replay = await js.subscribe(subjects.job_events("n1", "p1"), stream=EVENTS, cb=on_msg, ordered_consumer=True,
                                config=consumer_config(last - 1), idle_heartbeat=1.0)
    live = await js.subscribe(subjects.job_logs("n1", "p1"), stream=LOGS, cb=on_msg, ordered_consumer=True,
                              config=consumer_config(None, live_only=True), idle_heartbeat=1.0)
    await _publish(bus, "runner-gpu", _event("p1", "n1", LogBatch(lines=[LogLine(text="x")])))
    await _until(lambda: got == [first.subject, subjects.log("p1", "n1")])
    await _unsubscribe_all([replay, live], js)  # also deletes the consumers
    assert high >= last
    assert c.violations() == []
    await c.close()


async def _fetch_from(c: Client, stream: str, durable: str) -> None:
    sub = await c.js.pull_subscribe_bind(durable=durable, stream=stream)
    await sub.fetch(1, timeout=1)


def _js(method: str, *args: Any, **kwargs: Any) -> Callable[[Client], Any]:
    return lambda c: getattr(c.js, method)(*args, **kwargs)


def _pub(subject: str) -> Callable[[Client], Any]:
    return lambda c: c.js.publish(subject, b"{}")


def _kv_put(bucket: str, key: str) -> Callable[[Client], Any]:
    async def put(c: Client) -> None:
        await c.nc.publish(f"$KV.{bucket}.{key}", b"x")
    return put


REFUSED: list[tuple[str, str, Callable[[Client], Any]]] = [
    ("api", "write a claim", _kv_put(streams.CLAIMS_BUCKET, "api1.1")),
    ("api", "publish a log batch", _pub(subjects.log("p1", "j1"))),
    ("api", "delete a stream", _js("delete_stream", EVENTS)),
    ("api", "purge the work queue", _js("purge_stream", JOBS)),
    ("api", "read a stored event", _js("get_msg", EVENTS, seq=1)),
    ("api", "delete the writer's durable", _js("delete_consumer", EVENTS, "metrics-writer-events")),
    ("api", "subscribe to every event", lambda c: c.nc.subscribe(subjects.EVENTS_ALL)),
    ("runner-gpu", "fetch from another pool's durable", lambda c: _fetch_from(c, JOBS, "runner-cpu")),
    ("runner-gpu", "create a consumer outside its filter",
     _js("add_consumer", JOBS, streams.runner_consumer("cpu"))),
    ("runner-gpu", "widen its own durable's filter", _js("add_consumer", JOBS, jsa.ConsumerConfig(
        name="runner-gpu", durable_name="runner-gpu", filter_subject=subjects.START_ALL))),
    ("runner-gpu", "delete a stream", _js("delete_stream", JOBS)),
    ("runner-gpu", "purge a stream", _js("purge_stream", EVENTS)),
    ("runner-gpu", "publish an audit record", _pub(subjects.audit("p1", "job_started"))),
    ("runner-gpu", "subscribe to every event", lambda c: c.nc.subscribe(subjects.EVENTS_ALL)),
    ("runner-gpu", "read another inbox", lambda c: c.nc.subscribe("_INBOX.api.>")),
    ("metrics-writer", "publish an event", _pub(subjects.event("p1", "j1", "status"))),
    ("metrics-writer", "publish a start command", _pub(subjects.start("gpu"))),
    ("metrics-writer", "delete a stream", _js("delete_stream", EVENTS)),
    ("metrics-writer", "fetch from the runners' durable", lambda c: _fetch_from(c, JOBS, "runner-gpu")),
    ("metrics-writer", "create a durable of another name", _js("add_consumer", EVENTS, jsa.ConsumerConfig(
        name="metrics-writer-x", durable_name="metrics-writer-x", filter_subject=subjects.EVENTS_ALL))),
    ("metrics-writer", "create its durable on the work queue", _js("add_consumer", JOBS, jsa.ConsumerConfig(
        name="metrics-writer-events", durable_name="metrics-writer-events", filter_subject=subjects.START_ALL))),
    ("metrics-writer", "read the claims", _js("get_msg", "KV_" + streams.CLAIMS_BUCKET, seq=1)),
    ("clearml-forwarder", "publish an event", _pub(subjects.event("p1", "j1", "status"))),
    ("clearml-forwarder", "write a claim", _kv_put(streams.CLAIMS_BUCKET, "j1.1")),
    ("clearml-forwarder", "purge a stream", _js("purge_stream", LOGS)),
    ("clearml-forwarder", "fetch from the writer's durable",
     lambda c: _fetch_from(c, EVENTS, "metrics-writer-events")),
    ("notifier", "publish an event", _pub(subjects.event("p1", "j1", "status"))),
    ("notifier", "delete a stream", _js("delete_stream", EVENTS)),
    ("notifier", "delete the writer's durable", _js("delete_consumer", EVENTS, "metrics-writer-events")),
    ("notifier", "fetch from the writer's durable", lambda c: _fetch_from(c, EVENTS, "metrics-writer-events")),
    ("notifier", "create a consumer on the work queue", _js("add_consumer", JOBS, jsa.ConsumerConfig(
        name="mine", durable_name="mine", filter_subject=subjects.START_ALL))),
    ("notifier", "create a consumer by the unnamed form", _js("add_consumer", EVENTS, jsa.ConsumerConfig(
        filter_subject=subjects.EVENTS_ALL, deliver_subject="_INBOX.notifier.x"))),
    ("notifier", "publish a cancel", lambda c: c.nc.publish(subjects.cancel("j1"), b"{}")),
]


@pytest.mark.parametrize(("role", "what", "call"), REFUSED, ids=[f"{r}: {w}" for r, w, _ in REFUSED])
async def test_the_server_refuses(bus: AuthNats, role: str, what: str, call: Callable[[Client], Any]) -> None:
    c = await client(bus, role)
    violation = await c.refused(call(c))
    assert "permissions violation" in violation
    assert not c.nc.is_closed  # a refusal does not cost the connection
    await c.close()


async def test_the_notifier_cannot_rewrite_a_consumer_by_name(bus: AuthNats) -> None:
    """nats-py's unnamed create form (``$JS.API.CONSUMER.CREATE.<stream>``, the name only in the body) would let the
    notifier rewrite any consumer of the stream: it is refused, and so is the named form on a service durable."""
    c = await client(bus, "notifier")
    body = {"stream_name": EVENTS, "config": {"name": "tp-p9-canary", "ack_policy": "explicit",
                                              "filter_subject": "kiln.evt.p8.>"}}
    assert "permissions violation" in await c.refused(
        c.nc.request(f"$JS.API.CONSUMER.CREATE.{EVENTS}", json.dumps(body).encode(), timeout=2))
    writer = {"stream_name": EVENTS, "config": {"name": "metrics-writer-events", "durable_name": "metrics-writer-events",
                                                "ack_policy": "explicit", "filter_subject": "kiln.evt.>"}}
    assert "permissions violation" in await c.refused(c.nc.request(
        f"$JS.API.CONSUMER.CREATE.{EVENTS}.metrics-writer-events.kiln.evt.>", json.dumps(writer).encode(), timeout=2))
    await c.close()
