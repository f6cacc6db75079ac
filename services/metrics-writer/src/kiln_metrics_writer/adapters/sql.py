"""Bulk, idempotent writes: one transaction per batch; duplicates (same event id) are skipped by the database."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Table, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from kiln_contracts import Event
from kiln_store import artifacts, job_status, logs, metrics, status_events

from ..domain import project_status, to_rows

_CHUNK = {"sqlite": 5000, "postgresql": 5000}


def _insert_ignore(dialect: str, table: Table):  # type: ignore[no-untyped-def]
    mod = postgresql if dialect == "postgresql" else sqlite
    return mod.insert(table).on_conflict_do_nothing()


def _upsert_status(dialect: str, row: dict[str, Any]):  # type: ignore[no-untyped-def]
    mod = postgresql if dialect == "postgresql" else sqlite
    stmt = mod.insert(job_status).values(**row)
    return stmt.on_conflict_do_update(
        index_elements=[job_status.c.job_id], set_={k: stmt.excluded[k] for k in row if k != "job_id"}
    )


async def _copy_pg(conn: AsyncConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL: COPY into a per-session staging table, then one INSERT .. SELECT .. ON CONFLICT DO NOTHING.

    COPY is about 4x faster than multi-row INSERTs here; the staging step keeps the insert idempotent.
    """
    await conn.execute(text("SELECT 1"))  # SQLAlchemy begins its transaction lazily: begin it before going raw
    raw = await conn.get_raw_connection()
    apg = raw.driver_connection  # the asyncpg connection inside this transaction
    cols = [c.name for c in table.columns]
    stage = f"kiln_stage_{table.name}"
    await apg.execute(f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table.name}) ON COMMIT DELETE ROWS")
    await apg.copy_records_to_table(stage, records=[tuple(r.get(c) for c in cols) for r in rows], columns=cols)
    quoted = ", ".join(f'"{c}"' for c in cols)
    await apg.execute(f"INSERT INTO {table.name} ({quoted}) SELECT {quoted} FROM {stage} ON CONFLICT DO NOTHING")


async def _bulk(conn: AsyncConnection, table: Table, rows: list[dict[str, Any]]) -> None:
    dialect = conn.dialect.name
    if dialect == "postgresql" and conn.engine.driver == "asyncpg" and len(rows) >= 50:
        await _copy_pg(conn, table, rows)
        return
    stmt = _insert_ignore(dialect, table)
    step = _CHUNK.get(dialect, 1000)
    for i in range(0, len(rows), step):
        await conn.execute(stmt, rows[i : i + step])  # executemany: one round trip per chunk


async def write_batch(engine: AsyncEngine, events: list[Event]) -> int:
    """Persist a batch of events in one transaction; returns the number of rows offered to the database."""
    rows = to_rows(events)
    now = datetime.now(timezone.utc)
    async with engine.begin() as conn:
        for table, data in ((metrics, rows.metrics), (logs, rows.logs), (status_events, rows.status_events),
                            (artifacts, rows.artifacts)):
            if data:
                await _bulk(conn, table, data)
        if rows.touched_jobs:
            await _project(conn, [e for e in events if e.job_id in rows.touched_jobs], now)
    return rows.count


async def _project(conn: AsyncConnection, events: list[Event], now: datetime) -> None:
    by_job: dict[str, list[Event]] = defaultdict(list)
    for ev in events:
        by_job[ev.job_id].append(ev)
    current = {
        r.job_id: dict(r._mapping)
        for r in (await conn.execute(select(job_status).where(job_status.c.job_id.in_(list(by_job))))).all()
    }
    for job_id, evs in by_job.items():
        row = project_status(current.get(job_id), evs, now)
        if row is not None:
            await conn.execute(_upsert_status(conn.dialect.name, row))
