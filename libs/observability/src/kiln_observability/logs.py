"""Structured logs for every Kiln service: text for a terminal by default, JSON lines with ``KILN_LOG_FORMAT=json``.

Every line carries the job context of the code that wrote it (``job_id``, ``attempt``, ``project`` and ``trace_id``,
empty until tracing lands): :func:`job_context` sets it in context variables, so every task created inside the
``with`` block inherits it, and ``extra={"job_id": ...}`` sets it for one line.  Secrets (API keys, bearer tokens,
NATS seeds and JWTs, WebSocket tickets, passwords in URLs) are redacted from every formatted line, arguments and
tracebacks included, whatever logger wrote it.

Example:
    >>> import io, json, logging
    >>> out = io.StringIO()
    >>> setup_logging("runner", level="INFO", fmt="json", stream=out)
    >>> with job_context("j1", 2, "p"):
    ...     logging.getLogger("kiln.runner").info("started with key %s", "kiln_0123456789_" + "x" * 43)
    >>> line = json.loads(out.getvalue())
    >>> line["job_id"], line["attempt"], line["project"], line["trace_id"], line["message"]
    ('j1', 2, 'p', '', 'started with key kiln_0123456789_[redacted]')
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

FORMAT_ENV = "KILN_LOG_FORMAT"
LEVEL_ENV = "KILN_LOG_LEVEL"
FIELDS = ("job_id", "attempt", "project", "trace_id")
OWN_HANDLERS = ("faststream", "uvicorn", "uvicorn.error", "uvicorn.access")
"""Libraries' loggers that bring their own handler and format: made to go through the root logger instead."""

_JOB_ID: contextvars.ContextVar[str] = contextvars.ContextVar("kiln_job_id", default="")
_ATTEMPT: contextvars.ContextVar[int | None] = contextvars.ContextVar("kiln_attempt", default=None)
_PROJECT: contextvars.ContextVar[str] = contextvars.ContextVar("kiln_project", default="")
_TRACE_ID: contextvars.ContextVar[str] = contextvars.ContextVar("kiln_trace_id", default="")

# (pattern, replacement): applied in this order once the combined pattern finds anything at all.
_SECRETS = (
    (re.compile(r"\b(kiln_[0-9a-f]{10})_[A-Za-z0-9_-]{43}"), r"\1_[redacted]"),  # API key: its id part stays
    (re.compile(r"\b((?i:bearer)\s+)[A-Za-z0-9._~+/=-]+"), r"\1[redacted]"),
    (re.compile(r"(ticket=|kiln\.ticket\.)[^&\s\"']+"), r"\1[redacted]"),  # WebSocket tickets
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), "[redacted-jwt]"),  # NATS user JWTs
    (re.compile(r"\bS[UOAN][A-Z2-7]{56}\b"), "[redacted-seed]"),  # NATS nkey seeds (what .creds files hold)
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/\s@]+:)[^@\s/]+@"), r"\1[redacted]@"),  # user:password@ in URLs
)
_ANY_SECRET = re.compile("|".join(f"(?:{p.pattern})" for p, _ in _SECRETS))


def redact(text: str) -> str:
    """``text`` with the secrets it may quote replaced (a single search when there are none).

    Example:
        >>> redact("postgresql+asyncpg://kiln:s3cret@db/kiln Authorization: Bearer abc.def")
        'postgresql+asyncpg://kiln:[redacted]@db/kiln Authorization: Bearer [redacted]'
    """
    if _ANY_SECRET.search(text) is None:
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


@contextmanager
def job_context(job_id: str, attempt: int | None = None, project: str = "", trace_id: str = "") -> Iterator[None]:
    """Every line logged inside (and in tasks created inside) names this job; the previous context comes back after."""
    tokens = (_JOB_ID.set(job_id), _ATTEMPT.set(attempt), _PROJECT.set(project), _TRACE_ID.set(trace_id))
    try:
        yield
    finally:
        for var, token in zip((_JOB_ID, _ATTEMPT, _PROJECT, _TRACE_ID), tokens, strict=True):
            var.reset(token)  # type: ignore[attr-defined]


def current_job() -> dict[str, Any]:
    """The job context of the running code (empty values outside any job)."""
    return {"job_id": _JOB_ID.get(), "attempt": _ATTEMPT.get(), "project": _PROJECT.get(), "trace_id": _TRACE_ID.get()}


class JobContextFilter(logging.Filter):
    """Puts the job context on each record, unless the call gave its own with ``extra=``."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if not fields.get("job_id"):
            fields.update(current_job())
        else:
            for name in FIELDS:
                fields.setdefault(name, "" if name != "attempt" else None)
        return True


class TextFormatter(logging.Formatter):
    """``time logger LEVEL message [job=.. attempt=.. project=..]``, secrets redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        job = getattr(record, "job_id", "")
        if not job:
            return text
        trace = getattr(record, "trace_id", "")
        return (f"{text} [job={job} attempt={getattr(record, 'attempt', None) or '-'} "
                f"project={getattr(record, 'project', '') or '-'}{f' trace={trace}' if trace else ''}]")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, service, the job fields, exc."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": redact(record.getMessage()),
            "service": self.service,
        }
        for name in FIELDS:
            out[name] = getattr(record, name, None if name == "attempt" else "")
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact(record.exc_text)
        return json.dumps(out, ensure_ascii=False, default=str)


def resolve_level(level: str | None) -> str:
    """The service's own setting, else ``KILN_LOG_LEVEL``, else INFO."""
    return (level or os.environ.get(LEVEL_ENV) or "INFO").upper()


def setup_logging(service: str, level: str | None = None, fmt: str | None = None,
                  stream: IO[str] | None = None) -> None:
    """Configure the root logger for ``service`` (call once, first thing in ``main``).

    ``level``: the service's own setting (``KILN_<SVC>_LOG_LEVEL``), else ``KILN_LOG_LEVEL``, else INFO.
    ``fmt``: ``text`` or ``json``, else ``KILN_LOG_FORMAT``, else text.
    """
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "text").lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"{FORMAT_ENV} must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(resolve_level(level))
    for name in OWN_HANDLERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = True
    logging.captureWarnings(True)  # Python warnings become log lines too (JSON when asked), not bare stderr text
