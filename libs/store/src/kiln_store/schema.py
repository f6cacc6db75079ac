"""Kiln's SQL schema (SQLAlchemy Core).  Alembic migrations in ``migrations/`` create it.

Ownership (each table has one writer):
- ``jobs``: the API (job specs, submissions, re-runs).
- ``job_status``, ``status_events``, ``metric_events``, ``logs``, ``artifacts``: the metrics-writer (projections of
  events).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON, BigInteger, Column, DateTime, Index, Integer, MetaData, String, Table, Text, TypeDecorator,
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

jobs = Table(
    "jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("project", String(64), nullable=False, index=True),
    Column("name", String(200), nullable=False, default=""),
    Column("pool", String(64), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("submitted_at", UTCDateTime(), nullable=True),
    Column("attempt", Integer, nullable=False, default=0),
    Column("rerun_of", String(64), nullable=True),
    Column("cancel_requested_at", UTCDateTime(), nullable=True),
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
