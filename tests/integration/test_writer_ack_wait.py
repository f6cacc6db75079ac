"""The writer's ack wait: short, so that what a killed writer held comes back soon; in-progress acks while a commit
is slow or retried, so that a short ack wait never makes JetStream redeliver what a live writer still holds.

Real nats-server, real SQLite and PostgreSQL; the kill test runs the writer as a real process (SIGKILL)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone

import nats
from sqlalchemy import func, select

from kiln_contracts import streams
from kiln_metrics_writer.main import run
from kiln_metrics_writer.settings import Settings
from kiln_store import make_engine, metric_events, upgrade
from kiln_testing.writer import DbLock, WriterProc, consumer_state, drained, wait_for

OLD_ACK_WAIT_S = 30.0


def payloads(n: int, job: str = "job1") -> list[tuple[str, bytes, str]]:
    """MetricsLogged events of one point each, as (subject, payload, event id)."""
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    run_id = uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        eid = f"{run_id}-{i}"
        body = {"v": 1, "id": eid, "time": now, "job_id": job, "project": "p", "attempt": 1, "source": "trainer",
                "seq": i + 1, "data": {"kind": "metrics", "step": i, "metrics": {"loss": 1.0 / (i + 1)}}}
        out.append((f"kiln.evt.p.{job}.metrics", json.dumps(body).encode(), eid))
    return out


async def publish(nc, items) -> None:  # type: ignore[no-untyped-def]
    for subject, data, eid in items:
        await nc.publish(subject, data, headers={"Nats-Msg-Id": eid})
    await nc.flush()


async def stored(db_url: str) -> tuple[int, int]:
    """(rows, distinct event ids) in metric_events."""
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(func.count(), func.count(func.distinct(metric_events.c.event_id)))
                                      .select_from(metric_events))).one()
        return int(row[0]), int(row[1])
    finally:
        await engine.dispose()


async def _holds(js, n: int) -> bool:  # type: ignore[no-untyped-def]
    """The writer has been delivered all ``n`` events and acked none (its commit waits on the lock)."""
    info = await consumer_state(js)
    return info.num_pending == 0 and info.num_ack_pending == n


async def test_an_existing_durable_gets_the_new_ack_wait(nats_server, tmp_path):
    """Durables created by an older writer (30 s) are updated in place when the writer starts."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    wanted = streams.writer_consumers()
    for d in wanted:  # as the previous version created them
        await js.add_consumer(d.stream, replace(d.config, ack_wait=OLD_ACK_WAIT_S))
    assert (await js.consumer_info(wanted[0].stream, wanted[0].config.durable_name)).config.ack_wait == OLD_ACK_WAIT_S
    stop = asyncio.Event()
    db = f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"
    task = asyncio.create_task(run(Settings(nats_url=nats_server.url, database_url=db), stop))
    try:
        async def updated() -> bool:
            infos = [await js.consumer_info(d.stream, d.config.durable_name) for d in wanted]
            return all(i.config.ack_wait == 5.0 for i in infos)

        await wait_for(updated, 20, "both durables to have the 5 s ack wait")
        assert Settings().ack_wait_s is None  # the durable's own value (kiln_contracts.streams) unless overridden
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()


async def test_a_commit_slower_than_the_ack_wait_gets_nothing_redelivered(nats_server, db_url):
    """The database keeps the writer's commit waiting for three ack waits: in-progress acks keep every held event
    the writer's own, so JetStream redelivers none (before: each was redelivered every ack wait)."""
    n, ack_wait = 300, 1.5
    engine = make_engine(db_url)
    await upgrade(engine)
    await engine.dispose()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    stop = asyncio.Event()
    task = asyncio.create_task(run(Settings(nats_url=nats_server.url, database_url=db_url, batch_ms=20,
                                            ack_wait_s=ack_wait), stop))
    lock = DbLock(db_url)
    try:
        await wait_for(lambda: _exists(js), 20, "the writer's durable")
        await lock.acquire()
        await publish(nc, payloads(n))
        await wait_for(lambda: _holds(js, n), 15, "the writer to hold every event")
        await asyncio.sleep(3 * ack_wait)
        assert (await consumer_state(js)).num_redelivered == 0
        await lock.release()
        await wait_for(lambda: drained(js), 20, "the writer to commit and ack")
        info = await consumer_state(js)
        assert (info.num_redelivered, info.delivered.consumer_seq) == (0, n), "events were delivered more than once"
        assert await stored(db_url) == (n, n)
        assert (await js.stream_info("KILN_DLQ")).state.messages == 0
    finally:
        await lock.release()
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()


