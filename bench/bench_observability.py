"""What the writer's metrics cost: points/s of the writer's consumer with its metrics on and off, in one process
(a script, not a test).

    .venv/bin/python bench/bench_observability.py [--db postgresql+asyncpg://postgres@127.0.0.1:5432/test]
        [--events 100000] [--metrics 10] [--rounds 3] [--scrape-s 1]

Starts its own nats-server and a fresh database.  Each round publishes ``events`` MetricsLogged events of
``metrics`` points while no writer runs, then lets the writer's own consumer (``BatchConsumer`` and
``write_batch``, as ``python -m kiln_metrics_writer`` builds them, two lanes on PostgreSQL) drain that backlog:
points/s from its start until the durable has acked everything (acks go out after the commit).  "off": no metrics
object; "on": the writer's metrics, its JetStream state reader and a scrape of the registry every ``--scrape-s``
seconds (Prometheus scrapes every 15 s or so: this is harsher).  The modes alternate round by round on the same
durable, so load from elsewhere on the machine falls on both.  It also times the per-batch metrics call alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nats  # noqa: E402

from kiln_contracts import Event, MetricsLogged, streams  # noqa: E402
from kiln_metrics_writer.adapters.sql import write_batch  # noqa: E402
from kiln_metrics_writer.consumer import BatchConsumer  # noqa: E402
from kiln_metrics_writer.decode import decode  # noqa: E402
from kiln_metrics_writer.domain import count_points  # noqa: E402
from kiln_metrics_writer.metrics import WriterMetrics  # noqa: E402
from kiln_observability import JetStreamStats, new_registry, render  # noqa: E402
from kiln_store import make_engine, upgrade  # noqa: E402
from kiln_testing import NatsServer, pg_create_db, pg_drop_db  # noqa: E402

DURABLE = streams.writer_consumers()[0]


def payloads(n: int, k: int, start: int) -> list[tuple[str, bytes, dict[str, str]]]:
    names = [f"train/m{i}" for i in range(k)]
    out = []
    for i in range(start, start + n):
        ev = Event.new(job_id=f"job{i % 10}", project="bench", attempt=1, seq=i // 10 + 1, source="trainer",
                       data=MetricsLogged(step=i // 10, metrics={m: float(i) + j / 7 for j, m in enumerate(names)}))
        out.append((ev.subject, ev.to_bytes(), ev.headers()))
    return out


async def backlog(js) -> int:  # type: ignore[no-untyped-def]
    info = await js.consumer_info(DURABLE.stream, DURABLE.config.durable_name)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def drain(nc, engine, n_points: int, metrics_on: bool, scrape_s: float, lanes: int) -> float:  # type: ignore[no-untyped-def]
    """Run the writer's consumer until the backlog is acked; points/s."""
    registry = new_registry()
    metrics = WriterMetrics(registry) if metrics_on else None
    stop = asyncio.Event()
    side: list[asyncio.Task[None]] = []
    if metrics_on:
        stats = JetStreamStats(nc.jetstream(), [DURABLE.stream], [(DURABLE.stream, DURABLE.config.durable_name)],
                               registry=registry)
        side.append(asyncio.create_task(stats.run(stop)))

        async def scraper() -> None:
            while True:
                await asyncio.sleep(scrape_s)
                render(registry)

        side.append(asyncio.create_task(scraper()))

    async def write(events):  # type: ignore[no-untyped-def]
        return await write_batch(engine, events)

    consumer = BatchConsumer(nc, DURABLE, write, batch_size=5000, batch_ms=50, lanes=lanes, metrics=metrics)
    js = nc.jetstream()
    t0 = time.perf_counter()
    task = asyncio.create_task(consumer.run())
    while await backlog(js) > 0:
        await asyncio.sleep(0.02)
    took = time.perf_counter() - t0
    consumer.stop()
    task.cancel()
    stop.set()
    for t in side:
        t.cancel()
    await asyncio.gather(task, *side, return_exceptions=True)
    if metrics is not None:
        counted = registry.get_sample_value("kiln_writer_points_written_total")
        assert counted == n_points, (counted, n_points)  # the metric saw every point
    return n_points / took


def per_batch_cost(k: int, batch: int = 5000, rounds: int = 200) -> float:
    """Microseconds of the metrics work for one batch: counting its points and updating the metrics."""
    items = [decode(s, d) for s, d, _ in payloads(batch, k, 0)]
    metrics = WriterMetrics(new_registry(process=False))
    t0 = time.perf_counter()
    for _ in range(rounds):
        metrics.committed("KILN_EVENTS", len(items), count_points(items), 0.01)
    return (time.perf_counter() - t0) / rounds * 1e6


async def bench(db_url: str, n: int, k: int, rounds: int, scrape_s: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats")
        server.start()
        engine = make_engine(db_url)
        await upgrade(engine)
        lanes = 2 if engine.dialect.name == "postgresql" else 1
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await streams.ensure_streams(js)
        await js.add_consumer(DURABLE.stream, DURABLE.config)
        figures: dict[bool, list[float]] = {False: [], True: []}
        published = 0
        try:
            for r in range(rounds):
                for on in ((False, True) if r % 2 == 0 else (True, False)):
                    for subject, data, headers in payloads(n, k, published):
                        await nc.publish(subject, data, headers=headers)  # core publish: backlog built fast
                    await nc.flush()
                    published += n
                    deadline = time.monotonic() + 60
                    while (await js.stream_info(DURABLE.stream)).state.messages < published:
                        assert time.monotonic() < deadline, "JetStream did not store every event"
                        await asyncio.sleep(0.05)
                    rate = await drain(nc, engine, n * k, on, scrape_s, lanes)
                    figures[on].append(rate)
                    print(f"round {r + 1} metrics {'on ' if on else 'off'}: {rate:,.0f} points/s")
        finally:
            await nc.close()
            await engine.dispose()
            server.stop()
    off, on = statistics.median(figures[False]), statistics.median(figures[True])
    print(f"median of {rounds}: metrics off {off:,.0f} points/s, on {on:,.0f} points/s ({(on - off) / off:+.1%}); "
          f"{n:,} events x {k} points per round, {engine.dialect.name}, {lanes} lane(s)")
    print(f"metrics work per batch of 5,000 events x {k} points (count points, update counters and histograms): "
          f"{per_batch_cost(k):.0f} µs")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--metrics", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scrape-s", type=float, default=1.0)
    a = p.parse_args()
    if a.db.startswith("postgresql"):
        name = f"kiln_bench_{uuid.uuid4().hex[:8]}"
        asyncio.run(pg_create_db(a.db, name))
        try:
            asyncio.run(bench(a.db.rsplit("/", 1)[0] + "/" + name, a.events, a.metrics, a.rounds, a.scrape_s))
        finally:
            asyncio.run(pg_drop_db(a.db, name))
    else:
        asyncio.run(bench(a.db, a.events, a.metrics, a.rounds, a.scrape_s))


if __name__ == "__main__":
    main()
