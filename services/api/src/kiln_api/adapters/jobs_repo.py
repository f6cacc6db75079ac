"""Writes to the ``jobs`` table (the API is its only writer)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from kiln_contracts import JobSpec, utcnow
from kiln_store import job_status, jobs


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


async def insert_job(conn: AsyncConnection, spec: JobSpec, rerun_of: str | None = None,
                     created_by: str | None = None) -> str:
    job_id = new_job_id()
    await conn.execute(jobs.insert().values(
        id=job_id, project=spec.project, name=spec.name or f"{spec.model} on {spec.dataset.rsplit('/', 1)[-1]}",
        pool=spec.pool, spec=spec.model_dump(mode="json"), created_at=utcnow(), attempt=0, rerun_of=rerun_of,
        created_by=created_by,
    ))
    return job_id


async def mark_submitted(conn: AsyncConnection, job_id: str, attempt: int, when: datetime) -> bool:
    """Compare-and-set: only a job never submitted (attempt 0) becomes submitted; False if someone else won."""
    res = await conn.execute(
        update(jobs).where(jobs.c.id == job_id, jobs.c.attempt == attempt - 1).values(attempt=attempt, submitted_at=when)
    )
    return res.rowcount == 1


async def mark_cancel_requested(conn: AsyncConnection, job_id: str) -> None:
    await conn.execute(update(jobs).where(jobs.c.id == job_id).values(cancel_requested_at=utcnow()))


async def unacknowledged_submissions(conn: AsyncConnection, older_than: timedelta) -> list[dict[str, Any]]:
    """Jobs submitted a while ago that no event has reached yet: their start command may not be on the bus."""
    stmt = (
        select(jobs.c.id, jobs.c.spec, jobs.c.attempt, jobs.c.submitted_at)
        .select_from(jobs.outerjoin(job_status, job_status.c.job_id == jobs.c.id))
        .where(jobs.c.submitted_at.is_not(None), jobs.c.submitted_at < utcnow() - older_than,
               jobs.c.cancel_requested_at.is_(None), job_status.c.job_id.is_(None))
        .limit(100)
    )
    return [dict(r._mapping) for r in (await conn.execute(stmt)).all()]