async def test_what_a_killed_writer_held_is_in_sql_soon_after_its_restart(nats_server, db_url, tmp_path):
    """SIGKILL while the writer holds un-acked events (its commit waits on a lock); a new writer process starts at
    once.  With the old 30 s ack wait the events came back only after those 30 s; now after at most 5 s."""
    n = 2000
    engine = make_engine(db_url)
    await upgrade(engine)
    await engine.dispose()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    log = tmp_path / "writer.log"
    first = WriterProc(nats_server.url, db_url, log, batch_ms=20).start()
    lock = None
    try:
        await first.ready()
        lock = await DbLock(db_url).acquire()
        await publish(nc, payloads(n))
        await wait_for(lambda: _holds(js, n), 15, "the writer to hold every event")
        await asyncio.sleep(1)  # held a while, as a writer killed mid-commit would have
        first.kill()
        t_kill = time.monotonic()
        await lock.release()
        second = WriterProc(nats_server.url, db_url, log, batch_ms=20).start()
        try:
            await wait_for(lambda: _all_stored(db_url, n), 20, "the held events in SQL", every=0.1)
            caught_up = time.monotonic() - t_kill
        finally:
            await second.stop()
        assert await stored(db_url) == (n, n)
        # at most the 5 s ack wait (less the time since the last in-progress ack) plus the new process's start
        assert caught_up < 12, f"caught up {caught_up:.1f}s after the kill"
    finally:
        if lock:
            await lock.release()
        first.kill()
        await nc.close()


async def test_a_writer_stopped_cleanly_hands_back_what_it_held_at_once(nats_server, db_url):
    """SIGTERM (here: the stop event) while the writer holds events it has not committed: it gives them back with
    negative acks, so the next writer has them at once, not after the ack wait (30 s here, to tell them apart)."""
    n = 300
    engine = make_engine(db_url)
    await upgrade(engine)
    await engine.dispose()
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    settings = Settings(nats_url=nats_server.url, database_url=db_url, batch_ms=20, ack_wait_s=OLD_ACK_WAIT_S)
    stop = asyncio.Event()
    first = asyncio.create_task(run(settings, stop))
    lock = DbLock(db_url)
    second = None
    stop2 = asyncio.Event()
    try:
        await wait_for(lambda: _exists(js), 20, "the writer's durable")
        await lock.acquire()
        await publish(nc, payloads(n))
        await wait_for(lambda: _holds(js, n), 15, "the writer to hold every event")
        stop.set()
        await asyncio.wait_for(first, 15)
        t_stop = time.monotonic()
        await lock.release()
        second = asyncio.create_task(run(settings, stop2))
        await wait_for(lambda: _all_stored(db_url, n), 10, "the events in SQL")
        assert time.monotonic() - t_stop < 10
        assert await stored(db_url) == (n, n)
    finally:
        await lock.release()
        stop.set()
        stop2.set()
        await asyncio.gather(first, *([second] if second else []), return_exceptions=True)
        await nc.close()


async def _exists(js) -> bool:  # type: ignore[no-untyped-def]
    try:
        await consumer_state(js)
    except Exception:  # noqa: BLE001 - not created yet
        return False
    return True


async def _all_stored(db_url: str, n: int) -> bool:
    return (await stored(db_url))[0] >= n
