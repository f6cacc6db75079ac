"""Each service on its own NATS identity, service by service: what the end-to-end job does not show.

A nats-server in operator mode with the generated configuration (``kiln_testing.natsauth``).  The writer and the
runner refuse to start on a bus nobody provisioned, naming the step; the notifier creates its ordered consumers by
name (also when one recreates itself), which its pinned rights allow, while rewriting a service durable is refused
in either create form; the ClearML forwarder runs on its own creds, task map included.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from nats.js import api as jsa

from kiln_contracts import Event, EpochCompleted, JobStatus, JobStatusChanged, subjects
from kiln_contracts.natsauth import permissions as perms
from kiln_contracts.natsauth.provision import provision
from kiln_testing.clearml_stub import drained, job_events, task_record
from kiln_testing.natsauth import OBSERVER, AuthNats, add_observer, auth_nats, client
from kiln_testing.notifier import authorized, events, expect, running_notifier, ticket, ws_connect
from kiln_testing.runners import RunnerProc
from kiln_testing.writer import WriterProc

EVENTS = perms.EVENTS


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory):
    with auth_nats(tmp_path_factory.mktemp("credsvc")) as server:
        add_observer(server)

        async def prepare() -> None:
            prov = await client(server, "provisioner")
            await provision(prov.js)
            await prov.close()

        asyncio.run(prepare())
        yield server


def _event(job: str, project: str, seq: int, data: Any) -> Event:
    return Event.new(job_id=job, project=project, attempt=1, seq=seq, source="runner", data=data)


async def _exited(proc: Any, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "still running"
        await asyncio.sleep(0.05)
    return int(proc.returncode)


async def test_writer_and_runner_wait_for_the_provisioned_streams_then_name_the_step(tmp_path: Path) -> None:
    with auth_nats(tmp_path / "bare") as server:  # nobody provisioned it
        writer = WriterProc(server.url, f"sqlite+aiosqlite:///{tmp_path / 'kiln.db'}", tmp_path / "writer.log",
                            nats_creds_file=server.creds("metrics-writer"), streams_wait_s=1).start()
        runner = RunnerProc(server.url, tmp_path / "runners", "r0", tmp_path / "fake.log", streams_wait_s=1,
                            nats_creds_file=server.creds("runner-default"))
        try:
            assert await _exited(writer.proc) != 0
            assert await _exited(runner.proc) != 0
        finally:
            writer.kill()
            runner.kill()
            runner.proc.wait()
    for log, missing in ((writer.log, "KILN_EVENTS, KILN_LOGS"),
                         (runner.log_path, "KILN_JOBS, KILN_EVENTS, KILN_LOGS, KV_kiln_claims")):
        text = log.read_text()
        assert f"NATS streams missing: {missing}" in text and "provisioning step" in text, text[-2000:]


async def test_notifier_creates_its_consumers_by_name_and_cannot_rewrite_a_durable(bus: AuthNats) -> None:
    job, project = f"job-{uuid.uuid4().hex[:8]}", "notif"
    observer = await client(bus, OBSERVER)
    runner = await client(bus, "runner-default")
    with running_notifier(bus.url, nats_creds_file=bus.creds("notifier")) as address:
        async with ws_connect(address, f"/api/v1/ws/jobs/{job}", ticket(jobs={job: project})) as ws:
            await authorized(ws)
            await expect(ws, "subscribed")
            sent = _event(job, project, 1, JobStatusChanged(status=JobStatus.running))
            await runner.js.publish(sent.subject, sent.to_bytes(), headers=sent.headers())
            assert [m["event"]["id"] for m in await events(ws, 1)] == [sent.id]
            names = [c.name async for c in _consumers(observer, EVENTS)]
            assert any(n.startswith("notifier-") for n in names), names
        for _ in range(100):  # the last client left: its consumers are deleted by name
            if not [c.name async for c in _consumers(observer, EVENTS) if c.name.startswith("notifier-")]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the notifier's consumers outlived its clients")

    notifier = await client(bus, "notifier")
    rewrite = jsa.ConsumerConfig(name="metrics-writer-events", durable_name="metrics-writer-events",
                                 filter_subject="kiln.evt.p8.>", ack_policy=jsa.AckPolicy.EXPLICIT)
    assert "permissions violation" in await notifier.refused(notifier.js.add_consumer(EVENTS, rewrite))
    body = {"stream_name": EVENTS, "config": {"name": "metrics-writer-events", "ack_policy": "explicit",
                                              "filter_subject": "kiln.evt.p8.>"}}
    unnamed = notifier.nc.request(f"$JS.API.CONSUMER.CREATE.{EVENTS}", json.dumps(body).encode(), timeout=2)
    assert "permissions violation" in await notifier.refused(unnamed)
    info = await observer.js.consumer_info(EVENTS, "metrics-writer-events")
    assert info.config.filter_subject == subjects.EVENTS_ALL
    await notifier.close()
    await runner.close()
    await observer.close()


async def test_a_recreated_ordered_consumer_gets_a_new_name(bus: AuthNats) -> None:
    from kiln_notifier.adapters.consumers import NamedConsumers
    from kiln_notifier.adapters.jetstream import _unsubscribe_all, consumer_config

    job, project = f"job-{uuid.uuid4().hex[:8]}", "notif"
    notifier = await client(bus, "notifier")
    runner = await client(bus, "runner-default")
    js = NamedConsumers(notifier.nc)
    got: list[str] = []

    async def on_msg(msg: Any) -> None:
        got.append(Event.model_validate_json(msg.data).id)

    sub = await js.subscribe(subjects.job_events(job, project), stream=EVENTS, cb=on_msg, ordered_consumer=True,
                             config=consumer_config(None), idle_heartbeat=1.0)
    first = sub._consumer
    sent = [_event(job, project, i, EpochCompleted(epoch=i, epochs=2, metrics={})) for i in (1, 2)]
    await runner.js.publish(sent[0].subject, sent[0].to_bytes(), headers=sent[0].headers())
    await _until(lambda: got == [sent[0].id])
    await sub._sub._jsi.reset_ordered_consumer(sub._sub._jsi._sseq + 1)  # what a gap or missed heartbeats do
    await _until(lambda: sub._consumer != first)
    await runner.js.publish(sent[1].subject, sent[1].to_bytes(), headers=sent[1].headers())
    await _until(lambda: got == [e.id for e in sent])
    assert first.startswith("notifier-") and sub._consumer.startswith("notifier-")
    await _unsubscribe_all([sub], js)
    assert notifier.violations() == []
    await notifier.close()
    await runner.close()


class Recorder:
    """A ClearML port that records what the forwarder asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def open_task(self, job_id: str, project: str, name: str, tags: list[str], task_id: str | None) -> str:
        self.calls.append(("open", job_id))
        return task_id or f"task-{job_id}"

    def set_status(self, task_id: str, status: str, reason: str) -> None:
        self.calls.append(("status", task_id, status))

    def __getattr__(self, name: str) -> Any:  # connect_params, report_scalars, report_console, upload, release
        return lambda task_id, *args: self.calls.append((name, task_id))


