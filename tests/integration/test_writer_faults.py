"""The metrics-writer under faults: killed mid-burst, PostgreSQL unreachable for 30 s (a real writer process for
both), and an event that PostgreSQL refuses.

The first two count what reached PostgreSQL: every event id exactly once (the writer acks only after the commit,
JetStream redelivers what was not acked, and the inserts are idempotent on the event id).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import nats
import pytest

from kiln_contracts import streams
from kiln_store import make_engine, upgrade
from kiln_testing import pg_admin_url, pg_create_db, pg_drop_db
from kiln_testing.proxy import TcpProxy
from kiln_testing.writer import WriterProc

@pytest.fixture()
async def pg_db(pg_url: str):
    """A fresh PostgreSQL database with Kiln's schema: (SQLAlchemy URL, plain postgresql:// URL)."""
    name = f"wf{uuid.uuid4().hex[:10]}"
    await pg_create_db(pg_url, name)
    url = pg_url.rsplit("/", 1)[0] + "/" + name
    engine = make_engine(url)
    await upgrade(engine)
    await engine.dispose()
    yield url
    await pg_drop_db(pg_url, name)


def writer_proc(nats_url: str, db_url: str, log: Path) -> WriterProc:
    """The writer process with its default ack wait (5 s: how soon what a killed writer held is redelivered)."""
    return WriterProc(nats_url, db_url, log, batch_size=2000)


def payloads(n: int, start: int = 0, job: str = "job1") -> list[tuple[str, bytes, str]]:
    """MetricsLogged events of one point each, as (subject, payload, event id); built as text: fast."""
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(start, start + n):
        eid = f"{run}-{i}"
        body = {"v": 1, "id": eid, "time": now, "job_id": job, "project": "p", "attempt": 1, "source": "trainer",
                "seq": i + 1, "data": {"kind": "metrics", "step": i, "metrics": {"loss": 1.0 / (i + 1)}}}
        out.append((f"kiln.evt.p.{job}.metrics", json.dumps(body).encode(), eid))
    return out


async def publish(nc, items) -> None:  # type: ignore[no-untyped-def]
    """Core publishes (the stream stores them; its message count is checked, so nothing is lost unseen)."""
    for subject, data, eid in items:
        await nc.publish(subject, data, headers={"Nats-Msg-Id": eid})
    await nc.flush()


