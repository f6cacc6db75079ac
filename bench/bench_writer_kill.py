"""Catch-up after a killed metrics-writer: how long the events it held stay out of SQL (a script, not a test).

    .venv/bin/python bench/bench_writer_kill.py [--db postgresql+asyncpg://postgres@127.0.0.1:5432/test]
        [--events 10000] [--ack-wait default,30] [--rounds 3] [--hold-s 1]

For each ack wait (``default``: the durable's own, from ``kiln_contracts.streams``; a number: set through
``KILN_WRITER_ACK_WAIT_S``) and each round, with a fresh nats-server and a fresh database:

1. writer A (``python -m kiln_metrics_writer``, its own process) starts;
2. the bench locks ``metric_events`` (PostgreSQL ``LOCK TABLE``, SQLite ``BEGIN EXCLUSIVE``), so A's commit waits,
   and publishes ``events`` MetricsLogged events;
3. once A holds every one (all delivered, none acked) and ``hold-s`` more seconds have passed: SIGKILL to A, the
   lock is released and writer B starts at once (as a supervisor restarts a crashed service);
4. reported: the time from the kill until every event is in the database, B's own start-up (until its durables are
   bound), and the rows and distinct event ids counted at the end.

JetStream gives A's messages to B only when their ack wait runs out, counted from their delivery or from A's last
in-progress ack.  To measure an older writer, point ``PYTHONPATH`` at an export of its sources (``git archive``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nats  # noqa: E402
from sqlalchemy import text  # noqa: E402

from kiln_contracts import streams  # noqa: E402
from kiln_store import make_engine, upgrade  # noqa: E402
from kiln_testing import NatsServer, pg_create_db, pg_drop_db  # noqa: E402
from kiln_testing.writer import DbLock, WriterProc  # noqa: E402


def payloads(n: int) -> list[tuple[str, bytes, str]]:
    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(n):
        eid = f"{run}-{i}"
        body = {"v": 1, "id": eid, "time": now, "job_id": f"job{i % 10}", "project": "bench", "attempt": 1,
                "source": "trainer", "seq": i // 10 + 1,
                "data": {"kind": "metrics", "step": i // 10, "metrics": {f"m{k}": i + k / 7 for k in range(10)}}}
        out.append((f"kiln.evt.bench.job{i % 10}.metrics", json.dumps(body).encode(), eid))
    return out


async def count(db_url: str) -> tuple[int, int]:
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(text("SELECT count(*), count(DISTINCT event_id) FROM metric_events"))).one()
        return int(row[0]), int(row[1])
    finally:
        await engine.dispose()


async def until(pred, timeout: float, every: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Wait for ``pred()``; returns the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        await asyncio.sleep(every)
    return time.monotonic()


async def one_round(db_url: str, n: int, ack_wait: str, hold_s: float, tmp: Path) -> dict[str, float]:
    server = NatsServer(tmp / "nats")
    server.start()
    engine = make_engine(db_url)
    await upgrade(engine)
    await engine.dispose()
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    settings = {} if ack_wait == "default" else {"ack_wait_s": ack_wait}
    log = tmp / "writer.log"
    a = WriterProc(server.url, db_url, log, **settings).start()
    b: WriterProc | None = None
    lock = DbLock(db_url)
    try:
        await a.ready()
        await lock.acquire()
        items = payloads(n)
        for subject, data, eid in items:
            await nc.publish(subject, data, headers={"Nats-Msg-Id": eid})
        await nc.flush()

        async def held() -> bool:
            info = await js.consumer_info("KILN_EVENTS", "metrics-writer-events")
            return info.num_pending == 0 and info.num_ack_pending == n

        await until(held, 60)
        info = await js.consumer_info("KILN_EVENTS", "metrics-writer-events")
        await asyncio.sleep(hold_s)
        a.kill()
        t_kill = time.monotonic()
        await lock.release()
        b = WriterProc(server.url, db_url, log, **settings).start()
        await b.ready()
        t_ready = time.monotonic()

        async def stored() -> bool:
            return (await count(db_url))[0] >= n

        t_all = await until(stored, 120, every=0.1)
        rows, distinct = await count(db_url)
        return {"ack_wait": float(info.config.ack_wait or 0), "catch_up": t_all - t_kill,
                "b_start": t_ready - t_kill, "rows": rows, "distinct": distinct}
    finally:
        await lock.release()
        a.kill()
        if b:
            await b.stop()
        await nc.close()
        server.stop()


async def bench(db: str, n: int, ack_waits: list[str], rounds: int, hold_s: float) -> None:
    for ack_wait in ack_waits:
        catch_up = []
        for r in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                if db.startswith("postgresql"):
                    name = f"kiln_bench_{uuid.uuid4().hex[:8]}"
                    await pg_create_db(db, name)
                    url = db.rsplit("/", 1)[0] + "/" + name
                else:
                    name, url = "", f"sqlite+aiosqlite:///{tmp}/kiln.db"
                try:
                    res = await one_round(url, n, ack_wait, hold_s, Path(tmp))
                finally:
                    if name:
                        await pg_drop_db(db, name)
            catch_up.append(res["catch_up"])
            print(f"ack wait {res['ack_wait']:g}s ({ack_wait}), round {r + 1}: {n} held events all in SQL "
                  f"{res['catch_up']:.2f}s after the kill (writer B bound its durables after {res['b_start']:.2f}s); "
                  f"rows {res['rows']}, distinct event ids {res['distinct']}", flush=True)
        print(f"ack wait {ack_wait}: catch-up median {statistics.median(catch_up):.2f}s, "
              f"min {min(catch_up):.2f}s, max {max(catch_up):.2f}s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--db", default="postgresql+asyncpg://postgres@127.0.0.1:5432/test",
                   help="a PostgreSQL URL (a fresh database is created per round) or 'sqlite'")
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--ack-wait", default="default,30", help="comma-separated: 'default' or seconds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hold-s", type=float, default=1.0, help="how long A holds every event before the kill")
    a = p.parse_args()
    asyncio.run(bench(a.db, a.events, a.ack_wait.split(","), a.rounds, a.hold_s))


if __name__ == "__main__":
    main()
