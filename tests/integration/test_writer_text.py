"""Text the SQL columns cannot hold as it is: a NUL character (PostgreSQL refuses it in text), a log line's time
that has no UTC equivalent.  The writer repairs the one line or field and stores everything, on SQLite and
PostgreSQL alike; nothing goes to the dead letters and no batch is retried forever."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import nats
from sqlalchemy import select

from kiln_contracts import (
    Event, ExitClass, JobFinished, JobStatus, JobStatusChanged, LogBatch, LogLine, streams,
)
from kiln_metrics_writer.main import run
from kiln_metrics_writer.settings import Settings
from kiln_store import job_status, logs, make_engine, status_events, upgrade
from kiln_testing.writer import drained, wait_for

FFFD = "\ufffd"


def _ev(job: str, seq: int, data, attempt: int = 1) -> Event:  # type: ignore[no-untyped-def]
    return Event.new(job_id=job, project="p", attempt=attempt, seq=seq, source="runner", data=data)


async def _run_writer(nats_url: str, db_url: str, events: list[Event]):  # type: ignore[no-untyped-def]
    """Publish ``events``, run the writer until both its durables have acked everything; returns the engine and the
    number of dead letters."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    for ev in events:
        await js.publish(ev.subject, ev.to_bytes(), headers=ev.headers())
    engine = make_engine(db_url)
    await upgrade(engine)
    stop = asyncio.Event()
    task = asyncio.create_task(run(Settings(nats_url=nats_url, database_url=db_url, batch_ms=100), stop))
    try:
        await wait_for(lambda: drained(js), 20, "the writer to ack every event")
        dead = (await js.stream_info("KILN_DLQ")).state.messages
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.close()
    return engine, dead


async def test_a_log_line_with_a_nul_is_stored_repaired_and_its_neighbours_with_it(nats_server, db_url):
    batches = [
        _ev("j", 1, LogBatch(lines=[LogLine(text="a0"), LogLine(text="a1")])),
        _ev("j", 2, LogBatch(lines=[LogLine(text="b0"), LogLine(text="b\x001\x00"),
                                    LogLine(text="b2", stream="stderr")])),
        _ev("j", 3, LogBatch(lines=[LogLine(text="c0")])),
        # 60 lines: PostgreSQL takes this many through COPY, another path than the INSERTs of the smaller batches
        _ev("j", 4, LogBatch(lines=[LogLine(text=f"d{i}\x00" if i == 30 else f"d{i}") for i in range(60)])),
    ]
    engine, dead = await _run_writer(nats_server.url, db_url, batches)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(logs.c.event_id, logs.c.line_no, logs.c.text, logs.c.stream))).all()
    finally:
        await engine.dispose()
    assert dead == 0
    got = {(r.event_id, r.line_no): (r.text, r.stream) for r in rows}
    assert got == {
        (batches[0].id, 0): ("a0", "stdout"), (batches[0].id, 1): ("a1", "stdout"),
        (batches[1].id, 0): ("b0", "stdout"), (batches[1].id, 1): (f"b{FFFD}1{FFFD}", "stdout"),
        (batches[1].id, 2): ("b2", "stderr"),
        (batches[2].id, 0): ("c0", "stdout"),
        **{(batches[3].id, i): (f"d{i}{FFFD}" if i == 30 else f"d{i}", "stdout") for i in range(60)},
    }


async def test_a_log_line_whose_time_has_no_utc_form_is_stored_at_its_events_time(nats_server, db_url):
    """Before, the bind of that one time raised in Python, not in the database: the batch was retried forever."""
    odd = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))  # 0000-12-31T23:00Z: no such datetime
    batch = _ev("j", 1, LogBatch(lines=[LogLine(text="a0"), LogLine(text="a1", t=odd), LogLine(text="a2")]))
    engine, dead = await _run_writer(nats_server.url, db_url, [batch])
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(logs.c.line_no, logs.c.text, logs.c.time).order_by(logs.c.line_no))).all()
    finally:
        await engine.dispose()
    assert dead == 0
    assert [r.text for r in rows] == ["a0", "a1", "a2"]
    assert rows[1].time == batch.time
    assert rows[0].time == batch.data.lines[0].t


async def test_a_nul_in_a_status_reason_still_ends_the_job(nats_server, db_url):
    """The runner puts the trainer's last line in a failure's reason: a NUL there must not lose the job's end
    (before, PostgreSQL refused the event and the job stayed ``running``)."""
    events = [
        _ev("k", 1, JobStatusChanged(status=JobStatus.running, runner="r\x001", reason="claimed\x00",
                                     details={"seed\x00": "x\x00y", "slot": 0})),
        _ev("k", 2, JobFinished(status=JobStatus.failed, reason="trainer exited with code 1: \x00boom",
                                exit_code=1, exit_class=ExitClass.user_error, last_logs=["\x00boom"])),
    ]
    engine, dead = await _run_writer(nats_server.url, db_url, events)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(job_status).where(job_status.c.job_id == "k"))).one()
            timeline = (await conn.execute(select(status_events.c.status, status_events.c.reason)
                                           .order_by(status_events.c.time))).all()
    finally:
        await engine.dispose()
    assert dead == 0
    assert (row.status, row.reason, row.runner) == ("failed", f"trainer exited with code 1: {FFFD}boom", f"r{FFFD}1")
    assert row.details == {f"seed{FFFD}": f"x{FFFD}y", "slot": 0}
    assert [tuple(t) for t in timeline] == [("running", f"claimed{FFFD}"),
                                             ("failed", f"trainer exited with code 1: {FFFD}boom")]
