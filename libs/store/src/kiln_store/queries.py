"""Read-side queries shared by the services that show jobs (the API).  No writes here."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from kiln_contracts import JobStatus

from .schema import artifacts, job_status, jobs, logs, metric_events, status_events

_JOB_COLUMNS = (
    jobs, job_status.c.status, job_status.c.attempt.label("status_attempt"), job_status.c.reason,
    job_status.c.exit_code, job_status.c.exit_class, job_status.c.runner, job_status.c.host, job_status.c.epoch,
    job_status.c.epochs, job_status.c.details, job_status.c.started_at, job_status.c.finished_at,
    job_status.c.updated_at, job_status.c.last_heartbeat_at,
)


def _job_row(row: Any) -> dict[str, Any]:
    d = dict(row._mapping)
    if d.get("status") is None:  # no event projected yet: the API's own knowledge
        d["status"] = "queued" if d.get("submitted_at") else "created"
    else:
        # ``jobs.attempt`` is the attempt the API submitted (0 or 1); runners' hand-backs and the reaper's retries
        # publish later ones. The projection holds the attempt its status belongs to: the timeline's latest.
        d["attempt"] = d["status_attempt"]
    return d


async def get_job(conn: AsyncConnection, job_id: str) -> dict[str, Any] | None:
    stmt = select(*_JOB_COLUMNS).select_from(jobs.outerjoin(job_status, job_status.c.job_id == jobs.c.id))
    row = (await conn.execute(stmt.where(jobs.c.id == job_id))).first()
    return _job_row(row) if row else None


async def list_jobs(
    conn: AsyncConnection, *, project: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0,
    readable: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Newest first; ``readable`` (when not None) limits the listing to those projects: a caller's own."""
    stmt = select(*_JOB_COLUMNS).select_from(jobs.outerjoin(job_status, job_status.c.job_id == jobs.c.id))
    if readable is not None:
        stmt = stmt.where(jobs.c.project.in_(readable))
    if project:
        stmt = stmt.where(jobs.c.project == project)
    if status:
        effective = func.coalesce(
            job_status.c.status, case((jobs.c.submitted_at.is_(None), "created"), else_="queued")
        )
        stmt = stmt.where(effective == status)
    stmt = stmt.order_by(jobs.c.created_at.desc()).limit(limit).offset(offset)
    return [_job_row(r) for r in (await conn.execute(stmt)).all()]


async def get_metrics(
    conn: AsyncConnection, job_id: str, *, keys: list[str] | None = None, kind: str | None = None
) -> dict[str, list[tuple[int, float | None]]]:
    """Metric series of a job: ``{key: [(step, value), ...]}`` ordered by step (latest attempt wins per step).

    ``metric_events`` holds one row per event with its points as JSON; the database expands them (``jsonb_each_text``
    / ``json_each``; on PostgreSQL a ``->>`` lookup per wanted key), keeping only the wanted keys.  Rows come from
    the ``(job_id, step)`` index in step order and one pass keeps, per key and step, the value of the latest attempt
    (then the latest time).  Non-finite values are stored as the strings "NaN" / "Infinity" / "-Infinity" and come
    back as floats.  100,000 steps of one key: about 0.3 s on SQLite and on PostgreSQL here.
    """
    pg = conn.dialect.name == "postgresql"
    params: dict[str, Any] = {"job_id": job_id}
    where = ["m.job_id = :job_id"]
    if pg and keys:  # a lookup per wanted key: cheaper than expanding every key of every row
        expand, key, value = "unnest(CAST(:keys AS text[])) AS p(key)", "p.key", '(m."values" ->> p.key)::float8'
        where.append('m."values" ? p.key')
        params["keys"] = list(keys)
    elif pg:
        expand, key, value = 'jsonb_each_text(m."values") AS p', "p.key", "p.value::float8"
    else:
        expand, key, value = 'json_each(m."values") AS p', "p.key", "p.value"
        if keys:
            where.append("p.key IN :keys")
            params["keys"] = list(keys)
    if kind:
        where.append("m.kind = :kind")
        params["kind"] = kind
    if pg:  # PostgreSQL sorts each step's rows by attempt and time cheaply: the last row of a step wins
        order, extra = "m.step, m.attempt, m.time", ""
    else:  # SQLite's sort of each step's rows cost about half the query: the rare repeated step is settled below
        order, extra = "m.step", ", m.attempt, m.time"
    stmt = text(
        f"SELECT {key}, m.step, {value}{extra} FROM {metric_events.name} AS m CROSS JOIN {expand} "
        f"WHERE {' AND '.join(where)} ORDER BY {order}"
    )
    if keys and not pg:
        stmt = stmt.bindparams(bindparam("keys", expanding=True))
    if pg:  # JIT compiling costs more than it saves on this scan (a long series: 130 instead of 185 ms)
        await conn.execute(text("SET LOCAL jit = off"))
    series: dict[str, list[tuple[int, float | None]]] = {}
    last: dict[str, Any] = {}  # SQLite: key -> the row of its last point
    for row in await conn.execute(stmt, params):
        key, step, val = row[0], row[1], row[2]
        if val.__class__ is not float and val is not None:  # SQLite: integers, non-finite values' strings
            val = float(val)
        points = series.get(key)
        if points is None:
            series[key] = [(step, val)]
        elif points[-1][0] != step:
            points.append((step, val))
        elif pg:  # the same step again, from a later attempt (or time)
            points[-1] = (step, val)
        elif (row[3], row[4]) >= (last[key][3], last[key][4]):
            points[-1] = (step, val)
        else:
            continue
        if not pg:
            last[key] = row
    return series


async def get_logs(
    conn: AsyncConnection, job_id: str, *, tail: int = 500, after: datetime | None = None
) -> list[dict[str, Any]]:
    stmt = select(logs.c.time, logs.c.stream, logs.c.text, logs.c.attempt).where(logs.c.job_id == job_id)
    if after is not None:
        stmt = stmt.where(logs.c.time > after)
    stmt = stmt.order_by(logs.c.time.desc(), logs.c.event_id.desc(), logs.c.line_no.desc()).limit(tail)
    rows = [dict(r._mapping) for r in (await conn.execute(stmt)).all()]
    rows.reverse()
    return rows


# Lifecycle order of the statuses, the ends sharing the last place: the order ``status_wins`` moves a job in.
_STEP = case({s.value: len(JobStatus) if s.terminal else i for i, s in enumerate(JobStatus)},
             value=status_events.c.status, else_=len(JobStatus))


async def get_timeline(conn: AsyncConnection, job_id: str) -> list[dict[str, Any]]:
    """Status events of a job by attempt, then lifecycle step, then time: the order in which the projection lets a
    job move (``kiln_contracts.status_wins``), whatever the clocks of the hosts that stamped them (a runner's
    ``starting`` may carry a time a little before the API's ``queued``), so that the last entry is the job's status,
    attempt and reason."""
    stmt = (
        select(status_events.c.time, status_events.c.status, status_events.c.attempt, status_events.c.reason)
        .where(status_events.c.job_id == job_id)
        .order_by(status_events.c.attempt, _STEP, status_events.c.time)
    )
    return [dict(r._mapping) for r in (await conn.execute(stmt)).all()]


async def get_artifacts(conn: AsyncConnection, job_id: str) -> list[dict[str, Any]]:
    stmt = select(artifacts).where(artifacts.c.job_id == job_id).order_by(artifacts.c.time)
    return [dict(r._mapping) for r in (await conn.execute(stmt)).all()]
