"""Kiln's SQL schema (SQLAlchemy Core).  Alembic migrations in ``migrations/`` create it.

Ownership (each table has one writer):
- ``jobs``: the API (job specs, submissions, re-runs).
- ``users``, ``projects``, ``memberships``, ``api_keys``, ``sessions``, ``audit_log``: the API (accounts, access,
  and the record of who did what).
- ``event_credentials``: the API (third-party NATS readers of a project; never the credentials themselves).
- ``job_status``, ``status_events``, ``metric_events``, ``logs``, ``artifacts``: the metrics-writer (projections of
  events).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON, BigInteger, Boolean, Column, DateTime, ForeignKey, Index, Integer, MetaData, PrimaryKeyConstraint, String,
    Table, Text, TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):  # type: ignore[no-untyped-def]
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


metadata = MetaData()

DEFAULT_PROJECT = "default"

users = Table(
    "users", metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("is_owner", Boolean, nullable=False, default=False),  # instance-wide: creates projects and users
    Column("oidc_subject", String(255), nullable=True, unique=True),  # the mapped claim of an OIDC token
    Column("created_at", UTCDateTime(), nullable=False),
    Column("disabled_at", UTCDateTime(), nullable=True),
)

projects = Table(
    "projects", metadata,
    Column("id", String(64), primary_key=True),  # also the <project> token of the job subjects
    Column("description", Text, nullable=False, default=""),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("created_by", String(32), nullable=True),
)

memberships = Table(
    "memberships", metadata,
    Column("project_id", String(64), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", String(32), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("role", String(16), nullable=False),  # viewer, member, admin
    Column("created_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("project_id", "user_id"),
)

api_keys = Table(
    # Only the SHA-256 of a key is kept: keys carry 256 random bits, so a slow hash adds nothing but latency.
    "api_keys", metadata,
    Column("id", String(32), primary_key=True),  # the key's visible prefix, e.g. kiln_3f9a0c21d4
    Column("user_id", String(32), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(200), nullable=False, default=""),
    Column("hash", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("created_by", String(32), nullable=True),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
)

sessions = Table(
    # Web page sign-ins: the cookie holds a random token, the table its SHA-256 and the CSRF token of the session.
    "sessions", metadata,
    Column("id", String(32), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("user_id", String(32), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", String(32), nullable=True),  # the API key signed in with: revoking it ends the session
    Column("csrf", String(64), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
)

audit_log = Table(
    "audit_log", metadata,
    Column("id", String(64), primary_key=True),  # also the event id of its bus event
    Column("time", UTCDateTime(), nullable=False),
    Column("actor", String(32), nullable=True),  # user id; NULL for the instance itself (first start)
    Column("actor_name", String(200), nullable=False, default=""),
    Column("credential", String(64), nullable=False, default=""),  # key prefix or session id, never a secret
    Column("action", String(64), nullable=False),
    Column("project", String(64), nullable=True),
    Column("target", String(200), nullable=False, default=""),
    Column("details", JSON, nullable=False, default=dict),
    Column("published_at", UTCDateTime(), nullable=True),  # NULL until the bus stored its event
    Index("ix_audit_log_project_time", "project", "time"),
)

event_credentials = Table(
    # Read-only NATS credentials of third-party subscribers (docs/events.md).  The .creds text is shown once and
    # kept nowhere: only the user's public key, which is what a revocation names.
    "event_credentials", metadata,
    Column("id", String(32), primary_key=True),
    Column("project_id", String(64), ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(32), nullable=False),  # the consumer token: durables tp-<project>-<name>
    Column("public_key", String(64), nullable=False, unique=True),  # the NATS user (U...)
    Column("created_by", String(32), nullable=True),  # user id
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Index("ix_event_credentials_project_name", "project_id", "name"),
)

jobs = Table(
    "jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(64), ForeignKey("projects.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False, default=""),
    Column("pool", String(64), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("submitted_at", UTCDateTime(), nullable=True),
    Column("attempt", Integer, nullable=False, default=0),
    Column("rerun_of", String(64), nullable=True),
    Column("cancel_requested_at", UTCDateTime(), nullable=True),
    Column("created_by", String(32), nullable=True),  # user id
)

job_status = Table(
    "job_status", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("exit_code", Integer, nullable=True),
    Column("exit_class", String(32), nullable=True),
    Column("runner", String(200), nullable=False, default=""),
    Column("host", String(200), nullable=False, default=""),
    Column("epoch", Integer, nullable=True),
    Column("epochs", Integer, nullable=True),
    Column("details", JSON, nullable=False, default=dict),
    Column("started_at", UTCDateTime(), nullable=True),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("last_heartbeat_at", UTCDateTime(), nullable=True),
)

status_events = Table(
    "status_events", metadata,
    Column("event_id", String(128), primary_key=True),
    Column("job_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("time", UTCDateTime(), nullable=False),
    Index("ix_status_events_job", "job_id", "time"),
)

metric_events = Table(
    # One row per EpochCompleted / MetricsLogged event, its points in ``values`` ({key: number}); non-finite values
    # are the strings "NaN", "Infinity", "-Infinity" (JSON has no such numbers).  One row per point cost PostgreSQL
    # 20-25 us per point in index upkeep (docs/performance.md, "Metrics writer").
    "metric_events", metadata,
    Column("event_id", String(128), primary_key=True),
    Column("job_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # "epoch" or "metrics"
    Column("step", BigInteger, nullable=False),
    Column("time", UTCDateTime(), nullable=False),
    Column("values", JSON().with_variant(JSONB(), "postgresql"), nullable=False),
    Index("ix_metric_events_job_step", "job_id", "step"),
)

logs = Table(
    "logs", metadata,
    Column("event_id", String(128), primary_key=True),
    Column("line_no", Integer, primary_key=True),
    Column("job_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("stream", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("time", UTCDateTime(), nullable=False),
    Index("ix_logs_job_time", "job_id", "time"),
)

artifacts = Table(
    "artifacts", metadata,
    Column("event_id", String(128), primary_key=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("name", String(200), nullable=False),
    Column("uri", Text, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("epoch", Integer, nullable=True),
    Column("time", UTCDateTime(), nullable=False),
)
