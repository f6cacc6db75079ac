"""Kiln SQL storage: schema, Alembic migrations and read queries (SQLite by default, PostgreSQL by URL)."""

from .db import make_engine, upgrade
from .schema import artifacts, job_status, jobs, logs, metadata, metric_events, status_events

__all__ = [
    "make_engine", "upgrade", "metadata", "jobs", "job_status", "status_events", "metric_events", "logs", "artifacts",
]
