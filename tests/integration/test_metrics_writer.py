"""metrics-writer against real NATS JetStream and real SQLite/PostgreSQL."""

import asyncio

import nats
from sqlalchemy import func, select

from kiln_contracts import (
    EpochCompleted, Event, JobFinished, JobStatus, JobStatusChanged, LogBatch, LogLine, MetricsLogged, streams,
)
from kiln_metrics_writer.main import run
from kiln_metrics_writer.settings import Settings
from kiln_store import job_status, logs, make_engine, metric_events, status_events, upgrade
from kiln_store.queries import get_metrics


async def _count(engine, table, **where):
    async with engine.connect() as conn:
        stmt = select(func.count()).select_from(table)
        for k, v in where.items():
            stmt = stmt.where(table.c[k] == v)
        return (await conn.execute(stmt)).scalar_one()


async def _wait_for(pred, timeout=15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await pred():
            return True
        await asyncio.sleep(0.05)
    return False


async def test_redelivered_and_republished_events_do_not_duplicate_rows(nats_server, db_url):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    engine = make_engine(db_url)
    await upgrade(engine)
    stop = asyncio.Event()
    task = asyncio.create_task(run(Settings(nats_url=nats_server.url, database_url=db_url, batch_ms=20), stop))
    events = [
        Event.new(job_id="job1", project="p", attempt=1, seq=1, source="runner",
                  data=JobStatusChanged(status=JobStatus.running)),
        *[Event.new(job_id="job1", project="p", attempt=1, seq=i + 2, source="trainer",
                    data=EpochCompleted(epoch=i + 1, epochs=3, metrics={f"k{k}": k / (i + 1) for k in range(30)}))
          for i in range(3)],
        Event.new(job_id="job1", project="p", attempt=1, seq=5, source="runner",
                  data=LogBatch(lines=[LogLine(text="a"), LogLine(text="b")])),
        Event.new(job_id="job1", project="p", attempt=1, seq=6, source="runner",
                  data=JobFinished(status=JobStatus.completed)),
    ]
    # Each event is stored twice in the stream (different Nats-Msg-Id: as a redelivery past the duplicate
    # window or a replayed spool would be), so the writer sees every event twice.
    for copy in range(2):
        for ev in events:
            await js.publish(ev.subject, ev.to_bytes(), headers={"Nats-Msg-Id": f"{ev.id}-{copy}"})
    try:
        assert await _wait_for(lambda: _drained(js))
        assert await _count(engine, metric_events, job_id="job1") == 3  # one row per epoch event
        async with engine.connect() as conn:
            series = await get_metrics(conn, "job1", kind="epoch")
        assert sum(len(points) for points in series.values()) == 90
        assert series["k3"] == [(1, 3.0), (2, 1.5), (3, 1.0)]
        assert await _count(engine, logs, job_id="job1") == 2
        assert await _count(engine, status_events, job_id="job1") == 2
        async with engine.connect() as conn:
            row = (await conn.execute(select(job_status).where(job_status.c.job_id == "job1"))).one()
        assert (row.status, row.epoch, row.epochs) == ("completed", 3, 3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await engine.dispose()
        await nc.close()


async def _drained(js):
    """Both durables of the writer have acked everything in their streams."""
    for stream, durable in (("KILN_EVENTS", "metrics-writer-events"), ("KILN_LOGS", "metrics-writer-logs")):
        try:
            info = await js.consumer_info(stream, durable)
        except Exception:  # not created yet
            return False
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def test_poison_messages_go_to_the_dead_letter_stream_and_the_batch_goes_on(nats_server, tmp_path):
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    engine = make_engine(db_url)
    await upgrade(engine)
    stop = asyncio.Event()
    task = asyncio.create_task(run(Settings(nats_url=nats_server.url, database_url=db_url, batch_ms=20), stop))
    good = Event.new(job_id="job2", project="p", attempt=1, seq=1, source="trainer",
                     data=EpochCompleted(epoch=1, epochs=1, metrics={"m": 1.0}))
    # Another job's events on job2's subjects (a trainer may publish only on its own job's): never stored.
    forged = Event.new(job_id="victim", project="p", attempt=1, seq=1, source="runner",
                       data=JobFinished(status=JobStatus.completed, reason="forged"))
    points = MetricsLogged(step=1, metrics={"m": 2.0})
    forged_points = Event.new(job_id="victim", project="p", attempt=1, seq=2, source="trainer", data=points)
    await js.publish("kiln.evt.p.job2.epoch", b"{not json")
    await js.publish("kiln.evt.p.job2.epoch", b'{"v": 99, "id": "x"}')
    await js.publish("kiln.evt.p.job2.finished", forged.to_bytes(), headers=forged.headers())
    await js.publish("kiln.evt.p.job2.metrics", forged_points.to_bytes(), headers=forged_points.headers())
    await js.publish(good.subject, good.to_bytes(), headers=good.headers())
    try:
        assert await _wait_for(lambda: _has(engine, metric_events, 1))
        sub = await js.pull_subscribe("kiln.dlq.>", stream="KILN_DLQ")
        msgs = await sub.fetch(4, timeout=5)
        assert len(msgs) == 4
        assert msgs[0].data == b"{not json"
        assert msgs[0].headers["Kiln-Stream-Seq"] == "1"
        assert "invalid event" in msgs[0].headers["Kiln-Reason"]
        assert msgs[1].headers["Kiln-Stream-Seq"] == "2"
        for msg, ev in zip(msgs[2:], (forged, forged_points), strict=True):
            assert msg.headers["Kiln-Reason"].endswith(f"names {ev.subject} but came on {msg.headers['Kiln-Subject']}")
        assert await _count(engine, status_events) == 0 and await _count(engine, metric_events) == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await engine.dispose()
        await nc.close()


async def _has(engine, table, n):
    return await _count(engine, table) >= n
