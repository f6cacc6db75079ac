"""Request/response models of the REST API (the job spec itself comes from kiln_contracts)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

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


# -- accounts -------------------------------------------------------------------------------------------------------

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,199}$"
PROJECT_ID = r"^[A-Za-z0-9_-]{1,64}$"
TOKEN = r"^[A-Za-z0-9_-]{1,128}$"


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=NAME, description="Unique user name (letters, digits, _ . @ -).")
    is_owner: bool = Field(False, description="Also an instance owner (creates projects and users).")
    oidc_subject: str | None = Field(None, min_length=1, max_length=255,
                                     description="Value of the configured OIDC claim that identifies this user.")


class UserOut(BaseModel):
    id: str
    name: str
    is_owner: bool
    oidc_subject: str | None = None
    created_at: datetime
    disabled_at: datetime | None = None


class MeOut(BaseModel):
    id: str
    name: str
    is_owner: bool
    via: str = Field(..., description="key, session, oidc (or none when authentication is off).")
    credential: str = Field(..., description="The key id or session the request came with (never a secret).")
    roles: dict[str, str] = Field(..., description="Project -> role (viewer, member, admin); the owner sees all.")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=200, description="What the key is for.")
    expires_in_days: int | None = Field(None, ge=1, le=3650, description="Expiry; none: until revoked.")


class KeyOut(BaseModel):
    id: str = Field(..., description="The key's visible prefix (kiln_...), shown in lists and logs.")
    user_id: str
    name: str
    created_at: datetime
    created_by: str | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None


class KeyCreated(KeyOut):
    key: str = Field(..., description="The secret key: shown only in this answer, stored only as a hash.")


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., pattern=PROJECT_ID, description="Project id (letters, digits, _ and -).")
    description: str = Field("", max_length=2000)


class ProjectOut(BaseModel):
    id: str
    description: str
    created_at: datetime
    created_by: str | None = None
    role: str | None = Field(None, description="The caller's role in it (admin for the owner).")


class MemberSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["viewer", "member", "admin"]


class MemberOut(BaseModel):
    user_id: str
    name: str
    role: str
    created_at: datetime


class AuditOut(BaseModel):
    id: str
    time: datetime
    actor: str | None
    actor_name: str
    credential: str
    action: str
    project: str | None
    target: str
    details: dict[str, Any]


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(..., min_length=1, max_length=200, description="An API key (kiln_...).")


class SessionOut(BaseModel):
    user: MeOut
    csrf_token: str = Field(..., description="Send as X-CSRF-Token with every POST/PUT/DELETE made with the cookie.")
    expires_at: datetime


class TicketRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[Annotated[str, Field(pattern=TOKEN)]] = Field(
        default_factory=list, max_length=100, description="Job ids the socket will watch.")
    projects: list[Annotated[str, Field(pattern=PROJECT_ID)]] = Field(
        default_factory=list, max_length=100, description="Projects whose events the socket will watch.")


class TicketOut(BaseModel):
    ticket: str = Field(..., description="Send in the WebSocket's first frame or as subprotocol kiln.ticket.<t>.")
    expires_at: datetime = Field(..., description="Use it before this (at most 60 s).")
    renew_within_s: int = Field(..., description="The socket must present a fresh ticket within this many seconds.")


class PublicConfig(BaseModel):
    notifier_url: str
    auth: str = Field(..., description="on or off")
    oidc_issuer: str | None = None
    oidc_login: bool = Field(False, description="Whether GET /api/v1/session/oidc starts an OIDC sign-in.")


# -- third-party event credentials (docs/events.md) -----------------------------------------------------------------

CONSUMER_NAME = r"^[a-z0-9]{1,32}$"


class EventCredentialsCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=CONSUMER_NAME,
                      description="The reader's name: 1-32 lowercase letters and digits (one subject token, no '-'); "
                                  "its durables are tp-<project>-<name>. One active credential per name.")
    expires_in_days: int = Field(90, ge=1, le=365, description="The credentials stop working after this.")


class EventConsumerOut(BaseModel):
    stream: str = Field(..., description="KILN_EVENTS (job events) or KILN_LOGS (log line batches).")
    durable: str = Field(..., description="Bind with js.pull_subscribe(filter_subject, durable=..., stream=...).")
    filter_subject: str = Field(..., description="What the durable delivers: this project's subjects only.")


class EventCredentialsOut(BaseModel):
    id: str
    project: str
    name: str
    public_key: str = Field(..., description="The NATS user (not a secret): what the server's logs name.")
    consumers: list[EventConsumerOut]
    created_at: datetime
    created_by: str | None = Field(None, description="User id of who created them.")
    created_by_name: str | None = Field(None, description="That user's name.")
    expires_at: datetime
    revoked_at: datetime | None = None
    status: Literal["active", "expired", "revoked"]


class EventCredentialsCreated(EventCredentialsOut):
    creds: str = Field(..., description="The NATS .creds file (user JWT and seed): shown only in this answer, "
                                        "stored nowhere. Save it with mode 0600.")
    inbox_prefix: str = Field(..., description="Connect with nats.connect(inbox_prefix=...): replies come there.")
    nats_urls: list[str] = Field(..., description="Where to connect.")