async def counts(dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        # points (one row per event, its points in jsonb) and distinct events
        row = await conn.fetchrow('SELECT count(*), count(DISTINCT m.event_id) FROM metric_events AS m '
                                  'CROSS JOIN jsonb_each(m."values")')
        return int(row[0]), int(row[1])
    finally:
        await conn.close()


async def drained(js) -> bool:  # type: ignore[no-untyped-def]
    info = await js.consumer_info("KILN_EVENTS", "metrics-writer-events")
    return not info.num_pending and not info.num_ack_pending


async def wait_for(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@pytest.mark.e2e
async def test_writer_killed_mid_burst_loses_and_duplicates_nothing(nats_server, pg_db, tmp_path):
    n = 100_000
    dsn = pg_admin_url(pg_db)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    first = writer_proc(nats_server.url, pg_db, tmp_path / "writer.log").start()
    try:
        await first.ready()
        await publish(nc, payloads(n))
        await wait_for(lambda: _stored(js, n), 20, "the stream to store the burst")
        await wait_for(lambda: _at_least(dsn, n // 5), 120, "a fifth of the burst in the database")
        first.kill(signal.SIGKILL)
        at_kill, _ = await counts(dsn)
        assert at_kill < n, "the burst was written before the kill: nothing was tested"
        second = writer_proc(nats_server.url, pg_db, tmp_path / "writer.log").start()
        try:
            await wait_for(lambda: drained(js), 180, "the restarted writer to ack everything")
        finally:
            await second.stop()
        rows, distinct = await counts(dsn)
        assert (rows, distinct) == (n, n), f"killed at {at_kill} rows; then {rows} rows, {distinct} event ids"
    finally:
        first.kill()
        await nc.close()


async def _stored(js, n: int) -> bool:  # type: ignore[no-untyped-def]
    return (await js.stream_info("KILN_EVENTS")).state.messages >= n


async def _at_least(dsn: str, n: int) -> bool:
    return (await counts(dsn))[0] >= n


@pytest.mark.e2e
async def test_postgresql_unreachable_for_30s_loses_and_duplicates_nothing(nats_server, pg_db, tmp_path):
    dsn = pg_admin_url(pg_db)
    host_port = pg_db.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1) if ":" in host_port else (host_port, "5432")
    proxy = await TcpProxy((host, int(port))).start()
    via_proxy = pg_db.replace(f"@{host_port}/", f"@127.0.0.1:{proxy.port}/")
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    writer = writer_proc(nats_server.url, via_proxy, tmp_path / "writer.log").start()
    sent = 0
    flowing = asyncio.Event()

    async def flow(rate: int = 1000) -> None:  # events keep coming during the outage
        nonlocal sent
        t0 = time.perf_counter()
        while flowing.is_set():
            due = int((time.perf_counter() - t0) * rate) - sent
            if due > 0:
                await publish(nc, payloads(due, start=sent))
                sent += due
            await asyncio.sleep(0.02)

    try:
        await writer.ready()
        flowing.set()
        pub = asyncio.create_task(flow())
        await asyncio.sleep(4)
        await proxy.cut()
        await asyncio.sleep(1)  # a commit already sent may still land
        before, _ = await counts(dsn)
        await asyncio.sleep(29)
        during, _ = await counts(dsn)
        assert during == before, "rows arrived while PostgreSQL was unreachable: the proxy was bypassed"
        await proxy.start()
        t_back = time.monotonic()
        await asyncio.sleep(3)
        flowing.clear()
        await pub
        await wait_for(lambda: drained(js), 60, "the writer to catch up")
        caught_up = time.monotonic() - t_back
        rows, distinct = await counts(dsn)
        assert (rows, distinct) == (sent, sent), f"{sent} sent; {rows} rows, {distinct} event ids"
        assert "retrying" in (tmp_path / "writer.log").read_text()
        assert caught_up < 30, f"caught up only {caught_up:.1f}s after PostgreSQL came back"
        # 30 s of outage, six ack waits: the writer's in-progress acks kept what it held, nothing was redelivered
        delivered = (await js.consumer_info("KILN_EVENTS", "metrics-writer-events")).delivered.consumer_seq
        assert delivered == sent, f"{delivered - sent} redeliveries"
    finally:
        flowing.clear()
        await writer.stop()
        await proxy.close()
        await nc.close()


async def test_an_event_the_database_refuses_is_dead_lettered_alone(nats_server, pg_db):
    """PostgreSQL refuses a value longer than its column (here an artifact's sha256): the batch is halved until
    that one event is found and dead-lettered; the others are written (before, the writer retried the whole batch
    forever)."""
    from kiln_contracts import ArtifactStored, Event
    from kiln_metrics_writer.main import run
    from kiln_metrics_writer.settings import Settings

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    stored = [Event.new(job_id="j", project="p", attempt=1, seq=i + 1, source="runner",
                        data=ArtifactStored(name=f"e{i}.pt", uri=f"file:///a/e{i}.pt", size=1,
                                            sha256=("f" * 65 if i == 33 else "f" * 64)))
              for i in range(60)]
    for ev in stored:
        await js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
    stop = asyncio.Event()
    task = asyncio.create_task(run(Settings(nats_url=nats_server.url, database_url=pg_db, batch_ms=200), stop))
    try:
        sub = await js.pull_subscribe("kiln.dlq.>", stream="KILN_DLQ")
        dead = await sub.fetch(1, timeout=20)
        assert "refused by the database" in dead[0].headers["Kiln-Reason"]
        assert dead[0].data == stored[33].to_bytes()

        async def written() -> bool:
            conn = await asyncpg.connect(pg_admin_url(pg_db))
            try:
                return await conn.fetchval("SELECT count(*) FROM artifacts") == 59
            finally:
                await conn.close()

        await wait_for(written, 20, "the 59 other artifacts")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()


async def test_writer_resumes_after_a_nats_restart(nats_server, pg_db):
    """The writer keeps its own pull request open: after NATS comes back it asks again and goes on."""
    from kiln_metrics_writer.main import run
    from kiln_metrics_writer.settings import Settings

    dsn = pg_admin_url(pg_db)
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    stop = asyncio.Event()
    task = asyncio.create_task(run(Settings(nats_url=nats_server.url, database_url=pg_db, batch_ms=20), stop))
    try:
        await publish(nc, payloads(500))
        await wait_for(lambda: _at_least(dsn, 500), 20, "the first 500 events")
        nats_server.stop()
        await asyncio.sleep(1)
        nats_server.start()
        await wait_for(lambda: _connected(nc), 20, "the test's own connection to come back")
        await publish(nc, payloads(500, start=500))
        await wait_for(lambda: _at_least(dsn, 1000), 30, "the 500 events published after the restart")
        assert await counts(dsn) == (1000, 1000)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()


async def _connected(nc) -> bool:  # type: ignore[no-untyped-def]
    return bool(nc.is_connected)


async def test_metric_values_are_stored_alike_on_both_decoding_paths_and_misfits_are_dead_lettered(nats_server, pg_db):
    """The fast path (PostgreSQL expands the raw JSON) and the full-model path store the same values; events that
    would not fit the columns go to the dead-letter stream instead of failing their batch."""
    from kiln_metrics_writer.main import run
    from kiln_metrics_writer.settings import Settings

    def raw(job: str, metrics: str, eid: str) -> tuple[str, bytes, str]:
        body = ('{"v":1,"id":"%s","time":"2025-01-01T00:00:00Z","job_id":"%s","project":"p","attempt":1,'
                '"source":"trainer","seq":1,"data":{"kind":"metrics","step":7,"metrics":%s}}') % (eid, job, metrics)
        return f"kiln.evt.p.{job}.metrics", body.encode(), eid

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    await publish(nc, [
        raw("j", '{"a": 1.5, "b": 2}', "fast"),                 # fast path
        raw("j", '{"c": "3.25"}', "lax"),                       # full model (a number in a string): from Python
        raw("j", '{"d": NaN, "e": 1e-300}', "nan"),             # full model (not finite): NaN stored as "NaN"
        raw("j", '{"%s": 1.0}' % ("k" * 201), "long-key"),      # longer than the column
        raw("j" * 65, '{"f": 1.0}', "long-job"),                # longer than the column
    ])
    stop = asyncio.Event()
    task = asyncio.create_task(run(Settings(nats_url=nats_server.url, database_url=pg_db, batch_ms=50), stop))
    try:
        await wait_for(lambda: _dead_lettered(js, 2), 20, "two dead-lettered events")
        sub = await js.pull_subscribe("kiln.dlq.>", stream="KILN_DLQ")
        dead = await sub.fetch(2, timeout=5)
        assert sorted(m.headers["Kiln-Reason"].split(" ")[0] for m in dead) == ["job_id", "metric"]
        await wait_for(lambda: _at_least(pg_admin_url(pg_db), 5), 20, "the five stored points")
        conn = await asyncpg.connect(pg_admin_url(pg_db))
        try:
            rows = {r["key"]: (r["event_id"], r["step"], r["value"], r["kind"])
                    for r in await conn.fetch('SELECT m.event_id, m.step, m.kind, p.key, p.value::float8 AS value '
                                              'FROM metric_events AS m CROSS JOIN jsonb_each_text(m."values") AS p')}
        finally:
            await conn.close()
        assert {k: v[:2] for k, v in rows.items()} == {
            "a": ("fast", 7), "b": ("fast", 7), "c": ("lax", 7), "d": ("nan", 7), "e": ("nan", 7)}
        assert (rows["a"][2], rows["b"][2], rows["c"][2], rows["e"][2]) == (1.5, 2.0, 3.25, 1e-300)
        assert rows["d"][2] != rows["d"][2]  # NaN
        assert {v[3] for v in rows.values()} == {"metrics"}
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()


async def _dead_lettered(js, n: int) -> bool:  # type: ignore[no-untyped-def]
    return (await js.stream_info("KILN_DLQ")).state.messages >= n
