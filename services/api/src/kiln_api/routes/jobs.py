"""Job routes: create, start, cancel, re-run, list, read status, metrics and logs."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import ValidationError

from kiln_contracts import AuditAction, JobSpec, JobStatus, StartJob, utcnow
from kiln_observability import job_context
from kiln_store import queries
from kiln_store.downsample import minmax

from ..adapters import audit, jobs_repo
from ..auth.access import CallerDep, access
from ..auth.caller import Caller
from ..deps import BusDep, ConnDep, MetricsDep
from ..metrics import ApiMetrics
from ..schemas import EpochRow, JobCreate, JobDetail, JobOut, LogOut, MetricsOut, Series

log = logging.getLogger("kiln.api")
router = APIRouter(prefix="/jobs", tags=["jobs"])
MAX_OFFSET = 2**31 - 1  # SQL takes a 64-bit offset at most; no listing is this long
DEFAULT_MAX_POINTS = 2000  # about one point per pixel column of a wide chart, for min and max


async def _job_or_404(conn: ConnDep, job_id: str) -> dict[str, Any]:
    job = await queries.get_job(conn, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id!r} not found")
    return job


def _recorded_spec(job: dict[str, Any]) -> JobSpec:
    """The job's stored spec; one that today's rules reject (stored by an older version) answers 409 with why."""
    try:
        return JobSpec.model_validate(job["spec"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise HTTPException(409, f"job {job['id']}'s recorded spec is no longer valid ({where}: {first['msg']}); "
                                 "create a new job instead") from exc


async def _start(conn: ConnDep, bus: BusDep, job: dict[str, Any], why: str | None = None, *,
                 caller: Caller, metrics: ApiMetrics) -> None:
    if job.get("submitted_at") is None and (job.get("cancel_requested_at") is not None
                                            or JobStatus(job["status"]).terminal):
        raise HTTPException(409, f"job {job['id']} was cancelled before it started; re-run it instead")
    if job["attempt"] > 0 or job.get("submitted_at") is not None:
        raise HTTPException(409, f"job {job['id']} was already started (status {job['status']}); re-run it instead")
    now = utcnow()
    cmd = StartJob(job_id=job["id"], attempt=1, spec=_recorded_spec(job), issued_at=now)
    if not await jobs_repo.mark_submitted(conn, job["id"], 1, now):
        raise HTTPException(409, f"job {job['id']} was already started")
    rec = await audit.record(conn, caller, AuditAction.job_started, project=job["project"], target=f"job:{job['id']}")
    await conn.commit()  # durable before publishing; the sweeper republishes if the publish below is lost
    metrics.started.labels(cmd.spec.pool).inc()
    await audit.publish(conn, bus, rec)
    try:
        await bus.publish_start(cmd, why)
    except Exception as exc:  # noqa: BLE001 - accepted anyway: the sweeper retries with the same message id
        with job_context(cmd.job_id, cmd.attempt, cmd.spec.project):
            log.warning("start of %s not published yet (%s); the sweeper will retry", job["id"], exc)


@router.post("", status_code=201, response_model=JobDetail,
             **access("member", project_from_body=True, rate="create"))
async def create_job(body: JobCreate, conn: ConnDep, bus: BusDep, caller: CallerDep,
                     metrics: MetricsDep) -> dict[str, Any]:
    """Create a job from a validated spec; with ``start: true`` it is queued at once."""
    spec = JobSpec.model_validate(body.model_dump(exclude={"start"}))
    job_id = await jobs_repo.insert_job(conn, spec, created_by=caller.user_id)
    rec = await audit.record(conn, caller, AuditAction.job_created, project=spec.project, target=f"job:{job_id}")
    await conn.commit()
    metrics.created.labels(spec.pool).inc()
    await audit.publish(conn, bus, rec)
    if body.start:
        await _start(conn, bus, await _job_or_404(conn, job_id), caller=caller, metrics=metrics)
    return await _detail(conn, job_id)


@router.post("/{job_id}/start", status_code=202, response_model=JobDetail, **access("member"))
async def start_job(job_id: str, conn: ConnDep, bus: BusDep, caller: CallerDep,
                    metrics: MetricsDep) -> dict[str, Any]:
    """Queue the job: publishes its start command for the runners of its pool."""
    await _start(conn, bus, await _job_or_404(conn, job_id), caller=caller, metrics=metrics)
    return await _detail(conn, job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobDetail, **access("member"))
async def cancel_job(job_id: str, conn: ConnDep, bus: BusDep, caller: CallerDep,
                     metrics: MetricsDep) -> dict[str, Any]:
    """Cancel a queued or running job; a queued job will never start."""
    job = await _job_or_404(conn, job_id)
    if JobStatus(job["status"]).terminal:
        raise HTTPException(409, f"job {job_id} already ended ({job['status']})")
    await jobs_repo.mark_cancel_requested(conn, job_id)
    rec = await audit.record(conn, caller, AuditAction.job_cancelled, project=job["project"], target=f"job:{job_id}",
                             status=job["status"])
    await conn.commit()
    metrics.cancelled.labels(job["pool"]).inc()
    await audit.publish(conn, bus, rec)
    queued = job["status"] in ("created", "queued")
    await bus.request_cancel(job_id, job["project"], max(job["attempt"], 1), f"cancelled by {caller.name}", queued)
    return await _detail(conn, job_id)


@router.post("/{job_id}/rerun", status_code=201, response_model=JobDetail, **access("member", rate="create"))
async def rerun_job(
    job_id: str, conn: ConnDep, bus: BusDep, caller: CallerDep, metrics: MetricsDep,
    data: Annotated[Literal["pinned", "latest"], Query(
        description="pinned (default): the new job must train on the dataset snapshot the original recorded, and "
                    "fails with both hashes if the dataset changed since; latest: train on the data as it is now.",
    )] = "pinned",
) -> dict[str, Any]:
    """Start a new job with exactly the same recorded spec (and, by default, the same dataset snapshot)."""
    job = await _job_or_404(conn, job_id)
    spec = _recorded_spec(job)
    recorded = (job.get("details") or {}).get("dataset_snapshot") or spec.dataset_snapshot
    if data == "pinned":
        spec = spec.model_copy(update={"dataset_snapshot": recorded})
        why = (f"re-run of {job_id} on its dataset snapshot {recorded[:12]}" if recorded else
               f"re-run of {job_id}, which recorded no dataset snapshot: the data is not pinned")
    else:
        spec = spec.model_copy(update={"dataset_snapshot": None})
        why = f"re-run of {job_id} on the current data" + (f" ({job_id} trained on {recorded[:12]})" if recorded else "")
    new_id = await jobs_repo.insert_job(conn, spec, rerun_of=job_id, created_by=caller.user_id)
    rec = await audit.record(conn, caller, AuditAction.job_rerun, project=spec.project, target=f"job:{new_id}",
                             rerun_of=job_id, data=data)
    await conn.commit()
    metrics.created.labels(spec.pool).inc()
    await audit.publish(conn, bus, rec)
    await _start(conn, bus, await _job_or_404(conn, new_id), why=why, caller=caller, metrics=metrics)
    return await _detail(conn, new_id)


@router.get("", response_model=list[JobOut], **access("user"))
async def list_jobs(
    conn: ConnDep,
    caller: CallerDep,
    project: str | None = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[dict[str, Any]]:
    """Jobs of your projects (every project for the owner), newest first."""
    return await queries.list_jobs(conn, project=project, status=status.value if status else None,
                                   limit=limit, offset=offset, readable=caller.readable_projects())


async def _detail(conn: ConnDep, job_id: str) -> dict[str, Any]:
    # The timeline first: the writer commits a status row and the job's projection together, and each read here
    # sees the latest commit, so the job read second is never behind the timeline it is shown with.
    timeline = await queries.get_timeline(conn, job_id)
    job = await _job_or_404(conn, job_id)
    job["timeline"] = timeline
    job["artifacts"] = await queries.get_artifacts(conn, job_id)
    return job


@router.get("/{job_id}", response_model=JobDetail, **access("viewer"))
async def get_job(job_id: str, conn: ConnDep) -> dict[str, Any]:
    return await _detail(conn, job_id)


@router.get("/{job_id}/metrics", response_model=MetricsOut, **access("viewer"))
async def get_metrics(
    job_id: str,
    conn: ConnDep,
    keys: Annotated[str | None, Query(description="Comma-separated metric names")] = None,
    kind: Annotated[str | None, Query(pattern="^(epoch|metrics)$")] = None,
    max_points: Annotated[int, Query(
        ge=0, description="Most points per series (0: all, else at least 10). A longer series is downsampled with "
                          "min/max buckets over its step range, keeping the first and last points and every "
                          "bucket's lowest and highest value, so no peak or dip is lost; its 'downsampled' is true.",
    )] = DEFAULT_MAX_POINTS,
) -> MetricsOut:
    """Metric series of a job, ordered by step (the latest attempt wins per step); long ones downsampled."""
    if 0 < max_points < 10:
        raise HTTPException(422, "max_points must be 0 (every point) or at least 10")
    await _job_or_404(conn, job_id)
    wanted = [k for k in (keys or "").split(",") if k] or None
    series = await queries.get_metrics(conn, job_id, keys=wanted, kind=kind)
    out: dict[str, Series] = {}
    for k, pts in series.items():
        small = minmax(pts, max_points) if max_points and len(pts) > max_points else pts
        out[k] = Series(steps=[s for s, _ in small], values=[v for _, v in small], downsampled=small is not pts,
                        total_points=len(pts))
    return MetricsOut(job_id=job_id, series=out)


@router.get("/{job_id}/epochs", response_model=list[EpochRow], **access("viewer"))
async def get_epochs(job_id: str, conn: ConnDep) -> list[EpochRow]:
    """Metrics per epoch, one row per epoch."""
    await _job_or_404(conn, job_id)
    rows: dict[int, dict[str, float | None]] = {}
    for key, pts in (await queries.get_metrics(conn, job_id, kind="epoch")).items():
        for step, value in pts:
            rows.setdefault(step, {})[key] = value
    return [EpochRow(epoch=e, metrics=m) for e, m in sorted(rows.items())]


@router.get("/{job_id}/logs", response_model=list[LogOut], **access("viewer"))
async def get_logs(job_id: str, conn: ConnDep, tail: Annotated[int, Query(ge=1, le=10_000)] = 500) -> list[dict]:
    await _job_or_404(conn, job_id)
    return await queries.get_logs(conn, job_id, tail=tail)
