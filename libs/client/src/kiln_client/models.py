"""What the REST API answers, as typed views.

The job spec and the events are the contracts' own models (``kiln_contracts.JobSpec``, ``Event``); these are only the
API's answers, which no lib holds yet. They ignore nothing: a field the API adds later stays readable as an extra
attribute and in ``model_dump()``, so ``--json`` prints what the API sent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from kiln_contracts import Event, JobStatus
from pydantic import BaseModel, ConfigDict, Field


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")


class Artifact(_Answer):
    """A file a job stored (``GET /jobs/{id}/artifacts``)."""

    name: str
    uri: str
    size: int
    sha256: str
    epoch: int | None = None
    attempt: int = 1
    time: datetime | None = None


class Job(_Answer):
    """A job as listed (``GET /jobs``). ``spec`` is the recorded spec as stored (``JobSpec`` fields)."""

    id: str
    project: str
    name: str = ""
    pool: str = "default"
    status: JobStatus
    attempt: int = 0
    reason: str | None = None
    exit_code: int | None = None
    exit_class: str | None = None
    runner: str | None = None
    host: str | None = None
    epoch: int | None = None
    epochs: int | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    details: dict[str, Any] | None = None
    rerun_of: str | None = None
    created_at: datetime
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    last_heartbeat_at: datetime | None = None


class JobDetail(Job):
    """One job (``GET /jobs/{id}``): also its status timeline and its artifacts."""

    timeline: list[dict[str, Any]] = Field(default_factory=list)
    artifacts: list[Artifact] = Field(default_factory=list)


class Series(_Answer):
    steps: list[int]
    values: list[float | None]
    downsampled: bool = False
    total_points: int = 0


class Metrics(_Answer):
    """Metric series of a job by name (``GET /jobs/{id}/metrics``)."""

    job_id: str
    series: dict[str, Series]


class EpochRow(_Answer):
    epoch: int
    metrics: dict[str, float | None]


class LogEntry(_Answer):
    """A stored log line (``GET /jobs/{id}/logs``)."""

    time: datetime
    stream: str
    text: str
    attempt: int = 1


class Me(_Answer):
    """Who the credentials belong to (``GET /me``); ``credential`` is the key id, never the secret."""

    id: str
    name: str
    is_owner: bool
    via: str
    credential: str
    roles: dict[str, str] = Field(default_factory=dict)


class Project(_Answer):
    id: str
    description: str = ""
    created_at: datetime
    created_by: str | None = None
    role: str | None = None


class ApiKey(_Answer):
    """An API key's public part: its id (``kiln_...`` prefix) and dates."""

    id: str
    user_id: str
    name: str = ""
    created_at: datetime
    created_by: str | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class KeyCreated(ApiKey):
    """A new key: ``key`` is its secret, shown only in this answer."""

    key: str = Field(repr=False)


class Ticket(_Answer):
    """A WebSocket ticket (``POST /ws-tickets``); ``ticket`` is a secret for 60 s."""

    ticket: str = Field(repr=False)
    expires_at: datetime
    renew_within_s: int


class LiveEvent(BaseModel):
    """One event relayed by the notifier, with where it came from.

    ``sub`` is the subscription (``job:<id>`` or ``project:<id>``), ``stream`` and ``seq`` its cursor (resume with
    ``after={sub: {"after_events": seq}}``), ``event`` the contracts' envelope; ``event.data.kind`` says what it is.
    """

    sub: str
    stream: Literal["events", "logs"]
    seq: int
    event: Event

    @property
    def kind(self) -> str:
        return str(self.event.data.kind)
