"""Metric points/s from publishers through JetStream into the database (a script, not a test).

    .venv/bin/python bench/bench_writer.py [--db postgresql+asyncpg://postgres@127.0.0.1:5432/test]
        [--events 100000] [--metrics 10] [--lanes 2] [--mode live,catchup] [--outage-s 60 --rate 1000]
        [--core-publish]

Starts its own nats-server and a fresh database, and runs the metrics-writer as deployed: its own process
(``python -m kiln_metrics_writer``).  Event payloads are built before the clock starts (building a pydantic event
costs more than publishing it; the trainers that publish in production are other processes).

- ``live``: the writer runs; ``events`` MetricsLogged events of ``metrics`` points each are published (pipelined,
  acked); points/s from the first publish until the writer has acked every event.  Acks go out only after the
  database commit, so "all acked" means "all committed"; the points are then counted in the database.
- ``catchup``: the same number of events published while the writer is stopped, then the writer starts; time from
  the process start (about 2 s of it is Python imports) until the backlog is acked.
- ``outage``: events flow at ``--rate`` events/s; the writer is stopped for ``--outage-s`` seconds, then
  started again while events keep flowing; reports the time from the restart until the writer has caught up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nats  # noqa: E402
from sqlalchemy import text  # noqa: E402

from kiln_contracts import Event, MetricsLogged, streams  # noqa: E402
from kiln_store import make_engine, upgrade  # noqa: E402
from kiln_testing import NatsServer, pg_create_db, pg_drop_db  # noqa: E402

DURABLE = "metrics-writer-events"
CORE = False


def payloads(n: int, k: int, jobs: int = 10, start: int = 0) -> list[tuple[str, bytes, dict[str, str]]]:
    names = [f"train/m{i}" for i in range(k)]
    out = []
    for i in range(start, start + n):
        ev = Event.new(job_id=f"job{i % jobs}", project="bench", attempt=1, seq=i // jobs + 1, source="trainer",
                       data=MetricsLogged(step=i // jobs, metrics={m: float(i) + j / 7 for j, m in enumerate(names)}))
        out.append((ev.subject, ev.to_bytes(), ev.headers()))
    return out


async def publish(js, items, window: int = 2000) -> None:  # type: ignore[no-untyped-def]
    if CORE:  # core NATS publishes, no waiting for PubAcks: a cheaper publisher, to load the writer harder
        nc = js._nc
        for subject, data, headers in items:
            await nc.publish(subject, data, headers=headers)
        await nc.flush()
        return
    pending = []
    for subject, data, headers in items:
        pending.append(await js.publish_async(subject, data, headers=headers))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def backlog(js) -> int:  # type: ignore[no-untyped-def]
    """Events the writer has not acked yet (not delivered + delivered and unacked)."""
    info = await js.consumer_info("KILN_EVENTS", DURABLE)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def wait_acked(js, timeout: float = 900, below: int = 1) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    while True:
        try:
            if await backlog(js) < below:
                return time.perf_counter()
        except Exception:  # noqa: BLE001 - the consumer does not exist yet
            pass
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"timeout: backlog {await backlog(js)}")
        await asyncio.sleep(0.02)


async def count(engine) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(points, distinct events) in the database: one metric_events row per event, its points as JSON."""
    expand = "jsonb_each" if engine.dialect.name == "postgresql" else "json_each"
    async with engine.connect() as conn:
        row = (await conn.execute(text(f'SELECT count(*), count(DISTINCT m.event_id) FROM metric_events AS m '
                                       f'CROSS JOIN {expand}(m."values")'))).one()
    return int(row[0]), int(row[1])


