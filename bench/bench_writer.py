"""Sustained metric points/s from publishers through JetStream into the database, counted in the database.

    .venv/bin/python bench/bench_writer.py [--db postgresql+asyncpg://postgres@127.0.0.1:5432/test] [--events 20000]
        [--metrics 10]

Publishes ``events`` MetricsLogged events of ``metrics`` points each (pipelined, acked), with the metrics-writer
running in this process against a fresh database, and reports points/s from the first publish until the database
holds every point.  Also reports the catch-up case: events published while the writer is stopped, then drained.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nats  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from kiln_contracts import Event, MetricsLogged, streams  # noqa: E402
from kiln_metrics_writer.main import run  # noqa: E402
from kiln_metrics_writer.settings import Settings  # noqa: E402
from kiln_store import make_engine, metrics, upgrade  # noqa: E402
from kiln_testing import NatsServer, pg_create_db, pg_drop_db  # noqa: E402


async def publish(js, n: int, k: int, jobs: int = 10) -> None:  # type: ignore[no-untyped-def]
    names = [f"m{i}" for i in range(k)]
    pending = []
    for i in range(n):
        ev = Event.new(job_id=f"job{i % jobs}", project="bench", attempt=1, seq=i // jobs + 1, source="trainer",
                       data=MetricsLogged(step=i // jobs, metrics={m: float(i) for m in names}))
        pending.append(await js.publish_async(ev.subject, ev.to_bytes(), headers=ev.headers()))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def count(engine) -> int:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(metrics))).scalar_one()


async def wait_rows(engine, want: int, timeout: float = 600) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    while await count(engine) < want:
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"timeout: {await count(engine)} of {want} rows")
        await asyncio.sleep(0.02)
    return time.perf_counter()


async def bench(db_url: str, n: int, k: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        engine = make_engine(db_url)
        await upgrade(engine)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await streams.ensure_streams(js)
        settings = Settings(nats_url=server.url, database_url=db_url)
        try:
            stop = asyncio.Event()
            writer = asyncio.create_task(run(settings, stop))
            await asyncio.sleep(1.0)
            t0 = time.perf_counter()
            await publish(js, n, k)
            t_pub = time.perf_counter()
            t_end = await wait_rows(engine, n * k)
            print(f"live: {n} events x {k} points = {n * k} points; published in {t_pub - t0:.2f}s; in the DB after "
                  f"{t_end - t0:.2f}s -> {n * k / (t_end - t0):,.0f} points/s ({n / (t_end - t0):,.0f} events/s)")
            stop.set()
            await writer
            # catch-up: events accumulate while the writer is stopped, then it drains the backlog
            await publish(js, n, k)
            stop = asyncio.Event()
            t0 = time.perf_counter()
            writer = asyncio.create_task(run(settings, stop))
            t_end = await wait_rows(engine, 2 * n * k)
            print(f"catch-up: backlog of {n} events ({n * k} points) drained in {t_end - t0:.2f}s "
                  f"-> {n * k / (t_end - t0):,.0f} points/s")
            stop.set()
            await writer
        finally:
            await nc.close()
            await engine.dispose()
            server.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--metrics", type=int, default=10)
    a = p.parse_args()
    if a.db.startswith("postgresql"):
        name = f"kiln_bench_{uuid.uuid4().hex[:8]}"
        asyncio.run(pg_create_db(a.db, name))
        try:
            asyncio.run(bench(a.db.rsplit("/", 1)[0] + "/" + name, a.events, a.metrics))
        finally:
            asyncio.run(pg_drop_db(a.db, name))
    else:
        asyncio.run(bench(a.db, a.events, a.metrics))


if __name__ == "__main__":
    main()
