"""Request/response models of the REST API (the job spec itself comes from kiln_contracts)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kiln_contracts import JobSpec


class JobCreate(JobSpec):
    """A new job; ``start: true`` also starts it."""

    start: bool = Field(False, description="Start the job right away.")


class JobOut(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    project: str
    name: str
    pool: str
    status: str = Field(..., description="created, queued, starting, running, completed, failed, cancelled, lost")
    attempt: int
    reason: str | None = None
    exit_code: int | None = None
    exit_class: str | None = None
    runner: str | None = None
    host: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    spec: dict[str, Any]
    details: dict[str, Any] | None = None
    rerun_of: str | None = None
    created_at: datetime
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    last_heartbeat_at: datetime | None = None


class JobDetail(JobOut):
    timeline: list[dict[str, Any]] = Field(default_factory=list)
    artifacts: list[dict[str, Any]] = Field(default_factory=list)


class Series(BaseModel):
    steps: list[int]
    values: list[float | None]
    downsampled: bool = Field(False, description="True when this is a min/max downsampling of a longer series.")
    total_points: int = Field(0, description="Points in the full series (equal to len(steps) unless downsampled).")


class MetricsOut(BaseModel):
    job_id: str
    series: dict[str, Series]


class EpochRow(BaseModel):
    epoch: int
    metrics: dict[str, float | None]


class LogOut(BaseModel):
    time: datetime
    stream: str
    text: str
    attempt: int
