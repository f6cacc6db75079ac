"""NATS subjects used by Kiln.  The only place a subject string is spelled.

Tokens carry ids so that wildcards work::

    kiln.cmd.start.<pool>                      StartJob commands (stream KILN_JOBS, work queue)
    kiln.cmd.cancel.<job_id>                   CancelJob commands (core NATS, runners listen)
    kiln.evt.<project>.<job_id>.<kind>         job events (stream KILN_EVENTS)
    kiln.log.<project>.<job_id>                log line batches (stream KILN_LOGS)
    kiln.dlq.<consumer>                        poison messages (stream KILN_DLQ)
    kiln.audit.<project>.<action>              audit records (stream KILN_AUDIT)
"""

from __future__ import annotations

import re

PREFIX = "kiln"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

START_ALL = f"{PREFIX}.cmd.start.>"
CANCEL_ALL = f"{PREFIX}.cmd.cancel.*"
EVENTS_ALL = f"{PREFIX}.evt.>"
LOGS_ALL = f"{PREFIX}.log.>"
DLQ_ALL = f"{PREFIX}.dlq.>"
AUDIT_ALL = f"{PREFIX}.audit.>"

# Address templates (AsyncAPI notation) of the same subjects.
START_ADDRESS = PREFIX + ".cmd.start.{pool}"
CANCEL_ADDRESS = PREFIX + ".cmd.cancel.{job_id}"
EVENT_ADDRESS = PREFIX + ".evt.{project}.{job_id}.%s"
LOG_ADDRESS = PREFIX + ".log.{project}.{job_id}"
DLQ_ADDRESS = PREFIX + ".dlq.{consumer}"
AUDIT_ADDRESS = PREFIX + ".audit.{project}.{action}"


def token(value: str) -> str:
    """Return ``value`` if it is a safe subject token, else raise ``ValueError``.

    Example:
        >>> token("cpu")
        'cpu'
    """
    if not _TOKEN.match(value):
        raise ValueError(f"not a valid subject token: {value!r} (letters, digits, '_' and '-' only)")
    return value


def start(pool: str) -> str:
    """Subject of the StartJob command for runners of ``pool``."""
    return f"{PREFIX}.cmd.start.{token(pool)}"


def cancel(job_id: str) -> str:
    """Subject of the CancelJob command for one job."""
    return f"{PREFIX}.cmd.cancel.{token(job_id)}"


def event(project: str, job_id: str, kind: str) -> str:
    """Subject of one job event of ``kind`` (status, epoch, metrics, progress, finished, ...)."""
    return f"{PREFIX}.evt.{token(project)}.{token(job_id)}.{token(kind)}"


def job_events(job_id: str, project: str = "*") -> str:
    """Wildcard for every event of one job."""
    return f"{PREFIX}.evt.{project if project == '*' else token(project)}.{token(job_id)}.>"


def project_events(project: str) -> str:
    """Wildcard for every event of every job of one project."""
    return f"{PREFIX}.evt.{token(project)}.>"


def log(project: str, job_id: str) -> str:
    """Subject of a job's log line batches."""
    return f"{PREFIX}.log.{token(project)}.{token(job_id)}"


def job_logs(job_id: str, project: str = "*") -> str:
    """Wildcard for the log batches of one job (any project)."""
    return f"{PREFIX}.log.{project if project == '*' else token(project)}.{token(job_id)}"


def dlq(consumer: str) -> str:
    """Dead-letter subject of one consumer."""
    return f"{PREFIX}.dlq.{token(consumer)}"


def audit(project: str, action: str) -> str:
    """Subject of one audit record (``project`` is ``_instance`` for records outside any project)."""
    return f"{PREFIX}.audit.{token(project)}.{token(action)}"
