"""A start accepted by the API (committed) whose publish was lost is republished by the sweeper, once."""

import asyncio
from datetime import datetime, timedelta, timezone

import nats
from sqlalchemy import update

from kiln_contracts import StartJob, streams
from kiln_store import jobs, make_engine
from kiln_testing.api import api_client


def test_sweeper_republishes_a_submitted_job_whose_start_never_reached_the_bus(nats_server, tmp_path):
    db = f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"
    with api_client(tmp_path, nats_url=nats_server.url, database_url=db, sweep_interval_s=0.3, sweep_after_s=1) as client:
        job = client.post("/api/v1/jobs", json={"model": "yolov8n.yaml", "dataset": "/d"}).json()

        async def lose_the_publish():  # the state right after the commit, before the publish: submitted, not on the bus
            engine = make_engine(db)
            async with engine.begin() as conn:
                await conn.execute(update(jobs).where(jobs.c.id == job["id"]).values(
                    attempt=1, submitted_at=datetime.now(timezone.utc) - timedelta(seconds=5)))
            await engine.dispose()

        asyncio.run(lose_the_publish())

        async def commands():
            nc = await nats.connect(nats_server.url)
            sub = await nc.jetstream().pull_subscribe("kiln.cmd.start.>", durable="probe", stream=streams.JOBS.name)
            got = []
            for _ in range(20):  # several sweeps happen meanwhile; the message id keeps it stored once
                try:
                    got += await sub.fetch(10, timeout=0.2)
                except Exception:  # noqa: BLE001 - nothing yet
                    pass
            await nc.close()
            return got

        msgs = asyncio.run(commands())
    assert len(msgs) == 1
    cmd = StartJob.model_validate_json(msgs[0].data)
    assert (cmd.job_id, cmd.attempt) == (job["id"], 1)
