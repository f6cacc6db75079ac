"""Bulk, idempotent writes: one transaction per batch; duplicates (same event id) are skipped by the database."""

from __future__ import annotations

import weakref
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Table, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kiln_contracts import Event
from kiln_store import artifacts, job_status, logs, metric_events, status_events

from ..decode import Decoded, Points
from ..domain import Rows, project_status, to_rows

_CHUNK = {"sqlite": 5000, "postgresql": 5000}
_POINTS_STAGE = "kiln_stage_points"
_POINTS_COLUMNS = ["event_id", "job_id", "attempt", "time", "step", "raw"]
# One staging row per MetricsLogged event; PostgreSQL takes data.metrics from the raw JSON itself (one metric_events
# row per event, its points as jsonb), which costs far less than encoding the values in Python.
_POINTS_INSERT = f"""
INSERT INTO metric_events (event_id, job_id, attempt, kind, step, time, "values")
SELECT s.event_id, s.job_id, s.attempt, 'metrics', s.step, s.time,
       convert_from(s.raw, 'UTF8')::jsonb -> 'data' -> 'metrics'
FROM {_POINTS_STAGE} s
ON CONFLICT DO NOTHING
"""
# Tables written by COPY + INSERT .. SELECT when a batch has enough rows.  metric_events is not: its rows that come
# from Python (epochs, events with non-finite values) are few, and executemany encodes their JSON.
_COPIED = (logs, status_events, artifacts)
_staged: weakref.WeakSet[Any] = weakref.WeakSet()  # asyncpg connections whose temp staging tables exist


def _insert_ignore(dialect: str, table: Table):  # type: ignore[no-untyped-def]
    mod = postgresql if dialect == "postgresql" else sqlite
    return mod.insert(table).on_conflict_do_nothing()


def _upsert_status(dialect: str, row: dict[str, Any]):  # type: ignore[no-untyped-def]
    mod = postgresql if dialect == "postgresql" else sqlite
    stmt = mod.insert(job_status).values(**row)
    return stmt.on_conflict_do_update(
        index_elements=[job_status.c.job_id], set_={k: stmt.excluded[k] for k in row if k != "job_id"}
    )


async def _asyncpg(conn: AsyncConnection) -> Any:
    """The asyncpg connection inside this SQLAlchemy transaction, with the staging tables created once."""
    await conn.execute(text("SELECT 1"))  # SQLAlchemy begins its transaction lazily: begin it before going raw
    apg = (await conn.get_raw_connection()).driver_connection
    if apg not in _staged:
        # Temp tables live as long as the session; ON COMMIT DELETE ROWS empties them at each commit.
        for table in _COPIED:
            await apg.execute(f"CREATE TEMP TABLE IF NOT EXISTS kiln_stage_{table.name} (LIKE {table.name}) "
                              "ON COMMIT DELETE ROWS")
        await apg.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_POINTS_STAGE} (event_id text, job_id text, "
                          "attempt int, time timestamptz, step bigint, raw bytea) ON COMMIT DELETE ROWS")
        _staged.add(apg)
    return apg


async def _copy_pg(apg: Any, table: Table, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: COPY into a per-session staging table, then one INSERT .. SELECT .. ON CONFLICT DO NOTHING.

    COPY is about 4x faster than multi-row INSERTs here; the staging step keeps the insert idempotent.
    """
    cols = [c.name for c in table.columns]
    stage = f"kiln_stage_{table.name}"
    await apg.copy_records_to_table(stage, records=[tuple(r.get(c) for c in cols) for r in rows], columns=cols)
    quoted = ", ".join(f'"{c}"' for c in cols)
    await apg.execute(f"INSERT INTO {table.name} ({quoted}) SELECT {quoted} FROM {stage} ON CONFLICT DO NOTHING")


async def _bulk(conn: AsyncConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    dialect = conn.dialect.name
    if dialect == "postgresql" and conn.engine.driver == "asyncpg" and len(rows) >= 50 and table in _COPIED:
        await _copy_pg(await _asyncpg(conn), table, rows)
        return
    stmt = _insert_ignore(dialect, table)
    step = _CHUNK.get(dialect, 1000)
    for i in range(0, len(rows), step):
        await conn.execute(stmt, rows[i : i + step])  # executemany: one round trip per chunk


async def write_batch(engine: AsyncEngine, items: list[Decoded]) -> int:
    """Persist a batch of decoded events in one transaction; returns the number of events written."""
    now = datetime.now(timezone.utc)
    fast = engine.dialect.name == "postgresql" and engine.driver == "asyncpg"
    points = [i for i in items if isinstance(i, Points)] if fast else []
    events = [i for i in items if not isinstance(i, Points)] if fast else items
    rows = to_rows(events)
    try:
        await _write(engine, points, events, rows, now)
    except BaseException:
        _staged.clear()  # a rolled-back transaction may have taken the new staging tables with it
        raise
    return len(items)


async def _write(engine: AsyncEngine, points: list[Points], events: list[Decoded], rows: Rows, now: datetime) -> None:
    async with engine.begin() as conn:
        if points:
            apg = await _asyncpg(conn)
            await apg.copy_records_to_table(
                _POINTS_STAGE, columns=_POINTS_COLUMNS,
                records=[(p.id, p.job_id, p.attempt, p.time, p.step, p.raw) for p in points],
            )
            await apg.execute(_POINTS_INSERT)
        for table, data in ((metric_events, rows.metric_events), (logs, rows.logs), (status_events, rows.status_events),
                            (artifacts, rows.artifacts)):
            if data:
                await _bulk(conn, table, data)
        if rows.touched_jobs:
            await _project(conn, [e for e in events if isinstance(e, Event) and e.job_id in rows.touched_jobs], now)


async def _project(conn: AsyncConnection, events: list[Event], now: datetime) -> None:
    by_job: dict[str, list[Event]] = defaultdict(list)
    for ev in events:
        by_job[ev.job_id].append(ev)
    if conn.dialect.name == "postgresql":
        # Several lanes (or writer replicas) may project the same job at once: serialize them per job, in a fixed
        # order (no deadlock), so that each reads the status the other committed instead of overwriting it.
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(j)) FROM (SELECT unnest(CAST(:jobs AS text[])) AS j "
                 "ORDER BY 1) AS s"),
            {"jobs": sorted(by_job)},
        )
    current = {
        r.job_id: dict(r._mapping)
        for r in (await conn.execute(select(job_status).where(job_status.c.job_id.in_(list(by_job))))).all()
    }
    for job_id, evs in by_job.items():
        row = project_status(current.get(job_id), evs, now)
        if row is not None:
            await conn.execute(_upsert_status(conn.dialect.name, row))