class Writer:
    def __init__(self, nats_url: str, db_url: str, lanes: int) -> None:
        self.env = {**os.environ, "KILN_WRITER_NATS_URL": nats_url, "KILN_WRITER_DATABASE_URL": db_url,
                    "KILN_WRITER_LANES": str(lanes)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kiln_metrics_writer"], env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    async def ready(self, js) -> None:  # type: ignore[no-untyped-def]
        while True:
            try:
                await js.consumer_info("KILN_EVENTS", DURABLE)
                return
            except Exception:  # noqa: BLE001
                await asyncio.sleep(0.05)


async def bench(db_url: str, n: int, k: int, lanes: int, modes: list[str], outage_s: float, rate: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        engine = make_engine(db_url)
        await upgrade(engine)
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await streams.ensure_streams(js)
        writer = Writer(server.url, db_url, lanes)
        rows = 0
        try:
            if "live" in modes:
                items = payloads(n, k)
                writer.start()
                await writer.ready(js)
                t0 = time.perf_counter()
                await publish(js, items)
                t_pub = time.perf_counter()
                t_end = await wait_acked(js)
                rows += n * k
                got = await count(engine)
                print(f"live: {n} events x {k} points = {n * k:,} points; published in {t_pub - t0:.2f}s "
                      f"({n / (t_pub - t0):,.0f} events/s); all committed after {t_end - t0:.2f}s -> "
                      f"{n * k / (t_end - t0):,.0f} points/s ({n / (t_end - t0):,.0f} events/s); "
                      f"DB points {got[0]:,} (expected {rows:,}), distinct events {got[1]:,}")
                writer.stop()
            if "catchup" in modes:
                writer.stop()
                await publish(js, payloads(n, k, start=10 * n))
                t0 = time.perf_counter()
                writer.start()
                t_end = await wait_acked(js)
                rows += n * k
                got = await count(engine)
                print(f"catch-up: backlog of {n} events ({n * k:,} points) drained in {t_end - t0:.2f}s from the "
                      f"writer's start -> {n * k / (t_end - t0):,.0f} points/s; DB points {got[0]:,} "
                      f"(expected {rows:,})")
            if "outage" in modes:
                writer.stop()
                writer.start()
                await writer.ready(js)
                published = await outage(js, writer, outage_s, rate, k, base=20 * n)
                rows += published * k
                got = await count(engine)
                print(f"   DB points {got[0]:,} (expected {rows:,}), distinct events {got[1]:,}")
        finally:
            writer.stop()
            await nc.close()
            await engine.dispose()
            server.stop()


async def outage(js, writer: Writer, outage_s: float, rate: int, k: int, base: int) -> int:  # type: ignore[no-untyped-def]
    """Publish ``rate`` events/s; stop the writer for ``outage_s`` seconds; time its catch-up after the restart."""
    stop_flow = asyncio.Event()
    sent = 0

    async def flow() -> None:
        nonlocal sent
        tick, t0 = 0.01, time.perf_counter()
        while not stop_flow.is_set():
            due = int((time.perf_counter() - t0) * rate) - sent
            if due > 0:
                await publish(js, payloads(due, k, start=base + sent))
                sent += due
            await asyncio.sleep(tick)

    pub = asyncio.create_task(flow())
    await asyncio.sleep(3)
    writer.stop()
    t_stop = time.perf_counter()
    await asyncio.sleep(outage_s)
    lag = await backlog(js)
    t0 = time.perf_counter()
    writer.start()
    t_end = await wait_acked(js, below=max(rate // 10, 10))  # caught up: under 0.1 s of events waiting
    print(f"outage: writer stopped {t0 - t_stop:.0f}s at {rate} events/s x {k} points; backlog {lag:,} events at "
          f"restart; caught up {t_end - t0:.2f}s after the restart (process start included) while events "
          f"kept flowing")
    stop_flow.set()
    await pub
    await wait_acked(js)
    return sent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--metrics", type=int, default=10)
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--mode", default="live,catchup", help="comma-separated: live, catchup, outage")
    p.add_argument("--outage-s", type=float, default=60.0)
    p.add_argument("--rate", type=int, default=1000, help="events/s during the outage mode")
    p.add_argument("--core-publish", action="store_true",
                   help="publish with core NATS (no PubAck waits); the DB count still proves nothing was lost")
    a = p.parse_args()
    global CORE
    CORE = a.core_publish
    modes = a.mode.split(",")
    if a.db.startswith("postgresql"):
        name = f"kiln_bench_{uuid.uuid4().hex[:8]}"
        asyncio.run(pg_create_db(a.db, name))
        try:
            asyncio.run(bench(a.db.rsplit("/", 1)[0] + "/" + name, a.events, a.metrics, a.lanes, modes, a.outage_s,
                              a.rate))
        finally:
            asyncio.run(pg_drop_db(a.db, name))
    else:
        asyncio.run(bench(a.db, a.events, a.metrics, a.lanes, modes, a.outage_s, a.rate))


if __name__ == "__main__":
    main()