async def test_clearml_forwarder_runs_on_its_own_identity(bus: AuthNats, tmp_path: Path) -> None:
    from kiln_clearml_forwarder.main import run
    from kiln_clearml_forwarder.settings import Settings

    job = f"job-{uuid.uuid4().hex[:8]}"
    model = tmp_path / "best.pt"
    model.write_bytes(b"weights")
    runner = await client(bus, "runner-default")
    observer = await client(bus, OBSERVER)
    port = Recorder()
    settings = Settings(enabled=True, nats_url=bus.url, nats_creds_file=bus.creds("clearml-forwarder"),
                        fetch_ms=50, linger_s=0.3, backoff_initial_s=0.1)
    stop = asyncio.Event()
    forwarder = asyncio.create_task(run(settings, stop, clearml=port))
    try:
        for ev in job_events(job, model):
            await runner.js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
        await _until(lambda: ("status", f"task-{job}", "completed") in port.calls, timeout=20)
        for _ in range(100):
            if (rec := await task_record(observer.js, job)) and await drained(observer.js):
                break
            await asyncio.sleep(0.1)
        assert rec and rec["task_id"] == f"task-{job}"
    finally:
        stop.set()
        await asyncio.wait_for(forwarder, 15)
    assert runner.violations() == []
    await runner.close()
    await observer.close()


async def _consumers(c: Any, stream: str) -> Any:
    for info in await c.js.consumers_info(stream):
        yield info


async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
