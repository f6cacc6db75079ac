"""Kiln SQL storage: schema, Alembic migrations and read queries (SQLite by default, PostgreSQL by URL)."""

from .db import make_engine, upgrade
from .schema import (
    DEFAULT_PROJECT, api_keys, artifacts, audit_log, event_credentials, job_status, jobs, logs, memberships, metadata,
    metric_events, projects, sessions, status_events, users,
)

__all__ = [
    "make_engine", "upgrade", "metadata", "jobs", "job_status", "status_events", "metric_events", "logs", "artifacts",
    "DEFAULT_PROJECT", "users", "projects", "memberships", "api_keys", "sessions", "audit_log", "event_credentials",
]
